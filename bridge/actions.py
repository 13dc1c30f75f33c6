"""What a button or /search does on the mail server: flags, moves and undo, text, parts, search.

Each call opens its own short-lived connection (bridge.mail.imap.with_connection), never the
watcher's read-only one, and finds the mail again first (locate): a UID is only a hint that
UIDVALIDITY and the Message-ID confirm. Nothing here destroys mail: Delete is a move to Trash.
"""

from __future__ import annotations

import mimetypes
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime
from typing import Any, BinaryIO, Literal

from bridge.config import ImapSettings
from bridge.errors import PermanentMailError, UsageError
from bridge.mail.auth import TokenSource
from bridge.mail.decode import decode_bytes, strip_controls
from bridge.mail.imap import FetchedMail, MailConnection, with_connection

# parse.py's own helpers, so the whole text reads exactly like the summary's start.
from bridge.mail.parse import _META_CHARSET, _html_to_text, _unflow, parse_mail
from bridge.mail.structure import (
    NESTED,
    MimePart,
    TransferDecoder,
    find_attachments,
    find_text_parts,
    parse_structure,
)

Role = Literal["archive", "trash", "junk"]
# RFC 6154 SPECIAL-USE attributes of the role folders.
_ROLE_FLAGS: dict[str, bytes] = {"archive": b"\\Archive", "trash": b"\\Trash", "junk": b"\\Junk"}
# Octets of one text part read for the full text; a longer part is cut (FullText.complete).
TEXT_LIMIT = 4 * 1_048_576


@dataclass(frozen=True)
class MailLocation:
    """Where a mail is now: folder, UIDVALIDITY, UID, and its Message-ID to find it again."""

    folder: str
    uidvalidity: int
    uid: int
    message_id: str


class MailGone(PermanentMailError):
    """The mail is no longer where it was and its Message-ID does not find it there."""

    def __init__(self, folder: str) -> None:
        super().__init__(f"That mail is no longer in {folder}: it was moved or deleted elsewhere.")
        self.folder = folder


class FolderMissing(PermanentMailError):
    """A folder to move mail to does not exist (the bridge never creates one)."""

    def __init__(self, folder: str = "", role: str = "", account: str = "") -> None:
        setting = f"{account}.imap.{role}_mailbox" if account else f"imap.{role}_mailbox"
        if role and folder:
            text = (
                f"There is no {role} folder {folder}: {setting} names a folder the server "
                "does not have."
            )
        elif role:
            flag = _ROLE_FLAGS.get(role, b"").decode()
            text = (
                f"There is no {role} folder: set {setting} or mark a folder {flag} "
                "(SPECIAL-USE) on the server."
            )
        else:
            text = f"There is no folder {folder} on the server."
        super().__init__(text)
        self.folder, self.role = folder, role


class MoveRefused(PermanentMailError):
    """The server has neither MOVE nor UIDPLUS: moving one mail would risk other mail."""

    def __init__(self) -> None:
        super().__init__(
            "The mail server supports neither MOVE nor UIDPLUS, so the bridge cannot move one "
            "mail without risking others: nothing was changed."
        )


@dataclass(frozen=True)
class FullText:
    """The whole text of a mail, and its HTML version when it has one."""

    text: str
    html: str | None
    complete: bool = True  # False when a part was longer than TEXT_LIMIT and was cut


@dataclass(frozen=True)
class AttachmentPart:
    """One attachment as BODYSTRUCTURE describes it: enough to fetch it alone."""

    section: str  # RFC 3501 §6.4.5 part number, for BODY.PEEK[<section>]
    filename: str  # decoded (RFC 2231 / RFC 2047); generated when the part has no name
    content_type: str
    size: int  # estimated size once decoded
    encoded_size: int  # octets on the server
    encoding: str  # Content-Transfer-Encoding, lower-case


@dataclass(frozen=True)
class SearchQuery:
    """A /search: words anywhere in the mail, and optional header and date conditions."""

    words: tuple[str, ...] = ()
    from_: str | None = None
    to: str | None = None
    subject: str | None = None
    since: date | None = None  # on or after (RFC 3501 SINCE: the internal date)
    before: date | None = None  # strictly before


