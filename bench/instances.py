"""1, 2 and 3 `mailbridge run` instances on one PostgreSQL database over 200 watched folders.

Run from the repository root:
    .venv/bin/python bench/instances.py [--instances 1,2,3] [--mails N] [--folders 200]

The servers are the integration tests' (tests/servers/), in this process: a private Dovecot
(IMAPS, throwaway CA) and the fake Bot API. The folders are spread over --users Dovecot users
(10 users x 20 folders: INBOX, F01, ..., F19; one filler mail each, indexed before any bridge
starts), each user one [[accounts]] entry of one mailbridge.toml. Each account's mail goes to
a private chat of its own (a [[routes]] entry per account: 10 chats) and
telegram.chat_interval is 0 (--chat-interval), so that Telegram's pacing of about one message
a second per chat does not set the throughput: what is measured is the bridge. Every account
has imap.max_connections = 20 (--budget), so every folder idles on its own IMAP connection.
The test Dovecot takes at most 100 IMAPS connections in all (each TLS connection keeps an
imap-login process, and default_process_limit is 100; mail_max_userip_connections = 100 a user
is not what binds): BenchDovecot raises default_process_limit to 1000 for this script only.

Per instance count, on a new PostgreSQL database (CREATE DATABASE on the tests' server,
MAILBRIDGE_TEST_POSTGRES or postgres@127.0.0.1:5432; migrated by `mailbridge migrate` before
the instances start, so that no instance carries Alembic; dropped at the end):

1. start: the instances start together as real processes (`.venv/bin/mailbridge run` with
   BRIDGE_CONFIG_FILE, and BRIDGE_HTTP__LISTEN on a port of its own), then the script waits
   (bounded) until they settled: every folder "connected" with a first check done at exactly
   one instance (each instance's /healthz), telegram:updates held, and no folder, poll or
   telegram lease changing hands for a whole lease round (lease_seconds / 3 + 2 s);
2. idle: no mail for --idle-window seconds; database statements per second of each instance
   (mailbridge_db_statements_total on /metrics: lease renewals and the idle loops);
3. burst: --mails mails, every folder its share (3 at the default 600), each folder's share in
   one MULTIAPPEND (RFC 3502), one logged-in connection per user, the 10 users in parallel
   (--append single: one APPEND per mail, interleaved over the folders). The script waits
   (bounded by --timeout) until every delivery row is sent, then reads from the database the
   message that carried each mail (delivery.telegram_message_id) and the time the fake Bot API
   received that sendMessage (`Call.time`). Delay: APPEND's tagged OK -> that sendMessage,
   split where the delivery row was written (delivery.created_at). Throughput: mails / (last
   sendMessage - first APPEND sent). Dovecot tells IDLE sessions of new mail 0.5 s after it
   (see latency.py): every delay includes that;
4. per instance: leases held (by kind: folder:, poll:, telegram:updates, chat:) read from the
   lease table after settling and after the burst (holders `<host>:<pidns>-<pid>-<rand>`
   matched by pid), mails posted (mailbridge_mails_posted_total), statements during the burst,
   VmRSS (/proc/<pid>/status) after settling and after the burst. Statements per posted mail:
   (sum after - sum before the burst) / mails, less each /metrics scrape's own statements
   (measured by back-to-back scrapes); "net" also less the idle rate over the same window.
   CPU seconds of the instances, of this Dovecot, of the PostgreSQL backends serving this
   database, of this process (appenders, fake Bot API) and of every other process, over the
   burst (/proc/<pid>/stat);
5. trickle: --trickle single mails, --trickle-gap s apart, into random folders (--seed), each
   noted with whether its folder's lease and its chat's lease were held by the same instance
   at its APPEND; the delay of each, as above.

Nothing under bridge/ is changed or patched: the instances are separate processes. --keep
keeps the instances' logs and the databases to look into.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from imapclient import IMAPClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import Engine, make_url  # noqa: E402

from bench.machine import machine  # noqa: E402
from tests.conftest import POSTGRES_DEFAULT, POSTGRES_VARIABLE  # noqa: E402
from tests.integration.conftest import OWNER  # noqa: E402
from tests.servers.botapi import FakeBotApi  # noqa: E402
from tests.servers.certs import CA  # noqa: E402
from tests.servers.dovecot import DovecotServer, MailUser, free_port  # noqa: E402

CHAT_BASE = 700_000  # account k posts to private chat CHAT_BASE + k
LEASE_KINDS = ("folder", "poll", "telegram", "chat")
FILLER = (
    b"From: Ann Example <ann@example.org>\r\n"
    b"To: me@example.org\r\n"
    b"Subject: Filler message {i}\r\n"
    b"Message-ID: <fill-{i}@example.org>\r\n"
    b"Date: Mon, 03 Jun 2024 10:00:00 +0000\r\n"
    b"\r\n"
    b"Message number {i}.\r\n"
)


class BenchDovecot(DovecotServer):
    """The test Dovecot with room for more than 100 IMAPS connections.

    Dovecot keeps one imap-login process per TLS connection for its whole life (high-security
    mode), and default_process_limit is 100: the 101st connection's handshake times out.
    """

    def _write_config(self) -> None:
        super()._write_config()
        with self.config_file.open("a", encoding="utf-8") as config:
            config.write("# bench/instances.py: 200 IDLE connections and more\n")
            config.write("default_process_limit = 1000\n")

    @property
    def pid(self) -> int:
        """The master process's pid (its children are the server's processes)."""
        return self._process.pid if self._process is not None else -1


def p95(values: list[float]) -> float:
    """95th percentile, linear interpolation between the closest ranks."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


