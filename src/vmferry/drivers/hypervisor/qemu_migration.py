"""Migration control of the QEMU driver over QMP: capabilities, TLS, start, wait, cancel,
postcopy and the pre-switchover pause.

TLS objects are added at run time (``object-add``) rather than on the command line: the
same QEMU is a destination (server credentials) once and a source (client credentials)
later, and the command lines of both sides stay identical.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vmferry.drivers.hypervisor.base import MigrationProgress, MigrationTuning, ProgressCallback
from vmferry.drivers.hypervisor.qmp_session import QmpSession
from vmferry.drivers.hypervisor.uri import validate_migration_uri
from vmferry.errors import InputError

__all__ = [
    "TERMINAL_MIGRATION_STATUSES",
    "TLS_FILES",
    "QemuMigration",
    "check_tls_dir",
    "progress_from_query",
]

#: Migration statuses after which nothing more happens without a new command.
TERMINAL_MIGRATION_STATUSES = frozenset({"completed", "failed", "cancelled", "postcopy-paused"})
#: What QEMU's tls-creds-x509 reads from its ``dir`` (both endpoints: a guest is a
#: destination once and a source later).
TLS_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem",
             "client-key.pem")
_TLS_SERVER, _TLS_CLIENT, _AUTHZ = "vmferry-tls-server", "vmferry-tls-client", "vmferry-authz"


def check_tls_dir(tls_dir: Path) -> Path:
    """Return ``tls_dir`` if it holds every file of TLS_FILES. Raises InputError."""
    missing = [f for f in TLS_FILES if not (tls_dir / f).is_file()]
    if missing:
        raise InputError("tls_dir", f"{tls_dir} lacks {', '.join(missing)} "
                                    "(make them with `vmferry pki issue`)")
    return tls_dir


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float) else 0


def _opt_int(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) else None


def progress_from_query(info: Mapping[str, Any]) -> MigrationProgress:
    """MigrationProgress from a query-migrate reply ({} before any migration: status none)."""
    ram = info.get("ram") or {}
    status = str(info.get("status", "none"))
    completed = status == "completed"
    extra: dict[str, object] = {k: ram[k] for k in (
        "normal", "duplicate", "normal-bytes", "precopy-bytes", "downtime-bytes",
        "postcopy-bytes", "postcopy-requests", "pages-per-second", "page-size") if k in ram}
    if "blocked-reasons" in info:
        extra["blocked_reasons"] = info["blocked-reasons"]
    return MigrationProgress(
        status=status,
        transferred_bytes=_int(ram.get("transferred")),
        remaining_bytes=_int(ram.get("remaining")),
        total_bytes=_int(ram.get("total")),
        dirty_pages_rate=_int(ram.get("dirty-pages-rate")),
        mbps=float(ram.get("mbps") or 0.0),
        expected_downtime_ms=_opt_int(info.get("expected-downtime")),
        downtime_ms=_opt_int(info.get("downtime")) if completed else None,
        total_time_ms=_opt_int(info.get("total-time")),
        setup_time_ms=_opt_int(info.get("setup-time")),
        cpu_throttle_percent=_int(info.get("cpu-throttle-percentage")),
        dirty_sync_count=_int(ram.get("dirty-sync-count")),
        error=str(info["error-desc"]) if info.get("error-desc") else None,
        extra=extra,
    )


class QemuMigration:
    """Migration commands for the guests of one QmpSession. ``tls_dir`` (see TLS_FILES):
    every migration, in and out, runs over TLS with verified certificates on both ends."""

    def __init__(self, session: QmpSession, *, tls_dir: Path | None,
                 progress_interval: float) -> None:
        self.qmp = session
        self.tls_dir = tls_dir
        self.progress_interval = progress_interval

    # ---- setting up ---------------------------------------------------------------------

    def _set_capabilities(self, name: str, tuning: MigrationTuning, *, incoming: bool) -> None:
        caps = [{"capability": "events", "state": True},
                {"capability": "postcopy-ram", "state": tuning.postcopy}]
        if not incoming:
            caps += [{"capability": "auto-converge", "state": tuning.auto_converge},
                     {"capability": "pause-before-switchover",
                      "state": tuning.pause_before_switchover}]
        self.qmp.execute(name, "migrate-set-capabilities", {"capabilities": caps})

    def _objects(self, name: str) -> set[str]:
        return {str(o["name"]) for o in self.qmp.execute(name, "qom-list", {"path": "/objects"})}

    def _replace_object(self, name: str, present: set[str], args: dict[str, object]) -> None:
        # A QEMU that migrated before has the object already; its peer may differ now.
        if args["id"] in present:
            self.qmp.execute(name, "object-del", {"id": args["id"]})
        self.qmp.execute(name, "object-add", args)

    def _set_tls(self, name: str, tuning: MigrationTuning, *, incoming: bool) -> None:
        """Credentials (and on a destination the accepted peer) for this migration; without
        a TLS dir, clear what a previous configuration may have left."""
        if self.tls_dir is None:
            self.qmp.execute(name, "migrate-set-parameters",
                             {"tls-creds": "", "tls-authz": "", "tls-hostname": ""})
            return
        # Unhook the objects from the parameters before replacing them.
        self.qmp.execute(name, "migrate-set-parameters", {"tls-creds": "", "tls-authz": ""})
        present = self._objects(name)
        creds = _TLS_SERVER if incoming else _TLS_CLIENT
        self._replace_object(name, present, {
            "qom-type": "tls-creds-x509", "id": creds, "dir": str(self.tls_dir),
            "endpoint": "server" if incoming else "client", "verify-peer": True})
        params: dict[str, object] = {"tls-creds": creds}
        if incoming and tuning.tls_peer_name is not None:
            # QEMU compares the client certificate's distinguished name; pki issues CN only.
            self._replace_object(name, present, {
                "qom-type": "authz-simple", "id": _AUTHZ,
                "identity": f"CN={tuning.tls_peer_name}"})
            params["tls-authz"] = _AUTHZ
        if not incoming:
            params["tls-hostname"] = tuning.tls_peer_name or ""
        self.qmp.execute(name, "migrate-set-parameters", params)

    def listen(self, name: str, uri: str, tuning: MigrationTuning) -> None:
        """On a destination started with ``-incoming defer``: capabilities, TLS, then
        ``migrate-incoming``. Raises InputError for a URI that is not tcp:HOST:PORT."""
        validate_migration_uri(uri)
        self._set_capabilities(name, tuning, incoming=True)
        self._set_tls(name, tuning, incoming=True)
        self.qmp.execute(name, "migrate-incoming", {"uri": uri})

    def migrate(self, name: str, uri: str, tuning: MigrationTuning) -> None:
        """Set capabilities, TLS and parameters from ``tuning`` and start migrating to
        ``uri``. Raises InputError for a URI that is not tcp:HOST:PORT, HypervisorError."""
        validate_migration_uri(uri)
        self._set_capabilities(name, tuning, incoming=False)
        self._set_tls(name, tuning, incoming=False)
        # max-bandwidth is bytes/s; 0 turns QEMU's rate limit off (its default is 128 MiB/s).
        bandwidth = 0 if tuning.bandwidth_mbps is None else tuning.bandwidth_mbps * 125_000
        self.qmp.execute(name, "migrate-set-parameters", {
            "downtime-limit": tuning.max_downtime_ms,
            "max-bandwidth": bandwidth,
            # The limit holds after a switch to postcopy too (QEMU's own default there is
            # unlimited): a postcopy must not take the whole migration network either.
            "max-postcopy-bandwidth": bandwidth,
        })
        self.qmp.execute(name, "migrate", {"uri": uri})

    # ---- while it runs ------------------------------------------------------------------

    def progress(self, name: str) -> MigrationProgress:
        return progress_from_query(self.qmp.execute(name, "query-migrate"))

    def wait(self, name: str, *, timeout: float, on_progress: ProgressCallback | None = None,
             postcopy_after_s: float | None = None) -> MigrationProgress:
        """Wait for the outgoing migration to end (completed, failed, cancelled, or
        postcopy-paused), woken by QMP MIGRATION events and polling query-migrate every
        ``progress_interval`` for ``on_progress``. Raises WaitTimeout after cancelling."""
        start = time.monotonic()
        postcopy_requested = False
        last = "none"

        def check() -> MigrationProgress | None:
            nonlocal postcopy_requested, last
            progress = self.progress(name)
            last = progress.status
            if on_progress is not None:
                on_progress(progress)
            if progress.status in TERMINAL_MIGRATION_STATUSES or progress.status == "none":
                return progress
            if (postcopy_after_s is not None and not postcopy_requested
                    and progress.status == "active"
                    and time.monotonic() - start >= postcopy_after_s):
                # Fails unless postcopy-ram was enabled on both sides (MigrationTuning).
                self.start_postcopy(name)
                postcopy_requested = True
            return None

        return self.qmp.wait_until(
            name, lambda: f"migration of guest {name} to finish (was {last}; cancelled)",
            timeout, ["MIGRATION"], check, interval=self.progress_interval,
            on_timeout=lambda: self.cancel(name))

    def start_postcopy(self, name: str) -> None:
        """``migrate-start-postcopy``. Raises HypervisorError when postcopy-ram was not enabled
        on both sides or the migration is not running."""
        self.qmp.execute(name, "migrate-start-postcopy")

    # ---- postcopy recovery (QEMU's docs/devel/migration/postcopy.rst) -------------------

    def pause(self, name: str) -> None:
        """``migrate-pause`` (either end, postcopy-active only): shuts the migration socket
        down so that a stream hung on a dead link fails now and the end goes to
        "postcopy-paused". Raises HypervisorError in any other status."""
        self.qmp.execute(name, "migrate-pause")

    def recover(self, name: str, uri: str) -> None:
        """``migrate-recover`` on a destination in "postcopy-paused": listen on ``uri`` for
        the source's resumed stream (it stays postcopy-paused until the source connects).
        Raises InputError for a URI that is not tcp:HOST:PORT, HypervisorError."""
        validate_migration_uri(uri)
        self.qmp.execute(name, "migrate-recover", {"uri": uri})

    def resume(self, name: str, uri: str) -> None:
        """``migrate`` with ``resume``: the source of a paused postcopy connects to ``uri``
        with the capabilities, TLS and parameters of the migration it resumes. Raises
        InputError for a URI that is not tcp:HOST:PORT, HypervisorError."""
        validate_migration_uri(uri)
        self.qmp.execute(name, "migrate", {"uri": uri, "resume": True})

    def continue_(self, name: str) -> None:
        """``migrate-continue`` from pre-switchover. Raises HypervisorError otherwise."""
        self.qmp.execute(name, "migrate-continue", {"state": "pre-switchover"})

    def cancel(self, name: str, *, timeout: float = 15.0) -> None:
        """Cancel the outgoing migration and wait until it has stopped; the source keeps (or
        goes back to) running. Raises WaitTimeout if it does not stop in time."""
        self.qmp.execute(name, "migrate_cancel")
        status = "unknown"

        def stopped() -> bool | None:
            nonlocal status
            status = self.progress(name).status
            return True if status in TERMINAL_MIGRATION_STATUSES or status == "none" else None

        self.qmp.wait_until(name, lambda: f"migration of guest {name} to cancel ({status})",
                            timeout, ["MIGRATION"], stopped, interval=self.progress_interval)
