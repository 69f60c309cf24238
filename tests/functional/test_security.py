"""Issue 12: each attack of the security review, tried against a running lab (TLS on), and shown
refused with nothing changed.

Rogue router advertisements and neighbour advertisements from a guarded VM are tried (and
dropped) by tests/functional/test_profile_ipv6.py against the same OVS profile pipeline.
"""

from __future__ import annotations

import itertools
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from labkit import LabRun, default_topology, running_lab
from vmferry.http import ClientTls, client_for
from vmferry.model.names import tap_name

pytestmark = [pytest.mark.root, pytest.mark.slow]

VM_IP = "192.0.2.21"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    with running_lab(tmp_path_factory.mktemp("state"), default_topology("sec")) as run:
        run.cli("vm", "create", "s1", "--host", "host1", "--vlan", "100", "--ip",
                f"{VM_IP}/24", "--memory", "256")
        yield run


# ---- helpers ------------------------------------------------------------------------------

def lab_dir(lab: LabRun) -> Path:
    return lab.state_dir / "labs" / lab.name


def admin_token(lab: LabRun) -> str:
    return (lab_dir(lab) / "secrets" / "admin.token").read_text().strip()


def api(lab: LabRun, method: str, path: str, body: Any = None,
        token: str | None = None, timeout: float = 60, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"http://127.0.0.1:{lab.port}{path}", json=body,
                         headers={"Authorization": f"Bearer {token or admin_token(lab)}"},
                         timeout=timeout, **kwargs)


def certs(lab: LabRun, name: str) -> Path:
    return lab_dir(lab) / "pki" / "certs" / name


def agent_socket(lab: LabRun, host: str) -> str:
    return str(lab_dir(lab) / "run" / f"agent-{host}.sock")


def agent(lab: LabRun, host: str, identity: str = "controller") -> httpx.Client:
    """The agent of ``host`` as the controller (or ``identity``) calls it."""
    token = (lab_dir(lab) / "secrets" / f"agent-{host}.token").read_text().strip()
    return client_for(f"unix:{agent_socket(lab, host)}", token=token, timeout=30,
                      tls=ClientTls(certs(lab, identity)), server_name=host)


def guest_state(lab: LabRun, host: str, vm: str) -> str:
    with agent(lab, host) as client:
        response = client.get(f"/v1/guests/{vm}")
        return str(response.json()["state"]) if response.status_code == 200 else "absent"


def migration_ip(host: str) -> str:
    return f"203.0.113.{int(host.removeprefix('host'))}"


# ---- root shell through a migration URI ---------------------------------------------------

@pytest.mark.parametrize("uri", ["exec:touch {marker}", "file:{marker}",
                                 "tcp:198.51.100.7:4444", "tcp:203.0.113.1:4444",
                                 "tcp:attacker.example:4444"])
