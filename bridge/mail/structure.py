"""IMAP BODYSTRUCTURE (as imapclient returns it) to the mail's parts and attachments; pure."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from itertools import takewhile
from typing import Literal

from bridge.mail.decode import Note, decode_header, decode_params, fold

NESTED = ("message/rfc822", "message/global")  # a whole mail carried as one part


def is_attachment(ctype: str, disposition: str, params: dict[str, str]) -> bool:
    """Whether a part is listed as an attachment: declared so, named, or not text."""
    if disposition == "attachment" or params.get("filename") or params.get("name"):
        return True
    return not ctype.startswith(("text/", "multipart/"))


def _atom(value: object) -> str:
    """A BODYSTRUCTURE string (bytes, str or NIL) as text; 8-bit bytes kept for later decoding."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value if isinstance(value, str) else ""


def _is_tuple(value: object) -> bool:
    return isinstance(value, tuple)


def _params(value: object, note: Note) -> dict[str, str]:
    # RFC 3501 §7.4.2: parameters come undecoded, as a flat (name value name value ...) list.
    items = [_atom(v) for v in value] if isinstance(value, (tuple, list)) else []
    return decode_params(list(zip(items[::2], items[1::2], strict=False)), note)


def _decoded_size(encoded: int, encoding: str) -> int:
    """The size of a part once decoded, estimated from its size on the server."""
    if encoding != "base64":
        return encoded
    # RFC 2045 §6.8: a 76-character line plus CRLF carries 57 bytes; 3/4 counts the line breaks.
    return round(encoded * 57 / 78)


def _collect(
    node: object, note: Note, depth: int, max_depth: int, out: list[tuple[str, str, int]]
) -> None:
    if depth > max_depth or not isinstance(node, (tuple, list)) or len(node) < 2:
        return
    if isinstance(node[0], (tuple, list)):
        # Multipart: imapclient's BodyData.create nests the children in a list; the structure
        # inside message/rfc822 stays raw, with the child tuples first.
        kids = node[0] if isinstance(node[0], list) else takewhile(_is_tuple, node)
        for kid in kids:
            _collect(kid, note, depth + 1, max_depth, out)
        return
    fields = [*node, *[None] * 12]
    ctype = f"{_atom(fields[0])}/{_atom(fields[1])}".lower()
    params = _params(fields[2], note)
    size = max(fields[6], 0) if isinstance(fields[6], int) else 0
    size = _decoded_size(size, _atom(fields[5]).lower())
    nested = ctype in NESTED and isinstance(fields[8], (tuple, list))
    # RFC 3501 §7.4.2: after the basic fields come lines (text/*) or envelope, body and lines
    # (message/rfc822), then the extension data md5 and disposition.
    disposition = fields[11 if nested else 9 if isinstance(fields[7], int) else 8]
    kind = ""
    if isinstance(disposition, (tuple, list)) and disposition:
        kind = _atom(disposition[0]).lower()
        params |= _params(disposition[1] if len(disposition) > 1 else None, note)
    name = params.get("filename") or params.get("name", "")
    if nested:
        envelope = fields[7] if isinstance(fields[7], (tuple, list)) else ()
        subject = fold(decode_header(_atom(envelope[1]), note)) if len(envelope) > 1 else ""
        out.append((name or subject or "message.eml", ctype, size))
    elif is_attachment(ctype, kind, params):
        out.append((name, ctype, size))


def structure_attachments(
    structure: object, note: Note, max_depth: int
) -> list[tuple[str, str, int]]:
    """(name, type, estimated decoded size) of each attachment; complete for a prefix fetch."""
    found: list[tuple[str, str, int]] = []
    _collect(structure, note, 0, max_depth, found)
    return found


# A tracking pixel: an image nobody named or attached, smaller than this (a 1x1 GIF is 43 bytes,
# a 1x1 PNG 68; a real inline logo or photo is larger).
PIXEL_BYTES = 1024


@dataclass(frozen=True)
class MimePart:
    """One node of a BODYSTRUCTURE with its IMAP section number and decoded parameters."""

    # RFC 3501 §6.4.5 part number ("1", "2.1"); "" for a top-level multipart.
    section: str
    content_type: str  # lower-case type/subtype
    params: dict[str, str]  # Content-Type and Content-Disposition parameters, decoded
    disposition: str  # lower-case "inline", "attachment" or ""
    encoding: str  # lower-case Content-Transfer-Encoding, "7bit" when absent
    encoded_size: int  # octets on the server
    subject: str = ""  # a nested mail's decoded subject
    children: tuple[MimePart, ...] = field(default=())

    @property
    def filename(self) -> str:
        """The decoded file name (RFC 2231 / RFC 2047), "" when the part has none."""
        return self.params.get("filename") or self.params.get("name", "")

    @property
    def size(self) -> int:
        """The estimated size once the transfer encoding is undone."""
        return _decoded_size(self.encoded_size, self.encoding)

    @property
    def is_multipart(self) -> bool:
        """Whether this is a multipart container (its children are the parts)."""
        return self.content_type.startswith("multipart/")


