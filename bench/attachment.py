"""A 30 MB attachment sent on demand: the bridge's peak memory, IMAP bytes and time to upload.

Run from the repository root:  .venv/bin/python bench/attachment.py [--size-mb 30]

The servers are the integration tests' (tests/servers/): Dovecot behind a TcpProxy (which
counts the bytes each way) and the fake Bot API, all in this process's event loop. The bridge
runs as a separate process, `python -m bridge run` configured by BRIDGE_* variables like
tests/integration/test_cli.py does, so that its peak RSS (VmHWM of /proc/<pid>/status) holds
the bridge alone, not the servers' memory. It starts on a new database, so it migrates it
first and keeps Alembic loaded (about 12 MB): the first start. --migrated runs `python -m
bridge migrate` before, so that `run` finds the database migrated and never loads Alembic, as
every later start does.

One mail with one attachment of --size-mb random bytes (base64 in the mail) is delivered with
IMAP APPEND straight to Dovecot (not through the proxy: the proxy sees only the bridge's
traffic). Once its summary is posted and the bridge's connections are quiet, the script presses
the summary's "Attachments" button as Telegram would (FakeBotApi.press_button) and measures:

* seconds from the press to the sendDocument call arriving at the fake Bot API (its handler
  starts when the request's headers are in: `Call.time`), and to the upload being received
  whole; the end of the IMAP transfer from a 50 ms sampler of the proxy's byte counts;
* the bridge's peak RSS (VmHWM) after start-up, before the press and after the upload, and the
  highest VmRSS the sampler saw during the press (target: peak <= 120 MB, counted as the
  bridge counts sizes, 2**20 bytes: 120 MiB; the decimal figure is printed too);
* IMAP bytes the server sent through the proxy between the press and the upload (TLS records
  included) against the part's encoded size as BODYSTRUCTURE gives it (target <= 1.1x);
* that the uploaded bytes equal the original attachment and that its name was kept.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import machine  # noqa: E402
from tests.integration.conftest import OWNER  # noqa: E402
from tests.servers.botapi import Call, FakeBotApi  # noqa: E402
from tests.servers.certs import CA  # noqa: E402
from tests.servers.dovecot import DovecotServer, MailUser  # noqa: E402
from tests.servers.tcpproxy import TcpProxy  # noqa: E402

MB = 1_048_576
# The "120 MB", in the bridge's own unit (format_size, upload_limit_mb: 2**20 bytes).
RSS_TARGET_MB = 120.0
BYTES_TARGET = 1.1
FILENAME = "measurements-2026.bin"


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (kB) of a process."""
    found: dict[str, int] = {}
    with Path(f"/proc/{pid}/status").open(encoding="ascii") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0])
    return found


def mib(kb: int) -> float:
    return kb / 1024


def make_mail(subject: str, data: bytes) -> bytes:
    """A short text mail with `data` attached (base64, as mail clients send binaries)."""
    msg = EmailMessage()
    msg["From"] = "Ann Example <ann@example.org>"
    msg["To"] = "me@example.org"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{secrets.token_hex(8)}@example.org>"
    msg["Date"] = "Mon, 03 Jun 2024 10:00:00 +0000"
    msg.set_content("Hello,\n\nthe measurements are attached.\n\nAnn\n")
    msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=FILENAME)
    return msg.as_bytes()


def encoded_part(dovecot: DovecotServer, user: MailUser, uid: int) -> tuple[str, int, int]:
    """(section, encoded octets, whole mail octets) of the biggest part, from the server."""
    client = dovecot.connect(user.name, user.password)
    try:
        client.select_folder("INBOX", readonly=True)
        data = client.fetch([uid], ["BODYSTRUCTURE", "RFC822.SIZE"])[uid]
    finally:
        client.logout()
    structure, whole = data[b"BODYSTRUCTURE"], int(data[b"RFC822.SIZE"])
    leaves: list[tuple[str, int]] = []

    def walk(part: Any, section: str) -> None:
        if part.is_multipart:
            for n, child in enumerate(part[0], 1):
                walk(child, f"{section}.{n}" if section else str(n))
        else:
            leaves.append((section or "1", int(part[6])))

    walk(structure, "")
    section, size = max(leaves, key=lambda leaf: leaf[1])
    return section, size, whole


