"""The controller's Prometheus metrics, served at ``GET /metrics``.

Each app gets its own :class:`Metrics` (with its own ``CollectorRegistry``), so tests can build
many apps. Migration metrics are fed by a ``Migrations`` listener; heartbeat ages are read from
the store at scrape time, so they are right even after a controller restart.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import select

from vmferry.store.db import Store
from vmferry.store.profile_schema import PortRealizationRow, ProfileRow
from vmferry.store.schema import HostRow

ENDED = {"completed", "rolled-back", "failed"}
# Downtime: a good live migration stops the guest for tens of milliseconds.
DOWNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0)
DURATION_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)

__all__ = ["CONTENT_TYPE", "Metrics"]


class Metrics:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.registry = CollectorRegistry()
        self.migrations = Counter(
            "vmferry_migrations", "Migrations by outcome: started, completed, rolled-back, "
            "failed", ["outcome"], registry=self.registry)
        self.downtime = Histogram(
            "vmferry_migration_downtime_seconds", "Guest downtime of completed migrations, "
            "as QEMU measured it", buckets=DOWNTIME_BUCKETS, registry=self.registry)
        self.duration = Histogram(
            "vmferry_migration_duration_seconds", "Wall time of a migration, start to end, by "
            "outcome", ["outcome"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.phase_duration = Histogram(
            "vmferry_migration_phase_duration_seconds", "Wall time of each migration phase",
            ["phase"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.heartbeats = Counter(
            "vmferry_agent_heartbeats", "Heartbeats received from each host's agent", ["host"],
            registry=self.registry)
        self.heartbeat_age = Gauge(
            "vmferry_agent_heartbeat_age_seconds", "Seconds since each host's last heartbeat "
            "(absent: never heard from)", ["host"], registry=self.registry)
        self.audit_findings = Gauge(
            "vmferry_audit_findings", "Findings of the last audit, by kind", ["kind"],
            registry=self.registry)
        self.ports = Gauge(
            "vmferry_ports", "VM ports with a profile: realized at the profile's latest version, "
            "or drifted (an older version, or the last realization failed)", ["status"],
            registry=self.registry)
        for outcome in ("started", *sorted(ENDED)):
            self.migrations.labels(outcome)     # export zeros from the start
        self._seen: set[int] = set()
        self._ended: set[int] = set()
        self._lock = threading.Lock()

    # ---- feeds ------------------------------------------------------------------------------

    def on_migration(self, record: dict[str, Any]) -> None:
        """A ``Migrations`` listener: counts each migration's start and end exactly once."""
        migration_id = int(record["id"])
        state = str(record.get("state"))
        with self._lock:
            started = migration_id not in self._seen
            self._seen.add(migration_id)
            ended = state in ENDED and migration_id not in self._ended
            if ended:
                self._ended.add(migration_id)
        if started:
            self.migrations.labels("started").inc()
        if not ended:
            return
        self.migrations.labels(state).inc()
        total = _seconds_between(record.get("started_at"), record.get("ended_at"))
        if total is not None:
            self.duration.labels(state).observe(total)
        for phase in record.get("phases") or []:
            if phase.get("duration_ms") is not None:
                self.phase_duration.labels(phase["phase"]).observe(phase["duration_ms"] / 1000)
        qemu = (record.get("result") or {}).get("qemu") or {}
        if state == "completed" and qemu.get("downtime_ms") is not None:
            self.downtime.observe(float(qemu["downtime_ms"]) / 1000)

    def on_heartbeat(self, host: str) -> None:
        self.heartbeats.labels(host).inc()

    def on_audit(self, kinds: Iterable[str]) -> None:
        counts: dict[str, int] = {}
        for kind in kinds:
            counts[kind] = counts.get(kind, 0) + 1
        self.audit_findings.clear()
        self.audit_findings.labels("total").set(sum(counts.values()))
        for kind, count in counts.items():
            self.audit_findings.labels(kind).set(count)

    # ---- scrape -----------------------------------------------------------------------------

    def render(self) -> bytes:
        self._refresh_heartbeat_ages()
        self._refresh_ports()
        return generate_latest(self.registry)

    def _refresh_ports(self) -> None:
        with self.store.session() as session:
            latest = {p.name: p.version for p in session.scalars(select(ProfileRow))}
            rows = list(session.scalars(select(PortRealizationRow)))
        realized = sum(1 for r in rows if r.ok and r.version == latest.get(r.profile))
        self.ports.labels("realized").set(realized)
        self.ports.labels("drifted").set(len(rows) - realized)

    def _refresh_heartbeat_ages(self) -> None:
        now = datetime.now(UTC)
        with self.store.session() as session:
            beats = {h.name: h.last_heartbeat for h in session.scalars(select(HostRow))}
        self.heartbeat_age.clear()
        for host, beat in beats.items():
            if beat is not None:
                beat = beat if beat.tzinfo else beat.replace(tzinfo=UTC)
                self.heartbeat_age.labels(host).set((now - beat).total_seconds())


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    a, b = datetime.fromisoformat(start), datetime.fromisoformat(end)
    if a.tzinfo is None:
        a = a.replace(tzinfo=UTC)
    if b.tzinfo is None:
        b = b.replace(tzinfo=UTC)
    return max(0.0, (b - a).total_seconds())
