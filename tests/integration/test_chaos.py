"""Crash tests: the real `python -m bridge run` killed (SIGKILL) and stopped (SIGTERM) mid-work.

The promise under test: nothing is lost. A mail delivered to the mailbox is posted to the chat
and a `/send` reaches the SMTP server (or the chat is told it failed), however often the process
dies. What a crash may cost is a duplicate: a message Telegram accepted just before the kill,
before the database recorded it, is posted again (with every mail it carried: the mails waiting
for a chat go out combined); likewise a mail the SMTP server accepted just before the kill. At
most one message per kill, and in practice far fewer.

Mails are counted as the chat received them (a summary, or a line of a combined message), not
as messages.

`CHAOS_SEED` replays a run (the seed is printed); `CHAOS_ROUNDS` sets the number of kills.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import signal
import sqlite3
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration.chat import carried, mail, visible, wait_until
from tests.integration.conftest import OWNER
from tests.servers.botapi import MAX_TEXT, BotApiError, Call, html_to_text

ROUNDS = int(os.environ.get("CHAOS_ROUNDS", "30"))
SEED_VARIABLE = "CHAOS_SEED"
RECIPIENT = "ann@example.org"
EXIT_BOUND = 20.0  # seconds a SIGTERM'd bridge may take to exit
KILL_BOUND = 10.0  # seconds a SIGKILL'd process may take to be reaped
SETTLE_BOUND = 30.0  # seconds the last, unkilled run may take to catch up, plus pacing
# `python -m bridge run` needs about 1.7 s (2 CPUs) just to import PTB, SQLAlchemy, Alembic and
# pydantic, and about 2 s to its first getUpdates (the report prints the measured figure).
BOOT = 1.8


def report(text: str) -> None:
    """Write a line of the report (stdout; shown with -s, or by pytest on failure)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# The bridge as a subprocess


def bridge_env(
    tmp_path: Path, *, dovecot: Any, user: Any, ca: Any, botapi: Any, smtpd: Any, **extra: str
) -> dict[str, str]:
    """The process environment: ours minus any BRIDGE_*, plus settings for the test servers."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BRIDGE_")}
    env.update(
        {
            "BRIDGE_TELEGRAM__TOKEN": botapi.token,
            "BRIDGE_TELEGRAM__API_URL": botapi.url,
            "BRIDGE_TELEGRAM__ALLOWED_USER_IDS": f"[{OWNER}]",
            # Dozens of /send in a minute are the point here, not the per-hour limit.
            "BRIDGE_TELEGRAM__SEND_RATE_LIMIT": "100000",
            # Every mail fetched and summarised in full, even when many piled up over rounds
            # killed before their first check (a backlog is otherwise read from headers only).
            "BRIDGE_TELEGRAM__DIGEST_THRESHOLD": "100000",
            "BRIDGE_IMAP__HOST": "127.0.0.1",
            "BRIDGE_IMAP__PORT": str(dovecot.port),
            "BRIDGE_IMAP__USERNAME": user.name,
            "BRIDGE_IMAP__PASSWORD": user.password,
            "BRIDGE_IMAP__CA_FILE": str(ca.ca_file),
            "BRIDGE_IMAP__IDLE": "true",
            # A mail delivered before the very first start completed its first check must not
            # count as "already seen": the mailbox is fresh, so backfill all of it.
            "BRIDGE_IMAP__BACKFILL": "100000",
            "BRIDGE_SMTP__HOST": "127.0.0.1",
            "BRIDGE_SMTP__PORT": str(smtpd.port),
            "BRIDGE_SMTP__USERNAME": smtpd.username,
            "BRIDGE_SMTP__PASSWORD": smtpd.password,
            "BRIDGE_SMTP__SECURITY": smtpd.tls,
            "BRIDGE_SMTP__CA_FILE": str(ca.ca_file),
            "BRIDGE_DATABASE_URL": f"sqlite:///{tmp_path / 'bridge.db'}",
            "BRIDGE_LOG_LEVEL": "INFO",
        }
    )
    env.update(extra)
    return env


@dataclass
class Bridge:
    """One `python -m bridge run` process; its stderr is collected line by line."""

    number: int
    proc: asyncio.subprocess.Process
    started: float
    lines: list[str] = field(default_factory=list)
    ended: float | None = None
    killed: bool = False
    _reader: asyncio.Task[None] | None = None

    def save_log(self, directory: Path) -> None:
        """Keep the stderr as run-NN.log in the test's directory (pytest keeps the last ones)."""
        (directory / f"run-{self.number:02d}.log").write_text(self.stderr, encoding="utf-8")

    @classmethod
    async def start(cls, number: int, env: dict[str, str], cwd: Path) -> Bridge:
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge",
            "run",
            env=env,
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        bridge = cls(number, proc, started)
        bridge._reader = asyncio.create_task(bridge._read())
        return bridge

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace"))

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def tail(self, n: int = 40) -> str:
        return "".join(self.lines[-n:])

    def assert_running(self) -> None:
        assert self.proc.returncode is None, (
            f"run {self.number} exited by itself with {self.proc.returncode}:\n{self.tail()}"
        )

    async def kill(self) -> None:
        """SIGKILL (it must still be running) and reap it (bounded)."""
        self.assert_running()
        self.proc.kill()
        self.killed = True
        await self._reaped(KILL_BOUND)

    async def terminate(self, bound: float = EXIT_BOUND) -> int:
        """SIGTERM and wait (bounded) for the exit status."""
        self.assert_running()
        self.proc.send_signal(signal.SIGTERM)
        return await self._reaped(bound)

    async def _reaped(self, bound: float) -> int:
        try:
            code = await asyncio.wait_for(self.proc.wait(), bound)
        except TimeoutError:
            raise AssertionError(
                f"run {self.number} did not exit within {bound} s:\n{self.tail()}"
            ) from None
        self.ended = time.monotonic()
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)
        return code

    async def cleanup(self) -> None:
        """Kill it if a failing test left it running."""
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()


