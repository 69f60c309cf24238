"""``vmferry bench migration``: one lab, every variant's guest placed once, then the variants'
migrations interleaved (floor, vmferry, naive, ovn, floor, ...) so that load drift spreads over
all of them, each under the same probes from the same client position: a ping every 1-2 ms
and a TCP echo session every 10 ms (``probe.py``, ``tcpecho.py``)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmferry.bench.migration.config import ADDRESSES, BenchConfig, RunResult, Timing
from vmferry.bench.migration.lab import BenchLab, free_port, mac_changes
from vmferry.bench.migration.ovn import Ovn
from vmferry.bench.migration.probe import (
    PingProbe,
    ProbeResult,
    parse_ping_pair,
    wait_reachable,
)
from vmferry.bench.migration.statistics import compare, summarize, summarize_runs
from vmferry.bench.migration.tcpecho import EchoSession
from vmferry.bench.migration.variants import Floor, Naive, Variant, Vmferry
from vmferry.errors import VmferryError
from vmferry.model.switchover import path_ports
from vmferry.model.topology import default_topology_path, load_topology

log = logging.getLogger(__name__)

VARIANTS: dict[str, type[Variant]] = {v.name: v for v in (Floor, Vmferry, Naive, Ovn)}
MAX_FAILURES = 3          # a variant whose moves fail this often is given up


def split(result: RunResult, seen: ProbeResult, timing: Timing) -> None:
    """The interruption's split: the guest's own pause (source STOP to destination RESUME, QMP
    timestamps) and what the network adds (the network share: the interruption minus the
    pause; also from RESUME to the first timely reply, and from the last timely probe to
    STOP). Without QMP events, the pause is QEMU's reported downtime."""
    stop, resume = timing.events.get("source_stop"), timing.events.get("destination_resume")
    if stop is not None and resume is not None:
        result.pause_ms = round((resume - stop) * 1000, 1)
        if seen.first_timely_after is not None:
            result.resume_to_timely_ms = round((seen.first_timely_after - resume) * 1000, 1)
        if seen.interruption_from is not None:
            result.lead_in_ms = round((stop - seen.interruption_from) * 1000, 1)
        result.events = dict(timing.events)
        result.split = "QMP events"
    elif result.qemu_downtime_ms is not None:
        result.pause_ms = float(result.qemu_downtime_ms)
        result.split = "derived: QEMU downtime (no QMP events)"
    if result.pause_ms is not None:
        result.network_share_ms = round(seen.interruption_ms - result.pause_ms, 1)


