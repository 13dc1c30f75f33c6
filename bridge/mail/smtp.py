"""The SMTP boundary: send an EmailMessage with aiosmtplib and map failures to ours."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from email.message import EmailMessage
from email.utils import getaddresses
from typing import TypeVar

import aiosmtplib

from bridge.config import SmtpSettings
from bridge.errors import MailError, PermanentMailError, SignInNeeded, TemporaryMailError
from bridge.mail.auth import TokenSource, with_token

logger = logging.getLogger(__name__)

_MAX_REASON = 300
_CLOSE_WAIT = 2.0
_E = TypeVar("_E", bound=BaseException)


async def send(
    message: EmailMessage | bytes,
    recipients: Sequence[str],
    settings: SmtpSettings,
    accepted: Callable[[str], Awaitable[None]] | None = None,
    tokens: TokenSource | None = None,
) -> str:
    """Send `message` to exactly `recipients` (the envelope); return the server's answer line.

    Bytes (a mail built before, as the outbox stores it) are sent exactly as they are.

    The Bcc header is never transmitted; `recipients` is the whole RCPT TO list. When the
    server refuses some recipients but accepts others, the mail has been delivered, so this
    returns normally and the answer line ends with `; refused: addr (550 ...)` for them.
    `accepted(answer)` runs as soon as the server took the mail, before QUIT: the caller records
    the fact with the shortest possible window for a crash to make it send the mail again.
    Raises TemporaryMailError (connection, timeout, 4xx) or PermanentMailError (5xx, login
    refused, every recipient refused, certificate not trusted).
    """
    if not recipients:
        raise PermanentMailError("the mail has no recipient")
    sender = _bare_address(settings.sender)
    async with _session(settings, tokens) as (smtp, _greeting):
        if isinstance(message, bytes):
            refused, answer = await smtp.sendmail(sender, list(recipients), message)
        else:
            refused, answer = await smtp.send_message(
                message, sender=sender, recipients=list(recipients)
            )
        # RFC 5321 §4.2.2: the message was accepted only after DATA was answered with 250.
        result = _one_line(f"250 {answer}", settings)
        if refused:
            result += "; refused: " + ", ".join(
                _one_line(f"{addr} ({response.code} {response.message})", settings)
                for addr, response in refused.items()
            )
        if accepted is not None:
            await accepted(result)
    logger.info(
        "sent %s to %d of %d recipients: %s",
        _message_id(message),
        len(recipients) - len(refused),
        len(recipients),
        result,
    )
    return result


async def check_login(settings: SmtpSettings, tokens: TokenSource | None = None) -> str:
    """Connect, log in and quit (for `mailbridge check`); return the server's greeting line."""
    async with _session(settings, tokens) as (_smtp, greeting):
        pass
    return _one_line(f"{greeting.code} {greeting.message}", settings)


@contextlib.asynccontextmanager
async def _session(
    settings: SmtpSettings, tokens: TokenSource | None = None
) -> AsyncIterator[tuple[aiosmtplib.SMTP, aiosmtplib.SMTPResponse]]:
    """A connected, logged-in client; library errors leave as Temporary/PermanentMailError."""
    smtp = _client(settings)
    try:
        greeting = await smtp.connect()
        if settings.auth == "oauth2":
            await _bearer_login(smtp, settings, tokens)
        else:
            await smtp.login(*settings.login)
        yield smtp, greeting
    except (aiosmtplib.SMTPException, OSError, TimeoutError, ValueError) as exc:
        await _close(smtp)
        raise _translate(exc, settings) from None
    except MailError:  # from the token source: sign in again, or the token endpoint is down
        await _close(smtp)
        raise
    except BaseException:  # cancelled (shutdown): drop the connection, keep the cause
        smtp.close()
        raise
    # After a mail was taken, a failing QUIT must not make the caller send it again.
    await _quit(smtp)


async def _bearer_login(
    smtp: aiosmtplib.SMTP, settings: SmtpSettings, tokens: TokenSource | None
) -> None:
    """AUTH XOAUTH2 with the account's access token (Microsoft and Gmail offer no other)."""
    if tokens is None:
        raise SignInNeeded(f"SMTP {settings.user}: signs in with OAuth2, but has no tokens")
    if smtp.is_ehlo_or_helo_needed:
        await smtp.ehlo()
    if "xoauth2" not in smtp.server_auth_methods:
        raise aiosmtplib.SMTPException("the server does not offer AUTH XOAUTH2")

    async def attempt(token: str) -> None:
        await smtp.auth_xoauth2(settings.user, token)

    await with_token(tokens, attempt, _login_refused)


def _login_refused(exc: BaseException) -> bool:
    # RFC 4954 §6: 535 is "credentials invalid"; 454 is a temporary failure, not a refusal.
    return isinstance(exc, aiosmtplib.SMTPAuthenticationError) and exc.code == 535


