"""OVSDB for the OVS driver: ports as desired vs as stored (pure), and the ovsdbapp plumbing.

OVSDB (bridges, ports, VLANs) goes through ovsdbapp's IDL, never ``ovs-vsctl``. Every write
first reads the switch, computes the difference to what is wanted (``diff_port``) and writes
only that, in one transaction; nothing to change means no transaction at all. A transaction that
changes what ovs-vswitchd acts on (a new port, a VLAN, an interface type...) waits until
ovs-vswitchd has applied it (``CheckedTransaction``, through ``next_cfg``/``cur_cfg``); one that
only rewrites ``external_ids`` (tags ovs-vswitchd ignores) returns as soon as ovsdb-server has
committed it. Waits are on row events (``InterfaceReadyEvent``), never polls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ovsdbapp.backend.ovs_idl import command as idl_command
from ovsdbapp.backend.ovs_idl import connection as idl_connection
from ovsdbapp.backend.ovs_idl import event as idl_event
from ovsdbapp.backend.ovs_idl import transaction as idl_transaction
from ovsdbapp.schema.open_vswitch import impl_idl

from vmferry.drivers.softswitch.base import PortSpec, PortState, check_port_spec

FAIL_MODES = frozenset({"standalone", "secure"})


# ---- ports: desired vs actual, pure ------------------------------------------------------------

@dataclass(frozen=True)
class PortRecord:
    """The OVSDB columns of a port and its interface that vmferry manages, as stored."""

    name: str
    port: dict[str, Any]            # tag, trunks, vlan_mode, external_ids
    iface: dict[str, Any]           # type, options, external_ids, mtu_request
    ofport: int | None = None
    mac_in_use: str | None = None
    error: str | None = None

    def state(self) -> PortState:
        tag = self.port["tag"]
        mode = self.port["vlan_mode"]
        return PortState(name=self.name, tag=tag[0] if tag else None,
                         trunks=frozenset(self.port["trunks"]),
                         vlan_mode=mode[0] if mode else None, iface_type=self.iface["type"],
                         ofport=self.ofport, mac_in_use=self.mac_in_use,
                         external_ids=dict(self.port["external_ids"]))


@dataclass(frozen=True)
class PortChanges:
    """Columns to write, only those that differ. ``create``: the port does not exist yet."""

    create: bool
    port: dict[str, Any] = field(default_factory=dict)
    iface: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.create or bool(self.port) or bool(self.iface)

    @property
    def needs_vswitchd(self) -> bool:
        """Whether ovs-vswitchd acts on these changes (so a commit should wait for it):
        anything but a rewrite of ``external_ids``, which only vmferry reads."""
        return self.create or bool((set(self.port) | set(self.iface)) - {"external_ids"})


def desired_columns(spec: PortSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Port and Interface columns ``spec`` stands for, in IDL (python) form."""
    port = {
        "tag": [spec.tag] if spec.tag is not None else [],
        "trunks": sorted(spec.trunks),
        "vlan_mode": [spec.vlan_mode] if spec.vlan_mode else [],
        "external_ids": dict(spec.external_ids),
    }
    iface = {
        "type": spec.iface_type,
        "options": dict(spec.options),
        "external_ids": dict(spec.external_ids),
        "mtu_request": [spec.mtu] if spec.mtu is not None else [],
    }
    return port, iface


def diff_port(spec: PortSpec, actual: PortRecord | None) -> PortChanges:
    """What to write so the port matches ``spec``: nothing for columns already right.

    Raises ``InputError`` for an invalid spec.
    """
    check_port_spec(spec)
    port, iface = desired_columns(spec)
    if actual is None:
        return PortChanges(create=True, port={k: v for k, v in port.items() if v},
                           iface=iface)
    return PortChanges(
        create=False,
        port={k: v for k, v in port.items() if _column(actual.port.get(k)) != _column(v)},
        iface={k: v for k, v in iface.items() if _column(actual.iface.get(k)) != _column(v)})


