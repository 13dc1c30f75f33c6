"""bridge.actions against real Dovecot: flags, moves and undo, full text, parts, search."""

from __future__ import annotations

import hashlib
import io
import os
import secrets
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import pytest

from bridge import actions
from bridge.actions import MailGone, MailLocation
from bridge.config import ImapSettings
from bridge.mail.parse import parse_mail
from tests.conftest import SECRETS
from tests.servers.certs import CA
from tests.servers.dovecot import DovecotServer, MailUser
from tests.servers.tcpproxy import TcpProxy

MAILS = Path(__file__).parent.parent / "mails"
ROLE_FOLDERS = ("Archive", "Trash", "Junk")


# Servers, users and mail


@pytest.fixture(scope="module")
def dovecot_no_move(ca: CA) -> Iterator[DovecotServer]:
    """A Dovecot that announces UIDPLUS but not MOVE (RFC 6851)."""
    with DovecotServer(ca, without_capabilities=("MOVE",)) as server:
        yield server


@pytest.fixture(scope="module")
def dovecot_no_uidplus(ca: CA) -> Iterator[DovecotServer]:
    """A Dovecot that announces neither MOVE nor UIDPLUS (RFC 4315)."""
    with DovecotServer(ca, without_capabilities=("MOVE", "UIDPLUS")) as server:
        yield server


def new_user(server: DovecotServer, *folders: str) -> MailUser:
    """A fresh user on `server` with the given folders."""
    user = MailUser(f"act-{secrets.token_hex(4)}", secrets.token_urlsafe(12))
    server.add_user(user.name, user.password)
    SECRETS.add(user.password)
    if folders:
        server.create_folders(user.name, user.password, *folders)
    return user


def settings(server: DovecotServer, user: MailUser, ca: CA, **extra: object) -> ImapSettings:
    """ImapSettings for `user` on `server` (or on a proxy's port, with port=...)."""
    fields: dict[str, object] = {
        "host": "127.0.0.1",
        "port": server.port,
        "username": user.name,
        "password": user.password,
        "ca_file": ca.ca_file,
        "timeout": 10,
    }
    fields.update(extra)
    return ImapSettings.model_validate(fields)


