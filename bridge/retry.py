"""Waiting helpers for every layer: backoff with jitter, a stoppable sleep, Telegram's delay."""

from __future__ import annotations

import asyncio
import random
import warnings
from datetime import timedelta

from telegram.error import RetryAfter
from telegram.warnings import PTBDeprecationWarning

MAX_BACKOFF = 60.0


class Stopped(Exception):
    """Raised inside a loop when a stop was requested mid-work."""


class Backoff:
    """Exponential backoff with full jitter, capped."""

    def __init__(self, first: float = 1.0, cap: float = MAX_BACKOFF) -> None:
        self.first, self.cap, self.attempt = first, cap, 0

    def next(self) -> float:
        """The next delay."""
        self.attempt += 1
        ceiling = min(self.cap, self.first * 2 ** (self.attempt - 1))
        jitter: float = random.uniform(0, ceiling / 2)  # noqa: S311 - jitter, not crypto
        return float(ceiling / 2 + jitter)

    def reset(self) -> None:
        """Back to the first delay after a success."""
        self.attempt = 0


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to seconds; True if stop was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True


def retry_delay(exc: RetryAfter) -> float:
    """Seconds Telegram asked us to wait (an int today, a timedelta in a future PTB)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value = exc.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)