def _client(settings: SmtpSettings) -> aiosmtplib.SMTP:
    # Certificates are always verified; a private CA comes from ca_file, else the system store.
    cafile = str(settings.ca_file) if settings.ca_file is not None else None
    try:
        tls_context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise PermanentMailError(f"cannot load the CA file {cafile}: {exc}") from None
    implicit = settings.security == "ssl"
    return aiosmtplib.SMTP(
        hostname=settings.host,
        port=settings.port,
        use_tls=implicit,
        # True: STARTTLS is required; the session never continues in plain text.
        start_tls=not implicit,
        tls_context=tls_context,
        timeout=settings.timeout,
    )


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.quit()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        logger.debug("QUIT failed after a finished transaction", exc_info=True)
    finally:
        await _close(smtp)


async def _close(smtp: aiosmtplib.SMTP) -> None:
    """Close the connection and wait, briefly, until the socket is really closed."""
    protocol = smtp.protocol
    smtp.close()
    # A TLS transport closes its socket only after the close_notify exchange (RFC 8446
    # §6.1); returning earlier lets a loop that stops next (shutdown, tests) leak the socket.
    # aiosmtplib offers no close waiter; connection_lost() clears protocol.transport.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _CLOSE_WAIT
    while protocol is not None and protocol.transport is not None:
        if loop.time() >= deadline:
            break
        await asyncio.sleep(0.01)


def _message_id(message: EmailMessage | bytes) -> str:
    """The Message-ID, for the log line."""
    if isinstance(message, bytes):
        found = re.search(rb"(?im)^message-id:\s*(<[^>\r\n]*>)", message[:20_000])
        return found.group(1).decode("ascii", "replace") if found else "(no Message-ID)"
    return str(message.get("Message-ID", "(no Message-ID)"))


def _bare_address(sender: str) -> str:
    addresses = [addr for _, addr in getaddresses([sender]) if addr]
    if len(addresses) != 1:
        raise PermanentMailError(f"the From address {sender!r} is not one email address")
    return addresses[0]


def _translate(exc: BaseException, settings: SmtpSettings) -> MailError:
    """One of our errors, with a one-line reason, for a failure of aiosmtplib or the network."""
    where = f"SMTP server {settings.host}:{settings.port}"
    cert_error = _find_cause(exc, ssl.SSLCertVerificationError)
    if cert_error is not None:
        detail = getattr(cert_error, "verify_message", "") or str(cert_error)
        return PermanentMailError(
            _one_line(f"{where}: TLS certificate verification failed: {detail}", settings)
        )
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [err.code for err in exc.recipients]
        listed = ", ".join(f"{err.recipient} ({err.code} {err.message})" for err in exc.recipients)
        reason = _one_line(f"{where} refused every recipient: {listed}", settings)
        if all(400 <= code < 500 for code in codes):
            return TemporaryMailError(reason)
        return PermanentMailError(reason)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        what = _response_context(exc)
        reason = _one_line(f"{where} {what}: {exc.code} {exc.message}", settings)
        # RFC 5321 §4.2.1: 4yz is a transient negative reply, 5yz a permanent one.
        if exc.code >= 500:
            return PermanentMailError(reason)
        return TemporaryMailError(reason)
    ssl_error = _find_cause(exc, ssl.SSLError)
    if ssl_error is not None:
        return PermanentMailError(
            _one_line(
                f"{where}: TLS handshake failed ({ssl_error}); is security "
                f"{settings.security!r} right for this port?",
                settings,
            )
        )
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return PermanentMailError(_one_line(f"{where}: {exc}", settings))
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected | aiosmtplib.SMTPConnectError):
        return TemporaryMailError(_one_line(f"{where}: {exc}", settings))
    if isinstance(exc, TimeoutError):
        return TemporaryMailError(_one_line(f"{where}: timed out ({exc})", settings))
    if isinstance(exc, OSError):
        return TemporaryMailError(_one_line(f"{where}: {exc}", settings))
    # SMTPException without a code (no STARTTLS, no usable AUTH method) or a bad address:
    # a retry meets the same server and the same mail.
    return PermanentMailError(_one_line(f"{where}: {exc}", settings))


def _response_context(exc: aiosmtplib.SMTPResponseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return "refused the login"
    if isinstance(exc, aiosmtplib.SMTPSenderRefused):
        return f"refused the sender {exc.sender}"
    if isinstance(exc, aiosmtplib.SMTPRecipientRefused):
        return f"refused the recipient {exc.recipient}"
    if isinstance(exc, aiosmtplib.SMTPDataError):
        return "refused the message"
    if isinstance(exc, aiosmtplib.SMTPConnectResponseError):
        return "refused the connection"
    return "answered"


def _find_cause(exc: BaseException, kind: type[_E]) -> _E | None:
    """`exc` or the first exception of type `kind` in its cause/context chain."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            break
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _one_line(text: str, settings: SmtpSettings) -> str:
    """Collapse whitespace, shorten, and mask the password should a server echo it."""
    line = " ".join(text.split())
    if settings.password is not None:
        secret = settings.password.get_secret_value()
        if secret:
            line = line.replace(secret, "***")
    if len(line) > _MAX_REASON:
        line = line[: _MAX_REASON - 1] + "…"
    return line
