"""Device authentication: credentials are checked on every connection, in constant time.

A device authenticates with its id as the user name and its secret as the password
(Proxy-Authorization Basic, or SOCKS5 RFC 1929). Only a SHA-256 of the secret is kept
in the snapshot; the secret itself is never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from egressd.model.snapshot import Snapshot

_UNKNOWN_DEVICE_DIGEST = "0" * 64  # compared against, so unknown ids cost the same time


@dataclass(frozen=True, slots=True)
class Identity:
    account: str
    user: str
    device: str


def authenticate(snapshot: Snapshot, credentials: tuple[str, str] | None) -> Identity | None:
    """The identity behind `(device id, secret)`, or None. Never raises on bad input."""
    if credentials is None:
        return None
    device_id, secret = credentials
    entry = snapshot.devices.get(device_id)
    expected = entry[1].secret_sha256 if entry is not None else _UNKNOWN_DEVICE_DIGEST
    digest = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()
    if not hmac.compare_digest(digest, expected) or entry is None:
        return None
    account_id, device = entry
    return Identity(account=account_id, user=device.user, device=device.id)


class CredentialMemo:
    """The identities of credentials accepted under the snapshot in force, so that a device
    that reconnects (or sends its next request) costs a dict lookup, not a SHA-256.

    Only accepted credentials are kept: anything else takes the full constant-time check.
    A lookup compares the candidate's randomized hash first, so it reveals nothing about a
    secret that is not already known. Any new snapshot (a device revoked, a secret
    rotated) empties the memo; it is bounded, and emptied when full.
    """

    __slots__ = ("_known", "_size", "_snapshot")

    def __init__(self, size: int = 4096) -> None:
        self._snapshot: Snapshot | None = None
        self._known: dict[tuple[str, str], Identity] = {}
        self._size = size

    def authenticate(self, snapshot: Snapshot, credentials: tuple[str, str]) -> Identity | None:
        if snapshot is not self._snapshot:
            self._known.clear()
            self._snapshot = snapshot
        identity = self._known.get(credentials)
        if identity is None:
            identity = authenticate(snapshot, credentials)
            if identity is not None:
                if len(self._known) >= self._size:
                    self._known.clear()
                self._known[credentials] = identity
        return identity


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
