"""OAuth2 end to end: sign-in from the CLI and the chat, XOAUTH2 against Dovecot's oauth2 passdb
and aiosmtpd, refresh with rotation, revocation, and tokens that never leave in plain text."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr

from bridge.config import (
    AccountSettings,
    ImapSettings,
    OAuth2Settings,
    Settings,
    SmtpSettings,
)
from bridge.db import store
from bridge.db.engine import Database, make_engine
from bridge.db.migrate import upgrade_to_head
from bridge.errors import TemporaryMailError
from bridge.oauth import AccessTokens
from tests.conftest import SECRETS
from tests.integration.chat import answer, answer_containing, mail, wait_mails, wait_until
from tests.integration.conftest import OWNER, make_account, make_settings, running
from tests.servers.dovecot import DovecotServer, MailUser
from tests.servers.idp import IdentityProvider
from tests.servers.smtpd import SmtpServer

COMMAND = [sys.executable, "-m", "bridge"]
BOUND = 30.0  # a command or a sign-in that should end by itself
SIGN_IN_AGAIN = "must sign in again"


@pytest.fixture(scope="module")
def idp() -> Iterator[IdentityProvider]:
    """One identity provider for the module; every token it hands out is a secret."""
    with IdentityProvider() as server:
        yield server
        SECRETS.update(server.secrets)


@pytest.fixture(autouse=True)
def idp_defaults(idp: IdentityProvider) -> Iterator[None]:
    """Each test starts with the provider's normal behaviour."""
    yield
    idp.access_lifetime, idp.browser_user = 3600.0, ""
    idp.outage_over()
    SECRETS.update(idp.secrets)


@pytest.fixture(scope="module")
def oauth_dovecot(ca, idp: IdentityProvider) -> Iterator[DovecotServer]:
    """Dovecot that also accepts bearer tokens, checked at the identity provider."""
    server = DovecotServer(ca, oauth2_introspection_url=idp.introspection_url)
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def user(oauth_dovecot: DovecotServer) -> MailUser:
    """A mailbox whose owner signs in with OAuth2 (the password is for the test's own look)."""
    person = MailUser(f"oauth{secrets.randbelow(10**9)}", secrets.token_urlsafe(12))
    oauth_dovecot.add_user(person.name, person.password)
    SECRETS.add(person.password)
    return person


@pytest.fixture
def bearer_smtpd(ca, idp: IdentityProvider, user: MailUser) -> Iterator[SmtpServer]:
    """aiosmtpd with AUTH XOAUTH2 (the bearer checked at the identity provider)."""
    with SmtpServer(ca, username=user.name, xoauth2_introspection_url=idp.introspection_url) as s:
        SECRETS.add(s.password)
        yield s


@pytest.fixture
def secret_key() -> str:
    """BRIDGE_SECRET_KEY for this test."""
    key = Fernet.generate_key().decode()
    SECRETS.add(key)
    return key


def oauth_account(
    name: str,
    *,
    idp: IdentityProvider,
    dovecot: DovecotServer,
    user: MailUser,
    ca,
    smtpd: SmtpServer | None = None,
    folders: list[str] | None = None,
    imap: dict | None = None,
    oauth2: dict | None = None,
) -> AccountSettings:
    """An account that signs in to IMAP and SMTP with OAuth2 at the test provider."""
    return AccountSettings(
        name=name,
        folders=folders or [],
        imap=ImapSettings(
            host="127.0.0.1",
            port=dovecot.port,
            username=user.name,
            auth="oauth2",
            ca_file=Path(ca.ca_file),
            poll_interval=0.5,
            **(imap or {}),
        ),
        smtp=SmtpSettings(
            host="127.0.0.1",
            port=smtpd.port if smtpd else 1,
            ca_file=ca.ca_file,
            from_address=f"{user.name}@example.test",
        ),
        oauth2=OAuth2Settings(**(oauth2 or idp.oauth2_settings())),
    )


