"""An aiosmtpd submission server on loopback that records mail and injects SMTP errors."""

from __future__ import annotations

import asyncio
import base64
import binascii
import email
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import default as default_policy
from types import TracebackType
from typing import Any, Literal

import aiohttp
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.servers.certs import CA
from tests.servers.dovecot import free_port

TlsMode = Literal["ssl", "starttls"]
Command = Literal["MAIL", "RCPT", "DATA"]


@dataclass(frozen=True)
class Received:
    """One message the server accepted: the envelope, the raw DATA bytes and the AUTH login."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    login: str | None = None

    def message(self) -> EmailMessage:
        """Parse `data` as the recipient's mail client would."""
        parsed = email.message_from_bytes(self.data, policy=default_policy)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class _Fault:
    """An SMTP reply to give instead of accepting the next `count` MAIL/RCPT/DATA commands."""

    command: Command
    reply: str
    count: int


@dataclass
class _Recorder:
    """The aiosmtpd handler: accepts or fails commands and records accepted mail."""

    faults: list[_Fault] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    condition: threading.Condition = field(default_factory=threading.Condition)

    def take_fault(self, command: Command) -> str | None:
        """Return (and use up) the reply of the first pending fault for `command`."""
        with self.condition:
            for fault in self.faults:
                if fault.command == command:
                    fault.count -= 1
                    if fault.count <= 0:
                        self.faults.remove(fault)
                    return fault.reply
        return None

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        """Accept MAIL FROM unless a fault is pending."""
        reply = self.take_fault("MAIL")
        if reply is not None:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Accept RCPT TO unless a fault is pending."""
        reply = self.take_fault("RCPT")
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Record the message unless a fault is pending."""
        reply = self.take_fault("DATA")
        if reply is not None:
            return reply
        data = envelope.original_content or b""
        if isinstance(data, str):
            data = data.encode()
        login = None
        if isinstance(session.auth_data, LoginPassword | BearerLogin):
            login = session.auth_data.login.decode()
        message = Received(str(envelope.mail_from), list(envelope.rcpt_tos), data, login)
        with self.condition:
            self.received.append(message)
            self.condition.notify_all()
        return "250 2.0.0 OK: queued"


@dataclass(frozen=True)
class BearerLogin:
    """Who logged in with an OAuth2 bearer token (the token itself is not kept)."""

    login: bytes


@dataclass
class _BearerRecorder(_Recorder):
    """The recorder plus AUTH XOAUTH2, the bearer checked at the identity provider."""

    introspection_url: str = ""
    refused: int = 0

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        """Google's XOAUTH2: base64 of "user=U^Aauth=Bearer T^A^A" (initial response or 334)."""
        if len(args) > 1:
            encoded: Any = args[1].encode()
        else:
            encoded = await server.challenge_auth("", encode_to_b64=False)
            if encoded is MISSING:
                return AuthResult(success=False, handled=True)
        try:
            fields = dict(
                part.split("=", 1)
                for part in base64.b64decode(encoded, validate=True).decode().split("\x01")
                if "=" in part
            )
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return AuthResult(success=False, handled=False)
        user, auth = fields.get("user", ""), fields.get("auth", "")
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
        if token and await self._active(user, token):
            return AuthResult(success=True, auth_data=BearerLogin(user.encode()))
        with self.condition:
            self.refused += 1
        # XOAUTH2: the failure comes as a 334 with a JSON status; the client answers with an
        # empty line, then gets the 535.
        status = json.dumps({"status": "401", "schemes": "Bearer", "scope": "mail"})
        await server.challenge_auth(base64.b64encode(status.encode()), encode_to_b64=False)
        return AuthResult(success=False, handled=False)

    async def _active(self, user: str, token: str) -> bool:
        async with (
            aiohttp.ClientSession() as session,
            session.post(self.introspection_url, data={"token": token}) as answer,
        ):
            body = await answer.json()
        return bool(body.get("active")) and body.get("username") == user


class _ImplicitTlsSMTP(SMTP):
    """aiosmtpd's SMTP for a connection that is TLS from the first byte (RFC 8314)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Build the session with auth_require_tls=True, then lift it: the socket is TLS."""
        super().__init__(*args, **kwargs)
        # aiosmtpd only counts STARTTLS as TLS, so it would refuse AUTH on port-465 style
        # connections; passing auth_require_tls=False instead would emit a UserWarning.
        self._auth_require_tls = False


class _Controller(Controller):
    """aiosmtpd Controller building `_ImplicitTlsSMTP` sessions when asked to."""

    def __init__(self, *args: Any, implicit_tls: bool, **kwargs: Any) -> None:
        """Remember which SMTP class to build."""
        super().__init__(*args, **kwargs)
        self._implicit_tls = implicit_tls

    def factory(self) -> SMTP:
        """Return the SMTP session object for a new connection."""
        cls = _ImplicitTlsSMTP if self._implicit_tls else SMTP
        return cls(self.handler, **self.SMTP_kwargs)


