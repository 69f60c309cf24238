"""Failpoints: let a test stop the controller at an exact point of a migration.

``VMFERRY_FAILPOINTS=hold-after:precopy`` makes the controller stall (up to ten minutes) right
after the precopy phase acted and before it is recorded as ended, so a test can SIGKILL it
there and check what a restarted controller makes of it. Points inside phases:
``inside:precopy-copying`` (QEMU is copying), ``inside:precopy-completed`` (QEMU completed,
the controller has not acted on it yet). Unset, every failpoint is a no-op.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

ENV = "VMFERRY_FAILPOINTS"
HOLD_SECONDS = 600


def active() -> set[str]:
    return {p.strip() for p in os.environ.get(ENV, "").split(",") if p.strip()}


def reached(point: str) -> None:
    """Stall here when ``point`` is armed."""
    if point in active():
        log.warning("failpoint %s reached: holding for %ss", point, HOLD_SECONDS)
        time.sleep(HOLD_SECONDS)
