"""Who does what when several instances share one database: a lease per piece of work.

A lease is a row (name, holder, token, expires_at) in the database. An instance takes a lease
that is free or expired, and renews it every third of BRIDGE_LEASE_SECONDS while it works; an
instance that dies stops renewing, and another takes the work over once the lease expired.
Instances with the same work share it evenly: each keeps an `instance:` row alive and holds at
most its share of the leases, handing the rest over (work stopped first, then the lease
released), so a kill interrupts only part of the work. Every new holder gets a larger fencing
token: writes that only the holder may make (a folder's cursor, a chat's delivered mail) check
it in the same transaction, so an instance that was paused past its lease cannot write after
another took over. Nothing here relies on in-process
locks for correctness across instances; with one instance every lease is simply its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from bridge import metrics
from bridge.db import store
from bridge.db.engine import UNAVAILABLE, Database, unavailable_reason

logger = logging.getLogger(__name__)


def instance_id() -> str:
    """This instance's name in lease rows: host, pid and a random part (pids are reused), so
    that an instance on the same host can tell at once when the holder died."""
    return store.new_holder()


NAME_MAX = 300  # the lease table's name column


def lease_name(name: str) -> str:
    """`name`, or when it is longer than the column (a folder name may have 1,000
    characters) its kind and a digest of the rest: the same on every instance."""
    if len(name) <= NAME_MAX:
        return name
    kind, _, rest = name.partition(":")
    return f"{kind}:#{hashlib.sha256(rest.encode()).hexdigest()}"


class Held(NamedTuple):
    """A lease this instance holds: its name, holder and fencing token."""

    name: str
    holder: str
    token: int


Work = Callable[[asyncio.Event, Held], Coroutine[object, object, None]]


class Leases:
    """Runs each piece of work only while this instance holds its lease."""

    def __init__(self, db: Database, seconds: float, holder: str | None = None) -> None:
        self.db, self.seconds = db, seconds
        self.holder = holder or instance_id()
        self._work: dict[str, Work] = {}
        self._running: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = {}
        self.held: dict[str, Held] = {}
        self.valid_until: dict[str, float] = {}  # monotonic time each held lease ends
        self.changes = 0  # leases taken over or lost, for metrics and tests
        self.instances = 1  # live instances sharing the work (the last round's count)
        self.settled = asyncio.Event()  # the first round is done (tests, benchmarks)
        self._crashed: list[asyncio.Task[None]] = []  # work that raised: run() raises it
        self._woken = asyncio.Event()

    def add(self, name: str, work: Work) -> None:
        """Run `work(stop, held)` whenever this instance holds lease `name`."""
        self._work[name] = work

    async def take(self, name: str) -> Held | None:
        """Take or renew one lease now; None when another instance holds it."""
        until = datetime.now(UTC) + timedelta(seconds=self.seconds)
        started = time.monotonic()
        token = await self.db.run(store.take_lease, name, self.holder, until)
        if token is None:
            self.valid_until.pop(name, None)
            return None
        self.valid_until[name] = started + self.seconds
        held = Held(name, self.holder, token)
        if name not in self._work:
            self.held[name] = held  # released with the rest at a clean stop
        return held

    async def release(self, name: str) -> None:
        """Give up a lease taken with take() now, so that another instance may take it at once
        (it expires by itself when the database cannot be reached)."""
        self.valid_until.pop(name, None)
        if self.held.pop(name, None) is None:
            return
        try:
            await self.db.run(store.release_leases, [name], self.holder)
        except UNAVAILABLE:
            logger.debug("could not release lease %s; it expires by itself", name)

    async def run(self, stop: asyncio.Event) -> None:
        """Take, renew and release leases until stop is set; start and stop the work."""
        try:
            while not stop.is_set():
                try:
                    await self._round(stop)
                    self.settled.set()
                except UNAVAILABLE as exc:
                    # Without the database no lease can be renewed. Work whose lease runs out
                    # stops (another instance may take over); the rest goes on, so a database
                    # locked for a moment stops nothing.
                    logger.warning(
                        "leases: database unusable (%s); retrying", unavailable_reason(exc)
                    )
                    await self._stop_expiring()
                await self._pause(stop)
                self._raise_crash()
                if stop.is_set():
                    break
        finally:
            await self._stop_all()
            names = list(self.held)
            self.held.clear()
            try:
                await self.db.run(store.release_leases, names, self.holder, leaving=True)
            except UNAVAILABLE:
                logger.warning("could not release leases; they expire by themselves")

    async def _round(self, stop: asyncio.Event) -> None:
        """One transaction renews ours, takes free ones up to our share and names the ones
        beyond it; then the work follows: started, restarted under a new token, stopped."""
        started = time.monotonic()
        until = datetime.now(UTC) + timedelta(seconds=self.seconds)
        plan = await self.db.run(store.lease_round, self.holder, list(self._work), until)
        self.instances = plan.instances
        for name in plan.surplus:  # renewed just now: stop the work, then hand it over
            self.valid_until[name] = started + self.seconds
            if name in self._running:
                await self._stop(name)
            self.held.pop(name, None)
            self.changes += 1
            metrics.LEASE_CHANGES.inc()
            logger.info("handing lease %s over (%d instances share it)", name, plan.instances)
        if plan.surplus:
            await self.db.run(store.release_leases, plan.surplus, self.holder)
            for name in plan.surplus:
                self.valid_until.pop(name, None)
        for name, work in self._work.items():
            if name in plan.surplus:
                continue
            token = plan.held.get(name)
            running = self._running.get(name)
            if running is not None and running[0].done():
                self._running.pop(name)
                running = None
            if token is None:
                self.valid_until.pop(name, None)
                if name in self.held:
                    self.held.pop(name)
                    self.changes += 1
                    metrics.LEASE_CHANGES.inc()
                    logger.warning("lost lease %s to another instance; stopping that work", name)
                if running is not None:
                    await self._stop(name)
                continue
            self.valid_until[name] = started + self.seconds
            held = Held(name, self.holder, token)
            if name not in self.held:
                self.changes += 1
                metrics.LEASE_CHANGES.inc()
                logger.info("took lease %s (token %d)", name, token)
            elif self.held[name].token != token and running is not None:
                # Our lease had expired (a long pause): the work restarts under the new token.
                await self._stop(name)
                running = None
            self.held[name] = held
            if running is None and not stop.is_set():
                work_stop = asyncio.Event()
                task = asyncio.create_task(work(work_stop, held), name=f"lease {name}")
                task.add_done_callback(self._on_done)
                self._running[name] = (task, work_stop)

    async def _pause(self, stop: asyncio.Event) -> None:
        """A third of the lease time, or less when stop is set or leased work raised."""
        waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._woken.wait())}
        try:
            await asyncio.wait(waits, timeout=self.seconds / 3, return_when="FIRST_COMPLETED")
        finally:
            for wait in waits:
                wait.cancel()

    def _on_done(self, task: asyncio.Task[None]) -> None:
        """Note leased work that raised, and wake run() at once."""
        if not task.cancelled() and task.exception() is not None:
            self._crashed.append(task)
            self._woken.set()

    def _raise_crash(self) -> None:
        """Leased work that raised ends run(), like a crash of any other task of the service
        (app.run: one line, exit 1; a refused token: exit 2), not a restart every round."""
        if not self._crashed:
            return
        for name, (task, _) in list(self._running.items()):
            if task.done():  # nothing to stop; _stop() would log the crash a second time
                self._running.pop(name)
        crashed = self._crashed[0]
        error = crashed.exception()
        if error is not None:  # in a group, like a task group's: its traceback stays the work's
            raise BaseExceptionGroup(f"{crashed.get_name()} failed", [error])

    async def _stop(self, name: str) -> None:
        task, work_stop = self._running.pop(name)
        work_stop.set()
        try:
            await asyncio.wait_for(task, timeout=30)
        except TimeoutError:
            logger.warning("work under lease %s did not stop in time", name)
        except Exception:
            logger.exception("work under lease %s failed", name)

    def valid(self, name: str, margin: float = 1.0) -> bool:
        """True while our lease `name` is sure to last another `margin` seconds."""
        return time.monotonic() + margin < self.valid_until.get(name, 0.0)

    async def _stop_expiring(self) -> None:
        for name in list(self._running):
            if not self.valid(name, margin=self.seconds / 3 + 1):
                logger.error("lease %s could not be renewed in time; stopping that work", name)
                self.held.pop(name, None)
                await self._stop(name)

    async def _stop_all(self) -> None:
        for name in list(self._running):
            await self._stop(name)
