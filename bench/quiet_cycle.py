"""Cost of one quiet check (nothing new) and of first contact, for a small and a big mailbox.

Run from the repository root:  .venv/bin/python bench/quiet_cycle.py [--sizes 100,20000]

For each size a fresh Dovecot user gets that many messages (DovecotServer.fill); Dovecot
indexes them on the first SELECT, which is done once before measuring and reported apart, and
SELECT stays slow for a second or two after that, so first contacts are measured only after at
least --first-warmup unmeasured ones and --settle seconds.

* First contact: ImapSession.connect() (TCP, TLS, LOGIN, read-only SELECT) plus the watcher's
  own FolderWatcher._mailbox_state() on an empty database (BACKFILL=0: last UID = UIDNEXT-1, no
  SEARCH ALL). Each repetition gets a fresh copy of a migrated SQLite database.
* Quiet cycle: what the watcher sends per check when nothing is new, through its async API
  (worker-thread hop included): `await session.uids_after(last_uid)` (UID SEARCH UID
  last+1:*) then `await session.noop()` (the NOOP _idle_slice sends before IDLE).

Traffic: "app" bytes are the IMAP protocol text, counted on the TLS socket's plaintext
send/recv_into (every IMAPS socket this process opens is wrapped); "wire" bytes are TCP
payload including TLS records, from the kernel's TCP_INFO (tcpi_bytes_acked/received).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imapclient import tls  # noqa: E402

from bridge.db.engine import Database, make_engine  # noqa: E402
from bridge.db.migrate import upgrade_to_head  # noqa: E402
from bridge.mail.imap import ImapSession  # noqa: E402
from bridge.mail_to_chat import FolderWatcher  # noqa: E402
from tests.integration.conftest import make_settings  # noqa: E402
from tests.servers.botapi import DEFAULT_TOKEN  # noqa: E402
from tests.servers.certs import CA  # noqa: E402
from tests.servers.dovecot import DovecotServer, MailUser  # noqa: E402

TEMPLATE = (
    b"From: Ann Example <ann@example.org>\r\n"
    b"To: me@example.org\r\n"
    b"Subject: Filler message {i}\r\n"
    b"Message-ID: <fill-{i}@example.org>\r\n"
    b"Date: Mon, 03 Jun 2024 10:00:00 +0000\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Message number {i} of the filler.\r\n"
)


# --- traffic counting ------------------------------------------------------------------------


@dataclass
class Traffic:
    """Plaintext IMAP bytes through one TLS socket."""

    sent: int = 0
    received: int = 0


def _count(sock: Any) -> Traffic:
    """Wrap a live SSLSocket's send/recv/recv_into (SSLSocket.sendall calls self.send)."""
    traffic = Traffic()
    send, recv, recv_into = sock.send, sock.recv, sock.recv_into

    def counted_send(data: Any, *args: Any) -> int:
        n: int = send(data, *args)
        traffic.sent += n
        return n

    def counted_recv(*args: Any) -> bytes:
        data: bytes = recv(*args)
        traffic.received += len(data)
        return data

    def counted_recv_into(buffer: Any, *args: Any) -> int:
        n: int = recv_into(buffer, *args)
        traffic.received += n
        return n

    sock.send, sock.recv, sock.recv_into = counted_send, counted_recv, counted_recv_into
    sock.bench_traffic = traffic
    return traffic


def count_all_imap_sockets() -> None:
    """Wrap every IMAPS socket imapclient creates from now on, before imaplib reads from it."""
    original = tls.IMAP4_TLS._create_socket

    def create_socket(self: Any, timeout: float | None = None) -> Any:
        sock = original(self, timeout)
        _count(sock)
        return sock

    tls.IMAP4_TLS._create_socket = create_socket


def app_bytes(sock: Any) -> tuple[int, int]:
    traffic: Traffic = sock.bench_traffic
    return traffic.sent, traffic.received


