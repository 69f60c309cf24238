"""The soak's verdict: any failed move, corruption, leftover or unverified move fails it; and
its loop, driven against an in-memory site that answers like the controller's API."""

from __future__ import annotations

from typing import Any

import pytest

from vmferry.bench.soak import percentile, report, run, total_seconds
from vmferry.errors import VmferryError


def move(state: str = "completed", intact: bool | None = True, leftovers: int = 0,
         total: float = 1.0) -> dict[str, Any]:
    return {"state": state, "memory_intact": intact, "total_s": total,
            "leftovers": [f"tap host1 t{i}" for i in range(leftovers)]}


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]
    assert percentile(values, 0.5) == 10.0
    assert percentile(values, 0.95) == 19.0
    assert percentile([], 0.5) is None


def test_a_clean_soak_passes_and_any_fault_fails_it() -> None:
    clean = report([move(total=t) for t in (1.0, 2.0, 3.0)])
    assert clean["passed"] and clean["p50_s"] == 2.0 and clean["max_s"] == 3.0
    assert clean["failures"] == 0
    assert not report([move(), move(state="rolled-back")])["passed"]
    assert report([move(intact=False)])["corruptions"] == 1
    assert report([move(leftovers=2)])["leftovers"] == 2
    assert not report([move(intact=None)])["passed"]
    assert not report([])["passed"]
    assert not report([move()], final_leftovers=["guest host2 soak1"])["passed"]


def test_a_leftover_seen_by_several_audits_counts_once() -> None:
    document = report([move(leftovers=1), move(leftovers=1)])
    assert document["leftovers"] == 1 and document["moves_with_leftovers"] == 2


def test_total_time_is_the_controllers_record() -> None:
    assert total_seconds({"started_at": "2026-11-30T10:00:00+00:00",
                          "ended_at": "2026-11-30T10:00:02.500000+00:00"}) == 2.5
    assert total_seconds({"started_at": "2026-11-30T10:00:00+00:00", "ended_at": None}) is None


class Site:
    """Answers the soak's requests as the controller would; ``fail``, ``corrupt`` and
    ``leak`` make given migration numbers roll back, change memory or leave a tap."""

    def __init__(self, fail: frozenset[int] = frozenset(),
                 corrupt: frozenset[int] = frozenset(),
                 leak: frozenset[int] = frozenset()) -> None:
        self.hosts = ["host1", "host2", "host3"]
        self.vms: dict[str, str] = {}
        self.migrations: dict[int, dict[str, Any]] = {}
        self.findings: list[dict[str, str]] = []
        self.failures: dict[str, int] = {}       # the guest's cumulative memcheck failures
        self.passes: dict[str, int] = {}          # pass lines on its current host's console
        self.fail, self.corrupt, self.leak = fail, corrupt, leak
        self.audits = 0

    def api(self, method: str, path: str, body: Any, params: dict[str, Any] | None) -> Any:
        if (method, path) == ("GET", "/v1/hosts"):
            return [{"name": h} for h in self.hosts]
        if (method, path) == ("POST", "/v1/vms"):
            self.vms[body["name"]] = body["host"]
            self.failures[body["name"]] = 0
            self.passes[body["name"]] = 0
            return {"name": body["name"]}
        if method == "DELETE":
            name = path.rsplit("/", 1)[1]
            if self.vms.pop(name, None) is None:
                raise VmferryError(f"no VM {name}", status=404)
            return None
        if method == "GET" and path.startswith("/v1/vms/"):
            return {"host": self.vms[path.rsplit("/", 1)[1]]}
        if (method, path) == ("GET", "/v1/audit"):
            self.audits += 1
            return self.findings
        if (method, path) == ("POST", "/v1/migrations"):
            return self._migrate(body["vm"], body["to"])
        if method == "GET" and path.startswith("/v1/migrations/"):
            return self.migrations[int(path.rsplit("/", 1)[1])]
        raise AssertionError(f"unexpected {method} {path}")

    def _migrate(self, vm: str, to: str) -> dict[str, Any]:
        number = len(self.migrations) + 1
        assert to != self.vms[vm]
        state = "rolled-back" if number in self.fail else "completed"
        if state == "completed":
            self.vms[vm] = to
            self.passes[vm] = 1
        if number in self.corrupt:
            self.failures[vm] += 1
        if number in self.leak:
            self.findings.append({"kind": "tap", "where": to, "what": f"tap-{vm}"})
        intact = None if state != "completed" else self.failures[vm] == 0
        self.migrations[number] = {
            "id": number, "state": state, "error": None if state == "completed" else "boom",
            "started_at": "2026-11-30T10:00:00+00:00",
            "ended_at": f"2026-11-30T10:00:0{number % 10}+00:00",
            "phases": [{"phase": "verify", "duration_ms": 500.0}],
            "result": {"memcheck": {"passes": 1, "failures": self.failures[vm],
                                    "intact": intact}}}
        return {"id": number}

    def memcheck(self, vm: str, host: str) -> dict[str, Any]:
        assert self.vms[vm] == host, "read on the host the guest is on"
        self.passes[vm] += 1          # a pass completes between two reads
        return {"available": True, "passes": self.passes[vm], "failures": self.failures[vm],
                "fail_lines": []}


