"""The PoP's side of configuration distribution (R14): `ControlWatcher` against a real HTTP
server that implements the wire contract (a Starlette stand-in for the control plane, run
with uvicorn on 127.0.0.1), the disk copy, /health and metrics, and `egressd pop --control`.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import socket
import stat
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from typer.testing import CliRunner

from egressd.cli import app as cli_app
from egressd.decide import HealthView
from egressd.model.deployment import load_deployment
from egressd.pop import control_link
from egressd.pop.control_link import (
    SNAPSHOT_FILE,
    ControlWatcher,
    FirstSnapshotTimeout,
    write_atomically,
)
from egressd.pop.flowlog import FlowLog
from egressd.pop.listeners import Listener, ListenerSpec
from egressd.pop.metrics import PopMetrics
from egressd.pop.resolver import Resolver
from egressd.pop.runtime import NoBackbone, PopOptions, PopRuntime, StateHolder

SEED = (Path(__file__).resolve().parents[2] / "examples" / "seed.toml").read_text(encoding="utf-8")
TOKEN = "pop-token-5ecret-a1b2c3d4e5f6"
POP = "las"
FAST = (0.05, 0.2)  # backoff for tests: the production default is 0.25 s doubling to 5 s


def document() -> dict[str, Any]:
    """The example deployment as the control plane sends it (JSON, date-times as strings)."""

    def plain(item: Any) -> Any:
        if isinstance(item, datetime):
            return item.isoformat()
        if isinstance(item, dict):
            return {key: plain(inner) for key, inner in item.items()}
        if isinstance(item, list):
            return [plain(inner) for inner in item]
        return item

    return json.loads(json.dumps(plain(tomllib.loads(SEED))))  # type: ignore[no-any-return]


def invalid_document() -> dict[str, Any]:
    bad = document()
    bad["accounts"][0]["bogus_key"] = True
    return bad


# ------------------------------------------------------------------------------------------
# The stand-in control plane


@dataclass(frozen=True)
class Poll:
    after: int
    pop: str
    wait: int


class StandIn:
    """`GET /v1/snapshot` exactly as the contract says: 200 as soon as version > after,
    else 204 after `wait` seconds; problem documents for errors."""

    def __init__(self, token: str = TOKEN, *, echo_credentials: bool = False) -> None:
        self.token = token
        self.echo_credentials = echo_credentials  # a careless control plane, for redaction
        self.version = 0
        self.body: dict[str, Any] = {}
        self.polls: list[Poll] = []
        self.parked = 0  # long polls waiting right now
        self.closing = False
        self._changed = asyncio.Event()
        self.app = Starlette(routes=[Route("/v1/snapshot", self.snapshot)])

    def publish(self, version: int, deployment: dict[str, Any]) -> None:
        self.version = version
        self.body = {"version": version, "deployment": deployment}
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def release(self) -> None:
        """End the parked long polls (their connections are being dropped)."""
        self.closing = True
        self._changed.set()

    def polls_after(self, version: int) -> int:
        return sum(1 for poll in self.polls if poll.after == version)

    async def snapshot(self, request: Request) -> Response:
        auth = request.headers.get("authorization", "")
        if auth != f"Bearer {self.token}":
            detail = "unknown PoP token" + (f" (got {auth!r})" if self.echo_credentials else "")
            return problem(401, "Unauthorized", detail)
        try:
            after = int(request.query_params["after"])
            wait = int(request.query_params["wait"])
            pop = request.query_params["pop"]
        except (KeyError, ValueError):
            return problem(400, "Bad request", "after, wait and pop are required")
        if not 0 < wait <= 30:
            return problem(400, "Bad request", "wait must be 1..30")
        self.polls.append(Poll(after, pop, wait))
        self.parked += 1
        try:
            async with asyncio.timeout(wait):
                while self.version <= after and not self.closing:
                    await self._changed.wait()
        except TimeoutError:
            return Response(status_code=204)
        finally:
            self.parked -= 1
        return JSONResponse(self.body)


def problem(status: int, title: str, detail: str) -> Response:
    return JSONResponse({"type": "about:blank", "title": title, "status": status, "detail": detail},
                        status_code=status, media_type="application/problem+json")


class Served:
    """The stand-in on 127.0.0.1 (a fixed port once chosen, so it can come back)."""

    def __init__(self, stand_in: StandIn) -> None:
        self.stand_in = stand_in
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.stand_in.app, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        await until(lambda: self._server is not None and self._server.started, "uvicorn to start")

    async def stop(self) -> None:
        """Down hard: stop listening and drop the connections (parked long polls too)."""
        assert self._server is not None and self._task is not None
        self._server.should_exit = True
        for connection in list(self._server.server_state.connections):
            connection.transport.close()
        self.stand_in.release()
        async with asyncio.timeout(5):
            await self._task
        self._server = self._task = None
        self.stand_in.closing = False
        self.stand_in._changed = asyncio.Event()


async def until(predicate: Callable[[], object], what: str, within: float = 5.0) -> float:
    """Wait (bounded) until `predicate()` is true; returns the seconds it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not predicate():
        if loop.time() - started > within:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.005)
    return loop.time() - started


