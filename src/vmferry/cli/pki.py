"""``vmferry pki``: the CA and the certificates of vmferry's TLS (see vmferry.pki)."""

from __future__ import annotations

from pathlib import Path

import typer

from vmferry.cli.common import console, errors_to_exit

app = typer.Typer(help="The CA and certificates for TLS between vmferry's parts.",
                  no_args_is_help=True)

_DIR_HELP = "PKI directory (default: $VMFERRY_PKI_DIR or <state dir>/pki)"


@app.command("init")
def init(directory: Path | None = typer.Option(None, "--dir", help=_DIR_HELP),
         days: int = typer.Option(3650, "--days", help="Validity of the CA")) -> None:
    """Create the CA (refused if one exists)."""
    from vmferry import pki  # cryptography loads only for the pki commands
    with errors_to_exit():
        path = pki.init_ca(directory or pki.default_pki_dir(), days=days)
    console.print(f"CA certificate: {path}", highlight=False)


@app.command("issue")
def issue(name: str = typer.Argument(..., help="Certificate name (CN), e.g. the host name"),
          dns: list[str] = typer.Option([], "--dns", help="DNS name (SAN); repeatable"),
          ip: list[str] = typer.Option([], "--ip", help="IP address (SAN); repeatable"),
          directory: Path | None = typer.Option(None, "--dir", help=_DIR_HELP),
          days: int = typer.Option(825, "--days", help="Validity"),
          replace: bool = typer.Option(False, "--replace",
                                       help="Replace an existing certificate of NAME")) -> None:
    """Issue NAME's key and certificate (TLS server and client), in QEMU's layout."""
    from vmferry import pki
    with errors_to_exit():
        path = pki.issue(directory or pki.default_pki_dir(), name, dns=dns, ips=ip, days=days,
                         replace=replace)
    console.print(f"certificate of {name}: {path}", highlight=False)