def bridge_env(
    dovecot_port: int, user: MailUser, ca: CA, botapi: FakeBotApi, log_level: str
) -> dict[str, str]:
    """The bridge's environment: this one without BRIDGE_*, plus settings for the servers."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BRIDGE_")}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "BRIDGE_LOG_LEVEL": log_level,
            "BRIDGE_TELEGRAM__TOKEN": botapi.token,
            "BRIDGE_TELEGRAM__API_URL": botapi.url,
            "BRIDGE_TELEGRAM__ALLOWED_USER_IDS": f"[{OWNER}]",
            "BRIDGE_TELEGRAM__CHAT_INTERVAL": "0",
            "BRIDGE_IMAP__HOST": "127.0.0.1",
            "BRIDGE_IMAP__PORT": str(dovecot_port),
            "BRIDGE_IMAP__USERNAME": user.name,
            "BRIDGE_IMAP__PASSWORD": user.password,
            "BRIDGE_IMAP__CA_FILE": str(ca.ca_file),
            "BRIDGE_IMAP__POLL_INTERVAL": "0.5",
            "BRIDGE_SMTP__HOST": "127.0.0.1",
            "BRIDGE_SMTP__PORT": "1",
            "BRIDGE_SMTP__CA_FILE": str(ca.ca_file),
        }
    )
    return env


class Bridge:
    """`python -m bridge run` in a child process; its stderr kept line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace"))

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    async def wait_for_line(self, needle: str, within: float = 30.0) -> None:
        """Wait (bounded) until a stderr line contains `needle`."""
        deadline = time.monotonic() + within
        while not any(needle in line for line in self.lines):
            if self.proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bridge did not log {needle!r}:\n{self.stderr}")
            await asyncio.sleep(0.05)

    async def stop(self) -> int:
        """SIGTERM, bounded wait, SIGKILL as the fallback; the exit status."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._reader, 5)
        assert self.proc.returncode is not None
        return self.proc.returncode


async def migrate(env: dict[str, str], workdir: Path) -> None:
    """`python -m bridge migrate` on the bridge's database, in its own process (bounded)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "migrate",
        env=env,
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
        raise RuntimeError(f"bridge migrate exited {proc.returncode}:\n{output.decode()}")


async def summary_call(botapi: FakeBotApi, subject: str, within: float) -> Call:
    """The sendMessage that posted the summary of `subject` (bounded wait)."""
    async with asyncio.timeout(within):
        while True:
            for call in botapi.calls("sendMessage", ok_only=True):
                if f"<b>{subject}</b>" in str(call.params.get("text")):
                    return call
            await botapi.next_call("sendMessage", timeout=within, ok_only=True)


def attachments_button(call: Call) -> str:
    """The callback data of the summary's "Attachments" button."""
    markup = call.params.get("reply_markup") or {}
    found = [
        button["callback_data"]
        for row in markup.get("inline_keyboard", [])
        for button in row
        if "attachment" in button["text"].lower()
    ]
    if len(found) != 1:
        raise RuntimeError(f"no single Attachments button in {markup}")
    return str(found[0])


async def sample(
    pid: int, proxy: TcpProxy, out: list[tuple[float, int, int]], stop: asyncio.Event
) -> None:
    """Every 50 ms: (monotonic time, VmRSS kB, IMAP bytes from the server so far)."""
    while not stop.is_set():
        with contextlib.suppress(OSError):
            out.append((time.monotonic(), proc_status(pid)["VmRSS"], proxy.bytes_from_server))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)


