"""The soak's verdict: any failed move, corruption, leftover or unverified move fails it."""

from __future__ import annotations

from typing import Any

from vmferry.bench.soak import percentile, report


def move(state: str = "completed", intact: bool | None = True, leftovers: int = 0,
         total: float = 1.0) -> dict[str, Any]:
    return {"state": state, "memory_intact": intact, "total_s": total,
            "leftovers": ["tap host1 t"] * leftovers}


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]
    assert percentile(values, 0.5) == 10.0
    assert percentile(values, 0.95) == 19.0
    assert percentile([], 0.5) is None


def test_a_clean_soak_passes_and_any_fault_fails_it() -> None:
    clean = report([move(total=t) for t in (1.0, 2.0, 3.0)])
    assert clean["passed"] and clean["p50_s"] == 2.0 and clean["failures"] == 0
    assert not report([move(), move(state="rolled-back")])["passed"]
    assert report([move(intact=False)])["corruptions"] == 1
    assert report([move(leftovers=2)])["leftovers"] == 2
    assert not report([move(intact=None)])["passed"]
    assert not report([])["passed"]
