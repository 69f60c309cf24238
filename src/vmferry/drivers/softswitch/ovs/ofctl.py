"""``ovs-ofctl`` and ``ovs-appctl``: running them (bounded, side by side) and parsing what they
print. Parsing and planning are pure functions, unit-tested without a switch.

Flows and meters go through ``ovs-ofctl -O OpenFlow13`` on the bridge's management socket
``unix:<rundir>/<bridge>.mgmt``; there is no OpenFlow library worth depending on. OpenFlow 1.3
cannot bundle meter changes: each is its own ``ovs-ofctl`` call, so independent ones run side
by side (at most ``PARALLEL_TOOLS`` at a time).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Collection, Iterable
from concurrent.futures import ThreadPoolExecutor

from vmferry.drivers.softswitch.base import FdbEntry, Flow, FlowStats, Meter, MeterStats
from vmferry.drivers.softswitch.ovs.flowtext import (
    DEFAULT_PRIORITY,
    MAC_RE,
    normalize_actions,
    normalize_match,
)
from vmferry.errors import InputError, SoftswitchError, WaitTimeout

OPENFLOW = "OpenFlow13"
PARALLEL_TOOLS = 8                         # ovs-ofctl calls run side by side at most


# ---- running the tools -------------------------------------------------------------------------

def run_tool(argv: list[str], what: str, timeout: float,
             stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run an OVS command-line tool for at most ``timeout`` seconds.

    Raises ``WaitTimeout``, ``SoftswitchError`` if it cannot start or exits non-zero (with its
    stderr as the cause and the argv).
    """
    try:
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                                timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise WaitTimeout(f"{argv[0]} to {what}", timeout) from exc
    except OSError as exc:
        raise SoftswitchError(f"cannot run {argv[0]} to {what}", cause=str(exc)) from exc
    if result.returncode != 0:
        raise SoftswitchError(f"{argv[0]} failed to {what}",
                              cause=(result.stderr or result.stdout).strip()[-800:],
                              argv=argv)
    return result


def run_tools(calls: list[tuple[list[str], str]], timeout: float) -> None:
    """Run independent tool calls side by side (at most ``PARALLEL_TOOLS`` at a time).

    Every call runs to its end even if one fails; then the first failure is raised.
    """
    if len(calls) <= 1:
        for argv, what in calls:
            run_tool(argv, what, timeout)
        return
    with ThreadPoolExecutor(max_workers=min(PARALLEL_TOOLS, len(calls)),
                            thread_name_prefix="ovs-ofctl") as pool:
        futures = [pool.submit(run_tool, argv, what, timeout) for argv, what in calls]
    for future in futures:
        future.result()


# ---- flows -------------------------------------------------------------------------------------

# Header fields ovs-ofctl prints before the match ("cookie=0x5, duration=1.2s, table=0, ...").
_HEADER_FIELDS = {"cookie", "duration", "table", "n_packets", "n_bytes", "idle_timeout",
                  "hard_timeout", "idle_age", "hard_age", "importance", "priority"}
_HEADER_FLAGS = {"send_flow_rem", "check_overlap", "reset_counts", "no_packet_counts",
                 "no_byte_counts"}


def parse_flow_line(line: str) -> FlowStats | None:
    """Parse one line of ``ovs-ofctl dump-flows`` into normalized ``FlowStats``.

    Returns None for lines that are not flows (the reply header).
    """
    line = line.strip()
    head, sep, actions = line.partition(" actions=")
    if not sep:
        if line.startswith("actions="):
            head, actions = "", line[len("actions="):]
        else:
            return None
    values: dict[str, str] = {}
    match_parts: list[str] = []
    for token in re.split(r",\s*", head.strip()):
        if not token:
            continue
        key, eq, value = token.partition("=")
        if eq and key in _HEADER_FIELDS:
            values[key] = value
        elif not eq and key in _HEADER_FLAGS:
            continue
        else:
            match_parts.append(token)
    if "priority" not in values and not match_parts and not actions:
        return None
    flow = Flow(table=int(values.get("table", "0")),
                priority=int(values.get("priority", str(DEFAULT_PRIORITY))),
                match=normalize_match(",".join(match_parts)),
                actions=normalize_actions(actions.strip()))
    return FlowStats(cookie=int(values.get("cookie", "0"), 0), flow=flow,
                     packets=int(values.get("n_packets", "0")),
                     bytes=int(values.get("n_bytes", "0")))


_COOKIE_RE = re.compile(r"^\s*cookie=(0x[0-9a-fA-F]+|\d+)")


def parse_dump_flows(text: str, cookies: Collection[int] | None = None) -> list[FlowStats]:
    """Parse ``ovs-ofctl dump-flows`` output (with or without ``--no-stats``).

    With ``cookies``, only flows carrying one of them are parsed and returned; the others are
    skipped before the (costly) normalization.
    """
    lines = text.splitlines()
    if cookies is not None:
        wanted = set(cookies)
        # --no-stats leaves out a zero cookie.
        lines = [line for line in lines
                 if (((found := _COOKIE_RE.match(line)) and int(found.group(1), 0)) or 0) in wanted]
    parsed = (parse_flow_line(line) for line in lines)
    return [stats for stats in parsed if stats is not None]



# ---- meters ------------------------------------------------------------------------------------

