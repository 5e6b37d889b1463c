"""egressd.connector: the tunnel connector (`egressd tunnel run`), which runs inside a
private network, dials out to the nearest PoPs and opens flows to private origins from
its own host (DESIGN §2 R4, issue 6)."""

from egressd.connector.agent import ConnectorAgent, ConnectorSettings, PopAddress, parse_pop

__all__ = ["ConnectorAgent", "ConnectorSettings", "PopAddress", "parse_pop"]