def with_key(settings: Settings, key: str) -> Settings:
    """The settings with BRIDGE_SECRET_KEY set."""
    core = settings.core.model_copy(update={"secret_key": SecretStr(key)})
    return dataclasses.replace(settings, core=core)


@contextlib.asynccontextmanager
async def tokens_of(settings: Settings) -> AsyncIterator[AccessTokens]:
    """The accounts' tokens on the bridge's database (as the bridge builds them)."""
    engine = make_engine(settings.core.database_url)
    await asyncio.to_thread(upgrade_to_head, engine)
    tokens = AccessTokens(settings.accounts, settings.core.secret_keys, Database(engine))
    try:
        yield tokens
    finally:
        await tokens.aclose()
        engine.dispose()


async def sign_in(settings: Settings, idp: IdentityProvider, user: MailUser) -> None:
    """A device-flow sign-in of the account `home`, approved by `user` (in-process)."""
    async with tokens_of(settings) as tokens:
        source = tokens.source("home")
        assert source is not None
        code = await source.start_device()
        idp.approve(code.user_code, user.name)
        await asyncio.wait_for(source.finish_device(code), BOUND)


async def stored(tmp_path: Path, key: str) -> tuple[str, str, store.StoredTokens]:
    """The account `home`'s stored tokens, decrypted here (access, refresh, the row)."""
    db = Database(make_engine(f"sqlite:///{tmp_path}/bridge.db"))
    try:
        row = await db.run(store.get_oauth_tokens, "home")
    finally:
        db.engine.dispose()
    assert row is not None
    fernet = Fernet(key.encode())
    return (
        fernet.decrypt(row.access_token.encode()).decode() if row.access_token else "",
        fernet.decrypt(row.refresh_token.encode()).decode() if row.refresh_token else "",
        row,
    )


def database_bytes(database: Path) -> bytes:
    """Every byte SQLite keeps for the database: the file, its WAL and its journal."""
    parts = [database, Path(f"{database}-wal"), Path(f"{database}-journal")]
    return b"".join(p.read_bytes() for p in parts if p.exists())


def write_config(
    path: Path,
    *,
    idp: IdentityProvider,
    dovecot: DovecotServer,
    user: MailUser,
    ca,
    smtpd: SmtpServer | None = None,
    botapi=None,
    oauth2: dict | None = None,
    auth: str = "oauth2",
) -> Path:
    """A TOML file with one account `home` signing in at the test provider."""
    token, url = (botapi.token, botapi.url) if botapi else ("1:unused", "http://127.0.0.1:1")
    imap: dict[str, object] = {
        "host": "127.0.0.1",
        "port": dovecot.port,
        "username": user.name,
        "auth": auth,
        "ca_file": str(ca.ca_file),
        "poll_interval": 0.5,
    }
    if auth == "password":
        imap["password"] = user.password
    smtp = {
        "host": "127.0.0.1",
        "port": smtpd.port if smtpd else 1,
        "ca_file": str(ca.ca_file),
        "from_address": f"{user.name}@example.test",
    }
    tables = {"imap": imap, "smtp": smtp, "oauth2": oauth2 or idp.oauth2_settings()}
    lines = [
        "[telegram]",
        f"token = {json.dumps(token)}",
        f"api_url = {json.dumps(url)}",
        f"allowed_user_ids = [{OWNER}]",
        "",
        "[[accounts]]",
        'name = "home"',
    ]
    for table, values in tables.items():
        lines.append(f"[accounts.{table}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def cli_env(tmp_path: Path, config: Path, key: str | None) -> dict[str, str]:
    """The environment of a `mailbridge` process: the file, the database, the key."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BRIDGE_")}
    env["BRIDGE_CONFIG_FILE"] = str(config)
    env["BRIDGE_DATABASE_URL"] = f"sqlite:///{tmp_path}/bridge.db"
    if key is not None:
        env["BRIDGE_SECRET_KEY"] = key
    return env


class Cli:
    """`mailbridge ARGS` running, with its stdout read line by line (bounded waits)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out: list[str] = []

    async def line_with(self, needle: str) -> str:
        """The first stdout line containing `needle`."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(BOUND):
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise AssertionError(f"no line with {needle!r}; stdout was {self.out}")
                text = raw.decode().rstrip("\n")
                self.out.append(text)
                if needle in text:
                    return text

    async def finish(self, stdin: str | None = None) -> tuple[int, str, str]:
        """Exit status, the rest of stdout, and stderr."""
        out, err = await asyncio.wait_for(
            self.proc.communicate(stdin.encode() if stdin is not None else None), BOUND
        )
        assert self.proc.returncode is not None
        return self.proc.returncode, "\n".join([*self.out, out.decode()]), err.decode()


@contextlib.asynccontextmanager
async def mailbridge(*args: str, env: dict[str, str], cwd: Path) -> AsyncIterator[Cli]:
    """Start `mailbridge ARGS`; killed at the end if it is still running."""
    proc = await asyncio.create_subprocess_exec(
        *COMMAND,
        *args,
        env=env,
        cwd=cwd,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield Cli(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def browser(url: str) -> str:
    """What a browser does with the authorization address: where the provider sends it."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, allow_redirects=False) as reply,
    ):
        assert reply.status == 302, await reply.text()
        return reply.headers["Location"]


