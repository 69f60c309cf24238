"""``vmferry bench``: benchmarks that bring up a lab of their own, measure, and bring it down."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from vmferry import paths
from vmferry.bench.soak import command as soak_command
from vmferry.cli.common import console, errors_to_exit

bench_app = typer.Typer(help="Benchmarks on a lab of their own.", no_args_is_help=True)


@bench_app.command("migration")
def migration(
    runs: int = typer.Option(10, "--runs", min=1, max=100,
                             help="Migrations per variant (back and forth across the spine)"),
    memory: int = typer.Option(256, "--memory", min=64, help="Guest memory, MiB"),
    workload_mibps: int = typer.Option(0, "--workload-mibps", min=0,
                                       help="Memory the guest dirties, MiB/s (0: idle)"),
    interval_ms: float = typer.Option(2.0, "--interval-ms", min=1.0, max=2.0,
                                      help="Ping probe interval, ms"),
    max_downtime: int = typer.Option(300, "--max-downtime", min=1,
                                     help="QEMU downtime limit, ms (same for every variant)"),
    variants: str = typer.Option("floor,vmferry,naive", "--variants",
                                 help="Comma-separated variants to run"),
    peer: list[str] = typer.Option([], "--peer",
                                   help="Also measure a peer in the same run (ovn); repeatable"),
    workload: int | None = typer.Option(None, "--workload", min=0,
                                        help="Same as --workload-mibps"),
    output: Path = typer.Option(Path("bench-results/migration.json"), "--output", "-o",
                                help="Where to write the JSON report"),
    lab_name: str = typer.Option("bench", "--lab-name", help="Name of the benchmark's lab"),
    state_dir: Path | None = typer.Option(None, "--state-dir",
                                          help="State root for the lab (default: vmferry's)"),
    controller_port: int = typer.Option(0, "--controller-port",
                                        help="The lab controller's TCP port (0: a free one)"),
    topology: Path | None = typer.Option(None, "--topology", help="Topology YAML"),
    boundary: str | None = typer.Option(
        None, "--boundary", help="Move into a routed rack by this way: stretch, route, nat "
        "or dual (route, nat and dual: --variants vmferry; dual pings the old and the new "
        "address, lost and late are not counted); default topology then "
        "examples/routed-rack.yaml"),
) -> None:
    """Migrate a guest back and forth under a 1-2 ms ping and a 10 ms TCP echo, variants
    interleaved: the hand-wired floor, vmferry migrate, a naive wire-after-switchover order
    (and peers); print per-variant medians (min-max) and the targets, write JSON."""
    from vmferry.bench.migration import BenchConfig, RunResult, run_benchmark, write_report
    if state_dir is not None:
        # Keep sharing the image cache: building a guest image takes a while.
        os.environ.setdefault("VMFERRY_IMAGE_DIR", str(paths.image_dir()))
        os.environ["VMFERRY_STATE_DIR"] = str(state_dir.absolute())
    try:
        config = BenchConfig(runs=runs, memory_mib=memory,
                             workload_mibps=workload if workload is not None else workload_mibps,
                             interval_ms=interval_ms, max_downtime_ms=max_downtime,
                             variants=tuple(dict.fromkeys(
                                 [v.strip() for v in variants.split(",") if v.strip()]
                                 + [p.strip() for p in peer if p.strip()])),
                             lab_name=lab_name, controller_port=controller_port,
                             topology=topology, boundary=boundary)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc

    def on_run(result: RunResult) -> None:
        if result.ok:
            console.print(f"  {result.variant} #{result.run} {result.source}->"
                          f"{result.destination}: interruption {result.interruption_ms} ms, "
                          f"lost {result.lost}, dup {result.duplicates}, late {result.late}, "
                          f"TCP stall {result.tcp_stall_ms} ms, pause {result.pause_ms} ms, "
                          f"QEMU downtime {result.qemu_downtime_ms} ms, MAC moves "
                          f"{result.mac_moves}, total {result.total_ms} ms", highlight=False)
        else:
            console.print(f"  [red]{result.variant} #{result.run} failed:[/red] {result.error}",
                          highlight=False)

    with errors_to_exit(), console.status("bench") as status:
        document = run_benchmark(config, say=lambda m: status.update(f"bench: {m}"),
                                 on_run=on_run,
                                 on_report=lambda partial: write_report(partial, output))
    write_report(document, output)
    # Wide tables: a narrow terminal (or a pipe's 80 columns) would truncate every figure.
    wide = Console(width=max(console.width, TABLE_WIDTH))
    wide.print(results_table(document))
    wide.print(extra_table(document))
    wide.print(comparisons_table(document))
    for name, variant in document["variants"].items():
        console.print(f"{name}: split {', '.join(variant['split']) or '-'}; "
                      f"{variant['description']}", highlight=False)
    _print_footer(document, output)
    if any(v["error"] for v in document["variants"].values()):
        raise typer.Exit(1)


def _print_footer(document: dict[str, Any], output: Path) -> None:
    console.print(f"migration link: {document.get('migration_link_mbps')} Mbit/s "
                  "(bound = bytes QEMU sent / this)", highlight=False)
    if document.get("boundary"):
        console.print(f"every move crossed into a routed rack by {document['boundary']}",
                      highlight=False)
    console.print(f"JSON written to {output}")


def _stat(summary: dict[str, Any], digits: int = 0) -> str:
    if summary["median"] is None:
        return "-"
    return (f"{summary['median']:.{digits}f} "
            f"({summary['min']:.{digits}f}-{summary['max']:.{digits}f})")


TABLE_WIDTH = 240
COLUMNS = (("interruption_ms", "interruption ms"), ("lost", "lost"), ("duplicates", "dup"),
           ("late", "late"), ("max_rtt_ms", "max RTT ms"), ("tcp_stall_ms", "TCP stall ms"),
           ("pause_ms", "pause ms"), ("network_share_ms", "network ms"),
           ("mac_moves_max", "MAC moves"), ("qemu_downtime_ms", "QEMU downtime ms"),
           ("total_ms", "total ms"), ("bound_ms", "bound ms"))
EXTRA = (("controller_cpu_ms", "controller CPU ms"),
         ("completed_to_switchover_ms", "completed -> switchover ms"),
         ("switchover_open_ms", "rules installed in ms"))


def results_table(document: dict[str, Any]) -> Table:
    config = document["config"]
    table = Table(title=f"live migration, {config['memory_mib']} MiB guest dirtying "
                  f"{config['workload_mibps']} MiB/s, {document['probe']}; median (min-max)")
    table.add_column("variant")
    table.add_column("ok", justify="right")
    for _, title in COLUMNS:
        table.add_column(title, justify="right")
    for name, variant in document["variants"].items():
        summary = variant["summary"]
        table.add_row(name, f"{variant['runs_ok']}/{len(variant['runs'])}",
                      *(_stat(summary[key]) for key, _ in COLUMNS))
    return table


def extra_table(document: dict[str, Any]) -> Table:
    table = Table(title="vmferry's controller, per migration; median (min-max)")
    for _, title in EXTRA:
        table.add_column(title, justify="right")
    summary = document["variants"].get("vmferry", {}).get("summary")
    if summary:
        table.add_row(*(_stat(summary[key], digits=1) for key, _ in EXTRA))
    return table


def comparisons_table(document: dict[str, Any]) -> Table:
    table = Table(title="vmferry against the targets")
    for column in ("figure", "value", "target", "met"):
        table.add_column(column)
    for figure in document["comparisons"].values():
        value = "-" if figure["value"] is None else f"{figure['value']}"
        met = {True: "[green]yes[/green]", False: "[red]no[/red]", None: "-"}[figure["met"]]
        table.add_row(figure["what"], value, f"<= {figure['target_max']}", met)
    return table


@bench_app.command("profiles")
def profiles(
    runs: int = typer.Option(7, "--runs", min=1, max=100, help="Repetitions of each figure"),
    ports: int = typer.Option(50, "--ports", min=1, max=1000,
                              help="Ports a profile change converges on"),
    output: Path = typer.Option(Path("bench-results/profiles.json"), "--output", "-o",
                                help="Where to write the JSON report"),
) -> None:
    """Median time to realize a port profile on one port and to converge a change on N ports,
    on a private Open vSwitch, against hand-wired ovs-ofctl; print a table, write JSON."""
    from vmferry.bench.profiles import run, write_report
    with errors_to_exit(), console.status("bench: port profiles"):
        document = run(runs, ports)
    write_report(document, output)
    table = Table(title=f"port profiles on Open vSwitch, {runs} runs (median (min-max))")
    for column in ("figure", "vmferry", "hand-wired peer", "ratio", "target", "met"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for key, what in (("realize_one_port", "realize a profile on one port"),
                      ("converge_change", f"converge a change on {ports} ports")):
        figure = document[key]
        table.add_row(what, f"{figure['median_s'] * 1000:.1f} ms "
                      f"({figure['min_s'] * 1000:.1f}-{figure['max_s'] * 1000:.1f})",
                      f"{figure['peer_median_s'] * 1000:.1f} ms",
                      f"{figure['ratio_to_peer']}x",
                      f"< {figure['target_s'] * 1000:.0f} ms",
                      "[green]yes[/green]" if figure["met"] else "[red]no[/red]")
    console.print(table)
    console.print(f"peer: {document['peer']}", highlight=False)
    console.print(f"JSON written to {output}")


@bench_app.command("placement")
def placement(
    hosts: int = typer.Option(10_000, "--hosts", min=2, max=100_000),
    vms: int = typer.Option(100_000, "--vms", min=1, max=1_000_000),
    queries: int = typer.Option(200, "--queries", min=1, max=100_000,
                                help="`where` queries on random VMs"),
    drains: int = typer.Option(20, "--drains", min=1, max=1000,
                               help="Drain plans, each of a host holding 40 VMs"),
    output: Path = typer.Option(Path("bench-results/placement.json"), "--output", "-o"),
    lab_drain: int = typer.Option(0, "--lab-drain", min=0, max=8, help="Drain N VMs on a lab"),
) -> None:
    """The placement model on a simulated data center (in memory, no lab): p50/p99 of a
    `where` query and of a 40-VM drain plan; writes JSON."""
    from vmferry.bench.placement import (
        PlacementBenchConfig,
        run_placement_bench,
        write_placement_report,
    )
    cfg = PlacementBenchConfig(hosts=hosts, vms=vms, where_queries=queries, drains=drains)
    cfg.lab_drain_vms = lab_drain
    if cfg.drains * cfg.drain_vms > cfg.vms or cfg.hosts < 2 * cfg.drains:
        raise typer.BadParameter("too few VMs or hosts for that many 40-VM drains",
                                 param_hint="--drains")
    with console.status(f"simulating {hosts} hosts x {vms} VMs"):
        result = run_placement_bench(cfg)
    write_placement_report(result, output)
    table = Table("query", "n", "p50 ms", "p99 ms", "target")
    table.add_row("where (every host, every reason)", str(result["where"]["n"]),
                  str(result["where"]["p50_ms"]), str(result["where"]["p99_ms"]), "p99 < 50 ms")
    table.add_row(f"drain plan ({cfg.drain_vms} VMs)", str(result["drain_plan"]["n"]),
                  str(result["drain_plan"]["p50_ms"]), str(result["drain_plan"]["p99_ms"]),
                  "< 1000 ms")
    console.print(f"{result['hosts']} hosts, {result['vms']} VMs (set up in "
                  f"{result['setup_s']} s); drains moved {result['drain_moves']} VMs, "
                  f"{result['drain_stuck']} had nowhere to go")
    console.print(table)
    console.print_json(data=result.get("lab_drain"))
    console.print(f"written to {output}")


@bench_app.command("tls")
def tls(
    rounds: int = typer.Option(5, "--rounds", min=1, max=100, help="Migrations per mode"),
    memory: int = typer.Option(256, "--memory", min=64, help="Guest memory (MiB)"),
    workload: int = typer.Option(0, "--workload", min=0, help="Guest dirtying rate (MiB/s)"),
) -> None:
    """Migration time with TLS (HTTPS + QEMU migration TLS) and without, on two labs one after
    the other; prints JSON with the medians and the ratio TLS / plain."""
    import json

    from vmferry.bench.tls import run
    with errors_to_exit():
        document = run(rounds, memory, workload, say=lambda line: console.print(line))
    console.print_json(json.dumps(document))


bench_app.command("soak")(soak_command)     # the command lives with the soak (bench/soak.py)
