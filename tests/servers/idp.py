"""A small OAuth2 identity provider on loopback (aiohttp.web in its own thread) for the tests.

It speaks what the bridge and the test mail servers use: the device authorization grant
(RFC 8628), the authorization code grant with PKCE S256 (RFC 7636), refresh with rotation (the
old refresh token dies, as Microsoft's do), and token introspection (RFC 7662) for Dovecot's
oauth2 passdb and the test SMTP server. Switches make it slow down pollers, expire or decline
device codes, revoke a user's grant, and fail like an outage. It runs in a thread with its own
event loop, like aiosmtpd's Controller, so that Dovecot (a session fixture) can reach it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlencode, urlsplit

from aiohttp import web

CLIENT_ID = "mailbridge-test-client"


@dataclass
class Grant:
    """A user's consent: the chain of refresh tokens it hands out, newest last."""

    username: str
    scope: str
    refresh_token: str
    revoked: bool = False
    refreshes: int = 0


@dataclass
class Issued:
    """An access token: whose, until when (monotonic), from which grant."""

    username: str
    expires_at: float
    grant: Grant


@dataclass
class DeviceRequest:
    """A device code waiting for the user (RFC 8628 §3.2)."""

    device_code: str
    user_code: str
    scope: str
    expires_at: float
    interval: float
    decision: str = "pending"  # pending, approved, declined, used
    username: str = ""
    polls: list[float] = field(default_factory=list)
    too_fast: int = 0


@dataclass
class CodeRequest:
    """An authorization code, its PKCE challenge and redirect (RFC 7636 §4.4)."""

    username: str
    redirect_uri: str
    challenge: str
    scope: str
    used: bool = False


@dataclass
class Introspection:
    """One introspection answer: which token (a prefix), active or not, and why."""

    token_prefix: str
    active: bool
    reason: str


