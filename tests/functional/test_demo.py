"""`make demo`'s script ends with a VM answering the client's ping on its VLAN."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from labkit import IMAGE_DIR, free_port, leftovers

pytestmark = [pytest.mark.root, pytest.mark.slow]

DEMO = Path(__file__).resolve().parents[2] / "scripts" / "demo.py"


def test_demo_migrates_a_vm_that_keeps_answering(tmp_path: Path) -> None:
    env = {**os.environ, "VMFERRY_STATE_DIR": str(tmp_path),
           "VMFERRY_IMAGE_DIR": os.environ.get("VMFERRY_IMAGE_DIR", IMAGE_DIR),
           "VMFERRY_DEMO_CONTROLLER_PORT": str(free_port())}
    vmferry = [sys.executable, "-m", "vmferry"]
    try:
        result = subprocess.run([sys.executable, str(DEMO)], env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
        assert "migration 1 of web1 host1 → host3: completed" in result.stdout
        assert "web1 answers client-100's ping on VLAN 100" in result.stdout
    finally:
        subprocess.run([*vmferry, "lab", "down", "--lab", "lab"], env=env, capture_output=True,
                       timeout=120)
    assert leftovers("lab", tmp_path) == []