def mail(
    subject: str = "Hello",
    body: str = "Hello there.",
    *,
    sender: str = "Ann <ann@example.org>",
    to: str = "me@example.org",
) -> bytes:
    """A small UTF-8 mail with a unique Message-ID and CRLF line ends (as stored)."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="example.org")
    msg.set_content(body)
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def put(
    server: DovecotServer,
    user: MailUser,
    raw: bytes,
    folder: str = "INBOX",
    **kw: object,
) -> MailLocation:
    """Append `raw` and return its location as the watcher would record it."""
    uid = server.append(user.name, user.password, raw, folder, **kw)  # type: ignore[arg-type]
    return MailLocation(folder, uidvalidity(server, user, folder), uid, message_id(raw))


def uidvalidity(server: DovecotServer, user: MailUser, folder: str) -> int:
    client = server.connect(user.name, user.password)
    try:
        return int(client.select_folder(folder, readonly=True)[b"UIDVALIDITY"])
    finally:
        client.logout()


def message_id(raw: bytes) -> str:
    return parse_mail(raw).message_id


def contents(server: DovecotServer, user: MailUser, folder: str) -> dict[int, tuple[str, set]]:
    """{uid: (Message-ID, flags but \\Recent)} of a folder, read after EXAMINE."""
    client = server.connect(user.name, user.password)
    try:
        client.select_folder(folder, readonly=True)
        uids = client.search("ALL")
        data = client.fetch(uids, ["FLAGS", "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
    finally:
        client.logout()
    return {
        uid: (
            message_id(item[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"]),
            set(item[b"FLAGS"]) - {b"\\Recent"},  # RFC 3501: per session, not the mail's
        )
        for uid, item in data.items()
    }


def other_client_expunge(server: DovecotServer, user: MailUser, folder: str, uid: int) -> None:
    """What another mail client does to delete a mail for good."""
    client = server.connect(user.name, user.password)
    try:
        client.select_folder(folder)
        client.add_flags([uid], [b"\\Deleted"])
        client.uid_expunge([uid])
    finally:
        client.logout()


# Mark read / unread


async def test_set_seen_and_clear_it(dovecot, mail_user, ca) -> None:
    imap = settings(dovecot, mail_user, ca)
    loc = put(dovecot, mail_user, mail())
    assert await actions.is_seen(imap, loc) is False
    assert await actions.set_seen(imap, loc, True) == loc
    assert b"\\Seen" in dovecot.flags(mail_user.name, mail_user.password, loc.uid)
    assert await actions.is_seen(imap, loc) is True
    assert await actions.set_seen(imap, loc, False) == loc
    assert b"\\Seen" not in dovecot.flags(mail_user.name, mail_user.password, loc.uid)
    assert await actions.is_seen(imap, loc) is False


async def test_reading_never_sets_seen(dovecot, mail_user, ca) -> None:
    imap = settings(dovecot, mail_user, ca)
    loc = put(dovecot, mail_user, (MAILS / "attachment-rfc2231-filename.eml").read_bytes())
    assert "See attached." in (await actions.full_text(imap, loc)).text
    parts = await actions.attachment_parts(imap, loc)
    assert await actions.save_part(imap, loc, parts[0], io.BytesIO()) > 0
    assert await actions.save_raw(imap, loc, io.BytesIO()) > 0
    assert (await actions.fetch_summary_source(imap, loc)).uid == loc.uid
    assert await actions.locate(imap, loc) == loc
    await actions.search(imap, ["INBOX"], actions.SearchQuery(words=("attached",)))
    assert b"\\Seen" not in dovecot.flags(mail_user.name, mail_user.password, loc.uid)


# Finding the mail again


async def test_locate_finds_a_reappended_mail_and_reports_an_expunged_one(
    dovecot, mail_user, ca
) -> None:
    imap = settings(dovecot, mail_user, ca)
    raw = mail("Moving target")
    loc = put(dovecot, mail_user, raw)
    assert await actions.locate(imap, loc) == loc
    # Another client re-files it: a new UID in the same folder, the old one expunged.
    copy = dovecot.append(mail_user.name, mail_user.password, raw)
    other_client_expunge(dovecot, mail_user, "INBOX", loc.uid)
    found = await actions.locate(imap, loc)
    assert found == MailLocation("INBOX", loc.uidvalidity, copy, loc.message_id)
    assert await actions.set_seen(imap, loc, True) == found
    assert b"\\Seen" in dovecot.flags(mail_user.name, mail_user.password, copy)
    other_client_expunge(dovecot, mail_user, "INBOX", copy)
    with pytest.raises(MailGone) as gone:
        await actions.locate(imap, loc)
    assert str(gone.value) == (
        "That mail is no longer in INBOX: it was moved or deleted elsewhere."
    )


async def test_a_gone_mail_changes_nothing(dovecot, mail_user, ca) -> None:
    imap = settings(dovecot, mail_user, ca)
    dovecot.create_folders(mail_user.name, mail_user.password, *ROLE_FOLDERS)
    loc = put(dovecot, mail_user, mail("Gone"))
    other_client_expunge(dovecot, mail_user, "INBOX", loc.uid)
    bystander = put(dovecot, mail_user, mail("Bystander"))
    for press in (
        actions.set_seen(imap, loc, True),
        actions.move(imap, loc, "trash"),
        actions.full_text(imap, loc),
        actions.attachment_parts(imap, loc),
    ):
        with pytest.raises(MailGone):
            await press
    assert contents(dovecot, mail_user, "INBOX") == {bystander.uid: (bystander.message_id, set())}
    assert contents(dovecot, mail_user, "Trash") == {}


async def test_a_mail_without_message_id_is_gone_once_its_uid_is(dovecot, mail_user, ca) -> None:
    imap = settings(dovecot, mail_user, ca)
    raw = b"From: a@example.org\r\nSubject: No id\r\n\r\nBody\r\n"
    loc = put(dovecot, mail_user, raw)
    assert loc.message_id == ""
    assert await actions.locate(imap, loc) == loc
    dovecot.append(mail_user.name, mail_user.password, raw)
    other_client_expunge(dovecot, mail_user, "INBOX", loc.uid)
    with pytest.raises(MailGone):
        await actions.locate(imap, loc)


async def test_locate_after_uidvalidity_changed(dovecot, mail_user, ca) -> None:
    imap = settings(dovecot, mail_user, ca)
    raw = mail("Survivor")
    loc = put(dovecot, mail_user, raw, "Lists")
    # The folder is deleted and made again (a server migration does the same): new UIDVALIDITY.
    client = dovecot.connect(mail_user.name, mail_user.password)
    try:
        client.delete_folder("Lists")
        client.create_folder("Lists")
    finally:
        client.logout()
    dovecot.append(mail_user.name, mail_user.password, mail("Newcomer"), "Lists")
    uid = dovecot.append(mail_user.name, mail_user.password, raw, "Lists")
    new_validity = uidvalidity(dovecot, mail_user, "Lists")
    assert new_validity != loc.uidvalidity
    assert uid != loc.uid  # the old UID now names nothing, or another mail
    found = await actions.locate(imap, loc)
    assert found == MailLocation("Lists", new_validity, uid, loc.message_id)


# Archive, Delete, Spam, Undo


@pytest.mark.parametrize(
    ("role", "folder"), [("archive", "Archive"), ("trash", "Trash"), ("junk", "Junk")]
)
async def test_move_to_role_folder_with_move(dovecot, mail_user, ca, role, folder) -> None:
    assert "MOVE" in dovecot.capabilities(mail_user.name, mail_user.password)
    imap = settings(dovecot, mail_user, ca)
    dovecot.create_folders(mail_user.name, mail_user.password, *ROLE_FOLDERS)
    put(dovecot, mail_user, mail("Earlier"), folder)  # the new UID is not simply 1
    loc = put(dovecot, mail_user, mail("File me"))
    moved = await actions.move(imap, loc, role)
    assert moved.folder == folder
    assert moved.uidvalidity == uidvalidity(dovecot, mail_user, folder)
    assert moved.message_id == loc.message_id
    assert contents(dovecot, mail_user, folder)[moved.uid] == (loc.message_id, set())
    assert contents(dovecot, mail_user, "INBOX") == {}


async def test_new_uid_comes_from_copyuid(dovecot, dovecot_no_move, ca) -> None:
    """Without a Message-ID only the server's COPYUID can say where the mail went."""
    for server in (dovecot, dovecot_no_move):
        user = new_user(server, *ROLE_FOLDERS)
        imap = settings(server, user, ca)
        for n in range(3):
            put(server, user, mail(f"Earlier {n}"), "Junk")
        loc = put(server, user, b"From: a@example.org\r\nSubject: Anonymous\r\n\r\nHi\r\n")
        moved = await actions.move(imap, loc, "junk")
        assert (moved.folder, moved.uid) == ("Junk", 4)
        assert moved.uidvalidity == uidvalidity(server, user, "Junk")
        assert await actions.locate(imap, moved) == moved
        fetched = await actions.fetch_summary_source(imap, moved)
        assert parse_mail(fetched.raw).subject == "Anonymous"