def test_a_clean_site_passes_with_every_move_checked_twice() -> None:
    site = Site()
    document = run(site.api, migrations=6, guests=2, seed=7, read_memcheck=site.memcheck)
    assert document["passed"], document
    assert document["migrations"] == 6 and document["completed"] == 6
    assert all(m["memory"]["after_move"]["passes"] >= 2 for m in document["moves"])
    assert all(m["moved_s"] == m["total_s"] - 0.5 for m in document["moves"])
    assert site.audits == 7                   # after each move, and once at the end
    assert all(w["passes"] == 1 for w in document["config"]["warm_up"].values())
    assert site.vms == {}                     # the soak's guests are deleted
    again = run(Site().api, migrations=6, guests=2, seed=7)
    assert [m["destination"] for m in again["moves"]] == \
        [m["destination"] for m in document["moves"]]      # the seed reproduces the soak


@pytest.mark.parametrize(("site", "counter"), [
    (Site(fail=frozenset({2})), "failures"), (Site(corrupt=frozenset({3})), "corruptions"),
    (Site(leak=frozenset({1})), "leftovers")])
def test_a_bad_move_fails_the_soak(site: Site, counter: str) -> None:
    document = run(site.api, migrations=4, guests=2, seed=3, read_memcheck=site.memcheck)
    assert document[counter] == 1 and not document["passed"]


def test_a_corruption_is_charged_to_its_own_move_only() -> None:
    site = Site(corrupt=frozenset({1}))
    document = run(site.api, migrations=4, guests=1, seed=1, read_memcheck=site.memcheck)
    # The controller's verdict is cumulative; the soak's own reading counts new failures.
    assert [m["memory_intact"] for m in document["moves"]] == [False, True, True, True]
    assert document["corruptions"] == 1
    without_reading = run(Site(corrupt=frozenset({1})).api, migrations=2, guests=1, seed=1)
    assert without_reading["corruptions"] == 2       # the controller's verdict alone


def test_a_move_never_checked_after_it_is_unverified() -> None:
    site = Site()

    def silent(vm: str, host: str) -> dict[str, Any]:
        raise VmferryError("agent unreachable")
    document = run(site.api, migrations=2, guests=1, seed=1, read_memcheck=silent)
    assert document["unverified"] == 2 and not document["passed"]


def test_a_refused_migration_is_a_failure_not_a_crash() -> None:
    site = Site()
    real = site.api

    def api(method: str, path: str, body: Any, params: dict[str, Any] | None) -> Any:
        if (method, path) == ("POST", "/v1/migrations"):
            raise VmferryError("capacity", status=409)
        return real(method, path, body, params)
    document = run(api, migrations=2, guests=1, seed=1)
    assert document["failures"] == 2 and document["moves"][0]["error"] == "capacity"
    assert site.vms == {}
