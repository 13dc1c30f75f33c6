"""OAuth2 for IMAP and SMTP: providers, the sign-in flows, the encrypted token store, refresh.

Sign-in is the device authorization grant (RFC 8628) or the authorization code grant with PKCE
(RFC 7636) and a loopback redirect (RFC 8252 §7.3). Tokens are kept in the database encrypted
with BRIDGE_SECRET_KEY (Fernet; several keys make a MultiFernet, so a key can be rotated).
Access tokens are refreshed before they expire, one refresh per account at a time; the newest
refresh token is always the one stored (Microsoft replaces it on every use). A refresh the
provider refuses with invalid_grant ends the account's sign-in: it is not retried, and the chat
is told once. No token is ever logged or printed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NoReturn, TypeVar
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from bridge.config import AccountSettings, OAuth2Settings
from bridge.db import store
from bridge.db.engine import Database
from bridge.errors import (
    BridgeError,
    ConfigError,
    PermanentMailError,
    SignInNeeded,
    TemporaryMailError,
)
from bridge.retry import Backoff

logger = logging.getLogger(__name__)

T = TypeVar("T")
Method = Literal["device", "code"]
Notify = Callable[[str], Awaitable[None]]

MICROSOFT_SCOPES = (
    "https://outlook.office.com/IMAP.AccessAsUser.All",
    "https://outlook.office.com/SMTP.Send",
    "offline_access",  # without it Microsoft hands out no refresh token
)
GOOGLE_SCOPES = ("https://mail.google.com/",)
HTTP_TIMEOUT = 30.0
# Refresh when less than this is left of an access token (or a quarter of its lifetime).
REFRESH_BEFORE = 300.0
# A login refused within this long after a forced refresh means the grant is gone.
FORCED_WINDOW = 120.0
# RFC 8628 §3.2: without `interval` the client waits 5 s; §3.5: slow_down adds 5 s for good.
DEVICE_INTERVAL = 5.0
SLOW_DOWN_STEP = 5.0
# How long the code flow waits for the browser's redirect or the pasted address.
CODE_TIMEOUT = 600.0
_MAX_DESCRIPTION = 200


class SignInFailed(BridgeError):
    """A sign-in ended without tokens: declined, expired, or refused; one line for the user."""


class TokenEndpointDown(TemporaryMailError):
    """The provider's endpoint did not answer usefully (network, 5xx, 429): try again later."""


class OAuthProtocolError(BridgeError):
    """An OAuth2 error answer (RFC 6749 §5.2): `error` is its code."""

    def __init__(self, error: str, description: str = "") -> None:
        text = f"{error}: {description}" if description else error
        super().__init__(text)
        self.error, self.description = error, description


@dataclass(frozen=True)
class Provider:
    """Where a provider signs users in and hands out tokens."""

    name: str
    token_url: str
    device_authorization_url: str | None
    authorization_url: str | None
    scopes: tuple[str, ...]
    authorize_params: tuple[tuple[str, str], ...] = ()
    refresh_scope: bool = False  # Microsoft: name the scopes again when refreshing
    redirect_host: str = "127.0.0.1"

    @property
    def default_method(self) -> Method:
        """The device flow where the provider has one for mail, else the code flow."""
        return "device" if self.device_authorization_url else "code"


def provider_of(settings: OAuth2Settings) -> Provider:
    """The known endpoints of microsoft and google, or the custom ones; settings override."""
    if settings.provider == "microsoft":
        base = f"https://login.microsoftonline.com/{settings.tenant}/oauth2/v2.0"
        known = Provider(
            "microsoft",
            token_url=f"{base}/token",
            device_authorization_url=f"{base}/devicecode",
            authorization_url=f"{base}/authorize",
            scopes=MICROSOFT_SCOPES,
            refresh_scope=True,
            # Microsoft matches a registered http://localhost redirect whatever the port.
            redirect_host="localhost",
        )
    elif settings.provider == "google":
        known = Provider(
            "google",
            token_url="https://oauth2.googleapis.com/token",  # noqa: S106 - a URL
            # Google's device flow refuses the mail scope (invalid_scope): code flow only.
            device_authorization_url=None,
            authorization_url="https://accounts.google.com/o/oauth2/v2/auth",
            scopes=GOOGLE_SCOPES,
            # offline: a refresh token; consent: a new one also when the user consented before.
            authorize_params=(("access_type", "offline"), ("prompt", "consent")),
        )
    else:
        known = Provider(
            "custom",
            token_url="",
            device_authorization_url=None,
            authorization_url=None,
            scopes=(),
        )
    return replace(
        known,
        token_url=settings.token_url or known.token_url,
        device_authorization_url=settings.device_authorization_url
        or known.device_authorization_url,
        authorization_url=settings.authorization_url or known.authorization_url,
        scopes=tuple(settings.scopes) if settings.scopes else known.scopes,
    )


