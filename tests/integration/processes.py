"""The real `python -m bridge` as a subprocess: its environment, its stderr line by line."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.conftest import OWNER

COMMAND = [sys.executable, "-m", "bridge"]


@dataclass
class Instance:
    """One running bridge process and what it has written to stderr so far."""

    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            self.lines.append(raw.decode("utf-8", "replace").rstrip())
            self._changed.set()
        self._changed.set()  # the end of stderr: waiters look at the exit

    async def wait_line(self, pattern: str, timeout: float = 20.0, start: int = 0) -> str:
        """The first stderr line from index `start` on matching `pattern` (bounded wait)."""
        regex = re.compile(pattern)
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines[start:]:
                    if regex.search(line):
                        return line
                if self._reader is not None and self._reader.done():
                    raise AssertionError(f"exited before {pattern!r}:\n" + "\n".join(self.lines))
                self._changed.clear()
                await self._changed.wait()

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as a crash or a power cut."""
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: frozen with its sockets open and its pid alive (a long GC or VM pause)."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        self.process.send_signal(signal.SIGCONT)

    @property
    def running(self) -> bool:
        """Not exited (yet)."""
        return self.process.returncode is None

    def tail(self, n: int = 30) -> str:
        """The last n stderr lines, for failure messages."""
        return "\n".join(self.lines[-n:])

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait (bounded); the exit status."""
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), timeout)


async def start(env: dict[str, str], *args: str) -> Instance:
    """Start `mailbridge run` (or `args`) with this environment."""
    process = await asyncio.create_subprocess_exec(
        *COMMAND,
        *(args or ("run",)),
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    instance = Instance(process)
    instance._reader = asyncio.create_task(instance._read())
    return instance


def base_env(**extra: str) -> dict[str, str]:
    """The test's environment without any BRIDGE_* variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BRIDGE_")}
    env.update(extra)
    return env


def make_env(
    *, dovecot=None, user=None, ca=None, botapi=None, smtpd=None, **extra: str | None
) -> dict[str, str]:
    """The process environment: the test's, minus any BRIDGE_*, plus settings for the servers.

    `extra` overrides (a value of None removes the variable).
    """
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BRIDGE_")}
    if botapi is not None:
        env["BRIDGE_TELEGRAM__TOKEN"] = botapi.token
        env["BRIDGE_TELEGRAM__API_URL"] = botapi.url
    else:
        env["BRIDGE_TELEGRAM__TOKEN"] = "1:unused"
        env["BRIDGE_TELEGRAM__API_URL"] = "http://127.0.0.1:1"
    env["BRIDGE_TELEGRAM__ALLOWED_USER_IDS"] = f"[{OWNER}]"
    if dovecot is not None:
        env["BRIDGE_IMAP__HOST"] = "127.0.0.1"
        env["BRIDGE_IMAP__PORT"] = str(dovecot.port)
        env["BRIDGE_IMAP__POLL_INTERVAL"] = "0.5"
    if user is not None:
        env["BRIDGE_IMAP__USERNAME"] = user.name
        env["BRIDGE_IMAP__PASSWORD"] = user.password
    if ca is not None:
        env["BRIDGE_IMAP__CA_FILE"] = str(ca.ca_file)
        env["BRIDGE_SMTP__CA_FILE"] = str(ca.ca_file)
    env["BRIDGE_SMTP__HOST"] = "127.0.0.1"
    env["BRIDGE_SMTP__PORT"] = "1"
    if smtpd is not None:
        env["BRIDGE_SMTP__PORT"] = str(smtpd.port)
        env["BRIDGE_SMTP__USERNAME"] = smtpd.username
        env["BRIDGE_SMTP__PASSWORD"] = smtpd.password
        env["BRIDGE_SMTP__SECURITY"] = smtpd.tls
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO) ")


def one_line_error(stderr: str) -> str:
    """The message of a failed command: exactly one line besides DEBUG/INFO log lines, no
    traceback (at the default log level `migrate` and `run` log what Alembic does)."""
    assert "Traceback" not in stderr
    lines = [line for line in stderr.strip().splitlines() if not LOG_LINE.match(line)]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("mailbridge: "), stderr
    return lines[0]


class Service:
    """A `mailbridge run` subprocess whose stderr is collected line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            async with self._changed:
                self.lines.append(raw.decode(errors="replace"))
                self._changed.notify_all()

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    async def wait_for_line(self, needle: str, timeout: float = 20.0) -> None:
        """Wait (bounded) until a stderr line contains `needle`."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(
                    lambda: any(needle in line for line in self.lines) or self._reader.done()
                )
        except TimeoutError:
            raise TimeoutError(
                f"{needle!r} not logged within {timeout} s:\n{self.stderr}"
            ) from None
        assert any(needle in line for line in self.lines), self.stderr

    async def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM, then wait (bounded) for the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._reader, 5)
        return code


@contextlib.asynccontextmanager
async def service(env: dict[str, str], cwd: Path) -> AsyncIterator[Service]:
    """`mailbridge run` for the duration of the block (killed if the block fails)."""
    proc = await asyncio.create_subprocess_exec(
        *COMMAND,
        "run",
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    svc = Service(proc)
    try:
        yield svc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        svc._reader.cancel()
