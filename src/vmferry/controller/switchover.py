"""Make-before-break switchover: once a VM's guest has stopped for the last round of its
migration, frames for its MAC go to both hosts (rules: ``vmferry.model.switchover``).

One ``MakeBeforeBreak`` per migration run (H5):

    prepare()   when the precopy starts: arm the closed gate on the destination host, then
                install the rules on every fabric switch on the path, side by side. Frames for
                the VM now also reach the destination host, where the gate drops them: none
                waits in the tap of a guest that the source still runs (it would be answered
                twice). Then pin the VM's MAC on those switches at the source's side
    open()      when the source has stopped the guest (its QMP ``STOP``): open the gate, one
                OpenFlow bundle on the destination host; QEMU is not held for it, so the
                guest's pause is not lengthened; frames sent during the rest of the pause wait
                in the destination's tap instead of being lost at the stopped source
    close()     after the destination announced itself (``arrived``), and on every ending:
                release the MAC's pins (moved to the destination's side first when it
                arrived), remove by cookie on every switch and both hosts (idempotent; needs
                no memory of what went in)

``leftovers`` finds rules of migrations that are no longer running (``vmferry audit``); a
controller that died mid-window closes them on recovery, by cookie.

A guest with a port profile gets no delivering rule on its host (a direct output would bypass
the profile's ACLs): its gate is armed the same way and opening removes it, so the fabric
rules bring its frames to the destination host and its own flows deliver them.
"""

from __future__ import annotations

import logging
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
    fabric_rules,
    gate_cookie,
    is_mbb_cookie,
    mbb_cookie,
    migration_of,
    path_ports,
    pin_sides,
)
from vmferry.model.topology import Topology

__all__ = ["COOKIE_MASK", "COOKIE_PREFIX", "PRIORITY", "MakeBeforeBreak", "SwitchoverContext",
           "SwitchoverError", "is_mbb_cookie", "leftovers", "mbb_cookie", "migration_of"]

log = logging.getLogger(__name__)

WINDOW_FAILPOINT = "switchover-window"      # held with the gate open (tests)
# How long an ending waits for the pins that go in the background (one revalidation round on
# OVS, 500 ms by default).
RELEASE_WAIT_S = 15.0


