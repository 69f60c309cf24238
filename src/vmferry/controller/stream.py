"""Server-sent events: the audit log and migration progress, live, at ``/v1/events/stream``.

Migration records are pushed by a ``Migrations`` listener (from the migration threads) into
one bounded queue per subscriber. Audit-log events are read from the store after the last id a
client saw, so ``Last-Event-ID`` resumes a dropped stream without losing any, and events written
by another controller on the same store arrive too.

Event types: ``audit`` (id = the audit event's id), ``migration`` (the migration record), and
comment lines as keep-alives.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool

from vmferry.controller import events
from vmferry.store.db import Store
from vmferry.store.schema import EventRow

log = logging.getLogger(__name__)

KEEPALIVE_S = 15.0
STORE_POLL_S = 0.5          # how often the audit log is read for new rows
QUEUE_SIZE = 1000           # a client this far behind loses migration updates, not the stream
MEDIA_TYPE = "text/event-stream"


@dataclass(eq=False)
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[dict[str, Any]] = field(
        default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    dropped: int = 0

    def offer(self, record: dict[str, Any]) -> None:   # runs on the event loop
        try:
            self.queue.put_nowait(record)
        except asyncio.QueueFull:
            self.dropped += 1


class EventHub:
    """Fans migration records out to every connected stream."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._subscribers: set[_Subscriber] = set()
        self._lock = threading.Lock()

    def publish_migration(self, record: dict[str, Any]) -> None:
        """A ``Migrations`` listener; called from migration threads, never blocks."""
        with self._lock:
            subscribers = list(self._subscribers)
        for sub in subscribers:
            try:
                sub.loop.call_soon_threadsafe(sub.offer, record)
            except RuntimeError:   # that client's loop is gone
                self._remove(sub)

    def _add(self, sub: _Subscriber) -> None:
        with self._lock:
            self._subscribers.add(sub)

    def _remove(self, sub: _Subscriber) -> None:
        with self._lock:
            self._subscribers.discard(sub)

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subscribers)

    def latest_event_id(self) -> int:
        rows = events.recent(self.store, limit=1)
        return rows[-1].id if rows else 0

    async def stream(self, is_disconnected: Callable[[], Any], *, after: int,
                     limit: int | None = None, keepalive: float = KEEPALIVE_S,
                     poll: float = STORE_POLL_S) -> AsyncIterator[str]:
        """The SSE text of events after audit id ``after``; ends after ``limit`` events or
        when the client goes away."""
        sub = _Subscriber(asyncio.get_running_loop())
        self._add(sub)
        sent = 0
        cursor = after
        last_write = time.monotonic()
        try:
            yield f"retry: 2000\n: vmferry events after {after}\n\n"
            while limit is None or sent < limit:
                if await is_disconnected():
                    return
                rows: list[EventRow] = await run_in_threadpool(
                    events.recent, self.store, 500, cursor)
                for row in rows:
                    cursor = row.id
                    yield _frame("audit", _audit(row), event_id=row.id)
                    sent += 1
                    if limit is not None and sent >= limit:
                        return
                try:
                    record = await asyncio.wait_for(sub.queue.get(), timeout=poll)
                except TimeoutError:
                    pass
                else:
                    yield _frame("migration", record)
                    sent += 1
                    last_write = time.monotonic()
                    continue
                if rows:
                    last_write = time.monotonic()
                elif time.monotonic() - last_write >= keepalive:
                    yield ": keep-alive\n\n"
                    last_write = time.monotonic()
        finally:
            self._remove(sub)


def _audit(row: EventRow) -> dict[str, Any]:
    return {"id": row.id, "at": row.at.isoformat(), "actor": row.actor, "action": row.action,
            "target": row.target, "outcome": row.outcome, "detail": row.detail}


def _frame(kind: str, data: dict[str, Any], *, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, default=str)}\n\n"
