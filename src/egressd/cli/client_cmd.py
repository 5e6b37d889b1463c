"""`egressd client enroll|run|status` (the device agent) and `egressd verify` (R12).

Exit codes: 0 ok (verify: every family left from a dedicated address of the account),
1 refused or mismatch (the reason is printed), 2 usage or local state error, 3 the
control plane or every PoP is unreachable. Nothing here prints the device secret.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import typer

from egressd.cli.runner import SignalWaiter, hold_signals, run, setup_logging

EXIT_MISMATCH = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

client_app = typer.Typer(help="The device agent: enroll, run the local proxy, show status.",
                         no_args_is_help=True)
log = logging.getLogger("egressd.client")

STATE_HELP = "The client's state directory (device.json 0600, status.json)."


def register(app: typer.Typer) -> None:
    app.add_typer(client_app, name="client")
    app.command("verify")(verify)


def _fail(message: str, code: int) -> NoReturn:
    print(f"egressd: {message}", file=sys.stderr)
    raise typer.Exit(code)


def _host_port(text: str, option: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise typer.BadParameter(f"expected HOST:PORT, got {text!r}", param_hint=option)
    return host.strip("[]"), int(port)


def _state_dir(value: Path | None) -> Path:
    from egressd.client.state import DEFAULT_STATE_DIR

    return value or Path(os.environ.get("EGRESSD_CLIENT_DIR", str(DEFAULT_STATE_DIR)))


def _load(state_dir: Path) -> Any:
    from egressd.client.state import ClientStateError, Enrollment

    try:
        return Enrollment.load(state_dir)
    except ClientStateError as error:
        _fail(str(error), EXIT_USAGE)


# --- enroll ----------------------------------------------------------------------------


def _endpoints(pops: list[dict[str, Any]], serve: dict[str, Any] | None,
               overrides: dict[str, tuple[str, int]], device_port: int) -> list[Any]:
    from egressd.client.state import PopEndpoint

    endpoints = []
    for pop in pops:
        code, city = str(pop["code"]), str(pop.get("city", ""))
        if code in overrides:
            host, port = overrides[code]
        elif serve is not None and code in serve.get("pops", {}):
            link = str(serve["pops"][code].get("device_link", ""))
            host, _, port_text = link.removeprefix("https://").rpartition(":")
            if not host or not port_text.isdigit():
                _fail(f"serve.json has no device link for PoP {code} (an older egressd serve?)",
                      EXIT_USAGE)
            host, port = host.strip("[]"), int(port_text)
        elif pop.get("shared_ipv4"):
            host, port = str(pop["shared_ipv4"]), device_port
        else:
            _fail(f"PoP {code} has no address to reach it at: give --pop {code}=HOST:PORT",
                  EXIT_USAGE)
        endpoints.append(PopEndpoint(code=code, city=city, host=host, port=port))
    return endpoints


@client_app.command("enroll")
def enroll(
    control: str = typer.Option(..., "--control", help="Control plane URL (http(s)://HOST:PORT)."),
    token: str = typer.Option(..., "--token", envvar="EGRESSD_ENROLL_TOKEN", help="The enrollment token an administrator made for you (single use)."),
    device_name: str | None = typer.Option(None, "--device-name", help="Names the device: its id becomes ACCOUNT-USER-NAME."),
    state_dir: Path | None = typer.Option(None, "--state-dir", help=STATE_HELP),
    serve_json: Path | None = typer.Option(None, "--serve-json", help="An `egressd serve` state file: take the PoPs' device links, the CA and the echo from it."),
    pop: list[str] = typer.Option([], "--pop", help="CODE=HOST:PORT of a PoP's device link. Repeatable; overrides the default (its shared IPv4 and --device-port)."),
    device_port: int = typer.Option(443, "--device-port", min=1, max=65535, help="Port of the PoPs' device links when reached at their shared IPv4."),
    ca: Path | None = typer.Option(None, "--ca", exists=True, dir_okay=False, help="CA (PEM) that signs the PoPs' certificates (default: the system's CAs)."),
    echo4: str | None = typer.Option(None, "--echo4", help="verify's IPv4 echo (http://HOST:PORT/trace)."),
    echo6: str | None = typer.Option(None, "--echo6", help="verify's IPv6 echo (http://[ADDR]:PORT/trace)."),
) -> None:
    """Exchange an enrollment token for this device's credential and the list of PoPs.

    The credential is kept in STATE_DIR/device.json (mode 0600) and never printed."""
    from egressd.client.account import ControlError
    from egressd.client.account import enroll as post_enroll
    from egressd.client.state import Enrollment

    directory = _state_dir(state_dir)
    overrides = {}
    for item in pop:
        code, sep, address = item.partition("=")
        if not sep or not code:
            raise typer.BadParameter(f"expected CODE=HOST:PORT, got {item!r}", param_hint="--pop")
        overrides[code] = _host_port(address, "--pop")
    serve: dict[str, Any] | None = None
    if serve_json is not None:
        try:
            serve = json.loads(serve_json.read_text())
        except (OSError, ValueError) as error:
            _fail(f"cannot read {serve_json}: {error}", EXIT_USAGE)
    try:
        answer = post_enroll(control, token, device_name)
    except ControlError as error:
        _fail(str(error), EXIT_MISMATCH if error.refused else EXIT_UNREACHABLE)
    endpoints = _endpoints(list(answer.get("pops", [])), serve, overrides, device_port)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_source = ca or (Path(serve["ca_cert"]) if serve and serve.get("ca_cert") else None)
    ca_path: str | None = None
    if ca_source is not None:
        shutil.copyfile(ca_source, directory / "ca.crt")
        ca_path = str((directory / "ca.crt").resolve())
    if serve is not None:
        echo4 = echo4 or serve.get("echo", {}).get("trace")
    enrollment = Enrollment(control=control.rstrip("/"), device_id=str(answer["device_id"]),
                            secret=str(answer["secret"]), account_id=str(answer["account_id"]),
                            user=str(answer["user"]), pops=tuple(endpoints), ca=ca_path,
                            echo4=echo4, echo6=echo6)
    path = enrollment.save(directory)
    print(f"enrolled device {enrollment.device_id} of account {enrollment.account_id} "
          f"(user {enrollment.user}); credential in {path} (0600)")
    for endpoint in endpoints:
        print(f"  PoP {endpoint.code:<5} {endpoint.city:<16} {endpoint.address}")


# --- run -------------------------------------------------------------------------------


@client_app.command("run")
def run_client(
    state_dir: Path | None = typer.Option(None, "--state-dir", help=STATE_HELP),
    listen: str = typer.Option("127.0.0.1:40000", "--listen", help="HOST:PORT of the local SOCKS5 + HTTP proxy (and the PAC file at /proxy.pac)."),
    remeasure: float = typer.Option(30.0, "--remeasure", min=1.0, help="Seconds between RTT measurements of every PoP."),
    log_level: str = typer.Option("warning", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Attach to the fastest PoP and serve the local proxy; every flow rides one TLS
    connection to it. A dead PoP is left within 3 s. Ctrl-C stops it."""
    from egressd.client.attach import Attachment, NoPopReachable, client_tls_context
    from egressd.client.local_proxy import LocalProxy
    from egressd.client.state import write_status

    setup_logging(log_level)
    directory = _state_dir(state_dir)
    enrollment = _load(directory)
    host, port = _host_port(listen, "--listen")
    hold_signals()

    async def main() -> None:
        attachment = Attachment(enrollment, client_tls_context(enrollment.ca), remeasure=remeasure)
        proxy = LocalProxy(attachment, host, port)

        def status() -> dict[str, Any]:
            return {"pid": os.getpid(), "updated_at": time.time(), "device_id": enrollment.device_id,
                    "account_id": enrollment.account_id, "user": enrollment.user,
                    "listen": f"{proxy.host}:{proxy.port}", "pac": proxy.pac_url,
                    **attachment.status()}

        proxy.status_page = status
        try:
            connected = await attachment.start()
            await proxy.start()
        except NoPopReachable as error:
            await attachment.close()
            _fail(str(error), EXIT_UNREACHABLE)
        except OSError as error:
            await attachment.close()
            _fail(f"cannot listen on {listen}: {error.strerror or error}", EXIT_USAGE)
        signals = SignalWaiter()
        # Only now: a status written during start() would name the proxy before it listens.
        attachment.on_change = lambda: write_status(directory, status())
        write_status(directory, status())
        print(f"egressd client: attached to {connected} ({attachment.pops[connected].city}, "
              f"RTT {attachment.rtt_ms.get(connected)} ms); proxy {proxy.host}:{proxy.port} "
              f"(SOCKS5 + HTTP), PAC {proxy.pac_url}", flush=True)

        async def keep_status() -> None:
            while True:
                await asyncio.sleep(1.0)
                write_status(directory, status())

        writer = asyncio.create_task(keep_status())
        try:
            reason = await signals.wait()
            log.info("%s: stopping", reason)
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            await proxy.close()
            await attachment.close()
            (directory / "status.json").unlink(missing_ok=True)

    run(main)