@contextlib.asynccontextmanager
async def bridges(directory: Path) -> AsyncIterator[list[Bridge]]:
    """Collects every process a test starts; none outlives the test; their logs are kept."""
    started: list[Bridge] = []
    try:
        yield started
    finally:
        for bridge in started:
            await bridge.cleanup()
            bridge.save_log(directory)


# Mail, chat and outbox helpers


async def deliver(dovecot: Any, user: Any, subject: str) -> int:
    """APPEND a mail (in a thread: the fake Bot API shares this loop); returns its UID."""
    raw = mail(
        subject,
        "A mail delivered while the bridge was being killed.",  # does not repeat the subject
        "Chaos Monkey <monkey@example.org>",
    )
    return await asyncio.to_thread(dovecot.append, user.name, user.password, raw)


def queue_send(botapi: Any, subject: str) -> int:
    """The allowed user types a one-shot /send; returns the chat message id."""
    return int(
        botapi.send_user_message(OWNER, OWNER, f"/send {RECIPIENT} {subject}\nSent from the chat.")
    )


def chat_calls(botapi: Any) -> list[Call]:
    """Successful sendMessage calls to the owner's chat."""
    return [
        call
        for call in botapi.calls("sendMessage", ok_only=True)
        if int(call.params.get("chat_id", 0)) == OWNER
    ]


@dataclass(frozen=True)
class Post:
    """A message to the owner that carried mail, with the subjects of every mail it carried."""

    call: Call
    subjects: frozenset[str]


def mail_posts(botapi: Any, uids: dict[str, int]) -> list[Post]:
    """Every accepted message to the owner that carried mail, oldest first.

    A combined message names only its newest mails and counts the rest. A chat's mail goes
    out oldest first, each message carrying the run of the folder's mails that waited, so the
    ones it does not name are the mails just before the newest it names: `uids` (subject ->
    UID of every mail in the folder) tells which.
    """
    ordered = sorted(uids, key=uids.__getitem__)
    posts = []
    for call in chat_calls(botapi):
        count, named = carried(visible(call))
        if count == 0:
            continue  # an answer or an outbox report
        subjects = set(named)
        if count > len(named) and named and named[-1] in uids:
            end = ordered.index(named[-1]) + 1
            subjects.update(ordered[max(0, end - count) : end])
        posts.append(Post(call, frozenset(subjects)))
    return posts


def posted_subjects(posts: Iterable[Post]) -> Counter[str]:
    """How many messages carried each mail."""
    return Counter(subject for post in posts for subject in post.subjects)


def reposted(posts: list[Post]) -> list[Post]:
    """The messages whose mail (some of it or all) was posted again by a later message."""
    later: Counter[str] = posted_subjects(posts)
    repeated = []
    for post in posts:
        later.subtract(post.subjects)
        if any(later[subject] > 0 for subject in post.subjects):
            repeated.append(post)
    return repeated


def unexplained(repeated: list[Post], posts: list[Post], runs: list[Bridge]) -> list[Post]:
    """The messages posted again that a kill does not explain: only a killed run's last
    message may have been accepted by Telegram and not recorded."""
    last = {run_of(post.call.time, runs): post for post in posts}  # each run's last message
    return [
        post
        for post in repeated
        if not (runs[run := run_of(post.call.time, runs)].killed and last[run] is post)
    ]


