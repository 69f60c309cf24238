"""The Diffie-Hellman group a destination QEMU's TLS server credentials use.

QEMU's ``tls-creds-x509`` with ``endpoint=server`` reads ``dh-params.pem`` from its directory;
when the file is missing it *generates* 2048-bit DH parameters on the spot (QEMU's
``crypto/tlscreds.c``, ``gnutls_dh_params_generate2``): a random prime search that took
1.2-8.9 s of CPU per migration's destination on the lab (issue 14), on its main loop, before
``migrate-incoming`` could even be sent. Parameters are public and need not be fresh: the
file here is RFC 7919's ``ffdhe2048`` group (what ``openssl genpkey -genparam -algorithm DH
-pkeyopt group:ffdhe2048`` prints), written once next to the certificates.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["DH_PARAMS_FILE", "FFDHE2048_PEM", "ensure_dh_params"]

#: The name QEMU looks for in a ``tls-creds-x509`` directory.
DH_PARAMS_FILE = "dh-params.pem"

#: RFC 7919 Appendix A.1, ffdhe2048 (p, g=2), PKCS#3 PEM as gnutls imports it.
FFDHE2048_PEM = """-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


def ensure_dh_params(tls_dir: Path) -> Path | None:
    """Make ``tls_dir/dh-params.pem`` exist (an operator's own file is kept); returns its
    path, or None when it cannot be written (QEMU then generates parameters, slowly)."""
    path = tls_dir / DH_PARAMS_FILE
    if path.is_file():
        return path
    partial = tls_dir / f".{DH_PARAMS_FILE}.{os.getpid()}"
    try:
        partial.write_text(FFDHE2048_PEM)
        # Public, but a lab's state is root's alone (test_security) like the keys beside it.
        os.chmod(partial, 0o600)
        os.replace(partial, path)       # atomic: agents sharing a directory may race here
    except OSError as exc:
        partial.unlink(missing_ok=True)
        log.warning("cannot write %s (%s): each destination QEMU will generate DH "
                    "parameters itself, seconds of CPU per migration", path, exc)
        return None
    return path