# --- status ----------------------------------------------------------------------------


@client_app.command("status")
def status(
    state_dir: Path | None = typer.Option(None, "--state-dir", help=STATE_HELP),
    as_json: bool = typer.Option(False, "--json", help="One JSON object."),
) -> None:
    """Account, connected PoP and its RTT, the account's dedicated locations and the PoP
    the current flows leave from. Exit 1 when the client is not running."""
    from egressd.client.account import ControlError, device_view
    from egressd.client.state import read_status

    directory = _state_dir(state_dir)
    enrollment = _load(directory)
    running = _live(read_status(directory))
    account: dict[str, Any] | None = None
    control_error = None
    try:
        account = device_view(enrollment)
    except ControlError as error:
        control_error = str(error)
    report = {"device_id": enrollment.device_id, "account_id": enrollment.account_id,
              "running": running is not None, "client": running,
              "locations": account.get("locations") if account else None,
              "dedicated": account.get("dedicated") if account else None,
              "network": account.get("network") if account else None,
              "control_error": control_error}
    if as_json:
        print(json.dumps(report, indent=2))
        raise typer.Exit(0 if running else EXIT_MISMATCH)
    plan = f" ({account['plan']})" if account else ""
    print(f"account {enrollment.account_id}{plan}, user {enrollment.user}, device {enrollment.device_id}")
    if running is None:
        print("client: not running (egressd client run)")
    else:
        code = running.get("connected_pop")
        rtt = (running.get("rtt_ms") or {}).get(code)
        city = (running.get("pops") or {}).get(code, {}).get("city", "")
        print(f"connected PoP: {code} ({city}), RTT {rtt} ms; proxy {running.get('listen')}, "
              f"PAC {running.get('pac')}")
        last = running.get("last_flow") or {}
        if last:
            print(f"current flows leave from: {last.get('egress_pop')} (last flow to "
                  f"{last.get('destination')}: source {last.get('source')})")
    if account is not None:
        print(f"dedicated egress: {account['dedicated']['status']} ({account['dedicated']['detail']}); "
              f"proxy.tcp {'on' if account['network']['proxy_tcp'] else 'off'}, "
              f"proxy.udp {'on' if account['network']['proxy_udp'] else 'off'}")
        for location in account.get("locations", []):
            print(f"  location {location['id']:<6} {location['pop']:<5} {location['city']:<16} "
                  f"{location['ipv4']:<16} {location.get('ipv6') or '-':<22} {location['state']}")
    else:
        print(f"account details unavailable: {control_error}")
    raise typer.Exit(0 if running else EXIT_MISMATCH)


