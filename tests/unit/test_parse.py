"""parse_mail on the hand-written fixtures in tests/mails: what a user would see."""

import base64
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage
from pathlib import Path

import pytest
from imapclient.response_parser import parse_fetch_response
from imapclient.response_types import BodyData

from bridge.mail.parse import Attachment, ParsedMail, parse_mail

MAILS = Path(__file__).parent.parent / "mails"
CET = timezone(timedelta(hours=1))


def parse(name: str) -> ParsedMail:
    return parse_mail((MAILS / name).read_bytes())


def test_subject_multiple_encoded_words() -> None:
    mail = parse("subject-multiple-encoded-words.eml")
    assert mail.subject == "Réunion de l’équipe à 10 h demain (salle 2)"
    assert mail.message_id == "<multi-words@example.org>"
    assert mail.problems == []


def test_subject_gb18030_multiword() -> None:
    mail = parse("subject-gb18030-multiword.eml")
    # Labelled GB2312, contains GBK/GB18030-only characters, one split across two words.
    assert mail.subject == "会议纪要：朱镕基𠮷€"
    assert mail.text == "下周一开会，请朱镕基𠮷准时参加。"
    assert mail.problems == []


def test_subject_mixed_charsets() -> None:
    mail = parse("subject-mixed-charsets.eml")
    assert mail.subject == "Grüße aus Москвы und 日本の友"


def test_body_big5() -> None:
    mail = parse("body-big5.eml")
    assert mail.subject == "繁體中文"
    assert mail.text == "您好，這是繁體中文測試。"


def test_body_iso_2022_jp() -> None:
    mail = parse("body-iso-2022-jp.eml")
    assert mail.subject == "日本語のテスト"
    assert mail.text == "こんにちは、日本語のテストです。"


def test_body_koi8_r() -> None:
    mail = parse("body-koi8-r.eml")
    assert mail.subject == "Привет"
    assert mail.text == "Привет, это тест.\nВторая строка."


def test_body_windows_1252_qp() -> None:
    mail = parse("body-windows-1252-qp.eml")
    assert mail.subject == "Café “crème”"
    sentence = "Prix : 10 € – “entre guillemets” au café."
    assert mail.text == f"{sentence} {sentence}"
    assert mail.problems == []


def test_body_unknown_charset() -> None:
    mail = parse("body-unknown-charset.eml")
    assert mail.text == "Grüße aus Köln 👋"
    assert mail.problems == ["unknown charset 'utf8mb4' in text"]


def test_body_unknown_8bit_falls_back_to_windows_1252() -> None:
    mail = parse("body-unknown-8bit-latin1.eml")
    assert mail.text == "Crème brûlée € 5"
    assert mail.problems


def test_body_wrong_charset_label() -> None:
    mail = parse("body-wrong-charset-label.eml")
    assert mail.text == "Zürich — naïve ☕"
    assert mail.problems == ["text labelled 'us-ascii' is really UTF-8"]


def test_body_base64_utf8() -> None:
    mail = parse("body-base64-utf8.eml")
    assert mail.text == "Hello 世界! Emoji: 🎉🚀\nSecond line."


def test_body_broken_base64_decodes_what_it_can() -> None:
    mail = parse("body-broken-base64.eml")
    assert mail.text.startswith("Dies ist ein langer Text über Bäume")
    assert mail.problems == ["a base64 part is damaged or incomplete"]


def test_body_format_flowed_is_unwrapped() -> None:
    mail = parse("body-flowed.eml")
    assert mail.text.split("\n")[:3] == [
        "This paragraph was wrapped by the mailer and should read as one line.",
        "",
        "Space-stuffed line.",
    ]


def test_attachment_rfc2231_filename() -> None:
    mail = parse("attachment-rfc2231-filename.eml")
    assert mail.text == "See attached."
    assert mail.attachments == [
        Attachment("报告— Q3.pdf", "application/pdf", 130),
        Attachment("Grüße.txt", "text/plain", 5),
    ]