def _column(value: Any) -> Any:
    """Compare sets as sets: the IDL may hand back a set column in any order."""
    if isinstance(value, list | tuple | set | frozenset):
        return sorted(value)
    return value


# ---- ovsdbapp plumbing -------------------------------------------------------------------------

class CheckedTransaction(impl_idl.OvsVsctlTransaction):  # type: ignore[misc]
    """Raises when ovs-vswitchd fails an interface or does not catch up; ovsdbapp only logs."""

    def post_commit(self, txn: Any) -> None:
        idl_transaction.Transaction.post_commit(self, txn)
        self.do_post_commit(txn)

    def post_commit_failed_interfaces(self, txn: Any) -> list[str]:
        # ovsdbapp compares the ofport column with -1, but the Python IDL hands back [-1],
        # so its check never fires.
        failed = []
        rows = self.api.idl.tables["Interface"].rows
        for provisional in txn.expected_ifaces:
            uuid = txn.get_insert_uuid(provisional)
            iface = rows.get(uuid) if uuid else None
            if iface is not None and one(iface.ofport) in (None, -1):
                failed.append(f"{iface.name} ({one(iface.error) or 'no ofport'})")
        return failed


class OvsdbApi(impl_idl.OvsdbIdl):  # type: ignore[misc]
    """ovsdbapp's Open_vSwitch API with one connection per instance.

    ovsdbapp keeps the connection on the class, so every instance in a process would share
    the first switch's connection; vmferry talks to several switches from one process.
    """

    @property
    def ovsdb_connection(self) -> Any:
        return self.__dict__.get("_vmferry_connection")

    @ovsdb_connection.setter
    def ovsdb_connection(self, connection: Any) -> None:
        self.__dict__["_vmferry_connection"] = connection

    def create_transaction(self, check_error: bool = False, log_errors: bool = True,
                           wait_for_vswitchd: bool = True, **kwargs: Any) -> Any:
        if not wait_for_vswitchd:
            # No next_cfg bump and no wait for cur_cfg: ovsdb-server's commit is the end.
            return idl_transaction.Transaction(self, self.ovsdb_connection,
                                               check_error=check_error, log_errors=log_errors)
        return CheckedTransaction(self, self.ovsdb_connection, check_error=check_error,
                                   log_errors=log_errors)


class NotifyingIdl(idl_connection.OvsdbIdl):  # type: ignore[misc]
    """The IDL, forwarding row changes to a handler so waits are on events, not polls."""

    def __init__(self, remote: str, helper: Any, handler: Any) -> None:
        super().__init__(remote, helper)
        self._vmferry_handler = handler

    def notify(self, event: str, row: Any, updates: Any = None) -> None:
        self._vmferry_handler.notify(event, row, updates)


class SetColumnsCommand(idl_command.BaseCommand):  # type: ignore[misc]
    """Overwrite columns of one row exactly (ovsdbapp's db_set merges maps instead)."""

    def __init__(self, api: Any, table: str, record: str, columns: dict[str, Any]) -> None:
        super().__init__(api)
        self.table = table
        self.record = record
        self.columns = columns

    def run_idl(self, txn: Any) -> None:
        row = self.api.lookup(self.table, self.record)
        for column, value in self.columns.items():
            self.set_column(row, column, value)


class InterfaceReadyEvent(idl_event.WaitEvent):  # type: ignore[misc]
    """Fires once an Interface row named ``name`` has an ofport (a number, or -1 on failure)."""

    def __init__(self, name: str, timeout: float) -> None:
        super().__init__((self.ROW_CREATE, self.ROW_UPDATE), "Interface",
                         (("name", "=", name),), timeout=timeout)
        self.event_name = f"interface-ready-{name}"

    def match_fn(self, event: str, row: Any, old: Any) -> bool:
        return bool(getattr(row, "ofport", None))


def one(value: Any) -> Any:
    """An optional OVSDB column comes back as a list of 0 or 1 items."""
    if isinstance(value, list):
        return value[0] if value else None
    return value

