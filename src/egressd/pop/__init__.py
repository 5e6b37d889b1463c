"""The PoP: listeners, authentication, upstream connect, relays, flow log and metrics.

Only `upstream.py` creates upstream sockets; only `relay.py` moves tunnel bytes. Everything
that can be decided without a socket is decided in `egressd.decide` and `egressd.protocols`.
"""
