"""Delivery-to-post latency of the real bridge against real Dovecot and the fake Bot API.

Run from the repository root:  .venv/bin/python bench/latency.py [--mails 40]

Phase 1 runs `bridge.app.run` in this process (IDLE on) and delivers N mails one at a time
with IMAP APPEND over a separate, already logged-in connection; for each it measures the time
from APPEND's tagged OK (delivery) to the arrival of the matching sendMessage at the fake Bot
API (`Call.time`, taken when its handler starts). Phase 2 measures Dovecot's own wake-up floor
on a fresh mailbox: a plain imapclient session idling in IDLE, time from APPEND's OK to
idle_check() returning the EXISTS. Dovecot delays IDLE notifications by 0.5 s
(NOTIFY_DELAY_MSECS in src/lib-storage/mailbox-watch.c), so the floor is ~0.5 s.

The per-stage breakdown wraps a few ImapSession/FolderWatcher/Delivery methods from this script
at run time (timestamps only; the bridge's code is not changed). Printed figures are
milliseconds. The settings are the integration tests' (make_settings: chat_interval 0), so
that the chat's pacing never holds a mail back; --chat-interval sets another.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imapclient import IMAPClient  # noqa: E402

from bridge import mail_to_chat  # noqa: E402
from bridge.delivery import Delivery  # noqa: E402
from bridge.mail.imap import ImapSession  # noqa: E402
from bridge.mail_to_chat import FolderWatcher  # noqa: E402
from tests.integration.conftest import make_settings, running  # noqa: E402
from tests.servers.botapi import FakeBotApi  # noqa: E402
from tests.servers.certs import CA  # noqa: E402
from tests.servers.dovecot import DovecotServer, MailUser  # noqa: E402

# (monotonic time, event name), appended from the event loop and from worker threads.
EVENTS: list[tuple[float, str]] = []

# Stage name -> (event that ends it); each stage starts where the previous one ended.
STAGES = [
    ("APPEND -> bridge's IDLE wake-up", "wake"),
    ("wake-up -> IDLE DONE answered", "done"),
    ("-> UID SEARCH answered", "search"),
    ("-> UID FETCH answered", "fetch"),
    ("-> summary rendered", "summary"),
    ("-> delivery row + cursor written", "recorded"),
    ("-> delivery took it (db reads)", "send"),
    ("-> sendMessage at Bot API", "posted"),
]


def make_mail(subject: str) -> bytes:
    """A small plain-text mail like the integration tests deliver."""
    msg = EmailMessage()
    msg["From"] = "Ann Example <ann@example.org>"
    msg["To"] = "me@example.org"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{secrets.token_hex(8)}@example.org>"
    msg["Date"] = "Mon, 03 Jun 2024 10:00:00 +0000"
    msg.set_content("Hello,\n\nthe quarterly figures are attached below.\n\nAnn\n" * 5)
    return bytes(msg)


def p95(values: list[float]) -> float:
    """95th percentile, linear interpolation between the closest ranks."""
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


def summary(values: list[float]) -> tuple[float, float, float, float]:
    """(median, p95, max, min) in milliseconds."""
    ms = [v * 1000 for v in values]
    return statistics.median(ms), p95(ms), max(ms), min(ms)


# --- instrumentation (wrappers installed from here; bridge code unchanged) -------------------


def _record(name: str) -> None:
    EVENTS.append((time.monotonic(), name))


def instrument() -> list[str]:
    """Wrap the methods whose return marks a stage; returns the names that were missing."""
    missing: list[str] = []

    def wrap(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        original = getattr(owner, name, None)
        if original is None:
            missing.append(f"{owner.__name__}.{name}")
            return
        setattr(owner, name, make(original))

    def idle_slice(original: Any) -> Any:
        def wrapper(self: ImapSession, *args: Any) -> Any:
            result = original(self, *args)
            if result:
                # Still not idling: the NOOP before IDLE saw the mail, not IDLE itself.
                _record("wake" if self._idling else "wake-noop")
            return result

        return wrapper

    def end_idle(original: Any) -> Any:
        def wrapper(self: ImapSession, *args: Any) -> Any:
            was_idling = self._idling
            result = original(self, *args)
            if was_idling:
                _record("done")
            return result

        return wrapper

    def on_return(name: str, only_if_truthy: bool = False) -> Callable[[Any], Any]:
        def make(original: Any) -> Any:
            def wrapper(*args: Any, **kw: Any) -> Any:
                result = original(*args, **kw)
                if result or not only_if_truthy:
                    _record(name)
                return result

            return wrapper

        return make

    def on_async_return(name: str) -> Callable[[Any], Any]:
        def make(original: Any) -> Any:
            async def wrapper(*args: Any, **kw: Any) -> Any:
                result = await original(*args, **kw)
                _record(name)
                return result

            return wrapper

        return make

    def on_entry(original: Any) -> Any:
        async def wrapper(*args: Any, **kw: Any) -> Any:
            _record("send")
            return await original(*args, **kw)

        return wrapper

    wrap(ImapSession, "_idle_slice", idle_slice)
    wrap(ImapSession, "_end_idle", end_idle)
    wrap(ImapSession, "_uids_after", on_return("search", only_if_truthy=True))
    wrap(ImapSession, "_fetch", on_return("fetch"))
    wrap(mail_to_chat, "summarise", on_return("summary"))
    wrap(FolderWatcher, "_record", on_async_return("recorded"))
    wrap(Delivery, "_send_batch", on_entry)
    return missing


def stages_of(t_append: float, t_posted: float) -> dict[str, float]:
    """Stage durations for one mail from the events between its APPEND and its post."""
    events = sorted(e for e in EVENTS if t_append <= e[0] <= t_posted)
    wake = next((e for e in events if e[1] in ("wake", "wake-noop")), None)
    if wake is None:
        return {}
    durations: dict[str, float] = {}
    previous = t_append
    for label, name in STAGES:
        if name == "posted":
            moment: float | None = t_posted
        elif name == "wake":
            moment = wake[0]
        else:
            moment = next((t for t, n in events if n == name and t >= previous), None)
            if moment is None and name == "done" and wake[1] == "wake-noop":
                moment = previous  # nothing to end: the NOOP path never entered IDLE
        if moment is None:
            return {}
        durations[label] = moment - previous
        previous = moment
    return durations


# --- phases -----------------------------------------------------------------------------------


def new_user(dovecot: DovecotServer, prefix: str) -> MailUser:
    """A fresh, empty mailbox account."""
    user = MailUser(f"{prefix}{secrets.token_hex(3)}", secrets.token_urlsafe(12))
    dovecot.add_user(user.name, user.password)
    return user


def timed_append(client: IMAPClient, raw: bytes) -> float:
    """APPEND to INBOX; the monotonic time at which the server's tagged OK was read."""
    client.append("INBOX", raw)
    return time.monotonic()


