"""Failpoints: let a test stop the controller at an exact point of a migration.

``VMFERRY_FAILPOINTS=hold-after:precopy`` makes the controller stall (up to ten minutes) right
after the precopy phase acted and before it is recorded as ended, so a test can SIGKILL it
there and check what a restarted controller makes of it. Points inside phases:
``inside:precopy-copying`` (QEMU is copying), ``inside:precopy-completed`` (QEMU completed,
the controller has not acted on it yet), ``inside:fabric-reconcile`` (a switch's trunk end was
just written; the reconcile's other ends may not be). ``POINT=SECONDS`` holds that long instead;
``POINT@N`` holds only at the Nth time the point is reached in this process (earlier and later
passes go on), so a test can stop at a chosen place inside a loop, e.g. after the third trunk
end of a migration was written.

A hold also ends as soon as the file ``VMFERRY_FAILPOINTS_RELEASE`` names exists: a test that
keeps the controller stalled (not killed) lets it go on once the world changed meanwhile
(e.g. QEMU completed while the controller still believed it copying). Unset, every failpoint
is a no-op.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "VMFERRY_FAILPOINTS"
RELEASE_ENV = "VMFERRY_FAILPOINTS_RELEASE"
HOLD_SECONDS = 600.0
RELEASE_POLL_S = 0.1

_passes: dict[str, int] = {}       # how often each point was reached in this process
_passes_lock = threading.Lock()


def _parse() -> dict[str, tuple[float, int | None]]:
    """Each armed point: (seconds it holds, the pass it holds at or None for every pass)."""
    points: dict[str, tuple[float, int | None]] = {}
    for word in os.environ.get(ENV, "").split(","):
        spec, _, seconds = word.strip().partition("=")
        name, _, nth = spec.partition("@")
        if not name:
            continue
        try:
            hold = float(seconds) if seconds else HOLD_SECONDS
        except ValueError:
            log.error("failpoint %s: %r is not a number of seconds; holding %ss", name,
                      seconds, HOLD_SECONDS)
            hold = HOLD_SECONDS
        which: int | None = None
        if nth:
            # A typo must not turn a pass-specific point into one that holds every time.
            which = int(nth) if nth.isdigit() and int(nth) >= 1 else 0
            if which == 0:
                log.error("failpoint %s: @%r is not a pass number (1, 2, ...); never holds",
                          name, nth)
        points[name] = (hold, which)
    return points


def armed() -> dict[str, float]:
    """The armed points and how long each holds."""
    return {name: hold for name, (hold, _) in _parse().items()}


def active() -> set[str]:
    return set(armed())


def reached(point: str) -> None:
    """Stall here when ``point`` is armed (bounded; released early by the release file).
    Safe from several threads: with ``@N`` exactly one of them holds, at the Nth pass."""
    spec = _parse().get(point)
    if spec is None:
        return
    seconds, which = spec
    with _passes_lock:
        _passes[point] = count = _passes.get(point, 0) + 1
    if which is not None and count != which:
        return
    log.warning("failpoint %s reached (pass %d): holding for %ss", point, count,
                f"{seconds:g}")
    release = os.environ.get(RELEASE_ENV)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if release and Path(release).exists():
            log.warning("failpoint %s released", point)
            return
        time.sleep(min(RELEASE_POLL_S, max(0.0, deadline - time.monotonic())))
