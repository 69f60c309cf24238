"""Issues 4 and 6: `vmferry bench migration --peer ovn` runs in one go on a lab of its own and
reports every variant: the floor, vmferry and the naive order (issue 4's benchmark) and OVN
side by side with them (issue 6's peer). A peer is one more variant of the same run, so this
one test also stands for the run without a peer (it was test_bench_migration.py, merged here
to build and boot one benchmark lab instead of two).

A smoke test, not a timed one: the figures depend on the machine's load, so only their presence
is checked. The lab, the OVN daemons and their namespaces must be gone afterwards, also when
the benchmark fails."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from labkit import IMAGE_DIR, VMFERRY, leftovers

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(1500)]

LAB = "ovnb"
METRICS = ("interruption_ms", "lost", "duplicates", "late", "tcp_stall_ms", "pause_ms",
           "network_share_ms", "mac_moves_max", "qemu_downtime_ms", "total_ms")


def test_bench_migration_reports_every_variant_and_ovn_as_peer(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    # A short directory: the lab's unix sockets must fit in 107 bytes.
    base = tmp_path_factory.mktemp("ob")
    state = base / "state"
    output = base / "migration.json"
    env = {**os.environ, "VMFERRY_IMAGE_DIR": os.environ.get("VMFERRY_IMAGE_DIR", IMAGE_DIR)}
    try:
        result = subprocess.run(
            [*VMFERRY, "bench", "migration", "--peer", "ovn", "--runs", "1", "--lab-name", LAB,
             "--state-dir", str(state), "--output", str(output)],
            env=env, check=False, capture_output=True, text=True, timeout=1400)
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
        assert all(name in result.stdout for name in ("floor", "vmferry", "naive", "ovn"))
        document = json.loads(output.read_text())
        assert set(document["variants"]) == {"floor", "vmferry", "naive", "ovn"}
        for name, variant in document["variants"].items():
            assert variant["error"] is None, (name, variant["error"])
            assert variant["runs_ok"] == 1, name
            run = variant["runs"][0]
            assert run["source"] != run["destination"]
            for metric in METRICS:
                assert isinstance(run[metric], (int, float)), (name, metric)
                assert variant["summary"][metric]["n"] == 1, (name, metric)
            assert set(run["mac_moves"]) == {"tor1", "spine", "tor2"}, (name, run["mac_moves"])
        vmferry = document["variants"]["vmferry"]["runs"][0]
        assert isinstance(vmferry["controller_cpu_ms"], (int, float))
        assert isinstance(vmferry["completed_to_switchover_ms"], (int, float))
        assert set(document["comparisons"]) >= {
            "interruption_minus_floor_ms", "duplicates_max", "network_share_ms",
            "downtime_vs_floor", "mac_moves_max"}
        assert document["comparisons"]["lost_minus_ovn"]["value"] is not None
        assert document["comparisons"]["interruption_minus_ovn_ms"]["value"] is not None
    finally:
        assert leftovers(LAB, state) == []
        # The OVN daemons run from the lab's directory: none may survive it.
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert not [line for line in ps.splitlines()
                    if line.startswith("ovn") and str(state) in line]