@pytest.fixture
async def control() -> AsyncIterator[Served]:
    served = Served(StandIn())
    await served.start()
    try:
        yield served
    finally:
        if served._server is not None:
            await served.stop()


def watcher_for(url: str, state_dir: Path, **options: Any) -> ControlWatcher:
    options.setdefault("wait", 20)  # long: a wake-up must come from the new version, not a 204
    options.setdefault("backoff", FAST)
    options.setdefault("metrics", PopMetrics())
    return ControlWatcher(url, POP, options.pop("token", TOKEN), state_dir, **options)


def holder_for(version: int = 1) -> StateHolder:
    return StateHolder(load_deployment(SEED, version=version), HealthView(up=frozenset({POP})))


def gauge(watcher: ControlWatcher, name: str) -> float | None:
    assert watcher.metrics is not None
    return watcher.metrics.registry.get_sample_value(name, {"pop": POP})


# ------------------------------------------------------------------------------------------
# Fetch, apply, confirm, wake up


async def test_first_fetch_applies_confirms_and_keeps_a_private_copy(control: Served, tmp_path: Path) -> None:
    stand_in = control.stand_in
    stand_in.publish(1, document())
    async with watcher_for(control.url, tmp_path / "state") as watcher:
        snapshot = await watcher.first_snapshot(max_wait=5)
        assert snapshot.version == 1 and POP in snapshot.data_centers
        assert stand_in.polls[0] == Poll(after=0, pop=POP, wait=20)
        holder = StateHolder(snapshot, HealthView(up=frozenset({POP})))
        watcher.start(holder)
        # The next poll confirms version 1 (after=1) and parks.
        await until(lambda: stand_in.polls_after(1) == 1 and stand_in.parked == 1, "the confirming poll")
        copy = tmp_path / "state" / SNAPSHOT_FILE
        assert copy.exists()
        assert json.loads(copy.read_bytes()) == stand_in.body
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600
        assert [path.name for path in copy.parent.iterdir()] == [SNAPSHOT_FILE]
        status = holder.config
        assert status is watcher.status
        assert (status.version, status.source, status.connected) == (1, "control", True)
        assert status.health()["control_plane"] == "reachable"
        assert status.last_error is None
        assert gauge(watcher, "egressd_config_version") == 1
        assert gauge(watcher, "egressd_control_plane_reachable") == 1


