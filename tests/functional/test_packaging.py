"""The wheel: built from the tracked sources, installed into a fresh venv, it runs.

No root and no lab: a copy of the project is built with `pip wheel --no-deps` (its own build
isolation, as any installer would), the wheel goes into a new venv (dependencies from the
package index, through pip's cache), and the CLI, the store's migrations and the dashboard are
used from that venv alone (no PYTHONPATH, another working directory)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from labkit import free_port

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "vmferry"
# Package data the daemons need at run time: the store's migrations, the dashboard, examples.
DATA_DIRS = ["store/alembic", "controller/static", "examples", "image"]
SKIP = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__",
                              "bench-results", ".mypy_cache", ".ruff_cache", ".pytest_cache",
                              ".hypothesis")


def _run(argv: list[str], *, cwd: Path, timeout: float = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source") / "vmferry"
    shutil.copytree(ROOT, source, ignore=SKIP)
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
         cwd=out)
    [built] = list(out.glob("vmferry-*.whl"))
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The bin directory of a new venv with the wheel (and its dependencies) installed."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    _run([str(bin_dir / "python"), "-m", "pip", "install", "-q", str(wheel)], cwd=env_dir)
    yield bin_dir


def test_wheel_holds_every_data_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"vmferry/{p.relative_to(PACKAGE)}" for d in DATA_DIRS
                for p in (PACKAGE / d).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}
    assert {"vmferry/store/alembic.ini", "vmferry/py.typed",
            "vmferry/controller/static/index.html"} <= names
    assert any(n.startswith("vmferry/store/alembic/versions/") for n in expected)
    assert sorted(expected - names) == []


def test_installed_cli_runs_from_the_venv(installed: Path, tmp_path: Path) -> None:
    vmferry = str(installed / "vmferry")
    assert "controller" in _run([vmferry, "--help"], cwd=tmp_path)
    for daemon in ("controller", "agent"):
        text = _run([vmferry, daemon, "serve", "--help"], cwd=tmp_path)
        assert "--config" in text and "--listen" in text
    where = _run([str(installed / "python"), "-c", "import vmferry; print(vmferry.__file__)"],
                 cwd=tmp_path)
    assert where.startswith(str(installed.parent)), where


# The installed package's own data at work: Alembic migrates a new store from the wheel's
# scripts, and the controller serves the dashboard page from the wheel's static folder.
USE_DATA = """
import sys
from fastapi.testclient import TestClient
from vmferry.controller.app import create_app
from vmferry.controller.service import Controller
from vmferry.model.topology import default_topology_path
from vmferry.store.db import Store
store = Store("sqlite:///" + sys.argv[1])
store.create_schema()
page = TestClient(create_app(Controller(store))).get("/")
assert page.status_code == 200 and "<title>vmferry" in page.text, page.status_code
assert default_topology_path().is_file()
print("ok")
"""


def test_installed_package_data_works(installed: Path, tmp_path: Path) -> None:
    out = _run([str(installed / "python"), "-c", USE_DATA, str(tmp_path / "store.db")],
               cwd=tmp_path)
    assert out.strip() == "ok"


def test_installed_controller_serves_from_its_config_file(installed: Path,
                                                          tmp_path: Path) -> None:
    """The daemon as its unit starts it: `controller serve --config FILE`, nothing else."""
    port = free_port()
    (tmp_path / "admin.token").write_text("packaging-test-admin-token\n")
    config = tmp_path / "controller.toml"
    config.write_text(f'db = "sqlite:///{tmp_path / "c.db"}"\nlisten = ["127.0.0.1:{port}"]\n'
                      'bootstrap-token-file = "admin.token"\n')
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    daemon = subprocess.Popen([str(installed / "vmferry"), "controller", "serve", "--config",
                               str(config)], cwd="/", env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert daemon.poll() is None, daemon.communicate()[1]
            try:
                tokens = httpx.get(f"http://127.0.0.1:{port}/v1/tokens", timeout=2, headers={
                    "Authorization": "Bearer packaging-test-admin-token"})
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the controller never answered"
                time.sleep(0.2)
        # Only an admin may list tokens: the bootstrap token from the config was registered.
        assert tokens.status_code == 200, tokens.text
        assert [t["role"] for t in tokens.json()] == ["admin"]
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
