"""A small PKI for vmferry's TLS: one CA, and a certificate per component (host, controller).

Layout under the PKI directory (directories 0700, files 0600)::

    ca/ca-cert.pem   ca/ca-key.pem            the CA (keep ca-key.pem off the hosts)
    certs/<name>/ca-cert.pem                  what <name> trusts
    certs/<name>/server-cert.pem  server-key.pem
    certs/<name>/client-cert.pem  client-key.pem

``certs/<name>`` is exactly what QEMU's ``tls-creds-x509`` reads from its ``dir`` (a host is
a migration destination once and a source later), and serves HTTPS with client certificates
too. One key and one certificate (serverAuth and clientAuth) are written under both roles'
names. The subject is ``CN=<name>`` and nothing else: QEMU's ``authz-simple`` matches the
peer's distinguished name as a string ("CN=<name>").
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vmferry.errors import ConflictError, InputError, NotFoundError
from vmferry.paths import state_root

__all__ = ["CertificateAuthority", "default_pki_dir", "init_ca", "issue", "load_ca"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_DNS_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_CA_DAYS = 3650
_CERT_DAYS = 825


def default_pki_dir() -> Path:
    """``$VMFERRY_PKI_DIR``, else ``<state root>/pki``."""
    return Path(os.environ.get("VMFERRY_PKI_DIR", str(state_root() / "pki")))


@dataclass(frozen=True)
class CertificateAuthority:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)      # mkdir's mode is filtered by the umask; an old dir may be wider
    return path


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the first byte (no umask window),
    replacing it atomically."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def init_ca(directory: Path, *, common_name: str = "vmferry CA",
            days: int = _CA_DAYS) -> Path:
    """Create the CA in ``directory/ca``; returns the CA certificate's path.
    Raises ConflictError when a CA is there already (it would orphan every certificate)."""
    if days < 1:
        raise InputError("days", "at least 1")
    ca_dir = Path(directory) / "ca"
    if (ca_dir / "ca-key.pem").exists() or (ca_dir / "ca-cert.pem").exists():
        raise ConflictError("dir", f"a CA exists in {ca_dir} already")
    _private_dir(Path(directory))
    _private_dir(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    _write_private(ca_dir / "ca-key.pem", _pem_key(key))
    _write_private(ca_dir / "ca-cert.pem", _pem_cert(cert))
    return ca_dir / "ca-cert.pem"


def load_ca(directory: Path) -> CertificateAuthority:
    """The CA of ``directory``. Raises NotFoundError when there is none."""
    ca_dir = Path(directory) / "ca"
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / "ca-cert.pem").read_bytes())
        key = serialization.load_pem_private_key((ca_dir / "ca-key.pem").read_bytes(), None)
    except FileNotFoundError as exc:
        raise NotFoundError("dir", f"no CA in {ca_dir} (run `vmferry pki init`)") from exc
    except ValueError as exc:
        raise InputError("dir", f"unreadable CA in {ca_dir}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InputError("dir", f"the CA key in {ca_dir} is not an EC key")
    return CertificateAuthority(cert, key)


def _alt_names(name: str, dns: Sequence[str], ips: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dns:
        if not _DNS_RE.match(host):
            raise InputError("dns", f"not a DNS name: {host[:64]!r}")
        names.append(x509.DNSName(host))
    for text in ips:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(text)))
        except ValueError as exc:
            raise InputError("ip", f"not an IP address: {text[:64]!r}") from exc
    if not dns and _DNS_RE.match(name):
        names.insert(0, x509.DNSName(name))
    return names


def issue(directory: Path, name: str, *, dns: Sequence[str] = (), ips: Sequence[str] = (),
          days: int = _CERT_DAYS, replace: bool = False) -> Path:
    """Issue ``name``'s key and certificate (CN=name; SANs: ``dns`` or else ``name``, and
    ``ips``), usable as TLS server and client; returns ``certs/<name>``. Raises InputError
    for a bad name, DNS name, address or validity, NotFoundError without a CA,
    ConflictError when ``name`` has a certificate already and ``replace`` is false."""
    if not _NAME_RE.match(name):
        raise InputError("name", "1-63 characters: letters, digits, '_', '.' and '-'")
    if days < 1:
        raise InputError("days", "at least 1")
    alt_names = _alt_names(name, dns, ips)
    ca = load_ca(directory)
    out = Path(directory) / "certs" / name
    if (out / "server-cert.pem").exists() and not replace:
        raise ConflictError("name", f"{name} has a certificate already (see {out})")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca.certificate.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(min(now + datetime.timedelta(days=days),
                                    ca.certificate.not_valid_after_utc))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               # QEMU (gnutls) refuses server certificates without keyEncipherment, EC or not.
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=True, data_encipherment=False,
                                            key_agreement=True, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                     ExtendedKeyUsageOID.CLIENT_AUTH]),
                              critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca.key.public_key()), critical=False))
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    _private_dir(Path(directory) / "certs")
    _private_dir(out)
    _write_private(out / "ca-cert.pem", _pem_cert(ca.certificate))
    for role in ("server", "client"):
        _write_private(out / f"{role}-key.pem", _pem_key(key))
        _write_private(out / f"{role}-cert.pem", _pem_cert(cert))
    return out