def vm_rss_mb(pid: int) -> float:
    """VmRSS of a process, MiB (nan once it is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CPU_KINDS = ("bridge", "dovecot", "postgres", "bench", "other")


def cpu_times() -> dict[int, float]:
    """CPU seconds (user + system) so far of every process, by pid."""
    found: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            found[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return found


def cpu_kind(pid: int, bridges: set[int], dovecot_master: int, database: str) -> str:
    """bridge (an instance), dovecot (this script's server), postgres (a backend serving
    this configuration's database), bench (this process: appenders, fake Bot API) or other."""
    if pid in bridges:
        return "bridge"
    if pid == os.getpid():
        return "bench"
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = (Path("/proc") / str(pid) / "stat").read_text()
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if pid == dovecot_master or ppid == dovecot_master:
            return "dovecot"
        if comm.startswith("postgres"):
            title = (Path("/proc") / str(pid) / "cmdline").read_bytes()
            if database.encode() in title:
                return "postgres"
    return "other"


def cpu_spent(
    before: dict[int, float], after: dict[int, float], kinds: dict[int, str]
) -> tuple[dict[str, float], Counter[str]]:
    """CPU seconds per kind between two cpu_times() readings (new processes: all of it), and
    the "other" seconds by command name."""
    spent = dict.fromkeys(CPU_KINDS, 0.0)
    others: Counter[str] = Counter()
    for pid, seconds in after.items():
        kind = kinds.get(pid, "other")
        spent[kind] += seconds - before.get(pid, 0.0)
        if kind == "other" and seconds > before.get(pid, 0.0):
            with contextlib.suppress(OSError):
                name = (Path("/proc") / str(pid) / "comm").read_text().strip()
                others[name] += seconds - before.get(pid, 0.0)
    return spent, others


def toml_value(value: Any) -> str:
    """A TOML value for a str, int, float, bool or list of them (JSON strings are TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


@dataclass
class Layout:
    """Who watches what: users (accounts) and their folders."""

    users: list[MailUser]
    folders: list[list[str]]  # per user

    @property
    def total(self) -> int:
        return sum(len(f) for f in self.folders)

    def place(self, i: int) -> tuple[int, str]:
        """Mail i goes to (user index, folder): round-robin over users, then their folders."""
        user = i % len(self.users)
        names = self.folders[user]
        return user, names[(i // len(self.users)) % len(names)]


def make_layout(dovecot: DovecotServer, users: int, folders: int) -> Layout:
    """Users with their folders, one filler mail each, indexed by Dovecot once."""
    tag = secrets.token_hex(2)
    per_user = [folders // users + (1 if k < folders % users else 0) for k in range(users)]
    layout = Layout([], [])
    for k, count in enumerate(per_user):
        user = MailUser(f"inst{tag}u{k:02d}", secrets.token_urlsafe(12))
        dovecot.add_user(user.name, user.password)
        names = ["INBOX", *(f"F{j:02d}" for j in range(1, count))]
        for name in names:
            dovecot.fill(user.name, 1, FILLER, mailbox=name)
        client = dovecot.connect(user.name, user.password)
        try:
            for name in names:  # build the index now, not during the bridge's first contact
                client.select_folder(name, readonly=True)
        finally:
            client.logout()
        layout.users.append(user)
        layout.folders.append(names)
    return layout


def write_config(
    path: Path,
    args: argparse.Namespace,
    database_url: str,
    layout: Layout,
    dovecot: DovecotServer,
    ca: CA,
    botapi: FakeBotApi,
) -> None:
    """mailbridge.toml: one account per user, one route (and chat) per account."""
    lines = [
        f"database_url = {toml_value(database_url)}",
        f"log_level = {toml_value(args.log_level.upper())}",
        f"lease_seconds = {toml_value(args.lease_seconds)}",
        "",
        "[telegram]",
        f"token = {toml_value(botapi.token)}",
        f"api_url = {toml_value(botapi.url)}",
        f"allowed_user_ids = [{OWNER}]",
        f"notify_chat_ids = [{OWNER}]",
        f"chat_interval = {toml_value(args.chat_interval)}",
    ]
    for k, (user, folders) in enumerate(zip(layout.users, layout.folders, strict=True)):
        lines += [
            "",
            "[[accounts]]",
            f"name = {toml_value(f'a{k:02d}')}",
            f"folders = {toml_value(folders)}",
            "[accounts.imap]",
            'host = "127.0.0.1"',
            f"port = {dovecot.port}",
            f"username = {toml_value(user.name)}",
            f"password = {toml_value(user.password)}",
            f"ca_file = {toml_value(str(ca.ca_file))}",
            f"max_connections = {args.budget}",
            f"poll_interval = {toml_value(args.poll_interval)}",
            "[accounts.smtp]",
            'host = "127.0.0.1"',
            "port = 1",
            f"ca_file = {toml_value(str(ca.ca_file))}",
        ]
    for k in range(len(layout.users)):
        lines += ["", "[[routes]]", f'account = "a{k:02d}"', f"chats = [{CHAT_BASE + k}]"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path.chmod(0o600)  # it holds passwords and the token: the bridge refuses it otherwise


def command() -> list[str]:
    """The console script next to this Python, else `python -m bridge`."""
    script = Path(sys.executable).parent / "mailbridge"
    return [str(script)] if script.exists() else [sys.executable, "-m", "bridge"]


def bridge_env(config: Path, **extra: str) -> dict[str, str]:
    """This environment without BRIDGE_*, plus the configuration file and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BRIDGE_")}
    env["BRIDGE_CONFIG_FILE"] = str(config)
    env.update(extra)
    return env


@dataclass
class Scrape:
    """What one /metrics answer said."""

    posted: float
    statements: float


@dataclass
class Instance:
    """One `mailbridge run` process."""

    number: int
    proc: asyncio.subprocess.Process
    port: int
    log: Path
    log_file: IO[bytes]
    rss: dict[str, float] = field(default_factory=dict)
    leases: dict[str, Counter[str]] = field(default_factory=dict)
    scrape_cost: float = 0.0  # statements one /metrics scrape sends itself

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def scrape(self, client: httpx.AsyncClient) -> Scrape:
        answer = await client.get(f"{self.url}/metrics", timeout=10)
        answer.raise_for_status()
        posted = statements = 0.0
        for family in text_string_to_metric_families(answer.text):
            for sample in family.samples:
                if sample.name == "mailbridge_mails_posted_total":
                    posted += sample.value
                elif sample.name == "mailbridge_db_statements_total":
                    statements += sample.value
        return Scrape(posted, statements)

    async def health(self, client: httpx.AsyncClient) -> dict[str, Any] | None:
        """The /healthz body, or None while it does not answer."""
        try:
            answer = await client.get(f"{self.url}/healthz", timeout=10)
        except httpx.HTTPError:
            return None
        body: dict[str, Any] = answer.json()
        return body

    def log_counts(self) -> Counter[str]:
        """Lines per level in the instance's log (and tracebacks)."""
        counts: Counter[str] = Counter()
        for line in self.log.read_text(errors="replace").splitlines():
            for level in ("WARNING", "ERROR", "CRITICAL", "Traceback"):
                if level in line:
                    counts[level] += 1
        return counts

    async def stop(self) -> int:
        """SIGTERM, bounded wait, SIGKILL as the fallback; the exit status."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.log_file.close()
        assert self.proc.returncode is not None
        return self.proc.returncode


async def start_instance(number: int, config: Path, workdir: Path) -> Instance:
    port = free_port()
    log = workdir / f"instance{number}.log"
    log_file = log.open("wb")
    proc = await asyncio.create_subprocess_exec(
        *command(),
        "run",
        env=bridge_env(config, BRIDGE_HTTP__LISTEN=f"127.0.0.1:{port}"),
        cwd=workdir,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log_file,
        stderr=log_file,
    )
    return Instance(number, proc, port, log, log_file)


async def migrate(config: Path, workdir: Path) -> None:
    """`mailbridge migrate` on the new database, in its own process (bounded)."""
    proc = await asyncio.create_subprocess_exec(
        *command(),
        "migrate",
        env=bridge_env(config),
        cwd=workdir,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), 120)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"mailbridge migrate exited {proc.returncode}:\n{output.decode()}")


def lease_kind(name: str) -> str:
    return name.split(":", 1)[0]


def read_leases(engine: Engine) -> dict[str, str]:
    """Valid lease name -> holder (outbox:/job: claims left out)."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT name, holder FROM lease WHERE expires_at > now()"))
        return {name: holder for name, holder in rows if lease_kind(name) in LEASE_KINDS}