def gaps(args: argparse.Namespace) -> Iterable[float]:
    """The random pause before each delivery (warm-up ones included)."""
    for _ in range(args.warmup + args.mails):
        yield random.uniform(args.gap_min, args.gap_max)


async def bridge_phase(
    args: argparse.Namespace, dovecot: DovecotServer, ca: CA, workdir: Path
) -> tuple[list[float], list[dict[str, float]], int]:
    """Per-mail totals, per-mail stage breakdowns, and how many woke via NOOP, not IDLE."""
    user = new_user(dovecot, "lat")
    totals: list[float] = []
    breakdowns: list[dict[str, float]] = []
    noop_wakes = 0
    async with FakeBotApi() as botapi:
        settings = make_settings(
            workdir,
            dovecot=dovecot,
            user=user,
            botapi=botapi,
            ca_file=ca.ca_file,
            telegram={"chat_interval": args.chat_interval},
        )
        appender = dovecot.connect(user.name, user.password)
        try:
            async with running(settings) as bridge:
                await bridge.ready()
                for i, gap in enumerate(gaps(args)):
                    await asyncio.sleep(gap)
                    subject = f"Bench mail {i} {secrets.token_hex(4)}"
                    raw = make_mail(subject)
                    t_append = await asyncio.to_thread(timed_append, appender, raw)
                    call = await botapi.next_call("sendMessage", timeout=15, ok_only=True)
                    if subject not in str(call.params.get("text")):
                        raise RuntimeError(f"unexpected sendMessage for mail {i}: {call.params}")
                    if i < args.warmup:
                        continue
                    totals.append(call.time - t_append)
                    stages = stages_of(t_append, call.time)
                    if stages:
                        breakdowns.append(stages)
                    if any(n == "wake-noop" and t >= t_append for t, n in EVENTS):
                        noop_wakes += 1
                    EVENTS.clear()
        finally:
            appender.logout()
    return totals, breakdowns, noop_wakes


