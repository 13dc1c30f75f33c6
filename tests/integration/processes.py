"""The real `python -m bridge run` as a subprocess, its stderr read line by line."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from dataclasses import dataclass, field

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