def holder_pid(holder: str) -> int:
    """The pid in a holder string `<host>:<pidns>-<pid>-<rand>`."""
    parts = holder.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else -1


def leases_by_instance(engine: Engine, instances: list[Instance]) -> dict[int, Counter[str]]:
    """Instance number (0: a holder that is none of them) -> leases held, by kind."""
    by_pid = {inst.proc.pid: inst.number for inst in instances}
    found: dict[int, Counter[str]] = {inst.number: Counter() for inst in instances}
    for name, holder in read_leases(engine).items():
        number = by_pid.get(holder_pid(holder), 0)
        found.setdefault(number, Counter())[lease_kind(name)] += 1
    return found


async def wait_settled(
    instances: list[Instance],
    client: httpx.AsyncClient,
    engine: Engine,
    layout: Layout,
    args: argparse.Namespace,
) -> float:
    """Until every folder is connected and checked at exactly one instance, telegram:updates
    is held, and who holds which folder, poll and telegram lease stayed the same for a whole
    lease round of every instance (lease_seconds / 3, plus 2 s): instances that share the
    work evenly hand leases over in their first rounds. Bounded; the seconds it took."""
    started = time.monotonic()
    deadline = started + args.settle_timeout
    steady = args.lease_seconds / 3 + 2.0
    last_map: dict[str, str] = {}
    since = started
    seen: dict[tuple[str, str], int] = {}
    while True:
        for inst in instances:
            if inst.proc.returncode is not None:
                raise RuntimeError(
                    f"instance {inst.number} exited {inst.proc.returncode}:\n"
                    + inst.log.read_text(errors="replace")[-3000:]
                )
        bodies = await asyncio.gather(*(inst.health(client) for inst in instances))
        seen = {}
        for body in bodies:
            for folder in (body or {}).get("folders", []):
                if folder["state"] == "connected" and folder["last_check"]:
                    key = (folder["account"], folder["folder"])
                    seen[key] = seen.get(key, 0) + 1
        leases = await asyncio.to_thread(read_leases, engine)
        work = {name: holder for name, holder in leases.items() if lease_kind(name) != "chat"}
        now = time.monotonic()
        if work != last_map:
            last_map, since = work, now
        if (
            all(body is not None for body in bodies)
            and len(seen) == layout.total
            and all(n == 1 for n in seen.values())
            and "telegram:updates" in leases
            and now - since >= steady
        ):
            return now - started
        if now > deadline:
            raise RuntimeError(
                f"not settled within {args.settle_timeout:g} s: {len(seen)} of {layout.total} "
                f"folders connected and checked, {sum(n > 1 for n in seen.values())} at two "
                f"instances; leases {Counter(map(lease_kind, leases))}, unchanged for "
                f"{now - since:.0f} s"
            )
        await asyncio.sleep(1.0)


