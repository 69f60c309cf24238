"""``vmferry fabric``, ``token``, ``events`` and ``image``."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from vmferry.cli.common import api_call, console, errors_to_exit, print_json

fabric_app = typer.Typer(help="The fabric: trunks and the VLANs they carry.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens and roles.", no_args_is_help=True)
image_app = typer.Typer(help="The guest image.", no_args_is_help=True)


@fabric_app.command("show")
def fabric_show(as_json: bool = typer.Option(False, "--json")) -> None:
    """Each trunk, the VLANs it should carry and those it carries at each end."""
    trunks = api_call("GET", "/v1/fabric")
    if as_json:
        print_json(trunks)
        return
    table = Table("trunk", "desired VLANs", "actual (a)", "actual (b)", "in sync", "why")
    for t in trunks:
        table.add_row(f"{t['a']}:{t['a_port']} — {t['b']}:{t['b_port']}",
                      _vlans(t["desired"]), _vlans(t["actual_a"]), _vlans(t["actual_b"]),
                      "yes" if t["in_sync"] else "[red]NO[/red]", _why(t))
    console.print(table)


def _why(trunk: dict[str, Any]) -> str:
    """Each end's reason: unreachable (and why) or out of line (and why)."""
    lines = []
    for side in ("a", "b"):
        reason = trunk.get(f"{side}_reason")
        if reason:
            state = "unreachable" if not trunk.get(f"{side}_reachable", True) else "drift"
            lines.append(f"{trunk[side]}: {state}: {reason}")
    return "\n".join(lines)


def _vlans(vlans: list[int] | None) -> str:
    if vlans is None:
        return "?"
    return ",".join(map(str, vlans)) or "-"


@token_app.command("create")
def token_create(name: str, role: str = typer.Option(..., "--role"),
                 expires_in: float | None = typer.Option(None, "--expires-in",
                                                         help="Seconds until it expires"),
                 ) -> None:
    """Create a token; it is shown once."""
    body: dict[str, object] = {"name": name, "role": role}
    if expires_in is not None:
        body["expires_in_s"] = expires_in
    result = api_call("POST", "/v1/tokens", json_body=body)
    console.print(result["token"], highlight=False)


@token_app.command("list")
def token_list(as_json: bool = typer.Option(False, "--json")) -> None:
    tokens = api_call("GET", "/v1/tokens")
    if as_json:
        print_json(tokens)
        return
    table = Table("name", "role", "created", "expires", "revoked")
    for t in tokens:
        table.add_row(t["name"], t["role"], t["created_at"][:19], (t["expires_at"] or "")[:19],
                      "yes" if t["revoked"] else "")
    console.print(table)


@token_app.command("revoke")
def token_revoke(name: str) -> None:
    api_call("DELETE", f"/v1/tokens/{name}")
    console.print(f"token {name} revoked")


def events(limit: int = typer.Option(50, "--limit"),
           as_json: bool = typer.Option(False, "--json")) -> None:
    """The audit log: who changed what, when, and how it ended."""
    rows = api_call("GET", "/v1/events", params={"limit": limit})
    if as_json:
        print_json(rows)
        return
    table = Table("when", "who", "what", "target", "outcome")
    for e in rows:
        table.add_row(e["at"][:19], e["actor"], e["action"], e["target"], e["outcome"])
    console.print(table)


@image_app.command("build")
def image_build(force: bool = typer.Option(True, help="Rebuild even when cached")) -> None:
    """Build the guest image (Debian cloud kernel + busybox initramfs)."""
    from vmferry.image.builder import build_image
    with errors_to_exit(), console.status("building the guest image"):
        image = build_image(force=force)
    console.print(f"guest image: kernel {image.kernel}, initrd {image.initrd}")


def audit(fix: bool = typer.Option(False, "--fix", help="Remove what is found"),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """List anything vmferry installed that no VM needs any more; exit 1 when found."""
    findings = api_call("POST" if fix else "GET", "/v1/audit/fix" if fix else "/v1/audit")
    if as_json:
        print_json(findings)
    elif not findings:
        console.print("audit: nothing left behind")
    else:
        table = Table("kind", "where", "what", "detail")
        for f in findings:
            table.add_row(f["kind"], f["where"], f["what"], f["detail"])
        console.print(table)
    if findings:
        raise typer.Exit(1)