def test_attachment_rfc2047_filename() -> None:
    mail = parse("attachment-rfc2047-filename.eml")
    docx = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
    assert mail.attachments == [
        Attachment("Résumé 2026.docx", docx, 300),
        Attachment("föto.jpg", "image/jpeg", 100),
    ]


def test_alternative_prefers_plain_and_reads_all_headers() -> None:
    mail = parse("alternative-plain-and-html.eml")
    assert mail.text == "Plain version – read me."
    assert (mail.from_name, mail.from_addr) == ("Müller, Jürgen", "juergen@example.de")
    assert mail.to == ["Doe, Jane <jane@example.com>", "bob@example.net"]
    assert mail.cc == ["Zoë <zoe@example.com>"]
    assert mail.reply_to == ["replies@example.de"]
    assert mail.date == datetime(2026, 11, 27, 9, 15, tzinfo=CET)
    assert mail.message_id == "<alt-1@example.de>"
    assert mail.in_reply_to == "<parent@example.com>"
    assert mail.references == ["<root@example.com>", "<parent@example.com>"]
    assert mail.attachments == []
    assert mail.problems == []


def test_html_only_drops_script_and_style() -> None:
    mail = parse("html-only-with-script-style.eml")
    assert "Weekly\xa0news" in mail.text or "Weekly news" in mail.text
    assert "Tom & Jerry <3 café €5" in mail.text
    assert "  * First\n  * Second" in mail.text
    for hidden in ("alert", "color", "tracking", "<p>", "&amp;"):
        assert hidden not in mail.text


def test_related_inline_image_is_an_attachment() -> None:
    mail = parse("related-inline-image.eml")
    assert mail.text == "Look:"
    assert mail.attachments == [Attachment("", "image/png", 512)]


def test_nested_rfc822_without_own_text() -> None:
    mail = parse("nested-rfc822.eml")
    assert mail.subject == "Fwd: Quarterly numbers"
    assert mail.text == "Revenue is up 12 %."
    assert len(mail.attachments) == 1
    nested = mail.attachments[0]
    assert (nested.filename, nested.content_type) == ("Quarterly numbers — Q3", "message/rfc822")
    assert nested.size > 200


def test_html_special_chars_subject_is_kept_literally() -> None:
    mail = parse("html-special-chars-subject.eml")
    assert mail.subject == "<b>&amp;</b> *_[ `x` ]"
    assert (mail.from_name, mail.from_addr) == ("<script>", "evil@example.com")
    assert mail.date is None


def test_no_headers_garbage() -> None:
    mail = parse("no-headers-garbage.eml")
    assert (mail.subject, mail.from_addr, mail.to, mail.date) == ("", "", [], None)
    assert "garbage" in mail.text
    assert "\x00" not in mail.text
    assert "the mail has no headers" in mail.problems


def test_missing_boundary_is_recovered() -> None:
    mail = parse("missing-boundary.eml")
    assert mail.text == "The text is still here."
    assert mail.attachments == [Attachment("data.bin", "application/octet-stream", 3)]
    assert "multipart without a boundary" in mail.problems


def test_header_8bit_invalid_utf8() -> None:
    mail = parse("header-8bit-invalid-utf8.eml")
    assert mail.subject == "Crème brûlée"
    assert (mail.from_name, mail.from_addr) == ("François Café", "francois@example.fr")
    assert mail.problems == ["a header has 8-bit characters that are not UTF-8"]


def test_header_8bit_valid_utf8_is_not_a_problem() -> None:
    mail = parse_mail("Subject: Grüße 👋\nFrom: Zoë <z@example.com>\n\nx\n".encode())
    assert (mail.subject, mail.from_name, mail.problems) == ("Grüße 👋", "Zoë", [])


def test_huge_body_is_cut_at_text_limit() -> None:
    raw = (MAILS / "huge-body.eml").read_bytes() + "Straße ".encode() * 1_000_000
    mail = parse_mail(raw)
    assert len(mail.text) == 20_000
    assert mail.text.startswith("Start of a very long text.\nStraße Straße")
    assert len(parse_mail(raw, text_limit=100).text) == 100


