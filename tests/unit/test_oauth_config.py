"""OAuth2 settings and the pure parts of bridge/oauth.py: providers, PKCE, the redirect check."""

from __future__ import annotations

import base64
import hashlib
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from cryptography.fernet import Fernet

from bridge.config import OAuth2Settings, load_settings, load_smtp
from bridge.errors import ConfigError
from bridge.oauth import CodeFlow, OAuthClient, SignInFailed, Tokens, code_of, provider_of

KEY = Fernet.generate_key().decode()
BASE = {
    "BRIDGE_TELEGRAM__TOKEN": "123456:ABC-def_ghi",
    "BRIDGE_IMAP__HOST": "outlook.office365.com",
    "BRIDGE_IMAP__USERNAME": "ann@example.org",
    "BRIDGE_IMAP__AUTH": "oauth2",
    "BRIDGE_SMTP__HOST": "smtp.office365.com",
    "BRIDGE_SMTP__PORT": "587",
    "BRIDGE_SMTP__SECURITY": "starttls",
    "BRIDGE_OAUTH2__PROVIDER": "microsoft",
    "BRIDGE_OAUTH2__CLIENT_ID": "00000000-0000-0000-0000-000000000000",
    "BRIDGE_SECRET_KEY": KEY,
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """A clean environment describing one Microsoft account, in a folder without .env."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("BRIDGE_"):
            monkeypatch.delenv(name)
    for name, value in BASE.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_an_oauth2_account_needs_no_password(env: pytest.MonkeyPatch) -> None:
    account = load_settings().account()
    assert account.imap.auth == "oauth2"
    assert account.imap.password is None
    assert account.smtp.auth == "oauth2"  # as the IMAP login, unless set
    assert account.smtp.user == "ann@example.org"
    assert account.oauth2 is not None
    assert account.oauth2.tenant == "common"
    assert load_smtp().auth == "oauth2"


def test_secrets_include_the_key_and_the_client_secret(env: pytest.MonkeyPatch) -> None:
    env.setenv("BRIDGE_OAUTH2__CLIENT_SECRET", "client-secret-value")
    secrets = load_settings().secrets()
    assert KEY in secrets
    assert "client-secret-value" in secrets


@pytest.mark.parametrize(
    ("unset", "named"),
    [
        ("BRIDGE_SECRET_KEY", "BRIDGE_SECRET_KEY: required"),
        ("BRIDGE_OAUTH2__PROVIDER", "BRIDGE_OAUTH2__PROVIDER: required"),
        ("BRIDGE_OAUTH2__CLIENT_ID", "BRIDGE_OAUTH2__CLIENT_ID: required"),
    ],
)
def test_missing_oauth2_settings_are_named(
    env: pytest.MonkeyPatch, unset: str, named: str
) -> None:
    env.delenv(unset)
    with pytest.raises(ConfigError, match=named):
        load_settings()


def test_no_oauth2_block_is_named(env: pytest.MonkeyPatch) -> None:
    env.delenv("BRIDGE_OAUTH2__PROVIDER")
    env.delenv("BRIDGE_OAUTH2__CLIENT_ID")
    with pytest.raises(ConfigError, match="BRIDGE_OAUTH2: required"):
        load_settings()


def test_a_password_login_still_needs_its_password(env: pytest.MonkeyPatch) -> None:
    env.setenv("BRIDGE_IMAP__AUTH", "password")
    with pytest.raises(ConfigError, match="BRIDGE_IMAP__PASSWORD: required"):
        load_settings()


def test_a_bad_key_is_named_and_not_shown(env: pytest.MonkeyPatch) -> None:
    env.setenv("BRIDGE_SECRET_KEY", f"{KEY},not-a-key-secret")
    with pytest.raises(ConfigError, match="BRIDGE_SECRET_KEY: not a Fernet key") as caught:
        load_settings()
    assert "not-a-key-secret" not in str(caught.value)


def test_several_keys_and_the_file_twin(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    old = Fernet.generate_key().decode()
    path = tmp_path / "key"
    path.write_text(f"{KEY}, {old}\n")
    path.chmod(0o600)
    env.delenv("BRIDGE_SECRET_KEY")
    env.setenv("BRIDGE_SECRET_KEY_FILE", str(path))
    assert load_settings().core.secret_keys == [KEY, old]


def test_toml_errors_name_the_oauth2_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("BRIDGE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("BRIDGE_SECRET_KEY", KEY)
    config = tmp_path / "mailbridge.toml"
    head = '[telegram]\ntoken = "1:x"\n[[accounts]]\nname = "home"\n'
    imap = '[accounts.imap]\nhost = "h"\nusername = "u"\nauth = "oauth2"\n'
    smtp = '[accounts.smtp]\nhost = "h"\n'
    config.write_text(head + imap + smtp)
    config.chmod(0o600)
    with pytest.raises(ConfigError, match=r"accounts\[0\]\.oauth2: required"):
        load_settings()
    config.write_text(
        head + imap + smtp + '[accounts.oauth2]\nprovider = "custom"\nclient_id = "c"\n'
    )
    with pytest.raises(ConfigError, match=r'accounts\[0\]\.oauth2: .*"custom" needs token_url'):
        load_settings()
    custom = '[accounts.oauth2]\nprovider = "custom"\nclient_id = "c"\nscopes = ["m"]\n'
    config.write_text(head + imap + smtp + custom + 'token_url = "http://idp.example/token"\n')
    with pytest.raises(ConfigError, match=r"accounts\[0\]\.oauth2\.token_url: must start with"):
        load_settings()


def test_known_providers() -> None:
    microsoft = provider_of(OAuth2Settings(provider="microsoft", client_id="c", tenant="contoso"))
    assert microsoft.device_authorization_url == (
        "https://login.microsoftonline.com/contoso/oauth2/v2.0/devicecode"
    )
    assert microsoft.token_url.endswith("/contoso/oauth2/v2.0/token")
    assert "offline_access" in microsoft.scopes
    assert "https://outlook.office.com/IMAP.AccessAsUser.All" in microsoft.scopes
    assert "https://outlook.office.com/SMTP.Send" in microsoft.scopes
    assert microsoft.default_method == "device"
    google = provider_of(OAuth2Settings(provider="google", client_id="c"))
    assert google.scopes == ("https://mail.google.com/",)
    assert google.device_authorization_url is None  # its device flow refuses the mail scope
    assert google.default_method == "code"


async def test_the_authorization_address_carries_an_s256_challenge() -> None:
    settings = OAuth2Settings(provider="google", client_id="desktop-client")
    async with httpx.AsyncClient() as http:
        flow = OAuthClient(settings, http).code_flow("http://127.0.0.1:8400/")
    query = {k: v[0] for k, v in parse_qs(urlsplit(flow.url).query).items()}
    digest = hashlib.sha256(flow.verifier.encode()).digest()
    assert query["code_challenge"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert query["code_challenge_method"] == "S256"
    assert query["state"] == flow.state
    assert query["redirect_uri"] == "http://127.0.0.1:8400/"
    assert (query["access_type"], query["prompt"]) == ("offline", "consent")
    assert 43 <= len(flow.verifier) <= 128  # RFC 7636 §4.1
    assert flow.verifier not in flow.url


def test_the_redirected_address_must_carry_this_sign_ins_state() -> None:
    flow = CodeFlow(url="", redirect_uri="http://127.0.0.1/", state="s1", verifier="v")
    assert code_of(flow, "http://127.0.0.1/?code=abc&state=s1\n") == "abc"
    with pytest.raises(SignInFailed, match="state"):
        code_of(flow, "http://127.0.0.1/?code=abc&state=other")
    with pytest.raises(SignInFailed, match="declined"):
        code_of(flow, "http://127.0.0.1/?error=access_denied&state=s1")


def test_refresh_is_due_in_the_last_quarter_or_five_minutes() -> None:
    now = datetime.now(UTC)
    hour = Tokens("a", "r", now + timedelta(hours=1), "", now)
    assert not hour.due(now + timedelta(minutes=54))
    assert hour.due(now + timedelta(minutes=55, seconds=1))
    short = Tokens("a", "r", now + timedelta(seconds=8), "", now)
    assert not short.due(now + timedelta(seconds=5))
    assert short.due(now + timedelta(seconds=6.5))
    assert not Tokens("a", "r", None, "", now).due(now + timedelta(days=9))
