"""What TLS costs a migration: the same guest migrated back and forth on a lab with TLS on
(controller/agent HTTPS with client certificates, QEMU migration over tls-creds-x509) and on
one with TLS off, one lab after the other; reported as medians and the ratio TLS / plain.

    vmferry bench tls [--rounds 5] [--memory 256] [--workload 0]
    python -m vmferry.bench.tls   (the same, without the CLI)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vmferry.bench.migration.lab import BenchLab, free_port
from vmferry.errors import VmferryError
from vmferry.model.topology import Topology, default_topology_path, load_topology

VM = "tlsb"
VM_IP = "192.0.2.41/24"


@dataclass
class ModeResult:
    tls: bool
    qemu_total_ms: list[float] = field(default_factory=list)
    downtime_ms: list[float] = field(default_factory=list)
    end_to_end_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        def median(values: list[float]) -> float | None:
            return round(statistics.median(values), 1) if values else None
        return {"tls": self.tls, "runs": len(self.qemu_total_ms),
                "qemu_total_ms": median(self.qemu_total_ms),
                "downtime_ms": median(self.downtime_ms),
                "end_to_end_ms": median(self.end_to_end_ms),
                "samples": {"qemu_total_ms": self.qemu_total_ms,
                            "end_to_end_ms": self.end_to_end_ms}}


def _topology(tls: bool) -> Topology:
    data = load_topology(default_topology_path()).model_dump(mode="json")
    data["name"] = "btls" if tls else "bpln"
    return Topology.model_validate(data)


def measure(tls: bool, rounds: int, memory_mib: int, workload_mibps: int,
            say: Callable[[str], None]) -> ModeResult:
    """``rounds`` migrations of one guest between the two racks' first hosts."""
    lab = BenchLab(_topology(tls), free_port(), tls=tls)
    result = ModeResult(tls=tls)
    try:
        lab.up(say)
        a, b = lab.rack_hosts()
        lab.controller("POST", "/v1/vms", body={
            "name": VM, "host": a, "vlan": 100, "ip": VM_IP, "memory_mib": memory_mib,
            "workload_mibps": workload_mibps})
        time.sleep(2)        # let the guest boot before the first migration
        for i in range(rounds):
            target = b if i % 2 == 0 else a
            started = time.monotonic()
            record = lab.controller("POST", "/v1/migrations", body={"vm": VM, "to": target})
            record = lab.controller("GET", f"/v1/migrations/{record['id']}",
                                    params={"wait": 300})
            elapsed = (time.monotonic() - started) * 1000
            if record["state"] != "completed":
                raise VmferryError(f"migration {record['id']} ended {record['state']}: "
                                   f"{record.get('error')}")
            qemu = (record.get("result") or {}).get("qemu") or {}
            result.end_to_end_ms.append(round(elapsed, 1))
            if qemu.get("total_time_ms") is not None:
                result.qemu_total_ms.append(float(qemu["total_time_ms"]))
            if qemu.get("downtime_ms") is not None:
                result.downtime_ms.append(float(qemu["downtime_ms"]))
            say(f"{'tls' if tls else 'plain'} run {i + 1}/{rounds}: QEMU "
                f"{qemu.get('total_time_ms')} ms, end to end {elapsed:.0f} ms")
    finally:
        lab.down()
    return result


def run(rounds: int = 5, memory_mib: int = 256, workload_mibps: int = 0,
        say: Callable[[str], None] = print) -> dict[str, Any]:
    """Both modes and their ratio (TLS / plain) of the medians."""
    with_tls = measure(True, rounds, memory_mib, workload_mibps, say).summary()
    plain = measure(False, rounds, memory_mib, workload_mibps, say).summary()

    def ratio(key: str) -> float | None:
        tls_value, plain_value = with_tls[key], plain[key]
        if not tls_value or not plain_value:
            return None
        return round(float(tls_value) / float(plain_value), 2)
    return {"rounds": rounds, "memory_mib": memory_mib, "workload_mibps": workload_mibps,
            "tls": with_tls, "plain": plain,
            "ratio": {"qemu_total_ms": ratio("qemu_total_ms"),
                      "end_to_end_ms": ratio("end_to_end_ms")}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--memory", type=int, default=256)
    parser.add_argument("--workload", type=int, default=0)
    args = parser.parse_args(argv)
    report = run(args.rounds, args.memory, args.workload)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