def mailed_subjects(smtpd: Any) -> Counter[str]:
    """How many times the SMTP server accepted a mail with each subject."""
    return Counter(str(received.message()["Subject"]) for received in smtpd.received)


def too_long(botapi: Any) -> list[int]:
    """Visible lengths of every sendMessage text over Telegram's 4,096 characters."""
    lengths = []
    for call in botapi.calls("sendMessage"):
        text = str(call.params.get("text", ""))
        try:
            visible = html_to_text(text) if call.params.get("parse_mode") == "HTML" else text
        except BotApiError:
            visible = text
        if len(visible) > MAX_TEXT:
            lengths.append(len(visible))
    return lengths


def seen_uids(dovecot: Any, user: Any, uids: list[int]) -> list[int]:
    """The UIDs among `uids` that carry \\Seen (read after EXAMINE: changes nothing)."""
    if not uids:
        return []
    client = dovecot.connect(user.name, user.password)
    try:
        client.select_folder("INBOX", readonly=True)
        data = client.fetch(uids, ["FLAGS"])
    finally:
        client.logout()
    return [uid for uid in uids if b"\\Seen" in data[uid][b"FLAGS"]]


def outbox_rows(database: Path) -> list[tuple[str, str, int | None, int]]:
    """(subject, status, source_message_id, attempts) of every outbox item."""
    if not database.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(outbox_item)")}
        if not columns:
            return []  # not migrated yet
        source = "source_message_id" if "source_message_id" in columns else "NULL"
        return list(
            db.execute(f"SELECT subject, status, {source}, attempts FROM outbox_item ORDER BY id")  # noqa: S608
        )


_DELIVERED = (
    "SELECT posted_mail.uid FROM delivery JOIN posted_mail ON posted_mail.id = "
    "delivery.posted_mail_id WHERE delivery.status = 'sent' ORDER BY posted_mail.uid"
)


