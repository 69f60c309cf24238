"""The guest image builder without apt or root: archive format, modules, cache decisions."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vmferry.errors import SetupError
from vmferry.image import builder
from vmferry.image.builder import (
    GuestImage,
    inputs_match,
    module_load_order,
    newc_archive,
    parse_depends,
    parse_version,
)


def read_newc(data: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """Parse a newc archive back into (path, mode, data, rdev) entries, trailer excluded."""
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = []
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmaj, rmin, namesize = (fields[1], fields[6], fields[9], fields[10],
                                                fields[11])
        pos += 110
        name = data[pos:pos + namesize - 1].decode()
        pos += namesize
        pos += -pos % 4
        body = data[pos:pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert pos == len(data)
            return entries
        entries.append((name, mode, body, (rmaj, rmin)))


def test_newc_archive_round_trips_files_links_and_devices() -> None:
    entries = [
        ("bin", 0o040755, b"", (0, 0)),
        ("init", 0o100755, b"#!/bin/sh\necho hi\n", (0, 0)),
        ("bin/sh", 0o120777, b"busybox", (0, 0)),
        ("dev/console", 0o020600, b"", (5, 1)),
        ("odd", 0o100644, b"x" * 5, (0, 0)),
    ]
    assert read_newc(newc_archive(entries)) == entries


def test_newc_archive_is_reproducible() -> None:
    entries = [("init", 0o100755, b"data", (0, 0))]
    assert newc_archive(entries) == newc_archive(entries)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio(1) not installed")
def test_newc_archive_is_readable_by_cpio(tmp_path: Path) -> None:
    archive = newc_archive([("etc", 0o040755, b"", (0, 0)),
                            ("etc/hello", 0o100644, b"hello\n", (0, 0))])
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=archive, capture_output=True,
                             check=True, timeout=10).stdout.decode().split()
    assert listing == ["etc", "etc/hello"]


APT_SHOW_META = """Package: linux-image-cloud-amd64
Source: linux-signed-amd64 (6.1.192+2)
Version: 6.1.192-2
Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)
Description: Linux for x86-64 cloud (meta-package)
"""


def test_parse_depends_takes_the_pinned_kernel_package() -> None:
    assert parse_depends(APT_SHOW_META) == ("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2")
    assert parse_version(APT_SHOW_META) == "6.1.192-2"


def test_parse_depends_without_pin_or_kernel() -> None:
    assert parse_depends("Depends: libc6, linux-image-6.12.9-cloud-amd64\n") == (
        "linux-image-6.12.9-cloud-amd64", None)
    assert parse_depends("Depends: libc6 (>= 2.3)\n") is None
    assert parse_depends("Package: x\n") is None


def fake_module(path: Path, depends: str, *, xz: bool = False) -> None:
    elf = b"\x7fELF....\x00license=GPL\x00depends=" + depends.encode() + b"\x00name=x\x00"
    path.parent.mkdir(parents=True, exist_ok=True)
    if xz:
        path.with_name(path.name + ".xz").write_bytes(lzma.compress(elf))
    else:
        path.write_bytes(elf)


def test_module_load_order_puts_dependencies_first(tmp_path: Path) -> None:
    kernel = tmp_path / "kernel"
    fake_module(kernel / "drivers/virtio/virtio_ring.ko", "")
    fake_module(kernel / "drivers/virtio/virtio.ko", "virtio_ring")
    fake_module(kernel / "drivers/virtio/virtio_pci.ko", "virtio_ring,virtio")
    fake_module(kernel / "net/core/failover.ko", "", xz=True)
    fake_module(kernel / "drivers/net/net_failover.ko", "failover")
    fake_module(kernel / "drivers/net/virtio_net.ko", "virtio_ring,virtio,net_failover")
    order = [name for name, _ in module_load_order(tmp_path, ["virtio_pci", "virtio_net"])]
    assert order == ["virtio_ring", "virtio", "virtio_pci", "failover", "net_failover",
                     "virtio_net"]


def test_module_load_order_skips_builtins_and_reports_missing(tmp_path: Path) -> None:
    fake_module(tmp_path / "kernel/drivers/net/virtio_net.ko", "virtio,net_failover")
    (tmp_path / "modules.builtin").write_text("kernel/drivers/virtio/virtio.ko\n")
    with pytest.raises(SetupError, match="net_failover"):
        module_load_order(tmp_path, ["virtio_net"])
    fake_module(tmp_path / "kernel/drivers/net/net_failover.ko", "")
    assert [n for n, _ in module_load_order(tmp_path, ["virtio_net"])] == [
        "net_failover", "virtio_net"]


def test_module_load_order_detects_cycles(tmp_path: Path) -> None:
    fake_module(tmp_path / "kernel/a.ko", "b")
    fake_module(tmp_path / "kernel/b.ko", "a")
    with pytest.raises(SetupError, match="cycle"):
        module_load_order(tmp_path, ["a"])


def test_compressed_modules_are_unpacked_for_busybox_insmod(tmp_path: Path) -> None:
    fake_module(tmp_path / "kernel/m.ko", "", xz=True)
    (tmp_path / "kernel/g.ko.gz").write_bytes(gzip.compress(b"\x7fELFg"))
    assert builder._read_module(tmp_path / "kernel/m.ko.xz").startswith(b"\x7fELF")
    assert builder._read_module(tmp_path / "kernel/g.ko.gz") == b"\x7fELFg"


def test_inputs_match_ignores_inputs_that_cannot_be_determined() -> None:
    manifest = {"kernel_version": "1", "init_sha256": "a"}
    assert inputs_match(manifest, {"kernel_version": "1", "init_sha256": "a"})
    assert inputs_match(manifest, {"kernel_version": None, "init_sha256": "a"})
    assert not inputs_match(manifest, {"kernel_version": "2", "init_sha256": "a"})


# ---- the cache, with the inputs and the build replaced ---------------------------------------

INPUTS = {"builder_format": builder.BUILDER_FORMAT, "init_sha256": "i", "busybox_version": "b",
          "busybox_sha256": "s", "kernel_package": "linux-image-x", "kernel_version": "1"}


def write_cached_image(dest: Path, **overrides: object) -> None:
    (dest / builder.KERNEL_FILE).write_bytes(b"k" * 10)
    (dest / builder.INITRD_FILE).write_bytes(b"i" * 20)
    manifest = {**INPUTS, "kernel_release": "x-cloud", "modules": ["virtio"],
                "built_at": "2026-01-01T00:00:00+00:00",
                "sizes": {builder.KERNEL_FILE: 10, builder.INITRD_FILE: 20}, **overrides}
    (dest / builder.MANIFEST_FILE).write_text(json.dumps(manifest))


class BuildCalled(Exception):
    pass


@pytest.fixture
def fake_build(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    current = dict(INPUTS)
    monkeypatch.setattr(builder, "_current_inputs", lambda: dict(current))

    def build(dest: Path) -> GuestImage:
        raise BuildCalled(str(dest))

    monkeypatch.setattr(builder, "_build", build)
    return current


def test_fresh_cached_image_is_returned_without_building(
        tmp_path: Path, fake_build: dict[str, object]) -> None:
    write_cached_image(tmp_path)
    image = builder.ensure_image(tmp_path)
    assert image.kernel == tmp_path / "vmlinuz"
    assert image.initrd == tmp_path / "initrd.img"
    assert image.kernel_release == "x-cloud"
    assert image.modules == ("virtio",)


def test_image_dir_defaults_to_paths(tmp_path: Path, fake_build: dict[str, object],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMFERRY_IMAGE_DIR", str(tmp_path / "images"))
    (tmp_path / "images").mkdir()
    write_cached_image(tmp_path / "images")
    assert builder.ensure_image().kernel == tmp_path / "images" / "vmlinuz"


@pytest.mark.parametrize("change", ["input", "size", "missing", "force", "no-manifest"])
def test_cache_is_rebuilt_when_stale(tmp_path: Path, fake_build: dict[str, object],
                                     change: str) -> None:
    write_cached_image(tmp_path)
    if change == "input":
        fake_build["init_sha256"] = "changed"
    elif change == "size":
        (tmp_path / "initrd.img").write_bytes(b"short")
    elif change == "missing":
        (tmp_path / "vmlinuz").unlink()
    elif change == "no-manifest":
        (tmp_path / "image.json").unlink()
    with pytest.raises(BuildCalled):
        builder.build_image(tmp_path, force=change == "force")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_image_dir_serves_a_current_image(tmp_path: Path,
                                                    fake_build: dict[str, object]) -> None:
    write_cached_image(tmp_path)
    tmp_path.chmod(0o555)
    try:
        assert builder.ensure_image(tmp_path).kernel == tmp_path / "vmlinuz"
    finally:
        tmp_path.chmod(0o755)


def test_unknown_kernel_version_keeps_the_cache(tmp_path: Path,
                                                fake_build: dict[str, object]) -> None:
    # No apt lists on this machine: the cached kernel is still good enough.
    fake_build["kernel_package"] = fake_build["kernel_version"] = None
    write_cached_image(tmp_path)
    assert builder.ensure_image(tmp_path).kernel_version == "1"


def test_cached_image_does_not_check_inputs(tmp_path: Path) -> None:
    assert builder.cached_image(tmp_path) is None
    write_cached_image(tmp_path, init_sha256="whatever")
    image = builder.cached_image(tmp_path)
    assert image is not None and image.init_sha256 == "whatever"
    assert image.to_dict()["kernel"] == str(tmp_path / "vmlinuz")


# ---- the guest /init ------------------------------------------------------------------------

def test_init_script_is_packaged() -> None:
    script = builder.init_script()
    assert script.startswith(b"#!/bin/sh\n")
    assert b"VMFERRY-READY" in script


SHELL = shutil.which("busybox")


@pytest.mark.skipif(SHELL is None, reason="busybox not installed")
@pytest.mark.parametrize(("cmdline", "expected"), [
    ("console=ttyS0 quiet vmferry.name=web1 vmferry.ip=192.0.2.10/24 vmferry.workload=5",
     "name=web1 ip=192.0.2.10/24 gw= workload=5 memcheck=0"),
    ("vmferry.ip=192.0.2.11/24 vmferry.gw=192.0.2.1",
     "name=guest ip=192.0.2.11/24 gw=192.0.2.1 workload=0 memcheck=0"),
    ("vmferry.name=x vmferry.ip=192.0.2.12/24 vmferry.workload=lots",
     "name=x ip=192.0.2.12/24 gw= workload=0 memcheck=0"),
    ("vmferry.name=m vmferry.ip=192.0.2.13/24 vmferry.workload=4 vmferry.memcheck=32",
     "name=m ip=192.0.2.13/24 gw= workload=4 memcheck=32"),
    ("vmferry.name=m vmferry.ip=192.0.2.13/24 vmferry.memcheck=-1",
     "name=m ip=192.0.2.13/24 gw= workload=0 memcheck=0"),
])
def test_init_parses_the_kernel_command_line(tmp_path: Path, cmdline: str,
                                             expected: str) -> None:
    init = tmp_path / "init"
    init.write_bytes(builder.init_script())
    result = subprocess.run([str(SHELL), "sh", str(init), "--print-config"],
                            env={**os.environ, "VMFERRY_CMDLINE": cmdline},
                            capture_output=True, text=True, timeout=10, check=True)
    assert result.stdout.strip().splitlines()[-1] == expected


def _memcheck(tmp_path: Path, *args: str) -> list[str]:
    init = tmp_path / "init"
    init.write_bytes(builder.init_script())
    result = subprocess.run([str(SHELL), "sh", str(init), "--memcheck", *args],
                            capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.strip().splitlines()


@pytest.mark.skipif(SHELL is None, reason="busybox not installed")
def test_memcheck_passes_on_intact_memory_while_dirtying(tmp_path: Path) -> None:
    lines = _memcheck(tmp_path, "6", "400", str(tmp_path), "3")
    assert lines[0] == "VMFERRY-MEMCHECK start blocks=6 rate=400"
    assert lines[-1] == "VMFERRY-MEMCHECK pass=3 blocks=6 failures=0"
    assert not [line for line in lines if "FAIL" in line]


@pytest.mark.skipif(SHELL is None, reason="busybox not installed")
def test_memcheck_reports_a_changed_block(tmp_path: Path) -> None:
    """A block that changes behind the checker's back (as a page lost or sent stale by a
    migration would) is reported once, with its number, and counted."""
    init = tmp_path / "init"
    init.write_bytes(builder.init_script())
    # Corrupt block 2 as soon as the region is filled (the "start" line), then let it verify.
    script = (f"{SHELL} sh {init} --memcheck 4 0 {tmp_path} 2 | while read -r line; do "
              f"echo \"$line\"; case \"$line\" in *start*) "
              f"printf \"corrupt\" | dd of={tmp_path}/memcheck-region bs=1 seek=$((2*1048576+77)) "
              f"conv=notrunc 2>/dev/null;; esac; done")
    result = subprocess.run([str(SHELL), "sh", "-c", script], capture_output=True, text=True,
                            timeout=60, check=True)
    lines = result.stdout.strip().splitlines()
    fails = [line for line in lines if line.startswith("VMFERRY-MEMCHECK-FAIL")]
    assert len(fails) == 1 and " block=2 " in fails[0], lines
    assert lines[-1] == "VMFERRY-MEMCHECK pass=2 blocks=4 failures=1"


@pytest.mark.skipif(SHELL is None, reason="busybox not installed")
@pytest.mark.parametrize(("request_line", "answer"), [
    ("tcp 192.0.2.1x 5000", "VMFERRY-TALK error bad host '192.0.2.1x'"),
    ("udp 192.0.2.1 69x", "VMFERRY-TALK error bad port '69x'"),
    ("tcp 192.0.2.1", "VMFERRY-TALK error bad port ''"),
    ("sctp 192.0.2.1 9", "VMFERRY-TALK error bad protocol 'sctp'"),
    ("", "VMFERRY-TALK error bad host ''"),
])
def test_talk_refuses_bad_requests(tmp_path: Path, request_line: str, answer: str) -> None:
    """The guest's control port refuses a request it cannot run, saying which field."""
    init = tmp_path / "init"
    init.write_bytes(builder.init_script())
    result = subprocess.run([str(SHELL), "sh", str(init), "--talk"], input=request_line + "\n",
                            capture_output=True, text=True, timeout=10, check=True)
    assert result.stdout.strip() == answer
