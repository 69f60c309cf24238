"""The benchmark's arithmetic: what ping and the TCP echo session say about the interruption,
statistics, and the targets' comparisons. No lab."""

from __future__ import annotations

import pytest

from vmferry.bench.migration import BenchConfig, RunResult, compare, summarize, summarize_runs
from vmferry.bench.migration.config import Timing
from vmferry.bench.migration.probe import parse_ping, parse_ping_pair
from vmferry.bench.migration.runner import split
from vmferry.bench.migration.tcpecho import stall
from vmferry.bench.migration.variants import completed_to_switchover

START = 1000.0
INTERVAL = 0.002


def ping_output(replies: dict[int, float], sent: int, dups: tuple[int, ...] = ()) -> str:
    """Fake ``ping -D`` output: ``replies`` maps seq -> RTT (ms); probe seq is sent at
    START + seq * INTERVAL; ``dups``: seqs answered a second time (DUP!)."""
    lines = ["PING 192.0.2.51 (192.0.2.51) 56(84) bytes of data."]
    events = []
    for seq, rtt in replies.items():
        events.append((START + seq * INTERVAL + rtt / 1000, seq, rtt, ""))
    for seq in dups:
        rtt = replies[seq] + 1.0
        events.append((START + seq * INTERVAL + rtt / 1000, seq, rtt, " (DUP!)"))
    for ts, seq, rtt, dup in sorted(events):
        lines.append(f"[{ts:.6f}] 64 bytes from 192.0.2.51: icmp_seq={seq % 65536} ttl=64 "
                     f"time={rtt:.3f} ms{dup}")
    lines += ["", "--- 192.0.2.51 ping statistics ---",
              f"{sent} packets transmitted, {len(replies)} received, 0% packet loss"]
    return "\n".join(lines)


def window(sent: int) -> tuple[float, float]:
    """(moved_at, ended_at): the move at probe 500, the window ends with the last probe."""
    return START + 500 * INTERVAL, START + sent * INTERVAL


def test_a_hole_is_an_interruption_of_the_send_times_around_it() -> None:
    replies = {s: 0.4 for s in range(1, 2001) if not 600 <= s < 650}
    moved, ended = window(2000)
    result = parse_ping(ping_output(replies, 2000), 2.0, moved_at=moved, ended_at=ended)
    assert result.lost == 50
    assert result.duplicates == 0 and result.late == 0
    assert result.interruption_ms == pytest.approx(51 * 2.0, abs=0.1)   # 599 -> 650
    assert result.baseline_rtt_ms == pytest.approx(0.4)
    assert result.timely_ms == 10.0
    assert result.first_timely_after == pytest.approx(START + 650 * INTERVAL + 0.0004)


def test_queued_replies_are_late_not_timely_and_duplicates_are_counted() -> None:
    # 600-649 were queued 120 ms and answered late; 700-709 were answered twice.
    replies = {s: (120.0 if 600 <= s < 650 else 0.4) for s in range(1, 2001)}
    moved, ended = window(2000)
    result = parse_ping(ping_output(replies, 2000, dups=tuple(range(700, 710))), 2.0,
                        moved_at=moved, ended_at=ended)
    assert result.lost == 0
    assert result.late == 50
    assert result.duplicates == 10
    assert result.max_rtt_ms == pytest.approx(120.0)
    assert result.interruption_ms == pytest.approx(102.0, abs=0.1)   # queueing is no success


def test_the_timely_threshold_follows_a_slow_baseline() -> None:
    replies = {s: 4.0 for s in range(1, 1001)}
    replies[800] = 15.0                     # under 5 x 4 ms: timely
    moved, ended = window(1000)
    result = parse_ping(ping_output(replies, 1000), 2.0, moved_at=moved, ended_at=ended)
    assert result.timely_ms == pytest.approx(20.0)
    assert result.late == 0


def test_silence_to_the_end_counts_to_the_end_of_the_window() -> None:
    replies = {s: 0.4 for s in range(1, 801)}
    moved, ended = window(2000)
    result = parse_ping(ping_output(replies, 2000), 2.0, moved_at=moved, ended_at=ended)
    # From the last timely probe (800) to the end of the window less the threshold (10 ms).
    assert result.interruption_ms == pytest.approx((2000 - 800) * 2.0 - 10, abs=1)
    assert result.first_timely_after is None