def mailbox_state(database: Path) -> str:
    """The watcher's high-water mark, the UIDs it recorded and those recorded as delivered."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        marks = list(db.execute("SELECT name, uidvalidity, last_uid FROM mailbox"))
        uids = [uid for (uid,) in db.execute("SELECT uid FROM posted_mail ORDER BY uid")]
        sent = [uid for (uid,) in db.execute(_DELIVERED)]
    return (
        f"mailbox (name, uidvalidity, last_uid) {marks}, recorded for delivery {uids}, "
        f"recorded as delivered {sent}"
    )


def _uids(database: Path, query: str) -> list[int]:
    if not database.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        try:
            return [uid for (uid,) in db.execute(query)]
        except sqlite3.OperationalError:
            return []  # not migrated yet


def recorded_uids(database: Path) -> list[int]:
    """UIDs the watcher recorded for delivery (with its cursor)."""
    return _uids(database, "SELECT uid FROM posted_mail ORDER BY uid")


def delivered_uids(database: Path) -> list[int]:
    """UIDs recorded as delivered: Telegram accepted the message carrying them."""
    return _uids(database, _DELIVERED)


async def sleep_until(moment: float) -> None:
    """Sleep until a monotonic moment (the chaos schedule, not a synchronisation)."""
    delay = moment - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def run_of(moment: float, runs: list[Bridge]) -> int:
    """The number of the run a call at `moment` came from."""
    owner = runs[0].number
    for bridge in runs:
        if bridge.started <= moment:
            owner = bridge.number
    return owner


def first_call_after(botapi: Any, method: str, since: float, until: float | None) -> float | None:
    """Seconds from `since` to the first call of `method` before `until`, if any."""
    for call in botapi.calls(method):
        if call.time >= since and (until is None or call.time <= until):
            return call.time - since
    return None


def spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    return (
        f"median {statistics.median(values):.2f} s "
        f"(min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"
    )


# 1. SIGKILL in a loop


@pytest.mark.timeout(max(120, 6 * ROUNDS + 120))
async def test_sigkill_loop_loses_nothing(tmp_path, dovecot, mail_user, ca, botapi, smtpd):
    seed = int(os.environ.get(SEED_VARIABLE) or secrets.randbelow(1_000_000))
    report(f"\nchaos: seed={seed} rounds={ROUNDS} (replay: {SEED_VARIABLE}={seed})")
    rng = random.Random(seed)
    env = bridge_env(tmp_path, dovecot=dovecot, user=mail_user, ca=ca, botapi=botapi, smtpd=smtpd)
    delivered: dict[str, int] = {}  # subject -> UID
    queued: list[str] = []
    began = time.monotonic()

    async with bridges(tmp_path) as runs:
        for round_no in range(ROUNDS):
            n_mails, n_sends = rng.randint(0, 3), rng.randint(0, 2)
            # A quarter of the kills fall anywhere in the first 2.5 s (imports, migrations,
            # getMe, first IMAP login); the rest 0.05-2.5 s after the start-up (IDLE, posting,
            # handling /send, SMTP).
            kill_after = rng.uniform(0.05, 2.5) + (BOOT if rng.random() < 0.75 else 0.0)
            actions = sorted(
                [
                    (rng.uniform(0, kill_after), f"chaos-r{round_no:02d}-m{i}")
                    for i in range(n_mails)
                ]
                + [
                    (rng.uniform(0, kill_after), f"send-r{round_no:02d}-s{i}")
                    for i in range(n_sends)
                ]
            )
            bridge = await Bridge.start(round_no, env, tmp_path)
            runs.append(bridge)
            for at, subject in actions:
                await sleep_until(bridge.started + at)
                if subject.startswith("chaos-"):
                    delivered[subject] = await deliver(dovecot, mail_user, subject)
                else:
                    queue_send(botapi, subject)
                    queued.append(subject)
            await sleep_until(bridge.started + kill_after)
            await bridge.kill()

        # The last run is not killed: it must catch up with everything.
        final = await Bridge.start(ROUNDS, env, tmp_path)
        runs.append(final)
        database = tmp_path / "bridge.db"

        def settled() -> bool:
            posted = posted_subjects(mail_posts(botapi, delivered))
            mailed = mailed_subjects(smtpd)
            failed = {s for s, status, *_ in outbox_rows(database) if status == "failed"}
            return all(posted[s] for s in delivered) and all(
                mailed[s] or s in failed for s in queued
            )

        def missing() -> str:
            posted = posted_subjects(mail_posts(botapi, delivered))
            mailed = mailed_subjects(smtpd)
            unposted = sorted(s for s in delivered if not posted[s])
            unmailed = sorted(s for s in queued if not mailed[s])
            return (
                f"not posted {[(s, delivered[s]) for s in unposted]} (subject, UID); "
                f"not mailed {unmailed}; {mailbox_state(database)}; outbox items of those: "
                f"{[row for row in outbox_rows(database) if row[0] in unmailed]}; "
                f"updates not confirmed: {botapi.pending_updates}; "
                f"last run's log:\n{final.tail()}"
            )

        # Messages are paced at BRIDGE_TELEGRAM__CHAT_INTERVAL (1 s) per chat, and what waits
        # goes out combined: the backlog of mails not yet posted by the killed runs sets the
        # bound.
        await wait_until(settled, SETTLE_BOUND + 1.5 * len(delivered), missing)
        # Barrier: a mail and a /send after everything else. Mail reaches the chat in UID order
        # and PTB handles updates in order, so once both arrive, every re-delivered update and
        # every re-posted message (the duplicates we count) has arrived too.
        delivered["chaos-barrier"] = await deliver(dovecot, mail_user, "chaos-barrier")
        queue_send(botapi, "send-barrier")
        queued.append("send-barrier")
        await wait_until(settled, 30, missing)
        final.assert_running()
        code = await final.terminate()
        elapsed = time.monotonic() - began

    # What the user saw
    posts = mail_posts(botapi, delivered)
    posted, mailed = posted_subjects(posts), mailed_subjects(smtpd)
    rows = outbox_rows(database)
    failed = {subject for subject, status, *_ in rows if status == "failed"}
    lost_mails = sorted(s for s in delivered if not posted[s])
    doubled_mails = {s: posted[s] for s in delivered if posted[s] > 1}
    repeated = reposted(posts)
    lost_sends = sorted(s for s in queued if not mailed[s] and s not in failed)
    doubled_sends = {s: mailed[s] for s in queued if mailed[s] > 1}
    items_per_subject = Counter(subject for subject, *_ in rows)
    seen = await asyncio.to_thread(seen_uids, dovecot, mail_user, sorted(delivered.values()))
    oversized = too_long(botapi)

    # Where the kills fell, and how long a start takes
    killed = [bridge for bridge in runs if bridge.killed]
    ready_after = [
        first_call_after(botapi, "getUpdates", bridge.started, bridge.ended) for bridge in runs
    ]
    kills_after_ready = sum(
        1 for bridge, t in zip(runs, ready_after, strict=True) if bridge.killed and t is not None
    )
    posting_kills = 0
    for bridge in killed:
        assert bridge.ended is not None
        ended = bridge.ended
        posting_kills += any(ended - 0.5 <= post.call.time <= ended for post in posts)
    first_summary = None
    summaries = [post.call for post in posts if post.call.time >= final.started]
    if summaries:
        first_summary = summaries[0].time - final.started

    def where(post: Post) -> str:
        """Which run sent it, what it carried, and how long after it that run was killed."""
        bridge = runs[run_of(post.call.time, runs)]
        after = (
            f", killed {bridge.ended - post.call.time:.3f} s after the request"
            if bridge.killed and bridge.ended is not None
            else ""
        )
        return f"run {bridge.number}{after}: {sorted(post.subjects)}"

    report(
        f"chaos: {len(killed)} kills ({len(killed) - kills_after_ready} before the bot "
        f"was polling, {kills_after_ready} after; {posting_kills} within 0.5 s of posting "
        "a summary)"
    )
    report(
        "chaos: start-up to first getUpdates "
        + spread([t for t in ready_after if t is not None])
        + (f"; last run to first summary {first_summary:.2f} s" if first_summary else "")
    )
    report(
        f"chaos: mails delivered {len(delivered)}, "
        f"posted {sum(1 for s in delivered if posted[s])} in {len(posts)} messages, "
        f"lost {len(lost_mails)}, doubled {len(doubled_mails)} "
        f"(by {len(repeated)} messages posted again)"
        + "".join(f"\n  posted again: {where(post)}" for post in repeated)
    )
    report(
        f"chaos: sends queued {len(queued)}, mailed {sum(1 for s in queued if mailed[s])}, "
        f"failed {len(failed)}, lost {len(lost_sends)}, doubled {len(doubled_sends)}"
        + "".join(
            f"\n  doubled: {s} mailed x{n}, outbox items {items_per_subject[s]} "
            + (
                "(re-delivered update stored twice)"
                if items_per_subject[s] > 1
                else "(one item sent twice: killed between SMTP acceptance and marking it sent)"
            )
            for s, n in sorted(doubled_sends.items())
        )
    )
    stored_twice = sorted(s for s, n in items_per_subject.items() if n > 1)
    if stored_twice:
        report(f"chaos: outbox items stored more than once: {stored_twice}")
    report(f"chaos: final SIGTERM exit {code}; run time {elapsed:.1f} s")

    assert code == 0, final.tail()
    assert "Traceback" not in final.stderr, final.stderr
    assert lost_mails == [], lost_mails
    assert lost_sends == [], lost_sends
    # A mail is posted again only when its run was killed right after Telegram accepted the
    # message carrying it: that run's last message, at most one per kill.
    assert unexplained(repeated, posts, runs) == [], [where(p) for p in repeated]
    assert len(repeated) <= max(1, ROUNDS // 3), [where(post) for post in repeated]
    assert len(doubled_sends) <= max(1, ROUNDS // 3), doubled_sends
    assert sum(n - 1 for n in doubled_sends.values()) <= len(killed)
    assert oversized == [], oversized
    assert seen == [], f"\\Seen set on UIDs {seen}"


# 2. SIGTERM in the middle of work


class SlowProxy:
    """A TCP relay to the SMTP server that holds every server reply back: a slow SMTP server.

    It relays the TLS bytes untouched, so the bridge still verifies the server's certificate.
    """

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port = target_port
        self.delay = delay
        self.port = 0
        self.connected = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> SlowProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            self.connected.set()
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                writer.close()
                return
            await asyncio.gather(
                self._pipe(reader, up_writer, 0.0),
                self._pipe(up_reader, writer, self.delay),
                return_exceptions=True,
            )
        finally:
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
    ) -> None:
        try:
            while data := await reader.read(65536):
                if delay:
                    await asyncio.sleep(delay)  # the slowness being simulated
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


async def texts_containing(botapi: Any, needle: str, bound: float = 20.0) -> str:
    """Wait (bounded) for the bot's next message to the owner containing `needle`."""
    async with asyncio.timeout(bound):
        while True:
            call = await botapi.next_call("sendMessage", timeout=bound, ok_only=True)
            text = str(call.params.get("text", ""))
            if int(call.params.get("chat_id", 0)) == OWNER and needle in text:
                return text


