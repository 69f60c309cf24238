"""`make demo`: bring up the lab, create a VM, live-migrate it across racks while a client
pings it, and print a report. Every step uses the real `vmferry` command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

VMFERRY = [str(Path(sys.executable).with_name("vmferry"))]


def run(*args: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess[str]:
    print(f"$ vmferry {' '.join(args)}", flush=True)
    result = subprocess.run([*VMFERRY, *args], text=True, capture_output=capture, timeout=600)
    if capture and result.stdout:
        print(result.stdout, end="")
    if check and result.returncode != 0:
        if capture:
            print(result.stderr, file=sys.stderr)
        sys.exit(f"demo: `vmferry {' '.join(args)}` failed with exit code {result.returncode}")
    return result


def ping(client: str, address: str, count: int = 3) -> bool:
    result = subprocess.run([*VMFERRY, "lab", "exec", client, "--", "ping", "-c", str(count),
                             "-W", "1", "-i", "0.2", address], text=True, capture_output=True,
                            timeout=30)
    print(result.stdout.strip().splitlines()[-2] if result.stdout.strip() else result.stderr)
    return result.returncode == 0


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("demo: run as root (it builds namespaces and Open vSwitch instances)")
    # A test may move the controller off the default port.
    port = os.environ.get("VMFERRY_DEMO_CONTROLLER_PORT")
    run("lab", "up", *(["--controller-port", port] if port else []))
    vms = json.loads(run("vm", "list", "--json", capture=True).stdout)
    if any(vm["name"] == "web1" for vm in vms):
        run("vm", "delete", "web1")
    # The network admin's part: profiles defined once (VLAN, ACLs, QoS, port security).
    run("profile", "apply", "-f", str(Path(__file__).resolve().parents[1] / "examples" /
                                      "profiles.yaml"))
    # The server admin's part: a VM that uses one.
    run("vm", "create", "web1", "--host", "host1", "--profile", "web", "--ip", "192.0.2.10/24",
        "--memory", "256")
    deadline = time.monotonic() + 60
    while not ping("client-100", "192.0.2.10", count=1):
        if time.monotonic() > deadline:
            sys.exit("demo: web1 does not answer client-100's ping")
        time.sleep(1)
    run("fabric", "show")
    has_migrate = run("migrate", "--help", check=False, capture=True).returncode == 0
    if has_migrate:
        probe = subprocess.Popen([*VMFERRY, "lab", "exec", "client-100", "--", "ping", "-i",
                                  "0.01", "-c", "3000", "-W", "1", "192.0.2.10"],
                                 stdout=subprocess.PIPE, text=True)
        time.sleep(1)
        run("migrate", "web1", "--to", "host3")
        time.sleep(1)
        probe.terminate()
        out, _ = probe.communicate(timeout=10)
        stats = re.search(r"(\d+) packets transmitted, (\d+) received", out or "")
        if stats:
            sent, got = int(stats.group(1)), int(stats.group(2))
            print(f"client-100 pinged web1 every 10 ms during the migration: {sent} sent, "
                  f"{sent - got} lost")
        run("fabric", "show")
        run("audit")
    if not ping("client-100", "192.0.2.10"):
        sys.exit("demo: web1 does not answer client-100's ping at the end")
    run("vm", "show", "web1")
    print("demo: web1 answers client-100's ping on VLAN 100. `vmferry lab down` removes the lab.")


if __name__ == "__main__":
    main()
