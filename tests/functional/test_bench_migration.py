"""Issue 4's benchmark runs in one go on a lab of its own and reports every variant.

A smoke test, not a timed one: the figures depend on the machine's load, so only their
presence is checked. The lab must be gone afterwards, also when the benchmark fails."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from labkit import IMAGE_DIR, VMFERRY, leftovers

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(1200)]

LAB = "tbench"


def test_bench_migration_reports_all_three_variants(tmp_path: Path) -> None:
    state = tmp_path / "state"
    output = tmp_path / "migration.json"
    env = {**os.environ, "VMFERRY_IMAGE_DIR": os.environ.get("VMFERRY_IMAGE_DIR", IMAGE_DIR)}
    try:
        result = subprocess.run(
            [*VMFERRY, "bench", "migration", "--runs", "1", "--lab-name", LAB,
             "--state-dir", str(state), "--output", str(output)],
            env=env, check=False, capture_output=True, text=True, timeout=1100)
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
        assert "vmferry" in result.stdout and "floor" in result.stdout
        document = json.loads(output.read_text())
        assert set(document["variants"]) == {"floor", "vmferry", "naive"}
        for name, variant in document["variants"].items():
            assert variant["error"] is None, name
            assert variant["runs_ok"] == 1, name
            run = variant["runs"][0]
            assert run["source"] != run["destination"]
            for metric in ("interruption_ms", "lost", "duplicates", "late", "tcp_stall_ms",
                           "pause_ms", "network_share_ms", "mac_moves_max", "qemu_downtime_ms",
                           "total_ms"):
                assert isinstance(run[metric], (int, float)), (name, metric)
                assert variant["summary"][metric]["n"] == 1, (name, metric)
            assert set(run["mac_moves"]) == {"tor1", "spine", "tor2"}, run["mac_moves"]
        vmferry = document["variants"]["vmferry"]["runs"][0]
        assert isinstance(vmferry["controller_cpu_ms"], (int, float))
        assert isinstance(vmferry["completed_to_switchover_ms"], (int, float))
        assert set(document["comparisons"]) >= {
            "interruption_minus_floor_ms", "duplicates_max", "network_share_ms",
            "downtime_vs_floor", "mac_moves_max"}
    finally:
        assert leftovers(LAB, state) == []
