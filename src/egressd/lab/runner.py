"""`egressd lab up|status|down`: build the planned network, run the real programs in it.

State lives in `/run/egressd-lab/NAME/` (tmpfs: a reboot forgets a lab, as it forgets its
namespaces): the deployment file the PoPs load, the PKI, the geofeed, the DNS zone, every
process's log and `state.json`. Every process of the lab runs inside one of its namespaces
(except the delay line, whose pid is in the state), so `down` — or the clean-up after a
failed or interrupted `up` — stops them all by namespace and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from egressd.control.geofeed import snapshot_geofeed
from egressd.lab import netns
from egressd.lab.plan import INTERNET, LabError, LabPlan, plan_lab
from egressd.pki import ensure_ca, ensure_server_cert

STATE_ROOT = Path(os.environ.get("EGRESSD_LAB_STATE", "/run/egressd-lab"))
ECHO_HTTP_PORT = 80
ECHO_UDP_PORT = 7
READY_WITHIN = 30.0


@dataclass(frozen=True, slots=True)
class Lab:
    """A lab that is up: its name, plan and files."""

    name: str
    plan: LabPlan
    directory: Path

    @property
    def deployment_path(self) -> Path:
        return self.directory / "deployment.toml"

    @property
    def pki(self) -> Path:
        return self.directory / "pki"

    def namespace(self, role: str) -> str:
        return netns.ns_name(self.name, role)

    def flow_log(self, pop: str) -> Path:
        return self.directory / f"flows-{pop}.jsonl"

    @property
    def dns_log(self) -> Path:
        return self.directory / "dns-queries.jsonl"

    @property
    def control_dir(self) -> Path:
        """The control plane's store and its bootstrap admin token (admin.token, 0600)."""
        return self.directory / "control"

    @property
    def pop_token(self) -> Path:
        return self.control_dir / "pop.token"

    def admin_token(self) -> str:
        return (self.control_dir / "admin.token").read_text(encoding="utf-8").strip()

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One call to the lab's control plane as its administrator, from the Internet
        namespace (where the control plane listens)."""
        script = ("import json,sys,urllib.request\n"
                  "m,url,token,body=sys.argv[1:5]\n"
                  "req=urllib.request.Request(url,method=m,data=body.encode() if body else None,"
                  "headers={'Authorization':'Bearer '+token,'Content-Type':'application/json'})\n"
                  "print(urllib.request.urlopen(req,timeout=10).read().decode())")
        result = subprocess.run(self.exec_in(INTERNET, sys.executable, "-c", script, method,
                                             self.plan.control_url + path, self.admin_token(),
                                             json.dumps(body) if body is not None else ""),
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise LabError(f"control plane: {method} {path} failed: {result.stderr.strip()[-300:]}")
        return json.loads(result.stdout) if result.stdout.strip() else None

    def exec_in(self, role: str, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(role), *command]

    def pop_pids(self, pop: str) -> list[int]:
        return netns.pids_in(self.namespace(pop))



def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces): run it with sudo")
    if shutil.which("ip") is None:
        raise LabError("the lab needs iproute2's `ip` (Debian: apt install iproute2)")


def lab_directory(name: str) -> Path:
    return STATE_ROOT / name


def load(name: str) -> Lab:
    directory = lab_directory(name)
    try:
        state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LabError(f"lab {name!r} is not up (no {directory / 'state.json'})") from None
    plan = plan_lab(Path(state["topology"]).read_text(encoding="utf-8"), source=state["topology"])
    return Lab(name, plan, directory)


@contextlib.contextmanager
def interrupts_as_errors() -> Iterator[None]:
    """SIGTERM (and SIGHUP) unwind like Ctrl-C, so the clean-up runs (`up` removes what it
    made, `run` puts back the setting it changed and the PoP it stopped)."""
    def raise_interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)
    previous = {signum: signal.signal(signum, raise_interrupt) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def up(name: str, topology: Path) -> Lab:
    """Build lab `name` from `topology`; on any failure or interrupt, remove what was made."""
    require_root()
    text = topology.read_text(encoding="utf-8")
    plan = plan_lab(text, source=str(topology))
    if netns.lab_namespaces(name) or (lab_directory(name) / "state.json").exists():
        raise LabError(f"lab {name!r} is already up: `egressd lab down --name {name}` first")
    directory = lab_directory(name)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    lab = Lab(name, plan, directory)
    delay_line: subprocess.Popen[bytes] | None = None
    with interrupts_as_errors():
        try:
            (directory / "topology.toml").write_text(text, encoding="utf-8")
            lab.deployment_path.write_text(plan.deployment_text, encoding="utf-8")
            _write_support_files(lab)
            delay_line = netns.start_delay_line(name, plan, directory / "delayline.log")
            _save_state(lab, delay_line.pid if delay_line else None)
            netns.build(name, plan)
            _start_programs(lab)
            _wait_ready(lab)
        except BaseException:
            if delay_line is not None:  # also when interrupted before its pid was saved
                netns.kill_all([delay_line.pid], grace=1.0)
            down(name)
            raise
    return lab


def _save_state(lab: Lab, delay_line_pid: int | None) -> None:
    state = {"name": lab.name, "topology": str(lab.directory / "topology.toml"),
             "delay_line_pid": delay_line_pid, "started": time.time()}
    (lab.directory / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")


def _write_support_files(lab: Lab) -> None:
    plan = lab.plan
    (lab.directory / "geofeed.csv").write_text(snapshot_geofeed(plan.snapshot), encoding="utf-8")
    zone = {"origin": plan.zone, "records": {name: [str(a) for a in addresses]
                                             for name, addresses in plan.zone_records().items()}}
    (lab.directory / "zone.json").write_text(json.dumps(zone, indent=2), encoding="utf-8")
    ca = ensure_ca(lab.pki, f"egressd lab {lab.name} CA")
    for code in plan.snapshot.data_centers:
        address = str(plan.pop_address(code))
        ensure_server_cert(lab.pki, f"pop-{code}", [code, f"{code}.pop.{plan.zone}"], [address], ca,
                           client=True)


def _spawn(lab: Lab, role: str, log_name: str, *command: str) -> None:
    """Start `command` in namespace `role`, detached (it outlives `lab up`), logging to a file."""
    with (lab.directory / log_name).open("ab") as log:
        subprocess.Popen(lab.exec_in(role, *command), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                         start_new_session=True, close_fds=True)


def egressd(*args: str) -> list[str]:
    return [sys.executable, "-m", "egressd", *args]


def _start_programs(lab: Lab) -> None:
    plan = lab.plan
    for origin in plan.origins:
        hosts = [str(origin.ipv4)] + ([str(origin.ipv6)] if origin.ipv6 else [])
        if origin.kind == "dns":
            listen = [arg for host in hosts for arg in ("--listen", host)]
            _spawn(lab, origin.namespace_role, f"{origin.name}.log",
                   sys.executable, "-m", "egressd.lab.dns_server", str(lab.directory / "zone.json"),
                   str(lab.dns_log), *listen)
            continue
        hosts_args = [arg for host in hosts for arg in ("--host", host)]
        _spawn(lab, origin.namespace_role, f"{origin.name}.log", *egressd(
            "echo", *hosts_args, "--http-port", str(ECHO_HTTP_PORT), "--udp-port", str(ECHO_UDP_PORT),
            "--geofeed", str(lab.directory / "geofeed.csv"), "--report-link",
            "--proxy-protocol" if origin.kind == "in-network" else "--no-proxy-protocol"))
    _start_control_plane(lab)
    for code in plan.snapshot.data_centers:
        start_pop(lab, code)
    for site in plan.private_sites:
        if site.kind == "connector":
            start_connector(lab, site.name)


def start_connector(lab: Lab, site_name: str) -> None:
    """The office's `egressd tunnel run`, in its namespace, dialling out to the PoPs."""
    site = next(site for site in lab.plan.private_sites if site.name == site_name)
    assert site.token is not None
    token_file = lab.directory / f"connector-{site.name}.token"
    if not token_file.exists():
        token_file.touch(mode=0o600)
        token_file.write_text(site.token + "\n", encoding="utf-8")
    pops = [arg for code in lab.plan.snapshot.data_centers
            for arg in ("--pop", f"{code}@{lab.plan.pop_address(code)}:{lab.plan.tunnel_port}")]
    _spawn(lab, f"p-{site.name}", f"connector-{site.name}.log", *egressd(
        "tunnel", "run", "--token-file", str(token_file), "--ca", str(lab.pki / "ca.crt"), *pops))


