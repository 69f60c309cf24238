"""`controller serve` / `agent serve` read a TOML config file; the command line wins over it.

The daemons' start is replaced by a recorder: these tests check which settings would start, not
the daemons themselves (the lab's functional tests run those)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from vmferry.cli import daemon_settings, daemons
from vmferry.cli.main import app

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    seen: list[Any] = []
    monkeypatch.setattr(daemons, "_run_controller", seen.append)
    monkeypatch.setattr(daemons, "_run_agent", seen.append)
    return seen


def run(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def test_controller_options_alone_still_work(started: list[Any]) -> None:
    result = run("controller", "serve", "--db", "sqlite:////tmp/x.db", "--listen", "unix:/a",
                 "--listen", "127.0.0.1:9", "--bootstrap-token-file", "/t")
    assert result.exit_code == 0, result.output
    assert started == [daemon_settings.ControllerSettings(
        db="sqlite:////tmp/x.db", listen=["unix:/a", "127.0.0.1:9"],
        bootstrap_token_file=Path("/t"))]


def test_controller_default_listen(started: list[Any]) -> None:
    assert run("controller", "serve", "--db", "sqlite:///x").exit_code == 0
    assert started[0].listen == ["127.0.0.1:8470"]


def test_config_file_is_read_and_options_override_it(tmp_path: Path,
                                                     started: list[Any]) -> None:
    config = tmp_path / "controller.toml"
    config.write_text('db = "postgresql://vmferry@/vmferry"\nlisten = ["0.0.0.0:8470"]\n'
                      'bootstrap-token-file = "/etc/vmferry/admin.token"\n')
    assert run("controller", "serve", "--config", str(config)).exit_code == 0
    assert started[-1] == daemon_settings.ControllerSettings(
        db="postgresql://vmferry@/vmferry", listen=["0.0.0.0:8470"],
        bootstrap_token_file=Path("/etc/vmferry/admin.token"))
    result = run("controller", "serve", "--config", str(config), "--listen", "unix:/run/c.sock")
    assert result.exit_code == 0, result.output
    assert started[-1].listen == ["unix:/run/c.sock"]
    assert started[-1].db == "postgresql://vmferry@/vmferry"


def test_agent_config_file(tmp_path: Path, started: list[Any]) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('host = "h1"\nlisten = ["unix:/run/vmferry/agent.sock"]\n'
                      'token-file = "/etc/vmferry/agent-h1.token"\nmemory-mib = 8192\n'
                      'controller = "http://10.0.0.1:8470"\n')
    result = run("agent", "serve", "--config", str(config), "--memory-mib", "2048")
    assert result.exit_code == 0, result.output
    settings = started[0]
    assert isinstance(settings, daemon_settings.AgentSettings)
    assert (settings.host, settings.memory_mib, settings.token_file) == (
        "h1", 2048, Path("/etc/vmferry/agent-h1.token"))
    assert settings.ovsdb == "unix:/var/run/openvswitch/db.sock"     # the default stays


@pytest.mark.parametrize("text, field, words", [
    ('db = "sqlite:///x"\nlisten-on = ["a"]\n', "listen-on", "unknown setting"),
    ('db = "sqlite:///x"\nlisten = "127.0.0.1:1"\n', "listen", "list"),
    ('db = 5\n', "db", "string"),
    ('db = "sqlite:///x"\n[extra]\nx = 1\n', "extra", "unknown setting"),
    ('db = "sqlite:///x\n', "config", "not valid TOML"),
])
def test_bad_config_is_refused_naming_the_key(tmp_path: Path, started: list[Any], text: str,
                                              field: str, words: str) -> None:
    config = tmp_path / "controller.toml"
    config.write_text(text)
    result = run("controller", "serve", "--config", str(config))
    assert result.exit_code == 2
    assert f"{field}:" in result.output and words in result.output
    assert started == []


def test_missing_required_setting_says_how_to_give_it(started: list[Any]) -> None:
    result = run("agent", "serve", "--host", "h1", "--listen", "unix:/a")
    assert result.exit_code == 2
    assert "token-file: required" in result.output and "--token-file" in result.output
    assert started == []


def test_unreadable_config_names_the_file(tmp_path: Path, started: list[Any]) -> None:
    result = run("controller", "serve", "--config", str(tmp_path / "absent.toml"))
    # The error wraps at 80 columns, and a long temporary path breaks across lines.
    assert result.exit_code == 2 and "absent.toml" in result.output.replace("\n", "")
    assert started == []


@pytest.mark.parametrize("name, model", [
    ("controller.toml", daemon_settings.ControllerSettings),
    ("agent-host1.toml", daemon_settings.AgentSettings),
])
def test_shipped_examples_are_valid(name: str, model: type[daemon_settings._Settings]) -> None:
    values = daemon_settings.read_config(DEPLOY / "config" / name, model)
    model.model_validate(values)


def test_shipped_site_inventory_is_valid() -> None:
    import yaml

    from vmferry.model.topology import Topology
    site = Topology.model_validate(yaml.safe_load((DEPLOY / "config" / "site.yaml").read_text()))
    assert site.kind == "site" and all(h.agent_url for h in site.hosts)
    agent = daemon_settings.read_config(DEPLOY / "config" / "agent-host1.toml",
                                        daemon_settings.AgentSettings)
    host1 = next(h for h in site.hosts if h.name == agent["host"])
    assert host1.agent_url == f"https://{agent['listen'][0]}"


def test_relative_paths_in_a_config_are_beside_it(tmp_path: Path, started: list[Any]) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('host = "h1"\nlisten = ["unix:run/agent.sock"]\ntoken-file = "h1.token"\n'
                      'run-dir = "/var/lib/vmferry/guests"\n')
    assert run("agent", "serve", "--config", str(config)).exit_code == 0
    assert started[0].token_file == tmp_path / "h1.token"
    assert started[0].run_dir == Path("/var/lib/vmferry/guests")
    assert started[0].listen == ["unix:run/agent.sock"]      # addresses are not paths
