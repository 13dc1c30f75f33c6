"""Settings: defaults, the TOML file, secret files, one-line errors naming the variable or key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bridge.config import (
    load_account,
    load_imap,
    load_settings,
    load_smtp,
    setting_name,
    use_config_file,
)
from bridge.errors import ConfigError

BASE = {
    "BRIDGE_TELEGRAM__TOKEN": "123456:ABC-def_ghi",
    "BRIDGE_IMAP__HOST": "imap.example.org",
    "BRIDGE_IMAP__USERNAME": "me@example.org",
    "BRIDGE_IMAP__PASSWORD": "imap-secret",
    "BRIDGE_SMTP__HOST": "smtp.example.org",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> pytest.MonkeyPatch:
    """A clean environment with the required variables, in a folder without .env."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("BRIDGE_"):
            monkeypatch.delenv(name)
    for name, value in BASE.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_defaults_follow_the_interface(env: pytest.MonkeyPatch) -> None:
    env.setenv("BRIDGE_TELEGRAM__ALLOWED_USER_IDS", "[11, 22]")
    s = load_settings()
    assert s.telegram.api_url == "https://api.telegram.org"
    assert s.telegram.notify_chats == [11, 22]
    imap, smtp = s.account().imap, s.account().smtp
    assert (imap.port, imap.mailbox, imap.idle, imap.poll_interval) == (993, "INBOX", True, 60.0)
    assert (imap.backfill, imap.max_connections) == (0, 8)
    assert (smtp.port, smtp.security) == (465, "ssl")
    # SMTP login defaults to the IMAP login, the From address to the SMTP username.
    assert smtp.login == ("me@example.org", "imap-secret")
    assert smtp.sender == "me@example.org"
    assert (s.telegram.group_interval, s.telegram.chat_retry) == (2.0, 60.0)
    assert s.routes == ()
    assert s.core.database_url == "sqlite:///data/bridge.db"
    assert s.core.log_level == "INFO"


def test_notify_chats_can_differ_from_allowed_users(env: pytest.MonkeyPatch) -> None:
    env.setenv("BRIDGE_TELEGRAM__ALLOWED_USER_IDS", "[1]")
    env.setenv("BRIDGE_TELEGRAM__NOTIFY_CHAT_IDS", "[-100200300]")
    assert load_settings().telegram.notify_chats == [-100200300]


def test_dotenv_file_is_read(env: pytest.MonkeyPatch, tmp_path) -> None:
    env.delenv("BRIDGE_IMAP__HOST")
    (tmp_path / ".env").write_text("BRIDGE_IMAP__HOST=from-dotenv.example\n")
    assert load_settings().account().imap.host == "from-dotenv.example"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("BRIDGE_IMAP__HOST", None, "BRIDGE_IMAP__HOST: required"),
        ("BRIDGE_TELEGRAM__TOKEN", None, "BRIDGE_TELEGRAM__TOKEN: required"),
        ("BRIDGE_IMAP__PORT", "imaps", "BRIDGE_IMAP__PORT:"),
        ("BRIDGE_SMTP__SECURITY", "plain", "BRIDGE_SMTP__SECURITY:"),
        ("BRIDGE_TELEGRAM__ALLOWED_USER_IDS", "[alice]", "BRIDGE_TELEGRAM__ALLOWED_USER_IDS:"),
        ("BRIDGE_IMAP__CA_FILE", "/nonexistent/ca.pem", "BRIDGE_IMAP__CA_FILE:"),
        ("BRIDGE_TELEGRAM__API_URL", "ftp://x", "BRIDGE_TELEGRAM__API_URL:"),
        ("BRIDGE_LOG_LEVEL", "LOUD", "BRIDGE_LOG_LEVEL:"),
    ],
)
def test_bad_setting_names_the_variable(
    env: pytest.MonkeyPatch, name: str, value: str | None, expected: str
) -> None:
    if value is None:
        env.delenv(name)
    else:
        env.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_errors_never_show_secrets(env: pytest.MonkeyPatch) -> None:
    env.setenv("BRIDGE_TELEGRAM__TOKEN", "not a token with spaces")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "not a token" not in str(info.value)
    assert "imap-secret" not in str(info.value)


