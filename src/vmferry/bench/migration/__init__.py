"""``vmferry bench migration``: the interruption a user feels when a VM moves, by variant.

    config.py      BenchConfig, RunResult, Timing (plain data)
    probe.py       the ping probe and its figures: interruption, lost, duplicates, late
    tcpecho.py     a TCP echo session across the move: the longest stall
    lab.py         the benchmark's lab and the hands that wire and read it
    variants.py    floor, vmferry, naive
    ovn.py         OVN, the peer
    statistics.py  medians, min-max, the comparisons against the targets (pure)
    runner.py      the interleaved runs and the report

Imports only run downwards (runner -> variants/ovn -> lab -> config), never back up.
"""

from vmferry.bench.migration.config import BenchConfig, RunResult, Timing
from vmferry.bench.migration.runner import VARIANTS, run_benchmark, write_report
from vmferry.bench.migration.statistics import compare, summarize, summarize_runs

__all__ = ["VARIANTS", "BenchConfig", "RunResult", "Timing", "compare", "run_benchmark",
           "summarize", "summarize_runs", "write_report"]
