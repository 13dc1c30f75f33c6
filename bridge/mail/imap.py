"""IMAPS through imapclient behind one to_thread boundary: read-only select, UID fetch, IDLE."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError

from bridge.config import ImapSettings
from bridge.errors import MailError, PermanentMailError, SignInNeeded, TemporaryMailError
from bridge.mail.auth import TokenSource, with_token

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Enough for the headers and the start of the text; a 30 MB attachment is never downloaded.
PREFIX_BYTES = 262_144
# RFC 2177: servers may drop an IDLE after 30 minutes; re-issue well before.
IDLE_RENEW = 9 * 60.0
# How long one blocking idle_check may last: bounds how long a stop request waits.
# How long one blocking idle_check may last. A stop interrupts it (the socket's read side is
# shut), so this only sets how often an idle folder wakes: 6 times a minute, not 60.
IDLE_SLICE = 10.0
FETCH_BATCH = 25
# /search looks at this many times the results it shows, to order ties by UID.
SORT_MARGIN = 3
# BODY.PEEK: never set \Seen.
_PREFIX_ITEM = f"BODY.PEEK[]<0.{PREFIX_BYTES}>"
_SUMMARY_ITEMS = [_PREFIX_ITEM, "BODYSTRUCTURE", "RFC822.SIZE"]
_HEADER_ITEM = "BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE MESSAGE-ID TO)]"


@dataclass(frozen=True)
class FetchedMail:
    """What the watcher needs of one message: the start of its bytes and its structure."""

    uid: int
    raw: bytes
    structure: Any
    size: int


@dataclass(frozen=True)
class FolderState:
    """The answer to a read-only SELECT."""

    uidvalidity: int
    uidnext: int
    exists: int


def ssl_context(ca_file: object | None) -> ssl.SSLContext:
    """A verifying TLS context: the system store plus the configured CA file, if any."""
    return _context(str(ca_file) if ca_file else None)


@functools.cache
def _context(ca_file: str | None) -> ssl.SSLContext:
    # One per CA file, shared by every connection: loading the system store costs ~1 MB and
    # ~20 ms each time. An SSLContext may be shared between threads.
    return ssl.create_default_context(cafile=ca_file)


def _fetch_key(data: dict[bytes, Any], prefix: bytes) -> Any:
    for key, value in data.items():
        if key.startswith(prefix):
            return value
    return None


# What the network or the server can cause under an IMAP call: socket, TLS and timeout errors
# (OSError), a connection closed mid-line (EOFError), and imaplib's and imapclient's errors
# (IMAPClientError is imaplib.IMAP4.error: abort and readonly included). Anything else raised
# there is a bug of ours and propagates as it is, rather than becoming a reconnect loop.
MAIL_FAILURES = (OSError, EOFError, IMAPClientError)


def classify(exc: OSError | EOFError | IMAPClientError) -> MailError:
    """Turn a network or protocol error (MAIL_FAILURES) into TemporaryMailError or
    PermanentMailError with one line."""
    if isinstance(exc, LoginError):
        if _unavailable(exc):
            return TemporaryMailError(f"IMAP login failed for now: {_text(exc)}")
        return PermanentMailError(f"IMAP login refused: {_text(exc)}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return PermanentMailError(f"IMAP TLS certificate not trusted: {exc.verify_message}")
    if isinstance(exc, TimeoutError):
        return TemporaryMailError("IMAP server timed out")
    return TemporaryMailError(f"IMAP connection failed: {_text(exc)}")


def _unavailable(exc: LoginError) -> bool:
    # RFC 5530 §3: UNAVAILABLE is a temporary failure (the server's token check is down).
    return "[UNAVAILABLE]" in str(exc).upper()


def _login_refused(exc: BaseException) -> bool:
    """Whether the server said no to the credentials (not: the link or the server failed)."""
    cause = exc if isinstance(exc, LoginError) else exc.__cause__
    return isinstance(cause, LoginError) and not _unavailable(cause)


async def _authenticated(
    settings: ImapSettings,
    tokens: TokenSource | None,
    attempt: Callable[[str | None], Awaitable[T]],
) -> T:
    """`attempt(None)` for a password login; for OAuth2 `attempt(token)`, the token fetched
    here on the event loop (the blocking login runs in a worker thread), retried once."""
    if settings.auth != "oauth2":
        return await attempt(None)
    if tokens is None:
        raise SignInNeeded(f"IMAP {settings.username}: signs in with OAuth2, but has no tokens")
    return await with_token(tokens, attempt, _login_refused)


def _text(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if text.startswith("b'") or text.startswith('b"'):
        text = text[2:-1]
    return text.splitlines()[0][:300]


def _fetch_summaries(client: IMAPClient, uids: list[int]) -> list[FetchedMail]:
    """The start of each message and its BODYSTRUCTURE, with BODY.PEEK (never \\Seen)."""
    result: list[FetchedMail] = []
    for start in range(0, len(uids), FETCH_BATCH):
        batch = uids[start : start + FETCH_BATCH]
        data = client.fetch(batch, _SUMMARY_ITEMS)
        for uid in batch:
            item = data.get(uid)
            if item is None:  # expunged meanwhile
                continue
            raw = _fetch_key(item, b"BODY[]") or b""
            size = int(item.get(b"RFC822.SIZE", len(raw)))
            # The structure is needed only when the bytes were cut; whole bytes give exact
            # attachment sizes.
            structure = item.get(b"BODYSTRUCTURE") if len(raw) < size else None
            result.append(FetchedMail(uid=uid, raw=raw, structure=structure, size=size))
    return result


def _fetch_headers(client: IMAPClient, uids: list[int]) -> list[tuple[int, bytes]]:
    """(uid, a few header fields) for each UID still present, in the order given."""
    result: list[tuple[int, bytes]] = []
    for start in range(0, len(uids), 500):
        batch = uids[start : start + 500]
        data = client.fetch(batch, [_HEADER_ITEM])
        result += [(u, _fetch_key(data[u], b"BODY[HEADER") or b"") for u in batch if u in data]
    return result


class ImapSession:
    """One logged-in IMAPS connection with the watched folder selected read-only.

    Every public coroutine runs the blocking imapclient call in a worker thread.
    """

    def __init__(
        self,
        settings: ImapSettings,
        folder: str | None = None,
        executor: Executor | None = None,
        tokens: TokenSource | None = None,
    ) -> None:
        self.settings = settings
        self.folder = folder or settings.mailbox
        self.tokens = tokens  # the account's OAuth2 tokens (auth = "oauth2" only)
        # Blocking IMAP calls (an IDLE wait lasts a second) run in their own pool, so that
        # many idling folders never starve the database's worker threads.
        self.executor = executor
        self._client: IMAPClient | None = None
        self._idling = False
        self._changed = False  # the server reported a change outside IDLE

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in a worker thread. A network or protocol error drops the connection and
        comes out as a MailError; our own errors (MailError, or a bug) come out as they are."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor, functools.partial(fn, *args))
        except MAIL_FAILURES as exc:
            await self.close()
            raise classify(exc) from exc

    @property
    def client(self) -> IMAPClient:
        """The live client (connect() first)."""
        if self._client is None:
            raise TemporaryMailError("IMAP not connected")
        return self._client

    def _connect(self, token: str | None) -> FolderState:
        client = _login(self.settings, token)
        try:
            # Cache the capabilities here, in the worker thread (from the LOGIN answer, before
            # SELECT discards it): can_idle is read on the event loop and must not do I/O.
            client.capabilities()
            self._client = client
            try:
                return self._select()
            except IMAPClientError as exc:
                raise PermanentMailError(
                    f"cannot open folder {self.folder}: {_text(exc)}"
                ) from exc
        except Exception:
            self._client = None
            _shutdown(client)
            raise

    def _select(self) -> FolderState:
        # readonly=True is EXAMINE: nothing we do can set \Seen or expunge.
        info = self.client.select_folder(self.folder, readonly=True)
        return FolderState(
            uidvalidity=int(info.get(b"UIDVALIDITY", 0)),
            uidnext=int(info.get(b"UIDNEXT", 0)),
            exists=int(info.get(b"EXISTS", 0)),
        )

    async def connect(self) -> FolderState:
        """Connect, log in and select the folder read-only."""
        return await _authenticated(
            self.settings, self.tokens, lambda token: self._call(self._connect, token)
        )

    async def reselect(self) -> FolderState:
        """Select again (fresh UIDVALIDITY/UIDNEXT)."""
        return await self._call(self._select)

    async def select(self, folder: str) -> FolderState:
        """Switch to another folder, read-only (the poller of folders beyond the budget)."""
        self.folder = folder
        return await self._call(self._select_or_refuse)

    def _select_or_refuse(self) -> FolderState:
        try:
            return self._select()
        except IMAPClientAbortError:
            raise
        except IMAPClientError as exc:  # NO: the folder is missing or not selectable
            raise PermanentMailError(f"cannot open folder {self.folder}: {_text(exc)}") from exc

    def _status(self, folder: str) -> FolderState:
        try:
            info = self.client.folder_status(folder, [b"UIDVALIDITY", b"UIDNEXT", b"MESSAGES"])
        except IMAPClientAbortError:
            raise
        except IMAPClientError as exc:  # NO: the folder is missing
            raise PermanentMailError(f"cannot open folder {folder}: {_text(exc)}") from exc
        return FolderState(
            uidvalidity=int(info.get(b"UIDVALIDITY", 0)),
            uidnext=int(info.get(b"UIDNEXT", 0)),
            exists=int(info.get(b"MESSAGES", 0)),
        )

    async def folder_status(self, folder: str) -> FolderState:
        """STATUS of a folder without selecting it: one round trip tells whether it changed."""
        return await self._call(self._status, folder)

    @property
    def can_idle(self) -> bool:
        """True when the server offers IDLE and the settings allow it."""
        return self.settings.idle and self.client.has_capability("IDLE")

    def _uids_after(self, uid: int) -> list[int]:
        # "n:*" always matches the highest UID even when it is below n (RFC 3501 §6.4.8).
        found = self.client.search(["UID", f"{uid + 1}:*"])
        self._note_changes()
        return sorted(u for u in found if u > uid)

    def _note_changes(self) -> None:
        """Mail that arrived while a command ran (SEARCH, FETCH) is reported in that command's
        untagged responses, which imaplib keeps and no later command reports again (not the
        NOOP before IDLE, not IDLE): remember to look again before going idle."""
        pending = self.client._imap.untagged_responses
        exists, recent = pending.pop("EXISTS", None), pending.pop("RECENT", None)
        if exists or recent:
            self._changed = True

    async def uids_after(self, uid: int) -> list[int]:
        """UIDs above uid, ascending: a quiet check costs the same for any mailbox size."""
        return await self._call(self._uids_after, uid)

    async def all_uids(self) -> list[int]:
        """Every UID in the folder, ascending (first contact only)."""
        return await self._call(lambda: sorted(self.client.search("ALL")))

    def _fetch(self, uids: list[int]) -> list[FetchedMail]:
        fetched = _fetch_summaries(self.client, uids)
        self._note_changes()
        return fetched

    async def fetch(self, uids: list[int]) -> list[FetchedMail]:
        """The start of each message and its BODYSTRUCTURE, with BODY.PEEK (never \\Seen)."""
        return await self._call(self._fetch, uids)

    def _headers(self, uids: list[int]) -> list[tuple[int, bytes]]:
        headers = _fetch_headers(self.client, uids)
        self._note_changes()
        return headers

    async def headers(self, uids: list[int]) -> list[tuple[int, bytes]]:
        """(uid, a few header fields) for each UID still present, in the order given."""
        return await self._call(self._headers, uids)

    async def newest_headers(self, count: int) -> list[tuple[int, bytes]]:
        """(uid, a few header fields) of the newest messages, newest first."""
        uids = await self.all_uids()
        return await self.headers(uids[::-1][:count])

    async def noop(self) -> None:
        """Keep the connection alive and let the server report changes."""
        await self._call(self.client.noop)

    def _idle_slice(self, deadline: float) -> bool:
        client = self.client
        if self._changed:
            self._changed = False
            return True
        if not self._idling:
            # Mail that arrived after our last SEARCH is reported here, not by the IDLE below
            # (Dovecot only pushes changes that happen while idling).
            _text, changes = client.noop()
            if any(_is_change(r) for r in changes):
                return True
            client.idle()
            self._idling = True
            if _buffered_input(client):
                return True
        started = time.monotonic()
        responses = client.idle_check(timeout=min(IDLE_SLICE, max(0.0, deadline - started)))
        if any(_is_bye(r) for r in responses):
            raise TemporaryMailError("IMAP server closed the connection")
        if any(_is_change(r) for r in responses):
            return True
        if not responses and time.monotonic() - started < IDLE_SLICE / 10 < deadline - started:
            # Readable but nothing parsed: imapclient swallows EOF; prove the link is alive.
            # Or only part of a TLS record had arrived: the rest, maybe "* 5 EXISTS", comes with
            # the answer to DONE and is reported nowhere else.
            ended = self._end_idle()
            _text, more = client.noop()
            return any(_is_change(r) for r in [*ended, *more])
        return False

    def _end_idle(self) -> list[Any]:
        """Leave IDLE; the untagged responses that came before the server's OK."""
        if not self._idling:
            return []
        self._idling = False
        _text, responses = self.client.idle_done()
        return list(responses)

    async def idle_wait(self, stop: asyncio.Event, renew_after: float = IDLE_RENEW) -> bool:
        """Wait in IDLE until the server reports a change (True) or stop/renewal time (False)."""
        deadline = time.monotonic() + renew_after
        interrupt = asyncio.ensure_future(self._interrupt_on(stop))
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                if await self._call(self._idle_slice, deadline):
                    return True
            return False
        finally:
            interrupt.cancel()
            if self._client is not None and not stop.is_set():
                await self._call(self._end_idle)

    async def _interrupt_on(self, stop: asyncio.Event) -> None:
        """On stop, wake the worker thread blocked in IDLE: shut the socket's read side."""
        await stop.wait()
        client = self._client
        if client is not None:
            with contextlib.suppress(OSError):
                client.socket().shutdown(socket.SHUT_RD)

    async def close(self) -> None:
        """Log out (best effort) and drop the connection."""
        client, self._client, self._idling = self._client, None, False
        if client is not None:
            await asyncio.get_running_loop().run_in_executor(self.executor, _logout, client)