def no_secret_in(text: str, idp: IdentityProvider) -> None:
    """None of the provider's tokens and codes appears in `text`."""
    leaked = [s for s in idp.secrets if s in text]
    assert not leaked, f"{len(leaked)} token(s) in the output"


# Sign-in from the command line


async def test_login_device_flow_stores_tokens_encrypted(
    tmp_path, idp, oauth_dovecot, user, ca, secret_key
) -> None:
    config = write_config(
        tmp_path / "mailbridge.toml", idp=idp, dovecot=oauth_dovecot, user=user, ca=ca
    )
    env = cli_env(tmp_path, config, secret_key)
    async with mailbridge("login", "home", env=env, cwd=tmp_path) as cli:
        line = await cli.line_with("enter the code")
        user_code = line.rsplit(" ", 1)[-1]
        idp.approve(user_code, user.name)
        status, out, err = await cli.finish()
    assert status == 0, err
    assert "signed in: home" in out
    assert all(d.too_fast == 0 for d in idp.devices())  # RFC 8628 §3.5: never faster
    no_secret_in(out + err, idp)
    access, refresh, row = await stored(tmp_path, secret_key)
    assert idp.access_tokens(user.name) == [access]
    assert refresh == idp.refresh_token_of(user.name)
    assert not row.revoked
    # The database never holds a token in plain text: not in the file, not in its WAL.
    raw = database_bytes(tmp_path / "bridge.db")
    assert row.refresh_token.encode() in raw  # the encrypted form is what is there
    assert access.encode() not in raw
    assert refresh.encode() not in raw


async def test_login_device_flow_respects_slow_down(
    tmp_path, idp, oauth_dovecot, user, ca, secret_key
) -> None:
    config = write_config(
        tmp_path / "mailbridge.toml", idp=idp, dovecot=oauth_dovecot, user=user, ca=ca
    )
    env = cli_env(tmp_path, config, secret_key)
    idp.slow_down(1)
    async with mailbridge("login", "home", "--device", env=env, cwd=tmp_path) as cli:
        user_code = (await cli.line_with("enter the code")).rsplit(" ", 1)[-1]
        device = idp.device(user_code)
        # Approve once the client polled after being told to slow down.
        await asyncio.to_thread(idp.wait_for, lambda: len(device.polls) >= 2, BOUND)
        idp.approve(user_code, user.name)
        status, _out, err = await cli.finish()
    assert status == 0, err
    gaps = [b - a for a, b in zip(device.polls, device.polls[1:], strict=False)]
    # RFC 8628 §3.5: slow_down adds 5 s to the interval, for this and every later poll.
    assert all(gap >= 5.0 + idp.interval * 0.9 for gap in gaps[1:]), gaps
    assert device.too_fast == 0


