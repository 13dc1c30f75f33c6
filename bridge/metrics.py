"""Prometheus metrics: what the bridge counts, in the registry that /metrics exports.

The metric objects live at module level, on a registry of our own. They are write-only
instrumentation: each part adds to them where the event happens, and only bridge/http.py reads
them (to export them, and the time of Telegram's last answer for /healthz). One process is one
scrape target, which is how the official client is meant to be used (its README declares
metrics at module level); handing a registry through every constructor would change the
signature of every part for no behaviour. The registry is not the client's global one so
that /metrics shows exactly these metrics and the process collectors, whatever else the
process imports. Tests compare values before and after, since one process may run several
bridges one after the other.
"""

from __future__ import annotations

import time

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

REGISTRY = CollectorRegistry(auto_describe=True)
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_collector)  # process_resident_memory_bytes, open fds, CPU, GC

MAILS_SEEN = Counter(
    "mailbridge_mails_seen",
    "Mails the watchers found above a folder's cursor.",
    ["account"],
    registry=REGISTRY,
)
MAILS_POSTED = Counter(
    "mailbridge_mails_posted",
    "Mails Telegram accepted a message for (once per chat).",
    ["account"],
    registry=REGISTRY,
)
MAILS_MUTED = Counter(
    "mailbridge_mails_muted",
    "Mails recorded but posted nowhere (a muted sender or a route with mute = true).",
    ["account"],
    registry=REGISTRY,
)
DELIVERY_DELAY = Histogram(
    "mailbridge_delivery_delay_seconds",
    "From a mail's arrival at the watcher to Telegram accepting the message that carries it.",
    buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600),
    registry=REGISTRY,
)
TELEGRAM_ERRORS = Counter(
    "mailbridge_telegram_errors",
    "Failed Bot API calls, by what they mean (bridge/telegram/errors.py Verdict).",
    ["verdict"],
    registry=REGISTRY,
)
TELEGRAM_LAST_OK = Gauge(
    "mailbridge_telegram_last_ok_timestamp_seconds",
    "Unix time of the last Bot API call that succeeded.",
    registry=REGISTRY,
)
OUTBOX_SENT = Counter(
    "mailbridge_outbox_sent",
    "Outbox mails this instance handed to the SMTP server.",
    ["account"],
    registry=REGISTRY,
)
OUTBOX_FAILED = Counter(
    "mailbridge_outbox_failed",
    "Outbox mails this instance gave up on (refused, or still failing after 24 hours).",
    ["account"],
    registry=REGISTRY,
)
OUTBOX_ITEMS = Gauge(
    "mailbridge_outbox_items",
    "Outbox items in the database by status (pending, sent, failed), read at each scrape.",
    ["status"],
    registry=REGISTRY,
)
IMAP_RECONNECTS = Counter(
    "mailbridge_imap_reconnects",
    "IMAP connections lost or refused, each followed by a new attempt with backoff.",
    ["account"],
    registry=REGISTRY,
)
DB_STATEMENTS = Counter(
    "mailbridge_db_statements",
    "SQL statements this instance sent to the database (bench/instances.py: per posted mail).",
    registry=REGISTRY,
)
LEASE_CHANGES = Counter(
    "mailbridge_lease_changes",
    "Leases this instance took over or lost (bridge/leases.py).",
    registry=REGISTRY,
)


def telegram_answered() -> None:
    """Note that a Bot API call succeeded just now."""
    TELEGRAM_LAST_OK.set(time.time())


def telegram_last_ok() -> float:
    """Unix time of the last successful Bot API call in this process (0.0: none yet)."""
    return REGISTRY.get_sample_value("mailbridge_telegram_last_ok_timestamp_seconds") or 0.0