def _login(settings: ImapSettings, token: str | None = None) -> IMAPClient:
    """A verified IMAPS connection, logged in (blocking; call from a worker thread).

    With auth = "oauth2", `token` is the access token, fetched beforehand on the event loop.
    """
    client = IMAPClient(
        settings.host,
        port=settings.port,
        ssl=True,
        ssl_context=ssl_context(settings.ca_file),
        timeout=settings.timeout,
    )
    try:
        _keepalive(client.socket())
        if settings.auth == "oauth2":
            _bearer_login(client, settings.username, token)
        else:
            client.login(settings.username, settings.secret)
    except Exception:
        _shutdown(client)
        raise
    return client


def _bearer_login(client: IMAPClient, username: str, token: str | None) -> None:
    """SASL XOAUTH2 (Gmail, Microsoft), else OAUTHBEARER (RFC 7628) when only that is offered."""
    if token is None:
        raise SignInNeeded(f"IMAP {username}: no OAuth2 access token")
    # Before login the capabilities come from the greeting; nothing is cached yet.
    if not client.has_capability("AUTH=XOAUTH2") and client.has_capability("AUTH=OAUTHBEARER"):
        client.oauthbearer_login(username, token)
    else:
        client.oauth2_login(username, token)


def _keepalive(sock: socket.socket) -> None:
    """TCP keepalive: a link that dies silently during IDLE is noticed in ~90 s, not at renewal."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):  # Linux names; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _is_bye(response: Any) -> bool:
    return isinstance(response, tuple) and len(response) > 0 and response[0] == b"BYE"


def _is_change(response: Any) -> bool:
    # "* 5 EXISTS" / "* 3 EXPUNGE" / "* 2 RECENT": the folder changed; "* OK Still here" did not.
    return isinstance(response, tuple) and len(response) > 1 and response[1] in _CHANGES


_CHANGES = frozenset({b"EXISTS", b"RECENT", b"EXPUNGE"})


def _buffered_input(client: IMAPClient) -> bool:
    """True when imaplib already holds server data that poll() on the socket cannot see.

    The server may send "* 5 EXISTS" in the same packet as "+ idling"; imaplib's buffered reader
    then holds it and idle_check(), which polls the socket, would wait for the next event.
    """
    sock = client.socket()
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    reader = getattr(client._imap, "file", None)
    if reader is None or not hasattr(reader, "peek"):
        return False
    sock.setblocking(False)
    try:
        return bool(reader.peek(1))
    except (ssl.SSLWantReadError, BlockingIOError):
        return False
    finally:
        sock.setblocking(True)
        client._set_read_timeout()


def _logout(client: IMAPClient) -> None:
    try:
        client.logout()
    except Exception:  # the connection is going away either way
        _shutdown(client)


def _shutdown(client: IMAPClient) -> None:
    with contextlib.suppress(Exception):  # nothing left to do with a dead socket
        client.shutdown()


async def check_login(settings: ImapSettings, tokens: TokenSource | None = None) -> str:
    """Log in, select the folder read-only and log out; returns a one-line description."""
    session = ImapSession(settings, tokens=tokens)
    try:
        state = await session.connect()
        idle = "IDLE" if session.client.has_capability("IDLE") else "no IDLE"
        return f"{state.exists} messages in {settings.mailbox}, {idle}"
    finally:
        await session.close()


async def newest_headers(
    settings: ImapSettings, folder: str, count: int, tokens: TokenSource | None = None
) -> list[tuple[int, bytes]]:
    """(uid, a few header fields) of a folder's newest messages, newest first (read-only)."""
    session = ImapSession(settings, folder, tokens=tokens)
    try:
        await session.connect()
        return await session.newest_headers(count)
    finally:
        await session.close()


