"""vmferry.pki and ``vmferry pki``: a CA, certificates in QEMU's layout, private files."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from vmferry import pki
from vmferry.cli.pki import app
from vmferry.errors import ConflictError, InputError, NotFoundError

QEMU_FILES = ["ca-cert.pem", "client-cert.pem", "client-key.pem", "server-cert.pem",
              "server-key.pem"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_and_issue_write_private_files_in_qemu_layout(tmp_path: Path) -> None:
    old = os.umask(0o022)      # a permissive umask must not leak into the files
    try:
        root = tmp_path / "pki"
        ca_path = pki.init_ca(root)
        out = pki.issue(root, "host2", dns=["host2.lab"], ips=["198.51.100.2", "2001:db8::2"])
    finally:
        os.umask(old)
    assert ca_path == root / "ca" / "ca-cert.pem"
    assert out == root / "certs" / "host2"
    assert sorted(p.name for p in out.iterdir()) == QEMU_FILES
    for directory in (root, root / "ca", root / "certs", out):
        assert mode(directory) == 0o700, directory
    for path in [*out.iterdir(), *(root / "ca").iterdir()]:
        assert mode(path) == 0o600, path
    ca = cert(ca_path)
    leaf = cert(out / "server-cert.pem")
    leaf.verify_directly_issued_by(ca)
    assert cert(out / "ca-cert.pem") == ca
    assert cert(out / "client-cert.pem") == leaf
    assert leaf.subject.rfc4514_string() == "CN=host2"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["host2.lab"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("198.51.100.2"), ipaddress.ip_address("2001:db8::2")]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    key = load_pem_private_key((out / "server-key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == leaf.public_key()
    assert leaf.not_valid_after_utc <= ca.not_valid_after_utc


def test_name_is_the_default_dns_san(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    leaf = cert(pki.issue(tmp_path, "controller") / "server-cert.pem")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["controller"]
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "controller"


def test_a_second_init_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    before = (tmp_path / "ca" / "ca-key.pem").read_bytes()
    with pytest.raises(ConflictError) as info:
        pki.init_ca(tmp_path)
    assert info.value.field == "dir"
    assert (tmp_path / "ca" / "ca-key.pem").read_bytes() == before


def test_reissue_needs_replace(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    out = pki.issue(tmp_path, "host1")
    first = (out / "server-cert.pem").read_bytes()
    with pytest.raises(ConflictError):
        pki.issue(tmp_path, "host1")
    assert (out / "server-cert.pem").read_bytes() == first
    pki.issue(tmp_path, "host1", replace=True)
    assert (out / "server-cert.pem").read_bytes() != first


def test_issue_without_a_ca(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError) as info:
        pki.issue(tmp_path, "host1")
    assert info.value.field == "dir"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("field", "kwargs"), [
    ("name", {"name": "../etc"}), ("name", {"name": ""}), ("name", {"name": "a b"}),
    ("dns", {"dns": ["bad host"]}), ("dns", {"dns": ["-x.lab"]}),
    ("ip", {"ips": ["300.1.1.1"]}), ("ip", {"ips": ["host"]}), ("days", {"days": 0}),
])
def test_bad_input_names_the_field_and_writes_nothing(tmp_path: Path, field: str,
                                                      kwargs: dict[str, object]) -> None:
    pki.init_ca(tmp_path)
    name = str(kwargs.pop("name", "host1"))
    with pytest.raises(InputError) as info:
        pki.issue(tmp_path, name, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert not (tmp_path / "certs").exists()


def test_cli_init_and_issue(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["init", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["issue", "host1", "--dir", str(tmp_path), "--dns", "host1.lab",
                                 "--ip", "198.51.100.1"])
    assert result.exit_code == 0, result.output
    assert "certs/host1" in result.output
    result = runner.invoke(app, ["issue", "host1", "--dir", str(tmp_path), "--ip", "nope"])
    assert result.exit_code == 2
    assert "ip: not an IP address" in result.output
    result = runner.invoke(app, ["init", "--dir", str(tmp_path)])
    assert result.exit_code == 2
