"""Issue 11, the store's faults, on a lab whose controller keeps its store in a private
PostgreSQL cluster (``VMFERRY_LAB_DB``):

- the store stopped for 5 s while QEMU copies: ``pg_ctl stop -m fast``, 5 s, ``pg_ctl start``.
  A real outage, not SIGSTOP of the postmaster: SIGSTOP freezes only the process that accepts
  new connections, while the backends of the controller's open connections go on answering;
  a fast stop closes every connection (the leader's advisory lock goes with its connection)
  and refuses new ones, which is what a database restart or failover does to a controller.
  The same controller rides it out (keeps the lease, takes its lock again) and finishes the
  move;
- a second controller on the same store with its clock two hours ahead (libfaketime, the
  Debian package ``faketime``) started while the first migrates: it never acts (it refuses to
  lead and exits before it reads a migration or calls an agent); the lease and its epoch stay
  the first's, which completes the move.

Each case ends with the VM on exactly one host, its memory intact, the fabric as `fabric show`
says, audit clean and no migration left running. One lab for the whole file.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultkit import (
    api,
    check_one_vm,
    controller_log,
    migrate,
    other_host,
    wait_end,
)
from sqlalchemy import create_engine, text

from labkit import (
    VMFERRY,
    LabRun,
    PostgresCluster,
    default_topology,
    free_port,
    lab_dir,
    running_lab,
)
from vmferry.lab.builder import LAB_DB_ENV

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(600)]
log = logging.getLogger(__name__)

VM = "pgvm"
VM_IP = "192.0.2.42"
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
SKEW = "+2h"
# A cap on the migration's bandwidth (Mbit/s) keeps QEMU copying the dirtying guest for a
# while, so the faults land while it copies.
BANDWIDTH_MBPS = 100


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresCluster
        ) -> Iterator[LabRun]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(LAB_DB_ENV, postgres.url)
        with running_lab(tmp_path_factory.mktemp("state"), default_topology("t11pg")) as run:
            run.cli("vm", "create", VM, "--host", "host1", "--vlan", "100", "--ip",
                    f"{VM_IP}/24", "--memory", "192", "--workload-mibps", "8",
                    "--memcheck-mib", "16")
            yield run


def controller_pid(lab: LabRun) -> int:
    return int(json.loads((lab_dir(lab) / "lab.json").read_text())["pids"]["controller"])


def wait_copying(lab: LabRun, migration_id: int, timeout: float = 120) -> None:
    """Until the controller reports QEMU copying (phase precopy, bytes transferred)."""
    deadline = time.monotonic() + timeout
    while True:
        record = api(lab, "GET", f"/v1/migrations/{migration_id}")
        assert record["state"] == "running", f"the migration ended before precopy: {record}"
        progress = record["result"].get("progress") or {}
        if record["phase"] == "precopy" and progress.get("transferred_bytes"):
            log.info("QEMU copying: %s bytes sent", progress["transferred_bytes"])
            return
        assert time.monotonic() < deadline, f"QEMU never copied: {record}"
        time.sleep(0.1)


def leader_row(url: str) -> dict[str, Any]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT holder, epoch FROM leader WHERE id = 1")).one()
        return {"holder": row.holder, "epoch": row.epoch}
    finally:
        engine.dispose()


def test_the_lab_keeps_its_store_in_postgresql(lab: LabRun, postgres: PostgresCluster) -> None:
    """Not SQLite by accident: the controller was given the cluster and leads it."""
    state = json.loads((lab_dir(lab) / "lab.json").read_text())
    assert state["db"] == postgres.url
    assert not (lab_dir(lab) / "controller.db").exists()
    assert f":{controller_pid(lab)}:" in leader_row(postgres.url)["holder"]


def test_store_stopped_for_5s_during_precopy(lab: LabRun, postgres: PostgresCluster) -> None:
    source, destination = other_host(lab, VM)
    pid = controller_pid(lab)
    since = controller_log(lab).stat().st_size
    before = leader_row(postgres.url)
    migration_id = migrate(lab, VM, destination, bandwidth_mbps=BANDWIDTH_MBPS)
    wait_copying(lab, migration_id)
    stopped = time.time()
    postgres.stop_server()
    log.info("PostgreSQL stopped")
    try:
        time.sleep(5)
    finally:
        postgres.start_server()
        log.info("PostgreSQL started again")
    record = wait_end(lab, migration_id)
    if record["state"] == "completed":
        # The outage began while QEMU copied a running guest: the source stopped it later.
        events = record["result"]["events"]
        first = events.get("source_stop") or events.get("source_completed")
        assert first is not None and first > stopped, (stopped, events)
    with controller_log(lab).open(errors="replace") as f:
        f.seek(since)
        said = f.read()
    # The outage was felt (a renewal failed) and ridden out by the same controller, which
    # kept its lease: it did not stop acting, nobody else led meanwhile.
    assert "renewing the leader lease failed" in said
    assert "leader lease lost" not in said
    assert controller_pid(lab) == pid
    assert leader_row(postgres.url) == before
    assert record["state"] in {"completed", "rolled-back"}, record
    check_one_vm(lab, VM, VM_IP, record, source, destination)


def test_second_controller_with_a_skewed_clock_never_acts(
        lab: LabRun, postgres: PostgresCluster, tmp_path: Path) -> None:
    assert LIBFAKETIME.exists(), f"{LIBFAKETIME} missing: apt-get install faketime"
    skewed = {**lab.env, "LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": SKEW}
    # The skew is real in a process started so: its wall clock is two hours ahead.
    ahead = subprocess.run([sys.executable, "-c", "import time; print(time.time())"],
                           env=skewed, capture_output=True, text=True, timeout=60, check=True)
    assert float(ahead.stdout) - time.time() > 7000, ahead.stdout
    source, destination = other_host(lab, VM)
    before = leader_row(postgres.url)
    migration_id = migrate(lab, VM, destination, bandwidth_mbps=BANDWIDTH_MBPS)
    wait_copying(lab, migration_id)
    second_log = tmp_path / "second-controller.log"
    with second_log.open("w") as out:
        second = subprocess.run([*VMFERRY, "controller", "serve", "--db", postgres.url,
                                 "--listen", f"127.0.0.1:{free_port()}"], env=skewed,
                                stdout=out, stderr=subprocess.STDOUT, text=True, timeout=120)
    said = second_log.read_text(errors="replace")
    log.info("second controller exited %s: %s", second.returncode, said[-400:])
    assert second.returncode == 2, said
    assert "another controller" in said and "Traceback" not in said, said
    record = wait_end(lab, migration_id)
    assert record["state"] == "completed", record
    # The first kept the lease (same holder, same epoch: nobody took it even for a moment)
    # and drove the whole move.
    assert leader_row(postgres.url) == before
    check_one_vm(lab, VM, VM_IP, record, source, destination)
