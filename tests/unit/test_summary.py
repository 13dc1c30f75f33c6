"""render_summary / render_unparseable: escaping, Telegram's length limit, layout."""

import html
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from bridge.mail.parse import Attachment, ParsedMail, parse_mail
from bridge.mail.summary import (
    MAX_MESSAGE,
    BatchLine,
    format_size,
    render_batch,
    render_summary,
    render_unparseable,
)

MAILS = Path(__file__).parent.parent / "mails"
# Telegram HTML as we use it: <b>, <i> and the three entities; any other "<" or "&" is broken.
TOKEN = re.compile(r"</?[bi]>|&(?:lt|gt|amp|quot);|[^<>&]+")


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def assert_telegram_html(text: str) -> None:
    """Valid for parse_mode HTML and within the Bot API length limit."""
    assert text.strip()
    assert utf16_len(text) <= MAX_MESSAGE
    tokens = TOKEN.findall(text)
    assert "".join(tokens) == text, "a stray < > or & (or a cut entity) is in the text"
    open_tags: list[str] = []
    for token in tokens:
        if token in ("<b>", "<i>"):
            open_tags.append(token[1])
        elif token in ("</b>", "</i>"):
            assert open_tags[-1:] == [token[2]]
            open_tags.pop()
    assert not open_tags


def test_layout_of_a_normal_mail() -> None:
    mail = ParsedMail(
        subject="Quarterly report",
        from_name="Alice Example",
        from_addr="alice@example.org",
        to=["Bob <bob@example.net>"],
        date=datetime(2026, 11, 27, 9, 15, tzinfo=timezone(timedelta(hours=1))),
        text="Hello Bob,\n\n\n\nplease   find the report attached.\r\nThanks",
        attachments=[
            Attachment("report.pdf", "application/pdf", 1_258_291),
            Attachment("photo.jpg", "image/jpeg", 348_160),
        ],
    )
    assert render_summary(mail) == (
        "📧 <b>Quarterly report</b>\n"
        "From: Alice Example &lt;alice@example.org&gt;\n"
        "Date: 2026-11-27 09:15 +0100\n"
        "To: Bob &lt;bob@example.net&gt;\n"
        "\n"
        "Hello Bob,\n\nplease find the report attached.\nThanks\n"
        "\n"
        "📎 report.pdf (1.2 MB), photo.jpg (340 KB)"
    )


def test_html_in_subject_sender_and_body_shows_literally() -> None:
    text = render_summary(parse_mail((MAILS / "html-special-chars-subject.eml").read_bytes()))
    assert text.startswith("📧 <b>&lt;b&gt;&amp;amp;&lt;/b&gt; *_[ `x` ]</b>\n")
    assert "From: &lt;script&gt; &lt;evil@example.com&gt;" in text
    assert "Body with &lt;i&gt;tags&lt;/i&gt; &amp; ampersands &amp;lt; and [links]" in text
    assert_telegram_html(text)


def test_missing_pieces() -> None:
    text = render_summary(ParsedMail())
    assert text == "📧 <b>(no subject)</b>\nFrom: (unknown sender)"
    assert render_summary(ParsedMail(from_addr="a@b.c")).endswith("From: a@b.c")
    assert render_summary(ParsedMail(from_name="Daemon")).endswith("From: Daemon")


def test_preview_is_cut_at_a_word_boundary() -> None:
    mail = ParsedMail(text="word " * 1000)
    body = render_summary(mail, preview_chars=50).split("\n\n")[1]
    assert body == ("word " * 10).strip() + "…"
    assert len(body) <= 50
    assert "\n\n" not in render_summary(mail, preview_chars=0)


def test_many_recipients_are_shortened() -> None:
    mail = ParsedMail(to=[f"user{i}@example.com" for i in range(50)], cc=["x@y.z"])
    text = render_summary(mail)
    assert "To: user0@example.com, user1@example.com, user2@example.com, +47 more" in text
    assert "Cc: x@y.z" in text


def test_problems_are_mentioned_in_italics() -> None:
    text = render_summary(ParsedMail(subject="s", problems=["unknown charset 'x'", "other"]))
    assert text.endswith(
        "<i>⚠️ could not decode part of this mail: unknown charset 'x' (+1 more)</i>"
    )
    assert "⚠️" not in render_summary(ParsedMail(subject="s"))


def test_huge_everything_fits_4096_utf16_units() -> None:
    mail = ParsedMail(
        subject="<&>😀 " * 5000,
        from_name="&" * 5000,
        from_addr="a@b.c",
        to=["<x>" * 1000] * 100,
        cc=["😀" * 1000],
        text="😀&<> " * 20_000,
        attachments=[Attachment("&😀" * 500, "application/pdf", 10**12)] * 1000,
        problems=["<&>" * 1000] * 50,
    )
    for preview in (0, 1200, 4096, 100_000):
        text = render_summary(mail, preview_chars=preview)
        assert_telegram_html(text)


def test_long_body_uses_the_room_left() -> None:
    text = render_summary(ParsedMail(subject="s", text="a" * 10_000), preview_chars=10_000)
    assert_telegram_html(text)
    assert utf16_len(text) > MAX_MESSAGE - 50
    assert text.endswith("…")


