"""Names and paths of everything a lab creates, so that ``lab down`` and ``audit`` find it all."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vmferry import paths

NAMESPACE_PREFIX = "vf-"
MIGRATION_BRIDGE = "migbr"
# Here, not in builder.py: the CLI finds a lab's controller without importing the builder.
CONTROLLER_PORT = 8470


@dataclass(frozen=True)
class LabLayout:
    lab: str

    @property
    def root(self) -> Path:
        return paths.lab_dir(self.lab)

    def namespace(self, node: str) -> str:
        return f"{NAMESPACE_PREFIX}{self.lab}-{node}"

    @property
    def namespace_prefix(self) -> str:
        return f"{NAMESPACE_PREFIX}{self.lab}-"

    @property
    def migration_namespace(self) -> str:
        return self.namespace("_mignet")

    def ovs_dir(self, node: str) -> Path:
        return self.root / "ovs" / node

    def host_dir(self, host: str) -> Path:
        return self.root / "hosts" / host

    def guest_run_dir(self, host: str) -> Path:
        return self.host_dir(host) / "guests"

    @property
    def shared_storage(self) -> Path:
        return self.root / "shared"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def secrets_dir(self) -> Path:
        return self.root / "secrets"

    def agent_socket(self, host: str) -> Path:
        return self.run_dir / f"agent-{host}.sock"

    def agent_token_file(self, host: str) -> Path:
        return self.secrets_dir / f"agent-{host}.token"

    @property
    def controller_socket(self) -> Path:
        return self.run_dir / "controller.sock"

    @property
    def admin_token_file(self) -> Path:
        return self.secrets_dir / "admin.token"

    @property
    def database(self) -> Path:
        return self.root / "controller.db"

    @property
    def state_file(self) -> Path:
        return self.root / "lab.json"

    @property
    def inventory_file(self) -> Path:
        return self.root / "inventory.yaml"
