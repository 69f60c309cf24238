"""The OVS driver package: its public names, and that each softswitch is a complete one."""

from __future__ import annotations

import importlib

import pytest

import vmferry.drivers.softswitch.ovs as ovs
from vmferry.drivers.softswitch.base import Softswitch
from vmferry.drivers.softswitch.fake import FakeSoftswitch


def test_every_public_name_is_exported_and_importable() -> None:
    assert sorted(ovs.__all__) == sorted(set(ovs.__all__))
    for name in ovs.__all__:
        assert getattr(ovs, name) is not None, name
    # The names the rest of vmferry (and its tests) import from the package.
    for name in ("OvsSoftswitch", "normalize_flow", "normalize_match", "normalize_actions",
                 "flow_key", "meters_after", "PortRecord", "diff_port", "FlowStats",
                 "MeterStats", "OPENFLOW", "flow_add_text", "meter_text"):
        assert name in ovs.__all__, name


@pytest.mark.parametrize("module", ["flowtext", "ofctl", "ovsdb", "driver", "profile",
                                    "profile_flows"])
def test_each_concern_is_a_module(module: str) -> None:
    importlib.import_module(f"vmferry.drivers.softswitch.ovs.{module}")


@pytest.mark.parametrize("switch", [ovs.OvsSoftswitch, FakeSoftswitch])
def test_softswitches_implement_the_whole_interface(switch: type[Softswitch]) -> None:
    assert issubclass(switch, Softswitch)
    assert not switch.__abstractmethods__
