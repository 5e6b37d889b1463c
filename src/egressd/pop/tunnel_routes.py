"""Which of a connector's announced routes a PoP accepts: pure, from the snapshot.

A connector may carry only what its account declared for it (private routes of kind
``tunnel`` whose ``via`` is the connector), and never anything that overlaps another
account's private routes (R13: one account's routes are never reachable by another, and
a connector must not capture another account's destinations). An empty announcement
means "every route declared for me". Refusals name the route and the reason for the
connector's operator; the other account is named only in the PoP's log.
"""

from __future__ import annotations

from dataclasses import dataclass

from egressd.model.addresses import IPNetwork
from egressd.model.routes import Connector, PrivateRoute, RouteKind
from egressd.model.snapshot import Snapshot
from egressd.protocols.tunnel import Announcement, host_matches


@dataclass(frozen=True, slots=True)
class CheckedRoutes:
    networks: tuple[IPNetwork, ...]
    hostnames: tuple[str, ...]
    refused: tuple[tuple[str, str], ...]  # (route, reason) for the connector
    conflicts: tuple[tuple[str, str], ...]  # (route, other account's route) for the PoP's log

    @property
    def accepted(self) -> tuple[str, ...]:
        return tuple(str(network) for network in self.networks) + self.hostnames


def declared_for(snapshot: Snapshot, connector: Connector) -> list[PrivateRoute]:
    return [route for route in snapshot.routes if route.kind is RouteKind.TUNNEL
            and route.via == connector.id and route.account == connector.account]


def _patterns_overlap(a: str, b: str) -> bool:
    return a == b or (a.startswith("*.") and host_matches(a, b.removeprefix("*."))) or (
        b.startswith("*.") and host_matches(b, a.removeprefix("*.")))


def check_announcement(snapshot: Snapshot, connector: Connector,
                       announced: Announcement) -> CheckedRoutes:
    declared = declared_for(snapshot, connector)
    if announced.empty:
        announced = Announcement(
            tuple(network for route in declared for network in route.networks),
            tuple(name for route in declared for name in route.hostnames))
    others = [route for route in snapshot.routes if route.account != connector.account]
    networks: list[IPNetwork] = []
    hostnames: list[str] = []
    refused: list[tuple[str, str]] = []
    conflicts: list[tuple[str, str]] = []
    for network in announced.networks:
        clash = next((route for route in others for theirs in route.networks
                      if theirs.version == network.version and network.overlaps(theirs)), None)
        if clash is not None:
            refused.append((str(network), "overlaps a private route of another account"))
            conflicts.append((str(network), f"{clash.account}/{clash.id}"))
        elif not any(theirs.version == network.version and network.subnet_of(theirs)  # type: ignore[arg-type]
                     for route in declared for theirs in route.networks):
            refused.append((str(network), f"not declared for connector {connector.id} "
                                          "(a private route of kind tunnel via it)"))
        else:
            networks.append(network)
    for name in announced.hostnames:
        clash = next((route for route in others for theirs in route.hostnames
                      if _patterns_overlap(name, theirs)), None)
        if clash is not None:
            refused.append((name, "overlaps a private route of another account"))
            conflicts.append((name, f"{clash.account}/{clash.id}"))
        elif not any(theirs == name or (theirs.startswith("*.") and host_matches(
                theirs, name.removeprefix("*."))) for route in declared for theirs in route.hostnames):
            refused.append((name, f"not declared for connector {connector.id} "
                                  "(a private route of kind tunnel via it)"))
        else:
            hostnames.append(name)
    return CheckedRoutes(tuple(networks), tuple(hostnames), tuple(refused), tuple(conflicts))
