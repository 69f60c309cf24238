"""What every CLI command shares: finding the controller, calling it, showing errors."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console

from vmferry import paths
from vmferry.errors import AuthError, CapacityError, InputError, VmferryError
from vmferry.lab.names import CONTROLLER_PORT, LabLayout

console = Console()
err_console = Console(stderr=True)

CURRENT_LAB_FILE = "current-lab"


def current_lab() -> str:
    try:
        return (paths.state_root() / CURRENT_LAB_FILE).read_text().strip() or "lab"
    except OSError:
        return "lab"


def set_current_lab(lab: str) -> None:
    paths.state_root().mkdir(parents=True, exist_ok=True)
    (paths.state_root() / CURRENT_LAB_FILE).write_text(lab)


class ControllerTarget:
    """Where the controller is and which token to present.

    Order: --controller/--token-file options, VMFERRY_CONTROLLER/VMFERRY_TOKEN(_FILE), then the
    current lab's controller and admin token."""

    url: str | None = None
    token_file: str | None = None

    def resolve(self) -> tuple[str, str | None]:
        url = self.url or os.environ.get("VMFERRY_CONTROLLER")
        token = os.environ.get("VMFERRY_TOKEN")
        token_file = self.token_file or os.environ.get("VMFERRY_TOKEN_FILE")
        layout = LabLayout(current_lab())
        if url is None:
            try:
                state = json.loads(layout.state_file.read_text())
                url = f"http://127.0.0.1:{state.get('controller_port', CONTROLLER_PORT)}"
            except (OSError, ValueError):
                url = f"http://127.0.0.1:{CONTROLLER_PORT}"
        if token is None:
            path = Path(token_file) if token_file else layout.admin_token_file
            try:
                token = path.read_text().strip()
            except OSError:
                if token_file:
                    fail(InputError("token-file", f"cannot read {token_file}"))
                token = None
        return url, token


target = ControllerTarget()


def fail(exc: VmferryError) -> NoReturn:
    code = 2 if isinstance(exc, (InputError, AuthError, CapacityError)) else 1
    err_console.print(f"[red]error:[/red] {exc.message}", highlight=False)
    for problem in exc.fields.get("problems", [])[1:]:
        err_console.print(f"       {problem['field']}: {problem['reason']}", highlight=False)
    if exc.fields.get("log"):
        err_console.print(f"last lines of its log:\n{exc.fields['log']}", highlight=False,
                          markup=False)
    raise typer.Exit(code)


@contextmanager
def errors_to_exit() -> Iterator[None]:
    """Turn vmferry errors into a message and exit code 2 (bad input) or 1; no tracebacks."""
    try:
        yield
    except VmferryError as exc:
        fail(exc)


def api_call(method: str, path: str, *, json_body: Any = None, params: dict[str, Any] | None = None,
             timeout: float = 120) -> Any:
    # Imported here, not at the top: commands that never call the API (lab, pki) start
    # without httpx.
    import httpx

    from vmferry.http import client_for, error_payload
    url, token = target.resolve()
    try:
        with client_for(url, token=token, timeout=timeout) as api:
            response = api.request(method, path, json=json_body, params=params)
    except httpx.HTTPError as exc:
        err_console.print(f"[red]error:[/red] cannot reach the controller at {url}: {exc}")
        raise typer.Exit(1) from exc
    if response.is_success:
        return response.json() if response.content else None
    payload = error_payload(response)
    err_console.print(f"[red]error:[/red] {payload.get('message', response.reason_phrase)}",
                      highlight=False)
    for problem in payload.get("problems", [])[1:]:
        err_console.print(f"       {problem['field']}: {problem['reason']}", highlight=False)
    raise typer.Exit(2 if 400 <= response.status_code < 500 else 1)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")