@pytest.mark.parametrize(
    ("outcome", "reason"),
    [("declined", "declined"), ("expired", "expired")],
)
async def test_login_device_flow_refused_or_expired_exits_1(
    tmp_path, idp, oauth_dovecot, user, ca, secret_key, outcome, reason
) -> None:
    config = write_config(
        tmp_path / "mailbridge.toml", idp=idp, dovecot=oauth_dovecot, user=user, ca=ca
    )
    async with mailbridge(
        "login", "home", env=cli_env(tmp_path, config, secret_key), cwd=tmp_path
    ) as cli:
        user_code = (await cli.line_with("enter the code")).rsplit(" ", 1)[-1]
        if outcome == "declined":
            idp.decline(user_code)
        else:
            idp.expire_devices()
        status, out, err = await cli.finish()
    assert status == 1, (out, err)
    lines = [line for line in err.splitlines() if line.startswith("mailbridge: ")]
    assert len(lines) == 1, err
    assert reason in lines[0]
    assert "signed in" not in out


async def test_login_code_flow_with_listener(
    tmp_path, idp, oauth_dovecot, user, ca, secret_key
) -> None:
    config = write_config(
        tmp_path / "mailbridge.toml", idp=idp, dovecot=oauth_dovecot, user=user, ca=ca
    )
    env = cli_env(tmp_path, config, secret_key)
    idp.browser_user = user.name
    async with mailbridge(
        "login", "home", "--code", "--listen", "0", env=env, cwd=tmp_path
    ) as cli:
        url = await cli.line_with(idp.url)
        location = await browser(url)
        assert location.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as session, session.get(location) as page:
            assert page.status == 200  # the listener caught the redirect
        status, out, err = await cli.finish()
    assert status == 0, err
    assert "signed in: home" in out
    access, refresh, _row = await stored(tmp_path, secret_key)
    assert access in idp.access_tokens(user.name)
    assert refresh == idp.refresh_token_of(user.name)
    no_secret_in(out + err, idp)


async def test_login_code_flow_with_pasted_address(
    tmp_path, idp, oauth_dovecot, user, ca, secret_key
) -> None:
    config = write_config(
        tmp_path / "mailbridge.toml", idp=idp, dovecot=oauth_dovecot, user=user, ca=ca
    )
    idp.browser_user = user.name
    async with mailbridge(
        "login", "home", "--code", env=cli_env(tmp_path, config, secret_key), cwd=tmp_path
    ) as cli:
        location = await browser(await cli.line_with(idp.url))
        assert location.startswith("http://127.0.0.1/?")  # nothing listens: the user copies it
        status, out, err = await cli.finish(stdin=location + "\n")
    assert status == 0, err
    assert "signed in: home" in out
    access, _refresh, _row = await stored(tmp_path, secret_key)
    assert access in idp.access_tokens(user.name)


async def test_login_code_flow_refused_in_the_browser_exits_1(
    tmp_path, idp, oauth_dovecot, user, ca, secret_key
) -> None:
    config = write_config(
        tmp_path / "mailbridge.toml", idp=idp, dovecot=oauth_dovecot, user=user, ca=ca
    )
    idp.browser_user = ""  # the user clicks "No"
    async with mailbridge(
        "login", "home", "--code", env=cli_env(tmp_path, config, secret_key), cwd=tmp_path
    ) as cli:
        location = await browser(await cli.line_with(idp.url))
        status, _out, err = await cli.finish(stdin=location + "\n")
    assert status == 1
    assert "declined" in err


