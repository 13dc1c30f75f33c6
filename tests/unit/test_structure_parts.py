"""structure.py's part tree: section numbers, attachments, text parts, chunked decoding."""

from __future__ import annotations

import base64
import binascii
import os
import quopri

from hypothesis import given
from hypothesis import strategies as st
from imapclient.response_parser import parse_fetch_response

from bridge.mail.decode import decode_base64
from bridge.mail.structure import (
    MimePart,
    TransferDecoder,
    find_attachments,
    find_text_parts,
    parse_structure,
    structure_attachments,
)

# BODYSTRUCTURE lines exactly as Dovecot 2.3 sent them for the fixtures in tests/mails.
NESTED = (
    b'1 (UID 1 BODYSTRUCTURE (("message" "rfc822" NIL NIL NIL "7bit" 339 ("Thu, 26 Nov 2026 '
    b'18:00:00 +0000" "=?UTF-8?Q?Quarterly_numbers_=E2=80=94_Q3?=" (("Carol" NIL "carol" '
    b'"example.com")) (("Carol" NIL "carol" "example.com")) (("Carol" NIL "carol" '
    b'"example.com")) NIL NIL NIL NIL NIL) (("text" "plain" ("charset" "utf-8") NIL NIL "7bit" '
    b'19 0 NIL NIL NIL NIL)("text" "csv" ("name" "q3.csv" "charset" "us-ascii") NIL NIL "7bit" '
    b'8 1 NIL NIL NIL NIL) "mixed" ("boundary" "inner") NIL NIL NIL) 16 NIL ("attachment" NIL) '
    b'NIL NIL) "mixed" ("boundary" "outer") NIL NIL NIL))'
)
SINGLE_NESTED = (
    b'6 (UID 6 BODYSTRUCTURE ("message" "rfc822" NIL NIL NIL "7bit" 41 (NIL "Inner" ((NIL NIL '
    b'"c" "d")) ((NIL NIL "c" "d")) ((NIL NIL "c" "d")) NIL NIL NIL NIL NIL) ("text" "plain" '
    b'("charset" "us-ascii") NIL NIL "7bit" 12 1 NIL NIL NIL NIL) 4 NIL NIL NIL NIL))'
)
RELATED = (
    b'2 (UID 2 BODYSTRUCTURE (("text" "html" ("charset" "utf-8") NIL NIL "7bit" 33 0 NIL NIL NIL '
    b'NIL)("image" "png" NIL "<logo>" NIL "base64" 700 NIL NIL NIL NIL) "related" ("boundary" '
    b'"rel") NIL NIL NIL))'
)
ALTERNATIVE = (
    b'3 (UID 3 BODYSTRUCTURE (("text" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" 32 '
    b'0 NIL NIL NIL NIL)("text" "html" ("charset" "utf-8") NIL NIL "7bit" 26 0 NIL NIL NIL NIL) '
    b'"alternative" ("boundary" "alt") NIL NIL NIL))'
)
RFC2231 = (
    b'4 (UID 4 BODYSTRUCTURE (("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 13 0 NIL NIL NIL '
    b'NIL)("application" "pdf" NIL NIL NIL "base64" 180 NIL ("attachment" ("filename*" '
    b'"utf-8\'\'%E6%8A%A5%E5%91%8A%E2%80%94%20Q3.pdf")) NIL NIL)("text" "plain" ("name" '
    b'"fallback.txt" "charset" "us-ascii") NIL NIL "7bit" 5 0 NIL ("attachment" ("filename" '
    b'"fallback.txt" "filename*" "iso-8859-1\'de\'Gr%FC%DFe.txt")) NIL NIL) "mixed" '
    b'("boundary" "b1") NIL NIL NIL))'
)
PIXEL = (
    b'7 (UID 7 BODYSTRUCTURE (("text" "html" ("charset" "utf-8") NIL NIL "7bit" 9 0 NIL NIL NIL '
    b'NIL)("image" "gif" NIL NIL NIL "base64" 60 NIL ("inline" NIL) NIL NIL) "mixed" ("boundary" '
    b'"x") NIL NIL NIL))'
)
FLOWED = (
    b'5 (UID 5 BODYSTRUCTURE ("text" "plain" ("charset" "utf-8" "format" "flowed") NIL NIL '
    b'"7bit" 115 7 NIL NIL NIL NIL))'
)


def ignore(_: str) -> None:
    """A Note that drops decoding problems."""


def tree(line: bytes) -> MimePart:
    """The part tree of one FETCH response line, parsed by imapclient as the bridge gets it."""
    [item] = parse_fetch_response([line]).values()
    root = parse_structure(item[b"BODYSTRUCTURE"], ignore)
    assert root is not None
    return root


def sections(part: MimePart) -> list[tuple[str, str]]:
    """(section, type) of every node, depth first."""
    return [(part.section, part.content_type)] + [
        s for kid in part.children for s in sections(kid)
    ]


def test_section_numbers_follow_rfc3501() -> None:
    # RFC 3501 §6.4.5: a nested mail's parts are numbered below its own part.
    assert sections(tree(NESTED)) == [
        ("", "multipart/mixed"),
        ("1", "message/rfc822"),
        ("1", "multipart/mixed"),
        ("1.1", "text/plain"),
        ("1.2", "text/csv"),
    ]
    # A single-part mail is part 1; a nested single-part body is part 1 of its mail.
    assert sections(tree(FLOWED)) == [("1", "text/plain")]
    assert sections(tree(SINGLE_NESTED)) == [("1", "message/rfc822"), ("1.1", "text/plain")]