def _section(parent: str, number: int) -> str:
    return f"{parent}.{number}" if parent else str(number)


def _part(node: object, section: str, note: Note, depth: int, max_depth: int) -> MimePart | None:
    if depth > max_depth or not isinstance(node, (tuple, list)) or len(node) < 2:
        return None
    if isinstance(node[0], (tuple, list)):
        # Multipart: the children come first (in a list from imapclient's BodyData.create, as
        # bare tuples inside a message/rfc822), then subtype, parameters, disposition.
        kids = list(node[0]) if isinstance(node[0], list) else list(takewhile(_is_tuple, node))
        rest = [*node[1 if isinstance(node[0], list) else len(kids) :], *[None] * 3]
        parts = (
            _part(kid, _section(section, n), note, depth + 1, max_depth)
            for n, kid in enumerate(kids, 1)
        )
        return MimePart(
            section=section,
            content_type=f"multipart/{_atom(rest[0]).lower() or 'mixed'}",
            params=_params(rest[1], note),
            disposition="",
            encoding="7bit",
            encoded_size=0,
            children=tuple(p for p in parts if p is not None),
        )
    fields = [*node, *[None] * 12]
    ctype = f"{_atom(fields[0])}/{_atom(fields[1])}".lower()
    params = _params(fields[2], note)
    nested = ctype in NESTED and isinstance(fields[8], (tuple, list))
    # RFC 3501 §7.4.2: lines (text/*) or envelope, body and lines (message/rfc822) come before
    # the extension data md5 and disposition.
    disposition = fields[11 if nested else 9 if isinstance(fields[7], int) else 8]
    kind = ""
    if isinstance(disposition, (tuple, list)) and disposition:
        kind = _atom(disposition[0]).lower()
        params |= _params(disposition[1] if len(disposition) > 1 else None, note)
    subject = ""
    children: tuple[MimePart, ...] = ()
    if nested:
        envelope = fields[7] if isinstance(fields[7], (tuple, list)) else ()
        subject = fold(decode_header(_atom(envelope[1]), note)) if len(envelope) > 1 else ""
        body = fields[8]
        # RFC 3501 §6.4.5: a nested mail's parts are numbered below its own part; a body that
        # is not multipart is part 1 of it.
        inner_section = section if isinstance(body[0], (tuple, list)) else f"{section}.1"
        inner = _part(body, inner_section, note, depth + 1, max_depth)
        children = (inner,) if inner is not None else ()
    return MimePart(
        section=section,
        content_type=ctype,
        params=params,
        disposition=kind,
        encoding=_atom(fields[5]).lower() or "7bit",
        encoded_size=max(fields[6], 0) if isinstance(fields[6], int) else 0,
        subject=subject,
        children=children,
    )


def parse_structure(structure: object, note: Note, max_depth: int = 40) -> MimePart | None:
    """The BODYSTRUCTURE as a tree of MimePart with section numbers; None when unreadable."""
    multipart = isinstance(structure, (tuple, list)) and isinstance(
        next(iter(structure), None), (tuple, list)
    )
    # RFC 3501 §6.4.5: a message that is not multipart has exactly one part, numbered 1.
    return _part(structure, "" if multipart else "1", note, 0, max_depth)


def is_tracking_pixel(part: MimePart) -> bool:
    """A tiny image without a name that was not attached: a web bug, not a file."""
    return (
        part.content_type.startswith("image/")
        and part.disposition != "attachment"
        and not part.filename
        and part.size < PIXEL_BYTES
    )


def find_attachments(root: MimePart) -> list[MimePart]:
    """The parts a user would save as files, in order: as structure_attachments lists them,
    nested mails as one file each, tracking pixels left out."""
    if root.is_multipart:
        return [found for kid in root.children for found in find_attachments(kid)]
    if root.content_type in NESTED:
        return [root]
    if is_attachment(root.content_type, root.disposition, root.params):
        return [] if is_tracking_pixel(root) else [root]
    return []