async def scrape_all(instances: list[Instance], client: httpx.AsyncClient) -> list[Scrape]:
    return list(await asyncio.gather(*(inst.scrape(client) for inst in instances)))


async def measure_scrape_cost(instances: list[Instance], client: httpx.AsyncClient) -> None:
    """Statements one scrape sends: the least difference of back-to-back scrapes."""
    for inst in instances:
        readings = [(await inst.scrape(client)).statements for _ in range(4)]
        inst.scrape_cost = min(b - a for a, b in itertools.pairwise(readings))


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


def append_all(
    dovecot: DovecotServer, user: MailUser, batches: list[tuple[str, list[str]]]
) -> dict[str, float]:
    """Deliver (folder, subjects) batches in order on one connection: one APPEND per mail,
    or one MULTIAPPEND (RFC 3502) per batch of several; subject -> the tagged OK's time."""
    client: IMAPClient = dovecot.connect(user.name, user.password)
    done: dict[str, float] = {}
    try:
        for folder, subjects in batches:
            raws = [make_mail(subject) for subject in subjects]
            if len(raws) == 1:
                client.append(folder, raws[0])
            else:
                client.multiappend(folder, raws)
            now = time.monotonic()
            done.update(dict.fromkeys(subjects, now))
    finally:
        client.logout()
    return done


def load_plan(args: argparse.Namespace, layout: Layout) -> list[list[tuple[str, list[str]]]]:
    """Per user, the (folder, subjects) batches to deliver, in order.

    Mail i goes to Layout.place(i), so that every folder gets its share. "multi": each
    folder's share in one MULTIAPPEND, folder after folder; "single": one APPEND per mail in
    the order of i, so a folder's mails come one after the other with the other folders'
    mails between them.
    """
    tag = secrets.token_hex(3)
    plan: list[list[tuple[str, list[str]]]] = [[] for _ in layout.users]
    shares: dict[tuple[int, str], list[str]] = {}
    for i in range(args.mails):
        user, folder = layout.place(i)
        subject = f"Inst {tag} m{i:04d} {user:02d}/{folder}"
        if args.append == "single":
            plan[user].append((folder, [subject]))
        else:
            shares.setdefault((user, folder), []).append(subject)
    for (user, folder), subjects in shares.items():
        plan[user].append((folder, subjects))
    return plan


