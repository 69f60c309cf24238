"""The benchmark's arithmetic: reading ping output, statistics, and the issue's comparisons."""

from __future__ import annotations

import pytest

from vmferry.bench.migration import BenchConfig, RunResult, compare, summarize, summarize_runs
from vmferry.bench.probe import parse_ping


def ping_output(received: list[int], sent: int, start: float = 1000.0,
                interval: float = 0.002, gaps: dict[int, float] | None = None) -> str:
    """Fake ``ping -D`` output: a reply per received seq at start + seq*interval (+ delay)."""
    lines = ["PING 192.0.2.51 (192.0.2.51) 56(84) bytes of data."]
    for seq in received:
        ts = start + seq * interval + (gaps or {}).get(seq, 0.0)
        lines.append(f"[{ts:.6f}] 64 bytes from 192.0.2.51: icmp_seq={seq} ttl=64 time=0.4 ms")
    lines.append("")
    lines.append("--- 192.0.2.51 ping statistics ---")
    lines.append(f"{sent} packets transmitted, {len(received)} received, "
                 f"{100 - 100 * len(received) // sent}% packet loss, time 1000ms")
    return "\n".join(lines)


def test_parse_ping_counts_a_hole_and_its_length() -> None:
    received = [s for s in range(1, 501) if not 100 <= s < 120]
    result = parse_ping(ping_output(received, 500), interval_ms=2.0)
    assert result.lost == 20
    assert result.longest_loss_run == 20
    assert result.blackout_ms == pytest.approx(40.0, abs=0.5)   # 20 probes lost, 2 ms apart
    assert result.reply_gap_ms == pytest.approx(42.0, abs=0.5)  # 21 intervals between replies
    assert result.recovered
    assert result.effective_interval_ms == pytest.approx(2.0)


def test_parse_ping_does_not_count_probes_in_flight_at_the_end() -> None:
    # The last 10 probes (20 ms) were still in flight when ping was stopped.
    result = parse_ping(ping_output(list(range(1, 491)), 500), interval_ms=2.0)
    assert result.lost == 0
    assert result.recovered


def test_parse_ping_silence_to_the_end_is_a_blackout() -> None:
    output = ping_output(list(range(1, 201)), 1000)
    last_reply = 1000.0 + 200 * 0.002
    result = parse_ping(output, interval_ms=2.0, ended_at=last_reply + 1.5)
    assert not result.recovered
    assert result.lost == 1000 - 200 - 25
    assert result.reply_gap_ms == pytest.approx(1500.0, abs=1)
    assert result.blackout_ms == pytest.approx(result.lost * 2.0, abs=1)


def test_parse_ping_without_statistics_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_ping("PING 192.0.2.51\n", interval_ms=2.0)


def test_summarize_ignores_missing_values() -> None:
    assert summarize([3, None, 1, 2]) == {"median": 2, "min": 1, "max": 3, "n": 3}
    assert summarize([None]) == {"median": None, "min": None, "max": None, "n": 0}


def run(variant: str, blackout: float, downtime: float, total: float, lost: int = 1,
        ok: bool = True) -> RunResult:
    return RunResult(variant=variant, run=1, source="host1", destination="host3", ok=ok,
                     lost=lost, blackout_ms=blackout, qemu_downtime_ms=downtime,
                     total_ms=total)


def test_summarize_runs_uses_successful_runs_only() -> None:
    runs = [run("floor", 10, 5, 500), run("floor", 30, 7, 700),
            run("floor", 9999, 9999, 9999, ok=False)]
    summary = summarize_runs(runs)
    assert summary["blackout_ms"]["median"] == 20
    assert summary["total_ms"]["max"] == 700
    assert summary["lost"]["n"] == 2


def test_compare_computes_the_issue_figures() -> None:
    results = {
        "floor": [run("floor", 20, 10, 600), run("floor", 20, 10, 800)],
        "vmferry": [run("vmferry", 22, 10, 1500), run("vmferry", 26, 10, 1700)],
        "naive": [run("naive", 900, 10, 900)],
    }
    figures = compare(results)
    assert figures["blackout_vs_floor"]["value"] == pytest.approx(1.2)
    assert figures["blackout_vs_floor"]["met"] is True
    assert figures["blackout_minus_qemu_downtime_ms"]["value"] == 14
    assert figures["blackout_vs_naive"]["value"] == pytest.approx(24 / 900, abs=1e-3)
    assert figures["total_minus_floor_ms"]["value"] == 900
    assert figures["total_minus_floor_ms"]["met"] is True


def test_compare_misses_are_reported_and_absent_variants_give_none() -> None:
    figures = compare({"vmferry": [run("vmferry", 100, 10, 3000)],
                       "floor": [run("floor", 0, 0, 1000)]})
    assert figures["blackout_vs_floor"]["value"] is None    # floor blackout 0: no ratio
    assert figures["blackout_minus_qemu_downtime_ms"]["met"] is False
    assert figures["total_minus_floor_ms"]["met"] is False
    assert figures["blackout_vs_naive"]["met"] is None


def test_config_refuses_a_probe_slower_than_2ms_and_unknown_variants() -> None:
    with pytest.raises(ValueError):
        BenchConfig(interval_ms=10)
    with pytest.raises(ValueError):
        BenchConfig(variants=("floor", "bogus"))
