"""egressd.mux: one multiplexed, mutually authenticated TLS link for TCP and UDP flows.

Device -> PoP, PoP -> PoP and connector -> PoP all use it. One TLS 1.3 connection per
peer pair (both sides hold a certificate from the deployment CA) carries every flow as
an HTTP/2 stream opened with extended CONNECT (RFC 8441): ``:protocol`` says what the
flow is (``egressd-tcp``, ``connect-udp``), the request headers carry the flow header
(account, destination, flow id, source address), the response says whether the far end
took it (2xx) or why not (``egressd-reason``). UDP datagrams ride as RFC 9297 capsules.

Why HTTP/2 (h2) rather than a framed protocol of our own. The backbone needs exactly
what HTTP/2 already is: multiplexing with per-stream *and* per-connection flow control,
half-close (END_STREAM), abort (RST_STREAM), liveness (PING), graceful shutdown (GOAWAY),
a header block per stream, and a hard limit on concurrent streams. A framed protocol
would have to re-invent each of these, and its flow control is where home-made
multiplexers usually go wrong (head-of-line blocking of the whole link behind one slow
reader, or unbounded buffering). ``h2`` is a well-kept, sans-I/O, exhaustively tested
state machine, so we write only the credit policy and the asyncio shell. The costs,
accepted: h2 is pure Python (a few microseconds per frame; we use 64 KiB frames so that
a bulk flow pays it rarely), and after a GOAWAY h2 sends nothing more, so a closing link
fails its streams instead of draining them. The same choice keeps the door open to
standard tooling (Wireshark, nghttp, any RFC 9298 proxy) and to HTTP/3 later.

Layout: ``core`` (sans-I/O: h2 + per-flow buffers + credit policy), ``link`` (the
asyncio shell: ``MuxStream``), ``server``/``client`` (listening and dialling), ``tls``
(contexts, peer identity), ``capsule`` (pure RFC 9297 codec), ``datagram`` (UDP over a
stream), ``pump`` (stream <-> socket relay).
"""

from egressd.mux.client import MuxClient
from egressd.mux.core import LinkSettings
from egressd.mux.datagram import DatagramStream
from egressd.mux.errors import MuxError, PumpError, StreamRefused, StreamReset
from egressd.mux.link import MuxStream
from egressd.mux.pump import pump
from egressd.mux.server import Handler, MuxServer
from egressd.mux.tls import PeerIdentity, client_context, peer_identity, server_context

__all__ = [
    "DatagramStream",
    "Handler",
    "LinkSettings",
    "MuxClient",
    "MuxError",
    "MuxServer",
    "MuxStream",
    "PeerIdentity",
    "PumpError",
    "StreamRefused",
    "StreamReset",
    "client_context",
    "peer_identity",
    "pump",
    "server_context",
]