def measure(variant: Variant, run: int, source: str, destination: str,
            link_mbps: float | None) -> RunResult:
    """One migration under the probes. Failures become a failed RunResult, not an exception."""
    config, lab = variant.config, variant.lab
    namespace = variant.probe_namespace
    result = RunResult(variant=variant.name, run=run, source=source, destination=destination,
                       ok=False)
    switches = list(path_ports(lab.topology, source, destination))
    window_s = config.warmup_s + config.migration_timeout_s + 60
    try:
        before, after = variant.addresses(destination)
    except VmferryError as exc:
        result.error = exc.message
        return result
    probe = PingProbe(namespace, before, interval_ms=config.interval_ms, max_seconds=window_s)
    # A move that changes the guest's address: a second ping, to the address it takes.
    second = (PingProbe(namespace, after, interval_ms=config.interval_ms,
                        max_seconds=window_s) if after != before else None)
    echo = EchoSession(namespace, before, interval_ms=config.tcp_interval_ms,
                       max_seconds=window_s)
    try:
        variant.restore(source)
        wait_reachable(namespace, before, timeout=60)
        trace = lab.mac_trace_start(switches)
        moves_before = lab.mac_moves(switches)
        try:
            echo.start(timeout=30)
            echoing = True
        except VmferryError as exc:     # a busy guest may not accept in time: ping still runs
            result.tcp = {"error": exc.message}
            echoing = False
        probe.start()
        if second is not None:
            second.start()
        time.sleep(config.warmup_s)
        moved_at = time.time()
        timing = variant.migrate(source, destination)
        time.sleep(config.tail_s)
        seen = _stop_probes(probe, second, moved_at)
        if second is not None and (published := variant.published_address()) != after:
            raise ValueError(f"the guest's published address is {published}, the probe "
                             f"pinged {after}")
        if echoing:
            result.tcp = echo.stop()
        moves_after = lab.mac_moves(switches)
        result.mac_trace = lab.mac_trace_read(trace)
    except (VmferryError, ValueError) as exc:
        _kill(probe, second, echo)
        result.error = getattr(exc, "message", str(exc))
        return result
    except BaseException:
        _kill(probe, second, echo)
        raise
    result.ok = True
    result.interruption_ms = seen.interruption_ms
    result.lost, result.duplicates, result.late = seen.lost, seen.duplicates, seen.late
    result.max_rtt_ms = seen.max_rtt_ms
    result.tcp_stall_ms = result.tcp.get("longest_stall_ms")
    result.probe = seen.as_dict()
    result.mac_moves = {s: moves_after[s] - moves_before[s] for s in switches}
    result.mac_moves_max = max(result.mac_moves.values(), default=0)
    result.mac_changes = mac_changes(result.mac_trace)
    result.total_ms = round(timing.total_ms, 1)
    result.qemu_downtime_ms = timing.qemu.get("downtime_ms")
    result.qemu_total_ms = timing.qemu.get("total_time_ms")
    result.transferred_bytes = timing.qemu.get("transferred_bytes")
    if result.transferred_bytes and link_mbps:
        result.bound_ms = round(result.transferred_bytes * 8 / (link_mbps * 1e6) * 1000, 1)
    result.controller_cpu_ms = timing.controller_cpu_ms
    result.completed_to_switchover_ms = timing.completed_to_switchover_ms
    result.completed_to_switchover_how = timing.completed_to_switchover_how
    result.switchover_open_ms = timing.switchover_open_ms
    result.phases = timing.phases
    split(result, seen, timing)
    return result


def run_benchmark(config: BenchConfig, say: Callable[[str], None] = lambda _: None,
                  on_run: Callable[[RunResult], None] = lambda _: None,
                  on_report: Callable[[dict[str, Any]], None] = lambda _: None,
                  ) -> dict[str, Any]:
    """Bring a lab up, place every variant's guest, run the variants interleaved
    ``config.runs`` times each, bring the lab down (also on failure); returns the report,
    also given to ``on_report`` after every run (a benchmark cut short keeps its runs).
    Raises ``VmferryError`` when the lab cannot be brought up."""
    default = default_topology_path()
    if config.boundary is not None:
        default = default.with_name("routed-rack.yaml")
    topology = load_topology(config.topology or default)
    topology = topology.model_copy(update={"name": config.lab_name})
    lab = BenchLab(topology, config.controller_port or free_port())
    started_at = datetime.now(UTC)
    results: dict[str, list[RunResult]] = {name: [] for name in config.variants}
    errors: dict[str, str] = {}
    placed: dict[str, tuple[Variant, str]] = {}
    failures: dict[str, int] = {}
    link_mbps: float | None = None
    try:
        lab.up(say)
        home, away = lab.rack_hosts(config.boundary, config.vlan)
        if config.boundary == "dual":
            lab.route_to_routed_racks(config.client)
        try:
            link_mbps = lab.link_mbps(home, away)
        except VmferryError as exc:
            log.warning("migration link not measured: %s", exc.message)
        for name in config.variants:
            variant = VARIANTS[name](lab, config, ADDRESSES[name])
            say(f"{name}: placing the guest on {home}")
            if _place(variant, home, errors):
                placed[name] = (variant, home)
        for run in range(1, config.runs + 1):
            for name in list(placed):
                if name in errors:
                    continue
                variant, where = placed[name]
                destination = away if where == home else home
                say(f"{name}: run {run}/{config.runs}, {where} -> {destination}")
                result = measure(variant, run, where, destination, link_mbps)
                results[name].append(result)
                on_run(result)
                on_report(report(config, results, errors, started_at, (home, away)))
                if not result.ok:
                    # A failed move (vmferry rolls back; a hand-driven one may leave the
                    # guest anywhere) ends the variant only when it repeats.
                    failures[name] = failures.get(name, 0) + 1
                    if failures[name] >= MAX_FAILURES or not _still_on(variant, where):
                        errors[name] = result.error or "failed"
                    continue
                placed[name] = (variant, destination)
    finally:
        for variant, where in placed.values():
            _finish(variant, where, errors)
        say("lab down")
        lab.down()
    document = report(config, results, errors, started_at,
                      lab.rack_hosts(config.boundary, config.vlan))
    document["boundary"] = config.boundary
    document["migration_link_mbps"] = link_mbps
    return document


