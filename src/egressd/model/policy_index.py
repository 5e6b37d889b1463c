"""A compiled form of one account's ordered policies: first match in a few dict probes.

Theory of operation: every policy is a bit (bit i = policy i). For each selector field we
precompute, per possible value, the mask of policies that field admits (policies that do
not constrain the field admit every value). A flow's candidate set is the AND of one mask
per field; the first matching policy is the lowest set bit. With 50 policies the masks are
small ints, and a decision costs about ten dict probes instead of 50 selector evaluations.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from operator import or_

from egressd.model.addresses import IPAddress
from egressd.model.lookup import CidrTable, HostTable
from egressd.model.policy import EgressPolicy

MAX_PORT = 65535


class _FieldMasks:
    """Masks of one set-valued field: `admitted(value)` = unconstrained | policies naming value."""

    __slots__ = ("by_value", "unconstrained")

    def __init__(self, policies: Sequence[EgressPolicy], values_of: str) -> None:
        self.unconstrained = 0
        named: dict[str, int] = {}
        for bit, policy in enumerate(policies):
            values: frozenset[str] = getattr(policy.selector, values_of)
            if not values:
                self.unconstrained |= 1 << bit
            for value in values:
                named[value] = named.get(value, 0) | (1 << bit)
        self.by_value = {value: mask | self.unconstrained for value, mask in named.items()}

    def admitted(self, value: str) -> int:
        return self.by_value.get(value, self.unconstrained)

    def admitted_any(self, values: Iterable[str]) -> int:
        mask = self.unconstrained
        for value in values:
            mask |= self.by_value.get(value, 0)
        return mask


class PolicyIndex:
    __slots__ = (
        "_cidrs",
        "_dest_unconstrained",
        "_devices",
        "_groups",
        "_hosts",
        "_pops",
        "_port_masks",
        "_port_starts",
        "_protocols",
        "_users",
        "all_mask",
        "policies",
    )

    def __init__(self, policies: Sequence[EgressPolicy]) -> None:
        self.policies = tuple(policies)
        self.all_mask = (1 << len(self.policies)) - 1
        self._users = _FieldMasks(self.policies, "users")
        self._groups = _FieldMasks(self.policies, "groups")
        self._devices = _FieldMasks(self.policies, "devices")
        self._protocols = _FieldMasks(self.policies, "protocols")
        self._pops = _FieldMasks(self.policies, "connected_pops")
        self._cidrs: CidrTable[int] = CidrTable()
        self._hosts: HostTable[int] = HostTable()
        self._dest_unconstrained = 0
        for bit, policy in enumerate(self.policies):
            selector = policy.selector
            if not selector.networks and not selector.hostnames:
                self._dest_unconstrained |= 1 << bit
            for network in selector.networks:
                self._cidrs.add(network, 1 << bit, or_)
            for pattern in selector.hostnames:
                self._hosts.add(pattern, 1 << bit, or_)
        self._port_starts, self._port_masks = self._compile_ports()

    def _compile_ports(self) -> tuple[list[int], list[int]]:
        """Split 0..65535 into intervals of constant mask; a lookup is one bisect."""
        cuts = {0}
        for policy in self.policies:
            for low, high in policy.selector.ports:
                cuts.add(low)
                if high < MAX_PORT:
                    cuts.add(high + 1)
        starts = sorted(cuts)
        masks = []
        for start in starts:
            mask = 0
            for bit, policy in enumerate(self.policies):
                ports = policy.selector.ports
                if not ports or any(low <= start <= high for low, high in ports):
                    mask |= 1 << bit
            masks.append(mask)
        return starts, masks

    def first_match(
        self,
        *,
        user: str,
        groups: Iterable[str],
        device: str,
        protocol: str,
        connected_pop: str,
        address: IPAddress,
        hostname: str | None,
        port: int,
    ) -> EgressPolicy | None:
        if not self.policies:
            return None
        mask = (
            self.all_mask
            & self._users.admitted(user)
            & self._devices.admitted(device)
            & self._protocols.admitted(protocol)
            & self._pops.admitted(connected_pop)
            & self._port_masks[bisect.bisect_right(self._port_starts, port) - 1]
        )
        if not mask:
            return None
        mask &= self._groups.admitted_any(groups)
        if not mask:
            return None
        destination = self._dest_unconstrained
        if self._cidrs:
            for found in self._cidrs.every(address):
                destination |= found
        if hostname is not None and self._hosts:
            for found in self._hosts.every(hostname):
                destination |= found
        mask &= destination
        if not mask:
            return None
        return self.policies[(mask & -mask).bit_length() - 1]
