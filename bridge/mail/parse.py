"""Raw mail bytes (and optional IMAP BODYSTRUCTURE) to a ParsedMail; pure, never raises."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from email.parser import BytesParser
from email.utils import getaddresses, parsedate_to_datetime

# inscriptis ships no py.typed; "unused-ignore" keeps this line valid if a mypy override is added.
from inscriptis import get_text  # type: ignore[import-untyped, unused-ignore]

from bridge.mail.decode import (
    decode_base64,
    decode_bytes,
    decode_header,
    decode_header_value,
    decode_params,
    fold,
    split_params,
    strip_controls,
)
from bridge.mail.structure import NESTED, is_attachment, structure_attachments

# decode_header_value lives in decode.py; callers import it from here too.
__all__ = ["Attachment", "ParsedMail", "decode_header_value", "parse_mail"]


@dataclass(frozen=True)
class Attachment:
    """One attachment: decoded name, lower-case type/subtype, decoded size in bytes."""

    filename: str
    content_type: str
    size: int


@dataclass
class ParsedMail:
    """What the bridge shows of one mail; `problems` lists what could not be decoded."""

    message_id: str = ""
    subject: str = ""
    from_name: str = ""
    from_addr: str = ""
    reply_to: list[str] = field(default_factory=list)
    to: list[str] = field(default_factory=list)
    cc: list[str] = field(default_factory=list)
    date: datetime | None = None
    in_reply_to: str = ""
    references: list[str] = field(default_factory=list)
    text: str = ""
    attachments: list[Attachment] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


_MAX_DEPTH = 40  # deeper MIME nesting is an attack or a loop, not a mail
_MSG_ID = re.compile(r"<[^<>]*>")
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([\w.:-]+)""", re.IGNORECASE)
_BOUNDARY_LINE = re.compile(rb"^--([^\s]{1,200}?)(--)?[ \t]*\r?$", re.MULTILINE)
_DEFECTS = {  # email.errors class name -> note; the rest are harmless or reported elsewhere
    "NoBoundaryInMultipartDefect": "multipart without a boundary",
    "StartBoundaryNotFoundDefect": "MIME boundary not found in the body",
    "CloseBoundaryNotFoundDefect": "mail ends early (closing MIME boundary missing)",
    "MissingHeaderBodySeparatorDefect": "malformed header block",
    "FirstHeaderLineIsContinuationDefect": "malformed header block",
    "MultipartInvariantViolationDefect": "broken multipart structure",
}


class _Ctx:
    """Problems found so far, and multiparts re-parsed after a missing boundary."""

    def __init__(self, prefix: bool, headers_only: bool = False) -> None:
        self.prefix = prefix  # raw may be only the first bytes of the mail
        self.problems: list[str] = []
        self.recovered: dict[int, Message | None] = {}
        self.headers_only = headers_only

    def note(self, text: str) -> None:
        if text not in self.problems:
            self.problems.append(text)


def _header(msg: Message | None, name: str) -> str | None:
    """The first raw header value (8-bit bytes surrogate-escaped), unfolded; None when absent."""
    for key, value in msg.raw_items() if msg is not None else ():
        if key.strip().lower() == name:
            return re.sub(r"\r?\n(?=[ \t])", "", str(value)).replace("\r", "").replace("\n", "")
    return None


def _params(msg: Message, ctx: _Ctx, *headers: str) -> dict[str, str]:
    """Decoded parameters of the given headers; earlier headers win."""
    result: dict[str, str] = {}
    for header in reversed(headers):
        result |= decode_params(split_params(_header(msg, header) or ""), ctx.note)
    return result


