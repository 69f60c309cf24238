"""Per-variant statistics and the comparisons against issue 10's targets (pure)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from vmferry.bench.migration.config import RunResult

METRICS = ("interruption_ms", "lost", "duplicates", "late", "max_rtt_ms", "tcp_stall_ms",
           "pause_ms", "network_share_ms", "lead_in_ms", "resume_to_timely_ms", "mac_moves_max",
           "qemu_downtime_ms", "total_ms", "bound_ms", "controller_cpu_ms",
           "completed_to_switchover_ms", "switchover_open_ms")
TARGET_NETWORK_SHARE_MS = 20.0
TARGET_DOWNTIME_VS_FLOOR = 1.2
TARGET_MAC_MOVES = 1


def summarize(values: Iterable[float | int | None]) -> dict[str, float | int | None]:
    """Median, min and max of the values that are not None (all None when there are none)."""
    present = [v for v in values if v is not None]
    if not present:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(present), "min": min(present), "max": max(present),
            "n": len(present)}


def summarize_runs(runs: Sequence[RunResult]) -> dict[str, dict[str, float | int | None]]:
    """Per metric, the statistics of the successful runs."""
    ok = [r for r in runs if r.ok]
    return {metric: summarize(getattr(r, metric) for r in ok) for metric in METRICS}


def _ratio(a: float | int | None, b: float | int | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def _diff(a: float | int | None, b: float | int | None) -> float | None:
    return None if a is None or b is None else round(a - b, 1)


def compare(results: Mapping[str, Sequence[RunResult]]) -> dict[str, dict[str, Any]]:
    """The figures the targets talk about, each with its target and whether it is met
    (``met`` is None when a figure cannot be computed, e.g. a variant was not run)."""
    medians = {name: {m: s["median"] for m, s in summarize_runs(runs).items()}
               for name, runs in results.items()}
    vmferry = medians.get("vmferry", {})
    floor = medians.get("floor", {})
    ovn = medians.get("ovn", {})
    ok = [r for r in results.get("vmferry", []) if r.ok]
    figures: dict[str, tuple[float | int | None, float, str]] = {
        "interruption_minus_ovn_ms": (
            _diff(vmferry.get("interruption_ms"), ovn.get("interruption_ms")), 0.0,
            "vmferry interruption - OVN interruption, ms (medians)"),
        "interruption_minus_floor_ms": (
            _diff(vmferry.get("interruption_ms"), floor.get("interruption_ms")), 0.0,
            "vmferry interruption - floor interruption, ms (medians)"),
        "duplicates_max": (max((r.duplicates or 0 for r in ok), default=None), 0.0,
                           "vmferry duplicate replies, worst run"),
        "lost_minus_ovn": (_diff(vmferry.get("lost"), ovn.get("lost")), 0.0,
                           "vmferry probes lost - OVN probes lost (medians)"),
        "network_share_ms": (vmferry.get("network_share_ms"), TARGET_NETWORK_SHARE_MS,
                             "vmferry interruption - pause, ms (median)"),
        "downtime_vs_floor": (_ratio(vmferry.get("qemu_downtime_ms"),
                                     floor.get("qemu_downtime_ms")),
                              TARGET_DOWNTIME_VS_FLOOR,
                              "vmferry QEMU downtime / floor QEMU downtime (medians)"),
        "mac_moves_max": (max((r.mac_moves_max for r in ok if r.mac_moves_max is not None),
                              default=None), float(TARGET_MAC_MOVES),
                          "vmferry MAC moves on one switch in one migration, worst"),
    }
    return {name: {"value": value, "target_max": target, "what": what,
                   "met": None if value is None else value <= target}
            for name, (value, target, what) in figures.items()}
