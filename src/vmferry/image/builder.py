"""Build the disk-less lab guest: Debian's cloud kernel plus a busybox initramfs.

The image is two files, a kernel and a gzip'd newc initramfs, cached in ``paths.image_dir()``
next to an ``image.json`` manifest that records what they were built from. A build is skipped
when the manifest's inputs (kernel package version, busybox, the guest ``/init``, this
builder's format) still match the machine.

The only network access is ``apt-get download`` through the machine's configured apt sources.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import gzip
import hashlib
import importlib.resources
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vmferry import paths
from vmferry.errors import SetupError

__all__ = [
    "BUILDER_FORMAT",
    "KERNEL_METAPACKAGE",
    "MODULE_ROOTS",
    "GuestImage",
    "build_image",
    "cached_image",
    "ensure_image",
    "init_script",
    "module_load_order",
    "newc_archive",
]

#: Bump when the layout of the initramfs changes, so cached images are rebuilt.
BUILDER_FORMAT = 1
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
BUSYBOX_PATH = Path("/bin/busybox")
#: The guest needs a virtio NIC; their dependencies are loaded first (see module_load_order).
MODULE_ROOTS = ("virtio_pci", "virtio_net")

KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
MANIFEST_FILE = "image.json"
LOCK_FILE = ".build.lock"

_COMMAND_TIMEOUT = 300.0


@dataclass(frozen=True)
class GuestImage:
    """A built guest image: the kernel and initramfs to boot, and what they came from."""

    kernel: Path
    initrd: Path
    kernel_package: str            # e.g. linux-image-6.1.0-56-cloud-amd64
    kernel_version: str            # Debian package version, e.g. 6.1.192-2
    kernel_release: str            # uname -r inside the guest, e.g. 6.1.0-56-cloud-amd64
    busybox_version: str
    init_sha256: str
    modules: tuple[str, ...]       # in load order
    built_at: str                  # ISO 8601, UTC
    builder_format: int = BUILDER_FORMAT

    def to_dict(self) -> dict[str, object]:
        data = dataclasses.asdict(self)
        data["kernel"] = str(self.kernel)
        data["initrd"] = str(self.initrd)
        data["modules"] = list(self.modules)
        return data


# ---- public entry points -----------------------------------------------------------------------

def ensure_image(dest: Path | None = None) -> GuestImage:
    """The cached image if it is current, else a freshly built one.

    Raises SetupError when the image cannot be built (missing packages, apt failure)."""
    return build_image(dest, force=False)


def build_image(dest: Path | None = None, *, force: bool = False) -> GuestImage:
    """Build the guest image into ``dest`` (default ``paths.image_dir()``) and return it.

    Without ``force`` a cached image whose inputs are unchanged is returned as is. Concurrent
    callers (tests of several engineers share the image dir) serialize on a lock file; the
    files are replaced atomically, so a QEMU booting the old image is not disturbed.
    Raises SetupError when a needed package or tool is missing or apt fails."""
    dest = dest or paths.image_dir()
    if not force and not os.access(dest, os.W_OK):
        # A user who may not write the shared image dir can still boot a current image.
        cached = _fresh_cached_image(dest)
        if cached is not None:
            return cached
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SetupError(f"cannot create image directory {dest}", cause=str(exc)) from exc
    with _locked(dest / LOCK_FILE):
        if not force:
            cached = _fresh_cached_image(dest)
            if cached is not None:
                return cached
        return _build(dest)


def cached_image(dest: Path | None = None) -> GuestImage | None:
    """The image recorded in ``dest`` if its files are all there, without checking inputs."""
    dest = dest or paths.image_dir()
    manifest = _read_manifest(dest)
    return _image_from_manifest(dest, manifest) if manifest else None


def init_script() -> bytes:
    """The guest /init shipped with this package."""
    return importlib.resources.files("vmferry.image").joinpath("init.sh").read_bytes()


# ---- cache --------------------------------------------------------------------------------------

@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise SetupError(f"cannot open image lock {lock_path}", cause=str(exc)) from exc
    try:
        # A build takes a few seconds; waiting on another builder beats building twice.
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_manifest(dest: Path) -> dict[str, object] | None:
    try:
        data = json.loads((dest / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _image_from_manifest(dest: Path, manifest: Mapping[str, object]) -> GuestImage | None:
    """The image a manifest describes, or None when it is malformed or a file is missing."""
    try:
        sizes = manifest["sizes"]
        assert isinstance(sizes, dict)
        for fname in (KERNEL_FILE, INITRD_FILE):
            if (dest / fname).stat().st_size != sizes[fname]:
                return None
        modules = manifest["modules"]
        assert isinstance(modules, list)
        return GuestImage(
            kernel=dest / KERNEL_FILE, initrd=dest / INITRD_FILE,
            kernel_package=str(manifest["kernel_package"]),
            kernel_version=str(manifest["kernel_version"]),
            kernel_release=str(manifest["kernel_release"]),
            busybox_version=str(manifest["busybox_version"]),
            init_sha256=str(manifest["init_sha256"]),
            modules=tuple(str(m) for m in modules),
            built_at=str(manifest["built_at"]),
            builder_format=int(str(manifest["builder_format"])),
        )
    except (OSError, KeyError, AssertionError, ValueError):
        return None


def inputs_match(manifest: Mapping[str, object], current: Mapping[str, object]) -> bool:
    """Whether a cached image was built from ``current`` inputs. An input that could not be
    determined now (None, e.g. apt has no package lists) does not invalidate the cache."""
    return all(value is None or manifest.get(key) == value for key, value in current.items())


def _current_inputs() -> dict[str, object]:
    kernel = _resolve_kernel_package(update_lists=False)
    return {
        "builder_format": BUILDER_FORMAT,
        "init_sha256": hashlib.sha256(init_script()).hexdigest(),
        "busybox_version": _busybox_version(),
        "busybox_sha256": _sha256_file(BUSYBOX_PATH),
        "kernel_package": kernel[0] if kernel else None,
        "kernel_version": kernel[1] if kernel else None,
    }


def _fresh_cached_image(dest: Path) -> GuestImage | None:
    manifest = _read_manifest(dest)
    if manifest is None or not inputs_match(manifest, _current_inputs()):
        return None
    return _image_from_manifest(dest, manifest)


# ---- build --------------------------------------------------------------------------------------

def _build(dest: Path) -> GuestImage:
    inputs = _current_inputs()
    kernel_pkg = _resolve_kernel_package(update_lists=True)
    if kernel_pkg is None:
        raise SetupError(f"apt cannot resolve {KERNEL_METAPACKAGE}",
                         cause="no package lists even after apt-get update")
    package, version = kernel_pkg
    inputs["kernel_package"], inputs["kernel_version"] = package, version
    with tempfile.TemporaryDirectory(dir=dest, prefix=".build-") as tmp_name:
        tmp = Path(tmp_name)
        deb = _download_deb(package, tmp)
        tree = tmp / "kernel"
        _run(["dpkg-deb", "-x", str(deb), str(tree)], what=f"unpack {deb.name}")
        release, vmlinuz = _find_kernel(tree)
        module_dir = tree / "lib" / "modules" / release
        order = module_load_order(module_dir, MODULE_ROOTS)
        modules = {name: _read_module(path) for name, path in order}
        archive = _initramfs(modules)
        kernel_tmp, initrd_tmp = tmp / KERNEL_FILE, tmp / INITRD_FILE
        shutil.copyfile(vmlinuz, kernel_tmp)
        initrd_tmp.write_bytes(archive)
        manifest: dict[str, object] = {
            **inputs,
            "kernel_release": release,
            "modules": [name for name, _ in order],
            "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "sizes": {KERNEL_FILE: kernel_tmp.stat().st_size, INITRD_FILE: len(archive)},
        }
        manifest_tmp = tmp / MANIFEST_FILE
        manifest_tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        # Manifest last: a reader that sees it sees the files it describes.
        os.replace(kernel_tmp, dest / KERNEL_FILE)
        os.replace(initrd_tmp, dest / INITRD_FILE)
        os.replace(manifest_tmp, dest / MANIFEST_FILE)
    image = _image_from_manifest(dest, manifest)
    if image is None:
        raise SetupError(f"image in {dest} vanished right after it was built")
    return image


def _run(argv: Sequence[str], *, what: str, cwd: Path | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, cwd=cwd, env=env,
                                check=False,
                                timeout=_COMMAND_TIMEOUT)
    except FileNotFoundError as exc:
        raise SetupError(f"cannot {what}: {argv[0]} is not installed", cause=str(exc)) from exc
    except subprocess.TimeoutExpired as exc:
        raise SetupError(f"cannot {what}: {argv[0]} took over {_COMMAND_TIMEOUT:g}s") from exc
    if check and result.returncode != 0:
        raise SetupError(f"cannot {what}", cause=(result.stderr or result.stdout).strip()[-500:],
                         argv=list(argv))
    return result


def parse_depends(control: str, prefix: str = "linux-image-") -> tuple[str, str | None] | None:
    """(name, pinned version or None) of the first ``prefix...`` package in the Depends field
    of ``apt-cache show`` output; None when there is none."""
    match = re.search(r"^Depends:(.*)$", control, re.MULTILINE)
    if not match:
        return None
    for alternative in match.group(1).split(","):
        first = alternative.split("|")[0].strip()
        dep = re.fullmatch(r"(\S+)(?:\s*\(\s*=\s*([^)\s]+)\s*\))?.*", first)
        if dep and dep.group(1).startswith(prefix) and dep.group(1) != KERNEL_METAPACKAGE:
            return dep.group(1), dep.group(2)
    return None


def parse_version(control: str) -> str | None:
    match = re.search(r"^Version:\s*(\S+)", control, re.MULTILINE)
    return match.group(1) if match else None


def _apt_show(package: str) -> str | None:
    result = _run(["apt-cache", "show", "--no-all-versions", package],
                  what=f"look up {package}", check=False)
    return result.stdout if result.returncode == 0 and result.stdout.strip() else None


def _resolve_kernel_package(*, update_lists: bool) -> tuple[str, str] | None:
    """(package, version) of the real kernel package behind the cloud metapackage, as the
    machine's apt candidate; None when apt knows nothing about it."""
    control = _apt_show(KERNEL_METAPACKAGE)
    if control is None and update_lists:
        # Only when the lists are missing: a clean CI machine may never have run it.
        _run(["apt-get", "update", "-qq"], what="update apt package lists")
        control = _apt_show(KERNEL_METAPACKAGE)
    if control is None:
        return None
    dep = parse_depends(control)
    if dep is None:
        raise SetupError(f"{KERNEL_METAPACKAGE} depends on no linux-image package",
                         cause=control[:500])
    package, version = dep
    if version is None:
        # Debian pins the exact version; look it up only when a metapackage does not.
        real = _apt_show(package)
        version = parse_version(real) if real else None
    if version is None:
        raise SetupError(f"apt knows {KERNEL_METAPACKAGE} but not its kernel {package}")
    return package, version