def _start_control_plane(lab: Lab) -> None:
    """`egressd control serve` on the lab's control address, loaded with the deployment; a
    PoP token for the PoPs. The PoPs follow it (R14), as in production."""
    plan = lab.plan
    _spawn(lab, INTERNET, "control.log", *egressd(
        "control", "serve", "--state-dir", str(lab.control_dir), "--listen", f"{plan.control}:{plan.control_port}",
        "-d", str(lab.deployment_path), "--replica", f"lab-{lab.name}"))
    _wait_listening(lab, INTERNET, str(plan.control), plan.control_port, "control.log",
                    time.monotonic() + READY_WITHIN)
    result = subprocess.run([*egressd("control", "token", "--scope", "pop", "--name", "lab PoPs",
                                      "--state-dir", str(lab.control_dir), "-o", str(lab.pop_token))],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LabError(f"cannot make the PoPs' control-plane token: {result.stderr.strip()}")


def start_pop(lab: Lab, code: str) -> None:
    """The real `egressd pop` of data center `code`, in its namespace, following the lab's
    control plane, with a device link for `egressd client`."""
    plan = lab.plan
    address = str(plan.pop_address(code))
    args = ["pop", "--control", plan.control_url, "--control-token-file", str(lab.pop_token),
            "--state-dir", str(lab.directory / f"pop-{code}"), "--pop", code,
            "--listen", f"{address}:{plan.proxy_port}",
            "--device-listen", f"{address}:{plan.device_port}",
            "--tunnel-listen", f"{address}:{plan.tunnel_port}",
            "--https-listen", f"{address}:{plan.https_port}",
            "--cert", str(lab.pki / f"pop-{code}.crt"), "--key", str(lab.pki / f"pop-{code}.key"),
            "--pki", str(lab.pki), "--backbone-port", str(plan.backbone_port),
            "--flow-log", str(lab.flow_log(code))]
    dns_origin = next((o for o in plan.origins if o.kind == "dns"), None)
    if dns_origin is not None:  # the PoP's resolver: for its flows' names and its devices (R4)
        args += ["--dns-upstream", str(dns_origin.ipv4), "--dns-listen", f"{address}:{plan.dns_port}"]
        for link in plan.links:
            if link.b_role == code and link.a_role.startswith("s-"):
                args += ["--dns-allow", str(link.v4), "--dns-allow", str(link.v6)]
    _spawn(lab, code, f"pop-{code}.log", *egressd(*args))


def _listening(lab: Lab, role: str, host: str, port: int) -> bool:
    """Whether something accepts TCP on host:port inside namespace `role`."""
    probe = ("import socket,sys\ns=socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)\n"
             "s.settimeout(0.5)\nsys.exit(s.connect_ex((sys.argv[1], int(sys.argv[2]))))")
    result = subprocess.run(lab.exec_in(role, sys.executable, "-c", probe, host, str(port)),
                            capture_output=True, check=False)
    return result.returncode == 0


def _wait_ready(lab: Lab) -> None:
    plan = lab.plan
    waits: list[tuple[str, str, int, str]] = []
    for origin in plan.origins:
        port = 53 if origin.kind == "dns" else ECHO_HTTP_PORT
        waits.append((origin.namespace_role, str(origin.ipv4), port, f"{origin.name}.log"))
    for code in plan.snapshot.data_centers:
        waits.append((code, str(plan.pop_address(code)), plan.proxy_port, f"pop-{code}.log"))
    deadline = time.monotonic() + READY_WITHIN
    for role, host, port, log_name in waits:
        _wait_listening(lab, role, host, port, log_name, deadline)
    wait_backbone(lab, deadline)
    for site in plan.private_sites:
        if site.kind == "connector" and site.connector is not None:
            wait_connector(lab, site.connector, deadline, log_name=f"connector-{site.name}.log")


def connector_pops(lab: Lab, connector: str) -> list[str]:
    """The PoPs that have `connector` attached now, by their /health."""
    attached = []
    for code in lab.plan.snapshot.data_centers:
        tunnels = (pop_health(lab, code) or {}).get("tunnels", [])
        if any(isinstance(t, dict) and t.get("connector") == connector for t in tunnels):
            attached.append(code)
    return attached


def wait_connector(lab: Lab, connector: str, deadline: float, *, links: int = 2, log_name: str = "") -> None:
    """Until the connector holds its links (two PoPs, or every PoP if fewer)."""
    wanted = min(links, len(lab.plan.snapshot.data_centers))
    while len(connector_pops(lab, connector)) < wanted:
        if time.monotonic() > deadline:
            raise LabError(f"connector {connector} is not attached to {wanted} PoPs after {READY_WITHIN:g} s; "
                           f"its log ends:\n{_tail(lab.directory / log_name)}")
        time.sleep(0.2)


def _wait_listening(lab: Lab, role: str, host: str, port: int, log_name: str, deadline: float) -> None:
    while not _listening(lab, role, host, port):
        if time.monotonic() > deadline:
            tail = _tail(lab.directory / log_name)
            raise LabError(f"{role}: nothing listens on {host}:{port} after {READY_WITHIN:g} s; "
                           f"its log ({lab.directory / log_name}) ends:\n{tail}")
        time.sleep(0.1)


def wait_backbone(lab: Lab, deadline: float) -> None:
    """Every PoP sees every peer up (its /health), so the first flow already has RTTs (R6)."""
    codes = set(lab.plan.snapshot.data_centers)
    for code in codes:
        while True:
            health = pop_health(lab, code)
            peers = health.get("backbone", {}) if health else {}
            up = {peer for peer, info in peers.items() if isinstance(info, dict) and info.get("up")}
            if up >= codes - {code}:
                break
            if time.monotonic() > deadline:
                raise LabError(f"PoP {code} does not see its peers up after {READY_WITHIN:g} s: {peers}")
            time.sleep(0.2)


def pop_health(lab: Lab, code: str) -> dict[str, Any] | None:
    """The PoP's /health document, fetched from inside its namespace."""
    script = ("import json,sys,urllib.request\n"
              "print(urllib.request.urlopen(f'http://{sys.argv[1]}/health', timeout=2).read().decode())")
    address = f"{lab.plan.pop_address(code)}:{lab.plan.proxy_port}"
    result = subprocess.run(lab.exec_in(code, sys.executable, "-c", script, address),
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return None
    try:
        document = json.loads(result.stdout)
    except json.JSONDecodeError:
        return None
    return document if isinstance(document, dict) else None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def down(name: str) -> list[str]:
    """Stop lab `name`'s processes, delete its namespaces and state. What was removed."""
    require_root()
    directory = lab_directory(name)
    extra: list[int] = []
    try:
        state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
        if state.get("delay_line_pid"):
            extra.append(int(state["delay_line_pid"]))
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    removed = netns.teardown(name, extra)
    if directory.exists():
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(str(directory))
    return removed


def status(name: str) -> dict[str, Any]:
    """What exists of lab `name` now: namespaces, processes, PoP health, link delays."""
    lab = load(name)
    namespaces = {}
    for role in lab.plan.namespaces:
        ns = lab.namespace(role)
        namespaces[role] = {"namespace": ns, "exists": ns in netns.lab_namespaces(name),
                            "processes": len(netns.pids_in(ns))}
    pops = {}
    for code in lab.plan.snapshot.data_centers:
        health = pop_health(lab, code)
        peers = (health or {}).get("backbone", {})
        pops[code] = {"healthy": health is not None,
                      "address": f"{lab.plan.pop_address(code)}:{lab.plan.proxy_port}",
                      "peers": {peer: {"up": info.get("up"), "rtt_ms": info.get("rtt_ms")}
                                for peer, info in peers.items() if isinstance(info, dict)}}
    links = [{"a": link.a_role, "b": link.b_role, "one_way_ms": link.delay_ms,
              "kind": "delay line" if netns.delayed(link) else "veth"} for link in lab.plan.links]
    return {"name": name, "directory": str(lab.directory), "namespaces": namespaces, "pops": pops,
            "links": links, "internet": lab.namespace(INTERNET)}
