"""Watchers, memory and idle CPU of the real bridge for 1, 10 and 50 watched folders.

Run from the repository root:  .venv/bin/python bench/folders.py [--counts 1,10,50]

One Dovecot user gets the folders (INBOX, F01, F02, ...), each holding a few mails. Every
configuration then runs in a fresh Python process (RSS never shrinks back, so one process per
configuration), which starts the fake Bot API and `bridge.app.run` and waits until every folder
was checked. Two connection budgets (imap.max_connections):

* default (8): folders beyond 7 are polled by one connection with STATUS (FolderPoller);
* all IDLE: a budget as large as the folder count, so each folder idles on its own connection.

Dovecot's per-user connection limit in tests/servers/dovecot.py is mail_max_userip_connections
= 100, enough for 50 IDLE connections plus the bench's own.

Figures per configuration:

* RSS: VmRSS of /proc/self/status, once before the bridge starts (the fake Bot API and every
  module loaded) and once after it is up and idle; "per folder" is the growth over the
  1-folder configuration divided by the extra folders.
* Idle CPU: user+system CPU time of the whole process (time.process_time(), every thread)
  over a quiet window (--window, 20 s by default) after a settling time (--settle), scaled to
  one minute. No mail arrives during it. The fake Bot API shares the process; all it does then
  is answer the bot's long polls (getUpdates).
* STATUS rounds: FolderPoller._visit is wrapped (timestamps and CPU times only; the bridge's
  code is not changed). The polled configurations run with --poll-interval (5 s by default)
  so that the window holds several rounds; the figure "at 60 s" is the CPU between rounds
  scaled to a minute plus one round's CPU, what a minute costs with the default
  poll_interval of 60 s.

The child creates the database and the account row before starting the bridge (see
seed_account()), so that every configuration starts from the same state; this loads Alembic
into the process before "RSS before" is read.

Trust (--trust): "system" (default) is what a real deployment does, ca_file unset so that every
connection's TLS context loads the system trust store; SSL_CERT_FILE points at a copy of
/etc/ssl/certs/ca-certificates.crt with the test CA appended. "ca-file" sets imap.ca_file to the
test CA alone, as the integration tests do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.config import ImapSettings, Settings  # noqa: E402
from bridge.db import store  # noqa: E402
from bridge.db.engine import Database, make_engine  # noqa: E402
from bridge.db.migrate import upgrade_to_head  # noqa: E402
from bridge.mail_to_chat import FolderPoller, FolderWatcher  # noqa: E402
from tests.integration.conftest import make_settings, running  # noqa: E402
from tests.servers.botapi import FakeBotApi  # noqa: E402
from tests.servers.certs import CA  # noqa: E402
from tests.servers.dovecot import DovecotServer  # noqa: E402

SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEFAULT_BUDGET = ImapSettings.model_fields["max_connections"].default
DEFAULT_POLL = ImapSettings.model_fields["poll_interval"].default
MAIL = (
    b"From: Ann Example <ann@example.org>\r\n"
    b"To: me@example.org\r\n"
    b"Subject: Filler message {i}\r\n"
    b"Message-ID: <fill-{i}@example.org>\r\n"
    b"Date: Mon, 03 Jun 2024 10:00:00 +0000\r\n"
    b"\r\n"
    b"Message number {i}.\r\n"
)


def folder_names(count: int) -> list[str]:
    return ["INBOX", *(f"F{i:02d}" for i in range(1, count))]


def proc_status(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status as integers (VmRSS in kB, Threads)."""
    found: dict[str, int] = {}
    with Path("/proc/self/status").open(encoding="ascii") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in keys:
                found[name] = int(value.split()[0])
    return found


def cpu_seconds() -> float:
    """User + system CPU time of this process, every thread (CLOCK_PROCESS_CPUTIME_ID; the
    same sum as os.times(), without its 10 ms ticks)."""
    return time.process_time()


def thread_cpu() -> dict[int, tuple[str, float]]:
    """Thread id -> (kind, CPU seconds) of every live Python thread (per-thread CPU clocks).

    Kinds: "loop" (the event loop's thread), "imap" (the bridge's IMAP executor), "db" (the
    default executor of asyncio.to_thread: database calls), "other".
    """
    kinds = {"MainThread": "loop", "imap": "imap", "asyncio": "db"}
    found: dict[int, tuple[str, float]] = {}
    for thread in threading.enumerate():
        if thread.ident is None:
            continue
        try:
            clock = time.pthread_getcpuclockid(thread.ident)
            found[thread.ident] = (
                kinds.get(thread.name.split("_")[0], "other"),
                time.clock_gettime(clock),
            )
        except (OSError, ProcessLookupError):
            continue  # ended meanwhile
    return found