def _download_deb(package: str, where: Path) -> Path:
    # Downloading as root into a private dir: apt's _apt sandbox user could not write there.
    argv = ["apt-get", "download", "-o", "APT::Sandbox::User=root", package]
    result = _run(argv, what=f"download {package}", cwd=where, check=False)
    if result.returncode != 0:
        _run(["apt-get", "update", "-qq"], what="update apt package lists")
        _run(argv, what=f"download {package}", cwd=where)
    debs = sorted(where.glob(f"{package}_*.deb"))
    if not debs:
        raise SetupError(f"apt-get download {package} produced no .deb")
    return debs[0]


def _find_kernel(tree: Path) -> tuple[str, Path]:
    releases = sorted(p.name for p in (tree / "lib" / "modules").glob("*") if p.is_dir())
    if len(releases) != 1:
        raise SetupError("kernel package has not exactly one module tree", cause=str(releases))
    release = releases[0]
    vmlinuz = tree / "boot" / f"vmlinuz-{release}"
    if not vmlinuz.is_file():
        raise SetupError(f"kernel package has no boot/vmlinuz-{release}")
    return release, vmlinuz


def _busybox_version() -> str:
    result = _run(["dpkg-query", "-W", "-f", "${Version}", BUSYBOX_PACKAGE],
                  what=f"query {BUSYBOX_PACKAGE}", check=False)
    if result.returncode != 0 or not BUSYBOX_PATH.is_file():
        raise SetupError(f"{BUSYBOX_PACKAGE} is not installed (run scripts/install-system-deps.sh)")
    return result.stdout.strip()


