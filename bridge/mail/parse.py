"""Raw mail bytes (and optional IMAP BODYSTRUCTURE) to a ParsedMail; pure, never raises."""

from __future__ import annotations

import base64
import binascii
import codecs
import html
import quopri
import re
import string
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from email.parser import BytesParser
from email.utils import getaddresses, parsedate_to_datetime
from itertools import takewhile

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


_MAX_DEPTH = 40  # deeper MIME nesting is an attack or a loop, not a mail
_MAX_HEADER = 32_768  # longer header values are cut before decoding (regex cost, no reader)
# RFC 2047 encoded word; the text is matched lazily so sloppy words (spaces inside) still decode.
_ENCODED_WORD = re.compile(r"=\?([^?\s]{0,80})\?([qQbB])\?(.{0,4000}?)\?=")
_MSG_ID = re.compile(r"<[^<>]*>")
_PARAM = re.compile(r';\s*([^\s=;"]+)\s*=\s*("(?:[^"\\]|\\.)*"?|[^;]*)')
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([\w.:-]+)""", re.IGNORECASE)
_BOUNDARY_LINE = re.compile(rb"^--([^\s]{1,200}?)(--)?[ \t]*\r?$", re.MULTILINE)
# Mailers label GB18030 text as GB2312/GBK, Big5-HKSCS as Big5, windows-1252 as latin-1 or
# ASCII: decode with the superset (WHATWG Encoding Standard does the same).
_SUPERSETS = {"gb2312": "gb18030", "gbk": "gb18030", "big5": "big5hkscs", "euc_kr": "cp949"}
_SUPERSETS |= {"ascii": "cp1252", "latin_1": "cp1252", "iso8859-1": "cp1252"}
_NO_LABEL = {"", "unknown-8bit", "x-unknown", "unknown", "x-user-defined", "default"}
_NOT_BASE64 = bytes(sorted(set(range(256)) - set(string.ascii_letters.encode() + b"0123456789+/")))
_NESTED = ("message/rfc822", "message/global")
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


def _try(data: bytes, codec: str, partial: bool = False) -> str | None:
    # A `partial` text was cut (by us or by a prefix fetch): a multi-byte character cut in two at
    # the end is dropped instead of failing the whole text.
    try:
        return codecs.getincrementaldecoder(codec)("strict").decode(data, final=not partial)
    except (UnicodeError, LookupError, ValueError):
        return None


def _decode(
    data: bytes, charset: str | None, ctx: _Ctx | None, what: str = "text", partial: bool = False
) -> str:
    """Decode bytes labelled `charset`: the label, then UTF-8, then windows-1252 lossily."""
    note: Callable[[str], None] = ctx.note if ctx is not None else lambda _: None
    label = (charset or "").strip().strip("\"'").lower()[:40]
    codec = None
    if label not in _NO_LABEL:
        try:
            codec = codecs.lookup(label).name
            codec = _SUPERSETS.get(codec, codec)
            b"\xff\xfe \x80".decode(codec, "replace")  # refuses base64, zlib, idna: not charsets
        except (LookupError, ValueError):
            codec = None
            note(f"unknown charset {label!r} in {what}")
    if data.isascii() and codec in (None, "cp1252", "gb18030", "big5hkscs", "cp949", "utf-8"):
        return data.decode("ascii")
    # UTF-8 travels under Western labels all the time; valid UTF-8 there is no coincidence.
    utf8 = _try(data, "utf-8", partial)
    utf8 = utf8 if utf8 is not None and not utf8.isascii() else None  # a guess needs evidence
    if codec in ("cp1252", "iso8859-15") and (text := utf8) is not None:
        note(f"{what} labelled {label!r} is really UTF-8")
        return text
    if codec is not None:
        if (text := _try(data, codec, partial)) is not None:
            return text
        note(f"{what} is not valid {label}")
        text = data.decode(codec, errors="replace")
        if codec not in ("utf-8", "cp1252") and text.count("\ufffd") <= len(text) // 50:
            return text  # a few bad bytes in a CJK text: keep the text, lose those characters
    elif label in _NO_LABEL and not data.isascii():
        note(f"{what} has 8-bit characters without a charset")
    if codec != "utf-8" and (text := utf8) is not None:
        return text
    return data.decode("cp1252", errors="replace")


def _b64decode(data: bytes) -> tuple[bytes, bool]:
    """Decode as much base64 as there is; the flag says whether the data was clean."""
    clean, out = True, bytearray()
    # Padding may appear mid-stream when mailers concatenate encoded chunks: decode each chunk.
    for chunk in re.split(rb"=+", data):
        alpha = chunk.translate(None, _NOT_BASE64)
        clean = (
            clean and len(alpha) == len(chunk.translate(None, b" \t\r\n")) and len(alpha) % 4 != 1
        )
        alpha = alpha[: len(alpha) - (len(alpha) % 4 == 1)]
        try:
            out += base64.b64decode(alpha + b"=" * (-len(alpha) % 4))
        except (binascii.Error, ValueError):
            clean = False
    return bytes(out), clean


def _fold(text: str) -> str:
    return " ".join(_CONTROL.sub("", text).split())


def _decode_header(value: str | bytes | None, ctx: _Ctx | None) -> str:
    """Decode raw 8-bit bytes (UTF-8, else windows-1252) and every RFC 2047 encoded word."""
    if value is None:
        return ""
    if isinstance(value, str) and any("\udc80" <= ch <= "\udcff" for ch in value):
        value = value.encode("utf-8", "surrogateescape")  # the parser's escaped 8-bit bytes
    if isinstance(value, bytes):
        if (text := _try(value, "utf-8")) is None:
            if ctx is not None:
                ctx.note("a header has 8-bit characters that are not UTF-8")
            text = value.decode("cp1252", errors="replace")
        value = text
    # RFC 5322 §2.2.3: unfolding removes the CRLF before the folding whitespace.
    text = re.sub(r"\r?\n(?=[ \t])", "", value[:_MAX_HEADER])
    pieces: list[tuple[str | None, bytes | str]] = []  # (charset, bytes) or (None, plain text)
    pos = 0
    for m in _ENCODED_WORD.finditer(text):
        between, pos = text[pos : m.start()], m.end()
        # RFC 2047 §6.2: whitespace between adjacent encoded words is not displayed.
        if between and not (between.isspace() and pieces and pieces[-1][0] is not None):
            pieces.append((None, between))
        charset = m.group(1).split("*", 1)[0].lower()  # RFC 2231 §5: charset*language
        payload = m.group(3).encode("utf-8", "replace")
        if m.group(2) in "bB":
            data, clean = _b64decode(payload)
            if not clean and ctx is not None:
                ctx.note("damaged base64 encoded word in a header")
        else:
            data = quopri.decodestring(payload.replace(b"_", b" "))
        # Mailers split one multi-byte character across words: join same-charset bytes first.
        if pieces and pieces[-1][0] == charset and isinstance(prev := pieces[-1][1], bytes):
            pieces[-1] = (charset, prev + data)
        else:
            pieces.append((charset, data))
    pieces.append((None, text[pos:]))
    return "".join(
        _decode(chunk, charset, ctx, "a header") if isinstance(chunk, bytes) else chunk
        for charset, chunk in pieces
    )


def decode_header_value(value: str | bytes | None) -> str:
    """Decode a header value: every RFC 2047 word, raw 8-bit bytes, any charset; never raises."""
    try:
        return _decode_header(value, None)
    except Exception:  # a display helper must not fail on hostile input
        return value.decode("latin-1") if isinstance(value, bytes) else str(value or "")


def _header(msg: Message | None, name: str) -> str | None:
    """The first raw header value (8-bit bytes surrogate-escaped), unfolded; None when absent."""
    for key, value in msg.raw_items() if msg is not None else ():
        if key.strip().lower() == name:
            return re.sub(r"\r?\n(?=[ \t])", "", str(value)).replace("\r", "").replace("\n", "")
    return None


def _decode_params(pairs: list[tuple[str, str]], ctx: _Ctx) -> dict[str, str]:
    """Parameters by lower-case name: RFC 2231 (charset, continuations) and RFC 2047 decoded."""
    result: dict[str, str] = {}
    pieces: dict[str, list[tuple[int, str, bool]]] = {}
    for name, value in pairs:
        m = re.fullmatch(r"([^*]+)(?:\*(\d{1,4}))?(\*)?", name.strip().lower())
        if m and m.group(2) is None and not m.group(3):
            result.setdefault(m.group(1), _fold(_decode_header(value, ctx)))
        elif m:
            pieces.setdefault(m.group(1), []).append((int(m.group(2) or 0), value, bool(m[3])))
    for base, segments in pieces.items():
        charset, buf = "", bytearray()
        for i, (_, value, encoded) in enumerate(sorted(segments, key=lambda s: s[0])):
            if i == 0 and encoded and value.count("'") >= 2:
                charset, _language, value = value.split("'", 2)
            raw = value.encode("utf-8", "surrogateescape")
            buf += urllib.parse.unquote_to_bytes(raw) if encoded else raw
        # RFC 2231 values win over the plain fallback that mailers add for old readers.
        result[base] = _fold(_decode_header(_decode(bytes(buf), charset or "utf-8", ctx), ctx))
    return result


def _params(msg: Message, ctx: _Ctx, *headers: str) -> dict[str, str]:
    """Decoded parameters of the given headers; earlier headers win."""
    result: dict[str, str] = {}
    for header in reversed(headers):
        pairs = []
        for m in _PARAM.finditer(_header(msg, header) or ""):
            value = m.group(2).strip()
            if value.startswith('"'):
                value = re.sub(
                    r"\\(.)", r"\1", value[1:-1] if value[1:].endswith('"') else value[1:]
                )
            pairs.append((m.group(1), value))
        result |= _decode_params(pairs, ctx)
    return result


def _content_type(msg: Message) -> str:
    value = _header(msg, "content-type")
    if value is None:
        return msg.get_default_type()
    ctype = value.split(";", 1)[0].strip().lower()
    # RFC 2045 §5.2: an invalid Content-Type means text/plain, as the stdlib parser assumes.
    return ctype if re.fullmatch(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+", ctype) else "text/plain"


def _is_attachment(ctype: str, disposition: str, params: dict[str, str]) -> bool:
    if disposition == "attachment" or params.get("filename") or params.get("name"):
        return True
    return not ctype.startswith(("text/", "multipart/"))


def _leaf_info(msg: Message, ctx: _Ctx) -> tuple[str, bool, str]:
    """(content type, is it an attachment, file name) of a part."""
    ctype = _content_type(msg)
    params = _params(msg, ctx, "content-disposition", "content-type")
    disposition = (_header(msg, "content-disposition") or "").split(";", 1)[0].strip().lower()
    name = params.get("filename") or params.get("name", "")
    return ctype, _is_attachment(ctype, disposition, params), name


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
    data, clean = _b64decode(
        payload.encode("ascii", "ignore") if isinstance(payload, str) else b""
    )
    if not clean:
        ctx.note("a base64 part is damaged or incomplete")
    return data


def _html_to_text(markup: str) -> str:
    # lxml refuses NUL and most C0 controls; inscriptis hides <script>/<style> (display: none).
    markup = _CONTROL.sub("", markup.replace("\r", "\n")).replace("\x00", "")
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
    text = _decode(data, charset, ctx, partial=partial).replace("\r\n", "\n").replace("\r", "\n")
    if ctype == "text/html":
        return _html_to_text(text)
    if params.get("format", "").lower() == "flowed":
        text = _unflow(text, params.get("delsp", "").lower() == "yes")
    return _CONTROL.sub("", text)


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
        inner = _nested(part) if _content_type(part) in _NESTED else None
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
        if ctype in _NESTED:
            inner = _nested(part)
            try:
                size = len(inner.as_bytes()) if inner is not None else 0
            except Exception:  # re-serialising a broken nested mail; the size is only a hint
                size = 0
            name = name or _fold(_decode_header(_header(inner, "subject"), ctx)) or "message.eml"
            found.append(Attachment(name, ctype, size))
        elif attached and not ctype.startswith("multipart/"):
            found.append(Attachment(name, ctype, len(_part_bytes(part, ctx))))
    return found


def _atom(value: object) -> str:
    """A BODYSTRUCTURE string (bytes, str or NIL) as text; 8-bit bytes kept for later decoding."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value if isinstance(value, str) else ""


