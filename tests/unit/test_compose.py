"""compose.py: addresses, reply subject/references, header safety and what a reader decodes."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime
from email.message import EmailMessage

import pytest

from bridge.mail.compose import (
    MAX_REFERENCES,
    InvalidMail,
    OutgoingAttachment,
    OutgoingMail,
    build_message,
    envelope_recipients,
    make_message_id,
    parse_addresses,
    reply_references,
    reply_subject,
)

SENDER = "Bridge <bridge@example.org>"
MSG_ID = "<0123456789abcdef@example.org>"

TEXTS = {
    "german": ("Grüße aus München – Straße", "Hallo Jörg,\n\nÄpfel, Öl und Übermaß. ß\n"),
    "chinese": ("会议纪要：下周一", "各位好，\n\n请查收附件中的会议纪要。\n谢谢！"),
    "japanese": (
        "お見積もりのご依頼",
        "いつもお世話になっております。\nよろしくお願いいたします。",
    ),
    "russian": ("Привет, мир", "Здравствуйте!\nЭто письмо на русском языке."),
    "arabic": ("مرحبا بالعالم", "السلام عليكم\nهذه رسالة باللغة العربية."),
    "emoji": ("Party 🎉🥳 time 👨‍👩‍👧", "See you there 🍕🍺\n👍🏽 thumbs\n"),
    "mixed": ("Re: Ünïcödé ✓ 漢字 and ASCII", "plain line\nZeile mit ä\n中文行\n"),
}


def roundtrip(msg: EmailMessage) -> EmailMessage:
    """What a mail reader gets: the bytes on the wire parsed with the modern policy."""
    data = msg.as_bytes(policy=email.policy.SMTP)
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def body_of(msg: EmailMessage) -> str:
    part = msg.get_body(preferencelist=("plain",))
    assert part is not None
    text = part.get_content()
    assert isinstance(text, str)
    return text.replace("\r\n", "\n")


def expected_body(body: str) -> str:
    """The body as sent: line breaks normalised, and ending with one (text/plain convention)."""
    text = body.replace("\r\n", "\n").replace("\r", "\n")
    return text if text.endswith("\n") else text + "\n"


def mail(**kwargs: object) -> OutgoingMail:
    fields: dict[str, object] = {"to": ("to@example.org",), "subject": "s", "body": "b"}
    fields.update(kwargs)
    return OutgoingMail(**fields)  # type: ignore[arg-type]


def build(m: OutgoingMail) -> EmailMessage:
    return build_message(m, SENDER, message_id=MSG_ID)


# --- languages ------------------------------------------------------------------------------


@pytest.mark.parametrize(("subject", "body"), TEXTS.values(), ids=TEXTS.keys())
def test_subject_and_body_survive_in_any_language(subject: str, body: str) -> None:
    msg = build(mail(to=("Jörg Müller <j@example.org>",), subject=subject, body=body))
    data = bytes(msg)
    assert data.isascii(), "headers and body are 7-bit: no 8BITMIME needed"
    parsed = roundtrip(msg)
    assert parsed["Subject"] == subject
    assert body_of(parsed) == expected_body(body)
    assert parsed.get_content_type() == "text/plain"
    assert parsed.get_content_charset() == "utf-8"
    assert parsed["To"].addresses[0].display_name == "Jörg Müller"


def test_long_line_survives_and_wire_lines_stay_short() -> None:
    body = "start " + "x" * 2000 + " end\nsecond line"
    parsed = roundtrip(build(mail(body=body)))
    assert body_of(parsed) == expected_body(body)
    wire = build(mail(body=body)).as_bytes(policy=email.policy.SMTP)
    assert max(len(line) for line in wire.split(b"\r\n")) <= 78


def test_long_non_ascii_line_survives() -> None:
    body = "日本語の文章。" * 400
    assert body_of(roundtrip(build(mail(body=body)))) == expected_body(body)


def test_whitespace_in_body_is_kept() -> None:
    body = "  leading\ntrailing   \n\n\n\ttab\tinside  double  spaces\n \n"
    assert body_of(roundtrip(build(mail(body=body)))) == body


def test_crlf_and_lone_cr_in_body_become_line_breaks() -> None:
    body = "one\r\ntwo\rthree\nfour"
    assert body_of(roundtrip(build(mail(body=body)))) == "one\ntwo\nthree\nfour\n"


def test_plain_ascii_body_is_7bit() -> None:
    msg = build(mail(body="Hello\nworld"))
    assert msg["Content-Transfer-Encoding"] == "7bit"


@pytest.mark.parametrize(
    ("body", "cte"),
    [
        ("Viele Grüße aus dem schönen Norden, Jörg", "quoted-printable"),
        ("trailing space ", "quoted-printable"),
        ("a" * 100, "quoted-printable"),
        ("中文中文中文", "base64"),
    ],
)
def test_body_encoding_choice(body: str, cte: str) -> None:
    assert build(mail(body=body))["Content-Transfer-Encoding"] == cte


def test_dot_and_from_lines_survive() -> None:
    body = ".\n..\nFrom here\n.leading dot"
    assert body_of(roundtrip(build(mail(body=body)))) == expected_body(body)


def test_long_subject_is_folded_and_decodes() -> None:
    subject = "Sehr lange Betreffzeile mit Umlauten äöü " * 10 + "😀"
    msg = build(mail(subject=subject))
    assert roundtrip(msg)["Subject"] == subject.strip()
    assert all(len(line) <= 78 for line in bytes(msg).split(b"\r\n"))


# --- headers ----------------------------------------------------------------------------------


def test_required_headers() -> None:
    date = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    msg = build_message(
        mail(to=("a@example.org", "B <b@example.net>"), cc=("c@example.com",)),
        SENDER,
        message_id=MSG_ID,
        date=date,
    )
    parsed = roundtrip(msg)
    assert parsed["From"] == "Bridge <bridge@example.org>"
    assert [a.addr_spec for a in parsed["To"].addresses] == ["a@example.org", "b@example.net"]
    assert [a.addr_spec for a in parsed["Cc"].addresses] == ["c@example.com"]
    assert parsed["Message-ID"] == MSG_ID
    assert parsed["MIME-Version"] == "1.0"
    assert parsed["Date"].datetime == date


def test_date_defaults_to_now_utc() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    parsed = roundtrip(build(mail()))
    assert before <= parsed["Date"].datetime <= datetime.now(UTC)


def test_bcc_only_in_envelope() -> None:
    m = mail(to=("a@example.org",), cc=("c@example.org",), bcc=("Hidden <hidden@example.org>",))
    data = bytes(build(m))
    assert b"hidden" not in data.lower()
    assert b"bcc" not in data.lower()
    assert envelope_recipients(m) == ["a@example.org", "c@example.org", "hidden@example.org"]


def test_bcc_only_mail_is_allowed() -> None:
    m = mail(to=(), bcc=("hidden@example.org",))
    parsed = roundtrip(build(m))
    assert parsed["To"] is None
    assert envelope_recipients(m) == ["hidden@example.org"]


def test_no_recipient_at_all_is_refused() -> None:
    with pytest.raises(InvalidMail, match="no recipient"):
        build(mail(to=()))


def test_envelope_is_bare_and_deduplicated() -> None:
    m = mail(
        to=("A <a@example.org>", "b@example.org"),
        cc=("a@example.org", "C <c@example.org>"),
        bcc=("b@example.org", "d@EXAMPLE.org"),
    )
    assert envelope_recipients(m) == [
        "a@example.org",
        "b@example.org",
        "c@example.org",
        "d@example.org",
    ]


def test_reply_headers() -> None:
    refs = reply_references(["<root@x.org>", "<mid@x.org>"], "<orig@x.org>")
    parsed = roundtrip(build(mail(in_reply_to="<orig@x.org>", references=refs)))
    assert parsed["In-Reply-To"] == "<orig@x.org>"
    assert parsed["References"].split() == ["<root@x.org>", "<mid@x.org>", "<orig@x.org>"]


def test_no_threading_headers_for_a_new_mail() -> None:
    parsed = roundtrip(build(mail()))
    assert parsed["In-Reply-To"] is None
    assert parsed["References"] is None


def test_malformed_threading_ids_are_dropped() -> None:
    m = mail(in_reply_to="<a@b>\r\nBcc: x@y.org", references=("<ok@x.org>", "bad id\nX: y"))
    data = bytes(build(m))
    assert b"Bcc" not in data
    assert b"X: y" not in data
    parsed = roundtrip(build(m))
    assert parsed["References"] == "<ok@x.org>"


def test_bad_message_id_refused() -> None:
    with pytest.raises(InvalidMail):
        build_message(mail(), SENDER, message_id="<a@b>\r\nBcc: x@y.org")


# --- addresses --------------------------------------------------------------------------------


def test_parse_addresses_list_forms() -> None:
    got = parse_addresses('a@x.org, B <b@y.de>; "Müller, Jörg" <j@z.net>,, ')
    assert got == ("a@x.org", "B <b@y.de>", '"Müller, Jörg" <j@z.net>')


def test_parse_addresses_normalises_idn_domain() -> None:
    assert parse_addresses("Info <info@Bücher.de>") == ("Info <info@xn--bcher-kva.de>",)


def test_parse_addresses_accepts_local_domains() -> None:
    # The configured relay decides whether an intranet name is deliverable.
    got = parse_addresses("a@x.org, B <b@y.de>; c@z, e@mail.test")
    assert got == ("a@x.org", "B <b@y.de>", "c@z", "e@mail.test")


def test_parse_addresses_empty() -> None:
    with pytest.raises(InvalidMail, match="no recipient"):
        parse_addresses(" , ;")


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("not-an-address", "not-an-address"),
        ("a@x.org, b@@y.de", "b@@y.de"),
        ("a@x.org b@y.de", "a@x.org b@y.de"),
        ("Name <a@x.org> trailing", "trailing"),
        ("<a@x.org", "<a@x.org"),
        ("a@-bad-.org", "a@-bad-.org"),
        ("a@b..org", "a@b..org"),
        ("a@host.local", "a@host.local"),
    ],
)
def test_parse_addresses_names_the_bad_one(text: str, named: str) -> None:
    with pytest.raises(InvalidMail) as info:
        parse_addresses(text)
    message = str(info.value)
    assert named in message
    assert "\n" not in message


def test_non_ascii_local_part_refused() -> None:
    with pytest.raises(InvalidMail, match="müller"):
        parse_addresses("müller@example.de")


# --- header injection and unicode tricks ----------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "a@b.org\r\nBcc: victim@y.org",
        "a@b.org\nBcc: victim@y.org",
        "a@b.org\rBcc: victim@y.org",
        "Name\r\n <a@b.org>",
        '"Evil\r\nBcc: victim@y.org" <a@b.org>',
        "a@b.org\x00victim@y.org",
        "a@b.org\x0bx",
        "a@b.org\u2028Bcc: victim@y.org",
        "a@b.org\x85Bcc: victim@y.org",
        "evil\u202egro.elpmaxe@b.org",  # right-to-left override
        '"\u202eelgoog" <a@b.org>',
        "a\u200b@b.org",  # zero-width space
        "a@b\u200c.org",  # zero-width non-joiner
        "a\u200d@b.org",  # zero-width joiner
        "\ufeffa@b.org",  # byte order mark
        "a@b.org\u2066",  # bidi isolate
    ],
)
def test_control_and_invisible_characters_in_addresses_refused(text: str) -> None:
    with pytest.raises(InvalidMail) as info:
        parse_addresses(text)
    assert "\n" not in str(info.value)
    assert "\r" not in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "a@b.org\r\nBcc: victim@y.org",
        "a@b.org, victim@y.org",
        "a@b.org victim@y.org",
        "Name <a@b.org>, victim@y.org",
        "<a@b.org><victim@y.org>",
    ],
)
def test_outgoing_mail_entries_must_be_one_address(text: str) -> None:
    m = mail(to=(text,))
    with pytest.raises(InvalidMail):
        build(m)
    with pytest.raises(InvalidMail):
        envelope_recipients(m)


def test_addresses_hidden_in_a_display_name_stay_a_display_name() -> None:
    (addr,) = parse_addresses('"evil@x.org, victim@y.org" <a@b.org>')
    m = mail(to=(addr,))
    assert envelope_recipients(m) == ["a@b.org"]
    parsed = roundtrip(build(m))
    (to,) = parsed["To"].addresses
    assert to.addr_spec == "a@b.org"
    assert to.display_name == "evil@x.org, victim@y.org"


def test_display_name_with_angle_brackets_and_quotes() -> None:
    (addr,) = parse_addresses(r'"Bob \"the <boss>\" Smith" <bob@b.org>')
    parsed = roundtrip(build(mail(to=(addr,))))
    (to,) = parsed["To"].addresses
    assert (to.display_name, to.addr_spec) == ('Bob "the <boss>" Smith', "bob@b.org")


@pytest.mark.parametrize(
    ("subject", "shown"),
    [
        ("Hello\r\nBcc: victim@y.org", "Hello Bcc: victim@y.org"),
        ("Hello\nBcc: victim@y.org", "Hello Bcc: victim@y.org"),
        ("Hello\rX-Evil: 1", "Hello X-Evil: 1"),
        ("a\x00b\tc", "a b c"),
        ("line\u2028sep", "line sep"),
        ("  \r\n  ", "(no subject)"),
    ],
)
def test_subject_line_breaks_become_spaces(subject: str, shown: str) -> None:
    msg = build(mail(subject=subject))
    data = bytes(msg)
    assert b"\r\nBcc:" not in data
    assert b"\r\nX-Evil" not in data
    parsed = roundtrip(msg)
    assert parsed["Subject"] == shown
    assert parsed["Bcc"] is None
    assert parsed["X-Evil"] is None


def test_filename_injection_neutralised() -> None:
    att = OutgoingAttachment("x.txt\r\nBcc: victim@y.org\r\n\r\nbody", "text/plain", b"data")
    data = bytes(build(mail(attachments=(att,))))
    assert b"\r\nBcc:" not in data
    parsed = roundtrip(build(mail(attachments=(att,))))
    (part,) = parsed.iter_attachments()
    assert part.get_filename() == "x.txtBcc: victim@y.orgbody"


@pytest.mark.parametrize(
    ("name", "cleaned"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\report.pdf", "report.pdf"),
        ("invoice\u202efdp.exe", "invoicefdp.exe"),
        ("zero\u200bwidth.txt", "zerowidth.txt"),
        ("..", "attachment"),
        ("", "attachment"),
    ],
)
def test_filename_tricks_removed(name: str, cleaned: str) -> None:
    att = OutgoingAttachment(name, "application/octet-stream", b"x")
    (part,) = roundtrip(build(mail(attachments=(att,)))).iter_attachments()
    assert part.get_filename() == cleaned


# --- attachments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "content_type", "expected_type"),
    [
        (
            "Prüfbericht über alles – Übersicht 2024 mit sehr langem Namen.pdf",
            "",
            "application/pdf",
        ),
        ("会议纪要.txt", "text/plain", "text/plain"),
        ("写真 📷.jpg", "", "image/jpeg"),
        ("данные.bin", "application/x-custom", "application/x-custom"),
        ("noext", "", "application/octet-stream"),
        ("weird.dat", "not a type", "application/octet-stream"),
        ("fwd.eml", "message/rfc822", "application/octet-stream"),
    ],
)
def test_attachment_round_trip(filename: str, content_type: str, expected_type: str) -> None:
    data = bytes(range(256)) * 10
    att = OutgoingAttachment(filename, content_type, data)
    body = "Anbei die Datei."
    parsed = roundtrip(build(mail(body=body, attachments=(att,))))
    assert parsed.get_content_type() == "multipart/mixed"
    assert body_of(parsed) == expected_body(body)
    (part,) = parsed.iter_attachments()
    assert part.get_filename() == filename
    assert part.get_content_type() == expected_type
    assert part.get_content_disposition() == "attachment"
    assert part.get_payload(decode=True) == data


def test_several_attachments_keep_order() -> None:
    atts = tuple(OutgoingAttachment(f"f{i}.txt", "", f"{i}".encode()) for i in range(3))
    parsed = roundtrip(build(mail(attachments=atts)))
    names = [part.get_filename() for part in parsed.iter_attachments()]
    assert names == ["f0.txt", "f1.txt", "f2.txt"]


# --- message id, reply subject, references ----------------------------------------------------


def test_message_id_uses_sender_domain() -> None:
    first = make_message_id("Bridge <bridge@Mail.Example.org>")
    second = make_message_id("bridge@mail.example.org")
    assert first.startswith("<")
    assert first.endswith("@mail.example.org>")
    assert first != second
    msg = build_message(mail(), SENDER, message_id=first)
    assert roundtrip(msg)["Message-ID"] == first


def test_message_id_with_idn_sender() -> None:
    assert make_message_id("a@bücher.de").endswith("@xn--bcher-kva.de>")


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("Hello", "Re: Hello"),
        ("Re: Hello", "Re: Hello"),
        ("RE: Hello", "RE: Hello"),
        ("re: re: Hello", "re: re: Hello"),
        ("re : Hello", "re : Hello"),
        ("Aw: Hallo", "Aw: Hallo"),
        ("AW: Hallo", "AW: Hallo"),
        ("Sv: Hej", "Sv: Hej"),
        ("Antw: Hoi", "Antw: Hoi"),
        ("Re[2]: Hello", "Re[2]: Hello"),
        ("回复：你好", "回复：你好"),
        ("Fwd: Hello", "Re: Fwd: Hello"),
        ("Reply needed", "Re: Reply needed"),
        ("Review", "Re: Review"),
        ("Area: 51", "Re: Area: 51"),
        ("  Hello  ", "Re: Hello"),
        ("Hello\r\n world", "Re: Hello  world"),
        ("", "Re: (no subject)"),
        ("   ", "Re: (no subject)"),
    ],
)
def test_reply_subject(subject: str, expected: str) -> None:
    assert reply_subject(subject) == expected


def test_reply_subject_never_doubles() -> None:
    once = reply_subject("Hello")
    assert reply_subject(once) == once


def test_reply_references_appends_and_dedups() -> None:
    got = reply_references(["<a@x>", "<b@x>", "<a@x>"], "<c@x>")
    assert got == ("<a@x>", "<b@x>", "<c@x>")
    assert reply_references([], "<c@x>") == ("<c@x>",)
    assert reply_references(["<c@x>", "<d@x>"], "<c@x>") == ("<c@x>", "<d@x>")


def test_reply_references_drops_malformed() -> None:
    got = reply_references(["<a@x> <b@x>", "garbage", "<x\r\nBcc: v@y>"], "<c@x>")
    assert got == ("<a@x>", "<b@x>", "<c@x>")


def test_reply_references_caps_keeping_first_and_last() -> None:
    refs = [f"<r{i}@x.org>" for i in range(100)]
    got = reply_references(refs, "<orig@x.org>")
    assert len(got) == MAX_REFERENCES
    assert got[0] == "<r0@x.org>"
    assert got[-1] == "<orig@x.org>"
    assert got[-2] == "<r99@x.org>"
    parsed = roundtrip(build(mail(in_reply_to="<orig@x.org>", references=got)))
    assert tuple(parsed["References"].split()) == got