def test_the_source_agent_refuses_uris_other_than_a_peer_on_the_migration_net(
        lab: LabRun, uri: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    with agent(lab, "host1") as client:
        response = client.post("/v1/guests/s1/migrate",
                               json={"uri": uri.format(marker=marker), "peer": "host2"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"]["field"] in ("uri", "body.uri")
    assert not marker.exists()
    assert guest_state(lab, "host1", "s1") == "running"


class LyingAgent:
    """Host2's agent as an attacker who owns host2 would run it: answers like the real one
    (it forwards every call, and holds host2's certificate) but reports ``lie`` as the
    incoming URI of every guest."""

    def __init__(self, lab: LabRun, lie: str) -> None:
        from vmferry.web import ServerTls, make_socket
        self.lab = lab
        self.lie = lie
        self.path = lab_dir(lab) / "run" / "rogue-host2.sock"
        import uvicorn
        tls = ServerTls(certs(lab, "host2"))
        context = tls.context()
        self.server = uvicorn.Server(uvicorn.Config(
            self.app, log_level="warning", interface="asgi3",
            ssl_context_factory=lambda _c, _d: context))
        self.sock = make_socket(f"unix:{self.path}")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.real = agent(lab, "host2")

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        import json

        from starlette.concurrency import run_in_threadpool
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        response = await run_in_threadpool(
            self.real.request, scope["method"], scope["path"],
            params=scope["query_string"].decode(), content=body or None,
            headers={"content-type": "application/json"} if body else None)
        content = response.content
        if b"incoming_uri" in content:
            data = response.json()
            if isinstance(data, dict) and data.get("incoming_uri"):
                data["incoming_uri"] = self.lie
            content = json.dumps(data).encode()
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": content})

    def __enter__(self) -> LyingAgent:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.real.close()


def set_agent_url(lab: LabRun, host: str, url: str) -> None:
    inventory = api(lab, "GET", "/v1/inventory").json()
    for spec in inventory["hosts"]:
        if spec["name"] == host:
            spec["agent_url"] = url
    response = api(lab, "PUT", "/v1/inventory", inventory)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("lie", ["exec:touch {marker}", "tcp:203.0.113.3:{port}"])
def test_a_lying_destination_cannot_redirect_the_stream(lab: LabRun, lie: str,
                                                        tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    lie = lie.format(marker=marker, port=port)
    real_url = f"unix:{agent_socket(lab, 'host2')}"
    with LyingAgent(lab, lie) as rogue:
        set_agent_url(lab, "host2", f"unix:{rogue.path}")
        try:
            response = api(lab, "POST", "/v1/migrations", {"vm": "s1", "to": "host2"})
            assert response.status_code == 202, response.text
            record = api(lab, "GET", f"/v1/migrations/{response.json()['id']}?wait=120",
                         timeout=150).json()
        finally:
            set_agent_url(lab, "host2", real_url)
    assert record["state"] in ("rolled-back", "failed"), record
    assert "incoming" in (record["error"] or ""), record["error"]
    assert not marker.exists()
    assert api(lab, "GET", "/v1/vms/s1").json()["host"] == "host1"
    assert guest_state(lab, "host1", "s1") == "running"
    assert guest_state(lab, "host2", "s1") == "absent"


# ---- the migration stream -----------------------------------------------------------------

def test_a_forged_stream_without_a_certificate_is_refused(lab: LabRun) -> None:
    body = {"name": "forge", "memory_mib": 128, "mac": "52:54:00:12:00:01",
            "ip": "192.0.2.31/24", "vlan": 100, "incoming": True, "migration_peer": "host1"}
    with agent(lab, "host2") as client:
        created = client.put("/v1/guests/forge", json=body, timeout=120)
        assert created.status_code == 200, created.text
        uri = created.json()["incoming_uri"]
        try:
            address, port = uri.removeprefix("tcp:").rsplit(":", 1)
            # A QEMU migration stream header ("QEVM", version 3) and junk, in clear text,
            # from another host of the migration network.
            forge = (f"import socket,time; s=socket.create_connection(('{address}',{port}),5); "
                     "s.sendall(b'QEVM\\x00\\x00\\x00\\x03'+b'\\x00'*4096); time.sleep(1)")
            lab.exec("host3", "python3", "-c", forge)
            log = lab_dir(lab) / "hosts" / "host2" / "guests" / "forge.qemu.log"
            deadline = time.monotonic() + 20
            refused = "TLS handshake failed"
            while refused not in log.read_text(errors="replace") and \
                    time.monotonic() < deadline:
                time.sleep(0.2)
            assert refused in log.read_text(errors="replace"), log.read_text()[-2000:]
            assert client.get("/v1/guests/forge").json()["state"] == "inmigrate"
        finally:
            client.delete("/v1/guests/forge", timeout=60)


# ---- the agent API ------------------------------------------------------------------------

def test_agent_calls_without_the_controllers_certificate_are_refused(lab: LabRun) -> None:
    path = agent_socket(lab, "host1")
    token = (lab_dir(lab) / "secrets" / "agent-host1.token").read_text().strip()
    headers = {"Authorization": f"Bearer {token}"}
    # Plain HTTP on the agent's socket: no TLS handshake, nothing answered.
    with httpx.Client(transport=httpx.HTTPTransport(uds=path), base_url="http://host1",
                      headers=headers, timeout=10) as plain:
        with pytest.raises(httpx.HTTPError):
            plain.get("/v1/guests")
    # TLS that trusts the CA but presents no client certificate.
    context = ssl.create_default_context(cafile=str(certs(lab, "host1") / "ca-cert.pem"))
    with httpx.Client(transport=httpx.HTTPTransport(uds=path, verify=context),
                      base_url="https://host1", headers=headers, timeout=10) as anonymous:
        with pytest.raises(httpx.HTTPError):
            anonymous.get("/v1/guests")
    # A valid certificate of the lab, but not the controller's (host2's).
    with agent(lab, "host1", identity="host2") as other_host:
        with pytest.raises(httpx.HTTPError):
            other_host.get("/v1/guests")
    with agent(lab, "host1") as controller:
        assert controller.get("/v1/guests").status_code == 200


# ---- the inventory ------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("agent_token_file", "/etc/shadow"),
    ("agent_token_file", "{secrets}/../../../../../../etc/shadow"),
    ("agent_url", "http://198.51.100.7:8471"),
    ("agent_url", "unix:/tmp/elsewhere.sock")])
def test_an_inventory_cannot_name_foreign_files_or_urls(lab: LabRun, field: str,
                                                        value: str) -> None:
    before = api(lab, "GET", "/v1/inventory").json()
    changed = api(lab, "GET", "/v1/inventory").json()
    changed["hosts"][0][field] = value.format(secrets=lab_dir(lab) / "secrets")
    response = api(lab, "PUT", "/v1/inventory", changed)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]["field"] == f"hosts[0].{field}"
    assert "root:" not in response.text
    assert api(lab, "GET", "/v1/inventory").json() == before


# ---- bounded waits and streams ------------------------------------------------------------

def heartbeats(lab: LabRun) -> dict[str, str | None]:
    return {h["name"]: h["last_heartbeat"] for h in api(lab, "GET", "/v1/hosts").json()}


def test_41_long_waits_do_not_starve_heartbeats(lab: LabRun) -> None:
    # A slow migration (bandwidth-limited) to wait on.
    started = api(lab, "POST", "/v1/migrations", {"vm": "s1", "to": "host2",
                                                 "bandwidth_mbps": 40})
    assert started.status_code == 202, started.text
    migration = started.json()["id"]
    before = heartbeats(lab)
    with ThreadPoolExecutor(41) as pool:
        waits = [pool.submit(api, lab, "GET", f"/v1/migrations/{migration}?wait=300",
                             timeout=330) for _ in range(41)]
        time.sleep(5)      # the waits that were let in are held; heartbeats keep coming
        during = heartbeats(lab)
        statuses = sorted(f.result().status_code for f in waits)
    assert all(during[h] != before[h] for h in before), (before, during)
    assert statuses.count(429) >= 37 and set(statuses) <= {200, 429}, statuses
    assert api(lab, "GET", f"/v1/migrations/{migration}").json()["state"] == "completed"
    back = api(lab, "POST", "/v1/migrations", {"vm": "s1", "to": "host1"}).json()
    assert api(lab, "GET", f"/v1/migrations/{back['id']}?wait=300",
               timeout=330).json()["state"] == "completed"


def test_a_stream_flood_beyond_the_cap_is_429(lab: LabRun) -> None:
    from vmferry.controller.routes.watch import MAX_STREAMS_PER_CALLER
    headers = {"Authorization": f"Bearer {admin_token(lab)}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{lab.port}", headers=headers,
                      timeout=30) as client:
        opened = []
        try:
            for _ in range(MAX_STREAMS_PER_CALLER):
                stream = client.stream("GET", "/v1/events/stream")
                response = stream.__enter__()
                assert response.status_code == 200
                opened.append(stream)
            with client.stream("GET", "/v1/events/stream") as refused:
                refused.read()
                assert refused.status_code == 429
                assert refused.json()["detail"]["field"] == "stream"
            assert heartbeats(lab)        # everything else still answers
        finally:
            for stream in opened:
                stream.__exit__(None, None, None)
        deadline = time.monotonic() + 10
        status = 429
        while status == 429 and time.monotonic() < deadline:
            with client.stream("GET", "/v1/events/stream?limit=1&after=0") as again:
                again.read()
                status = again.status_code
            time.sleep(0.2)
        assert status == 200           # closed streams give their slots back


# ---- odd headers --------------------------------------------------------------------------

def raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        return sock.recv(65536)


@pytest.mark.parametrize("header", [
    "Content-Length: \u00b2", "Content-Length: \u0661\u0662", "Content-Length: -5",
    "Content-Length: 99999999999999999999999", "Authorization: Bearer \u00ff\u00fe",
    "Last-Event-ID: \u00b2", "Content-Type: application/json; charset=\u00b2"])
def test_odd_headers_never_500(lab: LabRun, header: str) -> None:
    request = (f"POST /v1/tokens HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
               f"{admin_token(lab)}\r\nContent-Type: application/json\r\n{header}\r\n"
               "Connection: close\r\n\r\n{}").encode()
    answer = raw_request(lab.port, request)
    status = int(answer.split(b" ", 2)[1])
    assert 400 <= status < 500, answer[:300]
    assert b"Traceback" not in answer


# ---- derived names ------------------------------------------------------------------------

def colliding_pair(prefix: str = "webapp-") -> tuple[str, str]:
    seen: dict[str, str] = {}
    for i in itertools.count():
        name = f"{prefix}{i:07d}"
        if tap_name(name) in seen:
            return seen[tap_name(name)], name
        seen[tap_name(name)] = name
    raise AssertionError("unreachable")


def test_colliding_vm_names_are_refused(lab: LabRun) -> None:
    first, second = colliding_pair()
    assert tap_name(first) == tap_name(second)
    lab.cli("vm", "create", first, "--host", "host3", "--vlan", "100", "--ip",
            "192.0.2.22/24", "--memory", "128")
    try:
        response = api(lab, "POST", "/v1/vms", {"name": second, "host": "host3", "vlan": 100,
                                                "ip": "192.0.2.23/24", "memory_mib": 128})
        assert response.status_code == 409, response.text
        assert response.json()["detail"]["field"] == "name"
        names = [vm["name"] for vm in api(lab, "GET", "/v1/vms").json()]
        assert first in names and second not in names
        assert guest_state(lab, "host3", first) == "running"
        # The agent refuses it too, should a controller ask.
        with agent(lab, "host3") as client:
            refused = client.put(f"/v1/guests/{second}", json={
                "name": second, "memory_mib": 128, "mac": "52:54:00:12:00:02",
                "ip": "192.0.2.23/24", "vlan": 100})
        assert refused.status_code == 409 and refused.json()["detail"]["field"] == "name"
        assert guest_state(lab, "host3", first) == "running"
    finally:
        lab.cli("vm", "delete", first, check=False)


# ---- processes ----------------------------------------------------------------------------

def all_argvs() -> dict[int, list[str]]:
    """Every process's argv on the machine, as /proc/PID/cmdline has it (``ps`` may cut it)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        found[int(proc.name)] = [a.decode(errors="replace") for a in argv if a]
    return found


def secret_material(lab: LabRun) -> dict[str, str]:
    """Each secret of the lab (tokens, private keys line by line) and where it is kept."""
    found = {}
    for path in (lab_dir(lab) / "secrets").iterdir():
        if path.is_file() and path.read_text().strip():
            found[path.read_text().strip()] = str(path)
    for key in (lab_dir(lab) / "pki").rglob("*-key.pem"):
        for line in key.read_text().splitlines()[1:-1]:
            if len(line) >= 16:         # the base64 body, not the PEM armour
                found[line] = str(key)
    return found


def test_ps_shows_qemu_sandboxed_and_no_secret_in_any_argv(lab: LabRun) -> None:
    """What ``ps`` shows during ``make demo`` (the same ``lab up`` and migration): every QEMU
    with ``-sandbox on`` denying spawn and elevation, and no token or key in any process's
    arguments, the controller's and the agents' included."""
    started = api(lab, "POST", "/v1/migrations", {"vm": "s1", "to": "host2",
                                                 "bandwidth_mbps": 40}).json()
    try:
        time.sleep(2)      # during the migration: both QEMUs run
        argvs = all_argvs()
        ps = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True,
                            text=True).stdout
    finally:
        api(lab, "GET", f"/v1/migrations/{started['id']}?wait=300", timeout=330)
    ours = {pid: a for pid, a in argvs.items() if any(str(lab_dir(lab)) in x for x in a)}
    qemus = [a for a in ours.values() if Path(a[0]).name.startswith("qemu-system")]
    assert len(qemus) >= 2, ours
    for argv in qemus:
        assert "-sandbox" in argv, argv
        sandbox = argv[argv.index("-sandbox") + 1]
        assert sandbox.startswith("on,"), argv
        for rule in ("spawn=deny", "elevateprivileges=deny"):
            assert rule in sandbox.split(","), argv
        assert any(f"-sandbox {sandbox}" in line for line in ps.splitlines()), ps[:2000]
    daemons = [" ".join(a) for a in ours.values() if "serve" in a]
    assert any("controller" in d for d in daemons), daemons
    assert sum("agent" in d for d in daemons) >= 4, daemons
    secrets = secret_material(lab)
    assert any(p.endswith(".token") for p in secrets.values()), secrets.values()
    assert any(p.endswith("-key.pem") for p in secrets.values()), secrets.values()
    leaks = [f"pid {pid} ({argv[0]}) shows the content of {where}"
             for pid, argv in argvs.items() for secret, where in secrets.items()
             if any(secret in arg for arg in argv)]
    leaks += [f"ps shows the content of {where}" for secret, where in secrets.items()
              if secret in ps]
    assert not leaks, "\n".join(leaks)


def test_the_labs_state_and_secrets_are_roots_alone(lab: LabRun) -> None:
    import stat
    loose = []
    for path in [lab_dir(lab), *lab_dir(lab).rglob("*")]:
        mode = path.lstat().st_mode
        if not stat.S_ISLNK(mode) and mode & 0o077:
            loose.append(f"{oct(mode & 0o777)} {path}")
    assert not loose, "\n".join(loose[:30])