async def test_undo_moves_it_back_with_its_new_location(dovecot, mail_user, ca) -> None:
    imap = settings(dovecot, mail_user, ca)
    dovecot.create_folders(mail_user.name, mail_user.password, *ROLE_FOLDERS)
    keep = put(dovecot, mail_user, mail("Stays"))
    loc = put(dovecot, mail_user, mail("Round trip"))
    await actions.set_seen(imap, loc, True)
    archived = await actions.move(imap, loc, "archive")
    back = await actions.move_to(imap, archived, "INBOX")
    assert back.folder == "INBOX"
    assert back.uidvalidity == loc.uidvalidity
    assert back.uid > loc.uid  # RFC 3501: a mail that comes back gets a new UID
    assert contents(dovecot, mail_user, "INBOX") == {
        keep.uid: (keep.message_id, set()),
        back.uid: (loc.message_id, {b"\\Seen"}),  # flags travel with the mail
    }
    assert contents(dovecot, mail_user, "Archive") == {}
    assert await actions.locate(imap, back) == back


async def test_configured_folder_is_used_and_never_created(dovecot, mail_user, ca) -> None:
    dovecot.create_folders(mail_user.name, mail_user.password, *ROLE_FOLDERS, "Old mail")
    loc = put(dovecot, mail_user, mail("Configured"))
    imap = settings(dovecot, mail_user, ca, archive_mailbox="Old mail", junk_mailbox="Spam")
    with pytest.raises(actions.FolderMissing) as missing:
        await actions.move(imap, loc, "junk", account="home")
    assert "home.imap.junk_mailbox" in str(missing.value)
    assert "Spam" not in dovecot.folders(mail_user.name, mail_user.password)
    moved = await actions.move(imap, loc, "archive")
    assert moved.folder == "Old mail"
    assert contents(dovecot, mail_user, "Old mail") == {moved.uid: (loc.message_id, set())}
    assert contents(dovecot, mail_user, "Archive") == {}


