"""The store's tests, run the same on SQLite (WAL) and on a private PostgreSQL 15 cluster.

PostgreSQL comes from ``scripts/postgres-test-server.sh`` (one cluster per test session, one
fresh database per test); those cases skip with a reason when its binaries are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, select, text
from sqlalchemy.exc import IntegrityError

from vmferry.controller import auth, events
from vmferry.controller.migration import Migrations
from vmferry.controller.service import Controller
from vmferry.errors import AuthError, ConflictError, NotFoundError
from vmferry.store.db import Store
from vmferry.store.schema import Base, HostRow, MigrationRow, VmRow
from vmferry.store.upgrade import BASELINE, alembic_config, current_revisions, head_revisions

REPO = Path(__file__).resolve().parents[2]
PG_SCRIPT = REPO / "scripts" / "postgres-test-server.sh"
PG_BIN = Path(os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin"))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A private PostgreSQL cluster for the session; its URL (to database vmferry_test)."""
    if not (PG_BIN / "initdb").exists() or not (PG_BIN / "pg_ctl").exists():
        pytest.skip(f"PostgreSQL 15 binaries missing at {PG_BIN} (apt-get install postgresql)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root needs runuser to start PostgreSQL as user postgres")
    base = tempfile.mkdtemp(prefix="vmferry-pg.")
    os.chmod(base, 0o711)  # the postgres user must reach its data directory below
    cluster = os.path.join(base, "pg")
    try:
        started = subprocess.run(["bash", str(PG_SCRIPT), "start", cluster], capture_output=True,
                                 text=True, timeout=90, check=False)
        if started.returncode != 0:
            pytest.fail(f"private PostgreSQL did not start:\n{started.stderr}")
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(PG_SCRIPT), "stop", cluster], capture_output=True,
                       timeout=60, check=False)
        shutil.rmtree(base, ignore_errors=True)


_counter = iter(range(1_000_000))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    server: str = request.getfixturevalue("postgres_url")
    name = f"t{os.getpid()}_{next(_counter)}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield server.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    store = Store(db_url)
    store.create_schema()
    yield store
    store.dispose()


def _host(store: Store, name: str = "host1") -> None:
    with store.session() as session:
        session.add(HostRow(name=name, agent_url="unix:/nonexistent", report={}))


def _vm(name: str, mac: str, host: str = "host1", ip: str | None = None) -> VmRow:
    # One address per VLAN (store revision 0007): each name gets its own by default.
    ip = ip or f"192.0.2.{10 + sum(map(ord, name)) % 200}/24"
    return VmRow(name=name, host=host, memory_mib=128, vlan=100, ip=ip, mac=mac,
                 state="running")


# ---- schema ----------------------------------------------------------------------------------

def test_upgrade_from_empty_reaches_head_and_matches_models(db_url: str) -> None:
    store = Store(db_url)
    try:
        assert current_revisions(store.engine) == set()
        store.create_schema()
        assert current_revisions(store.engine) == head_revisions()
        tables = set(inspect(store.engine).get_table_names())
        assert set(Base.metadata.tables) | {"alembic_version"} == tables
        # The revisions describe exactly the models: autogenerate finds nothing to do.
        with store.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(
                conn, opts={"compare_type": True}), Base.metadata)
        assert diff == [], f"models and migrations differ; add a revision: {diff}"
        store.create_schema()   # running it again is harmless
        assert current_revisions(store.engine) == head_revisions()
    finally:
        store.dispose()


# The tables ``create_all`` made before vmferry had migrations (revision 0001).


def test_database_made_before_migrations_is_adopted(db_url: str) -> None:
    # What create_all made back then: the baseline revision's tables, no version table.
    legacy = create_engine(db_url)
    with legacy.begin() as connection:
        command.upgrade(alembic_config(connection), BASELINE)
        connection.execute(text("DROP TABLE alembic_version"))
    # Data written back then (by the code of that time: the baseline's columns only)
    # survives the upgrade.
    with legacy.begin() as connection:
        connection.execute(text("INSERT INTO hosts (name, agent_url, report, maintenance) "
                                "VALUES ('host1', 'unix:/nonexistent', '{}', false)"))
    legacy.dispose()
    store = Store(db_url)
    try:
        store.create_schema()
        assert current_revisions(store.engine) == head_revisions()
        with store.session() as session:
            assert session.get(HostRow, "host1") is not None
    finally:
        store.dispose()


# ---- VMs and MACs ----------------------------------------------------------------------------

def test_vm_rows(store: Store) -> None:
    _host(store)
    with store.session() as session:
        session.add(_vm("web1", "52:54:00:00:00:01"))
    controller = Controller(store)
    [vm] = controller.vms()
    assert (vm.name, vm.host, vm.mac, vm.state) == ("web1", "host1", "52:54:00:00:00:01",
                                                    "running")
    with pytest.raises(NotFoundError):
        controller.vm("nope")
    with pytest.raises(IntegrityError), store.session() as session:
        session.add(_vm("web2", "52:54:00:00:00:02", host="no-such-host"))