@dataclass(frozen=True)
class Tokens:
    """A sign-in's tokens in plain text (only ever in memory)."""

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_at: datetime | None
    scope: str
    obtained_at: datetime

    def expired(self, now: datetime) -> bool:
        """Whether the access token is past its lifetime."""
        return self.expires_at is not None and now >= self.expires_at

    def due(self, now: datetime) -> bool:
        """Whether to refresh now: little of the access token's lifetime is left."""
        if self.expires_at is None:
            return False
        lifetime = (self.expires_at - self.obtained_at).total_seconds()
        margin = min(REFRESH_BEFORE, max(0.0, lifetime) / 4)
        return now >= self.expires_at - timedelta(seconds=margin)


@dataclass(frozen=True)
class DeviceCode:
    """RFC 8628 §3.2: what the user is shown, and what the client polls with."""

    device_code: str = field(repr=False)
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: float
    interval: float


@dataclass(frozen=True)
class CodeFlow:
    """One authorization-code sign-in: the address to open and what checks the answer."""

    url: str
    redirect_uri: str
    state: str = field(repr=False)
    verifier: str = field(repr=False)


class TokenCipher:
    """MultiFernet over the secret keys: the first encrypts, each of them decrypts."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise ConfigError("BRIDGE_SECRET_KEY: required to store OAuth2 tokens")
        self._fernet = MultiFernet([Fernet(key) for key in keys])

    def encrypt(self, value: str) -> str:
        """The Fernet token of `value` ("" stays "")."""
        return self._fernet.encrypt(value.encode()).decode("ascii") if value else ""

    def decrypt(self, value: str) -> str:
        """The plain value; InvalidToken when no key fits."""
        return self._fernet.decrypt(value.encode("ascii")).decode() if value else ""


def _one_line(text: object) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= _MAX_DESCRIPTION else line[: _MAX_DESCRIPTION - 1] + "…"


class OAuthClient:
    """The HTTP side of one account's provider: form POSTs (RFC 6749 §3.2) with httpx."""

    def __init__(self, settings: OAuth2Settings, http: httpx.AsyncClient) -> None:
        self.provider = provider_of(settings)
        self._client_id = settings.client_id
        self._secret = settings.client_secret
        self._http = http

    def _client_auth(self) -> dict[str, str]:
        # RFC 6749 §2.3.1: the secret in the body (public clients have none).
        data = {"client_id": self._client_id}
        if self._secret is not None:
            data["client_secret"] = self._secret.get_secret_value()
        return data

    async def _post(self, url: str, data: dict[str, str]) -> dict[str, Any]:
        """POST a form; the JSON answer, OAuthProtocolError, or TokenEndpointDown."""
        host = urlsplit(url).netloc
        try:
            answer = await self._http.post(url, data=data, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise TokenEndpointDown(f"{host} unreachable ({type(exc).__name__})") from None
        try:
            body = answer.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise TokenEndpointDown(f"{host} answered {answer.status_code} without JSON")
        # RFC 6749 §5.2: errors come as 400 (or 401) with an `error` code.
        if answer.status_code in (400, 401) and isinstance(body.get("error"), str):
            description = body.get("error_description")
            text = _one_line(description.splitlines()[0]) if isinstance(description, str) else ""
            raise OAuthProtocolError(body["error"], text)
        if answer.status_code != 200:
            raise TokenEndpointDown(f"{host} answered {answer.status_code}")
        return body

    async def _token_request(self, grant: dict[str, str], refresh_token: str = "") -> Tokens:
        body = await self._post(self.provider.token_url, {**grant, **self._client_auth()})
        return _tokens_from(body, refresh_token)

    async def device_authorization(self) -> DeviceCode:
        """RFC 8628 §3.1: ask for a device code and the user code to show."""
        url = self.provider.device_authorization_url
        if url is None:
            raise SignInFailed(f"{self.provider.name} has no device flow for mail; use --code")
        data = {**self._client_auth(), "scope": " ".join(self.provider.scopes)}
        body = await self._post(url, data)
        try:
            # Google names it verification_url; RFC 8628 says verification_uri.
            uri = body.get("verification_uri") or body["verification_url"]
            return DeviceCode(
                device_code=str(body["device_code"]),
                user_code=str(body["user_code"]),
                verification_uri=str(uri),
                verification_uri_complete=body.get("verification_uri_complete"),
                expires_in=float(body.get("expires_in") or 900),
                interval=float(body.get("interval") or DEVICE_INTERVAL),
            )
        except (KeyError, TypeError, ValueError):
            raise SignInFailed("the device authorization answer lacks a code") from None

    async def poll_device(self, code: DeviceCode) -> Tokens:
        """RFC 8628 §3.4-3.5: poll until the user approved, declined, or the code expired."""
        interval = code.interval
        deadline = time.monotonic() + code.expires_in
        grant = {
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "device_code": code.device_code,
        }
        while True:
            # The protocol's pacing: polling faster gets slow_down, or the client blocked.
            await asyncio.sleep(interval)
            if time.monotonic() >= deadline:
                raise SignInFailed("the code expired before the sign-in was finished")
            try:
                return await self._token_request(grant)
            except TokenEndpointDown:
                interval = min(interval * 2, 60.0)  # §3.5: back off on connection trouble
                continue
            except OAuthProtocolError as exc:
                if exc.error == "authorization_pending":
                    continue
                if exc.error == "slow_down":
                    interval += SLOW_DOWN_STEP
                    continue
                if exc.error == "expired_token":
                    raise SignInFailed(
                        "the code expired before the sign-in was finished"
                    ) from None
                if exc.error in ("access_denied", "authorization_declined"):
                    raise SignInFailed("the sign-in was declined") from None
                raise SignInFailed(f"the provider refused the sign-in ({exc})") from None

    def code_flow(self, redirect_uri: str) -> CodeFlow:
        """RFC 7636: a verifier kept here, its S256 challenge in the address to open."""
        if self.provider.authorization_url is None:
            raise SignInFailed(f"{self.provider.name} has no authorization_url; use --device")
        verifier = secrets.token_urlsafe(64)  # §4.1: 43-128 characters of [A-Za-z0-9-._~]
        digest = hashlib.sha256(verifier.encode("ascii")).digest()
        challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
        state = secrets.token_urlsafe(24)  # RFC 6749 §10.12: ties the answer to this request
        params = {
            "response_type": "code",
            "client_id": self._client_id,
            "redirect_uri": redirect_uri,
            "scope": " ".join(self.provider.scopes),
            "state": state,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            **dict(self.provider.authorize_params),
        }
        base = self.provider.authorization_url
        url = base + ("&" if "?" in base else "?") + urlencode(params)
        return CodeFlow(url=url, redirect_uri=redirect_uri, state=state, verifier=verifier)

    async def exchange(self, flow: CodeFlow, redirected: str) -> Tokens:
        """RFC 6749 §4.1.3 with the PKCE verifier: the code in the redirected address, for
        tokens."""
        code = code_of(flow, redirected)
        grant = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": flow.redirect_uri,
            "code_verifier": flow.verifier,
        }
        try:
            return await self._token_request(grant)
        except OAuthProtocolError as exc:
            raise SignInFailed(f"the provider refused the sign-in ({exc})") from None

    async def refresh(self, refresh_token: str) -> Tokens:
        """RFC 6749 §6; an answer without a refresh token keeps the old one (Google's)."""
        grant = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        if self.provider.refresh_scope:
            grant["scope"] = " ".join(self.provider.scopes)
        return await self._token_request(grant, refresh_token)