@pytest.mark.parametrize("unit", ["&", "<", ">", "😀", "é"])
def test_cut_never_splits_an_entity_or_a_surrogate_pair(unit: str) -> None:
    for length in range(4080, 4110):
        text = render_summary(ParsedMail(text=unit * length), preview_chars=length)
        assert_telegram_html(text)


def test_many_attachments_are_summarised() -> None:
    mail = ParsedMail(attachments=[Attachment(f"file{i}.txt", "text/plain", i) for i in range(25)])
    line = render_summary(mail).split("\n")[-1]
    assert line.startswith("📎 file0.txt (0 B), file1.txt (1 B)")
    assert line.endswith(", +15 more")
    unnamed = render_summary(ParsedMail(attachments=[Attachment("", "image/png", 2048)]))
    assert unnamed.endswith("📎 image/png (2.0 KB)")


def test_control_characters_and_lone_surrogates_are_removed() -> None:
    mail = ParsedMail(subject="a\x00b\x07c\ud800d\u202ee", text="x\x1by\tz\ud83d")
    text = render_summary(mail)
    assert text.startswith("📧 <b>abcde</b>")
    assert text.endswith("\n\nxy z")  # the tab is whitespace, normalised like the rest
    text.encode("utf-8")  # no lone surrogate survived


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1.0 KB"),
        (1229, "1.2 KB"),
        (348_160, "340 KB"),
        (1_024_000, "1.0 MB"),
        (3_565_158, "3.4 MB"),
        (52_428_800, "50 MB"),
        (5 * 1024**3, "5.0 GB"),
        (5000 * 1024**3, "5000 GB"),
        (-3, "0 B"),
    ],
)
def test_format_size(size: int, expected: str) -> None:
    assert format_size(size) == expected


def test_every_fixture_renders() -> None:
    for path in sorted(MAILS.glob("*.eml")):
        assert_telegram_html(render_summary(parse_mail(path.read_bytes())))


def test_render_unparseable() -> None:
    text = render_unparseable(42, 1_258_291, "fetch failed: <timeout> & more")
    assert text == (
        "📧 <b>A new mail could not be read</b>\n"
        "IMAP UID 42 (1.2 MB)\n"
        "<i>fetch failed: &lt;timeout&gt; &amp; more</i>"
    )
    assert "IMAP UID 7\n" in render_unparseable(7, None, "")
    assert_telegram_html(render_unparseable(7, None, "&" * 10_000))


def test_render_batch_lists_each_mail_oldest_first() -> None:
    lines = [
        BatchLine("Alice", "a@x.org", "<Hi>"),
        BatchLine("", "b@y.org", ""),
        BatchLine("", "", ""),
    ]
    assert render_batch(lines) == (
        "📬 <b>3 new mails</b>\n"
        "1. Alice: &lt;Hi&gt;\n"
        "2. b@y.org: (no subject)\n"
        "3. (unknown sender): (no subject)"
    )
    assert render_batch(lines[:1], "home").startswith("📬 <b>1 new mail</b> · home\n")


def test_render_batch_of_a_backlog_shows_newest_and_busiest_senders() -> None:
    lines = [BatchLine("", f"s{n % 3}@x.org", f"Backlog {n:04}") for n in range(2000)]
    lines += [BatchLine("Boss", "boss@x.org", "<&😀>" * 200) for _ in range(5)]
    text = render_batch(lines)
    assert_telegram_html(text)
    assert text.startswith("📬 <b>2005 new mails</b>\n")
    assert "Backlog 0000" not in text  # the newest, not the oldest
    assert "1996. s0@x.org: Backlog 1995" in text
    assert "2005. Boss: " in text
    assert "s0@x.org (667)" in text
    assert "s1@x.org (667)" in text


def test_split_text_keeps_paragraphs_and_limits() -> None:
    from bridge.mail.summary import split_text

    paragraphs = [f"Paragraph {n} " + "word & <tag> " * 40 for n in range(30)]
    text = "\n\n".join(paragraphs)
    chunks = split_text(text, limit=1000)
    assert len(chunks) > 1
    for chunk in chunks:
        assert_telegram_html(chunk)
        assert len(chunk.encode("utf-16-le")) // 2 <= 1000
    joined = "\n\n".join(chunks)
    for paragraph in paragraphs:  # never cut inside a paragraph that fits one message
        assert html.escape(paragraph.strip(), quote=False) in joined


def test_split_text_cuts_a_giant_line_without_losing_text() -> None:
    from bridge.mail.summary import split_text

    line = "😀&" * 5000  # one line, far over one message, entities and surrogate pairs
    chunks = split_text(line)
    assert all(len(c.encode("utf-16-le")) // 2 <= 4096 for c in chunks)
    assert html.unescape("".join(chunks)) == line


def test_render_list_of_50_long_lines_fits_and_keeps_time_zones() -> None:
    from bridge.mail.summary import ListLine, render_list

    when = datetime(2026, 11, 30, 9, 5, tzinfo=timezone(timedelta(hours=-5)))
    lines = [
        ListLine(when, "Ann \u202eevil\u202c Example" * 5, "A rather long subject line " * 8)
        for _ in range(50)
    ]
    text = render_list("Newest 50 in INBOX", lines)
    assert_telegram_html(text)
    assert len(text.encode("utf-16-le")) // 2 <= 4096
    assert text.count("\n") == 50
    assert "30 Nov 09:05 -0500" in text
    assert "\u202e" not in text  # bidi overrides stripped as in summaries