def _is_text(part: MimePart) -> bool:
    return part.content_type in ("text/plain", "text/html") and not is_attachment(
        part.content_type, part.disposition, part.params
    )


def _readable(part: MimePart, prefer: str) -> list[MimePart]:
    """The text leaves of `part` a reader sees; in an alternative, the `prefer` version."""
    if part.content_type == "multipart/alternative" and part.children:
        options = [leaves for kid in part.children if (leaves := _readable(kid, prefer))]
        if prefer == "text/plain":
            # As parse.py: the plain text version when there is one, else the first.
            plain = [o for o in options if len(o) == 1 and o[0].content_type == prefer]
            return plain[0] if plain else (options[0] if options else [])
        # RFC 2046 §5.1.4: the last alternative is the richest.
        rich = [o for o in options if any(leaf.content_type == prefer for leaf in o)]
        return rich[-1] if rich else (options[-1] if options else [])
    if part.is_multipart:
        return [leaf for kid in part.children for leaf in _readable(kid, prefer)]
    return [part] if _is_text(part) else []


def _nested_mails(part: MimePart) -> list[MimePart]:
    """The nested mails' bodies below `part`, in order, not descending into them."""
    if part.content_type in NESTED:
        return list(part.children)
    return [mail for kid in part.children for mail in _nested_mails(kid)]


def find_text_parts(
    root: MimePart, prefer: Literal["text/plain", "text/html"] = "text/plain"
) -> list[MimePart]:
    """The text/plain and text/html leaves that make up the mail's text, as parse.py reads it:
    text/plain preferred in alternatives (or HTML with prefer="text/html"); a forwarded mail's
    text when the mail has none of its own."""
    if found := _readable(root, prefer):
        return found
    for body in _nested_mails(root):
        if found := find_text_parts(body, prefer):
            return found
    return []


_BASE64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
_NOT_BASE64 = bytes(b for b in range(256) if b not in _BASE64_ALPHABET and b != ord("="))
_QP_TAIL = 4096  # a longer quoted-printable line is decoded without waiting for its end


class TransferDecoder:
    """Undo a Content-Transfer-Encoding chunk by chunk (RFC 2045 §6), in bounded memory.

    Decodes as bridge.mail.decode and the stdlib do for a whole part: base64 tolerantly
    (stray characters skipped, padding may end a chunk mid-stream), quoted-printable with
    binascii.a2b_qp, everything else (7bit, 8bit, binary, unknown) passed through.
    """

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding.strip().lower()
        self._pending = b""

    def feed(self, data: bytes) -> bytes:
        """The decoded bytes that `data` completes; the rest waits for more or finish()."""
        if self.encoding == "base64":
            return self._base64(data, final=False)
        if self.encoding == "quoted-printable":
            return self._quoted_printable(data, final=False)
        return data

    def finish(self) -> bytes:
        """Whatever is still pending, decoded as the end of the part."""
        if self.encoding == "base64":
            return self._base64(b"", final=True)
        if self.encoding == "quoted-printable":
            return self._quoted_printable(b"", final=True)
        return b""

    def _base64(self, data: bytes, final: bool) -> bytes:
        out = bytearray()
        # "=" ends a group of 4: mailers that join encoded chunks leave padding mid-stream.
        pieces = re.split(rb"=+", data.translate(None, _NOT_BASE64))
        for n, piece in enumerate(pieces):
            self._pending += piece
            if n < len(pieces) - 1:
                out += self._flush_group()
        whole = len(self._pending) // 4 * 4
        out += base64.b64decode(self._pending[:whole])
        self._pending = self._pending[whole:]
        if final:
            out += self._flush_group()
        return bytes(out)

    def _flush_group(self) -> bytes:
        # A lone sixth of a byte cannot be decoded; two or three characters give one or two.
        alpha = self._pending[: len(self._pending) - (len(self._pending) % 4 == 1)]
        self._pending = b""
        try:
            return base64.b64decode(alpha + b"=" * (-len(alpha) % 4))
        except (binascii.Error, ValueError):
            return b""

    def _quoted_printable(self, data: bytes, final: bool) -> bytes:
        text = self._pending + data
        cut = len(text) if final else text.rfind(b"\n") + 1
        if not final and len(text) - cut > _QP_TAIL:
            # A very long line: cut where no "=XX" escape or soft break can straddle.
            cut = len(text)
            while cut > 2 and b"=" in text[cut - 2 : cut]:
                cut -= 1
        self._pending = text[cut:]
        return binascii.a2b_qp(text[:cut])