def code_of(flow: CodeFlow, redirected: str) -> str:
    """The authorization code in the address the browser was sent to (checked against state)."""
    query = parse_qs(urlsplit(redirected.strip()).query)
    if query.get("state") != [flow.state]:
        raise SignInFailed("that address is not the answer to this sign-in (its state differs)")
    if "error" in query:
        error = query["error"][0]
        if error == "access_denied":
            raise SignInFailed("the sign-in was declined")
        description = _one_line(query.get("error_description", [""])[0])
        raise SignInFailed(f"the provider refused the sign-in ({error}: {description})")
    codes = query.get("code")
    if not codes or not codes[0]:
        raise SignInFailed("that address holds no authorization code")
    return codes[0]


def _tokens_from(body: dict[str, Any], previous_refresh: str) -> Tokens:
    """RFC 6749 §5.1: a successful token answer."""
    access = body.get("access_token")
    if not isinstance(access, str) or not access:
        raise OAuthProtocolError("invalid_response", "the answer holds no access_token")
    kind = body.get("token_type", "Bearer")
    if not isinstance(kind, str) or kind.lower() != "bearer":
        raise OAuthProtocolError("invalid_response", f"token_type {kind!r} is not Bearer")
    refresh = body.get("refresh_token")
    now = datetime.now(UTC)
    expires_at = None
    try:
        if body.get("expires_in") is not None:
            expires_at = now + timedelta(seconds=float(body["expires_in"]))
    except (TypeError, ValueError):
        expires_at = None
    scope = body.get("scope")
    return Tokens(
        access_token=access,
        refresh_token=refresh if isinstance(refresh, str) and refresh else previous_refresh,
        expires_at=expires_at,
        scope=scope if isinstance(scope, str) else "",
        obtained_at=now,
    )


