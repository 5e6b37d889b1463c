"""egressd: a self-hosted, multi-location egress gateway with dedicated egress IPs."""

__version__ = "0.1.0"