@pytest.mark.parametrize(
    ("args", "key", "auth", "named"),
    [
        (["login", "home", "--device", "--code"], True, "oauth2", "not allowed with"),
        (["login", "home", "--device", "--listen", "8080"], True, "oauth2", "--listen"),
        (["login", "home", "--code", "--listen", "70000"], True, "oauth2", "--listen"),
        (["login", "nosuch"], True, "oauth2", "ACCOUNT"),
        (["login", "home"], False, "oauth2", "BRIDGE_SECRET_KEY"),
        (["login", "home"], True, "password", "ACCOUNT"),
        (["login"], True, "oauth2", "ACCOUNT"),
    ],
)
async def test_login_usage_errors_exit_2(
    tmp_path, idp, oauth_dovecot, user, ca, secret_key, args, key, auth, named
) -> None:
    config = write_config(
        tmp_path / "mailbridge.toml", idp=idp, dovecot=oauth_dovecot, user=user, ca=ca, auth=auth
    )
    env = cli_env(tmp_path, config, secret_key if key else None)
    async with mailbridge(*args, env=env, cwd=tmp_path) as cli:
        status, _out, err = await cli.finish()
    assert status == 2, err
    assert named in err
    assert "Traceback" not in err


async def test_a_bad_secret_key_is_named_and_never_shown(
    tmp_path, idp, oauth_dovecot, user, ca
) -> None:
    config = write_config(
        tmp_path / "mailbridge.toml", idp=idp, dovecot=oauth_dovecot, user=user, ca=ca
    )
    env = cli_env(tmp_path, config, "not-a-fernet-key-but-secret")
    async with mailbridge("login", "home", env=env, cwd=tmp_path) as cli:
        status, _out, err = await cli.finish()
    assert status == 2
    assert "BRIDGE_SECRET_KEY" in err
    assert "not-a-fernet-key-but-secret" not in err


# The running bridge


@pytest.fixture
def home(tmp_path, idp, oauth_dovecot, user, ca, botapi, bearer_smtpd, secret_key):
    """Settings with the OAuth2 account `home` (more accounts may be added)."""

    def build(*, folders=None, imap=None, accounts=(), telegram=None) -> Settings:
        account = oauth_account(
            "home",
            idp=idp,
            dovecot=oauth_dovecot,
            user=user,
            ca=ca,
            smtpd=bearer_smtpd,
            folders=folders,
            imap=imap,
        )
        settings = make_settings(
            tmp_path,
            dovecot=oauth_dovecot,
            user=user,
            botapi=botapi,
            ca_file=Path(ca.ca_file),
            accounts=[account, *accounts],
            telegram=telegram,
        )
        return with_key(settings, secret_key)

    return build


async def test_mail_is_posted_and_sent_over_xoauth2(
    home, idp, oauth_dovecot, user, botapi, bearer_smtpd, caplog, secret_key, tmp_path
) -> None:
    settings = home(imap={"sent_mailbox": "Sent"})
    await sign_in(settings, idp, user)
    async with running(settings) as bridge:
        await bridge.ready()
        oauth_dovecot.append(user.name, user.password, mail("Bearer news"))
        await wait_mails(botapi, ["Bearer news"])
        botapi.send_user_message(OWNER, OWNER, "/send ann@example.org Through XOAUTH2\nHello")
        received = await bearer_smtpd.next_message(timeout=20)
        await answer_containing(botapi, "Sent to")
        await wait_until(
            lambda: (
                bool(oauth_dovecot.uids(user.name, user.password, "Sent"))
                if "Sent" in oauth_dovecot.folders(user.name, user.password)
                else False
            ),
            15,
            lambda: "no copy in Sent",
        )
    assert received.login == user.name  # AUTH XOAUTH2 as the account's user
    assert received.message()["Subject"] == "Through XOAUTH2"
    assert bearer_smtpd.refused_bearers == 0
    assert not idp.refused_introspections()
    no_secret_in(caplog.text, idp)
    raw = database_bytes(tmp_path / "bridge.db")
    access, refresh, _row = await stored(tmp_path, secret_key)
    assert access.encode() not in raw
    assert refresh.encode() not in raw