@pytest.mark.timeout(180)
async def test_sigterm_during_work_exits_zero_and_finishes_or_leaves_item(
    tmp_path, dovecot, mail_user, ca, botapi, smtpd
):
    env = bridge_env(tmp_path, dovecot=dovecot, user=mail_user, ca=ca, botapi=botapi, smtpd=smtpd)
    database = tmp_path / "bridge.db"

    def status_of(subject: str) -> list[str]:
        return [status for s, status, *_ in outbox_rows(database) if s == subject]

    async def barrier(bridge: Bridge, subject: str) -> None:
        """A /send after the others: PTB handles updates in order and the outbox sends due
        items in order, so once it is mailed a re-delivered /send would have been too."""
        queue_send(botapi, subject)
        await wait_until(
            lambda: mailed_subjects(smtpd)[subject] >= 1,
            30,
            lambda: f"{subject} not mailed:\n{bridge.tail()}",
        )

    async with bridges(tmp_path) as runs, SlowProxy(smtpd.port, delay=0.4) as proxy:
        # a) SMTP down: the first attempt fails, the item waits for its retry; SIGTERM now.
        smtpd.stop()
        bridge = await Bridge.start(0, env, tmp_path)
        runs.append(bridge)
        queue_send(botapi, "term-pending")
        await texts_containing(botapi, "Not sent yet")
        t0 = time.monotonic()
        code = await bridge.terminate()
        pending_exit = time.monotonic() - t0
        assert code == 0, bridge.tail()
        assert status_of("term-pending") == ["pending"]

        smtpd.start()
        bridge = await Bridge.start(1, env, tmp_path)
        runs.append(bridge)
        await wait_until(
            lambda: mailed_subjects(smtpd)["term-pending"] >= 1,
            30,
            lambda: f"term-pending not mailed after the restart:\n{bridge.tail()}",
        )
        await barrier(bridge, "term-barrier-a")
        assert await bridge.terminate() == 0, bridge.tail()

        # b) SMTP slow (every reply held back 0.4 s): SIGTERM while the item is in flight.
        slow_env = {**env, "BRIDGE_SMTP__PORT": str(proxy.port)}
        bridge = await Bridge.start(2, slow_env, tmp_path)
        runs.append(bridge)
        queue_send(botapi, "term-in-flight")
        await asyncio.wait_for(proxy.connected.wait(), 20)
        t0 = time.monotonic()
        code = await bridge.terminate()
        flight_exit = time.monotonic() - t0
        assert code == 0, bridge.tail()
        at_exit = (mailed_subjects(smtpd)["term-in-flight"], status_of("term-in-flight"))
        assert at_exit in ((1, ["sent"]), (0, ["pending"])), at_exit

        bridge = await Bridge.start(3, env, tmp_path)
        runs.append(bridge)
        await barrier(bridge, "term-barrier-b")
        assert await bridge.terminate() == 0, bridge.tail()

    mailed = mailed_subjects(smtpd)
    report(
        f"\nsigterm/outbox: pending item: exit 0 after {pending_exit:.2f} s, mailed "
        f"x{mailed['term-pending']} after the restart; in-flight item: exit 0 after "
        f"{flight_exit:.2f} s, "
        + ("finished before exiting" if at_exit[0] else "left pending, sent after the restart")
        + f", mailed x{mailed['term-in-flight']} in total"
    )
    assert mailed["term-pending"] == 1
    assert mailed["term-in-flight"] == 1
    for bridge in runs:
        assert "Traceback" not in bridge.stderr, bridge.stderr