async def test_missing_role_folder_is_reported_not_created(dovecot, mail_user, ca) -> None:
    imap = settings(dovecot, mail_user, ca)
    loc = put(dovecot, mail_user, mail("Nowhere to go"))
    for role in ("archive", "trash", "junk"):
        with pytest.raises(actions.FolderMissing) as missing:
            await actions.move(imap, loc, role)  # type: ignore[arg-type]
        assert f"There is no {role} folder" in str(missing.value)
        assert f"imap.{role}_mailbox" in str(missing.value)
    with pytest.raises(actions.FolderMissing):
        await actions.move_to(imap, loc, "Vanished")
    assert set(dovecot.folders(mail_user.name, mail_user.password)) == {"INBOX"}
    assert contents(dovecot, mail_user, "INBOX") == {loc.uid: (loc.message_id, set())}


async def test_without_move_copy_and_uid_expunge_leave_other_deleted_mail(
    dovecot_no_move, ca
) -> None:
    server = dovecot_no_move
    user = new_user(server, *ROLE_FOLDERS)
    assert "MOVE" not in server.capabilities(user.name, user.password)
    assert "UIDPLUS" in server.capabilities(user.name, user.password)
    imap = settings(server, user, ca)
    # Another client marked a mail \Deleted and has not expunged it yet.
    marked = put(server, user, mail("Marked by another client"), flags=[b"\\Deleted"])
    loc = put(server, user, mail("Move me"))
    put(server, user, mail("Earlier"), "Trash")
    moved = await actions.move(imap, loc, "trash")
    assert moved.folder == "Trash"
    assert contents(server, user, "Trash")[moved.uid] == (loc.message_id, set())
    assert contents(server, user, "INBOX") == {marked.uid: (marked.message_id, {b"\\Deleted"})}
    back = await actions.move_to(imap, moved, "INBOX")
    assert contents(server, user, "INBOX")[back.uid] == (loc.message_id, set())
    assert len(contents(server, user, "Trash")) == 1


async def test_without_move_and_uidplus_moving_is_refused(dovecot_no_uidplus, ca) -> None:
    server = dovecot_no_uidplus
    user = new_user(server, *ROLE_FOLDERS)
    assert not {"MOVE", "UIDPLUS"} & server.capabilities(user.name, user.password)
    imap = settings(server, user, ca)
    marked = put(server, user, mail("Marked by another client"), flags=[b"\\Deleted"])
    loc = put(server, user, mail("Stay put"))
    with pytest.raises(actions.MoveRefused) as refused:
        await actions.move(imap, loc, "archive")
    assert "nothing was changed" in str(refused.value)
    with pytest.raises(actions.MoveRefused):
        await actions.move_to(imap, loc, "Trash")
    assert contents(server, user, "INBOX") == {
        marked.uid: (marked.message_id, {b"\\Deleted"}),
        loc.uid: (loc.message_id, set()),
    }
    assert all(contents(server, user, f) == {} for f in ROLE_FOLDERS)
    # Flags still work there.
    await actions.set_seen(imap, loc, True)
    assert contents(server, user, "INBOX")[loc.uid][1] == {b"\\Seen"}


# Full text


@pytest.mark.parametrize(
    "name",
    [
        "alternative-plain-and-html.eml",
        "html-only-with-script-style.eml",
        "body-windows-1252-qp.eml",
        "body-base64-utf8.eml",
        "body-koi8-r.eml",
        "body-iso-2022-jp.eml",
        "body-flowed.eml",
        "nested-rfc822.eml",
        "related-inline-image.eml",
        "missing-boundary.eml",
        "huge-body.eml",
    ],
)
async def test_full_text_reads_as_the_summary_does(dovecot, mail_user, ca, name) -> None:
    raw = (MAILS / name).read_bytes()
    loc = put(dovecot, mail_user, raw)
    text = await actions.full_text(settings(dovecot, mail_user, ca), loc)
    expected = parse_mail(raw, text_limit=10_000_000).text
    assert expected.strip()
    assert text.text == expected
    assert text.complete


