"""Prometheus metrics of a PoP process (prometheus-client).

With several worker processes, set PROMETHEUS_MULTIPROC_DIR (done by `egressd pop
--workers N`) and every worker's figures are aggregated in the exposition.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class PopMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.flows = Counter(
            "egressd_flows", "Flows ended, by protocol, egress kind, rule and outcome",
            ["pop", "protocol", "egress", "rule", "outcome"], registry=self.registry,
        )
        self.bytes = Counter(
            "egressd_bytes", "Payload bytes relayed, by direction",
            ["pop", "direction"], registry=self.registry,
        )
        self.active = Gauge(
            "egressd_active_flows", "Flows in progress", ["pop", "protocol"],
            registry=self.registry, multiprocess_mode="livesum",
        )
        self.connect_seconds = Histogram(
            "egressd_upstream_connect_seconds", "Time to connect upstream (incl. Happy Eyeballs)",
            ["pop", "path"], buckets=_BUCKETS, registry=self.registry,
        )
        self.auth_failures = Counter(
            "egressd_auth_failures", "Rejected device credentials", ["pop", "listener"],
            registry=self.registry,
        )
        self.admission_refused = Counter(
            "egressd_admission_refused", "Connections and flows refused by a cap, by reason "
            "(handshakes-per-source, connections-per-source, flows-per-account, "
            "flows-per-source, auth-rate)", ["pop", "reason"], registry=self.registry,
        )
        self.protocol_errors = Counter(
            "egressd_protocol_errors", "Malformed client input, by listener", ["pop", "listener"],
            registry=self.registry,
        )
        # Configuration distribution (R14). With several workers each one watches the control
        # plane: the lowest live worker's figure is the conservative one.
        self.config_version = Gauge(
            "egressd_config_version", "Version of the configuration snapshot in force",
            ["pop"], registry=self.registry, multiprocess_mode="livemin",
        )
        self.control_plane_reachable = Gauge(
            "egressd_control_plane_reachable",
            "1 while the control plane answers the snapshot watch, 0 while it does not",
            ["pop"], registry=self.registry, multiprocess_mode="livemin",
        )
        self.config_rejected = Counter(
            "egressd_config_rejected", "Snapshots from the control plane that failed validation",
            ["pop"], registry=self.registry,
        )

    def exposition(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
