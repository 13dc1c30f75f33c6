"""Settings: the TOML file, BRIDGE_* environment variables and .env, with one-line errors.

Where values come from, strongest first: environment variables (BRIDGE_ prefix, "__" between
nested names), then `.env` in the working directory, then the TOML file (`--config PATH`, else
BRIDGE_CONFIG_FILE, else `mailbridge.toml` in the working directory when it exists), then the
defaults below. Every `password` (and the bot `token`) has a `*_file` twin naming a file whose
first line is the secret. Without `[[accounts]]`, the BRIDGE_IMAP__* and BRIDGE_SMTP__* settings
make one account named `default`.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from cryptography.fernet import Fernet
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from bridge.errors import ConfigError

ENV_FILE = ".env"
DEFAULT_CONFIG_FILE = Path("mailbridge.toml")
DEFAULT_ACCOUNT = "default"
_M = TypeVar("_M", bound=BaseModel)
# Keys whose value is a secret: a file holding one must be owner-only.
_SECRET_KEYS = frozenset({"password", "token", "client_secret", "secret_key"})


# Choice settings are matched without regard to case (`SSL`, `Oauth2`, `info`).
_LOWER = BeforeValidator(lambda value: value.lower() if isinstance(value, str) else value)
_UPPER = BeforeValidator(lambda value: value.upper() if isinstance(value, str) else value)


def _id_list(value: Any) -> Any:
    """Accept a JSON list, a comma-separated list or a single id."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part for part in text.replace(";", ",").split(",") if part.strip()]
    if isinstance(value, int):
        return [value]
    return value


def read_secret_file(path: Path) -> str:
    """The first line of a secret file; refused when group or others may read it."""
    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ValueError(f"{path} is readable by group or others (chmod 600 {path})")
        with path.open(encoding="utf-8") as handle:
            line = handle.readline().strip()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    if not line:
        raise ValueError(f"{path} is empty")
    return line


def _secret_twin(data: Any, key: str) -> Any:
    """Fill `key` from `key_file` when only the file is given."""
    if isinstance(data, dict) and data.get(f"{key}_file") and not data.get(key):
        data = dict(data)
        data[key] = read_secret_file(Path(str(data[f"{key}_file"])))
    return data


def _check_ca(value: Path | None) -> Path | None:
    if value is not None and not value.is_file():
        raise ValueError(f"no such file: {value}")
    return value


class CoreSettings(BaseModel):
    """Settings every command needs."""

    database_url: str = "sqlite:///data/bridge.db"
    log_level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], _UPPER] = "INFO"
    log_format: Annotated[Literal["text", "json"], _LOWER] = "text"
    # Several instances on one database: a dead instance's work is taken over after this.
    lease_seconds: float = Field(default=30.0, ge=3, le=3600)
    # Fernet key(s) that encrypt OAuth2 tokens in the database; comma-separated, newest first.
    secret_key: SecretStr | None = None
    secret_key_file: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _secret_key_file(cls, data: Any) -> Any:
        return _secret_twin(data, "secret_key")

    @field_validator("secret_key")
    @classmethod
    def _fernet_keys(cls, value: SecretStr | None) -> SecretStr | None:
        """Each comma-separated key must be a Fernet key; the message never shows the value."""
        if value is None:
            return None
        keys = [key.strip() for key in value.get_secret_value().split(",")]
        for key in keys:
            try:
                Fernet(key)
            except ValueError:
                raise ValueError(
                    "not a Fernet key (32 url-safe base64-encoded bytes; make one with: python "
                    "-c 'from cryptography.fernet import Fernet; print(Fernet.generate_key()"
                    ".decode())'; several keys: comma-separated, the newest first)"
                ) from None
        return SecretStr(",".join(keys))

    @property
    def secret_keys(self) -> list[str]:
        """The Fernet keys, the one that encrypts first (empty without BRIDGE_SECRET_KEY)."""
        if self.secret_key is None:
            return []
        return self.secret_key.get_secret_value().split(",")


def _host_port(value: str | None) -> str | None:
    """HOST:PORT (a listening address), or None."""
    if value is None or value == "":
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:8080")
    return f"{host or '0.0.0.0'}:{port}"  # noqa: S104 - the user asked for every address