def test_export_and_send_need_only_their_server(env: pytest.MonkeyPatch) -> None:
    env.delenv("BRIDGE_TELEGRAM__TOKEN")
    env.delenv("BRIDGE_SMTP__HOST")
    assert load_imap().host == "imap.example.org"
    env.setenv("BRIDGE_SMTP__HOST", "smtp.example.org")
    env.delenv("BRIDGE_IMAP__HOST")
    env.delenv("BRIDGE_IMAP__USERNAME")
    env.delenv("BRIDGE_IMAP__PASSWORD")
    with pytest.raises(ConfigError, match="BRIDGE_SMTP__USERNAME"):
        load_smtp()
    env.setenv("BRIDGE_SMTP__USERNAME", "out@example.org")
    env.setenv("BRIDGE_SMTP__PASSWORD", "smtp-secret")
    assert load_smtp().login == ("out@example.org", "smtp-secret")


def test_secrets_are_masked_in_repr(env: pytest.MonkeyPatch) -> None:
    s = load_settings()
    shown = repr(s)
    assert "imap-secret" not in shown
    assert "ABC-def_ghi" not in shown
    assert set(s.secrets()) == {"123456:ABC-def_ghi", "imap-secret"}


def test_env_file_is_made_owner_only(tmp_path) -> None:
    from bridge.config import secure_env_file

    env_file = tmp_path / ".env"
    assert secure_env_file(env_file) is False  # absent: nothing to do
    env_file.write_text("BRIDGE_IMAP__PASSWORD=x\n")
    env_file.chmod(0o644)
    assert secure_env_file(env_file) is True
    assert env_file.stat().st_mode & 0o777 == 0o600
    assert secure_env_file(env_file) is False


def test_every_missing_variable_is_named_at_once(env: pytest.MonkeyPatch) -> None:
    for name in BASE:
        env.delenv(name)
    with pytest.raises(ConfigError) as info:
        load_settings()
    for name in BASE:
        if "PASSWORD" in name or "USERNAME" in name or "HOST" in name or "TOKEN" in name:
            assert f"{name}: required" in str(info.value)


# The TOML file

TWO_ACCOUNTS = """
[telegram]
token = "123456:file-token"
allowed_user_ids = [7]
notify_chat_ids = [7, -100500]

[[accounts]]
name = "home"
folders = ["INBOX", "Lists"]
[accounts.imap]
host = "imap.home.example"
username = "ann@home.example"
password = "home-secret"
[accounts.smtp]
host = "smtp.home.example"
from_address = "Ann <ann@home.example>"

[[accounts]]
name = "work"
[accounts.imap]
host = "imap.work.example"
port = 1993
username = "ann@work.example"
password = "work-secret"
mailbox = "Work"
max_connections = 2
[accounts.smtp]
host = "smtp.work.example"
security = "starttls"
port = 587
username = "ann-out@work.example"
password = "work-smtp-secret"

[[routes]]
account = "home"
folder = "Lists"
from = "*@github.com"
chats = [-100500]
topic = "GitHub"

[[routes]]
subject = "*[spam]*"
mute = true
"""

# The same file without secrets in it: they come from owner-only files.
NO_SECRETS = """
[telegram]
token_file = "{dir}/token"
allowed_user_ids = [7]

[[accounts]]
name = "home"
[accounts.imap]
host = "imap.home.example"
username = "ann@home.example"
password_file = "{dir}/home"
[accounts.smtp]
host = "smtp.home.example"
"""


@pytest.fixture
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No BRIDGE_* variable at all, in an empty working directory."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("BRIDGE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    """A file with the given mode (whatever the umask)."""
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def secrets_for(tmp_path: Path, mode: int = 0o600) -> str:
    """Secret files for NO_SECRETS (a second line that must be ignored); the file's text."""
    write(tmp_path / "token", "123456:from-token-file\nignored\n", mode)
    write(tmp_path / "home", "home-from-file\n", mode)
    return NO_SECRETS.format(dir=tmp_path)