def delivered(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(text("SELECT count(*) FROM delivery WHERE status = 'sent'")) or 0)


def carriers(engine: Engine) -> dict[str, tuple[int, int, float, float]]:
    """Subject -> (chat id, Telegram message id, delivery row written, row marked sent) of
    the message that carried it; the times as Unix time."""
    query = text(
        "SELECT p.subject, d.chat_id, d.telegram_message_id, d.created_at, d.sent_at "
        "FROM delivery d JOIN posted_mail p ON p.id = d.posted_mail_id WHERE d.status = 'sent'"
    )
    with engine.connect() as conn:
        return {
            subject: (int(chat), int(msg), created.timestamp(), sent.timestamp())
            for subject, chat, msg, created, sent in conn.execute(query)
        }


@dataclass
class Result:
    """One configuration's figures."""

    count: int
    mails: int
    settle_s: float = 0.0
    idle_statements: list[float] = field(default_factory=list)  # per instance, per second
    first_sent: float = 0.0  # monotonic: the first APPEND went out
    appended: dict[str, float] = field(default_factory=dict)  # subject -> APPEND OK
    append_s: float = 0.0
    span_s: float = 0.0
    window_s: float = 0.0
    carried: int = 0
    messages: int = 0
    delays: list[float] = field(default_factory=list)
    to_row: list[float] = field(default_factory=list)  # APPEND OK -> delivery row written
    row_to_sent: list[float] = field(default_factory=list)  # row written -> row marked sent
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds in the load window
    others: Counter[str] = field(default_factory=Counter)  # "other" CPU by command name
    # The trickle after the burst: subject -> (APPEND OK, whose folder / chat lease it met)
    trickle: dict[str, tuple[float, str]] = field(default_factory=dict)
    trickle_delays: dict[str, list[float]] = field(default_factory=dict)  # by lease meeting
    load_average: tuple[float, float] = (0.0, 0.0)  # 1-minute, before and after the load
    posted: list[float] = field(default_factory=list)  # per instance
    statements: list[float] = field(default_factory=list)  # per instance, load window
    instances: list[Instance] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)
    logs: list[Counter[str]] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.carried / self.span_s if self.span_s > 0 else float("nan")

    @property
    def per_mail(self) -> float:
        return sum(self.statements) / self.mails if self.mails else float("nan")

    @property
    def per_mail_net(self) -> float:
        idle = sum(self.idle_statements) * self.window_s
        return (sum(self.statements) - idle) / self.mails if self.mails else float("nan")


async def run_configuration(
    count: int,
    args: argparse.Namespace,
    dovecot: DovecotServer,
    ca: CA,
    layout: Layout,
    admin: Engine,
) -> Result:
    """One instance count on a new database; the database and files are removed after."""
    result = Result(count, args.mails)
    name = f"mb_bench_{count}_{secrets.token_hex(4)}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    engine = create_engine(url, pool_pre_ping=True)
    workdir = Path(tempfile.mkdtemp(prefix="mailbridge-bench."))
    try:
        async with FakeBotApi() as botapi, httpx.AsyncClient() as client:
            config = workdir / "mailbridge.toml"
            write_config(config, args, url, layout, dovecot, ca, botapi)
            await migrate(config, workdir)
            try:
                await measure(result, args, config, workdir, engine, dovecot, layout, client, name)
                carry(result, engine, botapi)
            finally:  # stopped while the fake Bot API still answers
                instances = result.instances
                result.exits = list(await asyncio.gather(*(i.stop() for i in instances)))
                result.logs = [inst.log_counts() for inst in instances]
    finally:
        engine.dispose()
        if args.keep:
            print(f"kept: logs in {workdir}, database {name}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    return result


async def measure(
    result: Result,
    args: argparse.Namespace,
    config: Path,
    workdir: Path,
    engine: Engine,
    dovecot: DovecotServer,
    layout: Layout,
    client: httpx.AsyncClient,
    database: str,
) -> None:
    """Start the instances, let them settle, then the idle window and the load."""
    instances = result.instances
    for number in range(1, result.count + 1):
        instances.append(await start_instance(number, config, workdir))
        if args.stagger:
            await asyncio.sleep(args.stagger)
    result.settle_s = await wait_settled(instances, client, engine, layout, args)
    await asyncio.sleep(args.quiet)
    note_instances(instances, engine, "settled")
    await measure_scrape_cost(instances, client)

    # Idle: no mail; what lease renewals and the idle loops cost.
    before = await scrape_all(instances, client)
    await asyncio.sleep(args.idle_window)
    after = await scrape_all(instances, client)
    result.idle_statements = [
        (a.statements - b.statements - inst.scrape_cost) / args.idle_window
        for inst, b, a in zip(instances, before, after, strict=True)
    ]

    # Load: every mail delivered as fast as one connection per user allows.
    plan = load_plan(args, layout)
    before = await scrape_all(instances, client)
    cpu_before = cpu_times()
    load_before = os.getloadavg()[0]
    result.first_sent = time.monotonic()
    for done in await asyncio.gather(
        *(
            asyncio.to_thread(append_all, dovecot, user, batches)
            for user, batches in zip(layout.users, plan, strict=True)
            if batches
        )
    ):
        result.appended.update(done)
    result.append_s = max(result.appended.values()) - result.first_sent
    deadline = time.monotonic() + args.timeout
    while await asyncio.to_thread(delivered, engine) < args.mails:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)  # the last mails' counters follow their database write
    after = await scrape_all(instances, client)
    result.window_s = time.monotonic() - result.first_sent
    cpu_after = cpu_times()
    result.load_average = (load_before, os.getloadavg()[0])
    bridges = {inst.proc.pid for inst in instances}
    master = dovecot.pid
    kinds = {pid: cpu_kind(pid, bridges, master, database) for pid in cpu_after}
    result.cpu, result.others = cpu_spent(cpu_before, cpu_after, kinds)
    result.posted = [a.posted - b.posted for b, a in zip(before, after, strict=True)]
    result.statements = [
        a.statements - b.statements - inst.scrape_cost
        for inst, b, a in zip(instances, before, after, strict=True)
    ]
    note_instances(instances, engine, "loaded")
    await trickle(result, args, engine, dovecot, layout)


