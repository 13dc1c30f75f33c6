"""Outgoing mail and replies as EmailMessage: addresses, Re:, threading headers, attachments."""

from __future__ import annotations

import email
import mimetypes
import re
import unicodedata
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP

from email_validator import EmailNotValidError, validate_email

# RFC 5322 §3.6.4 sets no limit; like RFC 5537 §3.4.4 (netnews) we keep the first
# reference (the thread's root) and the newest ones when the list grows long.
MAX_REFERENCES = 20
NO_SUBJECT = "(no subject)"

# Reply prefixes of common mail clients (en, de, nl, nordic, fi, pl, fr, it, pt, tr, zh).
_REPLY_PREFIX = re.compile(
    r"^\s*(?:re|aw|antw|sv|vs|odp|r[ée]f|rif|res|ynt|回复|回覆|答复)"
    r"\s*(?:\[\d+\]|\(\d+\))?\s*[:\uff1a]",
    re.IGNORECASE,
)
# One address: `addr`, `Name <addr>` or `"Name" <addr>`; nothing before or after.
_ONE_ADDRESS = re.compile(
    r'\s*(?:(?P<name>"(?:[^"\\]|\\.)*"|[^"<>]*?)\s*<(?P<addr>[^<>\s]+)>|(?P<bare>[^"<>\s]+))\s*',
    re.DOTALL,
)
# RFC 5322 §3.6.4 msg-id, printable ASCII only.
_MSG_ID = re.compile(r"<[!-;=?-~]+@[!-;=?-~]+>")
# RFC 2045 §5.1 type/subtype tokens (the common subset).
_CONTENT_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+")
# A line 7bit carries unchanged: printable ASCII, RFC 2045 §2.7 length, no trailing blank.
_PLAIN_LINE = re.compile(r"(?:[ -~\t]{0,77}[!-~])?")
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


@dataclass(frozen=True)
class OutgoingAttachment:
    """A file to attach; an empty content_type is guessed from the file name."""

    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class OutgoingMail:
    """What the chat asked to send; addresses as returned by parse_addresses()."""

    to: tuple[str, ...]
    subject: str
    body: str
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    attachments: tuple[OutgoingAttachment, ...] = ()
    in_reply_to: str = ""
    references: tuple[str, ...] = ()
    forwarded: bytes = b""  # a whole original mail, attached as message/rfc822 (Forward)
    forwarded_name: str = "forwarded.eml"


class InvalidMail(ValueError):
    """The mail cannot be sent as asked; str(exc) is one line fit for a chat message."""


def parse_addresses(text: str) -> tuple[str, ...]:
    """Split `a@x.org, B <b@y.de>; c@z.net` into validated addresses; InvalidMail names a bad one.

    Commas and semicolons separate addresses except inside a quoted display name. Control
    characters, bidi overrides and zero-width characters are refused anywhere, so what the
    user sees is what the envelope gets.
    """
    pieces = [piece for piece in _split_list(text) if piece.strip()]
    if not pieces:
        raise InvalidMail("no recipient address given")
    return tuple(str(_parse_one(piece)) for piece in pieces)


def make_message_id(sender: str) -> str:
    """A new `<uuid@domain>` Message-ID in the sender's domain (RFC 5322 §3.6.4)."""
    return f"<{uuid.uuid4().hex}@{_parse_one(sender).domain}>"


def reply_subject(subject: str) -> str:
    """`Re: subject`, keeping an existing reply prefix (Re:, AW:, Sv:, ...) as it is."""
    cleaned = clean_subject(subject)
    if not cleaned:
        return f"Re: {NO_SUBJECT}"
    if _REPLY_PREFIX.match(cleaned):
        return cleaned
    return f"Re: {cleaned}"


def forward_subject(subject: str) -> str:
    """`Fwd: subject`, never `Fwd: Fwd: ...`."""
    cleaned = clean_subject(subject) or NO_SUBJECT
    if re.match(r"^\s*(?:fwd?|wg|tr|rv|i)\s*:", cleaned, re.IGNORECASE):
        return cleaned
    return f"Fwd: {cleaned}"


