"""A destination QEMU's TLS directory holds fixed DH parameters (drivers.hypervisor.qemu_tls):
without them QEMU generates a 2048-bit group on every migration's destination."""

from __future__ import annotations

import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import dh
from cryptography.hazmat.primitives.serialization import load_pem_parameters

from vmferry.drivers.hypervisor.qemu_tls import DH_PARAMS_FILE, FFDHE2048_PEM, ensure_dh_params


def test_the_parameters_are_rfc7919_ffdhe2048() -> None:
    params = load_pem_parameters(FFDHE2048_PEM.encode())
    assert isinstance(params, dh.DHParameters)
    numbers = params.parameter_numbers()
    assert numbers.g == 2 and numbers.p.bit_length() == 2048
    hexp = f"{numbers.p:x}".upper()
    # RFC 7919 A.1: p = 2^2048 - 2^1984 + (floor(2^1918 * e) + 560316) * 2^64 - 1
    assert hexp.startswith("FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1")
    assert hexp.endswith("886B423861285C97FFFFFFFFFFFFFFFF")


def test_written_once_and_an_operators_file_kept(tmp_path: Path) -> None:
    path = ensure_dh_params(tmp_path)
    assert path == tmp_path / DH_PARAMS_FILE and path.read_text() == FFDHE2048_PEM
    assert sorted(p.name for p in tmp_path.iterdir()) == [DH_PARAMS_FILE]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600      # like the keys beside it
    path.write_text("operator's own\n")
    assert ensure_dh_params(tmp_path) == path and path.read_text() == "operator's own\n"


def test_an_unwritable_directory_is_reported_not_raised(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    assert ensure_dh_params(missing) is None
    assert not missing.exists()
