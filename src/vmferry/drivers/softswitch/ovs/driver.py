"""Open vSwitch as a ``Softswitch``: OVSDB through ovsdbapp (``ovsdb``), OpenFlow through
``ovs-ofctl`` (``ofctl``), flows compared in one normalized text (``flowtext``).

A port has its OpenFlow number when ``ensure_port`` returns (the transaction waits for
ovs-vswitchd). Flow changes for one cookie, or for many (``replace_flows_many``), are applied
in one OpenFlow bundle (atomic); meter changes run side by side, one ``ovs-ofctl`` call each.
"""

from __future__ import annotations

import atexit
import logging
import re
import subprocess
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ovsdbapp.backend.ovs_idl import connection as idl_connection
from ovsdbapp.backend.ovs_idl import event as idl_event
from ovsdbapp.backend.ovs_idl import idlutils

from vmferry.drivers.softswitch.base import (
    ConnEntry,
    FdbEntry,
    Flow,
    FlowStats,
    Meter,
    MeterStats,
    PortSpec,
    PortState,
    Softswitch,
    check_port_spec,
)
from vmferry.drivers.softswitch.ovs.conntrack import parse_dump_conntrack
from vmferry.drivers.softswitch.ovs.flowtext import (
    MAC_RE,
    MAX_COOKIE,
    cookie_text,
    plan_flow_changes,
)
from vmferry.drivers.softswitch.ovs.ofctl import (
    OPENFLOW,
    meters_after,
    parse_dump_flows,
    parse_dump_meters,
    parse_fdb_show,
    parse_meter_stats,
    plan_meter_changes,
    run_tool,
    run_tools,
)
from vmferry.drivers.softswitch.ovs.ovsdb import (
    FAIL_MODES,
    InterfaceReadyEvent,
    NotifyingIdl,
    OvsdbApi,
    PortChanges,
    PortRecord,
    SetColumnsCommand,
    diff_port,
    one,
)
from vmferry.errors import ConflictError, InputError, SoftswitchError, WaitTimeout

LOG = logging.getLogger(__name__)

T = TypeVar("T")


