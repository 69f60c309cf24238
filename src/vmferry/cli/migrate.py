"""``vmferry migrate`` and ``vmferry migration``: move a VM live, watch it, report it."""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import typer
from rich.table import Table

from vmferry.cli.common import api_call, console, err_console, fail, print_json, target

migration_app = typer.Typer(help="Migrations: list, show, cancel.", no_args_is_help=True)

FINAL_STATES = {"completed", "rolled-back", "failed"}
# Reads wait for the next event; the stream sends a keep-alive every 15 s.
STREAM_CONNECT_S, STREAM_READ_S = 10.0, 45.0


def migrate(
    vm: str = typer.Argument(..., help="VM to move"),
    to: str = typer.Option(..., "--to", help="Destination host"),
    max_downtime: int | None = typer.Option(None, "--max-downtime",
                                            help="ms (default: the VM's policy, else 300)"),
    bandwidth: int | None = typer.Option(None, "--bandwidth", help="Mbit/s for the copy"),
    postcopy: str = typer.Option("never", "--postcopy", help="auto or never"),
    timeout: float = typer.Option(300, "--timeout", help="Give up after this many seconds"),
    as_json: bool = typer.Option(False, "--json", help="Print the final record as JSON"),
    detach: bool = typer.Option(False, "--detach", help="Start it and return"),
    make_before_break: bool = typer.Option(
        True, "--make-before-break/--no-make-before-break",
        help="During switchover deliver the VM's frames to both hosts"),
    postcopy_after: float | None = typer.Option(
        None, "--postcopy-after",
        help="With --postcopy auto: switch to postcopy after this many seconds "
             "(default: a third of --timeout, at least 5)"),
    boundary: str | None = typer.Option(
        None, "--boundary", help="Cross a subnet boundary by this way: stretch, route, nat "
        "or dual (default: the first that applies; see vmferry where)"),
) -> None:
    """Live-migrate a VM, its port and its VLAN to another host."""
    # The API's request models (pydantic) load for this command only, not for every `vmferry`.
    from pydantic import ValidationError
    from rich.live import Live

    from vmferry.api.controller import MigrationCreate
    from vmferry.model.validation import input_error_from
    try:
        body = MigrationCreate.model_validate({
            "vm": vm, "to": to, "postcopy": postcopy, "timeout_s": timeout,
            "make_before_break": make_before_break, "max_downtime_ms": max_downtime,
            "bandwidth_mbps": bandwidth, "postcopy_after_s": postcopy_after,
            "boundary": boundary})
    except ValidationError as exc:
        fail(input_error_from(exc))
    record = api_call("POST", "/v1/migrations",
                      json_body=body.model_dump(mode="json", exclude_none=True))
    if detach:
        print_json(record) if as_json else console.print(f"migration {record['id']} started")
        return
    deadline = time.monotonic() + timeout + 120
    started = record
    if console.is_terminal and not as_json:
        with Live(_progress_table(started), console=console, refresh_per_second=8) as live:
            for record in follow(started, deadline):
                live.update(_progress_table(record))
    else:
        last = deque(follow(started, deadline), maxlen=1)
        record = last.pop() if last else started
    if as_json:
        print_json(record)
    else:
        print_report(record)
    if record["state"] != "completed":
        raise typer.Exit(1)


def follow(record: dict[str, Any], deadline: float) -> Iterator[dict[str, Any]]:
    """The migration's record each time it changes, until it ends or ``deadline`` passes.

    Reads the controller's event stream (server-sent events); falls back to long polling when
    the stream cannot be had."""
    import httpx

    from vmferry.http import client_for
    url, token = target.resolve()
    timeout = httpx.Timeout(STREAM_CONNECT_S, read=STREAM_READ_S)
    try:
        with client_for(url, token=token, timeout=timeout) as api, \
                api.stream("GET", "/v1/events/stream") as response:
            if response.status_code != 200:
                raise httpx.HTTPError(f"event stream answered {response.status_code}")
            # Changes made before the stream opened are not in it: start from the record now.
            record = api_call("GET", f"/v1/migrations/{record['id']}")
            yield record
            event = None
            for line in response.iter_lines():
                if record["state"] in FINAL_STATES or time.monotonic() > deadline:
                    return
                if line.startswith("event:"):
                    event = line.removeprefix("event:").strip()
                elif line.startswith("data:") and event == "migration":
                    data = json.loads(line.removeprefix("data:"))
                    if data.get("id") == record["id"]:
                        record = data
                        yield record
                elif not line:
                    event = None
            return
    except httpx.HTTPError:
        pass
    while record["state"] not in FINAL_STATES and time.monotonic() < deadline:
        record = api_call("GET", f"/v1/migrations/{record['id']}", params={"wait": 5})
        yield record


