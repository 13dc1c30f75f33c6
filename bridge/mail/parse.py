"""Raw mail bytes (and optional IMAP BODYSTRUCTURE) to a ParsedMail; pure, never raises."""

from __future__ import annotations

import base64
import binascii
import codecs
import html
import quopri
import re
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes
from email.message import Message
from email.utils import getaddresses, parsedate_to_datetime

# inscriptis ships no py.typed; "unused-ignore" keeps this line valid if a mypy override is added.
from inscriptis import get_text  # type: ignore[import-untyped, unused-ignore]


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


# Deeper nesting than this is an attack or a loop, not a mail.
_MAX_DEPTH = 40
# RFC 2047 encoded word; the text is matched lazily so sloppy words (spaces inside) still decode.
_ENCODED_WORD = re.compile(r"=\?([^?\s]*)\?([qQbB])\?(.*?)\?=")
_MSG_ID = re.compile(r"<[^<>]*>")
_PARAM = re.compile(r';\s*([^\s=;"]+)\s*=\s*("(?:[^"\\]|\\.)*"?|[^;]*)')
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([\w.:-]+)""", re.IGNORECASE)
_BOUNDARY_LINE = re.compile(r"^--([^\s]{1,200}?)(--)?[ \t]*\r?$", re.MULTILINE)
# Mailers label GB18030 text as GB2312/GBK, Big5-HKSCS as Big5, and so on (WHATWG Encoding).
_SUPERSETS = {
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "gb18030": "gb18030",
    "big5": "big5hkscs",
    "euc_kr": "cp949",
    "ascii": "cp1252",
    "latin_1": "cp1252",
    "iso8859-1": "cp1252",
}
# Labels under which UTF-8 bytes often travel; valid UTF-8 there is almost never a coincidence.
_WESTERN = {"ascii", "latin_1", "iso8859-1", "cp1252", "iso8859-15"}
_NO_LABEL = {"", "unknown-8bit", "x-unknown", "unknown", "x-user-defined", "default"}
_DEFECTS = {
    "NoBoundaryInMultipartDefect": "multipart without a boundary",
    "StartBoundaryNotFoundDefect": "MIME boundary not found in the body",
    "CloseBoundaryNotFoundDefect": "mail ends early (closing MIME boundary missing)",
    "MissingHeaderBodySeparatorDefect": "malformed header block",
    "FirstHeaderLineIsContinuationDefect": "malformed header block",
    "MisplacedEnvelopeHeaderDefect": "malformed header block",
    "MultipartInvariantViolationDefect": "broken multipart structure",
    "InvalidMultipartContentTransferEncodingDefect": "broken multipart structure",
}


class _Ctx:
    """Problems found so far and multiparts re-parsed after a missing boundary."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.recovered: dict[int, Message | None] = {}

    def note(self, text: str) -> None:
        if text not in self.problems:
            self.problems.append(text)


def _to_bytes(value: str) -> bytes:
    """Undo the parser's surrogateescape so raw 8-bit bytes can be decoded properly."""
    return value.encode("utf-8", "surrogateescape")


def _codec(label: str) -> str | None:
    try:
        name = codecs.lookup(label).name
    except (LookupError, ValueError):
        return None
    return _SUPERSETS.get(name, name)


def _try(data: bytes, codec: str) -> str | None:
    # final=False keeps a multi-byte character cut by a truncated fetch from failing everything.
    try:
        return codecs.getincrementaldecoder(codec)("strict").decode(data, final=False)
    except (UnicodeError, LookupError, ValueError):
        return None