def redirect_uri(provider: Provider, port: int | None) -> str:
    """The loopback redirect (RFC 8252 §7.3): the listener's port, or none for pasting."""
    return f"http://{provider.redirect_host}{f':{port}' if port else ''}/"


class AccountTokens:
    """One account's tokens: its IMAP and SMTP logins' TokenSource, and its sign-in."""

    def __init__(
        self,
        name: str,
        client: OAuthClient,
        cipher: TokenCipher,
        db: Database,
        notify: Notify | None = None,
    ) -> None:
        self.name = name
        self.client = client
        self._cipher, self._db, self._notify = cipher, db, notify
        self._lock = asyncio.Lock()  # one refresh per account at a time
        self._forced: tuple[str, float] | None = None  # (token, when) of a forced refresh
        self._retry_at = 0.0  # token endpoint trouble: no refresh before this (monotonic)
        self._backoff = Backoff(first=5.0, cap=600.0)
        self._trouble = ""

    @property
    def provider(self) -> Provider:
        """The account's provider."""
        return self.client.provider

    def _hint(self) -> str:
        return (
            f"mailbridge login {self.name}, or /connect {self.name} in a private chat with the bot"
        )

    async def token(self) -> str:
        """A current access token; refreshed first when it is about to expire."""
        async with self._lock:
            current = await self._load()
            now = datetime.now(UTC)
            if not current.due(now):
                return current.access_token
            try:
                return (await self._refresh(current)).access_token
            except TokenEndpointDown:
                if not current.expired(now):
                    return current.access_token  # the endpoint is down: the old one still works
                raise

    async def refused(self, token: str) -> str:
        """The server refused `token`: refresh once; a fresh token refused too is revoked."""
        async with self._lock:
            current = await self._load()
            now = datetime.now(UTC)
            if current.access_token != token and not current.due(now):
                return current.access_token  # another login refreshed it meanwhile
            forced = self._forced
            recent = forced is not None and time.monotonic() - forced[1] < FORCED_WINDOW
            if forced is not None and forced[0] == token and recent:
                await self._revoke("the server refused a freshly refreshed access token")
            fresh = await self._refresh(current)
            self._forced = (fresh.access_token, time.monotonic())
            return fresh.access_token

    async def start_device(self) -> DeviceCode:
        """The device flow's first step: the code and the address to show the user."""
        return await self._signing_in(self.client.device_authorization())

    async def finish_device(self, code: DeviceCode) -> None:
        """Poll until the user approved (tokens stored) or SignInFailed."""
        await self._store(await self._signing_in(self.client.poll_device(code)))

    def start_code(self, port: int | None = None) -> CodeFlow:
        """The code flow's first step: the address to open (redirect to the port, or none)."""
        return self.client.code_flow(redirect_uri(self.provider, port))

    async def finish_code(self, flow: CodeFlow, redirected: str) -> None:
        """Exchange the code in the redirected address for tokens and store them."""
        await self._store(await self._signing_in(self.client.exchange(flow, redirected)))

    async def _signing_in(self, step: Awaitable[T]) -> T:
        """A sign-in step; the provider's trouble becomes SignInFailed (one line)."""
        try:
            return await step
        except TokenEndpointDown as exc:
            raise SignInFailed(f"the provider could not be reached: {exc}") from None
        except OAuthProtocolError as exc:
            raise SignInFailed(f"the provider refused the sign-in ({exc})") from None

    async def describe(self) -> tuple[bool, str]:
        """(usable, one line) for /status and `mailbridge check`; no network."""
        stored = await self._db.run(store.get_oauth_tokens, self.name)
        if stored is None:
            return False, f"not signed in: {self._hint()}"
        if stored.revoked:
            return False, f"sign in again (revoked or expired): {self._hint()}"
        text = f"signed in ({self.provider.name})"
        if stored.expires_at is not None:
            left = (stored.expires_at - datetime.now(UTC)).total_seconds()
            text += (
                f", access token valid {int(left // 60)} min more"
                if left > 0
                else ", access token expired (renewed at the next login)"
            )
        if self._trouble:
            text += f"; token endpoint trouble: {self._trouble}"
        return True, text

    async def _load(self) -> Tokens:
        """The stored tokens, decrypted; SignInNeeded when there are none to use."""
        stored = await self._db.run(store.get_oauth_tokens, self.name)
        if stored is None:
            raise SignInNeeded(f"{self.name}: not signed in with OAuth2 yet: {self._hint()}")
        if stored.revoked:
            await self._tell_once()
            raise SignInNeeded(
                f"{self.name}: the OAuth2 sign-in was revoked or has expired; sign in again: "
                f"{self._hint()}"
            )
        try:
            access = self._cipher.decrypt(stored.access_token)
            refresh = self._cipher.decrypt(stored.refresh_token)
        except InvalidToken:
            raise SignInNeeded(
                f"{self.name}: the stored tokens do not decrypt with BRIDGE_SECRET_KEY (keep an "
                f"old key after the new one, comma-separated), or sign in again: {self._hint()}"
            ) from None
        return Tokens(access, refresh, stored.expires_at, stored.scope, stored.updated_at)

    async def _store(self, tokens: Tokens) -> None:
        """Save a sign-in or a refresh, encrypted; a lost write would lose a rotated token."""
        await self._db.persist(
            store.save_oauth_tokens,
            self.name,
            access_token=self._cipher.encrypt(tokens.access_token),
            refresh_token=self._cipher.encrypt(tokens.refresh_token),
            expires_at=tokens.expires_at,
            scope=tokens.scope,
        )
        self._forced, self._retry_at, self._trouble = None, 0.0, ""
        self._backoff.reset()

    async def _refresh(self, current: Tokens) -> Tokens:
        """Refresh (caller holds the lock); always store the newest refresh token."""
        if time.monotonic() < self._retry_at:
            raise TokenEndpointDown(f"{self.name}: token endpoint: {self._trouble}")
        if not current.refresh_token:
            await self._revoke("no refresh token was issued (for Microsoft: offline_access)")
        try:
            fresh = await self.client.refresh(current.refresh_token)
        except TokenEndpointDown as exc:
            self._pause(str(exc), logging.INFO)
            raise TokenEndpointDown(f"{self.name}: token endpoint: {exc}") from None
        except OAuthProtocolError as exc:
            if exc.error != "invalid_grant":
                self._pause(str(exc), logging.ERROR)
                raise PermanentMailError(
                    f"{self.name}: the token endpoint refused the refresh ({exc})"
                ) from None
            # Another instance may have used (and so replaced) the refresh token just now.
            latest = await self._load()
            if latest.refresh_token != current.refresh_token:
                return latest
            await self._revoke(f"invalid_grant: {exc.description or 'refresh token refused'}")
        if self._trouble:
            logger.info("%s: the token endpoint answers again", self.name)
        await self._store(fresh)
        logger.info("%s: access token refreshed", self.name)
        return fresh

    def _pause(self, reason: str, level: int) -> None:
        """No refresh for a while: backoff, logged once per outage (quietly: no chat)."""
        self._retry_at = time.monotonic() + self._backoff.next()
        if not self._trouble:
            logger.log(level, "%s: token endpoint trouble (%s); backing off", self.name, reason)
        self._trouble = reason

    async def _revoke(self, reason: str) -> NoReturn:
        """The sign-in is gone: stop using it, tell the chat once, ask for a new sign-in."""
        if await self._db.persist(store.revoke_oauth_tokens, self.name):
            logger.error(
                "%s: the OAuth2 sign-in no longer works (%s); sign in again: %s",
                self.name,
                reason,
                self._hint(),
            )
        self._forced = None
        await self._tell_once()
        raise SignInNeeded(
            f"{self.name}: the OAuth2 sign-in was revoked or has expired; sign in again: "
            f"{self._hint()}"
        )

    async def _tell_once(self) -> None:
        if self._notify is None or not await self._db.run(store.claim_oauth_told, self.name):
            return
        await self._notify(
            f"🔑 The account {self.name} must sign in again: its OAuth2 sign-in was revoked or "
            f"has expired, so its mail is neither fetched nor sent. Send /connect {self.name} "
            f"to me in a private chat, or run: mailbridge login {self.name}"
        )


