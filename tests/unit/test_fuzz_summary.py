"""Property tests: parse_mail never raises, render_summary always fits Telegram's limits."""

import re
from datetime import UTC, datetime
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.mail.parse import Attachment, ParsedMail, decode_header_value, parse_mail
from bridge.mail.summary import MAX_MESSAGE, render_summary

MAILS = Path(__file__).parent.parent / "mails"
FIXTURES = [path.read_bytes() for path in sorted(MAILS.glob("*.eml"))]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The mail-feeding tests below run 1,200 + 1,300 + 600 = 3,100 messages through parse_mail
# (about 20 s on two cores); the other two are cheap checks of one function each.
TOKEN = re.compile(r"</?[bi]>|&(?:lt|gt|amp|quot);|[^<>&]+")


def assert_renders(mail: ParsedMail) -> None:
    # "could not be read (SomeError)" means our code tripped, not that the mail was bad.
    assert not [p for p in mail.problems if "(" in p and "Error)" in p], mail.problems
    text = render_summary(mail)
    assert text.strip()
    assert len(text.encode("utf-16-le")) // 2 <= MAX_MESSAGE
    assert "".join(TOKEN.findall(text)) == text


KINDS = ["flip", "insert", "delete", "boundary", "nul", "long", "charset", "cut"]
# Labels that are not charsets, or that the stdlib's codecs treat in surprising ways.
CHARSETS = st.sampled_from(
    [b"idna", b"punycode", b"undefined", b"base64", b"zlib", b"utf-7", b"utf-16", b"utf-32"]
)
CHARSETS |= st.sampled_from([b"unknown-8bit", b"x-user-defined", b"utf8mb4", b"", b"gb2312"])


@st.composite
def mutated_mail(draw: st.DrawFn) -> bytes:
    """A fixture with bytes flipped, inserted or deleted, boundaries broken, NULs, long lines."""
    raw = bytearray(draw(st.sampled_from(FIXTURES)))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(KINDS))
        at = draw(st.integers(0, len(raw)))
        if kind == "flip" and raw:
            raw[min(at, len(raw) - 1)] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=40))
        elif kind == "delete":
            del raw[at : at + draw(st.integers(1, 200))]
        elif kind == "boundary":
            raw = bytearray(re.sub(rb"boundary=\"?[^\";\s]+", b'boundary="zz', bytes(raw)))
            raw = raw.replace(b"--", draw(st.sampled_from([b"-", b"--zz", b"---", b""])), 1)
        elif kind == "nul":
            raw[at:at] = b"\x00" * draw(st.integers(1, 20))
        elif kind == "long":
            raw[at:at] = b"\nX-Long: " + b"=?utf-8?q?a?= " * draw(st.integers(100, 3000)) + b"\n"
        elif kind == "charset":
            raw = bytearray(
                re.sub(rb"charset=\"?[\w-]+", b"charset=" + draw(CHARSETS), bytes(raw))
            )
        elif kind == "cut":
            del raw[at:]
    return bytes(raw)


@settings(FUZZ, max_examples=1200)
@given(st.binary(max_size=4000))
def test_arbitrary_bytes(raw: bytes) -> None:
    assert_renders(parse_mail(raw))


@settings(FUZZ, max_examples=1300)
@given(mutated_mail())
def test_mutated_fixtures(raw: bytes) -> None:
    mail = parse_mail(raw)
    assert isinstance(mail.problems, list)
    assert_renders(mail)


atoms = st.one_of(st.none(), st.integers(-5, 10**9), st.binary(max_size=30))
# Shapes like imapclient's BODYSTRUCTURE: nested tuples (and lists) of bytes, ints and NIL.
structures = st.recursive(
    st.tuples(atoms, atoms) | atoms,
    lambda inner: st.lists(inner, max_size=13).map(tuple) | st.lists(inner, max_size=4),
    max_leaves=40,
)


@settings(FUZZ, max_examples=600)
@given(mutated_mail(), st.integers(0, 3000), st.none() | structures)
def test_truncated_with_random_structure(raw: bytes, cut: int, structure: object) -> None:
    assert_renders(parse_mail(raw[:cut], structure=structure))


@FUZZ
@given(st.one_of(st.none(), st.binary(max_size=300), st.text(max_size=300)))
def test_decode_header_value_never_raises(value: str | bytes | None) -> None:
    assert isinstance(decode_header_value(value), str)


any_text = st.text(st.characters(blacklist_categories=()), max_size=5000)


@FUZZ
@given(
    subject=any_text,
    name=any_text,
    text=any_text,
    people=st.lists(any_text, max_size=20),
    files=st.lists(st.tuples(any_text, st.integers(-1, 10**13)), max_size=30),
    problems=st.lists(any_text, max_size=5),
)
def test_render_any_parsed_mail(
    subject: str,
    name: str,
    text: str,
    people: list[str],
    files: list[tuple[str, int]],
    problems: list[str],
) -> None:
    mail = ParsedMail(
        subject=subject,
        from_name=name,
        from_addr=name[:20],
        to=people,
        cc=people[::-1],
        date=datetime(2026, 1, 1, tzinfo=UTC),
        text=text,
        attachments=[Attachment(f, "application/octet-stream", size) for f, size in files],
        problems=problems,
    )
    assert_renders(mail)
