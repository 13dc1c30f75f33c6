"""Bytes and header values to text, whatever the charset label says; pure."""

from __future__ import annotations

import base64
import binascii
import codecs
import quopri
import re
import string
import urllib.parse
from collections.abc import Callable

# Receives one short problem sentence ("unknown charset 'x' in text"); parse collects them.
Note = Callable[[str], None]

_MAX_HEADER = 32_768  # longer header values are cut before decoding (regex cost, no reader)
# RFC 2047 encoded word; the text is matched lazily so sloppy words (spaces inside) still decode.
_ENCODED_WORD = re.compile(r"=\?([^?\s]{0,80})\?([qQbB])\?(.{0,4000}?)\?=")
_PARAM = re.compile(r';\s*([^\s=;"]+)\s*=\s*("(?:[^"\\]|\\.)*"?|[^;]*)')
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# Mailers label GB18030 text as GB2312/GBK, Big5-HKSCS as Big5, windows-1252 as latin-1 or
# ASCII: decode with the superset (WHATWG Encoding Standard does the same).
_SUPERSETS = {"gb2312": "gb18030", "gbk": "gb18030", "big5": "big5hkscs", "euc_kr": "cp949"}
_SUPERSETS |= {"ascii": "cp1252", "latin_1": "cp1252", "iso8859-1": "cp1252"}
_NO_LABEL = {"", "unknown-8bit", "x-unknown", "unknown", "x-user-defined", "default"}
_NOT_BASE64 = bytes(sorted(set(range(256)) - set(string.ascii_letters.encode() + b"0123456789+/")))


def _ignore(_: str) -> None:
    """A Note that drops the problem (display helpers have nobody to tell)."""


def _try(data: bytes, codec: str, partial: bool = False) -> str | None:
    # A `partial` text was cut (by us or by a prefix fetch): a multi-byte character cut in two at
    # the end is dropped instead of failing the whole text.
    try:
        return codecs.getincrementaldecoder(codec)("strict").decode(data, final=not partial)
    except (UnicodeError, LookupError, ValueError):
        return None


def decode_bytes(
    data: bytes, charset: str | None, note: Note, what: str = "text", partial: bool = False
) -> str:
    """Decode bytes labelled `charset`: the label, then UTF-8, then windows-1252 lossily."""
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


def decode_base64(data: bytes) -> tuple[bytes, bool]:
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


def strip_controls(text: str) -> str:
    """The text without C0 control characters other than tab and newline, and without DEL."""
    return _CONTROL.sub("", text)


def fold(text: str) -> str:
    """One line: controls dropped, every run of whitespace made a single space."""
    return " ".join(strip_controls(text).split())


def decode_header(value: str | bytes | None, note: Note) -> str:
    """Decode raw 8-bit bytes (UTF-8, else windows-1252) and every RFC 2047 encoded word."""
    if value is None:
        return ""
    if isinstance(value, str) and any("\udc80" <= ch <= "\udcff" for ch in value):
        value = value.encode("utf-8", "surrogateescape")  # the parser's escaped 8-bit bytes
    if isinstance(value, bytes):
        if (text := _try(value, "utf-8")) is None:
            note("a header has 8-bit characters that are not UTF-8")
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
            data, clean = decode_base64(payload)
            if not clean:
                note("damaged base64 encoded word in a header")
        else:
            data = quopri.decodestring(payload.replace(b"_", b" "))
        # Mailers split one multi-byte character across words: join same-charset bytes first.
        if pieces and pieces[-1][0] == charset and isinstance(prev := pieces[-1][1], bytes):
            pieces[-1] = (charset, prev + data)
        else:
            pieces.append((charset, data))
    pieces.append((None, text[pos:]))
    return "".join(
        decode_bytes(chunk, charset, note, "a header") if isinstance(chunk, bytes) else chunk
        for charset, chunk in pieces
    )


def decode_header_value(value: str | bytes | None) -> str:
    """Decode a header value: every RFC 2047 word, raw 8-bit bytes, any charset; never raises."""
    try:
        return decode_header(value, _ignore)
    except Exception:  # a display helper must not fail on hostile input
        return value.decode("latin-1") if isinstance(value, bytes) else str(value or "")


def split_params(value: str) -> list[tuple[str, str]]:
    """The undecoded (name, value) parameters of a header value; quotes and escapes undone."""
    pairs = []
    for m in _PARAM.finditer(value):
        text = m.group(2).strip()
        if text.startswith('"'):
            text = re.sub(r"\\(.)", r"\1", text[1:-1] if text[1:].endswith('"') else text[1:])
        pairs.append((m.group(1), text))
    return pairs


def decode_params(pairs: list[tuple[str, str]], note: Note) -> dict[str, str]:
    """Parameters by lower-case name: RFC 2231 (charset, continuations) and RFC 2047 decoded."""
    result: dict[str, str] = {}
    pieces: dict[str, list[tuple[int, str, bool]]] = {}
    for name, value in pairs:
        m = re.fullmatch(r"([^*]+)(?:\*(\d{1,4}))?(\*)?", name.strip().lower())
        if m and m.group(2) is None and not m.group(3):
            result.setdefault(m.group(1), fold(decode_header(value, note)))
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
        result[base] = fold(
            decode_header(decode_bytes(bytes(buf), charset or "utf-8", note), note)
        )
    return result