async def test_full_text_of_plain_html_qp_and_base64(dovecot, mail_user, ca) -> None:
    imap = settings(dovecot, mail_user, ca)
    qp = put(dovecot, mail_user, (MAILS / "body-windows-1252-qp.eml").read_bytes())
    assert (await actions.full_text(imap, qp)).text.startswith("Prix : 10 € – “entre guillemets”")
    html = put(dovecot, mail_user, (MAILS / "html-only-with-script-style.eml").read_bytes())
    html_text = await actions.full_text(imap, html)
    assert "Tom & Jerry <3 café €5" in html_text.text
    assert "alert" not in html_text.text
    assert html_text.html is not None
    assert "<h1>Weekly&nbsp;news</h1>" in html_text.html
    # A long ISO-8859-2 text in base64: every line, decoded.
    lines = [f"{n:04d} Zażółć gęślą jaźń, Łódź." for n in range(3000)]
    msg = EmailMessage()
    msg["Subject"] = "Polish"
    msg["Message-ID"] = make_msgid()
    msg.set_content("\n".join(lines), charset="iso-8859-2", cte="base64")
    loc = put(dovecot, mail_user, msg.as_bytes())
    full = await actions.full_text(imap, loc)
    assert full.text.splitlines() == lines
    assert full.html is None
    alt = put(dovecot, mail_user, (MAILS / "alternative-plain-and-html.eml").read_bytes())
    both = await actions.full_text(imap, alt)
    assert both.text == "Plain version – read me."
    assert both.html == "<p>HTML <b>version</b></p>"


# Attachments


def with_parts(*parts: tuple[bytes, str, str, dict[str, str]], body: str = "See.") -> bytes:
    """A mail with a text and the given (data, maintype, subtype, extra params) attachments."""
    msg = EmailMessage()
    msg["Subject"] = "Parts"
    msg["Message-ID"] = make_msgid()
    msg.set_content(body)
    for data, maintype, subtype, extra in parts:
        msg.add_attachment(data, maintype=maintype, subtype=subtype, **extra)
    return msg.as_bytes()


async def test_attachment_names_are_decoded(dovecot, mail_user, ca) -> None:
    imap = settings(dovecot, mail_user, ca)
    rfc2231 = put(dovecot, mail_user, (MAILS / "attachment-rfc2231-filename.eml").read_bytes())
    rfc2047 = put(dovecot, mail_user, (MAILS / "attachment-rfc2047-filename.eml").read_bytes())
    names = [p.filename for p in await actions.attachment_parts(imap, rfc2231)]
    assert names == ["报告— Q3.pdf", "Grüße.txt"]
    parts = await actions.attachment_parts(imap, rfc2047)
    assert [(p.section, p.filename, p.encoding) for p in parts] == [
        ("2", "Résumé 2026.docx", "base64"),
        ("3", "föto.jpg", "base64"),
    ]
    nested = put(dovecot, mail_user, (MAILS / "nested-rfc822.eml").read_bytes())
    [forwarded] = await actions.attachment_parts(imap, nested)
    assert (forwarded.filename, forwarded.content_type) == (
        "Quarterly numbers — Q3.eml",
        "message/rfc822",
    )
    target = io.BytesIO()
    await actions.save_part(imap, nested, forwarded, target)
    assert target.getvalue().startswith(b"From: Carol <carol@example.com>")
    assert b"Revenue is up 12 %." in target.getvalue()