def decode_bytes(
    data: bytes, charset: str | None, ctx: _Ctx | None = None, what: str = "text"
) -> str:
    """Decode bytes labelled `charset`: the label, then UTF-8, then windows-1252 lossily."""
    label = (charset or "").strip().strip("\"'").lower()
    codec = _codec(label) if label not in _NO_LABEL else None
    if label not in _NO_LABEL and codec is None and ctx is not None:
        ctx.note(f"unknown charset {label[:40]!r} in {what}")
    if data.isascii() and (codec is None or codec in _WESTERN or codec in _SUPERSETS.values()):
        return data.decode("ascii")
    if codec in _WESTERN or codec == "cp1252":
        text = _try(data, "utf-8")
        if text is not None:
            if ctx is not None and label not in ("", "utf-8"):
                ctx.note(f"{what} labelled {label[:40]!r} is really UTF-8")
            return text
    if codec is not None and (text := _try(data, codec)) is not None:
        return text
    if ctx is not None and codec is not None:
        ctx.note(f"{what} is not valid {label[:40]}")
    if label in _NO_LABEL and ctx is not None and not data.isascii():
        ctx.note(f"{what} has 8-bit characters without a charset")
    for fallback in ("utf-8", "cp1252"):
        if fallback != codec and (text := _try(data, fallback)) is not None:
            return text
    return data.decode("cp1252", errors="replace")


def _b64decode(data: bytes) -> tuple[bytes, bool]:
    """Decode as much base64 as there is; the flag says whether the data was clean."""
    clean = True
    out = bytearray()
    # Padding may appear mid-stream when mailers concatenate encoded chunks: decode each chunk.
    for chunk in re.split(rb"=+", data):
        alpha = re.sub(rb"[^A-Za-z0-9+/]", b"", chunk)
        if len(alpha) != len(re.sub(rb"\s", b"", chunk)):
            clean = False
        if len(alpha) % 4 == 1:
            alpha, clean = alpha[:-1], False
        try:
            out += base64.b64decode(alpha + b"=" * (-len(alpha) % 4))
        except (binascii.Error, ValueError):
            clean = False
    return bytes(out), clean


def _decode_words(text: str, ctx: _Ctx | None) -> str:
    """Replace every RFC 2047 encoded word; adjacent words are joined without their whitespace."""
    pieces: list[tuple[str | None, bytes | str]] = []  # (charset or None for plain text, data)
    pos = 0
    for m in _ENCODED_WORD.finditer(text):
        between = text[pos : m.start()]
        pos = m.end()
        # RFC 2047 §6.2: whitespace between adjacent encoded words is not displayed.
        if between and not (between.isspace() and pieces and pieces[-1][0] is not None):
            pieces.append((None, between))
        charset = m.group(1).split("*", 1)[0].lower()  # RFC 2231 §5: charset*language
        payload = m.group(3).encode("utf-8", "replace")
        if m.group(2) in "bB":
            data, ok = _b64decode(payload)
            if not ok and ctx is not None:
                ctx.note("damaged base64 encoded word in a header")
        else:
            data = quopri.decodestring(payload.replace(b"_", b" "))
        # Mailers split one multi-byte character across words: join same-charset bytes first.
        if pieces and pieces[-1][0] == charset and isinstance(prev := pieces[-1][1], bytes):
            pieces[-1] = (charset, prev + data)
        else:
            pieces.append((charset, data))
    if pos < len(text):
        pieces.append((None, text[pos:]))
    return "".join(
        decode_bytes(chunk, charset or "utf-8", ctx, "a header")
        if isinstance(chunk, bytes)
        else chunk
        for charset, chunk in pieces
    )


