"""Make-before-break switchover: while a VM's guest is stopped for the last round of its
migration, frames for its MAC go to both hosts (rules: ``vmferry.model.switchover``).

One ``MakeBeforeBreak`` per migration run (H5):

    prepare()   when the precopy starts: read the path switches' ports, compute the rules
                (no rule goes in: dual delivery before the source stops the guest would queue
                frames the source answers in the destination's tap, to be answered again)
    open()      when the source has stopped the guest (QEMU status "pre-switchover", the
                engine holds the migration there with ``pause_before_switchover``): install
                the rules on every fabric switch on the path and on the destination host, side
                by side; frames sent during the rest of the pause wait in the destination's
                tap instead of being lost at the stopped source
    close()     after the destination announced itself, and on every ending: remove by cookie
                on every switch and both hosts (idempotent; needs no memory of what went in)

``leftovers`` finds rules of migrations that are no longer running (``vmferry audit``); a
controller that died mid-window closes them on recovery, by cookie.

A guest with a port profile gets no rule on its host (a direct output would bypass the
profile's ACLs); the fabric rules still bring its frames to the destination host.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from vmferry import failpoints
from vmferry.drivers.fabric.base import Fabric
from vmferry.errors import VmferryError
from vmferry.model.switchover import (
    COOKIE_MASK,
    COOKIE_PREFIX,
    PRIORITY,
    Rule,
    fabric_rules,
    is_mbb_cookie,
    mbb_cookie,
    migration_of,
    path_ports,
)
from vmferry.model.topology import Topology

__all__ = ["COOKIE_MASK", "COOKIE_PREFIX", "PRIORITY", "MakeBeforeBreak", "SwitchoverContext",
           "SwitchoverError", "is_mbb_cookie", "leftovers", "mbb_cookie", "migration_of"]

log = logging.getLogger(__name__)

WINDOW_FAILPOINT = "switchover-window"      # held with the rules in place (tests)
# "wait": QEMU continues once the rules are in; "overlap": they go in while it finishes.
OPEN_MODE_ENV = "VMFERRY_SWITCHOVER_OPEN"
DEFAULT_OPEN_MODE = "wait"   # A/B: overlap lengthened QEMU downtime 2-5x (CPU contention)
INSTALL_JOIN_S = 30.0


class SwitchoverAgent(Protocol):
    """What the switchover needs of a host's agent (``vmferry.api.agent_client.AgentClient``
    has these methods, H4)."""

    def open_switchover(self, vm: str, cookie: int, vlan: int, mac: str) -> int: ...

    def close_switchover(self, cookie: int) -> None: ...


@dataclass(frozen=True)
class SwitchoverContext:
    migration_id: int
    vm: str
    mac: str
    vlan: int
    source: str
    destination: str
    has_profile: bool
    topology: Topology
    fabric: Fabric
    agent: Callable[[str], SwitchoverAgent]
    # Where the window's outcome is recorded (the migration's result); optional.
    record: Callable[..., None] = field(default=lambda **_: None)


class SwitchoverError(VmferryError):
    """The make-before-break rules could not all be put in place."""


class MakeBeforeBreak:
    """The temporary rules of one migration run."""

    pause_before_switchover = True

    def __init__(self, ctx: SwitchoverContext) -> None:
        self.ctx = ctx
        self.cookie = mbb_cookie(ctx.migration_id)
        self._rules: dict[str, list[Rule]] | None = None
        self._lock = threading.Lock()
        self.opened = False
        self.closed = False
        self.open_ms: float | None = None
        # The held-window failpoint needs the rules in before open() returns.
        self.overlap = (os.environ.get(OPEN_MODE_ENV, DEFAULT_OPEN_MODE) == "overlap"
                        and WINDOW_FAILPOINT not in failpoints.active())
        self._installing: threading.Thread | None = None

    def prepare(self) -> None:
        """Read the path's ports and compute the rules, so ``open`` only writes. Raises
        ``VmferryError`` (the engine may log it: ``open`` computes them again)."""
        ctx = self.ctx
        switches = list(path_ports(ctx.topology, ctx.source, ctx.destination))
        ports = dict(zip(switches, _side_by_side(
            [partial(ctx.fabric.switch_ports, s) for s in switches]), strict=True))
        try:
            self._rules = fabric_rules(ctx.topology, ctx.vlan, ctx.mac, ctx.source,
                                       ctx.destination, ports)
        except (KeyError, ValueError) as exc:
            raise SwitchoverError(f"no switchover rules for {ctx.vm}: {exc}") from exc

    def open(self) -> None:
        """Install every rule, side by side; the guest is stopped. In "wait" mode open()
        returns once they are in (the time adds to the guest's pause: frames sent during all
        of the rest of it wait in the destination's tap); in "overlap" mode the rules go in
        while QEMU sends the last state (the pause is not lengthened; frames sent before they
        are in are lost at the stopped source). A partial install is closed like a whole one.
        Raises ``SwitchoverError`` ("wait" mode; "overlap" logs)."""
        with self._lock:
            if self.opened or self.closed:
                return
            self.opened = True
            if self.overlap:
                self._installing = threading.Thread(target=self._install_logged,
                                                    name=f"switchover-{self.cookie:#x}",
                                                    daemon=True)
                self._installing.start()
                return
        self._install()

    def _install_logged(self) -> None:
        try:
            self._install()
        except VmferryError as exc:
            log.warning("migration %s: switchover rules not all installed: %s",
                        self.ctx.migration_id, exc.message)

    def _install(self) -> None:
        started = time.monotonic()
        if self._rules is None:
            self.prepare()
        assert self._rules is not None
        ctx = self.ctx
        tasks: list[Callable[[], object]] = [
            partial(ctx.fabric.replace_rules, switch, self.cookie, rules, known_empty=True)
            for switch, rules in self._rules.items() if rules]
        if not ctx.has_profile:
            tasks.append(partial(_open_host, ctx, self.cookie))
        problems = _problems(tasks)
        self.open_ms = round((time.monotonic() - started) * 1000, 1)
        ctx.record(make_before_break="installed" if not problems else "install-failed",
                   make_before_break_installs=1,
                   make_before_break_cookie=f"{self.cookie:#x}",
                   make_before_break_open_ms=self.open_ms,
                   make_before_break_mode="overlap" if self.overlap else "wait",
                   **({"make_before_break_problems": problems} if problems else {}))
        if problems:
            raise SwitchoverError("; ".join(problems))
        log.info("migration %s: switchover rules in place on %s in %.1f ms",
                 ctx.migration_id, ", ".join(self._rules), self.open_ms)
        failpoints.reached(WINDOW_FAILPOINT)

    def close(self) -> list[str]:
        """Remove the rules by cookie from every fabric switch and both hosts; returns the
        problems met (never raises: every ending of a migration calls this)."""
        with self._lock:
            self.closed = True
            installing = self._installing
        if installing is not None:
            installing.join(timeout=INSTALL_JOIN_S)     # never remove before it is all in
        ctx = self.ctx
        tasks: list[Callable[[], object]] = [
            partial(ctx.fabric.replace_rules, switch.name, self.cookie, [])
            for switch in ctx.topology.switches]
        tasks += [partial(_close_host, ctx, host, self.cookie)
                  for host in dict.fromkeys((ctx.destination, ctx.source))]
        problems = _problems(tasks)
        try:
            ctx.record(make_before_break="removed" if not problems else "removal-failed",
                       make_before_break_problems=problems)
        except Exception:  # recording must not break an ending migration
            log.exception("migration %s: cannot record the rules' removal", ctx.migration_id)
        if problems:
            log.warning("migration %s: switchover rules not all removed: %s",
                        ctx.migration_id, "; ".join(problems))
        return problems


def _open_host(ctx: SwitchoverContext, cookie: int) -> int:
    return ctx.agent(ctx.destination).open_switchover(ctx.vm, cookie, ctx.vlan, ctx.mac)


def _close_host(ctx: SwitchoverContext, host: str, cookie: int) -> None:
    ctx.agent(host).close_switchover(cookie)


def leftovers(fabric: Fabric, switches: Iterable[str], live: set[int]) -> list[tuple[str, int]]:
    """(switch, cookie) of every temporary rule on ``switches`` whose migration is not in
    ``live``. Raises ``VmferryError`` when a switch cannot be read."""
    found: list[tuple[str, int]] = []
    for switch in switches:
        for cookie in sorted(fabric.rule_cookies(switch)):
            if is_mbb_cookie(cookie) and migration_of(cookie) not in live:
                found.append((switch, cookie))
    return found


def _side_by_side(tasks: list[Callable[[], Any]]) -> list[Any]:
    """Run the tasks side by side; their results in order (the first failure is raised)."""
    if not tasks:
        return []
    with ThreadPoolExecutor(max_workers=len(tasks)) as pool:
        return [f.result() for f in [pool.submit(t) for t in tasks]]


def _problems(tasks: list[Callable[[], object]]) -> list[str]:
    """Run the tasks side by side; the messages of those that failed."""
    problems: list[str] = []
    if not tasks:
        return problems
    with ThreadPoolExecutor(max_workers=len(tasks)) as pool:
        for future in [pool.submit(task) for task in tasks]:
            try:
                future.result()
            except VmferryError as exc:
                problems.append(exc.message)
    return problems