async def test_tracking_pixel_is_not_an_attachment(dovecot, mail_user, ca) -> None:
    pixel = bytes.fromhex("47494638396101000100800000ffffff00000021f90401000000002c00000000")
    logo = os.urandom(3000)
    raw = with_parts(
        (pixel, "image", "gif", {"disposition": "inline"}),
        (logo, "image", "png", {"disposition": "inline", "filename": "logo.png"}),
        (os.urandom(2000), "image", "jpeg", {"disposition": "inline"}),  # a real photo
        (b"tiny", "application", "octet-stream", {"filename": "tiny.bin"}),
    )
    loc = put(dovecot, mail_user, raw)
    parts = await actions.attachment_parts(settings(dovecot, mail_user, ca), loc)
    assert [(p.section, p.filename, p.content_type) for p in parts] == [
        ("3", "logo.png", "image/png"),
        ("4", "part-4.jpg", "image/jpeg"),
        ("5", "tiny.bin", "application/octet-stream"),
    ]
    assert abs(parts[0].size - len(logo)) < 60


async def test_save_part_fetches_only_that_part_in_chunks(dovecot, mail_user, ca) -> None:
    first, second = os.urandom(3_000_000), os.urandom(3_100_000)
    text = "Zeile mit Umlauten: äöü ß =3D\n" * 2000 + "x" * 9000 + "\n"  # one long line too
    raw = with_parts(
        (first, "application", "octet-stream", {"filename": "first.bin"}),
        (second, "application", "pdf", {"filename": "second.pdf"}),
        (
            text.encode("latin-1"),
            "text",
            "plain",
            {"filename": "notes.txt", "cte": "quoted-printable"},
        ),
    )
    loc = put(dovecot, mail_user, raw)
    async with TcpProxy(dovecot.host, dovecot.port) as proxy:
        imap = settings(dovecot, mail_user, ca, port=proxy.port)
        parts = await actions.attachment_parts(imap, loc)
        assert [p.filename for p in parts] == ["first.bin", "second.pdf", "notes.txt"]
        part = parts[1]
        assert part.encoding == "base64"
        assert abs(part.size - len(second)) < len(second) * 0.01
        before = proxy.bytes_from_server
        target = io.BytesIO()
        fetched = await actions.save_part(imap, loc, part, target)
        from_server = proxy.bytes_from_server - before
        assert hashlib.sha256(target.getvalue()).digest() == hashlib.sha256(second).digest()
        assert fetched == part.encoded_size
        # Login, locate and TLS framing included: far below the 7 MB of the whole mail.
        assert from_server <= 1.1 * part.encoded_size
        qp = io.BytesIO()
        await actions.save_part(imap, loc, parts[2], qp)
        assert qp.getvalue().decode("latin-1").replace("\r\n", "\n") == text


async def test_save_raw_is_the_original_mail(dovecot, mail_user, ca) -> None:
    raw = with_parts((os.urandom(2_500_000), "application", "zip", {"filename": "a.zip"}))
    raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    loc = put(dovecot, mail_user, raw)
    target = io.BytesIO()
    assert await actions.save_raw(settings(dovecot, mail_user, ca), loc, target) == len(raw)
    assert target.getvalue() == raw


async def test_fetch_summary_source_is_the_watchers_fetch(dovecot, mail_user, ca) -> None:
    raw = mail("Summary please", "Body of the mail.")
    loc = put(dovecot, mail_user, raw)
    fetched = await actions.fetch_summary_source(settings(dovecot, mail_user, ca), loc)
    assert fetched.uid == loc.uid
    assert parse_mail(fetched.raw).subject == "Summary please"
    assert "Body of the mail." in parse_mail(fetched.raw).text


# Search


@pytest.fixture
def mailbox(dovecot, mail_user) -> dict[str, MailLocation]:
    """Mails in INBOX and Lists, arriving one day apart (the key is the subject)."""
    start = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
    specs = [
        (
            "Invoice March",
            "Please pay the invoice.",
            "shop@example.com",
            "me@example.org",
            "INBOX",
        ),
        (
            "Weekly digest",
            "News about café culture.",
            "news@lists.example",
            "me@example.org",
            "Lists",
        ),
        ("Grüße aus Köln", "Viele Grüße, Jürgen", "juergen@example.de", "me@example.org", "INBOX"),
        ("Invoice April", "Another invoice.", "shop@example.com", "team@example.org", "Lists"),
        ("Lunch", "Shall we have lunch?", "bob@example.net", "me@example.org", "INBOX"),
    ]
    found = {}
    for n, (subject, body, sender, to, folder) in enumerate(specs):
        raw = mail(subject, body, sender=sender, to=to)
        found[subject] = put(dovecot, mail_user, raw, folder, msg_time=start + timedelta(days=n))
    return found