def test_toml_file_in_the_working_directory(clean: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write(tmp_path / "mailbridge.toml", TWO_ACCOUNTS)
    s = load_settings()
    assert [a.name for a in s.accounts] == ["home", "work"]
    home, work = s.accounts
    assert home.folders == ["INBOX", "Lists"]
    assert (home.imap.host, home.imap.port, home.imap.password.get_secret_value()) == (
        "imap.home.example",
        993,
        "home-secret",
    )
    # SMTP login defaults to the account's own IMAP login.
    assert home.smtp.login == ("ann@home.example", "home-secret")
    assert home.smtp.sender == "Ann <ann@home.example>"
    assert work.folders == ["Work"]  # default: imap.mailbox
    assert (work.imap.port, work.imap.max_connections) == (1993, 2)
    assert (work.smtp.security, work.smtp.port) == ("starttls", 587)
    assert work.smtp.login == ("ann-out@work.example", "work-smtp-secret")
    assert s.telegram.token.get_secret_value() == "123456:file-token"
    assert s.telegram.notify_chats == [7, -100500]
    github, spam = s.routes
    assert (github.account, github.folder, github.from_, github.chats, github.topic) == (
        "home",
        "Lists",
        "*@github.com",
        [-100500],
        "GitHub",
    )
    assert (spam.subject, spam.mute, spam.chats) == ("*[spam]*", True, None)
    assert s.account() is home
    assert s.account("work") is work
    assert set(s.secrets()) == {
        "123456:file-token",
        "home-secret",
        "work-secret",
        "work-smtp-secret",
    }


def test_toml_file_named_by_the_variable_or_config_option(
    clean: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "etc"
    elsewhere.mkdir()
    path = write(elsewhere / "bridge.toml", TWO_ACCOUNTS)
    clean.setenv("BRIDGE_CONFIG_FILE", str(path))
    assert [a.name for a in load_settings().accounts] == ["home", "work"]
    clean.delenv("BRIDGE_CONFIG_FILE")
    with pytest.raises(ConfigError, match="BRIDGE_IMAP__HOST"):
        load_settings()  # no file any more: the variables, which are not set
    use_config_file(str(path))  # what `mailbridge --config PATH` does
    assert os.environ["BRIDGE_CONFIG_FILE"] == str(path)
    assert load_account("work").imap.host == "imap.work.example"


def test_config_file_that_does_not_exist_is_named(clean: pytest.MonkeyPatch) -> None:
    clean.setenv("BRIDGE_CONFIG_FILE", "/nonexistent/mailbridge.toml")
    with pytest.raises(ConfigError, match=r"^BRIDGE_CONFIG_FILE: .*/nonexistent/mailbridge\.toml"):
        load_settings()


def test_config_file_that_is_not_toml_is_named(clean: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write(tmp_path / "mailbridge.toml", "[telegram\n")
    with pytest.raises(ConfigError, match=r"mailbridge\.toml: not valid TOML"):
        load_settings()


def test_environment_overrides_the_file(clean: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write(tmp_path / "mailbridge.toml", TWO_ACCOUNTS)
    clean.setenv("BRIDGE_TELEGRAM__ALLOWED_USER_IDS", "[99, 100]")
    clean.setenv("BRIDGE_LOG_LEVEL", "debug")
    s = load_settings()
    assert s.telegram.allowed_user_ids == [99, 100]
    # The rest of [telegram] still comes from the file.
    assert s.telegram.token.get_secret_value() == "123456:file-token"
    assert s.telegram.notify_chats == [7, -100500]
    assert s.core.log_level == "DEBUG"


def test_dotenv_overrides_the_file(clean: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write(tmp_path / "mailbridge.toml", TWO_ACCOUNTS)
    write(tmp_path / ".env", "BRIDGE_DATABASE_URL=sqlite:///elsewhere.db\n")
    assert load_settings().core.database_url == "sqlite:///elsewhere.db"


def test_secret_files_are_read(clean: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The config file itself holds no secret: group- and world-readable is fine.
    write(tmp_path / "mailbridge.toml", secrets_for(tmp_path), mode=0o644)
    s = load_settings()
    assert s.telegram.token.get_secret_value() == "123456:from-token-file"  # the first line
    (home,) = s.accounts
    assert home.imap.password.get_secret_value() == "home-from-file"
    assert home.smtp.login == ("ann@home.example", "home-from-file")
    assert set(s.secrets()) == {"123456:from-token-file", "home-from-file"}
    assert "home-from-file" not in repr(s)


@pytest.mark.parametrize("secret", ["token", "home"])
def test_loose_secret_file_is_refused_by_name(
    clean: pytest.MonkeyPatch, tmp_path: Path, secret: str
) -> None:
    write(tmp_path / "mailbridge.toml", secrets_for(tmp_path))
    (tmp_path / secret).chmod(0o644)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert f"{tmp_path / secret} is readable by group or others" in message
    assert "from-token-file" not in message
    assert "home-from-file" not in message
    assert "\n" not in message


def test_missing_or_empty_secret_file_is_named(clean: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write(tmp_path / "mailbridge.toml", secrets_for(tmp_path))
    (tmp_path / "home").unlink()
    with pytest.raises(ConfigError, match=f"cannot read {tmp_path / 'home'}"):
        load_settings()
    write(tmp_path / "home", "\n")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'home'} is empty"):
        load_settings()


def test_env_password_file_twins(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.delenv("BRIDGE_IMAP__PASSWORD")
    env.delenv("BRIDGE_TELEGRAM__TOKEN")
    env.setenv("BRIDGE_IMAP__PASSWORD_FILE", str(write(tmp_path / "pw", "pw-from-file\n")))
    env.setenv("BRIDGE_TELEGRAM__TOKEN_FILE", str(write(tmp_path / "tok", "1:from-file\n")))
    s = load_settings()
    assert s.account().imap.password.get_secret_value() == "pw-from-file"
    assert s.account().smtp.login == ("me@example.org", "pw-from-file")
    assert s.telegram.token.get_secret_value() == "1:from-file"
    assert load_smtp().login == ("me@example.org", "pw-from-file")  # `send` alone
    (tmp_path / "pw").chmod(0o640)
    with pytest.raises(ConfigError, match=f"{tmp_path / 'pw'} is readable by group or others"):
        load_settings()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_config_file_with_a_secret_must_be_owner_only(
    clean: pytest.MonkeyPatch, tmp_path: Path, mode: int
) -> None:
    path = write(tmp_path / "mailbridge.toml", TWO_ACCOUNTS, mode)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    # The file in the working directory is named as found there.
    assert message.startswith("mailbridge.toml holds a secret and is readable by group or others")
    assert "home-secret" not in message
    path.chmod(0o600)
    assert len(load_settings().accounts) == 2


def test_config_file_with_only_a_token_is_checked_too(
    clean: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    text = secrets_for(tmp_path).replace('token_file = "', 'token = "1:x"\n# "')
    path = write(tmp_path / "mailbridge.toml", text, 0o644)
    with pytest.raises(ConfigError, match="holds a secret"):
        load_settings()
    path.chmod(0o600)
    assert load_settings().telegram.token.get_secret_value() == "1:x"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('host = "imap.work.example"\n', "", "accounts[1].imap.host: required"),
        ("port = 1993", 'port = "imaps"', "accounts[1].imap.port:"),
        ('security = "starttls"', 'security = "plain"', "accounts[1].smtp.security:"),
        ('folders = ["INBOX", "Lists"]', 'folders = ["INBOX", "INBOX"]', "accounts[0]:"),
        ('subject = "*[spam]*"', 'subjet = "*[spam]*"', "routes[1].subjet:"),
        ('topic = "GitHub"', 'topic = ""', "routes[0].topic:"),
    ],
)
def test_file_errors_name_the_key(
    clean: pytest.MonkeyPatch, tmp_path: Path, old: str, new: str, expected: str
) -> None:
    assert old in TWO_ACCOUNTS
    write(tmp_path / "mailbridge.toml", TWO_ACCOUNTS.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_duplicate_account_names_are_refused(clean: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write(tmp_path / "mailbridge.toml", TWO_ACCOUNTS.replace('name = "work"', 'name = "home"'))
    with pytest.raises(ConfigError, match="accounts: the name 'home' is used twice"):
        load_settings()


@pytest.mark.parametrize("name", ["Home", "my account", "", "a" * 33, "ünï"])
def test_invalid_account_name_is_refused(
    clean: pytest.MonkeyPatch, tmp_path: Path, name: str
) -> None:
    write(tmp_path / "mailbridge.toml", TWO_ACCOUNTS.replace('"work"', f'"{name}"'))
    with pytest.raises(ConfigError, match=r"^accounts\[1\]\.name:"):
        load_settings()


def test_route_naming_an_unknown_account_is_refused(
    clean: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write(
        tmp_path / "mailbridge.toml", TWO_ACCOUNTS.replace('account = "home"', 'account = "hmoe"')
    )
    with pytest.raises(ConfigError, match=r"routes\[0\]\.account: no account named 'hmoe'"):
        load_settings()
    # A pattern may match no account today; it is not a typo of a name.
    write(tmp_path / "mailbridge.toml", TWO_ACCOUNTS.replace('account = "home"', 'account = "h*"'))
    assert load_settings().routes[0].account == "h*"


def test_route_with_no_chats_is_refused(clean: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # An empty list would post the mail nowhere without saying so.
    write(tmp_path / "mailbridge.toml", TWO_ACCOUNTS.replace("chats = [-100500]", "chats = []"))
    with pytest.raises(ConfigError, match=r"^routes\[0\]\.chats: .*mute = true"):
        load_settings()


def test_without_accounts_the_variables_make_the_default_account(
    env: pytest.MonkeyPatch,
) -> None:
    env.setenv("BRIDGE_IMAP__MAILBOX", "Work")
    s = load_settings()
    (account,) = s.accounts
    assert account.name == "default"
    assert account.folders == ["Work"]
    assert s.account("default") is account
    # The same with a file that sets only [telegram]: still the variables' account.
    write(Path("mailbridge.toml"), "[telegram]\nallowed_user_ids = [5]\n", 0o644)
    s = load_settings()
    assert [a.name for a in s.accounts] == ["default"]
    assert s.telegram.allowed_user_ids == [5]


def test_account_option_picks_the_account(clean: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write(tmp_path / "mailbridge.toml", TWO_ACCOUNTS)
    assert load_imap().host == "imap.home.example"  # the first
    assert load_imap("work").mailbox == "Work"
    assert load_smtp("work").login == ("ann-out@work.example", "work-smtp-secret")
    assert load_smtp("home").login == ("ann@home.example", "home-secret")
    for load in (load_imap, load_smtp, load_account):
        with pytest.raises(
            ConfigError, match=r"^--account: no account named 'nosuch'.*home, work"
        ):
            load("nosuch")
    assert setting_name("smtp.from_address") == "accounts[0].smtp.from_address"
    assert setting_name("smtp.from_address", "work") == "accounts[1].smtp.from_address"


def test_account_option_without_a_file(env: pytest.MonkeyPatch) -> None:
    assert load_imap("default").host == "imap.example.org"
    assert load_smtp("default").host == "smtp.example.org"
    for load in (load_imap, load_smtp, load_account):
        with pytest.raises(ConfigError, match=r"^--account: no account named 'home'"):
            load("home")
    assert setting_name("smtp.from_address") == "BRIDGE_SMTP__FROM_ADDRESS"


ROOT = Path(__file__).resolve().parents[2]


def test_the_example_file_loads_and_is_the_readme_example(
    clean: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    example = (ROOT / "mailbridge.example.toml").read_text(encoding="utf-8")
    assert example in (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ("bot-token", "home-password", "work-password"):
        write(tmp_path / name, "123456:secret\n")
    # It holds no secret itself, so it may be readable by anyone.
    write(tmp_path / "example.toml", example.replace("/etc/mailbridge/", f"{tmp_path}/"), 0o644)
    clean.setenv("BRIDGE_CONFIG_FILE", str(tmp_path / "example.toml"))
    s = load_settings()
    assert [(a.name, a.folders) for a in s.accounts] == [
        ("home", ["INBOX", "Lists"]),
        ("work", ["INBOX", "Alerts"]),
    ]
    assert [(r.account, r.topic, r.mute) for r in s.routes] == [
        ("home", "GitHub", False),
        ("work", None, True),
        (None, None, False),
        ("work", 12, False),
    ]
    assert s.account("work").smtp.login == ("ann", "123456:secret")