async def test_a_new_version_wakes_the_long_poll_at_once(control: Served, tmp_path: Path) -> None:
    stand_in = control.stand_in
    stand_in.publish(1, document())
    holder = holder_for(1)
    async with watcher_for(control.url, tmp_path) as watcher:
        watcher.start(holder)
        await until(lambda: holder.config.version == 1 and stand_in.parked == 1, "a parked poll after 1")
        for version in (2, 3):
            stand_in.publish(version, document())
            took = await until(lambda v=version: holder.snapshot.version == v, f"version {version}", within=2)  # type: ignore[misc]
            assert took < 1.0, f"version {version} took {took:.3f} s (R14 allows 2 s in all)"
            # Confirmed: the next poll carries after=<version>.
            await until(lambda v=version: stand_in.polls_after(v) == 1, f"after={version}")  # type: ignore[misc]
        assert [poll.after for poll in stand_in.polls] == [0, 1, 2, 3]
        assert json.loads((tmp_path / SNAPSHOT_FILE).read_bytes())["version"] == 3
        assert gauge(watcher, "egressd_config_version") == 3


async def test_an_invalid_snapshot_is_not_applied_nor_confirmed(
    control: Served, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="egressd.pop.control")
    stand_in = control.stand_in
    stand_in.publish(1, document())
    holder = holder_for(1)
    async with watcher_for(control.url, tmp_path) as watcher:
        watcher.start(holder)
        await until(lambda: stand_in.parked == 1 and holder.config.source == "control", "version 1")
        stand_in.publish(2, invalid_document())
        await until(lambda: watcher.status.rejected_version == 2, "the rejection")
        polls_then = len(stand_in.polls)
        await asyncio.sleep(0.5)
        # Kept polling with the old version, backing off (no busy loop), never after=2.
        assert holder.snapshot.version == 1
        assert stand_in.polls_after(2) == 0
        assert 1 <= len(stand_in.polls) - polls_then <= 6
        assert json.loads((tmp_path / SNAPSHOT_FILE).read_bytes())["version"] == 1
        health = holder.config.health()
        assert health["version"] == 1 and health["rejected_version"] == 2
        assert "snapshot 2 is invalid" in health["last_error"]
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, errors  # once, not once per poll
        assert "snapshot 2" in errors[0] and "unknown key 'bogus_key'" in errors[0]
        assert "keeping snapshot 1" in errors[0]
        assert gauge(watcher, "egressd_config_rejected_total") == 1
        # A fixed snapshot is picked up (within the backoff) and clears the error.
        stand_in.publish(3, document())
        await until(lambda: holder.snapshot.version == 3, "version 3", within=2)
        await until(lambda: stand_in.polls_after(3) == 1, "after=3")
        assert holder.config.rejected_version is None and holder.config.last_error is None


async def test_an_unreachable_control_plane_leaves_the_pop_serving(control: Served, tmp_path: Path) -> None:
    stand_in = control.stand_in
    stand_in.publish(1, document())
    holder = holder_for(1)
    async with watcher_for(control.url, tmp_path) as watcher:
        watcher.start(holder)
        await until(lambda: stand_in.parked == 1 and holder.config.version == 1, "version 1")
        before = time.time()
        await control.stop()
        await until(lambda: not watcher.status.connected, "the watcher to notice")
        await asyncio.sleep(0.3)  # several failed retries
        assert holder.snapshot.version == 1  # still serving
        status = holder.config
        assert status.unreachable_since is not None and status.unreachable_since >= before - 1
        assert status.health()["control_plane"].startswith("unreachable since ")
        assert status.last_error is not None and status.last_error.startswith("unreachable")
        assert gauge(watcher, "egressd_control_plane_reachable") == 0
        # Back up, with a newer version: picked up within the (test) backoff.
        stand_in.publish(2, document())
        await control.start()
        await until(lambda: holder.snapshot.version == 2, "version 2 after the outage")
        assert status.connected and status.unreachable_since is None and status.last_error is None
        assert gauge(watcher, "egressd_control_plane_reachable") == 1