class IdentityProvider:
    """The IdP; its state changes under one condition variable (handlers run in its thread)."""

    def __init__(
        self,
        *,
        access_lifetime: float = 3600.0,
        interval: float = 0.2,
        device_lifetime: float = 600.0,
        client_secret: str | None = None,
    ) -> None:
        self.access_lifetime = access_lifetime
        self.interval = interval
        self.device_lifetime = device_lifetime
        self.client_secret = client_secret
        self.browser_user = ""  # who is signed in at /authorize ("": nobody, access_denied)
        self._lock = threading.Condition()
        self._grants: list[Grant] = []
        self._access: dict[str, Issued] = {}
        self._devices: dict[str, DeviceRequest] = {}
        self._codes: dict[str, CodeRequest] = {}
        self._slow_down = 0
        self._outage = 0
        self.introspections: list[Introspection] = []
        self.secrets: set[str] = set()  # every token and code handed out (for the log audit)
        self.token_requests: dict[str, int] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    # Lifecycle

    def start(self) -> None:
        """Serve on 127.0.0.1 (a free port) from a thread; returns once it listens."""
        started = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:
                failure.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._close())
            loop.close()

        self._thread = threading.Thread(target=serve, name="idp", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the identity provider did not start within 10 s")
        if failure:
            raise failure[0]

    async def _open(self) -> None:
        app = web.Application()
        app.router.add_post("/device", self._device)
        app.router.add_get("/authorize", self._authorize)
        app.router.add_post("/token", self._token)
        app.router.add_post("/introspect", self._introspect)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self) -> None:
        """Stop serving and end the thread."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._thread = self._loop = None

    def __enter__(self) -> IdentityProvider:
        """Start."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop."""
        self.stop()

    @property
    def url(self) -> str:
        """The base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def introspection_url(self) -> str:
        """Where Dovecot and the test SMTP server check bearer tokens."""
        return f"{self.url}/introspect"

    def oauth2_settings(self, **extra: Any) -> dict[str, Any]:
        """An [accounts.oauth2] block (provider custom) pointing here."""
        block: dict[str, Any] = {
            "provider": "custom",
            "client_id": CLIENT_ID,
            "device_authorization_url": f"{self.url}/device",
            "authorization_url": f"{self.url}/authorize",
            "token_url": f"{self.url}/token",
            "scopes": ["mail", "offline_access"],
        }
        block.update(extra)
        return block

    # The user's side (a browser)

    def approve(self, user_code: str, username: str) -> None:
        """The user signs in as `username` and approves the device code."""
        with self._lock:
            request = self._device_by_user_code(user_code)
            request.decision, request.username = "approved", username
            self._lock.notify_all()

    def decline(self, user_code: str) -> None:
        """The user declines the device code (Microsoft: authorization_declined)."""
        with self._lock:
            self._device_by_user_code(user_code).decision = "declined"

    def expire_devices(self) -> None:
        """Every pending device code expires now."""
        with self._lock:
            for request in self._devices.values():
                request.expires_at = 0.0

    def _device_by_user_code(self, user_code: str) -> DeviceRequest:
        for request in self._devices.values():
            if request.user_code == user_code:
                return request
        raise KeyError(f"no device request with user code {user_code!r}")

    # Switches

    def slow_down(self, count: int = 1) -> None:
        """Answer the next `count` device polls with slow_down."""
        with self._lock:
            self._slow_down += count

    def outage(self, count: int) -> None:
        """Answer the next `count` token requests with 503."""
        with self._lock:
            self._outage += count

    def invalidate(self, token: str) -> None:
        """One access token stops working before its time (the client cannot tell)."""
        with self._lock:
            self._access[token].expires_at = 0.0

    def outage_over(self) -> None:
        """The token endpoint answers again."""
        with self._lock:
            self._outage = 0

    def revoke(self, username: str) -> None:
        """Revoke every grant of `username`: refreshes get invalid_grant, tokens go inactive."""
        with self._lock:
            for grant in self._grants:
                if grant.username == username:
                    grant.revoked = True

    # Observations

    def devices(self) -> list[DeviceRequest]:
        """The device requests so far, oldest first."""
        with self._lock:
            return list(self._devices.values())

    def device(self, user_code: str) -> DeviceRequest:
        """The device request showing `user_code`."""
        with self._lock:
            return self._device_by_user_code(user_code)

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Block until predicate() holds (checked after each change), bounded."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"identity provider: condition not met in {timeout} s")
                self._lock.wait(min(remaining, 0.5))

    def refresh_token_of(self, username: str) -> str:
        """The refresh token currently valid for the user's newest grant."""
        with self._lock:
            return next(g for g in reversed(self._grants) if g.username == username).refresh_token

    def refreshes(self, username: str) -> int:
        """How often the user's grants were refreshed."""
        with self._lock:
            return sum(g.refreshes for g in self._grants if g.username == username)

    def access_tokens(self, username: str) -> list[str]:
        """Every access token issued to the user, oldest first."""
        with self._lock:
            return [t for t, issued in self._access.items() if issued.username == username]

    def refused_introspections(self) -> list[Introspection]:
        """Introspections answered inactive."""
        with self._lock:
            return [i for i in self.introspections if not i.active]

    def expires_in(self, token: str) -> float:
        """Seconds until the access token expires (negative: expired)."""
        with self._lock:
            return self._access[token].expires_at - time.monotonic()

    # Endpoints

    async def _device(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("client_id") != CLIENT_ID:
            return _error(401, "invalid_client")
        with self._lock:
            device = DeviceRequest(
                device_code=self._new_secret(),
                user_code=f"{secrets.randbelow(10**8):08d}",
                scope=str(form.get("scope", "")),
                expires_at=time.monotonic() + self.device_lifetime,
                interval=self.interval,
            )
            self._devices[device.device_code] = device
            self._lock.notify_all()
        return web.json_response(
            {
                "device_code": device.device_code,
                "user_code": device.user_code,
                "verification_uri": f"{self.url}/device-login",
                "expires_in": int(self.device_lifetime),
                "interval": self.interval,
            }
        )

    async def _authorize(self, request: web.Request) -> web.Response:
        """The browser arrives signed in as browser_user, who approves at once."""
        query = request.query
        redirect_uri = query.get("redirect_uri", "")
        if query.get("client_id") != CLIENT_ID or not redirect_uri.startswith("http://"):
            return web.Response(status=400, text="bad client or redirect_uri")
        answer: dict[str, str] = {"state": query.get("state", "")}
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            answer.update(error="invalid_request", error_description="PKCE S256 required")
        elif not self.browser_user:
            answer.update(error="access_denied")
        else:
            with self._lock:
                # One-time and useless without the PKCE verifier; it passes through the chat
                # (a pasted address), so it is not counted with the tokens.
                code = secrets.token_urlsafe(24)
                self._codes[code] = CodeRequest(
                    username=self.browser_user,
                    redirect_uri=redirect_uri,
                    challenge=query["code_challenge"],
                    scope=query.get("scope", ""),
                )
            answer["code"] = code
        joiner = "&" if urlsplit(redirect_uri).query else "?"
        location = redirect_uri + joiner + urlencode(answer)
        return web.Response(status=302, headers={"Location": location})

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        grant_type = str(form.get("grant_type", ""))
        with self._lock:
            self.token_requests[grant_type] = self.token_requests.get(grant_type, 0) + 1
            if self._outage > 0:
                self._outage -= 1
                return web.Response(status=503, text="<html>Service Unavailable</html>")
            if form.get("client_id") != CLIENT_ID or (
                self.client_secret is not None and form.get("client_secret") != self.client_secret
            ):
                return _error(401, "invalid_client")
            if grant_type == "urn:ietf:params:oauth:grant-type:device_code":
                return self._device_token(str(form.get("device_code", "")))
            if grant_type == "authorization_code":
                return self._code_token(form)
            if grant_type == "refresh_token":
                return self._refresh(str(form.get("refresh_token", "")))
            return _error(400, "unsupported_grant_type")

    def _device_token(self, device_code: str) -> web.Response:
        device = self._devices.get(device_code)
        if device is None or device.decision == "used":
            return _error(400, "invalid_grant")
        now = time.monotonic()
        # RFC 8628 §3.5: a client that polls faster than `interval` is told to slow down.
        if device.polls and now - device.polls[-1] < device.interval * 0.9:
            device.too_fast += 1
            device.polls.append(now)
            device.interval += 5
            return _error(400, "slow_down")
        device.polls.append(now)
        self._lock.notify_all()
        if now >= device.expires_at:
            return _error(400, "expired_token")
        if self._slow_down > 0:
            self._slow_down -= 1
            device.interval += 5
            return _error(400, "slow_down")
        if device.decision == "declined":
            return _error(400, "authorization_declined")
        if device.decision == "pending":
            return _error(400, "authorization_pending")
        device.decision = "used"
        return self._issue(Grant(device.username, device.scope, ""))

    def _code_token(self, form: Any) -> web.Response:
        code = self._codes.get(str(form.get("code", "")))
        if code is None or code.used:
            return _error(400, "invalid_grant", "unknown or used code")
        code.used = True
        if form.get("redirect_uri") != code.redirect_uri:
            return _error(400, "invalid_grant", "redirect_uri differs")
        verifier = str(form.get("code_verifier", ""))
        digest = hashlib.sha256(verifier.encode("ascii", "replace")).digest()
        if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != code.challenge:
            return _error(400, "invalid_grant", "PKCE verification failed")
        return self._issue(Grant(code.username, code.scope, ""))

    def _refresh(self, refresh_token: str) -> web.Response:
        grant = next((g for g in self._grants if g.refresh_token == refresh_token), None)
        if grant is None or grant.revoked:
            return _error(400, "invalid_grant", "AADSTS70000: the refresh token was revoked")
        grant.refreshes += 1
        return self._issue(grant)

    def _issue(self, grant: Grant) -> web.Response:
        """New access and refresh tokens; the grant's old refresh token stops working."""
        if grant not in self._grants:
            self._grants.append(grant)
        grant.refresh_token = self._new_secret()
        access = self._new_secret()
        self._access[access] = Issued(
            grant.username, time.monotonic() + self.access_lifetime, grant
        )
        self._lock.notify_all()
        return web.json_response(
            {
                "access_token": access,
                "token_type": "Bearer",
                "expires_in": self.access_lifetime,
                "refresh_token": grant.refresh_token,
                "scope": grant.scope,
            }
        )

    async def _introspect(self, request: web.Request) -> web.Response:
        form = await request.post()
        token = str(form.get("token", ""))
        with self._lock:
            issued = self._access.get(token)
            if issued is None:
                active, reason = False, "unknown"
            elif issued.grant.revoked:
                active, reason = False, "revoked"
            elif time.monotonic() >= issued.expires_at:
                active, reason = False, "expired"
            else:
                active, reason = True, ""
            self.introspections.append(Introspection(token[:6], active, reason))
            self._lock.notify_all()
        if not active:
            return web.json_response({"active": False})
        return web.json_response({"active": True, "username": issued.username})

    def _new_secret(self) -> str:
        value = secrets.token_urlsafe(24)
        self.secrets.add(value)
        return value


def _error(status: int, error: str, description: str = "") -> web.Response:
    body = {"error": error}
    if description:
        body["error_description"] = description
    return web.json_response(body, status=status)
