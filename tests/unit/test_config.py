"""Settings: defaults, parsing, and one-line errors that name the variable."""

from __future__ import annotations

import pytest

from bridge.config import load_imap, load_settings, load_smtp
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
    for name in list(__import__("os").environ):
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
    assert (s.account().imap.port, s.account().imap.mailbox, s.account().imap.idle, s.account().imap.poll_interval) == (
        993,
        "INBOX",
        True,
        60.0,
    )
    assert s.imap.backfill == 0
    assert (s.smtp.port, s.smtp.security) == (465, "ssl")
    # SMTP login defaults to the IMAP login, the From address to the SMTP username.
    assert s.smtp.login == ("me@example.org", "imap-secret")
    assert s.smtp.sender == "me@example.org"
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