async def test_a_restarted_pop_serves_its_disk_copy_with_the_control_plane_down(
    control: Served, tmp_path: Path,
) -> None:
    stand_in = control.stand_in
    stand_in.publish(4, document())
    async with watcher_for(control.url, tmp_path) as first:
        first.start(holder_for(1))
        await until(lambda: stand_in.polls_after(4) == 1, "version 4 confirmed")
    await control.stop()
    # A new PoP process: the control plane is down, the copy is served at once.
    async with watcher_for(control.url, tmp_path) as watcher:
        started = time.monotonic()
        snapshot = await watcher.first_snapshot(max_wait=10)
        assert time.monotonic() - started < 1.0
        assert snapshot.version == 4
        assert (watcher.status.source, watcher.status.version) == ("disk", 4)
        holder = StateHolder(snapshot, HealthView(up=frozenset({POP})))
        watcher.start(holder)
        await until(lambda: watcher.status.unreachable_since is not None, "the failed poll")
        health = holder.config.health()
        assert health["source"] == "disk" and health["version"] == 4
        assert health["control_plane"].startswith("unreachable since ")
        # The control plane comes back with the same version: nothing to apply, now reachable.
        await control.start()
        await until(lambda: watcher.status.connected, "reachable again")
        assert stand_in.polls[-1].after == 4
        assert holder.config.source == "disk"


async def test_start_alone_serves_the_disk_copy_then_polls(control: Served, tmp_path: Path) -> None:
    stand_in = control.stand_in
    stand_in.publish(5, document())
    async with watcher_for(control.url, tmp_path) as first:
        first.start(holder_for(1))
        await until(lambda: stand_in.polls_after(5) == 1, "version 5 confirmed")
    holder = holder_for(1)  # e.g. built from a file
    async with watcher_for(control.url, tmp_path) as watcher:
        watcher.start(holder)
        await until(lambda: holder.snapshot.version == 5, "the disk copy in the holder")
        await until(lambda: stand_in.polls_after(5) == 2, "a poll confirming 5")
        assert holder.config.source == "disk"


async def test_no_copy_and_no_control_plane_waits_for_the_first_snapshot(tmp_path: Path) -> None:
    served = Served(StandIn())
    await served.start()
    await served.stop()  # the port is known, nothing listens
    async with watcher_for(served.url, tmp_path) as watcher:
        first = asyncio.ensure_future(watcher.first_snapshot(max_wait=10))
        await until(lambda: watcher.status.unreachable_since is not None, "a failed poll")
        assert not first.done()
        served.stand_in.publish(1, document())
        await served.start()
        snapshot = await asyncio.wait_for(first, 5)
        assert snapshot.version == 1 and watcher.status.source == "control"
        holder = StateHolder(snapshot, HealthView(up=frozenset({POP})))
        watcher.start(holder)
        await until(lambda: (tmp_path / SNAPSHOT_FILE).exists(), "the copy, written once a holder serves it")
    await served.stop()
    async with watcher_for(served.url, tmp_path / "empty") as watcher:
        with pytest.raises(FirstSnapshotTimeout, match=r"no snapshot from .* within 0\.3 s"):
            await watcher.first_snapshot(max_wait=0.3)


async def test_an_unusable_disk_copy_is_ignored(control: Served, tmp_path: Path) -> None:
    (tmp_path / SNAPSHOT_FILE).write_text('{"version": 3, "deployment": {"bogus": 1}}')
    (tmp_path / f".{SNAPSHOT_FILE}.leftover.tmp").write_text("half written")
    control.stand_in.publish(7, document())
    async with watcher_for(control.url, tmp_path) as watcher:
        snapshot = await watcher.first_snapshot(max_wait=5)
        assert snapshot.version == 7 and watcher.status.source == "control"
        assert not (tmp_path / f".{SNAPSHOT_FILE}.leftover.tmp").exists()


# ------------------------------------------------------------------------------------------
# The disk copy is written atomically, privately, after the swap


