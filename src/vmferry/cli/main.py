"""The ``vmferry`` command: one Typer app with a sub-app per area."""

from __future__ import annotations

import typer

from vmferry.cli import admin, bench, daemons, lab, migrate, pki, placement, profile, vm
from vmferry.cli.common import target

app = typer.Typer(help="vmferry: live-migrate VMs and carry their network with them.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def _options(
    controller: str | None = typer.Option(None, "--controller", envvar="VMFERRY_CONTROLLER",
                                          help="Controller URL (default: the lab's)"),
    token_file: str | None = typer.Option(None, "--token-file", envvar="VMFERRY_TOKEN_FILE",
                                          help="File holding the API token"),
) -> None:
    target.url = controller
    target.token_file = token_file


app.add_typer(lab.app, name="lab")
app.add_typer(vm.app, name="vm")
app.add_typer(admin.fabric_app, name="fabric")
app.add_typer(admin.token_app, name="token")
app.add_typer(admin.image_app, name="image")
app.add_typer(daemons.controller_app, name="controller")
app.add_typer(daemons.agent_app, name="agent")
app.add_typer(migrate.migration_app, name="migration")
app.add_typer(bench.bench_app, name="bench")
app.add_typer(pki.app, name="pki")
app.command("migrate")(migrate.migrate)
app.command("events")(admin.events)
profile.register(app, vm.app)
placement.register(app, vm.app)
app.command("audit")(admin.audit)


def main() -> None:
    app()