class HttpSettings(BaseModel):
    """The health and metrics endpoint."""

    model_config = ConfigDict(extra="forbid")

    listen: str | None = None  # HOST:PORT; off when unset

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        return _host_port(value)


class TelegramSettings(BaseModel):
    """The bot: token, Bot API server, who may use it and where new mail goes."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is named, not ignored

    token: SecretStr
    token_file: Path | None = None
    api_url: str = "https://api.telegram.org"
    allowed_user_ids: Annotated[list[int], NoDecode] = Field(default_factory=list)
    notify_chat_ids: Annotated[list[int] | None, NoDecode] = None
    preview_chars: int = Field(default=1200, ge=0, le=3500)
    digest_threshold: int = Field(default=20, ge=2)
    chat_interval: float = Field(default=1.0, ge=0, le=60)
    group_interval: float = Field(default=2.0, ge=0, le=60)
    # A chat Telegram refuses (bot kicked, chat gone) is tried again after this, doubling to 1 h.
    chat_retry: float = Field(default=60.0, gt=0, le=3600)
    send_rate_limit: int = Field(default=30, ge=1)
    # Bot API: uploads up to 50 MB; a self-hosted Bot API server in local mode takes 2,000.
    upload_limit_mb: int = Field(default=50, ge=1, le=2000)
    send_dialogue_timeout: float = Field(default=600.0, gt=0)
    # Webhook mode instead of long polling: every instance takes updates behind a proxy.
    webhook_url: str | None = None
    webhook_listen: str | None = None  # HOST:PORT the webhook server listens on
    webhook_secret: SecretStr | None = None
    webhook_secret_file: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _token_file(cls, data: Any) -> Any:
        return _secret_twin(_secret_twin(data, "token"), "webhook_secret")

    @field_validator("webhook_listen")
    @classmethod
    def _webhook_listen(cls, value: str | None) -> str | None:
        return _host_port(value)

    @model_validator(mode="after")
    def _webhook(self) -> TelegramSettings:
        """Webhook mode needs the public URL, the address to listen on and a secret."""
        given = [self.webhook_url, self.webhook_listen, self.webhook_secret]
        if any(given) and not all(given):
            raise ValueError(
                "webhook mode needs webhook_url, webhook_listen and webhook_secret(_file)"
            )
        if self.webhook_url and not self.webhook_url.startswith("https://"):
            raise ValueError("webhook_url must start with https:// (Telegram's rule)")
        return self

    @field_validator("allowed_user_ids", "notify_chat_ids", mode="before")
    @classmethod
    def _ids(cls, value: Any) -> Any:
        return _id_list(value)

    @field_validator("token")
    @classmethod
    def _token_shape(cls, value: SecretStr) -> SecretStr:
        secret = value.get_secret_value()
        if ":" not in secret or any(ch.isspace() for ch in secret):
            raise ValueError("expected the form 123456:ABC-DEF... from @BotFather")
        return value

    @field_validator("api_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with https:// (or http:// for a local server)")
        return value.rstrip("/")

    @property
    def notify_chats(self) -> list[int]:
        """Chats that receive new-mail summaries: the setting, else the allowed users."""
        if self.notify_chat_ids is None:
            return list(self.allowed_user_ids)
        return list(self.notify_chat_ids)


class ImapSettings(BaseModel):
    """An account's IMAPS server."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is named, not ignored

    host: str
    port: int = Field(default=993, ge=1, le=65535)
    username: str
    # Before `password`: the password check reads it. oauth2: SASL XOAUTH2 with the account's
    # [accounts.oauth2] tokens (bridge/oauth.py) instead of a password.
    auth: Annotated[Literal["password", "oauth2"], _LOWER] = "password"
    password: SecretStr | None = Field(default=None, validate_default=True)
    password_file: Path | None = None
    mailbox: str = "INBOX"
    ca_file: Path | None = None
    idle: bool = True
    poll_interval: float = Field(default=60.0, gt=0)
    backfill: int = Field(default=0, ge=0)
    timeout: float = Field(default=30.0, gt=0)
    # Servers allow 10-20 connections per account; folders beyond this many are polled.
    max_connections: int = Field(default=8, ge=1, le=100)
    sent_mailbox: str = ""
    save_sent: bool = True
    archive_mailbox: str = ""
    trash_mailbox: str = ""
    junk_mailbox: str = ""

    @model_validator(mode="before")
    @classmethod
    def _password_file(cls, data: Any) -> Any:
        return _secret_twin(data, "password")

    @field_validator("password")
    @classmethod
    def _password_needed(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is None and info.data.get("auth", "password") == "password":
            raise ValueError('required (or sign in with OAuth2: auth = "oauth2")')
        return value

    @field_validator("ca_file")
    @classmethod
    def _ca_exists(cls, value: Path | None) -> Path | None:
        return _check_ca(value)

    @property
    def secret(self) -> str:
        """The password (an OAuth2 login has none; only password logins ask)."""
        if self.password is None:
            raise ConfigError(f"IMAP {self.username}: no password (auth = {self.auth!r})")
        return self.password.get_secret_value()


class SmtpSettings(BaseModel):
    """An account's submission server."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is named, not ignored

    host: str
    port: int = Field(default=465, ge=1, le=65535)
    security: Annotated[Literal["ssl", "starttls"], _LOWER] = "ssl"
    username: str | None = None
    # None: as the account's IMAP login (password, or oauth2: SASL XOAUTH2, bridge/oauth.py).
    auth: Annotated[Literal["password", "oauth2"] | None, _LOWER] = None
    password: SecretStr | None = None
    password_file: Path | None = None
    from_address: str | None = None
    ca_file: Path | None = None
    timeout: float = Field(default=30.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _password_file(cls, data: Any) -> Any:
        return _secret_twin(data, "password")

    @field_validator("ca_file")
    @classmethod
    def _ca_exists(cls, value: Path | None) -> Path | None:
        return _check_ca(value)

    @property
    def login(self) -> tuple[str, str]:
        """Username and password (the account fills them from the IMAP login)."""
        if self.username is None or self.password is None:
            raise ConfigError("BRIDGE_SMTP__USERNAME: required (or set BRIDGE_IMAP__USERNAME)")
        return self.username, self.password.get_secret_value()

    @property
    def sender(self) -> str:
        """The From address of mail the bridge sends."""
        if self.from_address:
            return self.from_address
        return self.login[0] if self.auth != "oauth2" else self.user

    @property
    def user(self) -> str:
        """The login name (also for OAuth2, which has no password)."""
        if self.username is None:
            raise ConfigError("BRIDGE_SMTP__USERNAME: required (or set BRIDGE_IMAP__USERNAME)")
        return self.username


class OAuth2Settings(BaseModel):
    """[accounts.oauth2]: the provider and the user's own client registration (none ships)."""

    model_config = ConfigDict(extra="forbid")

    provider: Annotated[Literal["microsoft", "google", "custom"], _LOWER]
    client_id: str = Field(min_length=1)
    client_secret: SecretStr | None = None  # public clients (Microsoft's) have none
    client_secret_file: Path | None = None
    # Microsoft: "common", "organizations", "consumers", a tenant id or a domain.
    tenant: str = Field(default="common", pattern=r"^[A-Za-z0-9._-]{1,100}$")
    # "custom" needs these; for microsoft and google they override the known endpoints.
    device_authorization_url: str | None = None
    authorization_url: str | None = None
    token_url: str | None = None
    scopes: Annotated[list[str] | None, NoDecode] = None

    @model_validator(mode="before")
    @classmethod
    def _client_secret_file(cls, data: Any) -> Any:
        return _secret_twin(data, "client_secret")

    @field_validator("scopes", mode="before")
    @classmethod
    def _scope_list(cls, value: Any) -> Any:
        """A JSON list, or scopes separated by spaces or commas (an environment variable)."""
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else text.replace(",", " ").split()
        return value

    @field_validator("device_authorization_url", "authorization_url", "token_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        # RFC 6749 §3.1/§3.2: the endpoints require TLS; plain http only on this machine.
        if value is None or value.startswith("https://"):
            return value
        if value.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
            return value
        raise ValueError("must start with https:// (http:// only for 127.0.0.1 or localhost)")

    @model_validator(mode="after")
    def _custom_complete(self) -> OAuth2Settings:
        """A custom provider names its token endpoint, a sign-in endpoint and the scopes."""
        if self.provider == "custom":
            missing = [name for name in ("token_url", "scopes") if not getattr(self, name)]
            if not (self.device_authorization_url or self.authorization_url):
                missing.append("device_authorization_url or authorization_url")
            if missing:
                raise ValueError(f'provider "custom" needs {", ".join(missing)}')
        return self


class AccountSettings(BaseModel):
    """One [[accounts]] entry: a name, the watched folders, its IMAP and SMTP servers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9_-]{1,32}$")
    folders: list[str] = Field(default_factory=list)
    imap: ImapSettings
    smtp: SmtpSettings
    # After imap and smtp: the check below reads their `auth`.
    oauth2: OAuth2Settings | None = Field(default=None, validate_default=True)

    @field_validator("oauth2")
    @classmethod
    def _oauth2_needed(
        cls, value: OAuth2Settings | None, info: ValidationInfo
    ) -> OAuth2Settings | None:
        imap, smtp = info.data.get("imap"), info.data.get("smtp")
        imap_auth = imap.auth if imap is not None else "password"
        smtp_auth = (smtp.auth if smtp is not None else None) or imap_auth
        if value is None and "oauth2" in (imap_auth, smtp_auth):
            raise ValueError(
                'required when imap.auth or smtp.auth is "oauth2": the provider and client_id'
            )
        return value

    @model_validator(mode="after")
    def _defaults(self) -> AccountSettings:
        """Folders default to imap.mailbox; the SMTP login (and its auth) to the IMAP login."""
        if not self.folders:
            self.folders.append(self.imap.mailbox)
        if len(set(self.folders)) != len(self.folders):
            raise ValueError("folders: a folder is listed twice")
        if self.smtp.auth is None:
            self.smtp.auth = self.imap.auth
        if self.smtp.username is None or self.smtp.password is None:
            self.smtp.username = self.smtp.username or self.imap.username
            if self.smtp.auth == "password":
                self.smtp.password = self.smtp.password or self.imap.password
        if self.smtp.auth == "password" and self.smtp.password is None:
            raise ValueError(
                'smtp.password: required (the IMAP login has none), or smtp.auth = "oauth2"'
            )
        return self

    @property
    def uses_oauth2(self) -> bool:
        """Whether the IMAP or the SMTP login signs in with OAuth2."""
        return "oauth2" in (self.imap.auth, self.smtp.auth)

    def secrets(self) -> list[str]:
        """Every secret of this account."""
        values = [s.get_secret_value() for s in (self.imap.password, self.smtp.password) if s]
        if self.oauth2 is not None and self.oauth2.client_secret is not None:
            values.append(self.oauth2.client_secret.get_secret_value())
        return values


ACCOUNT_NAME = r"^[a-z0-9_-]{1,32}$"


class RouteSettings(BaseModel):
    """One [[routes]] entry: matchers (shell-style, case-insensitive; None matches anything)
    and where a matching mail goes. The first route that matches decides."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    account: str | None = None
    folder: str | None = None
    from_: str | None = Field(default=None, alias="from")
    to: str | None = None
    subject: str | None = None
    chats: Annotated[list[int] | None, NoDecode] = None  # None: telegram.notify_chat_ids
    topic: str | int | None = None  # a forum topic: its name, or its message_thread_id
    mute: bool = False  # True: counted as seen, posted nowhere

    @field_validator("chats", mode="before")
    @classmethod
    def _ids(cls, value: Any) -> Any:
        return _id_list(value)

    @field_validator("chats")
    @classmethod
    def _some_chat(cls, value: list[int] | None) -> list[int] | None:
        """An empty list would silently drop the mail: say so instead."""
        if value is not None and not value:
            raise ValueError(
                "an empty list would post the mail nowhere: name a chat, leave `chats` out "
                "for telegram.notify_chat_ids, or set mute = true"
            )
        return value

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str | int | None) -> str | int | None:
        if isinstance(value, str):
            value = value.strip()
            if not value or len(value) > 128:
                raise ValueError("a topic name is 1-128 characters")
        return value


@dataclass(frozen=True)
class Settings:
    """Everything `mailbridge run` and `mailbridge check` need."""

    core: CoreSettings
    telegram: TelegramSettings
    accounts: tuple[AccountSettings, ...]
    routes: tuple[RouteSettings, ...] = ()
    http: HttpSettings = field(default_factory=HttpSettings)

    def account(self, name: str | None = None) -> AccountSettings:
        """The named account; without a name the only (else the first) one."""
        if name is None:
            return self.accounts[0]
        for account in self.accounts:
            if account.name == name:
                return account
        known = ", ".join(a.name for a in self.accounts)
        raise ConfigError(f"--account: no account named {name!r} (known: {known})")

    def secrets(self) -> list[str]:
        """Every secret value, for the log filter that masks them."""
        values = [self.telegram.token.get_secret_value()]
        if self.telegram.webhook_secret is not None:
            values.append(self.telegram.webhook_secret.get_secret_value())
        for account in self.accounts:
            values += account.secrets()
        values += self.core.secret_keys
        return [v for v in values if v]


class _Sources(BaseSettings):
    """The raw, merged values of every source; typed validation happens in load_*()."""

    model_config = SettingsConfigDict(
        env_prefix="BRIDGE_",
        env_nested_delimiter="__",
        env_file=ENV_FILE,
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
    )

    config_file: Path | None = None
    database_url: Any = None
    log_level: Any = None
    log_format: Any = None
    lease_seconds: Any = None
    secret_key: Any = None
    secret_key_file: Any = None
    oauth2: dict[str, Any] | None = None  # the `default` account's, as BRIDGE_OAUTH2__*
    http: dict[str, Any] = Field(default_factory=dict)
    telegram: dict[str, Any] = Field(default_factory=dict)
    imap: dict[str, Any] | None = None
    smtp: dict[str, Any] | None = None
    accounts: list[dict[str, Any]] = Field(default_factory=list)
    routes: list[dict[str, Any]] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment over .env over the TOML file."""
        return (init_settings, env_settings, dotenv_settings, TomlConfigSettingsSource(cls))


def config_file_path() -> Path | None:
    """The TOML file in use: BRIDGE_CONFIG_FILE (also from .env), else ./mailbridge.toml."""
    try:
        located = _Sources().config_file
    except ValidationError:
        located = None
    if located is not None:
        if not located.is_file():
            raise ConfigError(f"BRIDGE_CONFIG_FILE: no such file: {located}")
        return located
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def _read_sources() -> _Sources:
    path = config_file_path()
    if path is None:
        return _Sources()
    _check_config_file(path)

    class _WithFile(_Sources):
        model_config = SettingsConfigDict(**{**_Sources.model_config, "toml_file": path})

    try:
        return _WithFile()
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_describe(exc, '')}") from None


def _check_config_file(path: Path) -> None:
    """Refuse a TOML file that does not parse, or holds a secret and is readable by others."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if path.stat().st_mode & 0o077 and any(_holds_secret(data)):
        raise ConfigError(
            f"{path} holds a secret and is readable by group or others (chmod 600 {path}, "
            "or move the secret to a *_file)"
        )


def _holds_secret(value: Any) -> Iterable[bool]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield key in _SECRET_KEYS and bool(item)
            yield from _holds_secret(item)
    elif isinstance(value, list):
        for item in value:
            yield from _holds_secret(item)


def _describe(exc: ValidationError, prefix: str) -> str:
    """One line per error; `prefix` is BRIDGE_X__ (a variable) or accounts[0]. (a file key)."""
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        if prefix == "" or prefix.startswith("BRIDGE_"):
            name = (prefix or "BRIDGE_") + "__".join(loc).upper()
        else:
            name = prefix + ".".join(loc)
        name = name.rstrip("_.")
        reason = "required" if error["type"] == "missing" else error["msg"]
        if reason.startswith("Value error, "):
            reason = reason[len("Value error, ") :]
        lines.append(f"{name}: {reason}")
    return "; ".join(lines)


def _validate(model: type[_M], data: Any, prefix: str, errors: list[str]) -> _M | None:
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as exc:
        errors.append(_describe(exc, prefix))
        return None


def _accounts(raw: _Sources, errors: list[str]) -> list[AccountSettings]:
    """[[accounts]] from the file, else one `default` account from BRIDGE_IMAP__/SMTP__."""
    if not raw.accounts:
        imap = _validate(ImapSettings, raw.imap, "BRIDGE_IMAP__", errors)
        smtp_data = dict(raw.smtp or {})
        smtp = _validate(SmtpSettings, smtp_data, "BRIDGE_SMTP__", errors)
        if imap is None or smtp is None:
            return []
        data = {"name": DEFAULT_ACCOUNT, "imap": imap, "smtp": smtp, "oauth2": raw.oauth2}
        account = _validate(AccountSettings, data, "BRIDGE_", errors)
        return [] if account is None else [account]
    accounts: list[AccountSettings] = []
    for index, data in enumerate(raw.accounts):
        account = _validate(AccountSettings, data, f"accounts[{index}].", errors)
        if account is not None:
            accounts.append(account)
    names = [a.name for a in accounts]
    for name in sorted({n for n in names if names.count(n) > 1}):
        errors.append(f"accounts: the name {name!r} is used twice")
    return accounts


def _routes(
    raw: _Sources, accounts: list[AccountSettings], errors: list[str]
) -> list[RouteSettings]:
    routes: list[RouteSettings] = []
    names = {a.name for a in accounts}
    for index, data in enumerate(raw.routes):
        route = _validate(RouteSettings, data, f"routes[{index}].", errors)
        if route is None:
            continue
        if (
            route.account is not None
            and not any(c in route.account for c in "*?[")
            and (accounts and route.account not in names)
        ):
            errors.append(f"routes[{index}].account: no account named {route.account!r}")
        routes.append(route)
    return routes


def _core(raw: _Sources, errors: list[str]) -> CoreSettings | None:
    data = {
        "database_url": raw.database_url,
        "log_level": raw.log_level,
        "log_format": raw.log_format,
        "lease_seconds": raw.lease_seconds,
        "secret_key": raw.secret_key,
        "secret_key_file": raw.secret_key_file,
    }
    return _validate(CoreSettings, {k: v for k, v in data.items() if v is not None}, "", errors)


def load_core() -> CoreSettings:
    """Database and logging settings."""
    errors: list[str] = []
    core = _core(_read_sources(), errors)
    if core is None:
        raise ConfigError("; ".join(errors))
    return core


def load_settings() -> Settings:
    """All settings; raises ConfigError naming every bad variable or file key."""
    raw = _read_sources()
    errors: list[str] = []
    core = _core(raw, errors)
    telegram = _validate(TelegramSettings, raw.telegram, "BRIDGE_TELEGRAM__", errors)
    accounts = _accounts(raw, errors)
    routes = _routes(raw, accounts, errors)
    http = _validate(HttpSettings, raw.http, "BRIDGE_HTTP__", errors)
    if core is not None:
        errors += _missing_secret_key(core, accounts)
    if errors or core is None or telegram is None or http is None or not accounts:
        raise ConfigError("; ".join(errors))
    return Settings(
        core=core, telegram=telegram, accounts=tuple(accounts), routes=tuple(routes), http=http
    )


def _missing_secret_key(core: CoreSettings, accounts: Iterable[AccountSettings]) -> list[str]:
    """OAuth2 tokens are stored encrypted: an OAuth2 account needs BRIDGE_SECRET_KEY."""
    names = [a.name for a in accounts if a.uses_oauth2]
    if not names or core.secret_keys:
        return []
    return [
        f"BRIDGE_SECRET_KEY: required for the OAuth2 account(s) {', '.join(names)}: a Fernet key "
        "that encrypts their tokens (or BRIDGE_SECRET_KEY_FILE)"
    ]


def load_oauth_account(name: str | None) -> tuple[CoreSettings, AccountSettings]:
    """An OAuth2 account (the named one, else the first) and the core settings that store
    its tokens."""
    account = load_account(name)
    if account.oauth2 is None or not account.uses_oauth2:
        raise ConfigError(
            f"ACCOUNT: the account {name!r} does not sign in with OAuth2 (set imap.auth = "
            '"oauth2" and an [accounts.oauth2] block)'
        )
    core = load_core()
    errors = _missing_secret_key(core, [account])
    if errors:
        raise ConfigError(errors[0])
    return core, account


def load_account(name: str | None = None) -> AccountSettings:
    """One account alone (for `send` and `export`): the named one, else the first."""
    raw = _read_sources()
    errors: list[str] = []
    accounts = _accounts(raw, errors)
    if errors or not accounts:
        raise ConfigError("; ".join(errors))
    return Settings(CoreSettings(), _NO_TELEGRAM, tuple(accounts)).account(name)


def load_imap(account: str | None = None) -> ImapSettings:
    """An account's IMAP settings alone (for `mailbridge export`)."""
    raw = _read_sources()
    if raw.accounts:
        return load_account(account).imap
    _only_default(account)
    errors: list[str] = []
    imap = _validate(ImapSettings, raw.imap, "BRIDGE_IMAP__", errors)
    if imap is None:
        raise ConfigError("; ".join(errors))
    return imap


def load_smtp(account: str | None = None) -> SmtpSettings:
    """An account's SMTP settings alone (for `mailbridge send`); the login defaults to IMAP's."""
    raw = _read_sources()
    if raw.accounts:
        return load_account(account).smtp
    _only_default(account)
    errors: list[str] = []
    smtp = _validate(SmtpSettings, raw.smtp, "BRIDGE_SMTP__", errors)
    if smtp is None:
        raise ConfigError("; ".join(errors))
    if smtp.auth is None:
        imap_auth = str((raw.imap or {}).get("auth", "")).lower()
        smtp.auth = "oauth2" if imap_auth == "oauth2" else "password"
    if smtp.auth == "oauth2":
        smtp.username = smtp.username or (raw.imap or {}).get("username")
        if smtp.username is None:
            raise ConfigError("BRIDGE_SMTP__USERNAME: required (or set the BRIDGE_IMAP__ login)")
        return smtp
    if smtp.username is None or smtp.password is None:
        imap = raw.imap or {}
        try:
            imap = _secret_twin(imap, "password")
        except ValueError as exc:
            raise ConfigError(f"BRIDGE_IMAP__PASSWORD_FILE: {exc}") from None
        if smtp.username is None and not imap.get("username"):
            raise ConfigError("BRIDGE_SMTP__USERNAME: required (or set the BRIDGE_IMAP__ login)")
        if smtp.password is None and not imap.get("password"):
            raise ConfigError("BRIDGE_SMTP__PASSWORD: required (or set the BRIDGE_IMAP__ login)")
        smtp.username = smtp.username or str(imap["username"])
        smtp.password = smtp.password or SecretStr(str(imap["password"]))
    return smtp


_NO_TELEGRAM = TelegramSettings(token=SecretStr("0:unused"))


def _only_default(account: str | None) -> None:
    """Without [[accounts]] the one account is `default`: any other name is an error."""
    if account is not None and account != DEFAULT_ACCOUNT:
        raise ConfigError(
            f"--account: no account named {account!r} (known: {DEFAULT_ACCOUNT}; "
            "more accounts need [[accounts]] in the configuration file)"
        )


def setting_name(key: str, account: str | None = None) -> str:
    """An account's `key` as errors name it: accounts[1].smtp.from_address, or the variable."""
    for index, data in enumerate(_read_sources().accounts):
        if (account is None and index == 0) or data.get("name") == account:
            return f"accounts[{index}].{key}"
    return "BRIDGE_" + key.replace(".", "__").upper()


def secure_env_file(path: Path = Path(ENV_FILE)) -> bool:
    """Make .env owner-only (it holds the passwords); True if its mode had to change."""
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        return False
    if mode & 0o077 == 0:
        return False
    path.chmod(mode & 0o700)
    return True


def use_config_file(path: str) -> None:
    """`mailbridge --config PATH`: the same as BRIDGE_CONFIG_FILE=PATH."""
    os.environ["BRIDGE_CONFIG_FILE"] = path