@pytest.mark.parametrize("raw", [b"", b"\x00" * 50, b"\r\n\r\n", b"Subject: only a header"])
def test_degenerate_input(raw: bytes) -> None:
    mail = parse_mail(raw)
    assert isinstance(mail, ParsedMail)
    assert mail.attachments == []


def test_empty_mail_says_so() -> None:
    assert parse_mail(b"").problems == ["the mail is empty"]


def test_absurd_nesting_still_gives_headers() -> None:
    raw = b"Subject: deep\nContent-Type: multipart/mixed; boundary=b0\n\n"
    raw += b"".join(
        b"--b%d\nContent-Type: multipart/mixed; boundary=b%d\n\n" % (i, i + 1) for i in range(3000)
    )
    mail = parse_mail(raw)
    assert mail.subject == "deep"
    assert mail.problems


@pytest.mark.parametrize("label", ["idna", "punycode", "undefined", "base64", "zlib"])
def test_labels_that_are_codecs_but_not_charsets(label: str) -> None:
    for ctype in ("text/plain", "message/rfc822", "multipart/mixed"):
        raw = f"Content-Type: {ctype}; charset={label}\n\nhello \xe9\n".encode("latin-1")
        mail = parse_mail(raw)
        assert mail.text == "hello é"
        assert not [p for p in mail.problems if "Error" in p]


def test_date_minus_zero_is_utc_and_bad_date_is_none() -> None:
    mail = parse_mail(b"Date: Fri, 27 Nov 2026 09:15:00 -0000\n\nx")
    assert mail.date == datetime(2026, 11, 27, 9, 15, tzinfo=UTC)
    bad = parse_mail(b"Date: yesterday-ish\n\nx")
    assert bad.date is None
    assert bad.problems == ["the Date header cannot be read"]


def test_sender_without_address() -> None:
    mail = parse_mail(b"From: Mailer Daemon\n\nx")
    assert (mail.from_name, mail.from_addr) == ("Mailer Daemon", "")


# A mail whose attachment is much larger than the prefix the IMAP watcher fetches.
BIG = base64.encodebytes(b"\x00" * 300_000)
BIG_MAIL = (
    b"From: Alice <alice@example.org>\r\nSubject: Big\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="xyz"\r\n\r\n'
    b"--xyz\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThe report is attached.\r\n"
    b'--xyz\r\nContent-Type: application/pdf; name="=?UTF-8?B?5oql5ZGKLnBkZg==?="\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b"Content-Disposition: attachment; filename*=utf-8''%E6%8A%A5%E5%91%8A.pdf\r\n\r\n"
    + BIG.replace(b"\n", b"\r\n")
    + b"--xyz--\r\n"
)


def big_structure() -> BodyData:
    """What imapclient returns for BIG_MAIL's BODYSTRUCTURE (RFC 3501 §7.4.2 field order)."""
    text = (b"text", b"plain", (b"charset", b"utf-8"), None, None, b"7bit", 25, 1, None, None)
    name = (b"name", b"=?UTF-8?B?5oql5ZGKLnBkZg==?=")
    disposition = (b"attachment", (b"filename*", b"utf-8''%E6%8A%A5%E5%91%8A.pdf"))
    size = len(BIG.replace(b"\n", b"\r\n"))
    pdf = (
        b"application",
        b"pdf",
        name,
        None,
        None,
        b"base64",
        size,
        None,
        disposition,
        None,
        None,
    )
    return BodyData.create((text, pdf, b"mixed", (b"boundary", b"xyz"), None, None, None))


def test_structure_gives_complete_attachments_for_truncated_raw() -> None:
    structure = big_structure()
    assert structure.is_multipart
    mail = parse_mail(BIG_MAIL[:1000], structure=structure)
    assert mail.subject == "Big"
    assert mail.text == "The report is attached."
    # 410,528 encoded octets x 57/78, one byte over the real 300,000.
    assert mail.attachments == [Attachment("报告.pdf", "application/pdf", 300_001)]
    # The missing end of a deliberately truncated fetch is not a problem worth reporting.
    assert mail.problems == []