def _live(running: dict[str, Any] | None) -> dict[str, Any] | None:
    """The running client's status from its /status page (fresher than the file)."""
    if running is None:
        return None
    import httpx

    try:
        answer = httpx.get(f"http://{running['listen']}/status", timeout=2.0).json()
    except (httpx.HTTPError, ValueError):
        return running
    return answer if isinstance(answer, dict) else running


# --- verify ----------------------------------------------------------------------------


def verify(
    state_dir: Path | None = typer.Option(None, "--state-dir", help=STATE_HELP),
    pop: str | None = typer.Option(None, "--pop", help="Go straight through this PoP's device link (its code) instead of the running client."),
    proxy: str | None = typer.Option(None, "--proxy", help="HOST:PORT of the client's local proxy (default: the running client's)."),
    echo4: str | None = typer.Option(None, "--echo4", help="The IPv4 echo (http://HOST:PORT/trace); default from enrollment."),
    echo6: str | None = typer.Option(None, "--echo6", help="The IPv6 echo (http://[ADDR]:PORT/trace); default from enrollment."),
    family: str = typer.Option("both", "--family", help="4, 6 or both."),
    control: str | None = typer.Option(None, "--control", help="Control plane URL (default: the one enrolled with)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object."),
) -> None:
    """Fetch the IPv4 and IPv6 echo through the gateway and check each left from the
    account's dedicated addresses: prints connected PoP, egress PoP, source address and
    geolocation per family. Exit 0 when they match, 1 with the reason when not."""
    from egressd.client.account import ControlError, device_view, geofeed
    from egressd.client.state import read_status
    from egressd.client.verify import Observation, judge, summary

    if family not in ("4", "6", "both"):
        raise typer.BadParameter("4, 6 or both", param_hint="--family")
    directory = _state_dir(state_dir)
    enrollment = _load(directory)
    families: list[Any] = [4, 6] if family == "both" else [int(family)]
    urls = {4: echo4 or enrollment.echo4, 6: echo6 or enrollment.echo6}
    if pop is not None and pop not in {p.code for p in enrollment.pops}:
        _fail(f"unknown PoP {pop!r}: enrolled PoPs are "
              f"{', '.join(p.code for p in enrollment.pops)}", EXIT_USAGE)
    local: tuple[str, int] | None = None
    if pop is None:
        if proxy is not None:
            local = _host_port(proxy, "--proxy")
        else:
            running = read_status(directory)
            if running is None:
                _fail("the client is not running (egressd client run), "
                      "or go straight through a PoP with --pop CODE", EXIT_USAGE)
            local = _host_port(str(running["listen"]), "--proxy")
    try:
        account = device_view(enrollment, control)
    except ControlError as error:
        _fail(str(error), EXIT_MISMATCH if error.refused else EXIT_UNREACHABLE)
    geo = geofeed(control or enrollment.control)

    async def observe() -> list[Observation]:
        from egressd.client.attach import Attachment, NoPopReachable, client_tls_context
        from egressd.client.verify import through_device_link, through_local_proxy

        seen: list[Observation] = []
        if local is not None:
            for fam in families:
                url = urls[fam]
                seen.append(Observation(fam, error=f"no IPv{fam} echo is known (give --echo{fam} URL)")
                            if url is None else await through_local_proxy(local, url, fam))
            return seen
        only = [p for p in enrollment.pops if p.code == pop]
        attachment = Attachment(dataclasses.replace(enrollment, pops=tuple(only)),
                                client_tls_context(enrollment.ca))
        try:
            await attachment.start()
        except NoPopReachable as error:
            return [Observation(fam, pop, error=str(error)) for fam in families]
        try:
            for fam in families:
                url = urls[fam]
                seen.append(Observation(fam, pop, error=f"no IPv{fam} echo is known (give --echo{fam} URL)")
                            if url is None else await through_device_link(attachment, url, fam))
        finally:
            await attachment.close()
        return seen

    observations = asyncio.run(observe())
    results = [judge(seen, account, geo) for seen in observations]
    ok = summary(results)
    if as_json:
        print(json.dumps({"ok": ok, "account_id": account.get("account_id"),
                          "device_id": enrollment.device_id, "plan": account.get("plan"),
                          "network": account.get("network"),
                          "via": f"pop {pop}" if pop else f"client {local[0]}:{local[1]}" if local else "",
                          "families": [result.as_json() for result in results]}, indent=2))
    else:
        print(f"account {account.get('account_id')} ({account.get('plan')}), device "
              f"{enrollment.device_id}, via {'PoP ' + pop if pop else 'the client'}")
        for result in results:
            if result.source is None:
                print(f"IPv{result.family}  connected {result.connected_pop or '?'}  no path")
                continue
            print(f"IPv{result.family}  connected {result.connected_pop or '?'}  egress "
                  f"{result.egress_pop or '?'}  source {result.source}  "
                  f"geolocation {result.city or 'unknown'}  {'ok' if result.ok else 'MISMATCH'}")
        for result in results:
            print(("ok: " if result.ok else "") + result.message)
    raise typer.Exit(0 if ok else EXIT_MISMATCH)
