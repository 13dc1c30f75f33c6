"""A burst into one chat: 40 mails at 2 a second, into a private chat and then into a group.

Run from the repository root:  .venv/bin/python bench/delivery.py [--mails 40 --rate 2]

Each phase runs `bridge.app.run` in this process (IDLE on, one account, INBOX) against a
private Dovecot and the fake Bot API, which answers 429 after 20 messages a minute to a group
as Telegram does. The chat pacing is the product's default (telegram.chat_interval and
telegram.group_interval as bridge/config.py sets them), not the tests' chat_interval 0.

Mails are delivered with IMAP APPEND over a connection that is already logged in, paced by the
clock: mail i is appended at start + i / rate, however long the earlier APPENDs took. For each
mail the delay is the time from reading APPEND's tagged OK to the arrival at the fake Bot API
(`Call.time`) of the first accepted sendMessage that carries its subject: its own summary or a
numbered line of a combined "N new mails" message. Dovecot tells IDLE sessions about a new mail
0.5 s after it (see latency.py), so every delay includes that floor.

Printed per phase: p50 / p95 / max delay (s), messages used, 429 answers (flood_refusals), the
most messages in any 60 s, and the most mails one message carried.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imapclient import IMAPClient  # noqa: E402

from bridge.config import TelegramSettings  # noqa: E402
from tests.integration.conftest import OWNER, make_settings, running  # noqa: E402
from tests.servers.botapi import FakeBotApi  # noqa: E402
from tests.servers.certs import CA  # noqa: E402
from tests.servers.dovecot import DovecotServer, MailUser  # noqa: E402

GROUP = -1001234567890  # a supergroup id: the fake answers 429 after 20 sends a minute
CHAT_INTERVAL = TelegramSettings.model_fields["chat_interval"].default
GROUP_INTERVAL = TelegramSettings.model_fields["group_interval"].default


@dataclass
class Phase:
    """What one burst into one chat gave."""

    name: str
    chat_id: int
    delays: list[float]  # seconds, one per mail carried by subject
    missing: int  # mails never carried by subject (a combined message lists the newest 10)
    messages: int
    refusals: int
    busiest_minute: int
    most_per_message: int
    append_spread: float  # how late the last APPEND's OK came after its planned moment


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


def timed_append(client: IMAPClient, raw: bytes) -> float:
    """APPEND to INBOX; the monotonic time at which the server's tagged OK was read."""
    client.append("INBOX", raw)
    return time.monotonic()


def p95(values: list[float]) -> float:
    """95th percentile, linear interpolation between the closest ranks."""
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


