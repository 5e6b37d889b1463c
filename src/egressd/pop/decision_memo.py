"""Decisions remembered for the snapshot and health view in force.

`decide` is a pure function of (snapshot, flow, view), and devices repeat their flows: the
same device to the same address and port. So a PoP remembers each decision until the
snapshot or the view is replaced (a configuration change, a backbone probe), which
empties the memo; it is bounded, and emptied when full.

Keys hold the identity and the address by `id()` (both hash in Python; the objects recur:
`CredentialMemo` and `address_literal` return the same ones), and each entry keeps both
alive and is checked against them, so an identity cannot be reused while it is a key.
"""

from __future__ import annotations

from egressd.decide import Decision, Flow, HealthView, decide
from egressd.model.addresses import IPAddress
from egressd.model.snapshot import Snapshot
from egressd.pop.identity import Identity

_Key = tuple[int, str, int, int, str | None]
_Entry = tuple[Identity | None, IPAddress, Decision]


class DecisionMemo:
    __slots__ = ("_code", "_entries", "_size", "_snapshot", "_view")

    def __init__(self, code: str, size: int = 4096) -> None:
        self._code = code
        self._size = size
        self._snapshot: Snapshot | None = None
        self._view: HealthView | None = None
        self._entries: dict[_Key, _Entry] = {}

    def decide(self, snapshot: Snapshot, view: HealthView, identity: Identity | None,
               protocol: str, address: IPAddress, port: int, hostname: str | None) -> Decision:
        entries = self._entries
        if snapshot is not self._snapshot or view is not self._view:
            entries.clear()
            self._snapshot, self._view = snapshot, view
        key = (id(identity), protocol, id(address), port, hostname)
        entry = entries.get(key)
        if entry is not None and entry[0] is identity and entry[1] is address:
            return entry[2]
        flow = Flow(
            account=identity.account if identity else None,
            user=identity.user if identity else "",
            device=identity.device if identity else "",
            connected_pop=self._code, protocol=protocol, address=address, port=port,
            hostname=hostname,
        )
        decision = decide(snapshot, flow, view)
        if len(entries) >= self._size:
            entries.clear()
        entries[key] = (identity, address, decision)
        return decision