class SwitchoverAgent(Protocol):
    """What the switchover needs of a host's agent (``vmferry.api.agent_client.AgentClient``
    has these methods, H4). The cookie says which rule: a gate cookie arms the closed gate,
    the migration's cookie opens it (``vmferry.agent.switchover``)."""

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

    # QEMU is not held in "pre-switchover": the rules are staged before the guest stops and
    # opening the gate does not need the guest to wait (an A/B with the rules installed in
    # a held pause made QEMU's downtime 1.6x the hand-wired floor's).
    pause_before_switchover = False

    def __init__(self, ctx: SwitchoverContext) -> None:
        self.ctx = ctx
        self.cookie = mbb_cookie(ctx.migration_id)
        self._lock = threading.Lock()
        self.staged = False
        self.opened = False
        self.closed = False
        self.open_ms: float | None = None
        self.pins_held = 0                          # switches holding a pin at the last close
        self._unpinned: list[str] = []              # switches whose pin went (recorded)
        self._releasing: threading.Thread | None = None
        self._release_problems: list[str] = []

    def prepare(self) -> None:
        """Stage the window: the closed gate on the destination host first, then the fabric
        rules (never the other way round: a fabric rule without the gate would queue frames
        in the destination's tap). Raises ``SwitchoverError``; a partial staging is closed
        like a whole one, and ``open`` then does nothing."""
        ctx = self.ctx
        with self._lock:
            if self.staged or self.closed:
                return
            self.staged = True
        started = time.monotonic()
        try:
            switches = list(path_ports(ctx.topology, ctx.source, ctx.destination))
            ports = dict(zip(switches, _side_by_side(
                [partial(ctx.fabric.switch_ports, s) for s in switches]), strict=True))
            rules = fabric_rules(ctx.topology, ctx.vlan, ctx.mac, ctx.source,
                                 ctx.destination, ports)
            sides = pin_sides(ctx.topology, ctx.source, ctx.destination)
        except (KeyError, ValueError) as exc:
            self._failed([f"no switchover rules for {ctx.vm}: {exc}"])
            raise SwitchoverError(f"no switchover rules for {ctx.vm}: {exc}") from exc
        except VmferryError as exc:
            self._failed([exc.message])
            raise SwitchoverError(exc.message) from exc
        problems = _problems([partial(_arm_host, ctx, gate_cookie(self.cookie))])
        if not problems:
            problems = _problems([
                partial(ctx.fabric.replace_rules, switch, self.cookie, switch_rules,
                        known_empty=True)
                for switch, switch_rules in rules.items() if switch_rules])
        if not problems:
            # Frames from the MAC will cross the switches from both sides now: held where
            # the guest runs, learning cannot flap it (a flapping MAC alarms a switch).
            problems = _problems([
                partial(ctx.fabric.pin_mac, switch, towards_source, ctx.vlan, ctx.mac)
                for switch, (towards_source, _) in sides.items()])
        if problems:
            self._failed(problems)
            raise SwitchoverError("; ".join(problems))
        ctx.record(make_before_break_installs=1,
                   make_before_break_cookie=f"{self.cookie:#x}",
                   make_before_break_stage_ms=round((time.monotonic() - started) * 1000, 1))
        log.info("migration %s: switchover staged on %s behind a closed gate on %s",
                 ctx.migration_id, ", ".join(rules), ctx.destination)

    def _failed(self, problems: list[str]) -> None:
        """A staging that failed: the window never opens (``close`` removes what went in)."""
        with self._lock:
            self.opened = True
        self.ctx.record(make_before_break_installs=1,
                        make_before_break_cookie=f"{self.cookie:#x}",
                        make_before_break_problems=problems)

    def open(self) -> None:
        """Open the gate on the destination host; the source has stopped the guest. Once
        per run, and only after a complete ``prepare``. Raises ``SwitchoverError``."""
        with self._lock:
            if self.opened or self.closed or not self.staged:
                return
            self.opened = True
        ctx = self.ctx
        started = time.monotonic()
        problems = _problems([partial(_open_host, ctx, self.cookie)])
        self.open_ms = round((time.monotonic() - started) * 1000, 1)
        ctx.record(make_before_break_open_ms=self.open_ms,
                   make_before_break_opened_at=time.time(),
                   **({"make_before_break_problems": problems} if problems else {}))
        if problems:
            raise SwitchoverError("; ".join(problems))
        log.info("migration %s: switchover gate open on %s in %.1f ms", ctx.migration_id,
                 ctx.destination, self.open_ms)
        failpoints.reached(WINDOW_FAILPOINT)

    def close(self, arrived: bool = False) -> list[str]:
        """Remove the rules by cookie from every fabric switch and both hosts, and release
        the MAC's pins; returns the problems met (never raises: every ending of a migration
        calls this). ``arrived``: the destination runs the guest, so each pin first moves to
        the destination's side, and goes in the background once the switch has accounted
        for the frames it forwarded (a revalidation round, up to 500 ms: off the guest's
        path); a later ``close`` waits for that. ``pins_held`` counts the switches that held
        a pin."""
        with self._lock:
            self.closed = True
        ctx = self.ctx
        problems = self._wait_release()
        try:
            sides = pin_sides(ctx.topology, ctx.source, ctx.destination)
        except (KeyError, ValueError):
            sides = {}
        released: list[str] = []
        draining: list[str] = []
        tasks: list[Callable[[], object]] = [
            partial(_close_switch, ctx, switch.name, self.cookie,
                    sides[switch.name][1] if arrived and switch.name in sides else None,
                    switch.name in sides, released, draining)
            for switch in ctx.topology.switches]
        tasks += [partial(_close_host, ctx, host, self.cookie)
                  for host in dict.fromkeys((ctx.destination, ctx.source))]
        problems += _problems(tasks)
        self.pins_held = len(released) + len(draining)
        self._unpinned += released
        if draining:
            self._releasing = threading.Thread(
                target=self._release, args=(draining,), daemon=True,
                name=f"migration-{ctx.migration_id}-pins")
            self._releasing.start()
        try:
            ctx.record(make_before_break="removed" if not problems else "removal-failed",
                       make_before_break_problems=problems,
                       **({"make_before_break_pins": sorted(self._unpinned)}
                          if self._unpinned else {}))
        except Exception:  # recording must not break an ending migration
            log.exception("migration %s: cannot record the rules' removal", ctx.migration_id)
        if problems:
            log.warning("migration %s: switchover rules not all removed: %s",
                        ctx.migration_id, "; ".join(problems))
        return problems

    def _release(self, switches: list[str]) -> None:
        ctx = self.ctx
        self._release_problems = _problems([
            partial(ctx.fabric.unpin_mac, switch, ctx.vlan, ctx.mac, drain=True)
            for switch in switches])
        self._unpinned += switches

    def _wait_release(self) -> list[str]:
        """Wait (bounded) for pins going in the background; the problems met there."""
        releasing, self._releasing = self._releasing, None
        if releasing is None:
            return []
        releasing.join(RELEASE_WAIT_S)
        if releasing.is_alive():
            return [f"the pins of {self.ctx.vm} were not released in {RELEASE_WAIT_S:g}s"]
        problems, self._release_problems = self._release_problems, []
        return problems


def _close_switch(ctx: SwitchoverContext, switch: str, cookie: int,
                  towards_destination: str | None, on_path: bool, released: list[str],
                  draining: list[str]) -> None:
    """One fabric switch's part of ``close``. A pin first moves to the destination's side
    (``towards_destination``) so that NORMAL delivers there once the rules go, and is left
    for ``draining``; a pin that does not move goes at once (``released``)."""
    pinned = on_path and (ctx.vlan, ctx.mac.lower()) in ctx.fabric.pinned_macs(switch)
    if pinned and towards_destination is not None:
        ctx.fabric.pin_mac(switch, towards_destination, ctx.vlan, ctx.mac)
    ctx.fabric.replace_rules(switch, cookie, [])
    if pinned and towards_destination is not None:
        draining.append(switch)
    elif pinned:
        ctx.fabric.unpin_mac(switch, ctx.vlan, ctx.mac)
        released.append(switch)


def _arm_host(ctx: SwitchoverContext, cookie: int) -> int:
    return ctx.agent(ctx.destination).open_switchover(ctx.vm, cookie, ctx.vlan, ctx.mac)


def _open_host(ctx: SwitchoverContext, cookie: int) -> None:
    agent = ctx.agent(ctx.destination)
    if ctx.has_profile:
        agent.close_switchover(gate_cookie(cookie))     # its own flows deliver
    else:
        agent.open_switchover(ctx.vm, cookie, ctx.vlan, ctx.mac)


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