def _stop_probes(probe: PingProbe, second: PingProbe | None, moved_at: float) -> ProbeResult:
    """What the probes saw: one address's ping, or both addresses' (a dual NIC move)."""
    if second is None:
        return probe.stop(moved_at)
    before, _ = probe.stop_output()
    after, ended_at = second.stop_output()
    return parse_ping_pair(before, after, probe.interval_ms, moved_at, ended_at)


def _kill(probe: PingProbe, second: PingProbe | None, echo: EchoSession) -> None:
    probe.kill()
    if second is not None:
        second.kill()
    echo.kill()


def _still_on(variant: Variant, where: str) -> bool:
    """Whether the variant's guest still answers from ``where`` after a failed move."""
    try:
        variant.restore(where)
        wait_reachable(variant.probe_namespace, variant.address, timeout=30)
        return True
    except VmferryError:
        return False


def _place(variant: Variant, home: str, errors: dict[str, str], tries: int = 2) -> bool:
    """Start the variant's guest on ``home`` and wait until it answers, one at a time (a
    guest booting under TCG takes a core; starting the next meanwhile has failed QEMU's
    first QMP connection); a failed placement is cleaned up and tried again once."""
    for attempt in range(1, tries + 1):
        try:
            variant.prepare(home)
            wait_reachable(variant.probe_namespace, variant.address, timeout=90)
            errors.pop(variant.name, None)
            return True
        except VmferryError as exc:
            log.warning("placing %s (try %d): %s", variant.name, attempt, exc.message)
            errors[variant.name] = exc.message
            _finish(variant, home, errors)
    return False


def _finish(variant: Variant, where: str, errors: dict[str, str]) -> None:
    try:
        variant.finish(where)
    except VmferryError as exc:
        errors.setdefault(variant.name, f"cleanup: {exc.message}")


def report(config: BenchConfig, results: dict[str, list[RunResult]], errors: dict[str, str],
           started_at: datetime, hosts: tuple[str, str]) -> dict[str, Any]:
    """The JSON document: configuration, every run, per-variant statistics, the comparisons."""
    return {
        "benchmark": "migration",
        "started_at": started_at.isoformat(),
        "ended_at": datetime.now(UTC).isoformat(),
        "config": {**asdict(config), "topology": str(config.topology or default_topology_path()),
                   "variants": list(config.variants)},
        "hosts": list(hosts),
        "probe": (f"ping -D every {config.interval_ms} ms and a TCP echo every "
                  f"{config.tcp_interval_ms:g} ms, from {config.client} (OVN: its rack-1 "
                  f"client)"),
        "variants": {
            name: {"description": VARIANTS[name].description,
                   "summary": summarize_runs(runs),
                   # How often ping really sent (a loaded machine makes it fall behind).
                   "probe_interval_ms": summarize(r.probe.get("effective_interval_ms")
                                                  for r in runs if r.ok),
                   "split": sorted({r.split for r in runs if r.ok and r.split}),
                   "runs_ok": sum(1 for r in runs if r.ok),
                   "error": errors.get(name),
                   "runs": [asdict(r) for r in runs]}
            for name, runs in results.items()},
        "comparisons": compare(results),
    }


def write_report(document: dict[str, Any], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(output.suffix + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, default=str) + "\n")
    os.replace(tmp, output)