def _progress_table(record: dict[str, Any]) -> Table:
    progress = record["result"].get("progress") or {}
    table = Table(title=f"migration {record['id']}: {record['vm']} "
                  f"{record['source']} → {record['destination']}", show_header=False)
    table.add_row("phase", record["phase"])
    table.add_row("state", record["state"])
    if progress:
        table.add_row("QEMU", str(progress.get("status")))
        table.add_row("transferred", _mib(progress.get("transferred_bytes")))
        table.add_row("remaining", _mib(progress.get("remaining_bytes")))
        table.add_row("dirty rate", f"{progress.get('dirty_pages_rate', 0)} pages/s")
        table.add_row("throughput", f"{progress.get('mbps', 0):.0f} Mbit/s")
        expected = progress.get("expected_downtime_ms")
        table.add_row("expected downtime", f"{expected} ms" if expected is not None else "-")
        table.add_row("CPU throttle", f"{progress.get('cpu_throttle_percent', 0)} %")
        eta = _eta(progress)
        table.add_row("ETA", eta)
    return table


def _eta(progress: dict[str, Any]) -> str:
    mbps = progress.get("mbps") or 0
    remaining = progress.get("remaining_bytes") or 0
    if mbps <= 0:
        return "-"
    return f"{remaining * 8 / (mbps * 1e6):.1f} s"


def _mib(value: Any) -> str:
    return f"{(value or 0) / 1048576:.1f} MiB"


def print_report(record: dict[str, Any]) -> None:
    colour = "green" if record["state"] == "completed" else "red"
    console.print(f"migration {record['id']} of {record['vm']} {record['source']} → "
                  f"{record['destination']}: [{colour}]{record['state']}[/{colour}]")
    if record.get("error"):
        err_console.print(f"reason: {record['error']}", highlight=False)
    qemu = record["result"].get("qemu") or {}
    total = sum(p.get("duration_ms") or 0 for p in record["phases"])
    table = Table("phase", "ms", "ok")
    for p in record["phases"]:
        table.add_row(p["phase"], f"{p.get('duration_ms', 0):.0f}",
                      "yes" if p.get("ok") else ("-" if p.get("ok") is None else "NO"))
    console.print(table)
    console.print(f"total {total:.0f} ms; VM downtime (QEMU) {qemu.get('downtime_ms', '-')} ms; "
                  f"moved {_mib(qemu.get('transferred_bytes'))}", highlight=False)


@migration_app.command("list")
def list_(as_json: bool = typer.Option(False, "--json")) -> None:
    rows = api_call("GET", "/v1/migrations")
    if as_json:
        print_json(rows)
        return
    table = Table("id", "vm", "from", "to", "state", "phase", "started")
    for m in rows:
        table.add_row(str(m["id"]), m["vm"], m["source"], m["destination"], m["state"],
                      m["phase"], (m["started_at"] or "")[:19])
    console.print(table)


@migration_app.command("show")
def show(migration_id: int, as_json: bool = typer.Option(False, "--json")) -> None:
    record = api_call("GET", f"/v1/migrations/{migration_id}")
    if as_json:
        print_json(record)
    else:
        print_report(record)


@migration_app.command("cancel")
def cancel(migration_id: int) -> None:
    record = api_call("POST", f"/v1/migrations/{migration_id}/cancel")
    console.print(f"migration {record['id']}: cancel requested (phase {record['phase']})")
