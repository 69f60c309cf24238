"""The files in examples/ stay valid as the formats evolve."""

from __future__ import annotations

from pathlib import Path

import yaml

from vmferry.model.profile import parse_profiles
from vmferry.model.topology import load_topology

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_example_topology_loads() -> None:
    assert load_topology(EXAMPLES / "two-racks.yaml").name == "lab"


def test_example_profiles_parse() -> None:
    docs = list(yaml.safe_load_all((EXAMPLES / "profiles.yaml").read_text()))
    assert [p.name for p in parse_profiles(docs)] == ["web", "tenant-b"]