def _sha256_file(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise SetupError(f"cannot read {path}", cause=str(exc)) from exc


# ---- kernel modules -----------------------------------------------------------------------------

_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def _module_name(path: Path) -> str:
    name = path.name
    for suffix in _MODULE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    # The kernel treats '-' and '_' in module names alike.
    return name.replace("-", "_")


def _read_module(path: Path) -> bytes:
    """A module's ELF bytes. Compressed modules are unpacked here: busybox insmod cannot."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        result = subprocess.run(["zstd", "-dc", str(path)], capture_output=True,
                                timeout=_COMMAND_TIMEOUT, check=False)
        if result.returncode != 0:
            raise SetupError(f"cannot decompress {path.name}",
                             cause=result.stderr.decode(errors="replace")[-300:])
        return result.stdout
    return data


def _module_depends(elf: bytes) -> list[str]:
    """The ``depends=`` entry of a module's .modinfo section (hard dependencies)."""
    match = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", elf)
    if not match or not match.group(1):
        return []
    return [d.decode().replace("-", "_") for d in match.group(1).split(b",") if d]


def module_load_order(module_dir: Path, roots: Sequence[str]) -> list[tuple[str, Path]]:
    """(name, file) of ``roots`` and all their dependencies, dependencies first.

    Built-in modules (listed in modules.builtin) are skipped. The unpacked package has no
    modules.dep (depmod runs at install time), so dependencies come from each module's modinfo.
    Raises SetupError when a module is neither a file nor built in."""
    files = {_module_name(p): p for p in (module_dir / "kernel").rglob("*.ko*")
             if p.name.endswith(_MODULE_SUFFIXES)}
    builtin = set()
    try:
        for line in (module_dir / "modules.builtin").read_text().splitlines():
            builtin.add(_module_name(Path(line.strip())))
    except OSError:
        pass
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen or name in builtin:
            return
        if name in chain:
            raise SetupError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        path = files.get(name)
        if path is None:
            raise SetupError(f"kernel module {name} not found in {module_dir.name}",
                             cause=f"needed by {chain[-1]}" if chain else None)
        for dep in _module_depends(_read_module(path)):
            visit(dep, (*chain, name))
        seen.add(name)
        order.append((name, path))

    for root in roots:
        visit(root, ())
    return order


# ---- initramfs ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Entry:
    path: str                      # without leading '/'
    mode: int                      # full st_mode, type bits included
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


_S_IFDIR, _S_IFREG, _S_IFLNK, _S_IFCHR = 0o040000, 0o100000, 0o120000, 0o020000


def newc_archive(entries: Sequence[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """A newc ("070701") cpio archive of (path, st_mode, data, (rdev_major, rdev_minor)).

    Written here rather than with cpio(1) so device nodes (/dev/console must exist before
    /init runs) need no root and the archive is byte-for-byte reproducible (mtime 0)."""
    out = bytearray()

    def pad4() -> None:
        out.extend(b"\x00" * (-len(out) % 4))

    for ino, (path, mode, data, (rmaj, rmin)) in enumerate(
            [*entries, ("TRAILER!!!", 0, b"", (0, 0))], start=1):
        name = path.encode() + b"\x00"
        fields = (ino if path != "TRAILER!!!" else 0, mode, 0, 0,
                  2 if mode & 0o170000 == _S_IFDIR else 1, 0, len(data), 0, 0, rmaj, rmin,
                  len(name), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.extend(name)
        pad4()
        out.extend(data)
        pad4()
    return bytes(out)


def _busybox_applets() -> list[str]:
    result = _run([str(BUSYBOX_PATH), "--list"], what="list busybox applets")
    return [a for a in result.stdout.split() if a and "/" not in a and a != "busybox"]


def _initramfs(modules: Mapping[str, bytes]) -> bytes:
    entries: list[_Entry] = [_Entry(d, _S_IFDIR | 0o755) for d in (
        "bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "run", "tmp", "root", "www")]
    entries += [
        _Entry("dev/console", _S_IFCHR | 0o600, rdev=(5, 1)),
        _Entry("dev/null", _S_IFCHR | 0o666, rdev=(1, 3)),
        _Entry("init", _S_IFREG | 0o755, init_script()),
        _Entry("bin/busybox", _S_IFREG | 0o755, BUSYBOX_PATH.read_bytes()),
        _Entry("lib/modules/load-order", _S_IFREG | 0o644,
               "".join(f"{name}\n" for name in modules).encode()),
    ]
    entries += [_Entry(f"bin/{applet}", _S_IFLNK | 0o777, b"busybox")
                for applet in _busybox_applets()]
    entries += [_Entry(f"lib/modules/{name}.ko", _S_IFREG | 0o644, data)
                for name, data in modules.items()]
    archive = newc_archive([(e.path, e.mode, e.data, e.rdev) for e in entries])
    # mtime=0 keeps the initramfs reproducible; level 6 boots as fast as 9 and builds faster.
    return gzip.compress(archive, compresslevel=6, mtime=0)