class _DropLoginDataWarning(logging.Filter):
    """Drop aiosmtpd's own "login_data is deprecated" line, logged on every successful AUTH."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every other record."""
        return "login_data is deprecated" not in record.getMessage()


_LOGIN_DATA_FILTER = _DropLoginDataWarning()


class SmtpServer:
    """aiosmtpd on 127.0.0.1 with TLS (implicit or STARTTLS), required AUTH and a mail log."""

    def __init__(
        self,
        ca: CA,
        *,
        tls: TlsMode = "ssl",
        username: str = "bridge@example.test",
        password: str | None = None,
        auth_require_tls: bool = True,
        host: str = "127.0.0.1",
        port: int | None = None,
        xoauth2_introspection_url: str | None = None,
    ) -> None:
        """Prepare (but do not start) the server; the port is fixed for stop()/start().

        `xoauth2_introspection_url` also offers AUTH XOAUTH2, the bearer token checked there
        (RFC 7662 introspection: active, and issued to the user who logs in).
        """
        if tls not in ("ssl", "starttls"):
            raise ValueError(f"tls must be 'ssl' or 'starttls', not {tls!r}")
        self.ca = ca
        self.tls: TlsMode = tls
        self.username = username
        self.password = password if password is not None else secrets.token_urlsafe(12)
        # Every login the server accepts (add_login adds more); Received.login tells which.
        self.logins: dict[str, str] = {self.username: self.password}
        self.auth_require_tls = auth_require_tls
        self.host = host
        self.port = port if port is not None else free_port(host)
        self._recorder = (
            _Recorder()
            if xoauth2_introspection_url is None
            else _BearerRecorder(introspection_url=xoauth2_introspection_url)
        )
        self._consumed = 0
        self._controller: _Controller | None = None
        logging.getLogger("mail.log").addFilter(_LOGIN_DATA_FILTER)  # idempotent

    def _authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        """Accept exactly a configured username and its password (AUTH PLAIN or LOGIN)."""
        ok = False
        if isinstance(auth_data, LoginPassword):
            expected = self.logins.get(auth_data.login.decode(errors="replace"))
            ok = expected is not None and auth_data.password == expected.encode()
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    # Lifecycle

    @property
    def running(self) -> bool:
        """Whether the server is accepting connections."""
        return self._controller is not None

    def start(self) -> None:
        """Start listening (again) on `port`."""
        if self._controller is not None:
            return
        kwargs: dict[str, Any] = {
            "authenticator": self._authenticate,
            "auth_required": True,
            "auth_require_tls": self.auth_require_tls,
        }
        if self.tls == "ssl":
            kwargs["ssl_context"] = self.ca.server_ssl_context()
            kwargs["auth_require_tls"] = True  # lifted by _ImplicitTlsSMTP: the socket is TLS
        else:
            kwargs["tls_context"] = self.ca.server_ssl_context()
            kwargs["require_starttls"] = True
        # A Controller's loop is closed by stop(), so every start() needs a new one.
        controller = _Controller(
            self._recorder,
            hostname=self.host,
            port=self.port,
            server_hostname="localhost",
            implicit_tls=self.tls == "ssl",
            **kwargs,
        )
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        """Stop listening and drop open sessions (the server looks down)."""
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def __enter__(self) -> SmtpServer:
        """Start the server."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()

    def add_login(self, username: str, password: str | None = None) -> str:
        """Accept one more login (another account's); returns its password."""
        password = password if password is not None else secrets.token_urlsafe(12)
        self.logins[username] = password
        return password

    # Faults and observations

    def fail_next(
        self, code: int, message: str, count: int = 1, *, command: Command = "DATA"
    ) -> None:
        """Answer the next `count` `command`s with e.g. (451, "4.3.0 try later")."""
        if command not in ("MAIL", "RCPT", "DATA"):
            raise ValueError(f"command must be MAIL, RCPT or DATA, not {command!r}")
        with self._recorder.condition:
            self._recorder.faults.append(_Fault(command, f"{code} {message}", count))

    @property
    def refused_bearers(self) -> int:
        """How many AUTH XOAUTH2 logins were refused."""
        with self._recorder.condition:
            return getattr(self._recorder, "refused", 0)

    @property
    def received(self) -> list[Received]:
        """Every message accepted so far, oldest first."""
        with self._recorder.condition:
            return list(self._recorder.received)

    def wait_message(self, timeout: float = 5.0) -> Received:
        """Block until a message not yet returned by wait/next_message arrives (bounded)."""
        deadline = time.monotonic() + timeout
        with self._recorder.condition:
            while len(self._recorder.received) <= self._consumed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no mail reached the SMTP server within {timeout} s")
                self._recorder.condition.wait(remaining)
            message = self._recorder.received[self._consumed]
            self._consumed += 1
            return message

    async def next_message(self, timeout: float = 5.0) -> Received:
        """Await the next message not yet returned by wait/next_message (bounded)."""
        # The handler runs on the Controller's thread; the bounded wait runs on a worker thread.
        return await asyncio.to_thread(self.wait_message, timeout)
