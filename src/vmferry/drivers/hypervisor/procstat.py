"""CPU time of a guest's process, read from ``/proc/<pid>/stat``.

Under TCG QEMU 10's ``query-stats`` has no vCPU statistics (its ``vcpu`` target is served by
the KVM provider only), so a guest's CPU use is its QEMU process's user + system time. That
includes QEMU's own threads (I/O, a running migration): the CPU the guest costs its host.
"""

from __future__ import annotations

import os
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` so far, in seconds; None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = stat.rsplit(")", 1)[1].split()
    # Fields 14 and 15 of proc(5) (utime, stime); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / _TICKS