async def run(args: argparse.Namespace, dovecot: DovecotServer, ca: CA, workdir: Path) -> int:
    user = MailUser(f"att{secrets.token_hex(3)}", secrets.token_urlsafe(12))
    dovecot.add_user(user.name, user.password)
    data = secrets.token_bytes(int(args.size_mb * MB))
    subject = f"Bench attachment {secrets.token_hex(4)}"
    raw = make_mail(subject, data)
    failures: list[str] = []
    async with FakeBotApi() as botapi, TcpProxy(dovecot.host, dovecot.port) as proxy:
        env = bridge_env(proxy.port, user, ca, botapi, args.log_level)
        if args.migrated:
            await migrate(env, workdir)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge",
            "run",
            env=env,
            cwd=workdir,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        bridge = Bridge(proc)
        try:
            await bridge.wait_for_line("first contact with")
            await proxy.quiet(1.0, timeout=30)
            started = proc_status(proc.pid)

            t_append = time.monotonic()
            uid = await asyncio.to_thread(dovecot.append, user.name, user.password, raw)
            appended = time.monotonic() - t_append
            section, encoded, whole = await asyncio.to_thread(encoded_part, dovecot, user, uid)
            summary = await summary_call(botapi, subject, within=60)
            posted = summary.time - t_append
            message_id = int(summary.result["message_id"])
            press_data = attachments_button(summary)
            await proxy.quiet(1.0, timeout=30)
            before = proc_status(proc.pid)
            summary_bytes = proxy.bytes_from_server

            samples: list[tuple[float, int, int]] = []
            stop_sampling = asyncio.Event()
            sampler = asyncio.create_task(sample(proc.pid, proxy, samples, stop_sampling))
            docs = len(botapi.calls("sendDocument"))
            from_server, from_client = proxy.bytes_from_server, proxy.bytes_from_client
            t_press = time.monotonic()
            botapi.press_button(OWNER, OWNER, message_id, press_data)
            call = await botapi.next_call("sendDocument", timeout=args.timeout)
            t_received = time.monotonic()
            fetched = proxy.bytes_from_server - from_server
            sent_up = proxy.bytes_from_client - from_client
            stop_sampling.set()
            await sampler
            after = proc_status(proc.pid)
            if len(botapi.calls("sendDocument")) != docs + 1:
                failures.append("more than one sendDocument")
        finally:
            code = await bridge.stop()
        if "Traceback" in bridge.stderr:
            failures.append("the bridge logged a traceback")

    document = call.params.get("document")
    uploaded = getattr(document, "data", b"")
    name = getattr(document, "filename", None)
    same = uploaded == data
    if not call.ok:
        failures.append(f"sendDocument answered {call.status}")
    if not same:
        failures.append(f"uploaded bytes differ ({len(uploaded)} vs {len(data)})")
    if name != FILENAME:
        failures.append(f"file name {name!r}, not {FILENAME!r}")
    moved = [t for (t, _, b), (_, _, b0) in zip(samples[1:], samples, strict=False) if b != b0]
    fetch_end = (max(moved) - t_press) if moved else float("nan")
    peak_sampled = max((rss for _, rss, _ in samples), default=0)
    peak = max(after["VmHWM"], before["VmHWM"])
    ratio = fetched / encoded

    print()
    print(f"Attachment on demand ({args.size_mb:g} MB of random bytes, base64 in the mail)")
    print(machine())
    version = ".".join(map(str, dovecot.version))
    database = "migrated before (no Alembic)" if args.migrated else "new (migrated by run)"
    print(
        f"Dovecot {version}; the bridge: `python -m bridge run`, pid {proc.pid}; "
        f"database {database}"
    )
    print(
        f"mail: {whole:,} octets; part {section}: {encoded:,} octets encoded, "
        f"{len(data):,} decoded; APPEND {appended:.1f} s, summary posted {posted:.1f} s "
        f"after APPEND began ({summary_bytes:,} IMAP bytes to the bridge since start)"
    )
    print()
    print(
        f"{'press -> sendDocument at the Bot API (headers in)':<52}{call.time - t_press:>9.2f} s"
    )
    print(f"{'press -> upload received whole':<52}{t_received - t_press:>9.2f} s")
    print(f"{'press -> last IMAP bytes (50 ms sampler)':<52}{fetch_end:>9.2f} s")
    print(
        f"{'IMAP bytes from the server during the press':<52}{fetched:>12,}"
        f"  = {ratio:.3f}x the encoded part (target <= {BYTES_TARGET}x)"
    )
    print(f"{'IMAP bytes to the server during the press':<52}{sent_up:>12,}")
    print(f"{'bridge VmHWM after start-up (idle)':<52}{mib(started['VmHWM']):>9.1f} MiB")
    print(
        f"{'bridge VmHWM before the press (summary posted)':<52}{mib(before['VmHWM']):>9.1f} MiB"
    )
    print(f"{'bridge VmRSS before the press':<52}{mib(before['VmRSS']):>9.1f} MiB")
    print(f"{'bridge VmRSS peak seen during the press (50 ms)':<52}{mib(peak_sampled):>9.1f} MiB")
    print(
        f"{'bridge VmHWM after the upload':<52}{mib(after['VmHWM']):>9.1f} MiB"
        f"  = {after['VmHWM'] * 1024 / 1e6:.1f} MB decimal (target <= {RSS_TARGET_MB:g} MiB)"
    )
    print(f"{'bridge VmRSS after the upload':<52}{mib(after['VmRSS']):>9.1f} MiB")
    print(f"uploaded bytes equal the original: {same}; name {name!r}; bridge exit status {code}")
    if mib(peak) > RSS_TARGET_MB:
        failures.append(f"peak RSS {mib(peak):.1f} MiB > {RSS_TARGET_MB:g}")
    if ratio > BYTES_TARGET:
        failures.append(f"IMAP bytes {ratio:.3f}x > {BYTES_TARGET}x")
    if args.timeline:
        print("\ntimeline (s after press, VmRSS MiB, IMAP MB from the server since the press)")
        for t, rss, b in samples[:: max(1, len(samples) // 60)]:
            print(f"{t - t_press:8.2f} {mib(rss):8.1f} {(b - from_server) / MB:8.2f}")
    for failure in failures:
        print(f"MISSED: {failure}")
    return 1 if failures else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=30, help="attachment size, MiB (30)")
    parser.add_argument("--timeout", type=float, default=300, help="bound for the press, s")
    parser.add_argument("--timeline", action="store_true", help="print the RSS/bytes samples")
    parser.add_argument(
        "--migrated",
        action="store_true",
        help="migrate the database first (`bridge migrate`): run then never loads Alembic",
    )
    parser.add_argument("--log-level", default="INFO", help="the bridge's log level (INFO)")
    args = parser.parse_args(argv)
    if not 0 < args.size_mb <= 45:
        parser.error("--size-mb must be within (0, 45]: the fake Bot API takes up to 50 MB")
    return args


async def main(args: argparse.Namespace) -> int:
    ca = CA()
    dovecot = DovecotServer(ca)
    workdir = Path(tempfile.mkdtemp(prefix="mailbridge-bench."))
    try:
        dovecot.start()
        return await run(args, dovecot, ca, workdir)
    finally:
        dovecot.cleanup()
        ca.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