def reply_references(references: Sequence[str], message_id: str) -> tuple[str, ...]:
    """References of a reply: the original's References then its Message-ID (RFC 5322 §3.6.4).

    Malformed ids are dropped, duplicates keep their first place, and a long list keeps the
    first id and the newest ones (at most MAX_REFERENCES).
    """
    ids = _clean_ids([*references, message_id])
    if len(ids) > MAX_REFERENCES:
        ids = [ids[0], *ids[-(MAX_REFERENCES - 1) :]]
    return tuple(ids)


def clean_subject(subject: str) -> str:
    """The subject on one line: line breaks and other control characters become spaces."""
    # RFC 5322 §2.2: a header field is one line; an unfolded CR/LF would start a new field.
    return re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+", " ", subject).strip()


def clean_filename(filename: str) -> str:
    """A safe attachment name: no folders, no control, bidi or zero-width characters."""
    name = "".join(ch for ch in filename if unicodedata.category(ch) not in _UNSAFE_CATEGORIES)
    name = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    return "attachment" if name in ("", ".", "..") else name


def build_message(
    mail: OutgoingMail, sender: str, *, message_id: str, date: datetime | None = None
) -> EmailMessage:
    """The EmailMessage for `mail` from `sender`; Bcc goes to the envelope only.

    Every address is re-validated (an OutgoingMail may be built from a received mail's
    Reply-To), so a header never names more recipients than envelope_recipients() returns.
    """
    if not (mail.to or mail.cc or mail.bcc):
        raise InvalidMail("no recipient address given")
    if not _MSG_ID.fullmatch(message_id):
        raise InvalidMail(f"malformed Message-ID {_show(message_id)}")
    msg = EmailMessage(policy=SMTP)
    msg["From"] = _parse_one(sender)
    _set_addresses(msg, "To", mail.to)
    _set_addresses(msg, "Cc", mail.cc)
    msg["Subject"] = clean_subject(mail.subject) or NO_SUBJECT
    msg["Date"] = date or datetime.now(UTC)
    msg["Message-ID"] = message_id
    in_reply_to = _clean_ids([mail.in_reply_to])
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to[0]
    references = _clean_ids(mail.references)
    if references:
        msg["References"] = " ".join(references)
    msg["MIME-Version"] = "1.0"
    msg.set_content(mail.body, subtype="plain", charset="utf-8", cte=_body_encoding(mail.body))
    for attachment in mail.attachments:
        maintype, subtype = _content_type(attachment).split("/", 1)
        msg.add_attachment(
            attachment.data,
            maintype=maintype,
            subtype=subtype,
            filename=clean_filename(attachment.filename),
        )
    if mail.forwarded:
        # The original travels whole, as a part of its own (RFC 2046 §5.2.1), with its own
        # attachments inside; 8bit because its body may be anything its sender chose.
        inner: EmailMessage = email.message_from_bytes(mail.forwarded, _class=EmailMessage)
        msg.add_attachment(inner, filename=clean_filename(mail.forwarded_name), cte="8bit")
    return msg


def envelope_recipients(mail: OutgoingMail) -> list[str]:
    """RCPT TO list: bare addresses of To, Cc and Bcc, each once, in that order."""
    seen: dict[str, None] = {}
    for text in (*mail.to, *mail.cc, *mail.bcc):
        seen.setdefault(_parse_one(text).addr_spec, None)
    return list(seen)


def _split_list(text: str) -> list[str]:
    """Split at `,` and `;` outside quotes and angle brackets."""
    pieces: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    angle = 0
    for ch in text:
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif not quoted and ch == "<":
            angle += 1
        elif not quoted and ch == ">":
            angle -= 1
        elif not quoted and angle == 0 and ch in ",;":
            pieces.append("".join(current))
            current = []
            continue
        current.append(ch)
    pieces.append("".join(current))
    return pieces