async def test_an_expiring_access_token_is_refreshed_without_a_gap(
    home, idp, oauth_dovecot, user, botapi, bearer_smtpd, secret_key, tmp_path
) -> None:
    idp.access_lifetime = 3.0  # the bridge refreshes in the last quarter of a token's life
    settings = home(imap={"sent_mailbox": "Sent"})
    await sign_in(settings, idp, user)
    first_access, first_refresh, _row = await stored(tmp_path, secret_key)
    async with running(settings) as bridge:
        await bridge.ready()
        botapi.send_user_message(OWNER, OWNER, "/send ann@example.org Before\nfirst")
        await bearer_smtpd.next_message(timeout=20)
        await answer_containing(botapi, "Sent to")
        # The first token's lifetime runs out while the bridge runs.
        await asyncio.to_thread(idp.wait_for, lambda: idp.expires_in(first_access) < 0, BOUND)
        botapi.send_user_message(OWNER, OWNER, "/send ann@example.org After\nsecond")
        await bearer_smtpd.next_message(timeout=20)
        await answer_containing(botapi, "Sent to")
        oauth_dovecot.append(user.name, user.password, mail("Still posted"))
        await wait_mails(botapi, ["Still posted"])
    # No login ever met an expired token: the bridge refreshed before it ran out.
    assert not idp.refused_introspections()
    assert bearer_smtpd.refused_bearers == 0
    assert idp.refreshes(user.name) >= 1
    access, refresh, _row = await stored(tmp_path, secret_key)
    # Rotation: the provider replaced the refresh token; the newest one is the one stored.
    assert refresh != first_refresh
    assert refresh == idp.refresh_token_of(user.name)
    assert access != first_access


async def test_a_login_refused_early_gets_one_forced_refresh(
    home, idp, oauth_dovecot, user, botapi, secret_key, tmp_path
) -> None:
    settings = home()
    await sign_in(settings, idp, user)
    first_access, _refresh, _row = await stored(tmp_path, secret_key)
    idp.invalidate(first_access)  # the server stops taking it before its expiry
    async with running(settings) as bridge:
        await bridge.ready()
        oauth_dovecot.append(user.name, user.password, mail("After a forced refresh"))
        await wait_mails(botapi, ["After a forced refresh"])
    assert idp.refreshes(user.name) == 1
    assert [i.reason for i in idp.refused_introspections()] == ["expired"]
    assert not any(SIGN_IN_AGAIN in call.params["text"] for call in botapi.calls("sendMessage"))


async def test_a_revoked_sign_in_is_told_once_and_fails_check(
    home, idp, oauth_dovecot, user, botapi, dovecot, mail_user, ca, caplog, tmp_path, secret_key
) -> None:
    other = make_account("work", dovecot=dovecot, user=mail_user, ca_file=Path(ca.ca_file))
    settings = home(folders=["INBOX", "Lists"], accounts=[other])
    oauth_dovecot.create_folders(user.name, user.password, "Lists")
    await sign_in(settings, idp, user)
    idp.revoke(user.name)  # e.g. the user removed the app's access, or the grant expired
    for run in range(2):  # a restart does not tell the chat again
        async with running(settings):
            if run == 0:
                text = await answer_containing(botapi, SIGN_IN_AGAIN)
                assert "/connect home" in text
            # Both watchers of `home` failed; the other account goes on.
            wanted = 2 * (run + 1)
            await wait_until(
                lambda wanted=wanted: _watcher_failures(caplog) >= wanted,
                20,
                lambda: f"{_watcher_failures(caplog)} watcher failures logged",
            )
            status = await status_once_checked(botapi, "work/INBOX")
            assert "home: ⚠️ sign in again" in status
            dovecot.append(mail_user.name, mail_user.password, mail(f"Work goes on {run}"))
            await wait_mails(botapi, [f"Work goes on {run}"])
    told = [c for c in botapi.calls("sendMessage") if SIGN_IN_AGAIN in c.params["text"]]
    assert len(told) == 1
    assert idp.refreshes(user.name) == 0  # one refused refresh, then never again
    _access, _refresh, row = await stored(tmp_path, secret_key)
    assert row.revoked
    assert row.told
    # `mailbridge check` says so.
    config = write_config(
        tmp_path / "mailbridge.toml", idp=idp, dovecot=oauth_dovecot, user=user, ca=ca
    )
    async with mailbridge("check", env=cli_env(tmp_path, config, secret_key), cwd=tmp_path) as cli:
        status_code, out, err = await cli.finish()
    assert status_code == 1, err
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert any("home OAuth2" in line and "sign in again" in line for line in fails), out
    assert any("home IMAP" in line for line in fails), out


