"""The lab's network: namespaces, links, addresses and routes, made with iproute2.

A thin shell around `ip`: every namespace of lab NAME is called `egl-NAME-ROLE`, so
`teardown` finds everything a lab made — even after a crash that lost the state file —
by that prefix alone. Each namespace's configuration goes to one `ip -n NS -batch -` run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Iterable
from pathlib import Path

from egressd.lab.plan import INTERNET, LabError, LabPlan, Link

PREFIX = "egl-"
NETNS_DIR = Path("/run/netns")
MIN_DELAYED_MS = 0.5  # below this a plain veth is closer to the truth than the delay line's ~1 ms
DELAYED_MTU = 9000  # fewer frames through the userspace delay line


def ns_name(lab: str, role: str) -> str:
    return f"{PREFIX}{lab}-{role}"


def lab_namespaces(lab: str) -> list[str]:
    """Every namespace of lab `lab` that exists now."""
    try:
        names = sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []
    return [name for name in names if name.startswith(f"{PREFIX}{lab}-")]


def ip(*args: str, namespace: str | None = None, batch: Iterable[str] | None = None) -> str:
    command = ["ip"] + (["-n", namespace] if namespace else []) + list(args)
    text = None
    if batch is not None:
        command += ["-batch", "-"]
        text = "\n".join(batch) + "\n"
    result = subprocess.run(command, input=text, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        where = f" in {namespace}" if namespace else ""
        raise LabError(f"ip {' '.join(args)}{where} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def sysctl(namespace: str, settings: dict[str, str]) -> None:
    command = ["ip", "netns", "exec", namespace, "sysctl", "-q", "-w"]
    command += [f"{key}={value}" for key, value in settings.items()]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LabError(f"sysctl in {namespace} failed: {result.stderr.strip()}")


def delayed(link: Link) -> bool:
    return link.delay_ms >= MIN_DELAYED_MS


def tap_names(lab: str, index: int) -> tuple[str, str]:
    """Temporary, globally unique names for a delayed link's TAPs before they move."""
    stem = f"egl{zlib.crc32(lab.encode()) % 10**6}x{index}"[:13]
    return f"{stem}a", f"{stem}b"


def start_delay_line(lab: str, plan: LabPlan, log_path: Path) -> subprocess.Popen[bytes] | None:
    specs = [f"{','.join(tap_names(lab, index))},{link.delay_ms}"
             for index, link in enumerate(plan.links) if delayed(link)]
    if not specs:
        return None
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    process = subprocess.Popen([sys.executable, "-m", "egressd.lab.delayline", *specs],
                               stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    log.close()
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != b"ready":
        process.kill()
        process.wait()
        raise LabError(f"the delay line did not start (see {log_path})")
    return process


def build(lab: str, plan: LabPlan) -> None:
    """Create every namespace and link of the plan, then addresses and routes."""
    for role in plan.namespaces:
        ip("netns", "add", ns_name(lab, role))
    batches: dict[str, list[str]] = {role: ["link set lo up"] for role in plan.namespaces}
    for index, link in enumerate(plan.links):
        a_ns, b_ns = ns_name(lab, link.a_role), ns_name(lab, link.b_role)
        if delayed(link):
            tap_a, tap_b = tap_names(lab, index)
            ip("link", "set", tap_a, "netns", a_ns, "name", link.a_name)
            ip("link", "set", tap_b, "netns", b_ns, "name", link.b_name)
            mtu = DELAYED_MTU
        else:
            ip("link", "add", "name", link.a_name, "netns", a_ns, "type", "veth",
               "peer", "name", link.b_name, "netns", b_ns)
            mtu = 1500
        for role, name, v4, v6 in ((link.a_role, link.a_name, link.a_v4, link.a_v6),
                                   (link.b_role, link.b_name, link.b_v4, link.b_v6)):
            batches[role] += [f"link set {name} mtu {mtu} up",
                              f"addr add {v4}/{link.v4.prefixlen} dev {name}",
                              f"addr add {v6}/{link.v6.prefixlen} dev {name} nodad"]
    for role, namespace in plan.namespaces.items():
        batch = batches[role]
        batch += [f"addr add {net} dev lo" + (" nodad" if net.version == 6 else "")
                  for net in namespace.loopback]
        for route in namespace.routes:
            # (ip infers the family from the prefix; `-6` is not accepted in batch lines)
            if route.local:
                batch.append(f"route add local {route.destination} dev lo")
            else:
                batch.append(f"route add {route.destination} via {route.gateway} dev {route.interface}")
        name = ns_name(lab, role)
        settings = {"net.ipv4.conf.all.rp_filter": "0", "net.ipv4.conf.default.rp_filter": "0",
                    "net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0",
                    "net.ipv4.ip_local_port_range": "10000 65000",
                    "net.ipv4.ping_group_range": "0 2147483647"}
        if role == INTERNET:  # the Internet routes between its edges (an office to a PoP); nothing else does
            settings |= {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"}
        sysctl(name, settings)
        ip(namespace=name, batch=batch)


def pids_in(namespace: str) -> list[int]:
    result = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False)
    return [int(pid) for pid in result.stdout.split() if pid.isdigit()]


def kill_all(pids: Iterable[int], grace: float = 3.0) -> None:
    """SIGTERM, wait up to `grace`, SIGKILL what is left."""
    pids = list(pids)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            _signal(pid, signal.SIGKILL)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours counts as gone
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited == 0
    except ChildProcessError:
        return True


def teardown(lab: str, extra_pids: Iterable[int] = ()) -> list[str]:
    """Stop every process in the lab's namespaces (and `extra_pids`), delete the namespaces.
    Returns what was removed. Safe to call on a half-built or already removed lab."""
    namespaces = lab_namespaces(lab)
    kill_all([pid for name in namespaces for pid in pids_in(name)] + list(extra_pids))
    for name in namespaces:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    return namespaces