def _decode_header(value: str | bytes | None, ctx: _Ctx | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        if not any("\udc80" <= ch <= "\udcff" for ch in value):
            return _decode_words(_unfold(value), ctx)
        value = _to_bytes(value)
    text = _try(value, "utf-8")
    if text is None:
        if ctx is not None:
            ctx.note("a header has 8-bit characters that are not UTF-8")
        text = value.decode("cp1252", errors="replace")
    return _decode_words(_unfold(text), ctx)


def decode_header_value(value: str | bytes | None) -> str:
    """Decode a header value: every RFC 2047 word, raw 8-bit bytes, any charset; never raises."""
    try:
        return _decode_header(value, None)
    except Exception:  # a display helper must not fail on hostile input
        return value.decode("latin-1") if isinstance(value, bytes) else str(value or "")


def _unfold(value: str) -> str:
    # RFC 5322 §2.2.3: unfolding removes the CRLF before the folding whitespace.
    return re.sub(r"\r?\n(?=[ \t])", "", value).replace("\r", "").replace("\n", "")


def _fold(text: str) -> str:
    return " ".join(text.split())


def _header(msg: Message, name: str) -> str | None:
    """The first raw header value (surrogateescaped str), unfolded; None when absent."""
    for key, value in msg.raw_items():
        if key.strip().lower() == name:
            return _unfold(value if isinstance(value, str) else str(value))
    return None


def _split_params(value: str) -> list[tuple[str, str]]:
    pairs = []
    for m in _PARAM.finditer(value):
        raw = m.group(2).strip()
        if raw.startswith('"'):
            raw = re.sub(
                r"\\(.)", r"\1", raw[1:-1] if raw.endswith('"') and len(raw) > 1 else raw[1:]
            )
        pairs.append((m.group(1), raw))
    return pairs


def _decode_params(pairs: list[tuple[str, str | bytes]], ctx: _Ctx | None) -> dict[str, str]:
    """Parameters by lower-case name, RFC 2231 (charset, continuations) and RFC 2047 decoded."""
    plain: dict[str, str | bytes] = {}
    pieces: dict[str, list[tuple[int, str | bytes, bool]]] = {}
    for name, value in pairs:
        m = re.fullmatch(r"([^*]+)(?:\*(\d{1,4}))?(\*)?", name.strip().lower())
        if not m:
            continue
        base, num, star = m.groups()
        if num is None and not star:
            plain.setdefault(base, value)
        else:
            pieces.setdefault(base, []).append((int(num or 0), value, bool(star)))
    result = {key: _decode_header(value, ctx) for key, value in plain.items()}
    for base, segments in pieces.items():
        charset, buf = "", bytearray()
        for i, (_, value, encoded) in enumerate(sorted(segments, key=lambda s: s[0])):
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            if not encoded:
                buf += _to_bytes(text)
                continue
            if i == 0 and text.count("'") >= 2:
                charset, _language, text = text.split("'", 2)
            buf += urllib.parse.unquote_to_bytes(text.encode("latin-1", "replace"))
        # RFC 2231 values win over the plain fallback that mailers add for old readers.
        result[base] = _decode_words(
            decode_bytes(bytes(buf), charset or "utf-8", ctx, "a name"), ctx
        )
    return result


def _params(msg: Message, header: str, ctx: _Ctx) -> dict[str, str]:
    value = _header(msg, header)
    return _decode_params(list(_split_params(value)), ctx) if value else {}


def _content_type(msg: Message) -> str:
    value = _header(msg, "content-type")
    if value is None:
        return msg.get_default_type()
    ctype = value.split(";", 1)[0].strip().lower()
    # RFC 2045 §5.2: an invalid Content-Type means text/plain, as the stdlib parser assumes.
    return ctype if re.fullmatch(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+", ctype) else "text/plain"


def _disposition(msg: Message) -> str:
    return (_header(msg, "content-disposition") or "").split(";", 1)[0].strip().lower()


def _is_attachment(ctype: str, disposition: str, params: dict[str, str]) -> bool:
    if disposition == "attachment" or params.get("filename") or params.get("name"):
        return True
    return not ctype.startswith(("text/", "multipart/"))


def _filename(msg: Message, ctx: _Ctx) -> str:
    name = _params(msg, "content-disposition", ctx).get("filename") or _params(
        msg, "content-type", ctx
    ).get("name", "")
    return _fold(name)


def _children(msg: Message, ctx: _Ctx) -> list[Message]:
    """Sub-parts; a multipart whose boundary is missing is re-parsed with a guessed one."""
    if msg.is_multipart():
        payload = msg.get_payload()
        return [p for p in payload if isinstance(p, Message)] if isinstance(payload, list) else []
    if not _content_type(msg).startswith("multipart/"):
        return []
    if id(msg) not in ctx.recovered:
        ctx.recovered[id(msg)] = None
        body = msg.get_payload(decode=True)
        found = _BOUNDARY_LINE.search(_to_bytes_lossy(body).decode("latin-1"))
        if found:
            head = f'Content-Type: multipart/mixed; boundary="{found.group(1)}"\r\n\r\n'
            ctx.recovered[id(msg)] = message_from_bytes(
                head.encode("latin-1") + _to_bytes_lossy(body)
            )
    fixed = ctx.recovered[id(msg)]
    return _children(fixed, ctx) if fixed is not None else []


def _to_bytes_lossy(payload: object) -> bytes:
    return payload if isinstance(payload, bytes) else b""


def _part_bytes(msg: Message, ctx: _Ctx) -> bytes:
    """The decoded body of a leaf part (base64 and quoted-printable undone, tolerantly)."""
    cte = (_header(msg, "content-transfer-encoding") or "").strip().lower()
    if cte == "base64":
        # get_payload(decode=False) turns stray 8-bit bytes into U+FFFD, dropped as non-base64.
        payload = msg.get_payload()
        data, clean = _b64decode(
            payload.encode("ascii", "ignore") if isinstance(payload, str) else b""
        )
        if not clean:
            ctx.note("a base64 part is damaged or incomplete")
        return data
    return _to_bytes_lossy(msg.get_payload(decode=True))


def _html_to_text(markup: str) -> str:
    # lxml refuses NUL and most C0 controls; inscriptis hides <script>/<style> (display: none).
    markup = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]", "", markup)
    try:
        return str(get_text(markup))
    except Exception:  # lxml can fail on hostile markup; fall back to a crude tag strip
        return html.unescape(
            re.sub(r"<[^>]*>", " ", re.sub(r"(?is)<(script|style).*?</\1>", "", markup))
        )


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
    params = _params(msg, "content-type", ctx)
    data = _part_bytes(msg, ctx)
    charset = params.get("charset")
    if ctype == "text/html":
        data = data[: max(limit * 20, 200_000)]  # inscriptis cost grows with the markup
        if not charset and (meta := _META_CHARSET.search(data[:4096])):
            charset = meta.group(1).decode("ascii", "replace")
    text = decode_bytes(data, charset, ctx).replace("\r\n", "\n").replace("\r", "\n")
    if ctype == "text/html":
        return _html_to_text(text)
    if params.get("format", "").lower() == "flowed":
        text = _unflow(text, params.get("delsp", "").lower() == "yes")
    return text


def _segments(msg: Message, ctx: _Ctx, depth: int, limit: int) -> list[str]:
    """Readable text pieces of a part: text/plain preferred, HTML only as an alternative."""
    if depth > _MAX_DEPTH:
        ctx.note("MIME parts nested too deeply")
        return []
    ctype = _content_type(msg)
    if ctype.startswith("message/"):
        return []
    if ctype.startswith("multipart/"):
        kids = _children(msg, ctx)
        if not kids and not msg.is_multipart():
            ctype = "text/plain"  # unrecoverable multipart: its raw body is the best text we have
        elif ctype == "multipart/alternative":
            options = [(k, _segments(k, ctx, depth + 1, limit)) for k in kids]
            options = [(k, s) for k, s in options if "".join(s).strip()]
            plain = [s for k, s in options if _content_type(k) == "text/plain"]
            return plain[0] if plain else (options[0][1] if options else [])
        else:
            out: list[str] = []
            for kid in kids:
                if sum(map(len, out)) < limit:
                    out.extend(_segments(kid, ctx, depth + 1, limit))
            return out
    if ctype not in ("text/plain", "text/html"):
        return []
    if _is_attachment(
        ctype,
        _disposition(msg),
        _params(msg, "content-type", ctx) | _params(msg, "content-disposition", ctx),
    ):
        return []
    return [_leaf_text(msg, ctype, ctx, limit)]


def _nested(msg: Message) -> Message | None:
    payload = msg.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        return payload[0]
    return None


def _body_text(msg: Message, ctx: _Ctx, depth: int, limit: int) -> str:
    text = "\n\n".join(s.strip("\n") for s in _segments(msg, ctx, depth, limit) if s.strip())
    if text or depth > _MAX_DEPTH:
        return text
    # A forwarded mail with no text of its own: show the forwarded mail's text.
    for part in _walk(msg, ctx, depth):
        if _content_type(part) in ("message/rfc822", "message/global"):
            inner = _nested(part)
            if inner is not None and (text := _body_text(inner, ctx, depth + 1, limit)):
                return text
    return ""


def _walk(msg: Message, ctx: _Ctx, depth: int = 0) -> list[Message]:
    """Every part below `msg` (depth-first), not descending into nested mails."""
    if depth > _MAX_DEPTH:
        return []
    parts = [msg]
    if not _content_type(msg).startswith("message/"):
        for kid in _children(msg, ctx):
            parts.extend(_walk(kid, ctx, depth + 1))
    return parts


def _raw_attachments(msg: Message, ctx: _Ctx) -> list[Attachment]:
    found = []
    for part in _walk(msg, ctx):
        ctype = _content_type(part)
        if ctype.startswith("multipart/"):
            continue
        params = _params(part, "content-type", ctx) | _params(part, "content-disposition", ctx)
        if ctype in ("message/rfc822", "message/global"):
            inner = _nested(part)
            subject = _fold(_decode_header(_header(inner, "subject"), ctx)) if inner else ""
            try:
                size = len(inner.as_bytes()) if inner is not None else 0
            except Exception:  # re-serialising a broken nested mail; the size is only a hint
                size = 0
            found.append(Attachment(_filename(part, ctx) or subject or "message.eml", ctype, size))
        elif _is_attachment(ctype, _disposition(part), params):
            found.append(Attachment(_filename(part, ctx), ctype, len(_part_bytes(part, ctx))))
    return found


def _atom(value: object) -> str:
    """A BODYSTRUCTURE string (bytes, str or NIL) as text; 8-bit bytes kept for later decoding."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value if isinstance(value, str) else ""


def _number(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return max(value, 0)
    digits = _atom(value).strip()
    return int(digits) if digits.isdigit() and len(digits) < 19 else 0


def _bs_params(value: object, ctx: _Ctx) -> dict[str, str]:
    # RFC 3501 §7.4.2: parameters come undecoded, as a flat (name value name value ...) list.
    if not isinstance(value, (tuple, list)):
        return {}
    items = [_atom(v) for v in value]
    return _decode_params(list(zip(items[::2], items[1::2], strict=False)), ctx)


def _bs_children(node: tuple[object, ...] | list[object]) -> list[object] | None:
    """Child parts of a multipart BODYSTRUCTURE node, None for a leaf."""
    if isinstance(node[0], list):  # imapclient's BodyData.create nests children in a list
        return list(node[0])
    if isinstance(node[0], (tuple, list)):  # nested structures of message/rfc822 are raw tuples
        return [n for n in node if isinstance(n, (tuple, list))]
    return None


def _bs_attachments(node: object, ctx: _Ctx, depth: int, out: list[Attachment]) -> None:
    """Collect attachments from an IMAP BODYSTRUCTURE (complete even when raw is truncated)."""
    if depth > _MAX_DEPTH or not isinstance(node, (tuple, list)) or len(node) < 2:
        return
    kids = _bs_children(node)
    if kids is not None:
        for kid in kids:
            _bs_attachments(kid, ctx, depth + 1, out)
        return
    fields = list(node) + [None] * 12
    ctype = f"{_atom(fields[0])}/{_atom(fields[1])}".lower()
    params = _bs_params(fields[2], ctx)
    size = _number(fields[6])
    if _atom(fields[5]).lower() == "base64":
        size = size * 3 // 4
    is_message = ctype in ("message/rfc822", "message/global") and isinstance(fields[8], tuple)
    # Extension data follows the type-specific fields: lines for text/*, envelope+body+lines
    # for message/rfc822 (RFC 3501 §7.4.2), then md5 and disposition.
    disposition_at = 11 if is_message else 9 if isinstance(fields[7], int) else 8
    disposition = fields[disposition_at]
    kind = ""
    if isinstance(disposition, (tuple, list)) and disposition:
        kind = _atom(disposition[0]).lower()
        params = _bs_params(disposition[1] if len(disposition) > 1 else None, ctx) | params
    if is_message:
        envelope = fields[7]
        subject = ""
        if isinstance(envelope, (tuple, list)) and len(envelope) > 1:
            subject = _fold(_decode_header(_atom(envelope[1]), ctx))
        name = params.get("filename") or params.get("name") or subject or "message.eml"
        out.append(Attachment(_fold(name), ctype, size))
    elif _is_attachment(ctype, kind, params):
        out.append(
            Attachment(_fold(params.get("filename") or params.get("name", "")), ctype, size)
        )


def _addresses(value: str | None, ctx: _Ctx) -> list[tuple[str, str]]:
    """(decoded name, address) pairs; parsed before decoding so encoded commas stay in names."""
    if not value:
        return []
    pairs = []
    for name, addr in getaddresses([value]):
        name, addr = _fold(_decode_header(name, ctx)), _fold(_decode_header(addr, ctx))
        if name or addr:
            pairs.append((name, addr))
    return pairs


def _format_address(name: str, addr: str) -> str:
    return f"{name} <{addr}>" if name and addr and name != addr else addr or name


def _parse_date(value: str | None, ctx: _Ctx) -> datetime | None:
    if not value or not value.strip():
        return None
    try:
        date = parsedate_to_datetime(_decode_header(value, None))
    except (TypeError, ValueError, IndexError, OverflowError):
        ctx.note("the Date header cannot be read")
        return None
    # RFC 5322 §3.3: "-0000" means the offset is unknown; the time is still UTC.
    return date if date.tzinfo is not None else date.replace(tzinfo=UTC)


def _first_id(value: str | None) -> str:
    text = _fold(value or "")
    found = _MSG_ID.search(text)
    return found.group(0).replace(" ", "") if found else text


def _fill_headers(msg: Message, mail: ParsedMail, ctx: _Ctx) -> None:
    mail.message_id = _first_id(_decode_header(_header(msg, "message-id"), ctx))
    mail.subject = _fold(_decode_header(_header(msg, "subject"), ctx))
    senders = _addresses(_header(msg, "from"), ctx)
    if senders:
        name, addr = senders[0]
        if "@" in addr:
            mail.from_name, mail.from_addr = name, addr
        else:
            mail.from_name = _fold(_decode_header(_header(msg, "from"), ctx))
            ctx.note("the sender has no valid address")
    mail.reply_to = [a for _, a in _addresses(_header(msg, "reply-to"), ctx) if "@" in a]
    mail.to = [_format_address(n, a) for n, a in _addresses(_header(msg, "to"), ctx)]
    mail.cc = [_format_address(n, a) for n, a in _addresses(_header(msg, "cc"), ctx)]
    mail.date = _parse_date(_header(msg, "date"), ctx)
    mail.in_reply_to = _first_id(_decode_header(_header(msg, "in-reply-to"), ctx))
    references = _fold(_decode_header(_header(msg, "references"), ctx))
    mail.references = [r.replace(" ", "") for r in _MSG_ID.findall(references)]


def _parse(raw: bytes, structure: object | None, text_limit: int, ctx: _Ctx) -> ParsedMail:
    mail = ParsedMail(problems=ctx.problems)
    msg = message_from_bytes(raw)
    if not raw.strip():
        ctx.note("the mail is empty")
    elif not any(True for _ in msg.raw_items()):
        ctx.note("the mail has no headers")
    use_structure = isinstance(structure, (tuple, list)) and len(structure) >= 2
    if structure is not None and not use_structure:
        ctx.note("the IMAP BODYSTRUCTURE could not be read")
    for step in ("headers", "text", "attachments"):
        try:
            if step == "headers":
                _fill_headers(msg, mail, ctx)
            elif step == "text":
                mail.text = _body_text(msg, ctx, 0, text_limit)[:text_limit]
            elif use_structure:
                _bs_attachments(structure, ctx, 0, mail.attachments)
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
    """Parse a mail (or its first bytes) into a ParsedMail; never raises, notes problems instead."""
    ctx = _Ctx()
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    elif isinstance(raw, (bytearray, memoryview)):
        raw = bytes(raw)
    elif not isinstance(raw, bytes):
        raw = b""
    try:
        return _parse(raw, structure, max(text_limit, 0), ctx)
    except Exception as exc:  # STYLE 7.5: callers always get a ParsedMail
        ctx.note(f"the mail could not be parsed ({type(exc).__name__})")
        return ParsedMail(problems=ctx.problems)