async def status_once_checked(botapi, folder: str) -> str:
    """/status, asked until it shows `folder` checked (its watcher then waits in IDLE)."""
    async with asyncio.timeout(BOUND):
        while True:
            botapi.send_user_message(OWNER, OWNER, "/status")
            status = await answer_containing(botapi, "Folders")
            line = next((s for s in status.splitlines() if s.startswith(f"• {folder}:")), "")
            if "connected" in line and "checked never" not in line:
                return status


def _watcher_failures(caplog) -> int:
    return sum(
        1
        for r in caplog.records
        if r.name == "bridge.mail_to_chat"
        and "home/" in r.getMessage()
        and "sign" in r.getMessage()
    )


async def test_check_signs_in_with_the_stored_tokens(
    tmp_path, idp, oauth_dovecot, user, ca, bearer_smtpd, secret_key
) -> None:
    config = write_config(
        tmp_path / "mailbridge.toml",
        idp=idp,
        dovecot=oauth_dovecot,
        user=user,
        ca=ca,
        smtpd=bearer_smtpd,
    )
    env = cli_env(tmp_path, config, secret_key)
    async with mailbridge("login", "home", env=env, cwd=tmp_path) as cli:
        idp.approve((await cli.line_with("enter the code")).rsplit(" ", 1)[-1], user.name)
        assert (await cli.finish())[0] == 0
    async with mailbridge("check", env=env, cwd=tmp_path) as cli:
        _status, out, err = await cli.finish()
    lines = {line.split(":", 1)[0]: line for line in out.splitlines()}
    assert any(k.startswith("ok    home OAuth2") for k in lines), out
    assert any(k.startswith("ok    home IMAP") for k in lines), out
    assert any(k.startswith("ok    home SMTP") for k in lines), out
    no_secret_in(out + err, idp)


async def test_send_and_export_from_the_cli_use_the_tokens(
    tmp_path, idp, oauth_dovecot, user, ca, bearer_smtpd, secret_key
) -> None:
    config = write_config(
        tmp_path / "mailbridge.toml",
        idp=idp,
        dovecot=oauth_dovecot,
        user=user,
        ca=ca,
        smtpd=bearer_smtpd,
    )
    env = cli_env(tmp_path, config, secret_key)
    async with mailbridge("login", "home", env=env, cwd=tmp_path) as cli:
        idp.approve((await cli.line_with("enter the code")).rsplit(" ", 1)[-1], user.name)
        assert (await cli.finish())[0] == 0
    args = ["send", "--to", "ann@example.org", "--subject", "From the CLI", "--body", "hi"]
    async with mailbridge(*args, env=env, cwd=tmp_path) as cli:
        status, out, err = await cli.finish()
    assert status == 0, err
    received = await bearer_smtpd.next_message(timeout=10)
    assert received.login == user.name
    oauth_dovecot.append(user.name, user.password, mail("Exported"))
    async with mailbridge("export", env=env, cwd=tmp_path) as cli:
        status, out, err = await cli.finish()
    assert status == 0, err
    assert [m["subject"] for m in json.loads(out)] == ["Exported"]