class AccessTokens:
    """Every OAuth2 account's tokens by account name, and the HTTP client they share."""

    def __init__(
        self,
        accounts: Sequence[AccountSettings],
        secret_keys: Sequence[str],
        db: Database | None,
        notify: Notify | None = None,
    ) -> None:
        chosen = {a.name: a.oauth2 for a in accounts if a.uses_oauth2 and a.oauth2 is not None}
        self._http: httpx.AsyncClient | None = None
        self._sources: dict[str, AccountTokens] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        if not chosen:
            return
        if db is None:
            raise ConfigError("the OAuth2 accounts' tokens need the database")
        cipher = TokenCipher(secret_keys)
        # Plain httpx: redirects are not followed (a token endpoint never redirects).
        self._http = httpx.AsyncClient(timeout=HTTP_TIMEOUT, follow_redirects=False)
        for name, oauth2 in chosen.items():
            client = OAuthClient(oauth2, self._http)
            self._sources[name] = AccountTokens(name, client, cipher, db, notify)

    @property
    def names(self) -> list[str]:
        """The accounts that sign in with OAuth2."""
        return list(self._sources)

    def source(self, account: str) -> AccountTokens | None:
        """The account's tokens; None for an account that logs in with passwords."""
        return self._sources.get(account)

    async def describe(self) -> list[tuple[str, bool, str]]:
        """(account, usable, one line) for each OAuth2 account."""
        return [(name, *await source.describe()) for name, source in self._sources.items()]

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a long sign-in (a chat's device flow) beside the update handler."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Cancel sign-ins still waiting and close the HTTP client."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()


class RedirectListener:
    """A short-lived listener on 127.0.0.1:PORT that catches the browser's redirect
    (RFC 8252 §7.3); only a request carrying the expected state ends the wait."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._state = ""
        self._server: asyncio.Server | None = None
        self._answer: asyncio.Future[str] | None = None

    async def __aenter__(self) -> RedirectListener:
        """Bind (port 0: any free port; `port` then tells which)."""
        try:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        except OSError as exc:
            raise ConfigError(f"--listen: cannot listen on 127.0.0.1:{self.port}: {exc}") from None
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._answer = asyncio.get_running_loop().create_future()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def wait(self, flow: CodeFlow, within: float = CODE_TIMEOUT) -> str:
        """The redirected address, once the browser arrives (bounded)."""
        if self._answer is None:
            raise RuntimeError("RedirectListener used outside `async with`")
        self._state = flow.state
        try:
            return await asyncio.wait_for(asyncio.shield(self._answer), within)
        except TimeoutError:
            raise SignInFailed(f"no sign-in arrived within {int(within)} s") from None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 10)
            for _ in range(100):  # the headers, unread
                line = await asyncio.wait_for(reader.readline(), 10)
                if line in (b"\r\n", b"\n", b""):
                    break
            parts = request.decode("latin-1").split()
            target = parts[1] if len(parts) == 3 and parts[0] == "GET" else ""
            query = parse_qs(urlsplit(target).query)
            answer = self._answer
            mine = bool(self._state) and query.get("state") == [self._state]
            if mine and answer is not None and not answer.done():
                answer.set_result(f"http://127.0.0.1:{self.port}{target}")
                status, body = "200 OK", "Done: mailbridge got the answer. You may close this tab."
            else:
                status, body = "404 Not Found", "Not a sign-in answer."
            data = body.encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeError):
            pass  # a stray or broken request: the wait goes on
        finally:
            writer.close()
