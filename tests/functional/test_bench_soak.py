"""Issue 11's soak runs in one command on a lab of its own: every move completed, its memory
verified by a full pass of the guest's check that began after it, audit clean after each
move and at the end, and the lab gone afterwards (also when the soak fails).

A smoke test, not a timed one: only the presence of the times is checked. The lab is the
smallest that migrates (two hosts under one switch) to keep it short."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from labkit import IMAGE_DIR, VMFERRY, leftovers

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(900)]

LAB = "tsoak"
TOPOLOGY = {
    "name": LAB, "kind": "lab", "migration_network": "203.0.113.0/24",
    "vlans": [{"id": 100, "name": "tenant-a", "subnet": "192.0.2.0/24"}],
    "switches": [{"name": "tor1", "role": "tor", "rack": "rack1"}],
    "racks": [{"name": "rack1", "tor": "tor1"}],
    "hosts": [{"name": "host1", "rack": "rack1", "memory_mib": 1024},
              {"name": "host2", "rack": "rack1", "memory_mib": 1024}],
}


def test_bench_soak_checks_every_move_and_passes_a_clean_site(tmp_path: Path) -> None:
    state = tmp_path / "state"
    output = tmp_path / "soak.json"
    topology = tmp_path / "topology.yaml"
    topology.write_text(yaml.safe_dump(TOPOLOGY))
    env = {**os.environ, "VMFERRY_IMAGE_DIR": os.environ.get("VMFERRY_IMAGE_DIR", IMAGE_DIR)}
    try:
        result = subprocess.run(
            [*VMFERRY, "bench", "soak", "--migrations", "2", "--guests", "1", "--seed", "11",
             "--memory", "128", "--memcheck-mib", "4", "--workload-mibps", "4",
             "--lab-name", LAB, "--topology", str(topology), "--state-dir", str(state),
             "--output", str(output)],
            env=env, check=False, capture_output=True, text=True, timeout=840)
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
        assert "PASSED" in result.stdout
        document = json.loads(output.read_text())
        assert document["config"]["seed"] == 11
        assert document["config"]["full_pass_after_move"] is True
        for counter, value in (("migrations", 2), ("completed", 2), ("failures", 0),
                               ("corruptions", 0), ("unverified", 0), ("leftovers", 0)):
            assert document[counter] == value, (counter, document)
        assert document["final_leftovers"] == []          # the guests were deleted cleanly
        assert document["passed"] is True
        for move in document["moves"]:
            assert {move["source"], move["destination"]} == {"host1", "host2"}
            assert move["memory_intact"] is True
            after = move["memory"]["after_move"]
            assert after["passes"] >= 2 and after["new_failures"] == 0, after
            assert move["memory"]["controller"]["intact"] is True
            assert 0 < move["moved_s"] <= move["total_s"]
        assert document["moves"][1]["source"] == document["moves"][0]["destination"]
        assert isinstance(document["p50_s"], float) and isinstance(document["p95_s"], float)
    finally:
        assert leftovers(LAB, state) == []
