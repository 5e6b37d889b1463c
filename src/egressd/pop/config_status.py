"""Where a PoP's configuration comes from and how fresh it is, for /health and metrics.

A PoP started from a deployment file reports `source: "file"`. A PoP fed by the control
plane (`pop/control_link.py`) reports `"control"` once it applied a snapshot from it, or
`"disk"` while it serves the last good copy it kept on disk, and whether the control plane
answers (R14: a PoP that cannot reach it keeps serving and says so in its health).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

Source = Literal["file", "disk", "control"]


def _iso(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(slots=True)
class ConfigStatus:
    """Mutable, written by whoever feeds the PoP its snapshots; times are wall-clock
    seconds (time.time()). `version` is the snapshot version in force (0: none yet)."""

    version: int = 0
    source: Source = "file"
    applied_at: float | None = None
    #: None: no control plane (a deployment file).
    control_url: str | None = None
    #: The last exchange with the control plane succeeded (200 or 204).
    connected: bool = False
    #: Since when the exchanges fail (None while they succeed, or before the first one).
    unreachable_since: float | None = None
    #: The last failure: unreachable, an HTTP error, a rejected snapshot, a failed disk write.
    last_error: str | None = None
    #: The newest version the control plane offered that failed validation (not applied).
    rejected_version: int | None = None

    @property
    def control_plane(self) -> str | None:
        """`reachable`, `unreachable since <time>`, `connecting` (no answer yet) or None."""
        if self.control_url is None:
            return None
        if self.connected:
            return "reachable"
        if self.unreachable_since is not None:
            return f"unreachable since {_iso(self.unreachable_since)}"
        return "connecting"

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = {"version": self.version, "source": self.source}
        if self.applied_at is not None:
            body["applied_at"] = _iso(self.applied_at)
        if self.control_url is not None:
            body["control_plane"] = self.control_plane
            body["last_error"] = self.last_error
            if self.rejected_version is not None:
                body["rejected_version"] = self.rejected_version
        return body