class OvsSoftswitch(Softswitch):
    """One Open vSwitch (one OVSDB) as a ``Softswitch``. Close it, or use it as a context.

    Raises ``SoftswitchError`` if the database cannot be reached.
    """

    def __init__(self, db_socket: Path | str, *, rundir: Path | None = None,
                 vswitchd_ctl: Path | None = None, timeout: float = 10,
                 openflow: str | None = None) -> None:
        text = str(db_socket)
        self.remote = text if re.match(r"^(unix|tcp|ssl):", text) else f"unix:{text}"
        socket_path = Path(text.split(":", 1)[1]) if text.startswith("unix:") else Path(text)
        self.rundir = Path(rundir) if rundir is not None else socket_path.parent
        self.vswitchd_ctl = (Path(vswitchd_ctl) if vswitchd_ctl is not None
                             else self.rundir / "ovs-vswitchd.ctl")
        self.timeout = timeout
        # A switch reached over the network: its (one) bridge's OpenFlow address, e.g.
        # tcp:IP:6653, instead of the local <bridge>.mgmt socket.
        self.openflow = openflow
        self.write_transactions = 0       # committed OVSDB write transactions, for tests
        self._closed = False
        self._lock = threading.Lock()
        self._handler = idl_event.RowEventHandler()
        try:
            helper = idlutils.get_schema_helper(self.remote, "Open_vSwitch")
            helper.register_all()
            idl = NotifyingIdl(self.remote, helper, self._handler)
            self._api = OvsdbApi(idl_connection.Connection(idl, timeout=timeout))
        except Exception as exc:  # ovsdbapp raises bare Exception/RuntimeError subclasses
            self._handler.shutdown()
            atexit.unregister(self._handler.shutdown)
            raise SoftswitchError(f"cannot connect to OVSDB at {self.remote}",
                                  cause=str(exc) or type(exc).__name__) from exc

    # ---- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the OVSDB connection thread and the event thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._api.ovsdb_connection.stop(timeout=self.timeout)
        self._handler.shutdown()
        self._handler.notify_thread.join(timeout=self.timeout)
        # ovsdbapp registers every handler with atexit; drop ours so it can be collected.
        atexit.unregister(self._handler.shutdown)

    # ---- OVSDB helpers -------------------------------------------------------------------------

    def _read(self, reader: Callable[[], T]) -> T:
        """Run ``reader`` on the IDL cache while the connection thread cannot update it."""
        if self._closed:
            raise SoftswitchError(f"OVSDB connection to {self.remote} is closed")
        with self._api.ovsdb_connection.lock:
            return reader()

    def _commit(self, what: str, commands: list[Any], *, wait_for_vswitchd: bool = True) -> None:
        """Run ``commands`` in one transaction; with ``wait_for_vswitchd``, return only once
        ovs-vswitchd has applied it. Raises ``SoftswitchError``."""
        if not commands:
            return
        if self._closed:
            raise SoftswitchError(f"OVSDB connection to {self.remote} is closed")
        try:
            with self._api.transaction(check_error=True, log_errors=False,
                                       wait_for_vswitchd=wait_for_vswitchd) as txn:
                for cmd in commands:
                    txn.add(cmd)
        except Exception as exc:  # ovsdbapp raises RuntimeError and its own exceptions
            raise SoftswitchError(f"OVSDB transaction failed: {what}",
                                  cause=str(exc) or type(exc).__name__) from exc
        self.write_transactions += 1

    def _bridge_row(self, bridge: str) -> Any:
        return idlutils.row_by_value(self._api.idl, "Bridge", "name", bridge, None)

    def _require_bridge(self, bridge: str) -> Any:
        row = self._bridge_row(bridge)
        if row is None:
            raise SoftswitchError(f"bridge {bridge} does not exist", cause="no such bridge")
        return row

    @staticmethod
    def _record(port_row: Any) -> PortRecord:
        ifaces = list(port_row.interfaces)
        iface = next((i for i in ifaces if i.name == port_row.name), ifaces[0] if ifaces else None)
        port = {"tag": list(port_row.tag), "trunks": sorted(port_row.trunks),
                "vlan_mode": list(port_row.vlan_mode), "external_ids": dict(port_row.external_ids)}
        if iface is None:
            return PortRecord(port_row.name, port, {"type": "", "options": {},
                                                    "external_ids": {}, "mtu_request": []})
        iface_cols = {"type": iface.type, "options": dict(iface.options),
                      "external_ids": dict(iface.external_ids),
                      "mtu_request": list(iface.mtu_request)}
        return PortRecord(port_row.name, port, iface_cols, ofport=one(iface.ofport),
                          mac_in_use=one(iface.mac_in_use), error=one(iface.error))

    def _port_records(self, bridge: str,
                      names: Collection[str] | None = None) -> dict[str, PortRecord]:
        """Records of the bridge's ports (only those in ``names`` when given: reading a row
        through the IDL converts every column, which adds up on a bridge of many ports)."""
        row = self._require_bridge(bridge)
        records = {}
        for port in row.ports:
            name = port.name
            if name != bridge and (names is None or name in names):
                records[name] = self._record(port)
        return records

    def _port_owner(self, port: str) -> str | None:
        """The bridge holding a port of that name, if any."""
        for row in self._api.tables["Bridge"].rows.values():
            if any(p.name == port for p in row.ports):
                return str(row.name)
        return None

    # ---- bridges -------------------------------------------------------------------------------

    def bridges(self) -> list[str]:
        """Names of all bridges."""
        return sorted(self._read(lambda: [str(r.name) for r in
                                          self._api.tables["Bridge"].rows.values()]))

    def ensure_bridge(self, bridge: str, *, datapath_type: str = "netdev",
                      fail_mode: str | None = None) -> None:
        """Create the bridge, or bring datapath_type and fail_mode to the given values.

        ``fail_mode=None`` means OVS's default (standalone). Raises ``SoftswitchError``,
        ``InputError`` for a bad fail_mode.
        """
        if fail_mode is not None and fail_mode not in FAIL_MODES:
            raise InputError("bridge.fail_mode", f"{fail_mode!r} is not standalone or secure")
        if not bridge or len(bridge) > 15:
            raise InputError("bridge", f"{bridge!r} is not a valid bridge name")
        wanted_mode = [fail_mode] if fail_mode else []

        def plan() -> list[Any]:
            row = self._bridge_row(bridge)
            if row is None:
                cmds = [self._api.add_br(bridge, may_exist=True, datapath_type=datapath_type)]
                if fail_mode:
                    cmds.append(self._api.db_set("Bridge", bridge, ("fail_mode", fail_mode)))
                return cmds
            changes: dict[str, Any] = {}
            if row.datapath_type != datapath_type:
                changes["datapath_type"] = datapath_type
            if list(row.fail_mode) != wanted_mode:
                changes["fail_mode"] = wanted_mode
            return [SetColumnsCommand(self._api, "Bridge", bridge, changes)] if changes else []

        self._commit(f"ensure bridge {bridge}", self._read(plan))

    def delete_bridge(self, bridge: str) -> None:
        """Delete the bridge and its ports (idempotent). Raises ``SoftswitchError``."""
        if self._read(lambda: self._bridge_row(bridge)) is None:
            return
        self._commit(f"delete bridge {bridge}", [self._api.del_br(bridge, if_exists=True)])

    # ---- ports ---------------------------------------------------------------------------------

    def ports(self, bridge: str, names: Collection[str] | None = None) -> dict[str, PortState]:
        """Every port of the bridge except its own internal port (only those named in
        ``names`` when given), as stored now.

        ``ofport`` is None until ovs-vswitchd numbered the port, -1 if it failed to open it.
        Raises ``SoftswitchError`` if the bridge does not exist.
        """
        records = self._read(lambda: self._port_records(bridge, names))
        return {name: record.state() for name, record in sorted(records.items())}

    def port_external_ids(self, bridge: str) -> dict[str, dict[str, str]]:
        """Every port's ``external_ids`` by name (two columns per port, not all of them).
        Raises ``SoftswitchError`` if the bridge does not exist."""
        def read() -> dict[str, dict[str, str]]:
            ports = self._require_bridge(bridge).ports
            return {name: dict(p.external_ids) for p in ports if (name := p.name) != bridge}
        return self._read(read)

    def port_record(self, bridge: str, port: str) -> PortRecord | None:
        """All managed columns of one port (None if it is not on the bridge)."""
        return self._read(lambda: self._port_records(bridge, {port}).get(port))

    def ensure_port(self, bridge: str, port: PortSpec) -> None:
        """Create the port or write only the columns that differ from ``port``; no-op if none.

        Maps (options, external_ids) are made exactly equal, not merged. Waits for
        ovs-vswitchd unless only ``external_ids`` change. Raises ``InputError`` for a bad spec,
        ``ConflictError`` if the port is on another bridge, ``SoftswitchError`` if OVSDB or
        ovs-vswitchd (cannot open the device) fails.
        """
        self.ensure_ports(bridge, [port])

    def ensure_ports(self, bridge: str, ports: Iterable[PortSpec]) -> None:
        """``ensure_port`` for many ports in one transaction (all or none are written).

        Raises what ``ensure_port`` raises, and ``InputError`` for a port named twice.
        """
        specs = list(ports)
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise InputError("ports", "a port is named twice")
        for spec in specs:
            check_port_spec(spec)

        def plan() -> list[tuple[PortSpec, PortChanges]]:
            records = self._port_records(bridge, set(names))
            planned = []
            for spec in specs:
                record = records.get(spec.name)
                if record is None:
                    owner = self._port_owner(spec.name)
                    if owner is not None:
                        raise ConflictError("port", f"{spec.name} is on bridge {owner}, "
                                            f"not {bridge}")
                planned.append((spec, diff_port(spec, record)))
            return planned

        changed = [(spec, changes) for spec, changes in self._read(plan) if changes]
        if not changed:
            return
        cmds: list[Any] = []
        for spec, changes in changed:
            if changes.create:
                cmds.append(self._api.add_port(bridge, spec.name, may_exist=False,
                                               **changes.iface))
            elif changes.iface:
                cmds.append(SetColumnsCommand(self._api, "Interface", spec.name,
                                               changes.iface))
            if changes.port:
                cmds.append(SetColumnsCommand(self._api, "Port", spec.name, changes.port))
        what = (f"ensure port {changed[0][0].name} on {bridge}" if len(changed) == 1
                else f"ensure {len(changed)} ports on {bridge}")
        try:
            self._commit(what, cmds,
                         wait_for_vswitchd=any(c.needs_vswitchd for _, c in changed))
        except SoftswitchError as exc:
            for spec, changes in changed:
                if not (changes.create or changes.iface):
                    continue
                record = self.port_record(bridge, spec.name)
                if record is not None and record.error:
                    raise SoftswitchError(f"ovs-vswitchd cannot use port {spec.name} on "
                                          f"{bridge}", cause=record.error) from exc
            raise

    def delete_port(self, bridge: str, port: str) -> None:
        """Remove the port from the bridge (idempotent). Raises ``SoftswitchError``."""
        present = self._read(lambda: port in self._port_records(bridge, {port})
                             if self._bridge_row(bridge) is not None else False)
        if present:
            self._commit(f"delete port {port} from {bridge}",
                         [self._api.del_port(port, bridge=bridge, if_exists=True)])

    def set_trunks(self, bridge: str, port: str, vlans: frozenset[int]) -> None:
        """Set the VLANs a trunk port carries (empty: all VLANs, as OVS defines it).

        Writes nothing when unchanged. Raises ``SoftswitchError`` if the port is missing,
        ``InputError`` for a VLAN outside 0..4095.
        """
        for vlan in vlans:
            if not 0 <= vlan <= 4095:
                raise InputError("trunks", f"{vlan} is not 0..4095")

        def current() -> list[int]:
            record = self._port_records(bridge, {port}).get(port)
            if record is None:
                raise SoftswitchError(f"port {port} is not on bridge {bridge}",
                                      cause="no such port")
            return sorted(record.port["trunks"])

        if self._read(current) == sorted(vlans):
            return
        self._commit(f"set trunks of {port} on {bridge}",
                     [SetColumnsCommand(self._api, "Port", port, {"trunks": sorted(vlans)})])

    def wait_for_port(self, bridge: str, port: str, timeout: float = 10) -> int:
        """Wait (on an OVSDB row event) until the port's interface has an OpenFlow number.

        Returns the ofport. Raises ``WaitTimeout`` after ``timeout`` seconds,
        ``SoftswitchError`` if ovs-vswitchd failed to open the interface (ofport -1).
        """
        ready = InterfaceReadyEvent(port, timeout)
        # Watch before looking, so an update landing in between is not missed.
        self._handler.watch_event(ready)
        try:
            record = self.port_record(bridge, port)
            if record is None or record.ofport is None:
                if not ready.wait():
                    raise WaitTimeout(f"port {port} on {bridge} to get an OpenFlow port number",
                                      timeout)
                record = self.port_record(bridge, port)
        finally:
            self._handler.unwatch_event(ready)
        if record is None or record.ofport is None:
            raise SoftswitchError(f"port {port} is not on bridge {bridge}", cause="no such port")
        if record.ofport < 0:
            raise SoftswitchError(f"ovs-vswitchd cannot use port {port} on {bridge}",
                                  cause=record.error or "ofport -1")
        return record.ofport

    # ---- OpenFlow ------------------------------------------------------------------------------

    def mgmt_target(self, bridge: str) -> str:
        """The OpenFlow management socket of a bridge, as ovs-ofctl takes it."""
        return self.openflow or f"unix:{self.rundir / bridge}.mgmt"

    def _tool(self, argv: list[str], what: str,
              stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run an OVS command-line tool, bounded by the switch timeout."""
        return run_tool(argv, what, self.timeout, stdin)

    def _ofctl_argv(self, bridge: str, args: list[str]) -> list[str]:
        subcommand, *rest = args
        return ["ovs-ofctl", "-O", OPENFLOW, subcommand, self.mgmt_target(bridge), *rest]

    def _ofctl(self, bridge: str, args: list[str], what: str) -> subprocess.CompletedProcess[str]:
        return self._tool(self._ofctl_argv(bridge, args), what)

    def _dump(self, bridge: str, cookie: int | None, stats: bool,
              cookies: Collection[int] | None = None) -> list[FlowStats]:
        """Flows of the bridge: those with ``cookie`` (filtered by the switch), or those with
        any of ``cookies`` (filtered here), or all."""
        flags = [] if stats else ["--no-stats"]
        argv = ["ovs-ofctl", "-O", OPENFLOW, "--no-names", *flags, "dump-flows",
                self.mgmt_target(bridge)]
        if cookie is not None:
            argv.append(f"cookie={cookie_text(cookie)}/-1")
        result = self._tool(argv, f"dump flows of {bridge}")
        return parse_dump_flows(result.stdout, cookies)

    def dump_flows(self, bridge: str, cookie: int | None = None) -> list[Flow]:
        """Flows now installed (only those with ``cookie`` when given), normalized, sorted.

        Raises ``SoftswitchError``.
        """
        flows = [stats.flow for stats in self._dump(bridge, cookie, stats=False)]
        return sorted(flows, key=lambda f: (f.table, -f.priority, f.match, f.actions))

    def flow_stats(self, bridge: str, cookie: int | None = None) -> list[FlowStats]:
        """Flows with their packet and byte counters. Raises ``SoftswitchError``."""
        return self._dump(bridge, cookie, stats=True)

    def replace_flows(self, bridge: str, cookie: int, flows: list[Flow]) -> None:
        """Make the flows carrying ``cookie`` exactly ``flows``, in one OpenFlow bundle.

        Only the difference is sent; unchanged flows keep their counters. A flow naming a
        meter needs that meter to exist first (``replace_meters``). Raises ``InputError`` for
        a bad cookie or conflicting flows, ``SoftswitchError`` if OVS rejects a flow or
        rewrites its match (a match missing its prerequisites, e.g. tp_dst without tcp).
        """
        self.replace_flows_many(bridge, {cookie: flows})

    def dump_flows_many(self, bridge: str, cookies: Collection[int]) -> dict[int, list[Flow]]:
        """The flows of each cookie (normalized), in one dump. Raises ``SoftswitchError``."""
        if not cookies:
            return {}
        if len(cookies) == 1:
            dumped = self._dump(bridge, next(iter(cookies)), stats=False)
        else:
            dumped = self._dump(bridge, None, stats=False, cookies=cookies)
        found: dict[int, list[Flow]] = {cookie: [] for cookie in cookies}
        for stats in dumped:
            found[stats.cookie].append(stats.flow)
        return found

    def replace_flows_many(self, bridge: str, flows: Mapping[int, list[Flow]],
                           actual: Mapping[int, list[Flow]] | None = None) -> None:
        """``replace_flows`` for many cookies at once: one flow dump, one bundle for all.

        ``actual``: the flows of these cookies as just dumped (``dump_flows_many``), else
        they are dumped. The bundle is atomic: if OVS rejects one flow, no cookie's flows
        change. Raises what ``replace_flows`` raises.
        """
        for cookie in flows:
            if not 0 < cookie <= MAX_COOKIE:
                raise InputError("cookie", f"{cookie} is not 1..2^64-2")
        if not flows:
            return
        if actual is None:
            actual = self.dump_flows_many(bridge, flows.keys())
        deletes: list[str] = []
        adds: list[str] = []
        for cookie in sorted(flows):
            for line in plan_flow_changes(cookie, actual.get(cookie, []), flows[cookie]):
                (deletes if line.startswith("delete") else adds).append(line)
        lines = deletes + adds
        if not lines:
            return
        what = (f"replace flows with cookie {cookie_text(next(iter(flows)))} on {bridge}"
                if len(flows) == 1 else f"replace flows of {len(flows)} cookies on {bridge}")
        # --no-names: flows name ports by number, and looking names up costs ovs-ofctl a
        # port-description round trip (about 10 ms) on every call.
        result = self._tool(["ovs-ofctl", "-O", OPENFLOW, "--no-names", "--bundle", "add-flows",
                             self.mgmt_target(bridge), "-"], what,
                            stdin="\n".join(lines) + "\n")
        # ovs-ofctl accepts a match missing its prerequisites and silently drops fields from
        # it ("normalization changed ofp_match"); the flow installed is not the one asked for.
        if "normalization changed" in result.stderr:
            raise SoftswitchError(f"OVS changed the match of a flow on {bridge}",
                                  cause=result.stderr.strip()[-800:])

    def replace_meters(self, bridge: str, meters: list[Meter], owned: Collection[int],
                       actual: list[Meter] | None = None) -> list[Meter]:
        """Make the meters with ids in ``owned`` exactly ``meters``; others are untouched.

        ``actual`` is the bridge's meters as just dumped (``dump_meters``, or what an earlier
        call returned); without it they are dumped. Returns the bridge's meters afterwards,
        to pass as ``actual`` to the next call. Deleting a meter also deletes the flows that
        use it (OpenFlow). Meter changes cannot be bundled in OpenFlow 1.3: each is its own
        ovs-ofctl call, run side by side. Raises ``InputError``, ``SoftswitchError``.
        """
        before = self.dump_meters(bridge) if actual is None else actual
        changes = plan_meter_changes(before, meters, owned)
        run_tools([(self._ofctl_argv(bridge, [command, argument]),
                    f"{command} {argument} on {bridge}") for command, argument in changes],
                  self.timeout)
        return meters_after(before, meters, owned)

    def dump_meters(self, bridge: str) -> list[Meter]:
        """Meters now on the bridge, by id. Raises ``SoftswitchError``."""
        result = self._ofctl(bridge, ["dump-meters"], f"dump meters of {bridge}")
        return parse_dump_meters(result.stdout)

    def meter_stats(self, bridge: str) -> dict[int, MeterStats]:
        """Per-meter counters (packets in, packets dropped by the band). Raises
        ``SoftswitchError``."""
        result = self._ofctl(bridge, ["meter-stats"], f"read meter stats of {bridge}")
        return parse_meter_stats(result.stdout)

    def settle(self) -> None:
        """Wait until ovs-vswitchd has revalidated the datapath flows it cached.

        Changes (flows, trunks, ports) reach the OpenFlow tables when the call making them
        returns; packets matching datapath flows cached earlier follow the old rules until
        the revalidators catch up, usually within milliseconds. This waits for a full
        revalidation round (``revalidator/wait``, about 0.5 s). Raises ``SoftswitchError``,
        ``WaitTimeout``.
        """
        self._appctl(["revalidator/wait"], "revalidate datapath flows")

    # ---- fdb -----------------------------------------------------------------------------------

    def _appctl(self, args: list[str], what: str) -> subprocess.CompletedProcess[str]:
        return self._tool(["ovs-appctl", "-t", str(self.vswitchd_ctl), *args], what)

    def dump_conntrack(self, zone: int) -> list[ConnEntry]:
        """The zone's IPv4 TCP/UDP/ICMP entries in the userspace datapath's tracker. Raises
        ``InputError`` (bad zone), ``SoftswitchError``."""
        if not 0 <= zone <= 0xFFFF:
            raise InputError("zone", f"{zone} is not 0..65535")
        result = self._appctl(["dpctl/dump-conntrack", f"zone={zone}"],
                              f"dump conntrack zone {zone}")
        return [e for e in parse_dump_conntrack(result.stdout) if e.zone == zone]

    def fdb(self, bridge: str) -> list[FdbEntry]:
        """Learned MACs: ``(port number or LOCAL, vlan, mac)``. Raises ``SoftswitchError``."""
        return parse_fdb_show(self._appctl(["fdb/show", bridge], f"show fdb of {bridge}").stdout)

    def flush_fdb(self, bridge: str, mac: str | None = None) -> None:
        """Forget learned MACs so the next frame relearns them.

        OVS 3.1 cannot forget one learned MAC (``fdb/del`` only removes static entries), so
        with ``mac`` the whole bridge is flushed if that MAC is learned there, and nothing
        happens if it is not. Raises ``SoftswitchError``, ``InputError`` for a malformed MAC.
        """
        if mac is not None:
            if not MAC_RE.match(mac):
                raise InputError("mac", f"{mac!r} is not a MAC address")
            if all(learned != mac.lower() for _, _, learned in self.fdb(bridge)):
                return
        self._appctl(["fdb/flush", bridge], f"flush fdb of {bridge}")

