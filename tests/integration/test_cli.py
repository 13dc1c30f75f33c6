"""The real console script as a subprocess (`python -m bridge`), set up by BRIDGE_* or TOML."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sqlite3
import stat
import subprocess
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.conftest import SECRETS
from tests.integration.chat import next_text
from tests.integration.conftest import OWNER
from tests.integration.processes import COMMAND, make_env, one_line_error, service
from tests.servers.dovecot import MailUser

SAMPLES = Path(__file__).parent.parent / "mails"
TIMEOUT = 30.0  # bound for a command that should finish by itself


def mail(subject: str, n: int) -> bytes:
    """A small UTF-8 mail."""
    msg = EmailMessage()
    msg["From"] = "Ann <ann@example.org>"
    msg["To"] = "me@example.org"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<cli-{n}@example.org>"
    msg.set_content(f"Body {n}.")
    return bytes(msg)


def file_env(**extra: str) -> dict[str, str]:
    """The process environment for a TOML file: the test's, minus any BRIDGE_*, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BRIDGE_")}
    env.update(extra)
    return env


def toml_account(
    name: str,
    *,
    user: MailUser,
    ca,
    dovecot=None,
    smtpd=None,
    smtp_login: tuple[str, str] | None = None,
    folders: list[str] | None = None,
    imap: dict[str, object] | None = None,
    smtp: dict[str, object] | None = None,
) -> str:
    """One [[accounts]] entry; the SMTP login: `smtp_login`, else smtpd's, else the IMAP one."""
    im: dict[str, object] = {
        "host": "127.0.0.1",
        "port": dovecot.port if dovecot else 1,
        "username": user.name,
        "password": user.password,
        "ca_file": str(ca.ca_file),
        "poll_interval": 0.5,
    }
    im.update(imap or {})
    sm: dict[str, object] = {"host": "127.0.0.1", "port": 1, "ca_file": str(ca.ca_file)}
    if smtpd is not None:
        sm.update(port=smtpd.port, security=smtpd.tls)
        sm.update(username=smtpd.username, password=smtpd.password)
    if smtp_login is not None:
        sm.update(username=smtp_login[0], password=smtp_login[1])
    sm.update(smtp or {})
    lines = ["[[accounts]]", f"name = {json.dumps(name)}"]
    if folders is not None:
        lines.append(f"folders = {json.dumps(folders)}")
    for table, values in (("imap", im), ("smtp", sm)):
        lines.append(f"[accounts.{table}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def write_config(
    path: Path, *accounts: str, botapi=None, token_file: Path | None = None, mode: int = 0o600
) -> Path:
    """A TOML file with [telegram] (the fake Bot API, else an unreachable one) and `accounts`."""
    token, url = (botapi.token, botapi.url) if botapi else ("1:unused", "http://127.0.0.1:1")
    secret = f"token = {json.dumps(token)}"
    if token_file is not None:
        secret = f"token_file = {json.dumps(str(token_file))}"
    telegram = (
        f"[telegram]\n{secret}\napi_url = {json.dumps(url)}\nallowed_user_ids = [{OWNER}]\n\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(telegram + "\n".join(accounts), encoding="utf-8")
    path.chmod(mode)
    return path


@pytest.fixture
def work_user(dovecot, mail_user: MailUser) -> MailUser:
    """A second mailbox on the session Dovecot, for a second account."""
    user = MailUser(f"{mail_user.name}-work", secrets.token_urlsafe(12))
    dovecot.add_user(user.name, user.password)
    SECRETS.add(user.password)
    return user


def cli(
    *args: str, env: dict[str, str], cwd: Path, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `mailbridge ARGS` to completion (bounded) for commands that need no Bot API."""
    return subprocess.run(
        [*COMMAND, *args],
        env=env,
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


async def acli(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    """Run `mailbridge ARGS` without blocking this loop (the fake Bot API lives in it)."""
    proc = await asyncio.create_subprocess_exec(
        *COMMAND,
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def posted(botapi) -> list[str]:
    return [str(c.params["text"]) for c in botapi.calls("sendMessage", ok_only=True)]


# run


async def test_run_posts_mail_and_stops_cleanly_on_sigterm(
    tmp_path, dovecot, mail_user, ca, botapi
) -> None:
    env = make_env(dovecot=dovecot, user=mail_user, ca=ca, botapi=botapi, BRIDGE_LOG_LEVEL="DEBUG")
    async with service(env, tmp_path) as svc:
        await svc.wait_for_line("first contact with")
        dovecot.append(mail_user.name, mail_user.password, mail("Via the CLI", 1))
        assert "Via the CLI" in await next_text(botapi, timeout=20)
        assert await svc.terminate() == 0
    assert "Traceback" not in svc.stderr
    for secret in (botapi.token, mail_user.password):
        assert secret not in svc.stderr
    database = tmp_path / "data" / "bridge.db"
    assert database.is_file()
    assert stat.S_IMODE(database.stat().st_mode) == 0o600


async def test_run_twice_on_one_database_posts_nothing_twice(
    tmp_path, dovecot, mail_user, ca, botapi
) -> None:
    env = make_env(dovecot=dovecot, user=mail_user, ca=ca, botapi=botapi)
    async with service(env, tmp_path) as svc:
        await svc.wait_for_line("first contact with")
        dovecot.append(mail_user.name, mail_user.password, mail("First run", 1))
        assert "First run" in await next_text(botapi, timeout=20)
        assert await svc.terminate() == 0
    dovecot.append(mail_user.name, mail_user.password, mail("While stopped", 2))
    async with service(env, tmp_path) as svc:
        assert "While stopped" in await next_text(botapi, timeout=20)
        await svc.wait_for_line("mailbridge running")
        dovecot.append(mail_user.name, mail_user.password, mail("Second run", 3))
        assert "Second run" in await next_text(botapi, timeout=20)
        assert await svc.terminate() == 0
    texts = posted(botapi)
    for subject in ("First run", "While stopped", "Second run"):
        assert sum(subject in t for t in texts) == 1, subject


# migrate


def test_migrate_prints_revision_and_is_idempotent(tmp_path) -> None:
    env = make_env()
    first = cli("migrate", env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "database at revision" in first.stdout
    revision = first.stdout.split("database at revision", 1)[1].strip()
    assert revision
    database = tmp_path / "data" / "bridge.db"
    with contextlib.closing(sqlite3.connect(database)) as db:
        schema = db.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    second = cli("migrate", env=env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    with contextlib.closing(sqlite3.connect(database)) as db:
        assert db.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == schema
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(revision,)]


def test_unknown_revision_refuses_migrate_and_run(tmp_path, dovecot, mail_user, ca) -> None:
    env = make_env(dovecot=dovecot, user=mail_user, ca=ca)
    assert cli("migrate", env=env, cwd=tmp_path).returncode == 0
    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "bridge.db")) as db:
        db.execute("UPDATE alembic_version SET version_num='9999'")
        db.commit()
    for command in ("migrate", "run"):
        result = cli(command, env=env, cwd=tmp_path)
        assert result.returncode == 1, (command, result.stderr)
        line = one_line_error(result.stderr)
        assert "9999" in line
        assert "downgrading is not supported" in line


# configuration and usage errors


def test_missing_imap_host_is_a_configuration_error(tmp_path, dovecot, mail_user, ca) -> None:
    env = make_env(dovecot=dovecot, user=mail_user, ca=ca, BRIDGE_IMAP__HOST=None)
    result = cli("run", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "BRIDGE_IMAP__HOST" in one_line_error(result.stderr)
    assert not (tmp_path / "data").exists()


def test_bad_imap_port_is_a_configuration_error(tmp_path, dovecot, mail_user, ca) -> None:
    env = make_env(dovecot=dovecot, user=mail_user, ca=ca, BRIDGE_IMAP__PORT="abc")
    result = cli("run", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "BRIDGE_IMAP__PORT" in one_line_error(result.stderr)


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["frobnicate"], "frobnicate"), (["send", "--subject", "Hi", "--body", "x"], "--to")],
)
def test_usage_errors_exit_2(tmp_path, args, needle) -> None:
    result = cli(*args, env=make_env(), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert needle in result.stderr.strip().splitlines()[-1]


# check


async def test_check_all_good(tmp_path, dovecot, mail_user, ca, botapi, smtpd) -> None:
    env = make_env(dovecot=dovecot, user=mail_user, ca=ca, botapi=botapi, smtpd=smtpd)
    code, out, err = await acli("check", env=env, cwd=tmp_path)
    assert code == 0, out + err
    lines = out.strip().splitlines()
    for name in ("IMAP", "SMTP", "Telegram"):
        mine = [line for line in lines if f" {name} " in line]
        assert len(mine) == 1, (name, out)
        assert mine[0].startswith("ok"), mine[0]
    assert not any(line.startswith("FAIL") for line in lines)
    for secret in (botapi.token, mail_user.password, smtpd.password):
        assert secret not in out + err


async def test_check_without_the_private_ca_fails_certificate_verification(
    tmp_path, dovecot, mail_user, ca, botapi, smtpd
) -> None:
    env = make_env(
        dovecot=dovecot,
        user=mail_user,
        ca=ca,
        botapi=botapi,
        smtpd=smtpd,
        BRIDGE_IMAP__CA_FILE=None,  # the system store does not know the test CA
    )
    code, out, _ = await acli("check", env=env, cwd=tmp_path)
    assert code == 1
    (imap,) = [line for line in out.splitlines() if " IMAP " in line]
    assert imap.startswith("FAIL")
    assert "certificate" in imap.lower()
    (smtp,) = [line for line in out.splitlines() if " SMTP " in line]
    assert smtp.startswith("ok")


# export


def test_export_json_newest_first_decoded_and_read_only(tmp_path, dovecot, mail_user, ca) -> None:
    names = [
        "subject-gb18030-multiword.eml",
        "attachment-rfc2231-filename.eml",
        "body-iso-2022-jp.eml",
    ]
    uids = [
        dovecot.append(mail_user.name, mail_user.password, (SAMPLES / name).read_bytes())
        for name in names
    ]
    env = make_env(dovecot=dovecot, user=mail_user, ca=ca)

    result = cli("export", "--json", "out.json", "--limit", "2", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    items = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert isinstance(items, list)
    assert [item["uid"] for item in items] == [uids[2], uids[1]]
    keys = {"uid", "message_id", "date", "from", "to", "subject", "text", "attachments"}
    for item in items:
        assert set(item) == keys
        assert item["date"] == "2026-11-27T09:15:00+01:00"
        assert item["from"] == "Alice Example <alice@example.org>"
        assert "bob@example.net" in json.dumps(item["to"])
    japanese, report = items
    assert japanese["subject"] == "日本語のテスト"
    assert japanese["text"] == "こんにちは、日本語のテストです。"
    assert japanese["attachments"] == []
    assert report["subject"] == "Report"
    assert report["text"] == "See attached."
    assert [(a["filename"], a["content_type"]) for a in report["attachments"]] == [
        ("报告— Q3.pdf", "application/pdf"),
        ("Grüße.txt", "text/plain"),
    ]
    # The whole message was fetched, so the sizes are exact.
    assert [a["size"] for a in report["attachments"]] == [130, 5]

    result = cli("export", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    everything = json.loads(result.stdout)
    assert [item["uid"] for item in everything] == uids[::-1]
    assert everything[2]["subject"] == "会议纪要：朱镕基𠮷€"
    assert everything[2]["text"] == "下周一开会，请朱镕基𠮷准时参加。"
    assert everything[:2] == items

    result = cli("export", "--mailbox", "NoSuchFolder", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "NoSuchFolder" in one_line_error(result.stderr)
    assert result.stdout == ""

    for uid in uids:
        assert b"\\Seen" not in dovecot.flags(mail_user.name, mail_user.password, uid)


def test_export_attachment_size_is_the_decoded_size(tmp_path, dovecot, mail_user, ca) -> None:
    raw = (SAMPLES / "attachment-rfc2231-filename.eml").read_bytes()
    dovecot.append(mail_user.name, mail_user.password, raw)
    result = cli("export", env=make_env(dovecot=dovecot, user=mail_user, ca=ca), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (item,) = json.loads(result.stdout)
    assert [a["size"] for a in item["attachments"]] == [130, 5]


# send


def test_send_round_trips_recipients_subject_body_and_attachment(tmp_path, ca, smtpd) -> None:
    attachment = tmp_path / "Bericht Grüße.pdf"
    data = bytes(range(256)) * 40
    attachment.write_bytes(data)
    body = "Hallo zusammen,\n\nGrüße aus Berlin — 你好！\nZeile drei.\n"
    result = cli(
        "send",
        "--to",
        "a@x.org",
        "--to",
        "b@y.org",
        "--cc",
        "c@z.org",
        "--bcc",
        "d@w.org",
        "--subject",
        "Grüße 你好",
        "--body-file",
        "-",
        "--attach",
        str(attachment),
        env=make_env(ca=ca, smtpd=smtpd),
        cwd=tmp_path,
        stdin=body,
    )
    assert result.returncode == 0, result.stderr
    received = smtpd.wait_message(5)
    assert sorted(received.rcpt_tos) == ["a@x.org", "b@y.org", "c@z.org", "d@w.org"]
    assert received.login == smtpd.username
    message = received.message()
    assert message["Subject"] == "Grüße 你好"
    assert "Bcc" not in message
    assert b"d@w.org" not in received.data
    text = message.get_body(("plain",))
    assert text is not None
    assert text.get_content().replace("\r\n", "\n") == body  # SMTP DATA lines end in CRLF
    (part,) = list(message.iter_attachments())
    assert part.get_filename() == "Bericht Grüße.pdf"
    assert part.get_content_type() == "application/pdf"
    assert part.get_content() == data
    assert smtpd.password not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "extra", "names"),
    [
        (["--to", "not an address"], {}, ["--to", "not an address"]),
        (["--to", "a@x.org", "--bcc", "b@@y.org"], {}, ["--bcc", "b@@y.org"]),
        (
            ["--to", "a@x.org"],
            {"BRIDGE_SMTP__FROM_ADDRESS": "nobody"},
            ["BRIDGE_SMTP__FROM_ADDRESS", "nobody"],
        ),
    ],
)
def test_send_invalid_address_is_a_usage_error(tmp_path, ca, smtpd, args, extra, names) -> None:
    env = make_env(ca=ca, smtpd=smtpd, **extra)
    result = cli("send", *args, "--subject", "Hi", "--body", "x", env=env, cwd=tmp_path)
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    for name in names:
        assert name in line
    assert smtpd.received == []


def test_send_with_the_smtp_server_down_fails(tmp_path, ca, smtpd) -> None:
    smtpd.stop()
    result = cli(
        "send",
        "--to",
        "a@x.org",
        "--subject",
        "Hi",
        "--body",
        "x",
        env=make_env(ca=ca, smtpd=smtpd),
        cwd=tmp_path,
    )
    assert result.returncode == 1
    one_line_error(result.stderr)


# the TOML file: several accounts


async def test_check_with_a_config_file_checks_every_account_and_folder(
    tmp_path, dovecot, mail_user, work_user, ca, botapi, smtpd
) -> None:
    dovecot.append(mail_user.name, mail_user.password, mail("In Lists", 1), mailbox="Lists")
    dovecot.append(work_user.name, work_user.password, mail("At work", 2))
    work_login = ("work@example.test", smtpd.add_login("work@example.test"))
    SECRETS.add(work_login[1])
    path = write_config(
        tmp_path / "etc" / "bridge.toml",
        toml_account(
            "home", user=mail_user, ca=ca, dovecot=dovecot, smtpd=smtpd, folders=["INBOX", "Lists"]
        ),
        toml_account(
            "work", user=work_user, ca=ca, dovecot=dovecot, smtpd=smtpd, smtp_login=work_login
        ),
        botapi=botapi,
    )
    code, out, err = await acli("--config", str(path), "check", env=file_env(), cwd=tmp_path)
    assert code == 0, out + err
    lines = out.strip().splitlines()
    found = {}
    for account in ("home", "work"):
        for server in ("IMAP", "SMTP"):
            (line,) = [line for line in lines if f" {account} {server} " in line]
            assert line.startswith("ok    "), line
            found[account, server] = line
    assert (
        f"{mail_user.name}@127.0.0.1:{dovecot.port}: 0 messages in INBOX, 1 in Lists"
        in (found["home", "IMAP"])
    )
    assert (
        f"{work_user.name}@127.0.0.1:{dovecot.port}: 1 message in INBOX" in found["work", "IMAP"]
    )
    assert f" {smtpd.username}@127.0.0.1:{smtpd.port} " in found["home", "SMTP"]
    assert f" work@example.test@127.0.0.1:{smtpd.port} " in found["work", "SMTP"]
    (telegram,) = [line for line in lines if " Telegram " in line]
    assert telegram.startswith("ok")
    assert len(lines) == 6  # configuration, 2 accounts x 2 servers, Telegram
    for secret in (botapi.token, mail_user.password, work_user.password, *smtpd.logins.values()):
        assert secret not in out + err


async def test_check_names_a_watched_folder_that_does_not_exist(
    tmp_path, dovecot, mail_user, work_user, ca, botapi, smtpd
) -> None:
    path = write_config(
        tmp_path / "mailbridge.toml",
        toml_account("home", user=mail_user, ca=ca, dovecot=dovecot, smtpd=smtpd),
        toml_account(
            "work",
            user=work_user,
            ca=ca,
            dovecot=dovecot,
            smtpd=smtpd,
            folders=["INBOX", "NoSuchFolder"],
        ),
        botapi=botapi,
    )
    # mailbridge.toml in the working directory is found without --config.
    assert path.parent == tmp_path
    code, out, err = await acli("check", env=file_env(), cwd=tmp_path)
    assert code == 1, out + err
    lines = out.strip().splitlines()
    (work_imap,) = [line for line in lines if " work IMAP " in line]
    assert work_imap.startswith("FAIL")
    assert "NoSuchFolder" in work_imap
    others = [line for line in lines if " IMAP " in line or " SMTP " in line or "Telegram" in line]
    assert [line[:4] for line in others if line != work_imap] == ["ok  "] * 4


def test_config_file_with_loose_permissions_is_refused(tmp_path, dovecot, mail_user, ca) -> None:
    account = toml_account("home", user=mail_user, ca=ca, dovecot=dovecot)
    path = write_config(tmp_path / "bridge.toml", account, mode=0o644)
    for command in (
        ["check"],
        ["migrate"],
        ["export"],
        ["send", "--to", "a@x.org", "--subject", "x"],
    ):
        result = cli("--config", str(path), *command, env=file_env(), cwd=tmp_path)
        assert result.returncode == 2, (command, result.stderr)
        line = one_line_error(result.stderr)
        assert f"{path} holds a secret and is readable by group or others" in line
        assert mail_user.password not in result.stdout + result.stderr
    assert not (tmp_path / "data").exists()


def test_password_file_must_be_owner_only_and_keeps_the_config_file_public(
    tmp_path, dovecot, mail_user, ca
) -> None:
    dovecot.append(mail_user.name, mail_user.password, mail("From a password file", 1))
    (tmp_path / "secrets").mkdir()
    token = tmp_path / "secrets" / "token"
    token.write_text("1:unused\n")
    token.chmod(0o600)
    secret = tmp_path / "secrets" / "home"
    secret.write_text(mail_user.password + "\n")
    secret.chmod(0o644)
    account = toml_account("home", user=mail_user, ca=ca, dovecot=dovecot)
    account = account.replace(
        f"password = {json.dumps(mail_user.password)}",
        f"password_file = {json.dumps(str(secret))}",
    )
    assert mail_user.password not in account
    path = write_config(tmp_path / "bridge.toml", account, token_file=token, mode=0o644)
    result = cli("--config", str(path), "export", env=file_env(), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    line = one_line_error(result.stderr)
    assert f"{secret} is readable by group or others" in line
    assert str(path) not in line  # the config file holds no secret: it may stay 0644
    secret.chmod(0o600)
    result = cli("--config", str(path), "export", env=file_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [item["subject"] for item in json.loads(result.stdout)] == ["From a password file"]


def test_send_account_leaves_through_that_accounts_login(
    tmp_path, dovecot, mail_user, work_user, ca, smtpd
) -> None:
    work_login = ("work@example.test", smtpd.add_login("work@example.test"))
    SECRETS.add(work_login[1])
    path = write_config(
        tmp_path / "bridge.toml",
        toml_account("home", user=mail_user, ca=ca, dovecot=dovecot, smtpd=smtpd),
        toml_account(
            "work",
            user=work_user,
            ca=ca,
            dovecot=dovecot,
            smtpd=smtpd,
            smtp_login=work_login,
            smtp={"from_address": "Work Desk <desk@work.example>"},
        ),
    )
    send = ["send", "--to", "a@x.org", "--subject", "Hi", "--body", "x"]
    result = cli("--config", str(path), *send, "--account", "work", env=file_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    received = smtpd.wait_message(5)
    assert received.login == "work@example.test"
    assert received.mail_from == "desk@work.example"
    assert received.message()["From"] == "Work Desk <desk@work.example>"
    # Without --account: the first account.
    result = cli("--config", str(path), *send, env=file_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    received = smtpd.wait_message(5)
    assert received.login == smtpd.username
    assert received.message()["From"] == smtpd.username
    assert work_login[1] not in result.stdout + result.stderr


def test_send_bad_from_address_names_the_file_key(tmp_path, ca, mail_user, smtpd) -> None:
    path = write_config(
        tmp_path / "bridge.toml",
        toml_account("home", user=mail_user, ca=ca, smtpd=smtpd),
        toml_account("work", user=mail_user, ca=ca, smtpd=smtpd, smtp={"from_address": "nobody"}),
    )
    send = ["send", "--to", "a@x.org", "--subject", "Hi", "--account", "work"]
    result = cli("--config", str(path), *send, env=file_env(), cwd=tmp_path)
    assert result.returncode == 2
    assert "accounts[1].smtp.from_address" in one_line_error(result.stderr)
    assert smtpd.received == []


def test_export_account_reads_that_accounts_mailbox(
    tmp_path, dovecot, mail_user, work_user, ca
) -> None:
    dovecot.append(mail_user.name, mail_user.password, mail("For home", 1))
    dovecot.append(work_user.name, work_user.password, mail("For work", 2))
    dovecot.append(work_user.name, work_user.password, mail("Filed at work", 3), mailbox="Filed")
    path = write_config(
        tmp_path / "bridge.toml",
        toml_account("home", user=mail_user, ca=ca, dovecot=dovecot),
        toml_account("work", user=work_user, ca=ca, dovecot=dovecot),
    )
    env = file_env()

    def subjects(*args: str) -> list[str]:
        result = cli(*args, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return [item["subject"] for item in json.loads(result.stdout)]

    # --config also works after the command.
    assert subjects("export", "--account", "work", "--config", str(path)) == ["For work"]
    assert subjects("--config", str(path), "export", "--account", "home") == ["For home"]
    assert subjects("--config", str(path), "export") == ["For home"]  # the first account
    assert subjects(
        "--config", str(path), "export", "--account", "work", "--mailbox", "Filed"
    ) == ["Filed at work"]


@pytest.mark.parametrize(
    "command",
    [["send", "--to", "a@x.org", "--subject", "Hi", "--body", "x"], ["export"]],
    ids=["send", "export"],
)
def test_unknown_account_is_a_usage_error(tmp_path, ca, mail_user, smtpd, command) -> None:
    path = write_config(
        tmp_path / "bridge.toml",
        toml_account("home", user=mail_user, ca=ca, smtpd=smtpd),
        toml_account("work", user=mail_user, ca=ca, smtpd=smtpd),
    )
    for args, env in [
        (["--config", str(path), *command, "--account", "nosuch"], file_env()),
        ([*command, "--account", "nosuch"], make_env(ca=ca, smtpd=smtpd)),  # variables only
    ]:
        result = cli(*args, env=env, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        line = one_line_error(result.stderr)
        assert "--account" in line
        assert "'nosuch'" in line
        assert result.stdout == ""
    assert smtpd.received == []


def test_config_option_naming_no_file_is_a_usage_error(tmp_path) -> None:
    result = cli("--config", "missing.toml", "check", env=file_env(), cwd=tmp_path)
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert "--config" in line
    assert "missing.toml" in line
    result = cli("check", env=file_env(BRIDGE_CONFIG_FILE="gone.toml"), cwd=tmp_path)
    assert result.returncode == 2
    assert "BRIDGE_CONFIG_FILE: no such file: gone.toml" in one_line_error(result.stderr)


# Last: a failed login makes Dovecot slow down later logins from this address (its penalty is
# switched off for the test server, but keep these at the end anyway).


async def test_check_wrong_imap_password_fails_imap_only(
    tmp_path, dovecot, mail_user, ca, botapi, smtpd
) -> None:
    env = make_env(
        dovecot=dovecot,
        user=mail_user,
        ca=ca,
        botapi=botapi,
        smtpd=smtpd,
        BRIDGE_IMAP__PASSWORD="wrong-" + mail_user.password,
    )
    code, out, err = await acli("check", env=env, cwd=tmp_path)
    assert code == 1
    lines = out.strip().splitlines()
    (imap,) = [line for line in lines if " IMAP " in line]
    assert imap.startswith("FAIL")
    assert [line[:2] for line in lines if " SMTP " in line or " Telegram " in line] == [
        "ok",
        "ok",
    ]
    assert mail_user.password not in out + err