async def test_token_endpoint_outage_backs_off_quietly(
    home, idp, user, secret_key, tmp_path
) -> None:
    idp.access_lifetime = 4.0  # due for a refresh in its last second
    settings = home()
    await sign_in(settings, idp, user)
    first_access, _refresh, _row = await stored(tmp_path, secret_key)
    told: list[str] = []
    engine = make_engine(settings.core.database_url)

    async def notify(text: str) -> None:
        told.append(text)

    tokens = AccessTokens(settings.accounts, settings.core.secret_keys, Database(engine), notify)
    try:
        source = tokens.source("home")
        assert source is not None
        await asyncio.to_thread(idp.wait_for, lambda: idp.expires_in(first_access) < 0.8, BOUND)
        idp.outage(100)
        before = idp.token_requests.get("refresh_token", 0)
        # Due, the endpoint down: the still-valid token is used, nothing raised.
        assert await source.token() == first_access
        assert await source.token() == first_access
        assert idp.token_requests.get("refresh_token", 0) == before + 1  # then it backs off
        await asyncio.to_thread(idp.wait_for, lambda: idp.expires_in(first_access) < 0, BOUND)
        with pytest.raises(TemporaryMailError):
            await source.token()  # expired and no new one: temporary, retried later
        assert idp.token_requests.get("refresh_token", 0) == before + 1
        ok, line = await source.describe()
        assert ok
        assert "trouble" in line
    finally:
        await tokens.aclose()
        engine.dispose()
    assert told == []  # an outage is not the user's business


# Sign-in from the chat


async def test_connect_from_the_chat_with_the_device_flow(
    home, idp, user, botapi, secret_key, tmp_path
) -> None:
    settings = home()
    async with running(settings):
        botapi.send_user_message(OWNER, -100123, "/connect home", chat_type="supergroup")
        assert "private chat" in await answer(botapi, -100123)
        botapi.send_user_message(OWNER, OWNER, "/connect home")
        text = await answer_containing(botapi, "enter the code")
        user_code = text.split("enter the code ", 1)[1].split()[0]
        assert idp.device(user_code).decision == "pending"
        idp.approve(user_code, user.name)
        assert "signed in" in await answer_containing(botapi, "home is signed in")
        botapi.send_user_message(OWNER, OWNER, "/status")
        status = await answer_containing(botapi, "OAuth2 sign-ins")
        assert "home: signed in" in status
    access, _refresh, _row = await stored(tmp_path, secret_key)
    assert access in idp.access_tokens(user.name)


async def test_connect_from_the_chat_with_a_pasted_address(
    home, idp, user, botapi, secret_key, tmp_path
) -> None:
    code_only = {k: v for k, v in idp.oauth2_settings().items() if k != "device_authorization_url"}
    settings = home()
    account = settings.accounts[0].model_copy(update={"oauth2": OAuth2Settings(**code_only)})
    settings = dataclasses.replace(settings, accounts=(account,))
    idp.browser_user = user.name
    async with running(settings):
        botapi.send_user_message(OWNER, OWNER, "/connect home")
        text = await answer_containing(botapi, "open this address")
        url = next(word for word in text.split() if word.startswith(idp.url))
        location = await browser(url)
        pasted = botapi.send_user_message(OWNER, OWNER, location)
        assert "signed in" in await answer_containing(botapi, "home is signed in")
    # The pasted address carried a one-time code: the bot removed it from the chat.
    assert [int(c.params["message_id"]) for c in botapi.calls("deleteMessage")] == [pasted]
    access, _refresh, _row = await stored(tmp_path, secret_key)
    assert access in idp.access_tokens(user.name)