def floor_phase(args: argparse.Namespace, dovecot: DovecotServer) -> list[float]:
    """APPEND OK -> a plain IDLE session's idle_check() returning EXISTS, per mail."""
    user = new_user(dovecot, "floor")
    watcher = dovecot.connect(user.name, user.password)
    appender = dovecot.connect(user.name, user.password)
    floors: list[float] = []
    try:
        exists = int(watcher.select_folder("INBOX", readonly=True)[b"EXISTS"])
        watcher.idle()
        for i, gap in enumerate(gaps(args)):
            time.sleep(gap)
            t_append = timed_append(appender, make_mail(f"Floor mail {i}"))
            exists += 1
            deadline = t_append + 15
            while True:
                responses = watcher.idle_check(timeout=max(0.0, deadline - time.monotonic()))
                t_woke = time.monotonic()
                if any(
                    isinstance(r, tuple) and len(r) > 1 and r[1] == b"EXISTS" and r[0] >= exists
                    for r in responses
                ):
                    break
                if t_woke >= deadline:
                    raise RuntimeError(f"no EXISTS for floor mail {i} within 15 s")
            if i >= args.warmup:
                floors.append(t_woke - t_append)
        watcher.idle_done()
    finally:
        watcher.logout()
        appender.logout()
    return floors


# --- report -----------------------------------------------------------------------------------


def row(label: str, values: tuple[float, ...], width: int = 34) -> str:
    return f"{label:<{width}}" + "".join(f"{v:>9.1f}" for v in values)


def report(
    args: argparse.Namespace,
    totals: list[float],
    breakdowns: list[dict[str, float]],
    noop_wakes: int,
    floors: list[float],
) -> None:
    head = f"{'':<34}{'median':>9}{'p95':>9}{'max':>9}{'min':>9}"
    print()
    print(f"Latency, APPEND OK -> sendMessage at the Bot API (ms; {args.mails} mails each)")
    print(head)
    print(row("bridge total", summary(totals)))
    if floors:
        print(row("Dovecot floor (plain IDLE session)", summary(floors)))
        share = (statistics.median(totals) - statistics.median(floors)) * 1000
        print(f"{'bridge share = median difference':<34}{share:>9.1f}")
    if breakdowns:
        print()
        print(f"Bridge breakdown ({len(breakdowns)} of {len(totals)} mails; ms)")
        print(f"{'stage':<34}{'median':>9}{'p95':>9}{'max':>9}")
        for label, _ in STAGES:
            print(row(label, summary([b[label] for b in breakdowns])[:3]))
        after_wake = [sum(v for k, v in b.items() if k != STAGES[0][0]) for b in breakdowns]
        print(row("bridge after its own wake-up", summary(after_wake)[:3]))
        if noop_wakes:
            print(f"({noop_wakes} mail(s) were seen by the NOOP before IDLE, not by IDLE)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mails", type=int, default=40, help="measured mails per phase (40)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured first mails (3)")
    parser.add_argument("--gap-min", type=float, default=0.1, help="min pause, s (0.1)")
    parser.add_argument("--gap-max", type=float, default=0.3, help="max pause, s (0.3)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for the pauses")
    parser.add_argument(
        "--chat-interval", type=float, default=0.0, help="telegram.chat_interval, s (0)"
    )
    parser.add_argument("--skip-floor", action="store_true", help="skip Dovecot's floor phase")
    parser.add_argument("--log-level", default="WARNING", help="bridge log level (WARNING)")
    args = parser.parse_args(argv)
    if args.mails < 1 or args.warmup < 0 or not 0 <= args.gap_min <= args.gap_max:
        parser.error("need --mails >= 1, --warmup >= 0 and 0 <= --gap-min <= --gap-max")
    return args


async def main(args: argparse.Namespace) -> None:
    random.seed(args.seed)
    missing = instrument()
    if missing:
        print(f"breakdown unavailable: {', '.join(missing)} not found", file=sys.stderr)
    ca = CA()
    dovecot = DovecotServer(ca)
    workdir = Path(tempfile.mkdtemp(prefix="mailbridge-bench."))
    try:
        dovecot.start()
        print(f"Dovecot {'.'.join(map(str, dovecot.version))} on {dovecot.host}:{dovecot.port}")
        started = time.monotonic()
        totals, breakdowns, noop_wakes = await bridge_phase(args, dovecot, ca, workdir)
        print(f"bridge phase: {time.monotonic() - started:.1f} s")
        floors: list[float] = []
        if not args.skip_floor:
            started = time.monotonic()
            floors = await asyncio.to_thread(floor_phase, args, dovecot)
            print(f"floor phase: {time.monotonic() - started:.1f} s")
        report(args, totals, breakdowns, noop_wakes, floors)
    finally:
        dovecot.cleanup()
        ca.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    arguments = parse_args()
    logging.basicConfig(level=arguments.log_level.upper(), format="%(levelname)s %(message)s")
    asyncio.run(main(arguments))
