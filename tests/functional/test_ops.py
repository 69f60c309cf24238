"""What deploy/ ships is checked by the tools that will read it: systemd and Prometheus.

No root and no lab. The tools come from scripts/install-system-deps.sh (systemd, prometheus)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmferry.controller.metrics import Metrics
from vmferry.store.db import Store

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNITS = ["vmferry-controller.service", "vmferry-agent@.service"]
INSTALLED_BINARY = "/opt/vmferry/bin/vmferry"      # where the units expect the install
# Highest `systemd-analyze security` exposure (0 safe .. 10 exposed, times 10) each unit may
# reach: a unit that loses a hardening option fails here.
EXPOSURE_LIMIT = {"vmferry-controller.service": 20, "vmferry-agent@host1.service": 40}


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: run scripts/install-system-deps.sh"
    return path


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """The shipped units, pointing at this checkout's vmferry instead of /opt/vmferry (systemd
    checks that the program exists)."""
    vmferry = Path(sys.executable).with_name("vmferry")
    assert vmferry.exists(), vmferry
    for name in UNITS:
        text = (DEPLOY / "systemd" / name).read_text()
        assert f"ExecStart={INSTALLED_BINARY} " in text
        (tmp_path / name).write_text(text.replace(INSTALLED_BINARY, str(vmferry)))
    return tmp_path


def test_systemd_units_verify(units: Path) -> None:
    result = run([tool("systemd-analyze"), "verify", "vmferry-controller.service",
                  "vmferry-agent@host1.service"], units)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@pytest.mark.parametrize("unit", sorted(EXPOSURE_LIMIT))
def test_systemd_units_stay_hardened(units: Path, unit: str) -> None:
    result = run([tool("systemd-analyze"), "security", "--offline=true",
                  f"--threshold={EXPOSURE_LIMIT[unit]}", unit], units)
    level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert level, result.stdout + result.stderr
    assert result.returncode == 0, f"{unit} exposure {level.group(1)}:\n{result.stdout}"


def test_a_broken_unit_is_caught(tmp_path: Path) -> None:
    """The verify step above can fail: a unit with an unknown option does."""
    broken = (DEPLOY / "systemd" / "vmferry-controller.service").read_text().replace(
        f"ExecStart={INSTALLED_BINARY}", f"ExecStart={Path(sys.executable).with_name('vmferry')}")
    (tmp_path / "vmferry-controller.service").write_text(broken + "ProtectSytem=strict\n")
    result = run([tool("systemd-analyze"), "verify", "vmferry-controller.service"], tmp_path)
    assert "ProtectSytem" in result.stderr


def test_alerting_rules_check() -> None:
    result = run([tool("promtool"), "check", "rules", "vmferry-rules.yml"],
                 DEPLOY / "prometheus")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


def test_alerting_rules_fire_and_stay_quiet() -> None:
    """vmferry-rules.test.yml has, for each alert, series that fire it and series that don't."""
    result = run([tool("promtool"), "test", "rules", "vmferry-rules.test.yml"],
                 DEPLOY / "prometheus")
    assert result.returncode == 0, result.stdout + result.stderr
    tests = (DEPLOY / "prometheus" / "vmferry-rules.test.yml").read_text()
    rules = (DEPLOY / "prometheus" / "vmferry-rules.yml").read_text()
    for alert in re.findall(r"- alert: (\w+)", rules):
        assert f"alertname: {alert}" in tests, f"{alert} has no promtool test"


def test_scrape_config_checks(tmp_path: Path) -> None:
    shutil.copy(DEPLOY / "prometheus" / "vmferry-rules.yml", tmp_path)
    token = tmp_path / "vmferry.token"
    token.write_text("not-a-real-token\n")
    config = (DEPLOY / "prometheus" / "scrape-config.yml").read_text()
    (tmp_path / "prometheus.yml").write_text(
        config.replace("/etc/prometheus/vmferry.token", str(token)))
    result = run([tool("promtool"), "check", "config", "prometheus.yml"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_use_only_exported_metrics(tmp_path: Path) -> None:
    """Every vmferry_* series the rules read is one the controller exports."""
    store = Store(f"sqlite:///{tmp_path / 'c.db'}")
    store.create_schema()
    metrics = Metrics(store)
    metrics.on_heartbeat("h1")
    metrics.on_audit(["tap"])
    metrics.render()
    families = list(metrics.registry.collect())
    # Gauges without a labelled child yet (heartbeat ages) export their name once they have one.
    exported = {sample.name for family in families for sample in family.samples}
    exported |= {family.name for family in families if family.type == "gauge"}
    used = set(re.findall(r"\b(vmferry_\w+)", (DEPLOY / "prometheus" / "vmferry-rules.yml")
                          .read_text()))
    assert used and used <= exported, used - exported
    store.dispose()
