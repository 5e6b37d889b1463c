"""`egressd lab`: the multi-city lab in network namespaces (root)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer

from egressd.lab.plan import LabError

DEFAULT_TOPOLOGY = Path(__file__).resolve().parents[1] / "data" / "lab-seed.toml"

lab = typer.Typer(
    name="lab",
    no_args_is_help=True,
    help=(
        "A multi-city lab in network namespaces (needs root and iproute2): one namespace per PoP, "
        "per device site, per private site and one for the Internet side; backbone links delayed "
        "by the cities' great-circle distance; the real egressd programs inside (control plane, "
        "PoPs, a tunnel connector), echo origins and a lab DNS server. "
        "`egressd lab up && egressd lab run seed && egressd lab down`; see docs/lab.md."
    ),
)

NAME = typer.Option("seed", "--name", help="Lab name: its namespaces are egl-NAME-ROLE (1-12 lowercase letters/digits).")


def _fail(error: Exception) -> typer.Exit:
    typer.echo(f"egressd lab: {error}", err=True)
    return typer.Exit(2)


def _check_name(name: str) -> None:
    if not re.fullmatch(r"[a-z0-9]{1,12}", name):
        raise LabError(f"lab name {name!r}: 1-12 lowercase letters or digits")


@lab.command("up")
def up_command(
    topology: Path = typer.Option(DEFAULT_TOPOLOGY, "--topology", "-t", dir_okay=False,
                                  help="Topology file: a deployment file plus [lab] tables "
                                       "(default: the seed's, also in examples/lab-seed.toml)."),
    name: str = NAME,
) -> None:
    """Build the lab and start everything in it. On failure or Ctrl-C, nothing is left behind."""
    from egressd.lab import runner

    try:
        _check_name(name)
        lab_ = runner.up(name, topology)
    except (LabError, OSError) as error:
        raise _fail(error) from None
    except KeyboardInterrupt:
        typer.echo("egressd lab: interrupted; everything it had made is removed", err=True)
        raise typer.Exit(130) from None
    plan = lab_.plan
    typer.echo(f"lab {name} is up: PoPs {', '.join(plan.snapshot.data_centers)}; state in {lab_.directory}")
    typer.echo(f"  {len(plan.namespaces)} namespaces egl-{name}-*, {len(plan.links)} links")
    for link in plan.links:
        if link.delay_ms:
            typer.echo(f"  {link.a_role:>8} — {link.b_role:<8} {link.delay_ms:5.1f} ms one way")
    typer.echo(f"try: egressd lab run seed --name {name}")


@lab.command("status")
def status_command(name: str = NAME,
                   as_json: bool = typer.Option(False, "--json", help="Machine-readable.")) -> None:
    """Namespaces, processes, PoP health and backbone RTTs of a running lab (exit 1 if unhealthy)."""
    from egressd.lab import runner

    try:
        runner.require_root()
        report = runner.status(name)
    except (LabError, OSError) as error:
        raise _fail(error) from None
    healthy = all(p["healthy"] for p in report["pops"].values()) and all(
        n["exists"] for n in report["namespaces"].values())
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(f"lab {name}: {'healthy' if healthy else 'NOT healthy'} ({report['directory']})")
        for info in report["namespaces"].values():
            state = "ok" if info["exists"] else "MISSING"
            typer.echo(f"  {info['namespace']:<22} {state:<8} {info['processes']} processes")
        for code, pop in report["pops"].items():
            peers = ", ".join(f"{peer} {'up' if p['up'] else 'DOWN'}"
                              + (f" {p['rtt_ms']:.1f} ms" if p.get("rtt_ms") is not None else "")
                              for peer, p in pop["peers"].items())
            typer.echo(f"  PoP {code} {pop['address']}: {'ok' if pop['healthy'] else 'NOT answering'}; {peers}")
    raise typer.Exit(0 if healthy else 1)


@lab.command("down")
def down_command(name: str = NAME) -> None:
    """Stop every process of the lab, delete its namespaces and state (also of a half-built lab)."""
    from egressd.lab import runner

    try:
        removed = runner.down(name)
    except (LabError, OSError) as error:
        raise _fail(error) from None
    typer.echo(f"lab {name}: removed {len(removed)} namespaces and files" if removed
               else f"lab {name}: nothing to remove")


@lab.command("run")
def run_command(
    scenario: str = typer.Argument(..., help="Scenario: seed (the seed's table; puts back what it changes)."),
    name: str = NAME,
    as_json: bool = typer.Option(False, "--json", help="Rows as JSON lines."),
) -> None:
    """Run a scenario in a lab that is up and print what the origins saw."""
    from egressd.lab import runner
    from egressd.lab.scenarios import run as run_scenario

    try:
        runner.require_root()
        lab_ = runner.load(name)
        with runner.interrupts_as_errors():
            result = run_scenario(scenario, lab_)
    except (LabError, OSError) as error:
        raise _fail(error) from None
    except KeyboardInterrupt:
        typer.echo("egressd lab: interrupted; the lab is as it was before the run", err=True)
        raise typer.Exit(130) from None
    if as_json:
        for row in result.rows:
            typer.echo(json.dumps(row.as_dict()))
    else:
        typer.echo(result.table())
    raise typer.Exit(0 if result.ok else 1)


def register(app: typer.Typer) -> None:
    app.add_typer(lab)