@dataclass(frozen=True)
class SearchHit:
    """One search result: where it is, the header fields its line shows, and what a summary
    is made from (fetched on the search's own connection, not one connection per hit)."""

    location: MailLocation
    header: bytes
    fetched: FetchedMail | None = None


def _no_note(_: str) -> None:
    """A Note that drops decoding problems (the full text has no place to show them)."""


def _same_folder(a: str, b: str) -> bool:
    # RFC 3501 §5.1: INBOX is case-insensitive, every other name is not.
    return a == b or a.upper() == b.upper() == "INBOX"


def _locate(conn: MailConnection, loc: MailLocation, *, readonly: bool) -> MailLocation:
    """Select loc.folder and find the mail: by UID when UIDVALIDITY holds, else by Message-ID."""
    state = conn.select(loc.folder, readonly=readonly)
    if state is None:
        raise MailGone(loc.folder)
    # RFC 3501 §2.3.1.1: while UIDVALIDITY stays the same, a UID names the same mail for good.
    same = state.uidvalidity == loc.uidvalidity and loc.uid > 0  # UID 0 names no mail
    if same and conn.live_flags(loc.uid) is not None:
        return loc
    uids = conn.find_message_id(loc.message_id) if loc.message_id.strip("<> ") else []
    if not uids:
        raise MailGone(loc.folder)
    return replace(loc, uidvalidity=state.uidvalidity, uid=uids[-1])


async def locate(
    imap: ImapSettings, loc: MailLocation, tokens: TokenSource | None = None
) -> MailLocation:
    """Where the mail is now (the same location, or a new UID found by Message-ID); MailGone."""
    return await with_connection(imap, lambda conn: _locate(conn, loc, readonly=True), tokens)


async def set_seen(
    imap: ImapSettings, loc: MailLocation, seen: bool, tokens: TokenSource | None = None
) -> MailLocation:
    """Set or clear \\Seen on the server; returns where the mail is."""

    def work(conn: MailConnection) -> MailLocation:
        found = _locate(conn, loc, readonly=False)
        conn.set_flag(found.uid, b"\\Seen", seen)
        return found

    return await with_connection(imap, work, tokens)


async def is_seen(
    imap: ImapSettings, loc: MailLocation, tokens: TokenSource | None = None
) -> bool:
    """Whether the mail has \\Seen (read-only: EXAMINE changes nothing)."""

    def work(conn: MailConnection) -> bool:
        found = _locate(conn, loc, readonly=True)
        return b"\\Seen" in (conn.live_flags(found.uid) or ())

    return await with_connection(imap, work, tokens)


def _role_folder(conn: MailConnection, imap: ImapSettings, role: Role, account: str) -> str:
    """The configured folder for `role`, else the one with its SPECIAL-USE attribute."""
    configured = {
        "archive": imap.archive_mailbox,
        "trash": imap.trash_mailbox,
        "junk": imap.junk_mailbox,
    }[role]
    if configured:
        if not conn.folder_exists(configured):
            raise FolderMissing(configured, role, account)  # never created: a typo stays visible
        return configured
    flags = [_ROLE_FLAGS[role]]
    if role == "archive" and conn.has("X-GM-EXT-1"):
        # Gmail archives by removing the Inbox label: the mail stays in "All Mail" (\All).
        flags.insert(0, b"\\All")
    for flag in flags:
        if found := conn.special_folder(flag):
            return found
    raise FolderMissing("", role, account)


def _move(conn: MailConnection, loc: MailLocation, folder: str) -> MailLocation:
    """Move the mail to `folder`; its new location (COPYUID, else found by Message-ID)."""
    if not conn.can_move():
        raise MoveRefused()
    found = _locate(conn, loc, readonly=False)
    if _same_folder(found.folder, folder):
        return found
    copied = conn.move(found.uid, folder)
    if copied is not None:
        return MailLocation(folder, copied.uidvalidity, copied.uid, found.message_id)
    # No COPYUID (RFC 4315 §3 lets a server omit it): look for the mail in its new folder.
    state = conn.select(folder, readonly=True)
    uids = conn.find_message_id(found.message_id) if state and found.message_id else []
    # UID 0 names no mail: a later locate() goes straight to the Message-ID.
    return MailLocation(
        folder, state.uidvalidity if state else 0, uids[-1] if uids else 0, found.message_id
    )