def wire_bytes(sock: Any) -> tuple[int, int]:
    """(bytes sent and acknowledged, bytes received) of the TCP connection (Linux TCP_INFO)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    if len(info) < 136:
        return 0, 0
    acked, received = struct.unpack_from("<QQ", info, 120)
    return int(acked), int(received)


def both(sock: Any) -> tuple[int, int, int, int]:
    return (*app_bytes(sock), *wire_bytes(sock))


def minus(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x - y for x, y in zip(a, b, strict=True))


# --- measurements ----------------------------------------------------------------------------

# Seconds spent in ImapSession._select (wrapped below, timestamps only; bridge code unchanged).
SELECT_TIMES: list[float] = []


def time_select() -> None:
    original = ImapSession._select

    def timed(self: ImapSession) -> Any:
        started = time.perf_counter()
        try:
            return original(self)
        finally:
            SELECT_TIMES.append(time.perf_counter() - started)

    ImapSession._select = timed  # type: ignore[method-assign]


def p95(values: list[float]) -> float:
    """95th percentile, linear interpolation between the closest ranks."""
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


@dataclass
class Result:
    size: int
    index_s: float
    warm_ms: list[float]
    first_ms: list[tuple[float, ...]]
    first_bytes: tuple[int, ...]
    cycle_ms: list[float]
    search_ms: list[float]
    noop_ms: list[float]
    cycle_bytes: tuple[float, ...]


def template_database(workdir: Path) -> Path:
    """A migrated, empty SQLite database to copy for each first contact."""
    path = workdir / "template.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade_to_head(engine)
    engine.dispose()
    return path


async def first_contact(
    settings: Any, template: Path, path: Path
) -> tuple[tuple[float, ...], Any]:
    """Seconds (total, connect+login, SELECT, _mailbox_state) on an empty database; bytes."""
    shutil.copyfile(template, path)
    engine = make_engine(f"sqlite:///{path}")
    with engine.connect():
        pass  # the running bridge has a pooled connection from its migration step
    db = Database(engine)
    account = settings.accounts[0]
    watcher = FolderWatcher(
        account,
        account.folders[0],
        db=db,
        delivery=None,  # type: ignore[arg-type]  # _mailbox_state never delivers
        routes=(),
        default_chats=(),
        preview_chars=settings.telegram.preview_chars,
        digest_threshold=settings.telegram.digest_threshold,
    )
    session = ImapSession(account.imap, account.folders[0])
    try:
        SELECT_TIMES.clear()
        started = time.perf_counter()
        folder = await session.connect()
        connected = time.perf_counter()
        state = await watcher._mailbox_state(session, folder)
        done = time.perf_counter()
        if state.last_uid != folder.uidnext - 1:
            raise RuntimeError(f"unexpected first-contact state {state}")
        select = SELECT_TIMES[0] if SELECT_TIMES else float("nan")
        parts = (done - started, connected - started - select, select, done - connected)
        return parts, both(session.client.socket())
    finally:
        await session.close()
        engine.dispose()


async def measure(
    args: argparse.Namespace, dovecot: DovecotServer, ca: CA, workdir: Path, size: int
) -> Result:
    user = MailUser(f"quiet{size}x{secrets.token_hex(2)}", secrets.token_urlsafe(12))
    dovecot.add_user(user.name, user.password)
    dovecot.fill(user.name, size, TEMPLATE)
    filled = time.monotonic()
    # Dovecot assigns UIDs and builds its index on the first SELECT after fill(): once only.
    started = time.perf_counter()
    client = dovecot.connect(user.name, user.password, timeout=120)
    exists = int(client.select_folder("INBOX", readonly=True)[b"EXISTS"])
    client.logout()
    index_s = time.perf_counter() - started
    if exists != size:
        raise RuntimeError(f"{exists} messages in INBOX, expected {size}")

    botapi = SimpleNamespace(token=DEFAULT_TOKEN, url="http://127.0.0.1:9")  # never contacted
    settings = make_settings(
        workdir, dovecot=dovecot, user=user, botapi=botapi, ca_file=ca.ca_file
    )
    template = template_database(workdir)
    first_ms: list[tuple[float, ...]] = []
    first_bytes: Any = None
    warm_ms: list[float] = []
    rep = 0
    while len(first_ms) < args.first_reps:
        parts, used = await first_contact(settings, template, workdir / f"fc{size}-{rep}.db")
        rep += 1
        if rep <= args.first_warmup or time.monotonic() - filled < args.settle:
            # SELECT stays slow (~40-150 ms at 20,000) for a second or two after fill(): a
            # time, not a number of sessions, so warm up for at least --settle seconds too.
            warm_ms.append(parts[0] * 1000)
            continue
        first_ms.append(tuple(p * 1000 for p in parts))
        first_bytes = used  # the same every time but for tag numbers

    account = settings.accounts[0]
    session = ImapSession(account.imap, account.folders[0])
    folder = await session.connect()
    last = folder.uidnext - 1
    sock = session.client.socket()
    cycle_ms: list[float] = []
    search_ms: list[float] = []
    noop_ms: list[float] = []
    try:
        for i in range(args.warmup + args.cycles):
            if i == args.warmup:
                before = both(sock)
            t0 = time.perf_counter()
            found = await session.uids_after(last)
            t1 = time.perf_counter()
            await session.noop()
            t2 = time.perf_counter()
            if found:
                raise RuntimeError(f"quiet check found {found}")
            if i >= args.warmup:
                cycle_ms.append((t2 - t0) * 1000)
                search_ms.append((t1 - t0) * 1000)
                noop_ms.append((t2 - t1) * 1000)
        used = minus(both(sock), before)
    finally:
        await session.close()
    per_cycle = tuple(n / args.cycles for n in used)
    return Result(
        size, index_s, warm_ms, first_ms, first_bytes, cycle_ms, search_ms, noop_ms, per_cycle
    )


# --- report ----------------------------------------------------------------------------------


def report(args: argparse.Namespace, results: list[Result]) -> None:
    print()
    print(
        f"Quiet cycle = uids_after(last) + noop(), {args.cycles} cycles after "
        f"{args.warmup} warm-up (ms; bytes per cycle)"
    )
    print(
        f"{'size':>7} | {'cycle med':>9} | {'p95':>6} | {'SEARCH med':>10} | {'NOOP med':>8} |"
        f" {'app out':>7} | {'app in':>6} | {'wire out':>8} | {'wire in':>7}"
    )
    for r in results:
        out, inn, wout, win = r.cycle_bytes
        print(
            f"{r.size:>7} | {statistics.median(r.cycle_ms):>9.2f} | "
            f"{p95(r.cycle_ms):>6.2f} | {statistics.median(r.search_ms):>10.2f} | "
            f"{statistics.median(r.noop_ms):>8.2f} | {out:>7.1f} | {inn:>6.1f} | "
            f"{wout:>8.1f} | {win:>7.1f}"
        )
    print()
    print(
        f"First contact = connect + read-only SELECT + _mailbox_state, BACKFILL=0 "
        f"({args.first_reps} runs; ms; bytes)"
    )
    print(
        f"{'size':>7} | {'median':>7} | {'p95':>6} | {'conn+login':>10} | {'SELECT':>6} | "
        f"{'db state':>8} | {'app out':>7} | {'app in':>6} | {'wire out':>8} | {'wire in':>7}"
    )
    for r in results:
        total = [p[0] for p in r.first_ms]
        connect, select, db = (statistics.median(p[k] for p in r.first_ms) for k in (1, 2, 3))
        out, inn, wout, win = r.first_bytes
        print(
            f"{r.size:>7} | {statistics.median(total):>7.2f} | {p95(total):>6.2f} | "
            f"{connect:>10.2f} | {select:>6.2f} | {db:>8.2f} | {out:>7} | {inn:>6} | "
            f"{wout:>8} | {win:>7}"
        )
    print()
    print("Not measured above: Dovecot's first SELECT after fill(), then the warm-up")
    print(
        f"first contacts, at least {args.first_warmup} and {args.settle:g} s after fill() "
        "(total ms; SELECT is slow for a while after fill)"
    )
    for r in results:
        warm = " ".join(f"{t:.0f}" for t in r.warm_ms[:12])
        rest = r.warm_ms[12:]
        if rest:
            warm += f" ... {len(rest)} more, median {statistics.median(rest):.0f}, last"
            warm += f" {rest[-1]:.0f}"
        print(f"{r.size:>7} | first SELECT {r.index_s * 1000:.0f} | warm-up: {warm}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="100,20000", help="comma-separated mailbox sizes (100,20000)"
    )
    parser.add_argument("--cycles", type=int, default=200, help="measured quiet cycles (200)")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured first cycles (20)")
    parser.add_argument("--first-reps", type=int, default=20, help="first contacts per size (20)")
    parser.add_argument(
        "--first-warmup", type=int, default=12, help="unmeasured first contacts per size (12)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=4.0,
        help="warm up at least this long after fill(), s (4)",
    )
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error("--sizes: comma-separated integers")
    if (
        not args.sizes
        or args.cycles < 1
        or args.warmup < 0
        or args.first_reps < 1
        or args.first_warmup < 0
    ):
        parser.error("need sizes, --cycles >= 1, --first-reps >= 1, warm-ups >= 0")
    return args


async def main(args: argparse.Namespace) -> None:
    count_all_imap_sockets()
    time_select()
    ca = CA()
    dovecot = DovecotServer(ca)
    workdir = Path(tempfile.mkdtemp(prefix="mailbridge-bench."))
    results: list[Result] = []
    try:
        dovecot.start()
        print(f"Dovecot {'.'.join(map(str, dovecot.version))} on {dovecot.host}:{dovecot.port}")
        for size in args.sizes:
            started = time.monotonic()
            results.append(await measure(args, dovecot, ca, workdir, size))
            print(f"size {size}: {time.monotonic() - started:.1f} s")
        report(args, results)
    finally:
        with contextlib.suppress(Exception):
            dovecot.cleanup()
        ca.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    asyncio.run(main(parse_args()))