@pytest.mark.timeout(120)
async def test_sigterm_while_posting_exits_zero_and_posts_the_rest(
    tmp_path, dovecot, mail_user, ca, botapi, smtpd
):
    """SIGTERM while mail is on its way to the chat (recorded and waiting for the chat's next
    slot, or being sent to a slow Telegram): exit 0, and after a restart every mail has
    reached the chat exactly once (a clean stop never posts a mail twice)."""
    env = bridge_env(tmp_path, dovecot=dovecot, user=mail_user, ca=ca, botapi=botapi, smtpd=smtpd)
    database = tmp_path / "bridge.db"
    subjects = [f"term-post-{n}" for n in range(1, 6)]
    uids = {subjects[0]: await deliver(dovecot, mail_user, subjects[0])}
    botapi.delay("sendMessage", 0.3, count=10)  # a slow Telegram

    def posted() -> Counter[str]:
        return posted_subjects(mail_posts(botapi, uids))

    async with bridges(tmp_path) as runs:
        bridge = await Bridge.start(0, env, tmp_path)
        runs.append(bridge)
        await wait_until(
            lambda: posted()[subjects[0]] >= 1,
            30,
            lambda: f"nothing posted:\n{bridge.tail()}",
            interval=0.02,
        )
        first_summary = mail_posts(botapi, uids)[0].call.time - bridge.started
        # The rest arrive while the chat waits out the second after that message
        # (BRIDGE_TELEGRAM__CHAT_INTERVAL): recorded for delivery, not posted yet.
        for subject in subjects[1:]:
            uids[subject] = await deliver(dovecot, mail_user, subject)
        await wait_until(
            lambda: len(recorded_uids(database)) == len(subjects),
            10,
            lambda: f"not recorded: {mailbox_state(database)}\n{bridge.tail()}",
        )
        code = await bridge.terminate()
        before_restart = posted()
        assert code == 0, bridge.tail()

        bridge = await Bridge.start(1, env, tmp_path)
        runs.append(bridge)
        uids["term-post-barrier"] = await deliver(dovecot, mail_user, "term-post-barrier")
        await wait_until(
            lambda: posted()["term-post-barrier"] >= 1,
            30,
            lambda: f"barrier not posted:\n{bridge.tail()}",
        )
        assert await bridge.terminate() == 0, bridge.tail()

    posts = mail_posts(botapi, uids)
    counts = posted_subjects(posts)
    report(
        f"\nsigterm/posting: first summary {first_summary:.2f} s after start; "
        f"{sum(1 for s in subjects if before_restart[s])} of 5 posted before exit 0; "
        f"in {len(posts)} messages, after the restart "
        + ", ".join(f"{s} x{counts[s]}" for s in subjects)
    )
    assert [counts[s] for s in subjects] == [1] * len(subjects), counts
    for bridge in runs:
        assert "Traceback" not in bridge.stderr, bridge.stderr