async def search_subjects(imap: ImapSettings, query: str, limit: int = 10) -> list[str]:
    parsed, _account, folder = actions.parse_query(query)
    hits = await actions.search(imap, [folder] if folder else ["INBOX", "Lists"], parsed, limit)
    return [parse_mail(hit.header).subject for hit in hits]


async def test_search_by_each_criterion_newest_first(dovecot, mail_user, ca, mailbox) -> None:
    imap = settings(dovecot, mail_user, ca)
    assert await search_subjects(imap, "invoice") == ["Invoice April", "Invoice March"]
    assert await search_subjects(imap, "from:shop@example.com") == [
        "Invoice April",
        "Invoice March",
    ]
    assert await search_subjects(imap, "to:team@example.org") == ["Invoice April"]
    assert await search_subjects(imap, 'subject:"weekly digest"') == ["Weekly digest"]
    assert await search_subjects(imap, "since:2024-03-03") == [
        "Lunch",
        "Invoice April",
        "Grüße aus Köln",
    ]
    assert await search_subjects(imap, "before:2024-03-02") == ["Invoice March"]
    assert await search_subjects(imap, "invoice since:2024-03-02 before:2024-03-05") == [
        "Invoice April"
    ]
    assert await search_subjects(imap, "folder:Lists invoice") == ["Invoice April"]
    assert await search_subjects(imap, "nothing-matches-this") == []


async def test_search_with_utf8_words(dovecot, mail_user, ca, mailbox) -> None:
    imap = settings(dovecot, mail_user, ca)
    assert await search_subjects(imap, "Grüße") == ["Grüße aus Köln"]
    assert await search_subjects(imap, "café") == ["Weekly digest"]
    assert await search_subjects(imap, "subject:Köln") == ["Grüße aus Köln"]


async def test_search_hits_locate_their_mail(dovecot, mail_user, ca, mailbox) -> None:
    imap = settings(dovecot, mail_user, ca)
    hits = await actions.search(imap, ["INBOX", "Lists"], actions.SearchQuery(), limit=3)
    assert [hit.location for hit in hits] == [
        mailbox["Lunch"],
        mailbox["Invoice April"],
        mailbox["Grüße aus Köln"],
    ]
    for hit in hits:
        assert b"Subject:" in hit.header
        assert b"From:" in hit.header
        assert await actions.locate(imap, hit.location) == hit.location


async def test_search_returns_at_most_the_limit(dovecot, mail_user, ca) -> None:
    imap = settings(dovecot, mail_user, ca)
    start = datetime(2024, 1, 1, 8, 0, tzinfo=UTC)
    # Arrival order differs from UID order: newest means INTERNALDATE, not the highest UID.
    for n in [5, 11, 0, 7, 3, 9, 1, 10, 6, 2, 8, 4]:
        folder = "INBOX" if n % 2 else "Lists"
        raw = mail(f"Report {n:02d}", "The monthly report.")
        put(dovecot, mail_user, raw, folder, msg_time=start + timedelta(hours=n))
    subjects = await search_subjects(imap, "report")
    assert subjects == [f"Report {n:02d}" for n in range(11, 1, -1)]
    assert await search_subjects(imap, "report", limit=3) == [
        "Report 11",
        "Report 10",
        "Report 09",
    ]


async def test_search_in_a_missing_folder(dovecot, mail_user, ca) -> None:
    imap = settings(dovecot, mail_user, ca)
    with pytest.raises(actions.FolderMissing, match="There is no folder Nope"):
        await actions.search(imap, ["Nope"], actions.SearchQuery(words=("x",)))


async def test_search_since_is_inclusive_and_before_exclusive(dovecot, mail_user, ca) -> None:
    imap = settings(dovecot, mail_user, ca)
    day = date(2024, 6, 15)
    put(dovecot, mail_user, mail("On the day"), msg_time=datetime(2024, 6, 15, 0, 30, tzinfo=UTC))
    query = actions.SearchQuery(since=day)
    assert len(await actions.search(imap, ["INBOX"], query)) == 1
    assert await actions.search(imap, ["INBOX"], actions.SearchQuery(before=day)) == []