def thread_cpu_since(before: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per kind of thread since `before`, for threads alive at both moments."""
    spent: dict[str, float] = {}
    for ident, (kind, cpu) in thread_cpu().items():
        if ident in before:
            spent[kind] = spent.get(kind, 0.0) + cpu - before[ident][1]
    return spent


# --- child: one configuration in its own process --------------------------------------------

ROUNDS: list[tuple[float, float]] = []  # (wall seconds, CPU seconds) of each STATUS round


def time_rounds() -> None:
    """Wrap FolderPoller._visit: a round runs from the first folder's visit to the last's."""
    original = FolderPoller._visit
    started: dict[int, tuple[float, float]] = {}

    async def visit(self: FolderPoller, session: Any, watcher: FolderWatcher, stop: Any) -> None:
        if watcher is self.watchers[0]:
            started[id(self)] = (time.monotonic(), cpu_seconds())
        await original(self, session, watcher, stop)
        if watcher is self.watchers[-1] and id(self) in started:
            wall, cpu = started.pop(id(self))
            ROUNDS.append((time.monotonic() - wall, cpu_seconds() - cpu))

    FolderPoller._visit = visit  # type: ignore[method-assign]


def seed_account(settings: Settings) -> None:
    """Migrate the database and create the account row before the bridge starts.

    This used to work around a race: on a new database every FolderWatcher of an account
    called store.ensure_account at once and all but one failed with IntegrityError (UNIQUE
    account.name), which stopped the bridge. Since commit 50680d6 the bridge creates the
    accounts before the watchers start; --no-seed-account lets it do so.
    """
    engine = make_engine(settings.core.database_url)
    try:
        upgrade_to_head(engine)
        for account in settings.accounts:
            Database(engine).call(store.ensure_account, account.name)
    finally:
        engine.dispose()


async def child(args: argparse.Namespace) -> dict[str, Any]:
    time_rounds()
    workdir = Path(tempfile.mkdtemp(prefix="mailbridge-bench."))
    try:
        async with FakeBotApi() as botapi:
            folders = folder_names(args.folders)
            imap: dict[str, Any] = {
                "max_connections": args.budget,
                "poll_interval": args.poll_interval,
            }
            if args.trust == "system":
                imap["ca_file"] = None
            settings = make_settings(
                workdir,
                dovecot=SimpleNamespace(port=args.port),
                user=SimpleNamespace(name=args.user, password=args.password),
                botapi=botapi,
                ca_file=Path(args.ca_file),
                imap=imap,
                folders=folders,
            )
            if args.seed_account:
                seed_account(settings)
            before = proc_status("VmRSS", "Threads")
            started = time.monotonic()
            async with running(settings) as bridge:
                await bridge.ready(timeout=120)
                up = time.monotonic() - started
                await asyncio.sleep(args.settle)
                ROUNDS.clear()
                threads0 = thread_cpu()
                wall0, cpu0 = time.monotonic(), cpu_seconds()
                await asyncio.sleep(args.window)
                wall, cpu = time.monotonic() - wall0, cpu_seconds() - cpu0
                by_thread = thread_cpu_since(threads0)
                rounds = list(ROUNDS)
                after = proc_status("VmRSS", "Threads", "VmHWM")
        polled = max(0, len(folders) - (args.budget - 1)) if len(folders) > args.budget else 0
        return {
            "folders": len(folders),
            "budget": args.budget,
            "idle": len(folders) - polled,
            "polled": polled,
            "startup_s": up,
            "rss_before_kb": before["VmRSS"],
            "rss_after_kb": after["VmRSS"],
            "hwm_kb": after["VmHWM"],
            "threads": after["Threads"],
            "window_s": wall,
            "cpu_s": cpu,
            "rounds": rounds,
            "by_thread": by_thread,
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --- parent: servers, folders, one child per configuration ----------------------------------


def prepare(dovecot: DovecotServer, count: int) -> tuple[str, str]:
    """A user with `count` folders (INBOX included), each holding a few mails."""
    name, password = f"folders{secrets.token_hex(3)}", secrets.token_urlsafe(12)
    dovecot.add_user(name, password)
    for folder in folder_names(count):
        dovecot.fill(name, 3, MAIL, mailbox=folder)
    client = dovecot.connect(name, password)
    try:  # let Dovecot index every folder before the bridge's first contact
        for folder in folder_names(count):
            client.select_folder(folder, readonly=True)
    finally:
        client.logout()
    return name, password


def run_child(
    args: argparse.Namespace, dovecot: DovecotServer, ca: CA, env: dict[str, str], **kw: Any
) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        f"--port={dovecot.port}",
        f"--ca-file={ca.ca_file}",
        f"--window={args.window}",
        f"--settle={args.settle}",
        f"--trust={args.trust}",
        f"--log-level={args.log_level}",
        *([] if args.seed_account else ["--no-seed-account"]),
        *(f"--{key.replace('_', '-')}={value}" for key, value in kw.items()),
    ]
    # This very script with arguments built here: no untrusted input.
    done = subprocess.run(  # noqa: S603
        command, env=env, capture_output=True, text=True, timeout=600
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return result
    sys.stderr.write(done.stdout + done.stderr)
    raise RuntimeError(f"child {kw} exited {done.returncode} without a result")


def per_minute(result: dict[str, Any]) -> tuple[float, float, float]:
    """(CPU s/min between rounds, mean CPU ms of a round, CPU s/min at poll_interval 60 s)."""
    rounds = result["rounds"]
    round_wall = sum(w for w, _ in rounds)
    round_cpu = sum(c for _, c in rounds)
    quiet = (result["cpu_s"] - round_cpu) / (result["window_s"] - round_wall) * 60
    if not rounds:
        return quiet, 0.0, quiet
    mean = round_cpu / len(rounds)
    return quiet, mean * 1000, quiet + mean * 60 / DEFAULT_POLL


def report(args: argparse.Namespace, results: list[tuple[str, dict[str, Any]]]) -> None:
    print()
    print(
        f"Idle bridge, one account; trust {args.trust}; CPU over {args.window:g} s after "
        f"{args.settle:g} s settling, scaled to a minute"
    )
    print(
        f"{'folders':>7} | {'budget':<14} | {'IDLE':>4} | {'polled':>6} | {'threads':>7} | "
        f"{'RSS before':>10} | {'RSS up':>7} | {'growth':>7} | {'/folder':>7} | "
        f"{'CPU s/min':>9} | {'round ms':>8} | {'at 60 s':>7}"
    )
    base_one = min((r for _, r in results), key=lambda r: r["folders"])
    for mode, r in results:
        growth = (r["rss_after_kb"] - r["rss_before_kb"]) / 1024
        extra = r["folders"] - base_one["folders"]
        base_growth = (base_one["rss_after_kb"] - base_one["rss_before_kb"]) / 1024
        slope = f"{(growth - base_growth) / extra:>7.2f}" if extra else f"{'-':>7}"
        quiet, round_ms, at_default = per_minute(r)
        rounds = f"{round_ms:>8.1f}" if r["rounds"] else f"{'-':>8}"
        print(
            f"{r['folders']:>7} | {mode:<14} | {r['idle']:>4} | {r['polled']:>6} | "
            f"{r['threads']:>7} | {r['rss_before_kb'] / 1024:>8.1f}MB | "
            f"{r['rss_after_kb'] / 1024:>5.1f}MB | {growth:>5.1f}MB | {slope} | "
            f"{quiet:>9.3f} | {rounds} | {at_default:>7.3f}"
        )
    print()
    print("growth = RSS up - RSS before (MB); /folder = (growth - growth at the smallest count)")
    print("/ extra folders (MB). CPU s/min = CPU between STATUS rounds; round ms = one round's")
    print(
        f"CPU (polled at {args.poll_interval:g} s here); at 60 s = a minute with the default "
        f"poll_interval {DEFAULT_POLL:g} s."
    )
    print("Targets: < 2 MB a folder; < 1 s CPU a minute at 50 folders.")
    print()
    print("Where the window's CPU went (s/min, STATUS rounds included; per-thread CPU clocks)")
    kinds = ("loop", "imap", "db", "other")
    print(
        f"{'folders':>7} | {'budget':<14} | "
        + " | ".join(f"{k:>6}" for k in kinds)
        + f" | {'rest':>6} | {'total':>6}"
    )
    for mode, r in results:
        scale = 60 / r["window_s"]
        spent = r["by_thread"]
        rest = r["cpu_s"] - sum(spent.values())
        print(
            f"{r['folders']:>7} | {mode:<14} | "
            + " | ".join(f"{spent.get(k, 0.0) * scale:>6.3f}" for k in kinds)
            + f" | {rest * scale:>6.3f} | {r['cpu_s'] * scale:>6.3f}"
        )
    print("loop = event loop thread (the bridge and the fake Bot API); imap = the bridge's IMAP")
    print("executor; db = asyncio.to_thread workers; rest = threads that ended in the window.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,10,50", help="folder counts (1,10,50)")
    parser.add_argument("--window", type=float, default=20.0, help="CPU window, s (20)")
    parser.add_argument("--settle", type=float, default=5.0, help="wait before it, s (5)")
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=5.0,
        help="imap.poll_interval of the polled folders here, s (5); scaled to 60 s",
    )
    parser.add_argument(
        "--trust",
        choices=("system", "ca-file"),
        default="system",
        help="TLS trust: system store + test CA (default), or imap.ca_file",
    )
    parser.add_argument(
        "--modes",
        default="default,all-idle",
        help="budgets: default (8) and/or all-idle (as many as folders)",
    )
    parser.add_argument(
        "--no-seed-account",
        dest="seed_account",
        action="store_false",
        help="let the bridge migrate the database and create the account row itself",
    )
    parser.add_argument("--log-level", default="WARNING", help="bridge log level (WARNING)")
    # Internal: one configuration in a child process.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--user", help=argparse.SUPPRESS)
    parser.add_argument("--password", help=argparse.SUPPRESS)
    parser.add_argument("--ca-file", help=argparse.SUPPRESS)
    parser.add_argument("--folders", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.counts = sorted({int(c) for c in args.counts.split(",") if c.strip()})
    except ValueError:
        parser.error("--counts: comma-separated integers")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.counts or min(args.counts) < 1 or max(args.counts) > 99:
        parser.error("--counts: between 1 and 99 (Dovecot allows 100 connections a user)")
    if not set(args.modes) <= {"default", "all-idle"} or not args.modes:
        parser.error("--modes: default and/or all-idle")
    return args


def main(args: argparse.Namespace) -> None:
    ca = CA()
    dovecot = DovecotServer(ca)
    workdir = Path(tempfile.mkdtemp(prefix="mailbridge-bench."))
    results: list[tuple[str, dict[str, Any]]] = []
    try:
        dovecot.start()
        print(f"Dovecot {'.'.join(map(str, dovecot.version))} on {dovecot.host}:{dovecot.port}")
        env = dict(os.environ)
        if args.trust == "system":
            bundle = workdir / "trust.pem"
            bundle.write_bytes(SYSTEM_BUNDLE.read_bytes() + Path(ca.ca_file).read_bytes())
            env["SSL_CERT_FILE"] = str(bundle)
        user, password = prepare(dovecot, max(args.counts))
        for count in args.counts:
            budgets = {"default": DEFAULT_BUDGET, "all-idle": max(count, 1)}
            done: set[int] = set()
            for mode in args.modes:
                budget = budgets[mode]
                idle_all = count <= budget
                if count <= DEFAULT_BUDGET and mode == "all-idle" and "default" in args.modes:
                    continue  # the same as the default budget: every folder idles anyway
                if budget in done:
                    continue
                done.add(budget)
                started = time.monotonic()
                result = run_child(
                    args, dovecot, ca, env, user=user, password=password, folders=count,
                    budget=budget, poll_interval=DEFAULT_POLL if idle_all else args.poll_interval,
                )  # fmt: skip
                label = f"{mode} ({budget})"
                results.append((label, result))
                print(
                    f"{count} folder(s), {label}: up in {result['startup_s']:.1f} s, "
                    f"run {time.monotonic() - started:.1f} s"
                )
        report(args, results)
    finally:
        dovecot.cleanup()
        ca.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    arguments = parse_args()
    logging.basicConfig(level=arguments.log_level.upper(), format="%(levelname)s %(message)s")
    if arguments.child:
        print("RESULT " + json.dumps(asyncio.run(child(arguments))), flush=True)
    else:
        main(arguments)
