"""A throwaway PostgreSQL cluster for tests that restart the database server itself.

`initdb` into a temp dir (trust auth, UTF8, no locale), `postgres` on a free loopback port with
fsync off (a test database need not survive a power cut), its Unix socket in the same dir.
initdb refuses to run as root, so root runs the cluster as the `postgres` user (as
scripts/test.sh does). Every wait is bounded: pg_ctl -w -t, and subprocess timeouts.

    with PostgresServer() as server:
        server.create_database("bridge")
        url = server.url_for("bridge")
        server.restart()                    # PostgreSQL itself goes down and comes back
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import psycopg
import pytest

from tests.servers.dovecot import free_port

SUPERUSER = "postgres"
RUN_AS = "postgres"  # the system user that owns the cluster when the tests run as root
START_TIMEOUT = 60  # seconds pg_ctl waits for the server to accept connections (or to stop)


def postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin with initdb and pg_ctl, if any."""
    found = [
        path
        for path in Path("/usr/lib/postgresql").glob("*/bin")
        if (path / "initdb").is_file() and (path / "pg_ctl").is_file()
    ]
    if not found:
        return None

    def version(path: Path) -> tuple[int, ...]:
        name = path.parent.name
        return tuple(int(p) for p in name.split(".") if p.isdigit()) or (0,)

    return max(found, key=version)


class PostgresError(RuntimeError):
    """initdb or pg_ctl failed; the message carries its output and the server log's tail."""


class PostgresServer:
    """One PostgreSQL cluster in a temp dir, on 127.0.0.1:<free port>."""

    def __init__(self) -> None:
        """Find the binaries (skip the test without them) and pick a dir and a port."""
        bin_dir = postgres_bin()
        if bin_dir is None:
            pytest.skip(
                "PostgreSQL binaries not found in /usr/lib/postgresql/*/bin: "
                "scripts/test.sh installs them (apt-get install postgresql)"
            )
        self.bin = bin_dir
        self.as_root = os.getuid() == 0
        self.dir = Path(tempfile.mkdtemp(prefix="mailbridge-pg."))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.host = "127.0.0.1"
        self.port = free_port()
        self.restarts = 0
        self._initialised = False

    # Lifecycle

    def start(self) -> None:
        """initdb on first use, then start the server and wait (bounded) until it accepts."""
        if not self._initialised:
            if self.as_root:
                shutil.chown(self.dir, RUN_AS, RUN_AS)
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
            )
            self._initialised = True
        options = f"-h {self.host} -p {self.port} -k {self.dir} -F"
        self._pg_ctl("start", "-l", str(self.log), "-o", options)
        self._wait_accepting()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` (sessions ended, clean shutdown) or `immediate` (as a
        crash: no shutdown checkpoint, recovery at the next start)."""
        self._pg_ctl("stop", "-m", mode)

    def restart(self, mode: str = "immediate") -> float:
        """PostgreSQL itself goes down (every session is cut) and comes back; the seconds it
        was unreachable."""
        began = time.monotonic()
        self.stop(mode)
        self.start()
        self.restarts += 1
        return time.monotonic() - began

    @property
    def running(self) -> bool:
        """Whether the postmaster runs (pg_ctl status)."""
        return self._pg_ctl("status", check=False).returncode == 0

    def cleanup(self) -> None:
        """Stop the server if it runs (immediately: its data is thrown away) and remove it."""
        if self._initialised and (self.data / "postmaster.pid").exists():
            self._pg_ctl("stop", "-m", "immediate", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        """Start."""
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop and remove."""
        self.cleanup()

    # Databases

    def url_for(self, database: str = "postgres", *, port: int | None = None) -> str:
        """A SQLAlchemy/libpq URL for `database` (on `port`: a proxy in front of the server)."""
        return f"postgresql://{SUPERUSER}@{self.host}:{port or self.port}/{database}"

    @property
    def url(self) -> str:
        """The URL of the maintenance database."""
        return self.url_for()

    def connect(self, database: str = "postgres", timeout: int = 5) -> psycopg.Connection:
        """A direct autocommit connection (not through any proxy); the caller closes it."""
        return psycopg.connect(self.url_for(database), autocommit=True, connect_timeout=timeout)

    def create_database(self, name: str) -> str:
        """CREATE DATABASE name; its URL."""
        with contextlib.closing(self.connect()) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # name is the test's own constant
        return self.url_for(name)

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server log (for failure messages)."""
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # Internals

    def _wait_accepting(self) -> None:
        """pg_ctl -w saw the server up; a TCP login proves it (bounded)."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self.connect(timeout=2).close()
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise PostgresError(
                        f"PostgreSQL on {self.host}:{self.port} refuses logins: {exc}\n"
                        f"{self.log_tail()}"
                    ) from None
                time.sleep(0.1)  # polling a server we just started, bounded above

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run(
            "pg_ctl", "-D", str(self.data), "-w", "-t", str(START_TIMEOUT), *args, check=check
        )

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / tool), *args]
        if self.as_root:
            command = ["runuser", "-u", RUN_AS, "--", *command]
        # Server output goes to its log file (-l), never to our pipes: a pipe the postmaster
        # kept open would hold run() until the timeout.
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT + 30,
            check=False,
            cwd=self.dir,
        )
        if check and result.returncode != 0:
            raise PostgresError(
                f"{tool} {' '.join(args)} exited {result.returncode}: "
                f"{(result.stdout + result.stderr).strip()}\n{self.log_tail()}"
            )
        return result
