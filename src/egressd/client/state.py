"""The device's files: its enrollment (credential and PoPs, mode 0600) and the running
client's status (no secret), both JSON under one state directory.

The secret is written once at enrollment and read by `run` and `verify`; nothing prints
it, and `Enrollment`'s repr leaves it out.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

__all__ = ["DEFAULT_STATE_DIR", "ClientStateError", "Enrollment", "PopEndpoint",
           "read_status", "write_private", "write_status"]

DEFAULT_STATE_DIR: Final = Path(".egressd-client")
ENROLLMENT_FILE: Final = "device.json"
STATUS_FILE: Final = "status.json"
CA_FILE: Final = "ca.crt"


class ClientStateError(Exception):
    """The state directory is missing, unreadable or holds something else: a plain message."""


@dataclass(frozen=True, slots=True)
class PopEndpoint:
    """A PoP as the device reaches it: its device link (host, port) and what to show."""

    code: str
    city: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Enrollment:
    control: str
    device_id: str
    secret: str = field(repr=False)
    account_id: str
    user: str
    pops: tuple[PopEndpoint, ...]
    ca: str | None = None  # PEM file that signs the PoPs' certificates; None: system CAs
    echo4: str | None = None  # verify's default echo URLs (GET /trace)
    echo6: str | None = None

    def save(self, state_dir: Path) -> Path:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = state_dir / ENROLLMENT_FILE
        data = asdict(self)
        data["pops"] = [asdict(pop) for pop in self.pops]
        write_private(path, json.dumps(data, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, state_dir: Path) -> Enrollment:
        path = state_dir / ENROLLMENT_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ClientStateError(f"{path} does not exist: enroll first "
                                   "(egressd client enroll --control URL --token T)") from None
        except (OSError, ValueError) as error:
            raise ClientStateError(f"cannot read {path}: {error}") from None
        try:
            pops = tuple(PopEndpoint(code=str(p["code"]), city=str(p["city"]),
                                     host=str(p["host"]), port=int(p["port"]))
                         for p in data["pops"])
            return cls(control=str(data["control"]), device_id=str(data["device_id"]),
                       secret=str(data["secret"]), account_id=str(data["account_id"]),
                       user=str(data["user"]), pops=pops, ca=data.get("ca"),
                       echo4=data.get("echo4"), echo6=data.get("echo6"))
        except (KeyError, TypeError, ValueError) as error:
            raise ClientStateError(f"{path} is not an enrollment file ({error!r} missing or "
                                   "malformed): enroll again") from None


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, replacing it atomically."""
    partial = path.with_name(path.name + ".part")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.chmod(partial, 0o600)
    os.replace(partial, path)


def write_status(state_dir: Path, status: dict[str, Any]) -> None:
    write_private(state_dir / STATUS_FILE, json.dumps(status, indent=2) + "\n")


def read_status(state_dir: Path) -> dict[str, Any] | None:
    """The running client's last status, or None if there is none or its process is gone."""
    with contextlib.suppress(OSError, ValueError):
        status = json.loads((state_dir / STATUS_FILE).read_text())
        if isinstance(status, dict) and _alive(int(status.get("pid", 0))):
            return status
    return None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
