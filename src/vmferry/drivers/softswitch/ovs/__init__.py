"""Open vSwitch as a ``Softswitch``, split by concern.

- ``flowtext``: flow/action normalization, a flow's identity, the bundle lines of a change.
- ``ofctl``: running ``ovs-ofctl``/``ovs-appctl`` and parsing what they print (flows, meters,
  the fdb); meter plans.
- ``ovsdb``: ports as desired vs as stored (``diff_port``) and the ovsdbapp plumbing.
- ``driver``: ``OvsSoftswitch``, tying the three together.
- ``profile`` (with ``profile_flows``): realizing a port profile on a switch's port.
"""

from vmferry.drivers.softswitch.base import (
    VLAN_MODES,
    FdbEntry,
    FlowStats,
    MeterStats,
    check_port_spec,
)
from vmferry.drivers.softswitch.ovs.driver import OvsSoftswitch
from vmferry.drivers.softswitch.ovs.flowtext import (
    DEFAULT_PRIORITY,
    MAX_COOKIE,
    flow_add_text,
    flow_delete_text,
    flow_key,
    normalize_actions,
    normalize_flow,
    normalize_match,
    plan_flow_changes,
)
from vmferry.drivers.softswitch.ovs.ofctl import (
    OPENFLOW,
    PARALLEL_TOOLS,
    check_meter,
    meter_text,
    meters_after,
    parse_dump_flows,
    parse_dump_meters,
    parse_fdb_show,
    parse_flow_line,
    parse_meter_stats,
    plan_meter_changes,
)
from vmferry.drivers.softswitch.ovs.ovsdb import (
    FAIL_MODES,
    PortChanges,
    PortRecord,
    desired_columns,
    diff_port,
)

__all__ = [
    "DEFAULT_PRIORITY",
    "FAIL_MODES",
    "MAX_COOKIE",
    "OPENFLOW",
    "PARALLEL_TOOLS",
    "VLAN_MODES",
    "FdbEntry",
    "FlowStats",
    "MeterStats",
    "OvsSoftswitch",
    "PortChanges",
    "PortRecord",
    "check_meter",
    "check_port_spec",
    "desired_columns",
    "diff_port",
    "flow_add_text",
    "flow_delete_text",
    "flow_key",
    "meter_text",
    "meters_after",
    "normalize_actions",
    "normalize_flow",
    "normalize_match",
    "parse_dump_flows",
    "parse_dump_meters",
    "parse_fdb_show",
    "parse_flow_line",
    "parse_meter_stats",
    "plan_flow_changes",
    "plan_meter_changes",
]
