"""`egressd serve`: the all-in-one demo (three PoPs, echo origin, two accounts), no root."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from egressd.cli.runner import SignalWaiter, hold_signals, run, settle_heap, setup_logging


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    state_dir: Path = typer.Option(Path(".egressd"), "--state-dir", help="Where secrets, certificates, serve.json and the flow log live."),
    port_base: int = typer.Option(18080, "--port-base", help="Echo on BASE, PoP las on BASE+10/+11/+12, lax +20/+21/+22, jfk +30/+31/+32 (plain/TLS/device link). 0: ephemeral ports."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address the PoP listeners bind."),
    udp: bool = typer.Option(True, "--udp/--no-udp", help="acme's proxy.udp setting (UDP and HTTP/3 leave from dedicated IPs)."),
    grace: float = typer.Option(5.0, "--grace", help="Seconds to let flows finish on SIGTERM/Ctrl-C."),
    log_level: str = typer.Option("warning", "--log-level", help="debug, info, warning or error."),
    json_only: bool = typer.Option(False, "--json", help="Print serve.json (secrets masked; they are in the 0600 files) on one line instead of the guide."),
) -> None:
    """Run the gateway on loopback: PoPs las, lax and jfk, an echo origin and a demo enterprise
    account (dedicated egress in Los Angeles and New York). Prints curl lines to try it and
    writes the same, machine-readable, to STATE_DIR/serve.json. Ctrl-C stops it."""
    from egressd.serve import ServeSettings, ServeStack, redacted, try_it

    setup_logging(log_level)
    hold_signals()
    console = Console(soft_wrap=True, highlight=False)

    async def main() -> None:
        stack = ServeStack(ServeSettings(state_dir=state_dir, host=host, port_base=port_base, acme_proxy_udp=udp))
        try:
            info = await stack.start()
        except OSError as exc:
            console.print(f"[red]egressd serve: cannot start: {exc}[/red] (is another 'egressd serve' running? try --port-base)")
            raise typer.Exit(1) from exc
        signals = SignalWaiter()  # before the ready line: a SIGTERM right after it is handled
        settle_heap()
        if json_only:
            print(json.dumps(redacted(info)), flush=True)  # secrets: serve.json, curlrc files
        else:
            console.print(f"[bold]egressd serve[/bold] is running: PoPs {', '.join(info['pops'])}, echo origin {info['echo']['http']}")
            console.print(f"State: {state_dir}/serve.json (credentials, ports), CA: {info['ca_cert']}\n")
            for line in try_it(info):
                console.print(f"[dim]{line}[/dim]" if line.startswith("#") else line, markup=not line.startswith("curl"))
            console.print("\nCtrl-C stops it.")
        reason = await signals.wait()
        if not json_only:
            console.print(f"{reason}: draining (up to {grace:g} s)...")
        await stack.drain(grace)

    run(main)