def test_sequence_numbers_wrap() -> None:
    replies = {s: 0.4 for s in range(65000, 66500)}
    result = parse_ping(ping_output(replies, 66500), 2.0, moved_at=START + 65100 * INTERVAL,
                        ended_at=START + 66500 * INTERVAL)
    assert result.answered == 1500 and result.duplicates == 0
    assert result.interruption_ms == pytest.approx(2.0, abs=0.1)


def test_output_without_statistics_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_ping("PING 192.0.2.51\n", 2.0, moved_at=0, ended_at=1)


def test_a_move_that_changes_address_is_interrupted_until_the_new_one_answers() -> None:
    # The old address answers up to probe 800, the new one from probe 950 (dual NIC): the
    # interruption is the span between, whichever address answered.
    moved, ended = window(2000)
    old = ping_output({s: 0.4 for s in range(1, 801)}, 2000)
    new = ping_output({s: 0.5 for s in range(950, 2000)}, 2000, dups=(1000,))
    result = parse_ping_pair(old, new, 2.0, moved_at=moved, ended_at=ended)
    assert result.interruption_ms == pytest.approx(150 * 2.0, abs=0.5)
    assert result.interruption_from == pytest.approx(START + 800 * INTERVAL, abs=1e-3)
    assert result.lost is None and result.late is None and result.duplicates == 1
    assert result.baseline_rtt_ms == pytest.approx(0.4)
    # One address alone would say the rest of the window was silent.
    alone = parse_ping(old, 2.0, moved_at=moved, ended_at=ended)
    assert alone.interruption_ms > 2000


def test_tcp_stall_is_the_longest_wait_for_an_echo() -> None:
    sent = [0.00, 0.01, 0.02, 0.03]
    echoed = [(0.001, 8), (0.011, 16), (0.25, 32)]        # 3rd and 4th echoed together late
    assert stall(sent, echoed, ended=0.3) == pytest.approx(230.0)
    assert stall(sent, echoed[:2], ended=1.0) == pytest.approx(980.0)   # never echoed


def result(variant: str, **values: float | int | None) -> RunResult:
    return RunResult(variant=variant, run=1, source="host1", destination="host3", ok=True,
                     **values)  # type: ignore[arg-type]


def test_the_split_uses_qmp_events_or_says_it_derived_it() -> None:
    seen = parse_ping(ping_output({s: 0.4 for s in range(1, 1001) if not 600 <= s < 620},
                                  1000), 2.0, moved_at=START + 1.0, ended_at=START + 2.0)
    stop = START + 600 * INTERVAL
    timing = Timing(total_ms=1, events={"source_stop": stop, "destination_resume": stop + 0.03})
    r = result("vmferry", qemu_downtime_ms=25)
    split(r, seen, timing)
    assert r.split == "QMP events" and r.pause_ms == pytest.approx(30.0)
    assert r.resume_to_timely_ms == pytest.approx((620 - 600) * 2.0 + 0.4 - 30.0, abs=0.1)
    assert r.lead_in_ms == pytest.approx(2.0, abs=0.1)        # probe 599 sent 2 ms before
    assert r.network_share_ms == pytest.approx(seen.interruption_ms - 30.0)
    r = result("vmferry", qemu_downtime_ms=25)
    split(r, seen, Timing(total_ms=1))
    assert r.split is not None and r.split.startswith("derived")
    assert r.network_share_ms == pytest.approx(seen.interruption_ms - 25)


def test_completed_to_switchover_from_the_engine_or_derived() -> None:
    assert completed_to_switchover({"completed_to_switchover_ms": 4.5}, [], {}) == (4.5,
                                                                                   "engine")
    phases = [{"phase": "precopy", "started": "2026-11-30T05:00:00+00:00"},
              {"phase": "switchover", "started": "2026-11-30T05:00:01.250000+00:00"}]
    value, how = completed_to_switchover({}, phases, {"total_time_ms": 1200})
    assert value == pytest.approx(50.0) and how is not None and how.startswith("derived")
    assert completed_to_switchover({}, phases[:1], {"total_time_ms": 1}) == (None, None)