def _parse_one(text: str) -> Address:
    """Exactly one address, validated (syntax only, no DNS), or InvalidMail."""
    bad = [ch for ch in text if unicodedata.category(ch) in _UNSAFE_CATEGORIES]
    if bad:
        raise InvalidMail(
            f"address {_show(text)} contains a hidden or control character ({_show(bad[0])})"
        )
    match = _ONE_ADDRESS.fullmatch(text)
    if match is None:
        raise InvalidMail(f"{_show(text)} is not one email address")
    raw_addr = match["addr"] or match["bare"]
    name = (match["name"] or "").strip()
    if name.startswith('"'):
        name = re.sub(r"\\(.)", r"\1", name[1:-1])
    try:
        # Syntax only, no DNS: whether a dotless intranet name or an RFC 6761 *.test name is
        # deliverable is the relay's call (email-validator still refuses *.local, localhost).
        valid = validate_email(
            raw_addr,
            check_deliverability=False,
            globally_deliverable=False,
            test_environment=True,
            allow_smtputf8=False,
        )
    except EmailNotValidError as exc:
        raise InvalidMail(f"invalid address {_show(raw_addr)}: {exc}") from None
    # ascii_email: an internationalised domain in its IDNA (xn--) form for SMTP and headers.
    addr_spec = valid.ascii_email or valid.normalized
    try:
        return Address(display_name=name, addr_spec=addr_spec)
    except (ValueError, IndexError) as exc:
        raise InvalidMail(f"invalid address {_show(raw_addr)}: {exc}") from None


def _set_addresses(msg: EmailMessage, header: str, texts: Iterable[str]) -> None:
    addresses = tuple(_parse_one(text) for text in texts)
    if not addresses:
        return
    msg[header] = addresses
    # Belt and braces: the header as a reader parses it names exactly these mailboxes.
    parsed = [a.addr_spec for a in msg[header].addresses]
    if parsed != [a.addr_spec for a in addresses]:
        raise InvalidMail(f"the {header} addresses do not survive formatting")


def _clean_ids(values: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for value in values:
        for token in value.split():
            msg_id = token if token.startswith("<") else f"<{token}>"
            if _MSG_ID.fullmatch(msg_id):
                seen.setdefault(msg_id, None)
    return list(seen)


def _body_encoding(body: str) -> str | None:
    """Content-Transfer-Encoding for the text (None: 7bit, chosen by the email package).

    7bit only for short printable ASCII lines without trailing blanks (which transports may
    strip); quoted-printable for mostly-ASCII text and base64 otherwise. So no 8BITMIME is
    needed, and RFC 5322's 998-octet line limit holds for any line length.
    """
    if all(_PLAIN_LINE.fullmatch(line) for line in re.split(r"\r\n|\r|\n", body)):
        return None
    encoded = body.encode("utf-8")
    other = sum(byte > 0x7E or (byte < 0x20 and byte not in b"\t\r\n") for byte in encoded)
    # Quoted-printable stays readable for mostly-Latin text; base64 is smaller beyond ~1/4.
    return "quoted-printable" if other * 4 <= len(encoded) else "base64"


def _content_type(attachment: OutgoingAttachment) -> str:
    content_type = attachment.content_type.strip().lower()
    if not _CONTENT_TYPE.fullmatch(content_type):
        guessed, _ = mimetypes.guess_type(clean_filename(attachment.filename), strict=False)
        content_type = guessed or "application/octet-stream"
    # RFC 2046 §5: multipart and message parts must not be base64-encoded.
    if content_type.startswith(("multipart/", "message/")):
        return "application/octet-stream"
    return content_type


def _show(text: str, limit: int = 60) -> str:
    """Text for an error line: hidden characters as \\uXXXX, shortened."""
    shown = "".join(
        f"\\u{ord(ch):04x}" if unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch
        for ch in text
    )
    if len(shown) > limit:
        shown = shown[: limit - 1] + "…"
    return f"'{shown}'"
