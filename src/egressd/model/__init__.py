"""Pure, immutable domain types of egressd and their validation.

Nothing here does I/O or reads a clock; everything that depends on time takes `now`.
The package imports nothing else of egressd.
"""

from egressd.model.accounts import (
    Account,
    DedicatedLocation,
    Device,
    Fallback,
    LocationState,
    NetworkSettings,
    Plan,
    User,
)
from egressd.model.addresses import IPAddress, IPNetwork, address_in_prefix, stable_hash
from egressd.model.errors import ModelError, ValidationError, ValidationIssue
from egressd.model.policy import (
    SHARED_SECONDARY,
    DedicatedAction,
    EgressPolicy,
    Selector,
    SharedAction,
)
from egressd.model.routes import InNetworkOrigin, PrivateRoute, RouteKind
from egressd.model.snapshot import Quarantine, Snapshot, build_snapshot
from egressd.model.topology import DataCenter, great_circle_km

__all__ = [
    "SHARED_SECONDARY",
    "Account",
    "DataCenter",
    "DedicatedAction",
    "DedicatedLocation",
    "Device",
    "EgressPolicy",
    "Fallback",
    "IPAddress",
    "IPNetwork",
    "InNetworkOrigin",
    "LocationState",
    "ModelError",
    "NetworkSettings",
    "Plan",
    "PrivateRoute",
    "Quarantine",
    "RouteKind",
    "Selector",
    "SharedAction",
    "Snapshot",
    "User",
    "ValidationError",
    "ValidationIssue",
    "address_in_prefix",
    "build_snapshot",
    "great_circle_km",
    "stable_hash",
]
