"""QMP sessions of the QEMU driver: one connection and one event recorder per guest.

QMP runs on one asyncio loop in a private thread, shared by every driver of the process (a
QMP socket serves one client at a time, so one connection per guest is kept and shared). On
each connection a ``_Recorder`` listener (qemu.qmp's event listener API: QMP pushes, nobody
polls) appends every event, with QMP's own timestamp, to the guest's bounded ``EventHistory``.
The history belongs to the socket path, not to the connection: a reconnect (the agent
restarted, the connection broke) keeps counting seq numbers and records a ``VMFERRY_RESYNC``
event with the migration status at that moment, since QEMU does not replay what it emitted
while nobody listened. Callers wait on the history's condition, bounded, from their own thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Collection, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import EventListener, Message, QMPClient, QMPError, Runstate
from qemu.qmp.qmp_client import ExecuteError

from vmferry.drivers.hypervisor.base import GuestEvent
from vmferry.drivers.hypervisor.history import EventHistory
from vmferry.errors import HypervisorError, WaitTimeout

__all__ = ["RESYNC_EVENT", "QmpHub", "QmpSession"]

_T = TypeVar("_T")
#: Recorded when a driver (re)connects to a running guest: events may have been missed.
RESYNC_EVENT = "VMFERRY_RESYNC"


class _Recorder(EventListener):
    """Records every event of one connection into the guest's history."""

    def __init__(self, history: EventHistory, default: EventListener) -> None:
        super().__init__()
        self._record = history.record
        self._default = default

    async def put(self, event: Message) -> None:
        # The client's catch-all listener cannot be removed; nobody reads it: keep it empty.
        self._default.clear()
        data = event.get("data")
        status = (data.get("status") if isinstance(data, dict) and event["event"] == "MIGRATION"
                  else None)
        stamp = event.get("timestamp")
        timestamp = (float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
                     if isinstance(stamp, dict) else time.time())
        self._record(str(event["event"]), None if status is None else str(status), timestamp)