# 3. SIGKILL aimed at the windows between two systems


@pytest.mark.timeout(180)
async def test_sigkill_between_acceptance_and_record_costs_at_most_one_duplicate(
    tmp_path, dovecot, mail_user, ca, botapi, smtpd
):
    """Kill right after Telegram accepted a message carrying mail (before the database recorded
    it) and right after the SMTP server accepted a mail (before the outbox marked it sent): the
    restart repeats that one message, and nothing else."""
    env = bridge_env(tmp_path, dovecot=dovecot, user=mail_user, ca=ca, botapi=botapi, smtpd=smtpd)
    subjects = [f"chaos-window-m{n}" for n in range(1, 4)]
    database = tmp_path / "bridge.db"
    uids = {subject: await deliver(dovecot, mail_user, subject) for subject in subjects}
    summary_kills = 2
    async with bridges(tmp_path) as runs:
        for number in range(summary_kills):
            bridge = await Bridge.start(number, env, tmp_path)
            runs.append(bridge)
            before = len(mail_posts(botapi, uids))
            await wait_until(
                lambda before=before: len(mail_posts(botapi, uids)) > before,
                30,
                lambda: f"no summary:\n{runs[-1].tail()}",
                interval=0.001,
            )
            await bridge.kill()  # Telegram has the message; the database may not yet

        bridge = await Bridge.start(summary_kills, env, tmp_path)
        runs.append(bridge)
        # Every mail posted and recorded as delivered first: this run's kill must not hit one.
        await wait_until(
            lambda: len(delivered_uids(database)) == len(subjects),
            30 + 1.5 * len(subjects),
            lambda: f"mails not recorded as delivered:\n{runs[-1].tail()}",
        )
        queue_send(botapi, "send-window-1")
        await wait_until(
            lambda: mailed_subjects(smtpd)["send-window-1"] >= 1,
            30,
            lambda: f"send-window-1 not mailed:\n{runs[-1].tail()}",
            interval=0.001,
        )
        await bridge.kill()  # the SMTP server has the mail; the outbox may not know yet

        bridge = await Bridge.start(summary_kills + 1, env, tmp_path)
        runs.append(bridge)
        uids["chaos-window-barrier"] = await deliver(dovecot, mail_user, "chaos-window-barrier")
        queue_send(botapi, "send-window-barrier")
        await wait_until(
            lambda: (
                posted_subjects(mail_posts(botapi, uids))["chaos-window-barrier"] >= 1
                and mailed_subjects(smtpd)["send-window-barrier"] >= 1
            ),
            30 + 1.5 * len(subjects),
            lambda: f"barrier not through:\n{runs[-1].tail()}",
        )
        assert await bridge.terminate() == 0, bridge.tail()

    posts = mail_posts(botapi, uids)
    posted, mailed = posted_subjects(posts), mailed_subjects(smtpd)
    repeated = reposted(posts)
    report(
        f"\nwindows: {summary_kills} kills right after a message: "
        + ", ".join(f"{s} x{posted[s]}" for s in subjects)
        + f" in {len(posts)} messages; 1 kill right after SMTP accepted: send-window-1 mailed "
        f"x{mailed['send-window-1']}"
    )
    assert all(posted[s] >= 1 for s in subjects), posted
    # Only a killed run's last message may be posted again: at most one message per kill.
    assert unexplained(repeated, posts, runs) == [], [sorted(p.subjects) for p in repeated]
    assert len(repeated) <= summary_kills, [sorted(post.subjects) for post in repeated]
    assert max(posted[s] for s in subjects) <= 1 + summary_kills, posted
    assert posted["chaos-window-barrier"] == 1, posted
    assert 1 <= mailed["send-window-1"] <= 2, mailed


