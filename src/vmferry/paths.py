"""Where vmferry keeps its state. One root, overridable with VMFERRY_STATE_DIR."""

from __future__ import annotations

import os
from pathlib import Path


def state_root() -> Path:
    return Path(os.environ.get("VMFERRY_STATE_DIR", "/var/lib/vmferry"))


def image_dir() -> Path:
    """Guest images are shared by all labs: building one takes a while."""
    return Path(os.environ.get("VMFERRY_IMAGE_DIR", str(state_root() / "images")))


def lab_dir(lab: str) -> Path:
    return state_root() / "labs" / lab
