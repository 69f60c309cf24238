"""Everything vmferry does that needs root, in one small module to audit.

Network namespaces, veth pairs, tap devices, addresses and the processes started inside a
namespace all go through here. Netlink work uses pyroute2; nothing shells out to ``ip`` for
links. Processes started in a namespace are run with ``ip netns exec`` (iproute2), which is
the one way that also gives them the namespace's /etc/netns view.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from vmferry.errors import PrivilegedError, WaitTimeout

IFNAME_MAX = 15


def require_root() -> None:
    if os.geteuid() != 0:
        raise PrivilegedError("this operation needs root", cause="not running as root")


# ---- namespaces -------------------------------------------------------------------------------

def list_namespaces() -> list[str]:
    return sorted(netns.listnetns())


def create_namespace(name: str) -> None:
    """Create a namespace (idempotent) and bring its loopback up."""
    if name not in netns.listnetns():
        try:
            netns.create(name)
        except (OSError, NetlinkError) as exc:
            raise PrivilegedError(f"cannot create namespace {name}", cause=str(exc)) from exc
    with _ipr(name) as ipr:
        lo = ipr.link_lookup(ifname="lo")
        if lo:
            ipr.link("set", index=lo[0], state="up")


def delete_namespace(name: str) -> None:
    """Delete a namespace (idempotent). Links inside it disappear with it."""
    if name in netns.listnetns():
        try:
            netns.remove(name)
        except (OSError, NetlinkError) as exc:
            raise PrivilegedError(f"cannot delete namespace {name}", cause=str(exc)) from exc


@contextmanager
def _ipr(namespace: str | None) -> Iterator[IPRoute]:
    try:
        ipr = IPRoute(netns=namespace) if namespace else IPRoute()
    except (OSError, NetlinkError) as exc:
        raise PrivilegedError(f"cannot open netlink in namespace {namespace}",
                              cause=str(exc)) from exc
    try:
        yield ipr
    except NetlinkError as exc:
        raise PrivilegedError(f"netlink operation failed in namespace {namespace}",
                              cause=str(exc)) from exc
    finally:
        ipr.close()


# ---- links ------------------------------------------------------------------------------------

def check_ifname(name: str) -> str:
    if not name or len(name) > IFNAME_MAX or "/" in name or " " in name:
        raise PrivilegedError(f"invalid interface name {name!r}",
                              cause=f"1-{IFNAME_MAX} characters, no '/' or spaces")
    return name


def link_exists(namespace: str | None, ifname: str) -> bool:
    with _ipr(namespace) as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def list_links(namespace: str | None) -> list[str]:
    with _ipr(namespace) as ipr:
        return [str(link.get("ifname")) for link in ipr.get_links()]


def create_veth(ns_a: str | None, name_a: str, ns_b: str | None, name_b: str,
                mtu: int = 1500) -> None:
    """Create a veth pair with one end in each namespace, both up (idempotent)."""
    check_ifname(name_a)
    check_ifname(name_b)
    with _ipr(ns_a) as ipr:
        if not ipr.link_lookup(ifname=name_a):
            peer: dict[str, object] = {"ifname": name_b}
            if ns_b is not None and ns_b != ns_a:
                peer["net_ns_fd"] = ns_b
            ipr.link("add", ifname=name_a, kind="veth", peer=peer)
        index = ipr.link_lookup(ifname=name_a)[0]
        ipr.link("set", index=index, state="up", mtu=mtu)
    with _ipr(ns_b) as ipr:
        index = ipr.link_lookup(ifname=name_b)[0]
        ipr.link("set", index=index, state="up", mtu=mtu)


def create_tap(namespace: str | None, ifname: str, mtu: int = 1500) -> None:
    """Create a persistent tap device, up, for QEMU to open by name (idempotent)."""
    check_ifname(ifname)
    with _ipr(namespace) as ipr:
        if not ipr.link_lookup(ifname=ifname):
            ipr.link("add", ifname=ifname, kind="tuntap", mode="tap")
        index = ipr.link_lookup(ifname=ifname)[0]
        ipr.link("set", index=index, state="up", mtu=mtu)


def create_linux_bridge(namespace: str | None, ifname: str) -> None:
    """A plain Linux bridge (no VLAN filtering: this kernel lacks it), up (idempotent)."""
    check_ifname(ifname)
    with _ipr(namespace) as ipr:
        if not ipr.link_lookup(ifname=ifname):
            ipr.link("add", ifname=ifname, kind="bridge")
        ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")


def attach_to_bridge(namespace: str | None, ifname: str, bridge: str) -> None:
    with _ipr(namespace) as ipr:
        master = ipr.link_lookup(ifname=bridge)[0]
        ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], master=master)


def delete_link(namespace: str | None, ifname: str) -> None:
    """Delete a link (idempotent); deleting one end of a veth deletes both."""
    with _ipr(namespace) as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if found:
            ipr.link("del", index=found[0])


def set_link_up(namespace: str | None, ifname: str, up: bool = True) -> None:
    with _ipr(namespace) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        ipr.link("set", index=index, state="up" if up else "down")


def add_address(namespace: str | None, ifname: str, cidr: str) -> None:
    """Add an IPv4/IPv6 address in CIDR form to a link (idempotent)."""
    address, _, prefix = cidr.partition("/")
    with _ipr(namespace) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        current = {(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index)}
        if (address, int(prefix)) not in current:
            ipr.addr("add", index=index, address=address, prefixlen=int(prefix))


# ---- processes --------------------------------------------------------------------------------

def netns_argv(namespace: str | None, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", namespace, *argv] if namespace else list(argv)


def run_in_namespace(namespace: str | None, argv: Sequence[str], *, timeout: float = 30,
                     env: Mapping[str, str] | None = None,
                     check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command inside a namespace, bounded by ``timeout`` seconds."""
    full_env = {**os.environ, **(env or {})}
    try:
        result = subprocess.run(netns_argv(namespace, argv), capture_output=True, text=True,
                                timeout=timeout, env=full_env)
    except subprocess.TimeoutExpired as exc:
        raise WaitTimeout(f"{' '.join(argv)} in {namespace or 'root namespace'}",
                          timeout) from exc
    if check and result.returncode != 0:
        raise PrivilegedError(f"{argv[0]} failed in {namespace or 'root namespace'}",
                              cause=(result.stderr or result.stdout).strip()[-500:],
                              argv=list(argv))
    return result


def spawn_in_namespace(namespace: str | None, argv: Sequence[str], *, log_path: Path,
                       env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a long-running process inside a namespace, in its own session, logging to a file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    with open(log_path, "ab") as log:
        return subprocess.Popen(netns_argv(namespace, argv), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=full_env, start_new_session=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def is_qemu(pid: int) -> bool:
    """By the program it runs: QEMU renames its process (``-name ...,process=``), so a pid
    file's pid is checked against ``argv[0]`` before anything is signalled."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except (OSError, UnicodeDecodeError):
        return False
    return Path(argv0).name.startswith("qemu-system")


def stop_pid(pid: int, *, timeout: float = 5.0) -> None:
    """SIGTERM a process we started, SIGKILL it after ``timeout`` seconds. Idempotent."""
    if not pid_alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            _reap(pid)
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.05)
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def read_pidfile(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