def _append_sent(settings: ImapSettings, raw: bytes, token: str | None) -> str | None:
    client = _login(settings, token)
    try:
        folder = settings.sent_mailbox or client.find_special_folder(b"\\Sent")
        if not folder:
            return None
        if settings.sent_mailbox and not client.folder_exists(folder):
            client.create_folder(folder)
        client.append(folder, raw, flags=(b"\\Seen",))
        return str(folder)
    finally:
        _logout(client)


async def append_sent(
    settings: ImapSettings, raw: bytes, tokens: TokenSource | None = None
) -> str | None:
    """Save a copy of a sent mail in the Sent folder (BRIDGE_IMAP__SENT_MAILBOX, else the
    SPECIAL-USE \\Sent folder); returns the folder, or None when there is none."""

    async def attempt(token: str | None) -> str | None:
        return await asyncio.to_thread(_append_sent, settings, raw, token)

    try:
        return await _authenticated(settings, tokens, attempt)
    except MAIL_FAILURES as exc:
        raise classify(exc) from exc


def _check_folders(settings: ImapSettings, folders: list[str], token: str | None) -> str:
    client = _login(settings, token)
    try:
        # Read before SELECT, which drops the capabilities the LOGIN answer carried.
        idle = "IDLE" if client.has_capability("IDLE") else "no IDLE"
        counts: list[str] = []
        for folder in folders:
            try:
                info = client.select_folder(folder, readonly=True)
            except IMAPClientError as exc:
                raise PermanentMailError(f"cannot open folder {folder}: {_text(exc)}") from exc
            exists = int(info.get(b"EXISTS", 0))
            noun = "" if counts else " message" if exists == 1 else " messages"
            counts.append(f"{exists}{noun} in {folder}")
        return ", ".join([*counts, idle])
    finally:
        _logout(client)