def test_write_atomically_replaces_whole_files_with_mode_0600(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "dir" / SNAPSHOT_FILE
    old_umask = os.umask(0)
    try:
        write_atomically(target, b"old")
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"old"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    calls: list[str] = []
    real_replace = os.replace

    def failing_fsync(fd: int) -> None:
        calls.append("fsync")
        raise OSError(28, "No space left on device")

    def replace(src: str, dst: Any) -> None:
        calls.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space"):
        write_atomically(target, b"new, but the disk is full")
    assert calls == ["fsync"]  # never renamed over the good copy
    assert target.read_bytes() == b"old"
    assert sorted(path.name for path in target.parent.iterdir()) == [SNAPSHOT_FILE]
    monkeypatch.undo()
    write_atomically(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(path.name for path in target.parent.iterdir()) == [SNAPSHOT_FILE]


async def test_the_swap_happens_before_the_write_and_a_failed_write_is_reported(
    control: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    control.stand_in.publish(1, document())
    holder = holder_for(1)
    seen: list[int] = []

    def failing_write(path: Path, data: bytes, mode: int = 0o600) -> None:
        seen.append(holder.snapshot.version)  # the holder already serves it
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(control_link, "write_atomically", failing_write)
    async with watcher_for(control.url, tmp_path) as watcher:
        watcher.start(holder)
        await until(lambda: seen, "the write")
        await until(lambda: watcher.status.last_error, "the reported failure")
        assert seen == [1] and holder.config.version == 1 and holder.config.source == "control"
        assert "cannot keep the last good copy" in str(watcher.status.last_error)


# ------------------------------------------------------------------------------------------
# Errors are logged clearly, without the token


@pytest.mark.parametrize("echo", [False, True])
async def test_a_bad_token_is_logged_once_and_never_the_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, echo: bool,
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore included
    served = Served(StandIn(echo_credentials=echo))
    await served.start()
    wrong = "wrong-token-zyxwvu987654"
    try:
        async with watcher_for(served.url, tmp_path, token=wrong) as watcher:
            with pytest.raises(FirstSnapshotTimeout) as excinfo:
                await watcher.first_snapshot(max_wait=0.8)
            assert len(served.stand_in.polls) == 0  # refused before the long poll
            assert "401" in str(excinfo.value)
            status = watcher.status
            assert status.last_error is not None
            assert status.last_error.startswith("answered 401 Unauthorized: unknown PoP token")
            assert status.health()["control_plane"].startswith("unreachable since ")
    finally:
        await served.stop()
    text = caplog.text + str(excinfo.value) + json.dumps(status.health())
    assert wrong not in text and TOKEN not in text
    failures = [r for r in caplog.records if r.name == "egressd.pop.control" and r.levelno >= logging.ERROR]
    assert len(failures) == 1, [r.getMessage() for r in failures]
    assert "401 Unauthorized" in failures[0].getMessage()
    if echo:
        assert "[token]" in caplog.text


# ------------------------------------------------------------------------------------------
# /health of a running PoP


async def test_pop_health_reports_the_configuration(control: Served, tmp_path: Path) -> None:
    control.stand_in.publish(1, document())
    holder = holder_for(1)
    metrics = PopMetrics()
    runtime = PopRuntime(POP, holder, NoBackbone(), Resolver(), PopOptions(), FlowLog(io.StringIO()),
                         metrics)
    listener = Listener(runtime, ListenerSpec("127.0.0.1", 0))
    await listener.start()
    host, port = listener.address

    async def health() -> dict[str, Any]:
        async with httpx.AsyncClient(trust_env=False) as client:
            response = await client.get(f"http://{host}:{port}/health", timeout=5)
        assert response.status_code == 200
        return response.json()  # type: ignore[no-any-return]

    try:
        config = (await health())["config"]
        assert (config["version"], config["source"]) == (1, "file")
        assert "control_plane" not in config and "last_error" not in config
        async with watcher_for(control.url, tmp_path, metrics=metrics) as watcher:
            control.stand_in.publish(2, document())
            watcher.start(holder)
            await until(lambda: holder.snapshot.version == 2, "version 2")
            body = await health()
            assert body["snapshot_version"] == 2
            config = body["config"]
            assert (config["version"], config["source"], config["control_plane"]) == (2, "control", "reachable")
            assert config["last_error"] is None
            await control.stop()
            await until(lambda: not watcher.status.connected, "unreachable")
            config = (await health())["config"]
            assert config["version"] == 2
            assert config["control_plane"].startswith("unreachable since ")
            async with httpx.AsyncClient(trust_env=False) as client:
                exposition = (await client.get(f"http://{host}:{port}/metrics", timeout=5)).text
            assert 'egressd_config_version{pop="las"} 2.0' in exposition
            assert 'egressd_control_plane_reachable{pop="las"} 0.0' in exposition
    finally:
        await listener.close()
        runtime.pipes.close()


# ------------------------------------------------------------------------------------------
# `egressd pop --control`


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {}, "exactly one of -d/--deployment FILE"),
        (["-d", "x.toml", "--control", "http://127.0.0.1:1"], {}, "exactly one of"),
        (["--control", "http://127.0.0.1:1"], {"EGRESSD_POP_TOKEN": TOKEN}, "needs --state-dir"),
        (["--control", "http://127.0.0.1:1", "--state-dir", "{tmp}"], {}, "needs the PoP's token"),
        (["--control", "ftp://x", "--state-dir", "{tmp}"], {"EGRESSD_POP_TOKEN": TOKEN}, "expects http(s)://"),
        (["--control", "http://u:p@h:1", "--state-dir", "{tmp}"], {"EGRESSD_POP_TOKEN": TOKEN}, "without credentials"),
        (["-d", "{seed}", "--state-dir", "{tmp}"], {}, "--state-dir only apply with --control"),
    ],
)
def test_pop_options_are_checked(tmp_path: Path, args: list[str], env: dict[str, str], message: str) -> None:
    seed = tmp_path / "seed.toml"
    seed.write_text(SEED)
    args = [arg.format(tmp=tmp_path / "state", seed=seed) for arg in args]
    env = {"EGRESSD_POP_TOKEN": "", **env}
    result = CliRunner().invoke(cli_app, ["pop", "--pop", POP, *args], env=env)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert TOKEN not in result.output