async def move(
    imap: ImapSettings,
    loc: MailLocation,
    role: Role,
    *,
    account: str = "",
    tokens: TokenSource | None = None,
) -> MailLocation:
    """Move the mail to the account's archive, trash or junk folder; its new location.

    `account` only names the setting in FolderMissing's message.
    """
    return await with_connection(
        imap, lambda conn: _move(conn, loc, _role_folder(conn, imap, role, account)), tokens
    )


async def move_to(
    imap: ImapSettings, loc: MailLocation, folder: str, tokens: TokenSource | None = None
) -> MailLocation:
    """Move the mail to a named folder (Undo: back where it was); its new location."""

    def work(conn: MailConnection) -> MailLocation:
        if not conn.folder_exists(folder):
            raise FolderMissing(folder)
        return _move(conn, loc, folder)

    return await with_connection(imap, work, tokens)


def _structure(conn: MailConnection, loc: MailLocation) -> MimePart:
    root = parse_structure(conn.structure(loc.uid), _no_note)
    if root is None:
        raise MailGone(loc.folder)
    return root


def _decode_text(part: MimePart, data: bytes, complete: bool) -> str:
    """A text part's fetched octets as text: transfer encoding, then charset, then newlines."""
    decoder = TransferDecoder(part.encoding)
    body = decoder.feed(data) + decoder.finish()
    charset = part.params.get("charset")
    sniffed = _META_CHARSET.search(body[:4096]) if part.content_type == "text/html" else None
    if not charset and sniffed:
        charset = sniffed.group(1).decode("ascii", "replace")
    text = decode_bytes(body, charset, _no_note, partial=not complete)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_text(conn: MailConnection, loc: MailLocation) -> FullText:
    root = _structure(conn, loc)
    plain = find_text_parts(root, "text/plain")
    html = [p for p in find_text_parts(root, "text/html") if p.content_type == "text/html"]
    if not any(p.encoded_size for p in [*plain, *html]) and not find_attachments(root):
        # No text the server could find (a missing boundary, no header block): nothing to
        # spare either, so read the mail whole and let parse.py recover what it can.
        raw = conn.sections(loc.uid, [""], TEXT_LIMIT)[""]
        text = parse_mail(raw, text_limit=TEXT_LIMIT).text
        return FullText(text, None, complete=len(raw) < TEXT_LIMIT)
    wanted = list(dict.fromkeys(p.section for p in [*plain, *html]))
    fetched = conn.sections(loc.uid, wanted, TEXT_LIMIT) if wanted else {}
    complete = all(p.encoded_size <= TEXT_LIMIT for p in [*plain, *html])
    decoded = {
        p.section: _decode_text(p, fetched.get(p.section, b""), p.encoded_size <= TEXT_LIMIT)
        for p in [*plain, *html]
    }
    pieces = []
    for part in plain:
        text = decoded[part.section]
        if part.content_type == "text/html":
            text = _html_to_text(text)
        else:
            if part.params.get("format", "").lower() == "flowed":
                text = _unflow(text, part.params.get("delsp", "").lower() == "yes")
            text = strip_controls(text)
        pieces.append(text.rstrip().lstrip("\n"))
    markup = "\n".join(decoded[p.section] for p in html) if html else None
    return FullText("\n\n".join(p for p in pieces if p), markup, complete)


async def full_text(
    imap: ImapSettings, loc: MailLocation, tokens: TokenSource | None = None
) -> FullText:
    """The whole text (text/plain, else the HTML as text) and the HTML; only the text parts are
    fetched (BODY.PEEK[<part>], never \\Seen), never the attachments."""
    return await with_connection(
        imap, lambda conn: _read_text(conn, _locate(conn, loc, readonly=True)), tokens
    )


def _file_name(part: MimePart) -> str:
    if part.filename:
        return part.filename
    if part.content_type in NESTED:
        # A forwarded mail: named after its subject, as mail clients save it.
        stem = re.sub(r"[\\/:*?\"<>|]+", "_", part.subject).strip(" ._")[:100]
        return f"{stem or 'message'}.eml"
    extension = mimetypes.guess_extension(part.content_type) or ".bin"
    return f"part-{part.section}{extension}"


