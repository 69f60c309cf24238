"""Port desired/actual diffs and instance paths of the OVS driver. No switch, no root."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from vmferry.drivers.softswitch.base import OWNER_KEY, PortSpec
from vmferry.drivers.softswitch.ovs import PortRecord, diff_port
from vmferry.drivers.softswitch.ovs.ovsdb import OvsdbApi
from vmferry.errors import InputError, SoftswitchError
from vmferry.lab.ovs_instance import MAX_BASE_DIR, OvsInstance


def stored(spec: PortSpec) -> PortRecord:
    """A record as the IDL would hold it right after ``spec`` was written."""
    return PortRecord(
        name=spec.name,
        port={"tag": [spec.tag] if spec.tag is not None else [],
              "trunks": sorted(spec.trunks, reverse=True),     # the IDL gives sets any order
              "vlan_mode": [spec.vlan_mode] if spec.vlan_mode else [],
              "external_ids": dict(spec.external_ids)},
        iface={"type": spec.iface_type, "options": dict(spec.options),
               "external_ids": dict(spec.external_ids),
               "mtu_request": [spec.mtu] if spec.mtu else []},
        ofport=3)


ACCESS = PortSpec("tap-vm1", tag=100, vlan_mode="access",
                  external_ids={OWNER_KEY: "vm1", "attached-mac": "52:54:00:00:00:01"})
TRUNK = PortSpec("trunk0", trunks=frozenset({100, 200, 300}), vlan_mode="trunk", mtu=9000)


def test_new_port_writes_only_non_default_port_columns() -> None:
    changes = diff_port(ACCESS, None)
    assert changes.create
    assert changes.port == {"tag": [100], "vlan_mode": ["access"],
                            "external_ids": {OWNER_KEY: "vm1",
                                             "attached-mac": "52:54:00:00:00:01"}}
    assert changes.iface["type"] == ""


@pytest.mark.parametrize("spec", [ACCESS, TRUNK])
def test_unchanged_port_needs_no_write(spec: PortSpec) -> None:
    changes = diff_port(spec, stored(spec))
    assert not changes
    assert changes.port == {} and changes.iface == {}


def test_only_changed_columns_are_written() -> None:
    moved = PortSpec("tap-vm1", tag=200, vlan_mode="access", external_ids=ACCESS.external_ids)
    changes = diff_port(moved, stored(ACCESS))
    assert not changes.create
    assert changes.port == {"tag": [200]}
    assert changes.iface == {}


def test_maps_are_made_exact_not_merged() -> None:
    fewer = PortSpec("tap-vm1", tag=100, vlan_mode="access", external_ids={OWNER_KEY: "vm1"})
    changes = diff_port(fewer, stored(ACCESS))
    assert changes.port == {"external_ids": {OWNER_KEY: "vm1"}}
    assert changes.iface == {"external_ids": {OWNER_KEY: "vm1"}}


def test_trunk_change_and_clearing_optional_columns() -> None:
    assert diff_port(PortSpec("trunk0", trunks=frozenset({100}), vlan_mode="trunk", mtu=9000),
                     stored(TRUNK)).port == {"trunks": [100]}
    cleared = diff_port(PortSpec("trunk0"), stored(TRUNK))
    assert cleared.port == {"trunks": [], "vlan_mode": []}
    assert cleared.iface == {"mtu_request": []}


@pytest.mark.parametrize("spec", [
    PortSpec("x", tag=4096), PortSpec("x", trunks=frozenset({-1})), PortSpec("x", vlan_mode="no"),
    PortSpec(""), PortSpec("a-name-that-is-too-long"), PortSpec("x", mtu=10),
])
def test_invalid_specs_are_refused_before_ovsdb_sees_them(spec: PortSpec) -> None:
    # The OVS IDL only logs a bad value and writes nothing, so the driver must refuse it.
    with pytest.raises(InputError):
        diff_port(spec, None)


def test_state_reads_back_as_port_state() -> None:
    state = stored(ACCESS).state()
    assert (state.name, state.tag, state.trunks, state.vlan_mode, state.ofport) == \
        ("tap-vm1", 100, frozenset(), "access", 3)
    assert stored(TRUNK).state().trunks == frozenset({100, 200, 300})


def test_each_api_keeps_its_own_connection() -> None:
    # ovsdbapp stores the connection on the class: two switches in one process would share
    # the first one's connection.
    first = SimpleNamespace(is_running=True)
    second = SimpleNamespace(is_running=True)
    api1 = OvsdbApi(first, start=False, auto_index=False)
    api2 = OvsdbApi(second, start=False, auto_index=False)
    assert api1.ovsdb_connection is first
    assert api2.ovsdb_connection is second


# ---- instance paths ----------------------------------------------------------------------------

def test_instance_keeps_every_path_under_base_dir() -> None:
    base = Path("/tmp/vfovs-unit/sw1")
    inst = OvsInstance("sw1", "vfovs-unit-sw1", base)
    assert inst.rundir == base
    assert inst.db_socket == base / "db.sock"
    assert inst.vswitchd_ctl == base / "ovs-vswitchd.ctl"
    assert not inst.running()
    assert inst.pids() == {}


def test_sockets_move_to_a_short_dir_when_base_dir_is_too_long() -> None:
    long_dir = Path("/tmp/" + "x" * MAX_BASE_DIR)
    inst = OvsInstance("sw1", None, long_dir)
    assert inst.rundir != long_dir and str(inst.rundir).startswith("/run/vmferry/ovs-")
    assert OvsInstance("sw1", None, long_dir).rundir == inst.rundir   # found again by hash
    for socket_path in (inst.db_socket, inst.vswitchd_ctl, inst.rundir / "br-fabric.snoop"):
        assert len(str(socket_path).encode()) <= 107
    short = OvsInstance("sw1", None, Path("/tmp/short"))
    assert short.rundir == Path("/tmp/short")


def test_stop_of_a_never_started_instance_is_a_no_op(tmp_path: Path) -> None:
    inst = OvsInstance("sw1", None, tmp_path / "sw1")
    inst.stop()
    inst.stop()
    assert not (tmp_path / "sw1").exists()


def test_softswitch_of_a_stopped_instance_raises(tmp_path: Path) -> None:
    with pytest.raises(SoftswitchError):
        OvsInstance("sw1", None, tmp_path / "sw1").softswitch()


def test_only_a_change_beyond_external_ids_waits_for_vswitchd() -> None:
    assert diff_port(ACCESS, None).needs_vswitchd
    retagged = PortSpec(ACCESS.name, tag=100, vlan_mode="access",
                        external_ids={**ACCESS.external_ids, "vmferry-profile": "web"})
    tags_only = diff_port(retagged, stored(ACCESS))
    assert tags_only and not tags_only.needs_vswitchd
    moved = PortSpec(ACCESS.name, tag=200, vlan_mode="access",
                     external_ids=dict(retagged.external_ids))
    assert diff_port(moved, stored(ACCESS)).needs_vswitchd
    resized = PortSpec(ACCESS.name, tag=100, vlan_mode="access", mtu=1400,
                       external_ids=dict(ACCESS.external_ids))
    assert diff_port(resized, stored(ACCESS)).needs_vswitchd
