"""Logging set-up: one line per event (text or JSON), and a filter that masks secrets."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Literal

MASK = "***"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What a log call may pass as extra={...}; JSON lines carry them as keys of their own.
CONTEXT = ("account", "folder", "chat", "uid")


class SecretFilter(logging.Filter):
    """Replace every known secret in the formatted message with ***.

    httpx logs request URLs (which hold `bot<TOKEN>`) as httpx.URL objects, so masking must
    work on `record.getMessage()`, not on `record.msg` alone.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        """Mask secrets in the message and in the formatted exception, then let it through."""
        if not self.secrets:
            return True
        message = record.getMessage()
        masked = self.mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = self.mask(text)
            record.exc_info = None
        if record.stack_info:
            record.stack_info = self.mask(record.stack_info)
        for key in CONTEXT:
            value = getattr(record, key, None)
            if isinstance(value, str):
                setattr(record, key, self.mask(value))
        return True

    def mask(self, text: str) -> str:
        """Return text with every secret replaced."""
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (ISO 8601, UTC), level, logger, message, the context
    fields a log call passed (account, folder, chat, uid) and the exception, if any.

    It formats what SecretFilter left, so the masked message and exception text.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in CONTEXT:
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value if isinstance(value, int | float | bool) else str(value)
        exception = record.exc_text
        if record.exc_info and not exception:
            exception = self.formatException(record.exc_info)
        if exception:
            line["exception"] = exception
        if record.stack_info:
            line["stack"] = record.stack_info
        return json.dumps(line, ensure_ascii=False)


def setup_logging(
    level: str = "INFO",
    secrets: Iterable[str] = (),
    log_format: Literal["text", "json"] = "text",
) -> None:
    """Configure the root logger once; called from cli.py only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_FORMAT))
    handler.addFilter(SecretFilter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # httpx logs every request URL at INFO, and PTB's URLs contain the bot token.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # With max_retries=0 (telegram/bot.py) PTB's limiter logs every 429 at ERROR with a
    # traceback before raising it; the caller waits it out and counts it (metrics).
    logging.getLogger("telegram.ext.AIORateLimiter").setLevel(logging.CRITICAL)


def mask_secrets(secrets: Iterable[str]) -> Callable[[], None]:
    """Add a SecretFilter to every handler of the root logger; returns a function that undoes it.

    app.run() calls this, so secrets are masked however the embedding program set up logging.
    """
    secret_filter = SecretFilter(secrets)
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(secret_filter)

    def undo() -> None:
        for handler in handlers:
            handler.removeFilter(secret_filter)

    return undo