@pytest.mark.timeout(120)
async def test_sigkill_before_telegram_confirmed_a_stored_send_mails_it_once(
    tmp_path, dovecot, mail_user, ca, botapi, smtpd
):
    """The outbox item is stored, Telegram has not been told yet: the restart gets the update
    again, and the outbox must recognise the chat message instead of storing a second mail."""
    env = bridge_env(tmp_path, dovecot=dovecot, user=mail_user, ca=ca, botapi=botapi, smtpd=smtpd)
    database = tmp_path / "bridge.db"
    # The first getUpdates hands over the /send after 3 s, the one that would confirm it is
    # held 3 s: a window in which the item is stored and the update still unconfirmed.
    botapi.delay("getUpdates", 3.0, count=2)
    queue_send(botapi, "send-unconfirmed")
    async with bridges(tmp_path) as runs:
        bridge = await Bridge.start(0, env, tmp_path)
        runs.append(bridge)
        await wait_until(
            lambda: any(row[0] == "send-unconfirmed" for row in outbox_rows(database)),
            30,
            lambda: f"never stored:\n{runs[-1].tail()}",
            interval=0.001,
        )
        assert botapi.pending_updates == 1  # not confirmed yet
        await bridge.kill()

        bridge = await Bridge.start(1, env, tmp_path)
        runs.append(bridge)
        queue_send(botapi, "send-unconfirmed-barrier")
        await wait_until(
            lambda: mailed_subjects(smtpd)["send-unconfirmed-barrier"] >= 1,
            30,
            lambda: f"barrier not mailed:\n{runs[-1].tail()}",
        )
        assert await bridge.terminate() == 0, bridge.tail()

    mailed = mailed_subjects(smtpd)
    items = [row for row in outbox_rows(database) if row[0] == "send-unconfirmed"]
    redelivered = "already accepted" in runs[1].stderr
    report(
        f"\nstored-then-killed: update re-delivered: {redelivered}; outbox items {len(items)}; "
        f"mailed x{mailed['send-unconfirmed']}"
    )
    assert len(items) == 1, items
    assert mailed["send-unconfirmed"] == 1, mailed


@pytest.mark.timeout(120)
async def test_sigkill_after_telegram_confirmed_a_send_loses_nothing(
    tmp_path, dovecot, mail_user, ca, botapi, smtpd
):
    env = bridge_env(tmp_path, dovecot=dovecot, user=mail_user, ca=ca, botapi=botapi, smtpd=smtpd)
    subjects = [f"send-confirmed-{n}" for n in range(1, 5)]  # each kill loses it most times
    async with bridges(tmp_path) as runs:
        for number, subject in enumerate(subjects):
            bridge = await Bridge.start(number, env, tmp_path)
            runs.append(bridge)
            queue_send(botapi, subject)
            # The fake forgets an update when a getUpdates confirms it (offset past it).
            await wait_until(
                lambda: botapi.pending_updates == 0,
                30,
                lambda: f"update never confirmed:\n{runs[-1].tail()}",
                interval=0.001,
            )
            await bridge.kill()
        stored = [row[0] for row in outbox_rows(tmp_path / "bridge.db")]

        bridge = await Bridge.start(len(subjects), env, tmp_path)
        runs.append(bridge)
        queue_send(botapi, "send-confirmed-barrier")  # handled after any re-delivered one
        await wait_until(
            lambda: mailed_subjects(smtpd)["send-confirmed-barrier"] >= 1,
            30,
            lambda: f"barrier not mailed:\n{runs[-1].tail()}",
        )
        assert await bridge.terminate() == 0, bridge.tail()

    mailed = mailed_subjects(smtpd)
    report(
        f"\nconfirmed-then-killed: stored before the kills {stored}; mailed "
        + ", ".join(f"{s} x{mailed[s]}" for s in subjects)
    )
    assert all(mailed[s] >= 1 for s in subjects), mailed