def test_pop_help_explains_control() -> None:
    result = CliRunner().invoke(cli_app, ["pop", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--control", "--control-token-file", "--state-dir", "--first-snapshot-wait"):
        assert option in result.output
    assert "EGRESSD_POP_TOKEN" in result.output


async def test_egressd_pop_runs_from_the_control_plane(control: Served, tmp_path: Path) -> None:
    """The real command: first snapshot, a new version within moments, SIGTERM."""
    stand_in = control.stand_in
    stand_in.publish(1, document())
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if not key.lower().endswith("_proxy")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    stderr = tmp_path / "stderr"
    with stderr.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from egressd.cli import main; main()",
            "pop", "--pop", POP, "--control", control.url, "--control-token-file", str(token_file),
            "--state-dir", str(tmp_path / "state"), "--listen", f"127.0.0.1:{port}", "--flow-log", "off",
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=sink,
        )
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=2) as client:

            async def config() -> dict[str, Any]:
                for _ in range(200):
                    try:
                        return (await client.get(f"http://127.0.0.1:{port}/health")).json()["config"]  # type: ignore[no-any-return]
                    except httpx.TransportError:
                        assert process.returncode is None, stderr.read_text()
                        await asyncio.sleep(0.05)
                raise AssertionError(f"the PoP did not come up:\n{stderr.read_text()}")

            first = await config()
            assert (first["version"], first["source"]) == (1, "control")
            await until(lambda: stand_in.parked == 1 and stand_in.polls_after(1) == 1, "the PoP's poll")
            stand_in.publish(2, document())
            latest: dict[str, Any] = {}
            for _ in range(100):
                latest = await config()
                if latest["version"] == 2:
                    break
                await asyncio.sleep(0.02)
            assert latest["version"] == 2, latest
        assert (tmp_path / "state" / SNAPSHOT_FILE).exists()
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            code = await process.wait()
    log = stderr.read_text()
    assert code == 0, log
    assert "applied snapshot 2 from the control plane" in log
    assert TOKEN not in log
