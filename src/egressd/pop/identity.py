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


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