def test_summarize_ignores_missing_values() -> None:
    assert summarize([3, None, 1, 2]) == {"median": 2, "min": 1, "max": 3, "n": 3}
    assert summarize([None]) == {"median": None, "min": None, "max": None, "n": 0}


def test_summarize_runs_uses_successful_runs_only() -> None:
    failed = RunResult(variant="floor", run=2, source="a", destination="b", ok=False,
                       interruption_ms=999.0)
    summary = summarize_runs([result("floor", interruption_ms=40.0), failed])
    assert summary["interruption_ms"]["median"] == 40.0 and summary["interruption_ms"]["n"] == 1


def test_compare_against_the_targets() -> None:
    runs = {
        "floor": [result("floor", interruption_ms=60, qemu_downtime_ms=20, lost=10)],
        "ovn": [result("ovn", interruption_ms=70, lost=12)],
        "vmferry": [result("vmferry", interruption_ms=50, qemu_downtime_ms=23, lost=0,
                           duplicates=0, network_share_ms=8, mac_moves_max=1),
                    result("vmferry", interruption_ms=52, qemu_downtime_ms=25, lost=0,
                           duplicates=1, network_share_ms=30, mac_moves_max=2)],
    }
    figures = compare(runs)
    assert figures["interruption_minus_ovn_ms"]["value"] == -19.0
    assert figures["interruption_minus_ovn_ms"]["met"] is True
    assert figures["interruption_minus_floor_ms"]["met"] is True
    assert figures["duplicates_max"] == {**figures["duplicates_max"], "value": 1, "met": False}
    assert figures["lost_minus_ovn"]["met"] is True
    assert figures["network_share_ms"]["value"] == 19.0 and figures["network_share_ms"]["met"]
    assert figures["downtime_vs_floor"]["value"] == 1.2 and figures["downtime_vs_floor"]["met"]
    assert figures["mac_moves_max"]["met"] is False


def test_compare_without_a_variant_gives_none() -> None:
    figures = compare({"vmferry": [result("vmferry", interruption_ms=50)]})
    assert figures["interruption_minus_ovn_ms"]["value"] is None
    assert figures["interruption_minus_ovn_ms"]["met"] is None


def test_config_refuses_a_probe_slower_than_2ms_and_unknown_variants() -> None:
    with pytest.raises(ValueError, match="1-2 ms"):
        BenchConfig(interval_ms=10)
    with pytest.raises(ValueError, match="unknown variants"):
        BenchConfig(variants=("floor", "teleport"))


def test_learning_lines_give_each_mac_port_changes_per_switch() -> None:
    from vmferry.bench.migration.lab import mac_changes, parse_learned
    text = (
        "2026-11-30T15:30:00.100Z|00041|bridge|INFO|bridge br-fabric: added interface x\n"
        "2026-11-30T15:30:00.123Z|00042|ofproto_dpif_xlate|DBG|bridge br-fabric: learned "
        "that 52:54:00:be:00:01 is on port t-spine in VLAN 100\n"
        "2026-11-30T15:30:00.200Z|00043|ofproto_dpif_xlate(revalidator7)|DBG|bridge "
        "br-fabric: learned that 52:54:00:be:00:01 is on port h-host1 in VLAN 100\n"
        "2026-11-30T15:30:00.300Z|00044|ofproto_dpif_xlate|DBG|bridge br-fabric: learned "
        "that 52:54:00:be:00:01 is on port t-spine in VLAN 100\n"
        "2026-11-30T15:30:00.310Z|00045|ofproto_dpif_xlate|DBG|bridge br-fabric: learned "
        "that 52:54:00:00:00:09 is on port a-client-100 in VLAN 100\n")
    lines = parse_learned(text)
    assert [(e["port"], e["thread"]) for e in lines] == [
        ("t-spine", ""), ("h-host1", "revalidator7"), ("t-spine", ""), ("a-client-100", "")]
    assert lines[1]["time"] - lines[0]["time"] == pytest.approx(0.077, abs=1e-3)
    trace = [{**e, "switch": "tor1"} for e in lines]
    # The first line of each MAC is where it was before the window: not a change.
    assert mac_changes(trace) == {"tor1": {"52:54:00:be:00:01": 2}}
    assert mac_changes([{**trace[0], "switch": "spine"}, *trace[1:]]) == {
        "tor1": {"52:54:00:be:00:01": 1}}