def _attachment(part: MimePart) -> AttachmentPart:
    return AttachmentPart(
        section=part.section,
        filename=_file_name(part),
        content_type=part.content_type,
        size=part.size,
        encoded_size=part.encoded_size,
        encoding=part.encoding,
    )


async def attachment_parts(
    imap: ImapSettings, loc: MailLocation, tokens: TokenSource | None = None
) -> list[AttachmentPart]:
    """The mail's attachments from BODYSTRUCTURE alone (nothing downloaded), in order.

    Inline images count only when they are files: an image without a name that was not
    attached and is under 1 KB (structure.PIXEL_BYTES) is a tracking pixel and left out.
    """

    def work(conn: MailConnection) -> list[AttachmentPart]:
        found = _locate(conn, loc, readonly=True)
        return [_attachment(p) for p in find_attachments(_structure(conn, found))]

    return await with_connection(imap, work, tokens)


def _walk(part: MimePart) -> list[MimePart]:
    return [part, *(p for kid in part.children for p in _walk(kid))]


def _save_part(
    conn: MailConnection, loc: MailLocation, part: AttachmentPart, target: BinaryIO
) -> int:
    found = _locate(conn, loc, readonly=True)
    if found != loc:
        # Another copy found by Message-ID: make sure the section is the same part there.
        same = [
            p
            for p in _walk(_structure(conn, found))
            if (p.section, p.content_type, p.encoded_size)
            == (part.section, part.content_type, part.encoded_size)
        ]
        if not same:
            raise MailGone(loc.folder)
    decoder = TransferDecoder(part.encoding)
    fetched = conn.stream(found.uid, part.section, lambda data: target.write(decoder.feed(data)))
    target.write(decoder.finish())
    return fetched


async def save_part(
    imap: ImapSettings,
    loc: MailLocation,
    part: AttachmentPart,
    target: BinaryIO,
    tokens: TokenSource | None = None,
) -> int:
    """Write one attachment, decoded, to `target`; only that part is fetched, in chunks of
    CHUNK_BYTES (neither it nor the mail is ever whole in memory). Returns octets fetched."""
    return await with_connection(imap, lambda conn: _save_part(conn, loc, part, target), tokens)


async def save_raw(
    imap: ImapSettings, loc: MailLocation, target: BinaryIO, tokens: TokenSource | None = None
) -> int:
    """Write the whole original mail to `target` in chunks (to forward it as message/rfc822)."""

    def work(conn: MailConnection) -> int:
        found = _locate(conn, loc, readonly=True)
        return conn.stream(found.uid, "", target.write)

    return await with_connection(imap, work, tokens)


async def fetch_summary_source(
    imap: ImapSettings, loc: MailLocation, tokens: TokenSource | None = None
) -> FetchedMail:
    """What the watcher fetches of a new mail (its start and structure), for one mail."""

    def work(conn: MailConnection) -> FetchedMail:
        found = _locate(conn, loc, readonly=True)
        if (fetched := conn.summary(found.uid)) is None:
            raise MailGone(loc.folder)
        return fetched

    return await with_connection(imap, work, tokens)


def _gmail_quote(value: str) -> str:
    if not re.search(r'[\s"()]', value):
        return value
    return '"' + value.replace('"', " ") + '"'


def _criteria(query: SearchQuery, gmail: bool) -> tuple[list[Any], str | None]:
    """SEARCH criteria and charset for a query (RFC 3501 §6.4.4; Gmail's X-GM-RAW)."""
    terms = [*query.words, query.from_ or "", query.to or "", query.subject or ""]
    # RFC 3501 §6.4.4: only US-ASCII is sure to be supported; name UTF-8 only when needed.
    charset = None if all(t.isascii() for t in terms) else "UTF-8"
    criteria: list[Any] = ["UNDELETED"]
    if gmail:
        raw = [_gmail_quote(word) for word in query.words]
        for key, value in (("from", query.from_), ("to", query.to), ("subject", query.subject)):
            if value:
                raw.append(f"{key}:{_gmail_quote(value)}")
        if query.since:
            raw.append(f"after:{query.since:%Y/%m/%d}")
        if query.before:
            raw.append(f"before:{query.before:%Y/%m/%d}")
        return [*criteria, "X-GM-RAW", " ".join(raw)] if raw else criteria, charset
    for word in query.words:
        criteria += ["TEXT", word]
    for key, value in (("FROM", query.from_), ("TO", query.to), ("SUBJECT", query.subject)):
        if value:
            criteria += [key, value]
    if query.since:
        criteria += ["SINCE", query.since]
    if query.before:
        criteria += ["BEFORE", query.before]
    return criteria, charset