async def trickle(
    result: Result,
    args: argparse.Namespace,
    engine: Engine,
    dovecot: DovecotServer,
    layout: Layout,
) -> None:
    """Single mails one after the other (--trickle, --trickle-gap s apart) into random
    folders, each noted with whether the folder's lease and its chat's lease were held by the
    same instance at that moment; waits (bounded) until all are posted."""
    rng = random.Random(args.seed)
    tag = secrets.token_hex(3)
    for j in range(args.trickle):
        await asyncio.sleep(args.trickle_gap)
        user = rng.randrange(len(layout.users))
        folder = rng.choice(layout.folders[user])
        subject = f"Trickle {tag} t{j:03d} {user:02d}/{folder}"
        account = layout.users[user]
        await asyncio.to_thread(
            dovecot.append, account.name, account.password, make_mail(subject), folder
        )
        appended = time.monotonic()
        leases = await asyncio.to_thread(read_leases, engine)
        folder_holder = leases.get(f"folder:a{user:02d}/{folder}")
        chat_holder = leases.get(f"chat:{CHAT_BASE + user}")
        if chat_holder is None:
            meeting = "chat free"
        elif chat_holder == folder_holder:
            meeting = "same instance"
        else:
            meeting = "other instance"
        result.trickle[subject] = (appended, meeting)
    deadline = time.monotonic() + args.timeout
    while await asyncio.to_thread(delivered, engine) < result.mails + args.trickle:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)


def note_instances(instances: list[Instance], engine: Engine, moment: str) -> None:
    """Leases held and VmRSS of every instance now."""
    found = leases_by_instance(engine, instances)
    for inst in instances:
        inst.leases[moment] = found[inst.number]
        inst.rss[moment] = vm_rss_mb(inst.proc.pid)
    if found.get(0):
        print(f"NOTE ({moment}): leases held by none of the instances: {found[0]}")


def carry(result: Result, engine: Engine, botapi: FakeBotApi) -> None:
    """Each mail's carrying sendMessage, from the database's delivery rows and the fake."""
    carried_by = carriers(engine)
    sends = {
        (int(call.params["chat_id"]), int(call.result["message_id"])): call.time
        for call in botapi.calls("sendMessage", ok_only=True)
        if isinstance(call.result, dict)
    }
    wall = time.time() - time.monotonic()  # monotonic + wall = Unix time
    appended = result.appended
    for subject, (chat, message, created, sent) in carried_by.items():
        if subject not in appended or (chat, message) not in sends:
            continue
        result.carried += 1
        result.delays.append(sends[chat, message] - appended[subject])
        result.to_row.append(created - (appended[subject] + wall))
        result.row_to_sent.append(sent - created)
        result.span_s = max(result.span_s, sends[chat, message] - result.first_sent)
    result.messages = len({carried_by[s][:2] for s in carried_by if s in appended})
    for subject, (appended_at, meeting) in result.trickle.items():
        if subject not in carried_by or carried_by[subject][:2] not in sends:
            continue
        delay = sends[carried_by[subject][:2]] - appended_at
        result.trickle_delays.setdefault(meeting, []).append(delay)
        result.trickle_delays.setdefault("all", []).append(delay)


