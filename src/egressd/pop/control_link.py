"""Keeping a PoP's configuration in step with the control plane (R14, DESIGN §4).

The wire contract (the control plane implements exactly this):

    GET {control}/v1/snapshot?after=<version in force, 0 if none>&pop=<code>&wait=<s, <= 30>
    Authorization: Bearer <pop token>

    200 {"version": N, "deployment": {...}}  as soon as the control plane's version N > after
    204 No Content                           after `wait` seconds without a newer version
    4xx/5xx application/problem+json         (RFC 9457; 401/403 for a bad token)

`after` doubles as the PoP's confirmation of the version it runs: after applying N the
watcher polls again at once with after=N. A document is validated off the event loop,
swapped into the `StateHolder` (new flows use it, flows in progress keep theirs), and only
then written to `<state dir>/snapshot.json` (same shape as the 200 body; atomically, mode
0600: it holds the device secret hashes). A PoP restarted while the control plane is down
serves that last good copy at once. An invalid document is logged and neither applied nor
confirmed; an unreachable control plane is retried with backoff while the PoP keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx

from egressd.model.deployment import DeploymentError, load_document
from egressd.model.errors import ValidationIssue
from egressd.model.snapshot import Snapshot
from egressd.pop.config_status import ConfigStatus
from egressd.pop.metrics import PopMetrics
from egressd.pop.runtime import StateHolder

log = logging.getLogger("egressd.pop.control")

SNAPSHOT_FILE: Final = "snapshot.json"
MAX_WAIT: Final = 30
BACKOFF_MIN: Final = 0.25
BACKOFF_MAX: Final = 5.0
_LOG_EVERY: Final = 10.0
#: A request held this long by the control plane is a parked long poll: it is reachable.
PARKED_AFTER: Final = 0.5


class ControlLinkError(Exception):
    """A control-plane answer that cannot be used (the message is safe to log)."""


class FirstSnapshotTimeout(ControlLinkError):
    """No disk copy and no valid snapshot from the control plane within the bound."""


class _Invalid(Exception):
    """The snapshot of `version` failed validation."""

    def __init__(self, version: int, error: DeploymentError) -> None:
        super().__init__(str(error))
        self.version = version
        self.error = error


@dataclass(frozen=True, slots=True)
class _Offer:
    """A new, valid snapshot and the body to keep on disk."""

    snapshot: Snapshot
    body: bytes


class ControlWatcher:
    """Watches the control plane for new snapshots and feeds them to one PoP's StateHolder.

    Typical use (`egressd pop --control`)::

        watcher = ControlWatcher(url, "lax", token, state_dir, metrics=metrics)
        snapshot = await watcher.first_snapshot(max_wait=120)  # disk copy, else the control plane
        holder = StateHolder(snapshot, view)
        watcher.start(holder)  # long-polls until close()
        ...
        await watcher.close()

    `start(holder)` alone also works: it serves the disk copy (if any) at once, then polls.
    """

    def __init__(
        self,
        control_url: str,
        pop: str,
        token: str,
        state_dir: Path | str,
        *,
        wait: int = 25,
        metrics: PopMetrics | None = None,
        verify: ssl.SSLContext | bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
        backoff: tuple[float, float] = (BACKOFF_MIN, BACKOFF_MAX),
    ) -> None:
        url = httpx.URL(control_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"control plane URL must be http(s)://HOST[:PORT], got {control_url!r}")
        # Logged and shown in /health: never with userinfo, query or fragment.
        self.display_url = str(url.copy_with(username=None, password=None, query=None, fragment=None)).rstrip("/")
        self.pop = pop
        self.verify = verify  # the flow shipper talks to the same control plane
        self.path = Path(state_dir) / SNAPSHOT_FILE
        self.wait = int(min(max(wait, 1), MAX_WAIT))  # whole seconds, 1..30
        self.metrics = metrics
        self.status = ConfigStatus(version=0, source="disk", control_url=self.display_url)
        self.holder: StateHolder | None = None
        self._token = token
        self._endpoint = self.display_url + "/v1/snapshot"
        self._backoff = backoff
        self._client = httpx.AsyncClient(
            verify=verify,
            transport=transport,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=httpx.Timeout(connect=5.0, read=self.wait + 10.0, write=10.0, pool=5.0),
            follow_redirects=False,
            trust_env=False,
        )
        self._pending: bytes | None = None  # a body applied before a holder existed
        self._loaded_disk = False
        self._after = 0  # the version from the control plane (or its disk copy) in force
        self._rejected: int | None = None
        self._last_logged: str | None = None
        self._task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------------------------------
    # Life cycle

    async def first_snapshot(self, *, max_wait: float | None = 120.0) -> Snapshot:
        """The snapshot to start serving with: the last good copy on disk if there is one
        (at once, even with the control plane down), else the first valid snapshot from the
        control plane. Logs while it waits; FirstSnapshotTimeout after `max_wait` seconds
        (None: no bound)."""
        snapshot = await self.load_last_good()
        if snapshot is not None:
            return snapshot
        log.info("no last good copy at %s: waiting for the first snapshot from %s",
                 self.path, self.display_url)
        loop = asyncio.get_running_loop()
        started = loop.time()
        next_log = started + _LOG_EVERY
        delay = self._backoff[0]
        try:
            async with asyncio.timeout(max_wait):
                while True:
                    outcome = await self._poll(first=True)
                    if isinstance(outcome, _Offer):
                        self._pending = outcome.body
                        self._applied(outcome.snapshot, "control")
                        return outcome.snapshot
                    if loop.time() >= next_log:
                        next_log = loop.time() + _LOG_EVERY
                        log.info("still waiting for the first snapshot from %s (%.0f s; last error: %s)",
                                 self.display_url, loop.time() - started, self.status.last_error or "none")
                    if outcome:
                        delay = self._backoff[0]
                        continue
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._backoff[1])
        except TimeoutError:
            raise FirstSnapshotTimeout(
                f"no snapshot from {self.display_url} within {max_wait:g} s and no last good copy at "
                f"{self.path} (last error: {self.status.last_error or 'none'})") from None

    def start(self, holder: StateHolder) -> asyncio.Task[None]:
        """Feed `holder` from now on, in a task of the running loop (until close())."""
        if self._task is not None:
            raise RuntimeError("ControlWatcher already started")
        self._task = asyncio.create_task(self.run(holder), name=f"control-watch-{self.pop}")
        return self._task

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._client.aclose()

    async def __aenter__(self) -> ControlWatcher:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def run(self, holder: StateHolder) -> None:
        """Long-poll for ever: apply each new valid snapshot, back off on failures."""
        self.holder = holder
        if not self._loaded_disk and self._after == 0:
            snapshot = await self.load_last_good()
            if snapshot is not None:
                holder.replace(snapshot)
        if self._after == 0:  # the holder's snapshot came from elsewhere (a file)
            self.status.version = holder.snapshot.version
            self.status.source = holder.config.source
            self.status.applied_at = holder.applied_at
        holder.config = self.status
        self._gauge_version()
        if self._pending is not None:
            body, self._pending = self._pending, None
            await self._save(body)
        delay = self._backoff[0]
        while True:
            try:
                outcome = await self._poll()
                if isinstance(outcome, _Offer):
                    holder.replace(outcome.snapshot)  # atomic for new flows: one assignment
                    self._applied(outcome.snapshot, "control")
                    await self._save(outcome.body)
                    outcome = True
            except Exception:  # a bug here must not stop the PoP from being fed
                log.exception("control watch failed unexpectedly; retrying")
                outcome = False
            if outcome:
                delay = self._backoff[0]
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff[1])

    # ---------------------------------------------------------------------------------------
    # The disk copy

    async def load_last_good(self) -> Snapshot | None:
        """Read, validate and adopt the disk copy (None if there is none or it is unusable)."""
        self._loaded_disk = True
        try:
            snapshot = await asyncio.to_thread(self._read_disk)
        except FileNotFoundError:
            return None
        except (OSError, ControlLinkError) as exc:
            log.error("ignoring the last good copy %s: %s", self.path, exc)
            return None
        log.info("serving snapshot %d from the last good copy %s until the control plane %s answers",
                 snapshot.version, self.path, self.display_url)
        self._applied(snapshot, "disk")
        return snapshot

    def _read_disk(self) -> Snapshot:
        self._remove_stale_temporaries()
        try:
            snapshot = self._decode(self.path.read_bytes())
        except _Invalid as exc:
            raise ControlLinkError(f"snapshot {exc.version} is invalid:\n{exc.error}") from exc
        assert snapshot is not None
        return snapshot

    def _remove_stale_temporaries(self) -> None:
        """A crash between writing and renaming leaves a temporary file: drop it."""
        with contextlib.suppress(OSError):
            for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
                stale.unlink()

    async def _save(self, body: bytes) -> None:
        try:
            await asyncio.to_thread(write_atomically, self.path, body)
        except OSError as exc:
            self.status.last_error = f"cannot keep the last good copy at {self.path}: {exc}"
            log.error("%s (the snapshot is applied; a restart without the control plane "
                      "would serve an older copy)", self.status.last_error)

    # ---------------------------------------------------------------------------------------
    # One long poll

    async def _poll(self, *, first: bool = False) -> _Offer | bool:
        """One exchange. An offer (a new valid snapshot), True (nothing new: poll again at
        once) or False (a failure: back off)."""
        after = self._after
        params = {"after": str(after), "pop": self.pop, "wait": str(self.wait)}
        parked: list[asyncio.TimerHandle] = []

        async def trace(event: str, _info: dict[str, Any]) -> None:
            # The request is delivered: if no answer comes soon, the control plane holds it
            # (a parked long poll), so it is reachable: /health must not wait for the 204.
            if event.endswith("send_request_body.complete") and not self.status.connected:
                parked.append(asyncio.get_running_loop().call_later(PARKED_AFTER, self._reachable))

        try:
            response = await self._client.get(self._endpoint, params=params, extensions={"trace": trace})
        except httpx.HTTPError as exc:
            self._failed(f"unreachable: {_describe(exc)}", level=logging.WARNING)
            return False
        finally:
            for handle in parked:
                handle.cancel()
        if response.status_code == 204:
            self._reachable()
            return True
        if response.status_code != 200:
            level = logging.ERROR if response.status_code in (401, 403) or first else logging.WARNING
            self._failed(f"answered {_problem(response)}", level=level)
            return False
        self._reachable()
        try:
            snapshot = await asyncio.to_thread(self._decode, response.content, after, self._rejected)
        except _Invalid as exc:
            return self._reject(exc.version, exc.error)
        except ControlLinkError as exc:
            self.status.last_error = f"unusable answer from {self.display_url}: {self._redact(str(exc))}"
            self._log_once(logging.ERROR, self.status.last_error)
            return False
        if snapshot is None:
            return False  # the same invalid version again: logged already, back off
        return _Offer(snapshot, response.content)

    def _decode(self, body: bytes, after: int | None = None, skip: int | None = None) -> Snapshot | None:
        """The 200 body (or the disk copy) -> a validated snapshot; None for version `skip`
        (known to be invalid). Raises _Invalid or ControlLinkError. Runs in a thread."""
        try:
            raw = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ControlLinkError(f"not JSON: {exc}") from exc
        if not isinstance(raw, Mapping) or not isinstance(raw.get("deployment"), Mapping):
            raise ControlLinkError('expected {"version": N, "deployment": {...}}')
        version = raw.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ControlLinkError(f"version must be a positive integer, got {version!r}")
        if after is not None and version <= after:
            raise ControlLinkError(f"version {version} is not newer than after={after}")
        if version == skip:
            return None
        try:
            snapshot = load_document(raw["deployment"], version=version)
        except DeploymentError as exc:
            raise _Invalid(version, exc) from exc
        if self.pop not in snapshot.data_centers:
            raise _Invalid(version, DeploymentError([ValidationIssue(
                "data_centers", f"no data center {self.pop!r}: this PoP would have no addresses")]))
        return snapshot

    # ---------------------------------------------------------------------------------------
    # Status, metrics and logs

    def _applied(self, snapshot: Snapshot, source: str) -> None:
        previous = self._after
        self._after = snapshot.version
        self.status.version = snapshot.version
        self.status.source = "control" if source == "control" else "disk"
        self.status.applied_at = time.time()
        if self._rejected is not None and snapshot.version > self._rejected:
            self._rejected = None
            self.status.rejected_version = None
        if source == "control":
            self.status.last_error = None
            self._last_logged = None
            log.info("applied snapshot %d from the control plane (was %s): %d data centers, %d accounts",
                     snapshot.version, previous or "none", len(snapshot.data_centers), len(snapshot.accounts))
        self._gauge_version()

    def _reject(self, version: int, exc: DeploymentError) -> bool:
        self._rejected = version
        self.status.rejected_version = version
        issues = "\n".join(f"  {item}" for item in exc.located)
        self.status.last_error = (f"snapshot {version} is invalid ({len(exc.issues)} issue(s), first: "
                                  f"{exc.issues[0] if exc.issues else '?'}); not applied")
        log.error("snapshot %s from %s is invalid, not applied; keeping snapshot %d:\n%s",
                  version, self.display_url, self.status.version, self._redact(issues))
        if self.metrics is not None:
            self.metrics.config_rejected.labels(self.pop).inc()
        return False

    def _reachable(self) -> None:
        if not self.status.connected:
            if self.status.unreachable_since is not None:
                log.info("control plane %s answers again (after %.1f s)", self.display_url,
                         time.time() - self.status.unreachable_since)
                self._last_logged = None
            else:
                log.info("control plane %s answers", self.display_url)
            if self.status.rejected_version is None:
                self.status.last_error = None  # the failure that made it unreachable
        self.status.connected = True
        self.status.unreachable_since = None
        if self.metrics is not None:
            self.metrics.control_plane_reachable.labels(self.pop).set(1)

    def _failed(self, error: str, *, level: int) -> None:
        error = self._redact(error)
        if self.status.connected or self.status.unreachable_since is None:
            self.status.unreachable_since = time.time()
        self.status.connected = False
        self.status.last_error = error
        serving = (f"serving snapshot {self.status.version} ({self.status.source})"
                   if self.status.version else "no snapshot yet")
        self._log_once(level, f"control plane {self.display_url} {error}; {serving}, retrying")
        if self.metrics is not None:
            self.metrics.control_plane_reachable.labels(self.pop).set(0)

    def _log_once(self, level: int, message: str) -> None:
        """Log a failure when it starts or changes; its repetitions only at debug level."""
        key = message.split("; ", 1)[0]
        log.log(level if key != self._last_logged else logging.DEBUG, "%s", message)
        self._last_logged = key

    def _gauge_version(self) -> None:
        if self.metrics is not None:
            self.metrics.config_version.labels(self.pop).set(self.status.version)

    def _redact(self, text: str) -> str:
        return text.replace(self._token, "[token]") if self._token else text


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so a reader (or a crash) sees the old or the new file,
    never a mix: a temporary file in the same directory, fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # mkstemp makes 0600 already; be explicit
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _describe(exc: httpx.HTTPError) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


def _problem(response: httpx.Response) -> str:
    """`401 Unauthorized: <title>: <detail>` from an RFC 9457 problem document (or text)."""
    head = f"{response.status_code} {response.reason_phrase}".strip()
    try:
        body: Any = response.json()
    except ValueError:
        text = response.text.strip()[:200]
        return f"{head}: {text}" if text else head
    if isinstance(body, Mapping):
        parts = [str(body[key]) for key in ("title", "detail") if body.get(key)]
        if parts and parts[0] != response.reason_phrase:
            return f"{head}: {': '.join(parts)}"
        if len(parts) > 1:
            return f"{head}: {parts[1]}"
    return head