def test_nested_mail_is_one_attachment_named_by_its_subject() -> None:
    [forwarded] = find_attachments(tree(NESTED))
    assert (forwarded.section, forwarded.subject) == ("1", "Quarterly numbers — Q3")
    assert forwarded.encoded_size == forwarded.size == 339


def test_attachment_names_rfc2231() -> None:
    found = find_attachments(tree(RFC2231))
    assert [(p.section, p.filename, p.encoding) for p in found] == [
        ("2", "报告— Q3.pdf", "base64"),
        ("3", "Grüße.txt", "7bit"),  # the RFC 2231 name wins over the plain fallback
    ]
    assert found[0].size == round(180 * 57 / 78)


def test_listing_agrees_with_the_summarys_list() -> None:
    """The buttons offer what the summary lists (tracking pixels aside: RELATED)."""
    for line in (NESTED, RFC2231, ALTERNATIVE, FLOWED, SINGLE_NESTED):
        [item] = parse_fetch_response([line]).values()
        listed = structure_attachments(item[b"BODYSTRUCTURE"], ignore, 40)
        assert [t for _, t, _ in listed] == [p.content_type for p in find_attachments(tree(line))]


def test_tracking_pixels_are_not_attachments() -> None:
    assert find_attachments(tree(PIXEL)) == []
    # A 512-byte image without a name in multipart/related: a web bug, too.
    assert find_attachments(tree(RELATED)) == []
    big = parse_structure(
        (b"image", b"png", None, None, None, b"base64", 4000, None, (b"inline", None)), ignore
    )
    named = parse_structure(
        (
            b"image",
            b"gif",
            None,
            None,
            None,
            b"base64",
            60,
            None,
            (b"inline", (b"filename", b"x.gif")),
        ),
        ignore,
    )
    attached = parse_structure(
        (b"image", b"gif", None, None, None, b"base64", 60, None, (b"attachment", None)), ignore
    )
    for real in (big, named, attached):
        assert real is not None
        assert find_attachments(real) == [real]


def test_text_parts_prefer_plain_or_html() -> None:
    alternative = tree(ALTERNATIVE)
    assert [p.section for p in find_text_parts(alternative)] == ["1"]
    assert [p.section for p in find_text_parts(alternative, "text/html")] == ["2"]
    assert [p.section for p in find_text_parts(tree(RELATED))] == ["1"]
    # Only attachments of its own: the forwarded mail's text.
    assert [p.section for p in find_text_parts(tree(NESTED))] == ["1.1"]
    assert [p.section for p in find_text_parts(tree(SINGLE_NESTED))] == ["1.1"]
    # An attached text file is not the mail's text.
    assert [p.section for p in find_text_parts(tree(RFC2231))] == ["1"]
    assert find_text_parts(tree(FLOWED))[0].params["format"] == "flowed"


def test_unreadable_structure() -> None:
    assert parse_structure(None, ignore) is None
    assert parse_structure((), ignore) is None


def decode_in_pieces(encoding: str, data: bytes, cuts: list[int]) -> bytes:
    decoder = TransferDecoder(encoding)
    out, start = b"", 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        out += decoder.feed(data[start:cut])
        start = max(start, cut)
    return out + decoder.feed(data[start:]) + decoder.finish()


@given(st.binary(max_size=3000), st.lists(st.integers(min_value=0), max_size=8))
def test_base64_in_any_pieces_equals_whole(payload: bytes, cuts: list[int]) -> None:
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    assert decode_in_pieces("base64", encoded, cuts) == payload


@given(st.binary(max_size=600), st.lists(st.integers(min_value=0), max_size=8))
def test_damaged_base64_decodes_as_decode_base64(noise: bytes, cuts: list[int]) -> None:
    data = base64.b64encode(os.urandom(50)) + b"==" + noise + base64.b64encode(b"more")
    assert decode_in_pieces("BASE64", data, cuts) == decode_base64(data)[0]


@given(st.binary(max_size=3000), st.lists(st.integers(min_value=0), max_size=8))
def test_quoted_printable_in_any_pieces_equals_whole(payload: bytes, cuts: list[int]) -> None:
    encoded = quopri.encodestring(payload).replace(b"\n", b"\r\n")
    assert decode_in_pieces("quoted-printable", encoded, cuts) == binascii.a2b_qp(encoded)


def test_quoted_printable_long_line_is_decoded_in_bounded_memory() -> None:
    line = b"=C3=A4" * 100_000  # 600 kB without a line break
    decoder = TransferDecoder("quoted-printable")
    out = b""
    for start in range(0, len(line), 1000):
        out += decoder.feed(line[start : start + 1000])
        assert len(decoder._pending) <= 4096 + 1000
    assert out + decoder.finish() == "ä".encode() * 100_000


def test_other_encodings_pass_through() -> None:
    for encoding in ("7bit", "8bit", "binary", "x-unknown", ""):
        assert decode_in_pieces(encoding, b"abc=3D\r\n\xff", [2, 5]) == b"abc=3D\r\n\xff"