def _is_tuple(value: object) -> bool:
    return isinstance(value, tuple)


def _bs_params(value: object, ctx: _Ctx) -> dict[str, str]:
    # RFC 3501 §7.4.2: parameters come undecoded, as a flat (name value name value ...) list.
    items = [_atom(v) for v in value] if isinstance(value, (tuple, list)) else []
    return _decode_params(list(zip(items[::2], items[1::2], strict=False)), ctx)


def _bs_attachments(node: object, ctx: _Ctx, depth: int, out: list[Attachment]) -> None:
    """Collect attachments from an IMAP BODYSTRUCTURE (complete even when raw is truncated)."""
    if depth > _MAX_DEPTH or not isinstance(node, (tuple, list)) or len(node) < 2:
        return
    if isinstance(node[0], (tuple, list)):
        # Multipart: imapclient's BodyData.create nests the children in a list; the structure
        # inside message/rfc822 stays raw, with the child tuples first.
        kids = node[0] if isinstance(node[0], list) else takewhile(_is_tuple, node)
        for kid in kids:
            _bs_attachments(kid, ctx, depth + 1, out)
        return
    fields = [*node, *[None] * 12]
    ctype = f"{_atom(fields[0])}/{_atom(fields[1])}".lower()
    params = _bs_params(fields[2], ctx)
    size = max(fields[6], 0) if isinstance(fields[6], int) else 0
    if _atom(fields[5]).lower() == "base64":
        size = size * 3 // 4
    nested = ctype in _NESTED and isinstance(fields[8], (tuple, list))
    # RFC 3501 §7.4.2: after the basic fields come lines (text/*) or envelope, body and lines
    # (message/rfc822), then the extension data md5 and disposition.
    disposition = fields[11 if nested else 9 if isinstance(fields[7], int) else 8]
    kind = ""
    if isinstance(disposition, (tuple, list)) and disposition:
        kind = _atom(disposition[0]).lower()
        params |= _bs_params(disposition[1] if len(disposition) > 1 else None, ctx)
    name = params.get("filename") or params.get("name", "")
    if nested:
        envelope = fields[7] if isinstance(fields[7], (tuple, list)) else ()
        subject = _fold(_decode_header(_atom(envelope[1]), ctx)) if len(envelope) > 1 else ""
        out.append(Attachment(name or subject or "message.eml", ctype, size))
    elif _is_attachment(ctype, kind, params):
        out.append(Attachment(name, ctype, size))


def _addresses(msg: Message, header: str, ctx: _Ctx) -> list[tuple[str, str]]:
    """(decoded name, address) pairs; parsed before decoding so encoded commas stay in names."""
    pairs = getaddresses([value]) if (value := _header(msg, header)) else []
    decoded = [(_fold(_decode_header(n, ctx)), _fold(_decode_header(a, ctx))) for n, a in pairs]
    return [(name, addr) for name, addr in decoded if name or addr]


def _first_id(value: str) -> str:
    found = _MSG_ID.search(text := _fold(value))
    return found.group(0).replace(" ", "") if found else text


def _fill_headers(msg: Message, mail: ParsedMail, ctx: _Ctx) -> None:
    def decoded(name: str) -> str:
        return _decode_header(_header(msg, name), ctx)

    mail.message_id = _first_id(decoded("message-id"))
    mail.subject = _fold(decoded("subject"))
    if senders := _addresses(msg, "from", ctx):
        if "@" in senders[0][1]:
            mail.from_name, mail.from_addr = senders[0]
        else:
            mail.from_name = _fold(decoded("from"))
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
    mail.references = [r.replace(" ", "") for r in _MSG_ID.findall(_fold(decoded("references")))]


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
