"""IMAP BODYSTRUCTURE (as imapclient returns it) to the mail's attachments; pure."""

from __future__ import annotations

from itertools import takewhile

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
