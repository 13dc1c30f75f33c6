"""Settings from BRIDGE_* environment variables and .env, and their one-line error messages."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bridge.errors import ConfigError

ENV_FILE = ".env"
_S = TypeVar("_S", bound=BaseSettings)
_T = TypeVar("_T")


def _config(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(
        env_prefix=prefix,
        env_file=ENV_FILE,
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
    )


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


class CoreSettings(BaseSettings):
    """Settings every command needs."""

    model_config = _config("BRIDGE_")

    database_url: str = "sqlite:///data/bridge.db"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class TelegramSettings(BaseSettings):
    """The bot: token, Bot API server, who may use it and where new mail goes."""

    model_config = _config("BRIDGE_TELEGRAM__")

    token: SecretStr
    api_url: str = "https://api.telegram.org"
    allowed_user_ids: Annotated[list[int], NoDecode] = Field(default_factory=list)
    notify_chat_ids: Annotated[list[int] | None, NoDecode] = None
    preview_chars: int = Field(default=1200, ge=0, le=3500)
    digest_threshold: int = Field(default=20, ge=2)
    chat_interval: float = Field(default=1.0, ge=0, le=60)
    send_rate_limit: int = Field(default=30, ge=1)
    send_dialogue_timeout: float = Field(default=600.0, gt=0)

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


class ImapSettings(BaseSettings):
    """The mailbox to watch over IMAPS."""

    model_config = _config("BRIDGE_IMAP__")

    host: str
    port: int = Field(default=993, ge=1, le=65535)
    username: str
    password: SecretStr
    mailbox: str = "INBOX"
    ca_file: Path | None = None
    idle: bool = True
    poll_interval: float = Field(default=60.0, gt=0)
    backfill: int = Field(default=0, ge=0)
    timeout: float = Field(default=30.0, gt=0)
    sent_mailbox: str = ""
    save_sent: bool = True

    @field_validator("ca_file")
    @classmethod
    def _ca_exists(cls, value: Path | None) -> Path | None:
        return _check_ca(value)


class SmtpSettings(BaseSettings):
    """The server that sends mail."""

    model_config = _config("BRIDGE_SMTP__")

    host: str
    port: int = Field(default=465, ge=1, le=65535)
    security: Literal["ssl", "starttls"] = "ssl"
    username: str | None = None
    password: SecretStr | None = None
    from_address: str | None = None
    ca_file: Path | None = None
    timeout: float = Field(default=30.0, gt=0)

    @field_validator("security", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("ca_file")
    @classmethod
    def _ca_exists(cls, value: Path | None) -> Path | None:
        return _check_ca(value)

    @property
    def login(self) -> tuple[str, str]:
        """Username and password; filled from the IMAP login by load_smtp()."""
        if self.username is None or self.password is None:
            raise ConfigError("BRIDGE_SMTP__USERNAME: required (or set BRIDGE_IMAP__USERNAME)")
        return self.username, self.password.get_secret_value()

    @property
    def sender(self) -> str:
        """The From address of mail the bridge sends."""
        return self.from_address or self.login[0]


def _check_ca(value: Path | None) -> Path | None:
    if value is not None and not value.is_file():
        raise ValueError(f"no such file: {value}")
    return value


@dataclass(frozen=True)
class Settings:
    """Everything `mailbridge run` and `mailbridge check` need."""

    core: CoreSettings
    telegram: TelegramSettings
    imap: ImapSettings
    smtp: SmtpSettings

    def secrets(self) -> list[str]:
        """Every secret value, for the log filter that masks them."""
        values = [self.telegram.token.get_secret_value(), self.imap.password.get_secret_value()]
        if self.smtp.password is not None:
            values.append(self.smtp.password.get_secret_value())
        return [v for v in values if v]


def _build(cls: type[_S], prefix: str) -> _S:
    try:
        return cls()
    except ValidationError as exc:
        raise ConfigError(_describe(exc, prefix)) from None


def _describe(exc: ValidationError, prefix: str) -> str:
    lines = []
    for error in exc.errors():
        name = prefix + "__".join(str(part) for part in error["loc"]).upper()
        reason = "required" if error["type"] == "missing" else error["msg"]
        lines.append(f"{name}: {reason}")
    return "; ".join(lines)


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


def load_core() -> CoreSettings:
    """Database and logging settings."""
    return _build(CoreSettings, "BRIDGE_")


def load_imap() -> ImapSettings:
    """IMAP settings alone (for `mailbridge export`)."""
    return _build(ImapSettings, "BRIDGE_IMAP__")


def load_smtp(imap: ImapSettings | None = None) -> SmtpSettings:
    """SMTP settings, the login defaulting to the IMAP one."""
    smtp = _build(SmtpSettings, "BRIDGE_SMTP__")
    if smtp.username is None or smtp.password is None:
        if imap is None:
            try:
                imap = ImapSettings()  # type: ignore[call-arg]
            except ValidationError:
                imap = None
        if imap is None:
            missing = "BRIDGE_SMTP__USERNAME" if smtp.username is None else "BRIDGE_SMTP__PASSWORD"
            raise ConfigError(f"{missing}: required (or set the BRIDGE_IMAP__ login)")
        smtp = smtp.model_copy(
            update={
                "username": smtp.username or imap.username,
                "password": smtp.password or imap.password,
            }
        )
    return smtp


def load_settings() -> Settings:
    """All settings; raises ConfigError naming the first bad variables."""
    errors: list[str] = []

    def attempt(build: Callable[[], _T]) -> _T | None:
        try:
            return build()
        except ConfigError as exc:
            errors.append(str(exc))
            return None

    core = attempt(load_core)
    telegram = attempt(lambda: _build(TelegramSettings, "BRIDGE_TELEGRAM__"))
    imap = attempt(load_imap)
    smtp = attempt(lambda: load_smtp(imap)) if imap is not None else None
    if imap is None:
        attempt(lambda: _build(SmtpSettings, "BRIDGE_SMTP__"))  # report its errors too
    if core is None or telegram is None or imap is None or smtp is None:
        raise ConfigError("; ".join(errors))
    return Settings(core=core, telegram=telegram, imap=imap, smtp=smtp)