def leases_text(found: Counter[str]) -> str:
    return "/".join(f"{found.get(kind, 0)}" for kind in LEASE_KINDS)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> str:
    """median / max, for a table cell."""
    return f"{median(values):.2f} / {max(values, default=float('nan')):.2f}"


def report(args: argparse.Namespace, layout: Layout, results: list[Result]) -> None:
    how = (
        "each folder's share in one MULTIAPPEND"
        if args.append == "multi"
        else "one APPEND each, interleaved over the folders"
    )
    print()
    print(
        f"{layout.total} folders ({len(layout.users)} accounts x "
        f"{'/'.join(sorted({str(len(f)) for f in layout.folders}))}), imap.max_connections "
        f"{args.budget}, chat_interval {args.chat_interval:g} s, one chat per account, "
        f"lease_seconds {args.lease_seconds:g}; {args.mails} mails, {how}"
    )
    print(
        "delay: APPEND OK -> the sendMessage carrying the mail at the fake Bot API (s), split "
        "at the delivery row's writing;\nthroughput: mails / (last sendMessage - first APPEND "
        "sent); statements: all instances', per posted mail (net: less the idle rate)"
    )
    print(
        f"{'inst':>4} | {'settle s':>8} | {'idle stmt/s':>11} | {'append s':>8} | "
        f"{'mails/s':>7} | {'p50':>5} | {'p95':>5} | {'max':>5} | {'to row':>11} | "
        f"{'row->sent':>11} | {'posted':>7} | {'msgs':>4} | {'stmt/mail':>9} | {'net':>4}"
    )
    for r in results:
        d = r.delays or [float("nan")]
        print(
            f"{r.count:>4} | {r.settle_s:>8.1f} | {sum(r.idle_statements):>11.1f} | "
            f"{r.append_s:>8.2f} | {r.throughput:>7.1f} | {median(d):>5.2f} | "
            f"{p95(d):>5.2f} | {max(d):>5.2f} | {spread(r.to_row):>11} | "
            f"{spread(r.row_to_sent):>11} | {r.carried:>3}/{r.mails:<3} | "
            f"{r.messages:>4} | {r.per_mail:>9.1f} | {r.per_mail_net:>4.1f}"
        )
    print("(to row, row->sent: median / max)")
    print()
    print(
        "per instance: leases held folder/poll/telegram/chat after settling -> after the load; "
        "VmRSS MiB after settling -> after the load"
    )
    print(
        f"{'inst':>4} | {'#':>2} | {'leases settled':>14} | {'leases loaded':>13} | "
        f"{'posted':>6} | {'stmts load':>10} | {'idle stmt/s':>11} | {'RSS up':>7} | "
        f"{'RSS load':>8} | {'exit':>4} | {'warn/err':>8}"
    )
    for r in results:
        for k, inst in enumerate(r.instances):
            logs = r.logs[k] if k < len(r.logs) else Counter()
            posted = r.posted[k] if k < len(r.posted) else float("nan")
            statements = r.statements[k] if k < len(r.statements) else float("nan")
            idle = r.idle_statements[k] if k < len(r.idle_statements) else float("nan")
            print(
                f"{r.count:>4} | {inst.number:>2} | "
                f"{leases_text(inst.leases.get('settled', Counter())):>14} | "
                f"{leases_text(inst.leases.get('loaded', Counter())):>13} | "
                f"{posted:>6.0f} | {statements:>10.0f} | {idle:>11.1f} | "
                f"{inst.rss.get('settled', float('nan')):>7.1f} | "
                f"{inst.rss.get('loaded', float('nan')):>8.1f} | "
                f"{r.exits[k] if k < len(r.exits) else -1:>4} | "
                f"{logs['WARNING']}/{logs['ERROR'] + logs['CRITICAL']:<6}"
            )
    cores = len(os.sched_getaffinity(0))
    print()
    print(
        f"CPU seconds in the load window (first APPEND -> all posted + 0.5 s), {cores} cores; "
        "other: every other process on the machine"
    )
    print(
        f"{'inst':>4} | {'window s':>8} | "
        + " | ".join(f"{kind:>8}" for kind in CPU_KINDS)
        + f" | {'busy':>5} | {'load avg':>11}"
    )
    for r in results:
        busy = sum(r.cpu.values()) / (cores * r.window_s) if r.window_s else float("nan")
        print(
            f"{r.count:>4} | {r.window_s:>8.1f} | "
            + " | ".join(f"{r.cpu.get(kind, 0.0):>8.1f}" for kind in CPU_KINDS)
            + f" | {busy:>5.0%} | {r.load_average[0]:>4.1f} -> {r.load_average[1]:>4.1f}"
        )
    for r in results:
        top = ", ".join(f"{name} {seconds:.1f}" for name, seconds in r.others.most_common(4))
        print(f"{r.count} instance(s), other: {top or '-'}")
    if args.trickle:
        print()
        print(
            f"Trickle after the burst: {args.trickle} single mails {args.trickle_gap:g} s apart "
            "into random folders; delay APPEND OK -> sendMessage (s), by who held the folder's "
            "and its chat's lease at the APPEND"
        )
        print(
            f"{'inst':>4} | {'posted':>7} | {'p50':>5} | {'p95':>5} | {'max':>5} | "
            f"{'same instance':>18} | {'other instance':>18} | {'chat free':>18}"
        )
        for r in results:
            d = r.trickle_delays.get("all", [])

            def cell(meeting: str, r: Result = r) -> str:
                values = r.trickle_delays.get(meeting, [])
                if not values:
                    return f"{'-':>18}"
                return f"{len(values):>3} x {median(values):>5.2f} / {max(values):>5.2f}"

            print(
                f"{r.count:>4} | {len(d):>3}/{len(r.trickle):<3} | {median(d):>5.2f} | "
                f"{p95(d):>5.2f} | {max(d, default=float('nan')):>5.2f} | "
                f"{cell('same instance')} | {cell('other instance')} | {cell('chat free')}"
            )
        print("(per lease meeting: mails x median / max)")
    notes = [
        f"{r.count} instance(s): {r.carried} of {r.mails} mails carried within the timeout"
        for r in results
        if r.carried < r.mails
    ]
    for note in notes:
        print(f"NOTE: {note}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", default="1,2,3", help="instance counts (1,2,3)")
    parser.add_argument("--mails", type=int, default=600, help="mails per load (600)")
    parser.add_argument("--folders", type=int, default=200, help="watched folders (200)")
    parser.add_argument("--users", type=int, default=10, help="Dovecot users = accounts (10)")
    parser.add_argument(
        "--budget", type=int, default=20, help="imap.max_connections per account (20)"
    )
    parser.add_argument(
        "--poll-interval", type=float, default=60.0, help="imap.poll_interval, s (60)"
    )
    parser.add_argument(
        "--chat-interval", type=float, default=0.0, help="telegram.chat_interval, s (0)"
    )
    parser.add_argument(
        "--append",
        choices=("multi", "single"),
        default="multi",
        help="multi: each folder's mails in one MULTIAPPEND (default); single: one APPEND "
        "per mail, interleaved over the folders",
    )
    parser.add_argument(
        "--trickle", type=int, default=20, help="single mails after the burst (20; 0: none)"
    )
    parser.add_argument("--trickle-gap", type=float, default=3.0, help="seconds between them (3)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the trickle's folders")
    parser.add_argument("--lease-seconds", type=float, default=30.0, help="(30, the default)")
    parser.add_argument(
        "--stagger", type=float, default=0.0, help="seconds between instance starts (0)"
    )
    parser.add_argument("--idle-window", type=float, default=30.0, help="idle window, s (30)")
    parser.add_argument("--quiet", type=float, default=3.0, help="pause after settling, s (3)")
    parser.add_argument(
        "--settle-timeout", type=float, default=180.0, help="bound for settling, s (180)"
    )
    parser.add_argument("--timeout", type=float, default=180.0, help="bound for the load, s")
    parser.add_argument("--log-level", default="WARNING", help="the instances' (WARNING)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the logs and databases (to look into)"
    )
    args = parser.parse_args(argv)
    try:
        args.counts = [int(n) for n in args.instances.split(",")]
    except ValueError:
        parser.error("--instances: comma-separated numbers, e.g. 1,2,3")
    if any(n < 1 for n in args.counts) or args.mails < 1 or args.users < 1:
        parser.error("need instances >= 1, --mails >= 1 and --users >= 1")
    if args.folders < args.users:
        parser.error("--folders must be at least --users")
    return args


async def main(args: argparse.Namespace) -> int:
    ca = CA()
    dovecot = BenchDovecot(ca)
    admin = create_engine(
        make_url(os.environ.get(POSTGRES_VARIABLE, POSTGRES_DEFAULT)),
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": 5},
    )
    results: list[Result] = []
    try:
        dovecot.start()
        print(machine())
        started = time.monotonic()
        layout = await asyncio.to_thread(make_layout, dovecot, args.users, args.folders)
        print(
            f"Dovecot {'.'.join(map(str, dovecot.version))}: {layout.total} folders of "
            f"{len(layout.users)} users ready in {time.monotonic() - started:.1f} s"
        )
        for count in args.counts:
            started = time.monotonic()
            results.append(await run_configuration(count, args, dovecot, ca, layout, admin))
            print(f"{count} instance(s): {time.monotonic() - started:.1f} s")
        report(args, layout, results)
    finally:
        admin.dispose()
        dovecot.cleanup()
        ca.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
