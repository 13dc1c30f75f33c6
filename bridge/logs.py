"""Logging set-up: one line per event, and a filter that masks secrets in every record."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable

MASK = "***"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
        return True

    def mask(self, text: str) -> str:
        """Return text with every secret replaced."""
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text


def setup_logging(level: str = "INFO", secrets: Iterable[str] = ()) -> None:
    """Configure the root logger once; called from cli.py only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
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
