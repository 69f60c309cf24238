"""Failpoints: let a test stop the controller at an exact point of a migration.

``VMFERRY_FAILPOINTS=hold-after:precopy`` makes the controller stall (up to ten minutes) right
after the precopy phase acted and before it is recorded as ended, so a test can SIGKILL it
there and check what a restarted controller makes of it. Points inside phases:
``inside:precopy-copying`` (QEMU is copying), ``inside:precopy-completed`` (QEMU completed,
the controller has not acted on it yet). ``POINT=SECONDS`` holds that long instead.

A hold also ends as soon as the file ``VMFERRY_FAILPOINTS_RELEASE`` names exists: a test that
keeps the controller stalled (not killed) lets it go on once the world changed meanwhile
(e.g. QEMU completed while the controller still believed it copying). Unset, every failpoint
is a no-op.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "VMFERRY_FAILPOINTS"
RELEASE_ENV = "VMFERRY_FAILPOINTS_RELEASE"
HOLD_SECONDS = 600.0
RELEASE_POLL_S = 0.1


def armed() -> dict[str, float]:
    """The armed points and how long each holds."""
    points: dict[str, float] = {}
    for word in os.environ.get(ENV, "").split(","):
        name, _, seconds = word.strip().partition("=")
        if name:
            try:
                points[name] = float(seconds) if seconds else HOLD_SECONDS
            except ValueError:
                log.error("failpoint %s: %r is not a number of seconds; holding %ss", name,
                          seconds, HOLD_SECONDS)
                points[name] = HOLD_SECONDS
    return points


def active() -> set[str]:
    return set(armed())


def reached(point: str) -> None:
    """Stall here when ``point`` is armed (bounded; released early by the release file)."""
    seconds = armed().get(point)
    if seconds is None:
        return
    log.warning("failpoint %s reached: holding for %ss", point, f"{seconds:g}")
    release = os.environ.get(RELEASE_ENV)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if release and Path(release).exists():
            log.warning("failpoint %s released", point)
            return
        time.sleep(min(RELEASE_POLL_S, max(0.0, deadline - time.monotonic())))