def check_meter(meter: Meter) -> None:
    """Raises ``InputError`` unless exactly one of kbps/pktps is a positive rate."""
    if meter.meter_id < 1 or meter.meter_id > 0xFFFF0000:
        raise InputError("meter.meter_id", f"{meter.meter_id} is not 1..0xffff0000")
    if (meter.kbps is None) == (meter.pktps is None):
        raise InputError(f"meter.{meter.meter_id}", "give exactly one of kbps and pktps")
    rate = meter.kbps if meter.kbps is not None else meter.pktps
    if rate is None or rate <= 0:
        raise InputError(f"meter.{meter.meter_id}", "rate must be positive")
    if meter.burst is not None and meter.burst <= 0:
        raise InputError(f"meter.{meter.meter_id}", "burst must be positive")


def meter_text(meter: Meter) -> str:
    """The ``add-meter``/``mod-meter`` argument: one drop band, stats on."""
    unit = "kbps" if meter.kbps is not None else "pktps"
    rate = meter.kbps if meter.kbps is not None else meter.pktps
    burst_flag = "burst," if meter.burst is not None else ""
    burst_size = f",burst_size={meter.burst}" if meter.burst is not None else ""
    return (f"meter={meter.meter_id},{unit},{burst_flag}stats,"
            f"bands=type=drop,rate={rate}{burst_size}")


def parse_dump_meters(text: str) -> list[Meter]:
    """Parse ``ovs-ofctl dump-meters``: a ``meter=`` line, then one ``type=`` line per band.

    Only the first drop band is kept (vmferry writes one).
    """
    meters: list[Meter] = []
    current: tuple[int, set[str]] | None = None
    band_seen = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("meter="):
            head = line.split()
            current = (int(head[0].split("=", 1)[1]), set(head[1:]))
            band_seen = False
        elif line.startswith("type=") and current is not None and not band_seen:
            band = dict(token.split("=", 1) for token in line.split() if "=" in token)
            if band.get("type") != "drop":
                continue
            band_seen = True
            meter_id, flags = current
            rate = int(band.get("rate", "0"))
            burst = int(band["burst_size"]) if "burst" in flags and "burst_size" in band else None
            if "pktps" in flags:
                meters.append(Meter(meter_id, pktps=rate, burst=burst))
            else:
                meters.append(Meter(meter_id, kbps=rate, burst=burst))
    return sorted(meters, key=lambda m: m.meter_id)


def parse_meter_stats(text: str) -> dict[int, MeterStats]:
    """Parse ``ovs-ofctl meter-stats``: a ``meter:`` line, then ``N: packet_count:...`` bands."""
    found: dict[int, MeterStats] = {}
    head: dict[str, str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("meter:"):
            head = dict(token.split(":", 1) for token in line.split() if ":" in token)
        elif head is not None and re.match(r"^\d+:", line):
            band = dict(token.split(":", 1) for token in line.split()[1:] if ":" in token)
            meter_id = int(head["meter"])
            found[meter_id] = MeterStats(
                meter_id=meter_id, flows=int(head.get("flow_count", "0")),
                packets_in=int(head.get("packet_in_count", "0")),
                bytes_in=int(head.get("byte_in_count", "0")),
                band_packets=int(band.get("packet_count", "0")),
                band_bytes=int(band.get("byte_count", "0")))
            head = None
    return found


def meters_after(actual: Iterable[Meter], desired: Iterable[Meter],
                 owned: Collection[int]) -> list[Meter]:
    """The meters on a bridge once ``plan_meter_changes(actual, desired, owned)`` is applied."""
    kept = [meter for meter in actual if meter.meter_id not in owned]
    return sorted([*kept, *desired], key=lambda m: m.meter_id)


def plan_meter_changes(actual: Iterable[Meter], desired: Iterable[Meter],
                       owned: Collection[int]) -> list[tuple[str, str]]:
    """``(ovs-ofctl command, argument)`` pairs making ``owned`` meters exactly ``desired``.

    Meters outside ``owned`` are never touched. Raises ``InputError`` for a desired meter
    whose id is not owned, or an invalid meter.
    """
    wanted = {}
    for meter in desired:
        check_meter(meter)
        if meter.meter_id not in owned:
            raise InputError("meters", f"meter {meter.meter_id} is not among the owned ids")
        wanted[meter.meter_id] = meter
    have = {meter.meter_id: meter for meter in actual if meter.meter_id in owned}
    changes: list[tuple[str, str]] = []
    for meter_id in sorted(owned):
        if meter_id in have and meter_id not in wanted:
            changes.append(("del-meter", f"meter={meter_id}"))
        elif meter_id in wanted and meter_id not in have:
            changes.append(("add-meter", meter_text(wanted[meter_id])))
        elif meter_id in wanted and have[meter_id] != wanted[meter_id]:
            changes.append(("mod-meter", meter_text(wanted[meter_id])))
    return changes


# ---- fdb ---------------------------------------------------------------------------------------

def parse_fdb_show(text: str) -> list[FdbEntry]:
    """Parse ``ovs-appctl fdb/show``: ``(port, vlan, mac)`` per learned entry."""
    entries = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and MAC_RE.match(parts[2]) and parts[1].isdigit():
            entries.append(FdbEntry(parts[0], int(parts[1]), parts[2].lower()))
    return entries