async def check_folders(
    settings: ImapSettings, folders: list[str], tokens: TokenSource | None = None
) -> str:
    """Log in once, open each folder read-only: "12 messages in INBOX, 3 in Lists, IDLE"."""

    async def attempt(token: str | None) -> str:
        return await asyncio.to_thread(_check_folders, settings, folders, token)

    try:
        return await _authenticated(settings, tokens, attempt)
    except MAIL_FAILURES as exc:
        raise classify(exc) from exc


# Actions on single mails (bridge/actions.py): a fresh connection for each, never the watcher's.

CHUNK_BYTES = 1_048_576  # one partial FETCH of a part: BODY.PEEK[<part>]<offset.length>
_COPYUID = "COPYUID"
_MSG_ID = re.compile(rb"<[^<>]*>")


@dataclass(frozen=True)
class Copied:
    """Where COPYUID (RFC 4315 §3) says the copy of a mail went."""

    uidvalidity: int
    uid: int


class MailConnection:
    """A logged-in connection for actions on single mails; blocking, used via with_connection()."""

    def __init__(self, client: IMAPClient) -> None:
        self.client = client

    def has(self, capability: str) -> bool:
        """Whether the server announced `capability` (cached at login: no I/O)."""
        return bool(self.client.has_capability(capability))

    def select(self, folder: str, *, readonly: bool) -> FolderState | None:
        """SELECT (read-write) or EXAMINE (read-only) a folder; None when it cannot be opened."""
        try:
            info = self.client.select_folder(folder, readonly=readonly)
        except IMAPClientAbortError:
            raise
        except IMAPClientError:  # NO: the folder does not exist or is not selectable
            return None
        return FolderState(
            uidvalidity=int(info.get(b"UIDVALIDITY", 0)),
            uidnext=int(info.get(b"UIDNEXT", 0)),
            exists=int(info.get(b"EXISTS", 0)),
        )

    def live_flags(self, uid: int) -> tuple[bytes, ...] | None:
        """The flags of a mail that is there and not marked \\Deleted; None otherwise."""
        flags = self.client.fetch([uid], ["FLAGS"]).get(uid, {}).get(b"FLAGS")
        if flags is None or b"\\Deleted" in flags:
            return None
        return tuple(flags)

    def find_message_id(self, message_id: str) -> list[int]:
        """UIDs of the mails with exactly this Message-ID not marked \\Deleted, ascending."""
        charset = None if message_id.isascii() else "UTF-8"
        criteria = ["UNDELETED", "HEADER", "MESSAGE-ID", message_id]
        candidates = sorted(self.client.search(criteria, charset))[-20:]
        if not candidates:
            return []
        # RFC 3501 §6.4.4: SEARCH HEADER matches substrings; keep the exact matches.
        data = self.client.fetch(candidates, ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
        wanted = _bare_id(message_id.encode("utf-8", "replace"))
        return [
            uid
            for uid in candidates
            if uid in data and _bare_id(_fetch_key(data[uid], b"BODY[HEADER") or b"") == wanted
        ]

    def set_flag(self, uid: int, flag: bytes, on: bool) -> None:
        """UID STORE +FLAGS or -FLAGS (silent) on the selected, read-write folder."""
        if on:
            self.client.add_flags([uid], [flag], silent=True)
        else:
            self.client.remove_flags([uid], [flag], silent=True)

    def special_folder(self, flag: bytes) -> str | None:
        """The folder with this RFC 6154 SPECIAL-USE attribute (else a usual name), or None."""
        found = self.client.find_special_folder(flag)
        return str(found) if found else None

    def folder_exists(self, folder: str) -> bool:
        """Whether LIST knows the folder."""
        return bool(self.client.folder_exists(folder))

    def can_move(self) -> bool:
        """MOVE (RFC 6851), or UIDPLUS (RFC 4315) for COPY + UID EXPUNGE of one UID."""
        return self.has("MOVE") or self.has("UIDPLUS")

    def move(self, uid: int, folder: str) -> Copied | None:
        """Move one mail of the selected read-write folder; where it went, if the server said.

        Without MOVE: UID COPY, \\Deleted, then UID EXPUNGE of that UID only (RFC 4315 §2.1);
        a plain EXPUNGE would also remove mail that other clients marked \\Deleted.
        """
        # imaplib files response codes ("* OK [COPYUID ...]", RFC 6851 §4.3, or the tagged OK
        # of COPY) under their name; imapclient returns neither.
        responses = self.client._imap.untagged_responses
        responses.pop(_COPYUID, None)
        if self.has("MOVE"):
            self.client.move([uid], folder)
            copied = responses.pop(_COPYUID, [])
        elif self.has("UIDPLUS"):
            self.client.copy([uid], folder)
            copied = responses.pop(_COPYUID, [])
            self.client.add_flags([uid], [b"\\Deleted"], silent=True)
            self.client.uid_expunge([uid])
        else:
            raise PermanentMailError("the IMAP server offers neither MOVE nor UIDPLUS")
        return next((c for data in copied if (c := _copyuid(data, uid)) is not None), None)

    def structure(self, uid: int) -> Any:
        """The mail's BODYSTRUCTURE (imapclient's form), None when the UID is not there."""
        return self.client.fetch([uid], ["BODYSTRUCTURE"]).get(uid, {}).get(b"BODYSTRUCTURE")

    def sections(self, uid: int, sections: list[str], limit: int) -> dict[str, bytes]:
        """The first `limit` octets of each part, by section, with BODY.PEEK (never \\Seen)."""
        items = [f"BODY.PEEK[{section}]<0.{limit}>" for section in sections]
        data = self.client.fetch([uid], items).get(uid, {})
        return {s: _fetch_key(data, f"BODY[{s}]".encode()) or b"" for s in sections}

    def stream(
        self, uid: int, section: str, write: Callable[[bytes], object], chunk: int = CHUNK_BYTES
    ) -> int:
        """Pass one part ("" for the whole mail) to `write` in partial fetches of `chunk`
        octets, so neither the mail nor the part is ever held whole; returns octets fetched."""
        offset = 0
        while True:
            item = f"BODY.PEEK[{section}]<{offset}.{chunk}>"
            data = self.client.fetch([uid], [item]).get(uid)
            if data is None:
                raise PermanentMailError("the mail disappeared while it was being read")
            piece = _fetch_key(data, f"BODY[{section}]".encode()) or b""
            write(piece)
            offset += len(piece)
            # RFC 3501 §6.4.5: a partial fetch past the end returns fewer octets (or none).
            if len(piece) < chunk:
                return offset

    def newest(
        self, criteria: list[Any], charset: str | None, limit: int
    ) -> list[tuple[int, Any]]:
        """(uid, INTERNALDATE) of the `limit` newest matches of SEARCH criteria, newest first."""
        if self.has("SORT"):
            # RFC 5256: ordered by arrival, newest first; but ties (mail that arrived in the
            # same second) come in ascending order, so look past the cut and re-sort below.
            order = ["REVERSE", "ARRIVAL"]
            found = self.client.sort(order, criteria, charset or "US-ASCII")
            uids = list(found)[: limit * SORT_MARGIN]
        else:
            # UIDs grow in arrival order within a folder (RFC 3501 §2.3.1.1): the highest are
            # nearly always the newest.
            uids = sorted(self.client.search(criteria, charset))[-limit * SORT_MARGIN :]
        dated: list[tuple[int, datetime]] = []
        for start in range(0, len(uids), 1000):
            batch = uids[start : start + 1000]
            data = self.client.fetch(batch, ["INTERNALDATE"])
            dated += [(u, data[u][b"INTERNALDATE"]) for u in batch if u in data]
        dated.sort(key=lambda pair: (pair[1], pair[0]), reverse=True)
        return dated[:limit]

    def headers(self, uids: list[int]) -> list[tuple[int, bytes]]:
        """(uid, the header fields the digest shows) for each UID still there."""
        return _fetch_headers(self.client, uids)

    def summary(self, uid: int) -> FetchedMail | None:
        """What the watcher fetches of a new mail, for one UID; None when it is not there."""
        return next(iter(_fetch_summaries(self.client, [uid])), None)

    def summaries(self, uids: list[int]) -> list[FetchedMail]:
        """What the watcher fetches of each new mail, in one FETCH per batch."""
        return _fetch_summaries(self.client, uids)


def _bare_id(value: bytes) -> bytes:
    """A Message-ID (or the header field holding one) without brackets and whitespace."""
    found = _MSG_ID.search(value)
    text = found.group(0) if found else re.sub(rb"(?i)^\s*message-id\s*:", b"", value)
    return b"".join(text.split()).strip(b"<>")


def _uid_set(text: bytes) -> list[int] | None:
    """An RFC 3501 sequence set of UIDs ("4", "4:6,9") in order; None when unreadable."""
    result: list[int] = []
    try:
        for piece in text.split(b","):
            first, _, last = piece.partition(b":")
            low, high = int(first), int(last or first)
            step = 1 if high >= low else -1
            if abs(high - low) > 10_000:
                return None
            result += range(low, high + step, step)
    except ValueError:
        return None
    return result


def _copyuid(data: object, uid: int) -> Copied | None:
    """Our mail's new UID from "COPYUID <uidvalidity> <source set> <destination set>"."""
    fields = data.split() if isinstance(data, bytes) else []
    if len(fields) != 3 or not fields[0].isdigit():
        return None
    sources, targets = _uid_set(fields[1]), _uid_set(fields[2])
    if sources is None or targets is None or len(sources) != len(targets) or uid not in sources:
        return None
    # RFC 4315 §3: the two sets list the UIDs in the same order.
    return Copied(uidvalidity=int(fields[0]), uid=targets[sources.index(uid)])


async def with_connection(
    settings: ImapSettings,
    work: Callable[[MailConnection], T],
    tokens: TokenSource | None = None,
) -> T:
    """Log in on a fresh connection, run `work` on it in a worker thread, log out.

    Network and protocol errors (MAIL_FAILURES) become TemporaryMailError or
    PermanentMailError (classify()); anything else, a BridgeError `work` raises on purpose or a
    bug, passes through as it is. `tokens`: the account's OAuth2 tokens, for auth = "oauth2".
    """

    def run(token: str | None) -> T:
        client = _login(settings, token)
        try:
            # Cached from the LOGIN answer; SELECT would discard it.
            client.capabilities()
            return work(MailConnection(client))
        finally:
            _logout(client)

    async def attempt(token: str | None) -> T:
        return await asyncio.to_thread(run, token)

    try:
        return await _authenticated(settings, tokens, attempt)
    except MAIL_FAILURES as exc:
        raise classify(exc) from exc
