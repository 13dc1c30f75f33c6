"""A loopback TCP proxy that breaks links on command: cuts, a slow or silent server, no network.

The bridge talks IMAPS to the proxy's port; the bytes go to the real Dovecot untouched (TLS
passes through, so the server certificate still names 127.0.0.1). Everything runs in the test's
event loop: `async with TcpProxy(dovecot.host, dovecot.port) as proxy:`.

The stream is encrypted, so faults are triggered by what can be seen from outside: byte counts,
the next chunk of server data, time. "server" is the server-to-client direction, "client" the
other. Cuts are abrupt (SO_LINGER 0: the peers see a RST, as after a NAT or firewall drop).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

Direction = Literal["server", "client"]
_DIRECTIONS: tuple[Direction, ...] = ("server", "client")

CHUNK = 65_536
# Chunks waiting for their delay, per direction and connection: bounds memory (backpressure).
QUEUE_CHUNKS = 64
MAX_CONNECTIONS = 64
CONNECT_TIMEOUT = 5.0


def _check_direction(direction: str) -> Direction:
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}: {direction!r}")
    return direction  # type: ignore[return-value]


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close with RST (SO_LINGER 0), dropping anything still buffered."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass
class _Trigger:
    """A one-shot fault armed by the test; `fired` is set when it happened."""

    fired: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _CutAfter(_Trigger):
    limit: int = 0
    direction: Direction = "server"


@dataclass
class _OnNextData(_Trigger):
    """Acts on the next chunk from the server on one of the connections open when armed."""

    connections: frozenset[int] = frozenset()
    # Empty: cut the connection. Else (offset, pause): the bytes from offset on wait `pause`
    # seconds more than the piece before them.
    splits: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class _Item:
    """One piece of a chunk on its way: forwarded after `pause` and the delay, or a cut."""

    received: float
    data: bytes
    pause: float = 0.0
    cut: asyncio.Event | None = None  # set: write data, then cut the connection


class _Connection:
    """One accepted client and its upstream connection; two pumps, one per direction."""

    def __init__(
        self,
        proxy: TcpProxy,
        number: int,
        client: asyncio.StreamWriter,
        upstream: asyncio.StreamWriter,
    ) -> None:
        self.proxy = proxy
        self.number = number
        self.client = client
        self.upstream = upstream
        self.carried: dict[Direction, int] = {"server": 0, "client": 0}
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = False

    def cut(self) -> None:
        """Abort both sides at once (RST) and stop the pumps."""
        if not self.closed:
            self.closed = True
            _reset(self.client)
            _reset(self.upstream)
            self._cancel_tasks()

    def close(self) -> None:
        """An orderly close after one side ended its stream (FIN both ways)."""
        if not self.closed:
            self.closed = True
            self.client.close()
            self.upstream.close()
            self._cancel_tasks()

    def _cancel_tasks(self) -> None:
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()

    async def pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: Direction
    ) -> None:
        """Read chunks, apply the armed faults, queue them for the sender (bounded queue)."""
        queue: asyncio.Queue[_Item | None] = asyncio.Queue(QUEUE_CHUNKS)
        sender = asyncio.create_task(self._send(queue, writer, direction))
        self.tasks.append(sender)
        loop = asyncio.get_running_loop()
        try:
            while not self.closed:
                data = await reader.read(CHUNK)
                if not data:
                    break
                self.proxy._activity(direction, len(data))
                items = self._apply_faults(loop.time(), data, direction)
                for item in items:
                    await queue.put(item)
                if self.closed or any(item.cut for item in items):
                    return  # the sender cuts after writing what came before
        except OSError:
            pass  # reset by a peer: the sender closes the other side once it is flushed
        if not self.closed:
            await queue.put(None)

    def _apply_faults(self, now: float, data: bytes, direction: Direction) -> list[_Item]:
        """What to forward of `data`: as is, split, cut after a prefix, or nothing (cut now)."""
        proxy = self.proxy
        before = self.carried[direction]
        self.carried[direction] = before + len(data)
        cut_after = proxy._cut_after
        if (
            cut_after is not None
            and cut_after.direction == direction
            and self.carried[direction] > cut_after.limit
        ):
            proxy._cut_after = None
            head = data[: max(0, cut_after.limit - before)]
            return [_Item(now, head, cut=cut_after.fired)]
        on_next = proxy._on_next
        if direction == "server" and on_next is not None and self.number in on_next.connections:
            proxy._on_next = None
            if not on_next.splits:
                proxy.cuts += 1
                proxy._notify()
                self.cut()
                on_next.fired.set()
                return []
            on_next.fired.set()
            items, start, pause = [], 0, 0.0
            for offset, next_pause in on_next.splits:
                items.append(_Item(now, data[start:offset], pause=pause))
                start, pause = offset, next_pause
            return [*items, _Item(now, data[start:], pause=pause)]
        return [_Item(now, data)]

    async def _send(
        self,
        queue: asyncio.Queue[_Item | None],
        writer: asyncio.StreamWriter,
        direction: Direction,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (item := await queue.get()) is not None:
                if item.pause > 0:
                    await asyncio.sleep(item.pause)
                await self.proxy._wait_delay(direction, item.received, loop)
                if item.data:
                    writer.write(item.data)
                    await writer.drain()
                if item.cut is not None:
                    # Let the head reach the peer's socket before the RST (bounded).
                    writer.transport.set_write_buffer_limits(high=0)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(writer.drain(), 5)
                    self.proxy.cuts += 1
                    self.proxy._notify()
                    self.cut()
                    item.cut.set()
                    return
            self.close()
        except OSError:
            self.cut()


class TcpProxy:
    """Forward 127.0.0.1:<free port> to (host, port), with faults switched on by the test."""

    def __init__(self, host: str, port: int, *, listen_host: str = "127.0.0.1") -> None:
        """Prepare a proxy to (host, port); start() opens the listening port."""
        self.target = (host, port)
        self.listen_host = listen_host
        self.port = 0
        self.accepted = 0  # connections accepted (refused ones included)
        self.refused = 0  # connections closed at once by refuse(True) or an unreachable target
        self.cuts = 0  # connections cut by cut() or a trigger
        self.bytes_from_server = 0
        self.bytes_from_client = 0
        self._server: asyncio.Server | None = None
        self._connections: dict[int, _Connection] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._refusing = False
        self._delay: dict[Direction, float] = {"server": 0.0, "client": 0.0}
        self._delay_changed = asyncio.Event()
        self._cut_after: _CutAfter | None = None
        self._on_next: _OnNextData | None = None
        self._last_activity = 0.0
        self._changed = asyncio.Event()

    # Lifecycle

    async def start(self) -> None:
        """Listen on a free port of listen_host (self.port)."""
        self._server = await asyncio.start_server(self._handle, self.listen_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Cut every connection and stop listening (bounded)."""
        if self._server is None:
            return
        self._server.close()
        self.cut()
        # Cut connections end their handlers; one still connecting upstream ends within
        # CONNECT_TIMEOUT. Cancelling is the fallback (asyncio logs a cancelled handler).
        if self._handlers:
            _done, pending = await asyncio.wait(self._handlers, timeout=CONNECT_TIMEOUT + 1)
            for task in pending:
                task.cancel()
        self._server = None

    async def __aenter__(self) -> TcpProxy:
        """Start listening."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop."""
        await self.stop()

    # Faults

    def cut(self) -> int:
        """Reset every open connection now; returns how many were cut."""
        connections = [c for c in self._connections.values() if not c.closed]
        for connection in connections:
            connection.cut()
        self.cuts += len(connections)
        self._notify()
        return len(connections)

    def refuse(self, refusing: bool = True) -> None:
        """While on, new connections are reset as soon as they are accepted (network down).

        Open connections are left alone: cut() them too for a full outage.
        """
        self._refusing = refusing

    def set_delay(self, seconds: float, direction: Direction | Literal["both"] = "server") -> None:
        """Hold every chunk `seconds` after it was read before forwarding it (order is kept).

        Applies to chunks already waiting, too: set_delay(0) releases them at once.
        """
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        for side in _DIRECTIONS if direction == "both" else (_check_direction(direction),):
            self._delay[side] = seconds
        self._delay_changed.set()
        self._delay_changed = asyncio.Event()

    def cut_after_bytes(self, n: int, direction: Direction = "server") -> asyncio.Event:
        """Cut the first connection that has carried more than n bytes in `direction`.

        One-shot: the bytes up to n are forwarded, then both sides get a RST; later connections
        are untouched. Counts from each connection's start. The returned event is set on the cut.
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        trigger = _CutAfter(limit=n, direction=_check_direction(direction))
        self._cut_after = trigger
        return trigger.fired

    def cut_on_next_server_data(self) -> asyncio.Event:
        """Cut the connection on which the server next sends anything, dropping that data.

        Only connections open now are watched (while the bridge is in IDLE, the next thing the
        server sends is the EXISTS push). One-shot; the returned event is set on the cut.
        """
        trigger = _OnNextData(connections=self._open_numbers())
        self._on_next = trigger
        return trigger.fired

    def split_next_server_data(self, *splits: tuple[int, float]) -> asyncio.Event:
        """Forward the next server chunk in pieces: each (offset, pause) starts a piece that is
        written `pause` seconds after the one before it. Default: ((8, 0.3),).

        What a lost and retransmitted TCP segment looks like to the client: the start of a TLS
        record is readable, the rest arrives later. One-shot, on connections open now; the
        returned event is set when the chunk is split.
        """
        splits = splits or ((8, 0.3),)
        offsets = [offset for offset, _ in splits]
        if offsets != sorted(set(offsets)) or offsets[0] <= 0 or any(p < 0 for _, p in splits):
            raise ValueError("offsets must be increasing and > 0, pauses >= 0")
        trigger = _OnNextData(connections=self._open_numbers(), splits=tuple(splits))
        self._on_next = trigger
        return trigger.fired

    def disarm(self) -> None:
        """Forget any armed one-shot fault; remove the delay; accept connections again."""
        self._cut_after = self._on_next = None
        self._refusing = False
        self.set_delay(0, "both")

    # Observation

    @property
    def open_connections(self) -> int:
        """Connections currently forwarding."""
        return sum(not c.closed for c in self._connections.values())

    async def quiet(self, seconds: float = 0.3, timeout: float = 10.0) -> None:
        """Wait (bounded) until a connection is open and nothing has moved for `seconds`.

        The bridge sends nothing while in IDLE, so this is how a test knows it is idling.
        """
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                wait = self._last_activity + seconds - loop.time()
                if wait <= 0 and self.open_connections:
                    return
                await asyncio.sleep(max(wait, 0.05))

    async def wait_until(
        self, predicate: Callable[[TcpProxy], bool], timeout: float = 10.0
    ) -> None:
        """Wait (bounded) until predicate(self) holds, rechecked when a counter changes.

        `await proxy.wait_until(lambda p: p.refused >= 2)`: two reconnects were refused.
        """
        async with asyncio.timeout(timeout):
            while not predicate(self):
                await self._changed.wait()

    # Internals

    def _open_numbers(self) -> frozenset[int]:
        return frozenset(n for n, c in self._connections.items() if not c.closed)

    def _activity(self, direction: Direction, size: int) -> None:
        self._last_activity = asyncio.get_running_loop().time()
        if direction == "server":
            self.bytes_from_server += size
        else:
            self.bytes_from_client += size
        self._notify()

    def _notify(self) -> None:
        """Wake wait_until(): a counter changed."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_delay(
        self, direction: Direction, received: float, loop: asyncio.AbstractEventLoop
    ) -> None:
        """Until `received` + the current delay; woken early when the delay changes."""
        while (remaining := received + self._delay[direction] - loop.time()) > 0:
            changed = self._delay_changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.accepted += 1
        self._notify()
        number = self.accepted
        try:
            if self._refusing or len(self._handlers) > MAX_CONNECTIONS:
                self.refused += 1
                self._notify()
                _reset(writer)
                return
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.target), CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError):
                self.refused += 1  # the server is down: the client sees its connection reset
                self._notify()
                _reset(writer)
                return
            connection = _Connection(self, number, writer, up_writer)
            self._connections[number] = connection
            self._last_activity = asyncio.get_running_loop().time()
            connection.tasks += [
                asyncio.create_task(connection.pump(up_reader, writer, "server")),
                asyncio.create_task(connection.pump(reader, up_writer, "client")),
            ]
            try:
                # Pumps first (they add the senders), then everything until flushed or cut.
                await asyncio.gather(*connection.tasks, return_exceptions=True)
                await asyncio.gather(*connection.tasks, return_exceptions=True)
            finally:
                connection.cut()
                self._connections.pop(number, None)
        finally:
            self._handlers.discard(task)
