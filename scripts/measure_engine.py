"""Measure the migration engine's own cost on a real lab (issue 9's before/after figures).

Migrates one idle VM back and forth N times through the real CLI and prints, per migration:
- completed->switchover (ms): from QEMU's completion to the switchover phase's start: from
  the engine's record (QMP ``completed`` event timestamp) when it has one, and always also
  derived as precopy phase start + QEMU ``total_time_ms`` (all an older engine offers);
- controller CPU (ms): user+system time of the controller process (/proc/PID/stat) across
  the migration (the whole process: engine thread, API, heartbeats);
- engine CPU (ms): the run's own thread CPU when the record has ``result.controller_cpu_ms``.

Usage (root, serialized with the functional-test lock):
    flock /tmp/vmferry-functional.lock timeout 900 python scripts/measure_engine.py --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "functional"))

from labkit import default_topology, running_lab

TICK = os.sysconf("SC_CLK_TCK")


def cpu_ms(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / TICK


def completed_to_switchover_ms(record: dict[str, Any]) -> tuple[float | None, float | None]:
    """(from QEMU's completed event, derived from precopy start + QEMU total_time_ms).

    The derived figure is all an engine without event timestamps offers; it overstates by
    the time from the precopy phase's start to QEMU's migrate command."""
    phases = {p["phase"]: p for p in record["phases"]}
    switch = datetime.fromisoformat(phases["switchover"]["started"]).timestamp()
    events = record["result"].get("events") or {}
    event = None
    if record["result"].get("completed_to_switchover_ms") is not None:
        event = float(record["result"]["completed_to_switchover_ms"])
    elif events.get("source_completed"):
        event = (switch - float(events["source_completed"])) * 1000
    total = (record["result"].get("qemu") or {}).get("total_time_ms")
    derived = None
    if total is not None:
        precopy = datetime.fromisoformat(phases["precopy"]["started"]).timestamp()
        derived = (switch - (precopy + total / 1000)) * 1000
    return event, derived


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--lab", default="cseam")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="vmferry-measure-"))
    rows = []
    with running_lab(state, default_topology(args.lab)) as lab:
        lab_state = json.loads((state / "labs" / args.lab / "lab.json").read_text())
        pid = int(lab_state["pids"]["controller"])
        lab.cli("vm", "create", "m1", "--host", "host1", "--vlan", "100", "--ip",
                "192.0.2.10/24", "--memory", "256")
        try:
            for i in range(args.runs):
                to = "host3" if i % 2 == 0 else "host1"
                before = cpu_ms(pid)
                out = lab.cli("migrate", "m1", "--to", to, "--json", timeout=400)
                after = cpu_ms(pid)
                record = json.loads(out.stdout)
                assert record["state"] == "completed", record
                event, derived = completed_to_switchover_ms(record)
                rows.append({"to": to, "completed_to_switchover_ms": event,
                             "derived_completed_to_switchover_ms": derived,
                             "controller_cpu_ms": after - before,
                             "engine_cpu_ms": record["result"].get("controller_cpu_ms"),
                             "qemu_total_ms": (record["result"].get("qemu") or {})
                             .get("total_time_ms")})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            lab.cli("vm", "delete", "m1", check=False)
    for key in ("completed_to_switchover_ms", "derived_completed_to_switchover_ms",
                "controller_cpu_ms", "engine_cpu_ms"):
        values = [r[key] for r in rows if r[key] is not None]
        if values:
            print(f"{key}: median {statistics.median(values):.1f} "
                  f"(min {min(values):.1f}, max {max(values):.1f}, n={len(values)})")


if __name__ == "__main__":
    main()