def _search(
    conn: MailConnection, folders: Sequence[str], query: SearchQuery, limit: int
) -> list[SearchHit]:
    criteria, charset = _criteria(query, conn.has("X-GM-EXT-1"))
    found: list[tuple[datetime, int, int]] = []  # (arrival, folder index, uid)
    for index, folder in enumerate(folders):
        if conn.select(folder, readonly=True) is None:
            raise FolderMissing(folder)
        found += [(when, index, uid) for uid, when in conn.newest(criteria, charset, limit)]
    found.sort(reverse=True)
    chosen = found[:limit]
    hits: dict[tuple[int, int], SearchHit] = {}
    for index, folder in enumerate(folders):
        uids = [uid for _, i, uid in chosen if i == index]
        state = conn.select(folder, readonly=True) if uids else None
        if state is None:
            continue
        fetched = {mail.uid: mail for mail in conn.summaries(uids)}
        for uid, header in conn.headers(uids):
            message_id = parse_mail(header).message_id
            location = MailLocation(folder, state.uidvalidity, uid, message_id)
            hits[index, uid] = SearchHit(location, header, fetched.get(uid))
    return [hits[i, uid] for _, i, uid in chosen if (i, uid) in hits]


async def search(
    imap: ImapSettings,
    folders: Sequence[str],
    query: SearchQuery,
    limit: int = 10,
    tokens: TokenSource | None = None,
) -> list[SearchHit]:
    """The newest `limit` mails matching the query across folders, newest first (by arrival).

    Read-only (EXAMINE). IMAP SEARCH (CHARSET UTF-8 when a term needs it), or Gmail's
    X-GM-RAW where the server offers X-GM-EXT-1; mails marked \\Deleted are left out.
    """
    chosen = list(folders) or [imap.mailbox]
    return await with_connection(imap, lambda conn: _search(conn, chosen, query, limit), tokens)


_KEYS = ("from", "to", "subject", "since", "before", "account", "folder")
# key:value, key:"quoted value", "a phrase", or a word.
_TOKEN = re.compile(
    r'(?P<key>[A-Za-z]+):(?:"(?P<quoted>[^"]*)"?|(?P<value>\S*))'
    r'|"(?P<phrase>[^"]*)"?'
    r"|(?P<word>\S+)"
)
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _date(key: str, value: str) -> date:
    try:
        if _DATE.fullmatch(value):
            return date.fromisoformat(value)
    except ValueError:
        pass
    raise UsageError(f"{key}: takes a date as YYYY-MM-DD, e.g. {key}:2024-05-31")


def parse_query(text: str) -> tuple[SearchQuery, str | None, str | None]:
    """A /search argument to (query, account, folder): words, from: to: subject: since:
    before: account: folder: (a value in quotes may hold spaces: subject:"two words")."""
    words: list[str] = []
    fields: dict[str, str] = {}
    for m in _TOKEN.finditer(text):
        key = (m.group("key") or "").lower()
        if key in _KEYS:
            quoted = m.group("quoted")
            value = (quoted if quoted is not None else m.group("value")).strip()
            if not value:
                raise UsageError(f"{key}: needs a value, e.g. {key}:{_EXAMPLES[key]}")
            fields[key] = value
        elif m.group("phrase") is not None:
            if phrase := " ".join(m.group("phrase").split()):
                words.append(phrase)
        else:
            words.append(m.group(0).replace('"', ""))
    query = SearchQuery(
        words=tuple(w for w in words if w),
        from_=fields.get("from"),
        to=fields.get("to"),
        subject=fields.get("subject"),
        since=_date("since", fields["since"]) if "since" in fields else None,
        before=_date("before", fields["before"]) if "before" in fields else None,
    )
    return query, fields.get("account"), fields.get("folder")


_EXAMPLES = {
    "from": "ann@example.org",
    "to": "bob@example.org",
    "subject": '"two words"',
    "since": "2024-05-31",
    "before": "2024-05-31",
    "account": "home",
    "folder": "INBOX",
}
