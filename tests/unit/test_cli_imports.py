"""A `vmferry` command loads only what it uses.

The functional tests start `vmferry` hundreds of times; each start once cost over a second of
imports (the lab builder and through it the agent's web app, the API models, cryptography) that
most commands never touch. A fresh interpreter per case: sys.modules of this one is shared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")

# Heavy modules and the commands that may load them; no other command may.
HEAVY = ["vmferry.lab.builder", "vmferry.agent.app", "vmferry.api.controller", "vmferry.pki",
         "vmferry.controller.service", "cryptography", "fastapi", "sqlalchemy"]


def loaded_after(argv: list[str], tmp_path: Path) -> set[str]:
    """The modules of HEAVY loaded once ``vmferry ARGV`` has parsed its command line and run
    (with no controller to reach, API commands fail after their imports)."""
    script = (
        "import json, sys\n"
        "from vmferry.cli.main import app\n"
        "try:\n"
        f"    app({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n")
    env = {**os.environ, "PYTHONPATH": SRC, "VMFERRY_STATE_DIR": str(tmp_path),
           "VMFERRY_CONTROLLER": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("argv", [
    ["vm", "list", "--json"],
    ["fabric", "show", "--json"],
    ["migration", "show", "1", "--json"],
    ["--help"],
])
def test_api_commands_load_nothing_heavy(argv: list[str], tmp_path: Path) -> None:
    assert loaded_after(argv, tmp_path) == set()


def test_migrate_loads_the_api_models_but_not_the_lab(tmp_path: Path) -> None:
    loaded = loaded_after(["migrate", "vm1", "--to", "host2", "--detach"], tmp_path)
    assert "vmferry.api.controller" in loaded       # it validates its request with them
    assert not loaded & {"vmferry.lab.builder", "vmferry.agent.app", "vmferry.pki"}


def test_lab_commands_load_no_agent_app(tmp_path: Path) -> None:
    loaded = loaded_after(["lab", "down", "--lab", "nosuchlab"], tmp_path)
    assert "vmferry.lab.builder" in loaded
    assert "vmferry.agent.app" not in loaded