async def burst(
    args: argparse.Namespace, name: str, chat_id: int, dovecot: DovecotServer, ca: CA
) -> Phase:
    """Run the bridge for one chat, deliver the burst, wait until every mail was carried."""
    user = MailUser(f"burst{secrets.token_hex(3)}", secrets.token_urlsafe(12))
    dovecot.add_user(user.name, user.password)
    workdir = Path(tempfile.mkdtemp(prefix="mailbridge-bench."))
    tag = secrets.token_hex(3)
    subjects = [f"Burst {tag} mail {i:03d}" for i in range(args.mails)]
    appended: list[float] = []
    try:
        async with FakeBotApi() as botapi:
            settings = make_settings(
                workdir,
                dovecot=dovecot,
                user=user,
                botapi=botapi,
                ca_file=ca.ca_file,
                telegram={
                    "notify_chat_ids": [chat_id],
                    "chat_interval": CHAT_INTERVAL,
                    "group_interval": GROUP_INTERVAL,
                },
            )
            appender = dovecot.connect(user.name, user.password)
            try:
                async with running(settings) as bridge:
                    await bridge.ready()
                    before = len(botapi.calls("sendMessage"))
                    start = time.monotonic() + 0.2
                    late = 0.0
                    for i, subject in enumerate(subjects):
                        planned = start + i / args.rate
                        await asyncio.sleep(max(0.0, planned - time.monotonic()))
                        raw = make_mail(subject)
                        appended.append(await asyncio.to_thread(timed_append, appender, raw))
                        late = max(late, appended[-1] - planned)
                    carried = await wait_carried(botapi, chat_id, subjects, before, args.timeout)
            finally:
                appender.logout()
            sends = [
                c
                for c in botapi.calls("sendMessage", ok_only=True)[before:]
                if int(c.params["chat_id"]) == chat_id
            ]
            delays = [
                carried[s] - t for s, t in zip(subjects, appended, strict=True) if s in carried
            ]
            per_message = [sum(s in str(c.params.get("text")) for s in subjects) for c in sends]
            return Phase(
                name=name,
                chat_id=chat_id,
                delays=delays,
                missing=len(subjects) - len(carried),
                messages=len(sends),
                refusals=botapi.flood_refusals(chat_id),
                busiest_minute=botapi.max_sends_in_window(chat_id, 60.0),
                most_per_message=max(per_message, default=0),
                append_spread=late,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def wait_carried(
    botapi: FakeBotApi, chat_id: int, subjects: list[str], before: int, give_up: float
) -> dict[str, float]:
    """Subject -> arrival time of the first accepted sendMessage carrying it.

    Returns when every subject was carried, or when no message came for 70 s (a group may
    wait up to a minute) with some never carried (a combined message lists only its newest
    mails), or after give_up seconds.
    """
    carried: dict[str, float] = {}
    seen = before
    deadline = time.monotonic() + give_up
    last_new = time.monotonic()
    while len(carried) < len(subjects) and time.monotonic() < deadline:
        calls = botapi.calls("sendMessage")
        for call in calls[seen:]:
            if not call.ok or int(call.params["chat_id"]) != chat_id:
                continue
            text = str(call.params.get("text"))
            for subject in subjects:
                if subject not in carried and subject in text:
                    carried[subject] = call.time
        if len(calls) > seen:
            last_new = time.monotonic()
        seen = len(calls)
        if time.monotonic() - last_new > 70:
            break
        await asyncio.sleep(0.05)
    return carried


def report(args: argparse.Namespace, phases: list[Phase]) -> None:
    print()
    print(
        f"{args.mails} mails at {args.rate:g}/s into one chat; delay = APPEND OK -> first "
        f"accepted message carrying the mail (s)"
    )
    print(f"chat_interval {CHAT_INTERVAL:g} s, group_interval {GROUP_INTERVAL:g} s (defaults)")
    print(
        f"{'chat':<8} | {'p50':>5} | {'p95':>5} | {'max':>5} | {'min':>5} | {'messages':>8} | "
        f"{'429s':>4} | {'max/60 s':>8} | {'most/msg':>8} | {'not shown':>9}"
    )
    for phase in phases:
        d = phase.delays
        print(
            f"{phase.name:<8} | {statistics.median(d):>5.2f} | {p95(d):>5.2f} | "
            f"{max(d):>5.2f} | {min(d):>5.2f} | {phase.messages:>8} | {phase.refusals:>4} | "
            f"{phase.busiest_minute:>8} | {phase.most_per_message:>8} | {phase.missing:>9}"
        )
    worst = max(phase.append_spread for phase in phases)
    print(f"(the latest APPEND OK came {worst * 1000:.0f} ms after its planned moment)")
    verdicts = [
        f"{phase.name}: p95 {p95(phase.delays):.2f} s "
        f"{'<=' if p95(phase.delays) <= 3.0 else '>'} 3 s, {phase.refusals} x 429"
        for phase in phases
    ]
    print("target p95 <= 3 s with no 429: " + "; ".join(verdicts))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mails", type=int, default=40, help="mails per chat (40)")
    parser.add_argument("--rate", type=float, default=2.0, help="mails a second (2)")
    parser.add_argument(
        "--timeout", type=float, default=180.0, help="give up on a phase after, s (180)"
    )
    parser.add_argument(
        "--only", choices=("private", "group"), default=None, help="run one phase only"
    )
    parser.add_argument("--log-level", default="WARNING", help="bridge log level (WARNING)")
    args = parser.parse_args(argv)
    if args.mails < 2 or args.rate <= 0:
        parser.error("need --mails >= 2 and --rate > 0")
    return args


async def main(args: argparse.Namespace) -> None:
    ca = CA()
    dovecot = DovecotServer(ca)
    phases: list[Phase] = []
    try:
        dovecot.start()
        print(f"Dovecot {'.'.join(map(str, dovecot.version))} on {dovecot.host}:{dovecot.port}")
        for name, chat_id in (("private", OWNER), ("group", GROUP)):
            if args.only not in (None, name):
                continue
            started = time.monotonic()
            phases.append(await burst(args, name, chat_id, dovecot, ca))
            print(f"{name} phase: {time.monotonic() - started:.1f} s")
        report(args, phases)
    finally:
        dovecot.cleanup()
        ca.cleanup()


if __name__ == "__main__":
    arguments = parse_args()
    logging.basicConfig(level=arguments.log_level.upper(), format="%(levelname)s %(message)s")
    asyncio.run(main(arguments))
