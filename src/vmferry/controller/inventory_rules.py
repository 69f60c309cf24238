"""What an inventory may name on the controller's machine: the controller reads agent token
files (as root) and sends their content to agent URLs, so a PUT /v1/inventory must not be a
way to read /etc/shadow or to send a secret to a foreign address. Token files only inside the
secrets directory; agent URLs only ``https://`` or a ``unix:`` socket inside the run directory.
A refusal names the field; nothing is changed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vmferry.errors import InputError
from vmferry.model.topology import Topology


@dataclass(frozen=True)
class Confinement:
    secrets_dir: Path
    run_dir: Path

    def check(self, topology: Topology) -> None:
        """Raises InputError naming ``hosts[i].agent_token_file`` or ``hosts[i].agent_url``."""
        for i, host in enumerate(topology.hosts):
            if host.agent_token_file:
                field = f"hosts[{i}].agent_token_file"
                path = _inside(host.agent_token_file, self.secrets_dir, field,
                               "the controller's secrets directory")
                if not path.is_file():
                    raise InputError(field, "no such token file in the secrets directory")
            url = host.agent_url or ""
            field = f"hosts[{i}].agent_url"
            if url.startswith("unix:"):
                _inside(url.removeprefix("unix:"), self.run_dir, field,
                        "the controller's run directory")
            elif not url.startswith("https://") and url:
                scheme = url.split(":", 1)[0][:16] if ":" in url else "none"
                raise InputError(field, f"scheme {scheme!r} refused: https:// or a unix: "
                                 "socket in the controller's run directory")


def _inside(raw: str, directory: Path, field: str, what: str) -> Path:
    """``raw`` resolved (symlinks and ``..`` followed) if it lies inside ``directory``."""
    if not os.path.isabs(raw):
        raise InputError(field, "must be an absolute path")
    path = Path(os.path.realpath(raw))
    base = Path(os.path.realpath(directory))
    if path == base or base not in path.parents:
        raise InputError(field, f"must be inside {what}")
    return path