def _content_type(msg: Message) -> str:
    value = _header(msg, "content-type")
    if value is None:
        return msg.get_default_type()
    ctype = value.split(";", 1)[0].strip().lower()
    # RFC 2045 §5.2: an invalid Content-Type means text/plain, as the stdlib parser assumes.
    return ctype if re.fullmatch(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+", ctype) else "text/plain"


def _leaf_info(msg: Message, ctx: _Ctx) -> tuple[str, bool, str]:
    """(content type, is it an attachment, file name) of a part."""
    ctype = _content_type(msg)
    params = _params(msg, ctx, "content-disposition", "content-type")
    disposition = (_header(msg, "content-disposition") or "").split(";", 1)[0].strip().lower()
    name = params.get("filename") or params.get("name", "")
    return ctype, is_attachment(ctype, disposition, params), name


def _payload(msg: Message, decode: bool) -> bytes | str:
    try:
        payload = msg.get_payload(decode=True) if decode else msg.get_payload()
    except Exception:  # the stdlib re-decodes stray 8-bit bytes with the charset label
        return b""
    return payload if isinstance(payload, (bytes, str)) else b""


def _children(msg: Message, ctx: _Ctx) -> list[Message]:
    """Sub-parts; a multipart whose boundary is missing is re-parsed with a guessed one."""
    # Only a multipart's payload is safe to read raw: compat32 re-decodes a str payload with
    # 8-bit bytes using the charset label and lets codec errors (charset=idna) escape.
    if msg.is_multipart() and isinstance(payload := msg.get_payload(), list):
        return [part for part in payload if isinstance(part, Message)]
    if ctx.headers_only or not _content_type(msg).startswith("multipart/"):
        return []
    if id(msg) not in ctx.recovered:
        ctx.recovered[id(msg)] = None
        body = _payload(msg, True)
        body = body if isinstance(body, bytes) else b""
        if found := _BOUNDARY_LINE.search(body):
            head = b'Content-Type: multipart/mixed; boundary="' + found.group(1) + b'"\r\n\r\n'
            try:
                ctx.recovered[id(msg)] = BytesParser().parsebytes(head + body)
            except RecursionError:
                ctx.note("MIME parts nested too deeply")
    fixed = ctx.recovered[id(msg)]
    return _children(fixed, ctx) if fixed is not None else []


def _part_bytes(msg: Message, ctx: _Ctx) -> bytes:
    """The decoded body of a leaf part (base64 and quoted-printable undone, tolerantly)."""
    cte = (_header(msg, "content-transfer-encoding") or "").strip().lower()
    if cte != "base64":
        payload = _payload(msg, True)
        return payload if isinstance(payload, bytes) else b""
    # The undecoded payload: stray 8-bit bytes come back as U+FFFD and are skipped as non-base64.
    payload = _payload(msg, False)
    data, clean = decode_base64(
        payload.encode("ascii", "ignore") if isinstance(payload, str) else b""
    )
    if not clean:
        ctx.note("a base64 part is damaged or incomplete")
    return data


def _html_to_text(markup: str) -> str:
    # lxml refuses NUL and most C0 controls; inscriptis hides <script>/<style> (display: none).
    markup = strip_controls(markup.replace("\r", "\n")).replace("\x00", "")
    try:
        return str(get_text(markup))
    except Exception:  # lxml can fail on hostile markup: a crude tag strip beats no text
        markup = re.sub(r"(?is)<(script|style)\b.*?</\1\s*>", "", markup)
        return html.unescape(re.sub(r"<[^>]*>", " ", markup))


def _unflow(text: str, delsp: bool) -> str:
    """RFC 3676 format=flowed: join soft line breaks (lines ending in a space)."""
    out: list[str] = []
    joining = False
    for line in text.split("\n"):
        line = line[1:] if line.startswith(" ") else line  # space-stuffing
        if joining:
            out[-1] += line
        else:
            out.append(line)
        joining = line.endswith(" ") and line != "-- "
        if joining and delsp:
            out[-1] = out[-1][:-1]
    return "\n".join(out)


def _leaf_text(msg: Message, ctype: str, ctx: _Ctx, limit: int) -> str:
    params = _params(msg, ctx, "content-type")
    # Only the start is shown: 8 bytes per character covers every charset, inscriptis needs more.
    data = _part_bytes(msg, ctx)
    cut = max(limit * 20, 200_000) if ctype == "text/html" else limit * 8
    partial, data = ctx.prefix or len(data) > cut, data[:cut]
    charset = params.get("charset")
    if ctype == "text/html" and not charset and (meta := _META_CHARSET.search(data[:4096])):
        charset = meta.group(1).decode("ascii", "replace")
    text = decode_bytes(data, charset, ctx.note, partial=partial)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if ctype == "text/html":
        return _html_to_text(text)
    if params.get("format", "").lower() == "flowed":
        text = _unflow(text, params.get("delsp", "").lower() == "yes")
    return strip_controls(text)


def _segments(msg: Message, ctx: _Ctx, depth: int, limit: int) -> list[str]:
    """Readable text pieces of a part: text/plain preferred, HTML only as an alternative."""
    if depth > _MAX_DEPTH:
        ctx.note("MIME parts nested too deeply")
        return []
    ctype, attached, _ = _leaf_info(msg, ctx)
    kids = _children(msg, ctx) if ctype.startswith("multipart/") else []
    if ctype == "multipart/alternative" and kids:
        options = [(k, _segments(k, ctx, depth + 1, limit)) for k in kids]
        options = [(k, s) for k, s in options if "".join(s).strip()]
        plain = [s for k, s in options if _content_type(k) == "text/plain"]
        return plain[0] if plain else (options[0][1] if options else [])
    if kids:
        out: list[str] = []
        for kid in kids:
            out.extend(_segments(kid, ctx, depth + 1, limit))
            if sum(map(len, out)) >= limit:
                break  # enough text for the preview; the rest is not read
        return out
    if ctype.startswith("multipart/") and not msg.is_multipart():
        ctype = "text/plain"  # an unrecoverable multipart: its raw body is all we have
    elif ctype not in ("text/plain", "text/html") or attached:
        return []
    return [_leaf_text(msg, ctype, ctx, limit)]


def _nested(msg: Message) -> Message | None:
    payload = msg.get_payload() if msg.is_multipart() else None
    first = payload[0] if isinstance(payload, list) and payload else None
    return first if isinstance(first, Message) else None


def _body_text(msg: Message, ctx: _Ctx, depth: int, limit: int) -> str:
    pieces = (s.rstrip().lstrip("\n") for s in _segments(msg, ctx, depth, limit))
    if (text := "\n\n".join(s for s in pieces if s)) or depth > _MAX_DEPTH:
        return text
    # A forwarded mail with no text of its own: show the forwarded mail's text.
    for part in _walk(msg, ctx, depth):
        inner = _nested(part) if _content_type(part) in NESTED else None
        if inner is not None and (text := _body_text(inner, ctx, depth + 1, limit)):
            return text
    return ""


def _walk(msg: Message, ctx: _Ctx, depth: int = 0) -> list[Message]:
    """Every part from `msg` down (depth-first), not descending into nested mails."""
    parts = [msg]
    if depth < _MAX_DEPTH and not _content_type(msg).startswith("message/"):
        for kid in _children(msg, ctx):
            parts.extend(_walk(kid, ctx, depth + 1))
    return parts


def _raw_attachments(msg: Message, ctx: _Ctx) -> list[Attachment]:
    found = []
    for part in _walk(msg, ctx):
        ctype, attached, name = _leaf_info(part, ctx)
        if ctype in NESTED:
            inner = _nested(part)
            try:
                size = len(inner.as_bytes()) if inner is not None else 0
            except Exception:  # re-serialising a broken nested mail; the size is only a hint
                size = 0
            name = (
                name or fold(decode_header(_header(inner, "subject"), ctx.note)) or "message.eml"
            )
            found.append(Attachment(name, ctype, size))
        elif attached and not ctype.startswith("multipart/"):
            found.append(Attachment(name, ctype, len(_part_bytes(part, ctx))))
    return found


def _addresses(msg: Message, header: str, ctx: _Ctx) -> list[tuple[str, str]]:
    """(decoded name, address) pairs; parsed before decoding so encoded commas stay in names."""
    pairs = getaddresses([value]) if (value := _header(msg, header)) else []
    decoded = [
        (fold(decode_header(n, ctx.note)), fold(decode_header(a, ctx.note))) for n, a in pairs
    ]
    return [(name, addr) for name, addr in decoded if name or addr]


def _first_id(value: str) -> str:
    found = _MSG_ID.search(text := fold(value))
    return found.group(0).replace(" ", "") if found else text


def _fill_headers(msg: Message, mail: ParsedMail, ctx: _Ctx) -> None:
    def decoded(name: str) -> str:
        return decode_header(_header(msg, name), ctx.note)

    mail.message_id = _first_id(decoded("message-id"))
    mail.subject = fold(decoded("subject"))
    if senders := _addresses(msg, "from", ctx):
        if "@" in senders[0][1]:
            mail.from_name, mail.from_addr = senders[0]
        else:
            mail.from_name = fold(decoded("from"))
            ctx.note("the sender has no valid address")
    mail.reply_to = [a for _, a in _addresses(msg, "reply-to", ctx) if "@" in a]
    mail.to, mail.cc = (
        [f"{n} <{a}>" if n and a and n != a else a or n for n, a in _addresses(msg, h, ctx)]
        for h in ("to", "cc")
    )
    if date_text := decoded("date").strip():
        try:
            mail.date = parsedate_to_datetime(date_text)
        except (TypeError, ValueError, IndexError, OverflowError):
            ctx.note("the Date header cannot be read")
        # RFC 5322 §3.3: "-0000" means the offset is unknown; the time is still UTC.
        if mail.date is not None and mail.date.tzinfo is None:
            mail.date = mail.date.replace(tzinfo=UTC)
    mail.in_reply_to = _first_id(decoded("in-reply-to"))
    mail.references = [r.replace(" ", "") for r in _MSG_ID.findall(fold(decoded("references")))]


def _parse(raw: bytes, structure: object | None, limit: int, ctx: _Ctx) -> ParsedMail:
    mail = ParsedMail(problems=ctx.problems)
    msg = BytesParser().parsebytes(raw, headersonly=ctx.headers_only)
    if not raw.strip():
        ctx.note("the mail is empty")
    elif not msg.keys():
        ctx.note("the mail has no headers")
    use_structure = isinstance(structure, (tuple, list)) and len(structure) >= 2
    if structure is not None and not use_structure:
        ctx.note("the IMAP BODYSTRUCTURE could not be read")
    for step in ("headers", "text", "attachments"):
        try:
            if step == "headers":
                _fill_headers(msg, mail, ctx)
            elif step == "text":
                mail.text = _body_text(msg, ctx, 0, limit)[:limit]
            elif use_structure:
                found = structure_attachments(structure, ctx.note, _MAX_DEPTH)
                mail.attachments = [Attachment(*info) for info in found]
            else:
                mail.attachments = _raw_attachments(msg, ctx)
        except RecursionError:
            ctx.note("MIME parts nested too deeply")
        except Exception as exc:  # STYLE 7.5: a malformed mail is a note, not an exception
            ctx.note(f"part of the mail could not be read ({type(exc).__name__})")
    for part in _walk(msg, ctx):
        for defect in part.defects:
            note = _DEFECTS.get(type(defect).__name__)
            # With a BODYSTRUCTURE the raw bytes are a deliberate prefix: a missing end is normal.
            if note and not (use_structure and "CloseBoundary" in type(defect).__name__):
                ctx.note(note)
    return mail


def parse_mail(
    raw: bytes, *, structure: object | None = None, text_limit: int = 20_000
) -> ParsedMail:
    """Parse a mail (or only its first bytes) into a ParsedMail; never raises."""
    if not isinstance(raw, bytes):
        raw = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else b""
    ctx = _Ctx(prefix=structure is not None)
    try:
        return _parse(raw, structure, max(text_limit, 0), ctx)
    except Exception as exc:  # e.g. RecursionError in the stdlib parser on absurd nesting
        problem = f"the mail's MIME structure could not be parsed ({type(exc).__name__})"
    # Second chance: headers and the undecoded body are still worth showing.
    ctx = _Ctx(prefix=structure is not None, headers_only=True)
    ctx.note(problem)
    try:
        return _parse(raw, structure, max(text_limit, 0), ctx)
    except Exception as exc:  # STYLE 7.5: callers always get a ParsedMail
        ctx.note(f"the mail could not be parsed ({type(exc).__name__})")
        return ParsedMail(problems=ctx.problems)