def test_without_structure_truncated_raw_still_parses() -> None:
    mail = parse_mail(BIG_MAIL[:1000])
    assert mail.text == "The report is attached."
    assert [a.filename for a in mail.attachments] == ["报告.pdf"]
    whole = parse_mail(BIG_MAIL)
    assert whole.attachments == [Attachment("报告.pdf", "application/pdf", 300_000)]
    assert whole.problems == []


def test_prefix_cut_inside_a_character_loses_only_that_character() -> None:
    raw = b"Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + "Grüße ".encode() * 50
    cut = raw.rindex("ü".encode()) + 1  # the fetch ends in the middle of the last "ü"
    structure = BodyData.create((b"text", b"plain", None, None, None, b"8bit", 400, 50))
    mail = parse_mail(raw[:cut], structure=structure)
    assert mail.text == ("Grüße " * 50)[: mail.text.rindex("G")] + "Gr"
    assert mail.problems == []


def test_structure_from_imap_response_with_continuations_and_nested_mail() -> None:
    line = (
        b'1 (UID 7 BODYSTRUCTURE (("text" "html" ("charset" "utf-8") NIL NIL "quoted-printable"'
        b' 120 3 NIL NIL NIL NIL)("image" "png" NIL "<logo>" NIL "base64" 4000 NIL'
        b' ("inline" NIL) NIL NIL)("application" "octet-stream" NIL NIL NIL "base64" 400 NIL'
        b' ("attachment" ("filename*0*" "utf-8\'\'%E2%82%AC%20rates" "filename*1" " 2026.xlsx"))'
        b' NIL NIL)("message" "rfc822" NIL NIL NIL "7bit" 900 ("Mon, 1 Jan 2024 00:00:00 +0000"'
        b' "=?UTF-8?Q?Fwd=3A_caf=C3=A9?=" NIL NIL NIL NIL NIL NIL NIL "<in@x>")'
        b' (("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 10 1 NIL NIL NIL NIL)'
        b'("application" "zip" ("name" "inner.zip") NIL NIL "base64" 100 NIL NIL NIL NIL)'
        b' "mixed" ("boundary" "in") NIL NIL NIL) 20 NIL ("attachment" NIL) NIL NIL)'
        b' "mixed" ("boundary" "out") NIL NIL NIL))'
    )
    structure = parse_fetch_response([line])[7][b"BODYSTRUCTURE"]
    mail = parse_mail(b"Subject: x\r\n\r\n", structure=structure)
    assert mail.attachments == [
        Attachment("", "image/png", 2923),
        Attachment("€ rates 2026.xlsx", "application/octet-stream", 292),
        Attachment("Fwd: café", "message/rfc822", 900),
    ]


@pytest.mark.parametrize(("size", "estimate"), [(130, 133), (100_000, 100_003)])
def test_structure_base64_size_is_close_to_the_real_size(size: int, estimate: int) -> None:
    message = EmailMessage()
    message.add_attachment(bytes(size), maintype="application", subtype="zip")
    body = next(message.iter_attachments()).get_payload()
    # IMAP counts the part as stored on the wire: 76-character lines ending in CRLF.
    octets = len(body.replace("\n", "\r\n"))
    structure = BodyData.create((b"application", b"zip", None, None, None, b"base64", octets))
    mail = parse_mail(b"Subject: x\r\n\r\n", structure=structure)
    assert mail.attachments == [Attachment("", "application/zip", estimate)]
    # Within 1 %, or a few bytes for a small part (padding and the short last line).
    assert abs(estimate - size) <= max(size // 100, 3)


def test_structure_single_part_and_garbage() -> None:
    single = BodyData.create((b"image", b"jpeg", None, None, None, b"base64", 400, None, None))
    assert parse_mail(b"Subject: photo\r\n\r\n", structure=single).attachments == [
        Attachment("", "image/jpeg", 292)
    ]
    text_only = BodyData.create((b"TEXT", b"PLAIN", None, None, None, b"7BIT", 4, 1))
    assert parse_mail(b"\r\n\r\nbody", structure=text_only).attachments == []
    broken = parse_mail(b"Subject: x\r\n\r\nhi", structure="not a bodystructure")
    assert broken.text == "hi"
    assert "the IMAP BODYSTRUCTURE could not be read" in broken.problems