class QmpHub:
    """One asyncio loop in a daemon thread holding one QMPClient per QMP socket path, and the
    event history of each path."""

    _instance: QmpHub | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.clients: dict[str, QMPClient] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self._histories: dict[str, EventHistory] = {}
        self._histories_lock = threading.Lock()
        thread = threading.Thread(target=self.loop.run_forever, name="vmferry-qmp", daemon=True)
        thread.start()

    @classmethod
    def get(cls) -> QmpHub:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def history(self, path: str) -> EventHistory:
        with self._histories_lock:
            return self._histories.setdefault(path, EventHistory())

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float) -> _T:
        """Run ``coro`` on the loop. The coroutine bounds itself; ``timeout`` is a backstop."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout + 5.0)
        except TimeoutError:
            future.cancel()
            raise

    async def client(self, path: str, timeout: float) -> QMPClient:
        """The connected client of ``path``; connects (and starts recording) if needed."""
        lock = self.locks.setdefault(path, asyncio.Lock())
        async with lock:
            client = self.clients.get(path)
            if client is not None and client.runstate == Runstate.RUNNING:
                return client
            if client is not None:
                await self._close(client)
                self.clients.pop(path, None)
            client = QMPClient(Path(path).stem)
            history = self.history(path)
            client.register_listener(_Recorder(history, client.events))
            await asyncio.wait_for(client.connect(path), timeout)
            self.clients[path] = client
            if history.fresh:
                history.fresh = False
            else:
                info = await asyncio.wait_for(client.execute("query-migrate"), timeout)
                status = info.get("status", "none") if isinstance(info, dict) else "none"
                history.record(RESYNC_EVENT, str(status), time.time())
            return client

    async def drop(self, path: str) -> None:
        client = self.clients.pop(path, None)
        if client is not None:
            await self._close(client)

    @staticmethod
    async def _close(client: QMPClient) -> None:
        try:
            await asyncio.wait_for(client.disconnect(), 5.0)
        except (QMPError, OSError, EOFError, TimeoutError):
            pass   # the peer is gone or broken: the connection is discarded either way


class QmpSession:
    """The synchronous facade over the hub for one driver: QMP commands, events and bounded
    waits of its guests. qemu.qmp errors become HypervisorError or WaitTimeout here."""

    def __init__(self, qmp_path: Callable[[str], Path], alive: Callable[[str], bool], *,
                 host: str | None, timeout: float) -> None:
        self._path = qmp_path
        self._alive = alive
        self.host = host
        self.timeout = timeout
        self.hub = QmpHub.get()

    def path(self, name: str) -> str:
        return str(self._path(name))

    def history(self, name: str) -> EventHistory:
        return self.hub.history(self.path(name))

    def execute(self, name: str, cmd: str, args: Mapping[str, object] | None = None,
                timeout: float | None = None) -> Any:
        """Run one QMP command. Raises HypervisorError (or WaitTimeout for no reply)."""
        timeout = timeout or self.timeout
        path = self.path(name)

        async def execute() -> Any:
            client = await self.hub.client(path, timeout)
            return await client.execute(cmd, dict(args or {}))

        async def call() -> Any:
            # One bound for connecting (if needed) and the reply together.
            return await asyncio.wait_for(execute(), timeout)

        return self.bounded(name, f"QMP {cmd}", call(), timeout)

    def connect(self, name: str) -> None:
        """Make sure the guest's connection, and so its event recorder, is up."""
        path = self.path(name)

        async def connect() -> None:
            await asyncio.wait_for(self.hub.client(path, self.timeout), self.timeout)

        self.bounded(name, "QMP connection", connect(), self.timeout)

    def bounded(self, name: str, what: str, coro: Coroutine[Any, Any, _T],
                timeout: float) -> _T:
        """Run a QMP coroutine for guest ``name``, translating qemu.qmp errors."""
        if not self._alive(name):
            coro.close()
            raise HypervisorError(f"guest {name} is not running", host=self.host, vm=name,
                                  cause=f"no QEMU process for {what}")
        try:
            return self.hub.run(coro, timeout)
        except ExecuteError as exc:
            raise HypervisorError(f"{what} failed for guest {name}", host=self.host, vm=name,
                                  cause=str(exc), error_class=exc.error_class) from exc
        except TimeoutError as exc:
            self.disconnect(name)
            raise WaitTimeout(f"{what} reply from guest {name}", timeout, host=self.host,
                              vm=name) from exc
        except (QMPError, OSError, EOFError) as exc:
            self.disconnect(name)
            raise HypervisorError(f"{what}: QMP connection to guest {name} failed",
                                  host=self.host, vm=name, cause=str(exc) or type(exc).__name__
                                  ) from exc

    def disconnect(self, name: str) -> None:
        try:
            self.hub.run(self.hub.drop(self.path(name)), 10.0)
        except TimeoutError:
            pass    # _close bounds itself; nothing is left to wait for

    def events(self, name: str, *, after: int = 0, timeout: float = 0.0) -> list[GuestEvent]:
        """Recorded events after ``after``; waits up to ``timeout`` s for one while the guest
        runs (connecting first, so a restarted agent listens again)."""
        history = self.history(name)
        if not self._alive(name):
            return history.after(after)
        self.connect(name)
        found, _ = history.wait(after, timeout)
        return found

    def wait_until(self, name: str, what: Callable[[], str], timeout: float,
                   kinds: Collection[str], check: Callable[[], _T | None], *,
                   interval: float, on_timeout: Callable[[], None] | None = None) -> _T:
        """Call ``check`` until it returns something other than None: after each recorded
        event in ``kinds`` and at least every ``interval`` seconds. After ``timeout`` seconds
        calls ``on_timeout`` and raises WaitTimeout saying ``what()`` it waited for."""
        # The recorder listens before the first check, so no change falls between the two.
        self.connect(name)
        history = self.history(name)
        seen = history.last_seq
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result is not None:
                return result
            left = deadline - time.monotonic()
            if left <= 0:
                if on_timeout is not None:
                    on_timeout()
                raise WaitTimeout(what(), timeout, host=self.host, vm=name)
            _, seen = history.wait(seen, min(interval, left), kinds)