def test_mac_unique_in_the_table(store: Store) -> None:
    _host(store)
    with store.session() as session:
        session.add(_vm("a", "52:54:00:00:00:01"))
    with pytest.raises(IntegrityError), store.session() as session:
        session.add(_vm("b", "52:54:00:00:00:01"))


def test_concurrent_mac_allocation_hands_out_distinct_macs(store: Store) -> None:
    _host(store)
    controller = Controller(store)
    macs: list[str] = []
    errors: list[BaseException] = []

    def create(i: int) -> None:
        try:
            with store.session() as session:
                mac = controller._allocate_mac(session)
                session.add(_vm(f"vm{i}", mac))
            macs.append(mac)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "MAC allocation hung"
    assert errors == []
    assert len(set(macs)) == 8
    with store.session() as session:
        assert len({v.mac for v in session.scalars(select(VmRow))}) == 8


def test_one_address_per_vlan_in_the_table(store: Store) -> None:
    _host(store)
    with store.session() as session:
        session.add(_vm("a", "52:54:00:00:00:01", ip="192.0.2.50/24"))
    with pytest.raises(IntegrityError), store.session() as session:
        session.add(_vm("b", "52:54:00:00:00:02", ip="192.0.2.50/24"))
    with store.session() as session:      # the same address on another VLAN is fine
        row = _vm("c", "52:54:00:00:00:03", ip="192.0.2.50/24")
        row.vlan = 200
        session.add(row)


def test_leader_lease_is_fenced_on_each_backend(store: Store) -> None:
    from vmferry.controller.leader import Fenced, LeaderLease
    first = LeaderLease(store, holder="a:1:x", ttl=30)
    first.acquire()
    with pytest.raises(ConflictError):
        LeaderLease(store, holder="b:2:y", ttl=30).acquire()
    first.release()                       # (PostgreSQL: the advisory lock goes too)
    second = LeaderLease(store, holder="b:2:y", ttl=30)
    second.acquire()
    assert second.epoch == first.epoch + 1
    with store.session() as session, pytest.raises(Fenced):
        first.check(session)
    with store.session() as session:
        second.check(session)
    second.release()


# ---- tokens ----------------------------------------------------------------------------------

def test_tokens_create_authenticate_revoke(store: Store) -> None:
    token = auth.create_token(store, "alice", "server-admin")
    who = auth.authenticate(store, token)
    assert (who.name, who.role) == ("alice", auth.Role.SERVER_ADMIN)
    with pytest.raises(ConflictError):
        auth.create_token(store, "alice", "viewer")
    with pytest.raises(AuthError, match="unknown token"):
        auth.authenticate(store, token + "x")
    auth.revoke_token(store, "alice")
    with pytest.raises(AuthError, match="revoked"):
        auth.authenticate(store, token)
    with pytest.raises(NotFoundError):
        auth.revoke_token(store, "bob")
    [listed] = auth.list_tokens(store)
    assert listed["name"] == "alice" and listed["revoked"] is True
    # Only the hash is stored.
    with store.engine.connect() as conn:
        assert token not in str(list(conn.execute(text("SELECT * FROM tokens"))))


def test_agent_token_authenticates_as_its_host(store: Store) -> None:
    with store.session() as session:
        session.add(HostRow(name="host2", agent_url="unix:/x",
                            agent_token_hash=auth.hash_token("agent-secret"), report={}))
    who = auth.authenticate(store, "agent-secret")
    assert (who.role, who.host) == (auth.Role.AGENT, "host2")


# ---- events ----------------------------------------------------------------------------------

def test_events_in_order_with_detail(store: Store) -> None:
    for i in range(5):
        events.record(store, "alice", "vm.create", f"vm{i}", "ok", n=i, tags={"a", "b"} if i
                      else None, nested={"x": [1, 2]})
    rows = events.recent(store, limit=3)
    assert [r.target for r in rows] == ["vm2", "vm3", "vm4"]
    assert rows[0].detail["nested"] == {"x": [1, 2]}
    later = events.recent(store, after_id=rows[1].id)
    assert [r.target for r in later] == ["vm4"]


# ---- the migrations table --------------------------------------------------------------------

def test_migration_records(store: Store) -> None:
    with store.session() as session:
        row = MigrationRow(vm="web1", source="host1", destination="host2", state="running",
                           phase="precheck", options={"max_downtime_ms": 300}, phases=[],
                           result={})
        session.add(row)
        session.flush()
        migration_id = row.id
    with store.session() as session:
        row = session.get(MigrationRow, migration_id)
        assert row is not None
        row.phases = [*row.phases, {"phase": "precheck", "started": "2026-01-01T00:00:00+00:00",
                                    "ok": True}]
        row.result = {"qemu": {"status": "completed", "downtime_ms": 42}}
        row.state = "completed"
    migrations = Migrations(Controller(store))
    record = migrations.get(migration_id)
    assert record.state == "completed"
    assert [(p.phase, p.ok) for p in record.phases] == [("precheck", True)]
    assert record.result.qemu is not None and record.result.qemu.downtime_ms == 42
    assert [m.id for m in migrations.recent()] == [migration_id]
    with pytest.raises(NotFoundError):
        migrations.get(migration_id + 1)
