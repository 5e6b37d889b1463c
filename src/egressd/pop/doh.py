"""DNS over HTTPS (RFC 8484) at `/dns-query` on the PoP's HTTP(S) listeners.

GET with `?dns=` (base64url, no padding) or POST with an `application/dns-message` body;
the answer comes from the PoP's DNS service (its cache, its upstreams, asked from the
shared address, R4) and is logged as a `dns` flow. A device authenticates with its
credential (`Authorization: Basic`, or `Proxy-Authorization`) — curl sends it from
`--doh-url https://DEVICE:SECRET@pop:8443/dns-query` —; sources in `--dns-allow` need none.
"""

from __future__ import annotations

import base64
import binascii
import logging
from urllib.parse import parse_qs, urlsplit

from egressd.pop.client_io import ClientIO
from egressd.pop.runtime import PopRuntime
from egressd.protocols.http1 import RequestHead, basic_credentials, simple_response

log = logging.getLogger("egressd.pop.doh")

PATH = "/dns-query"
MEDIA_TYPE = "application/dns-message"
MAX_BODY = 4096


def _query_from_get(target: str) -> bytes | None:
    values = parse_qs(urlsplit(target).query).get("dns", [])
    if len(values) != 1 or not values[0] or "=" in values[0]:
        return None
    text = values[0]
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


def _problem(status: int, reason: str, text: str, *, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    return simple_response(status, reason, text.encode() + b"\n",
                           headers=[("Content-Type", "text/plain; charset=utf-8"), *headers], close=False)


async def serve_doh(runtime: PopRuntime, io: ClientIO, head: RequestHead, body: bytes | None) -> None:
    """Answer one DoH request (the connection stays open for the next)."""
    service = runtime.dns
    if service is None:
        await io.send(_problem(404, "Not Found", "this PoP serves no DNS: start it with --dns-upstream or --dns-listen"))
        return
    if head.method == "GET":
        wire = _query_from_get(head.target)
        if wire is None:
            await io.send(_problem(400, "Bad Request", "expected ?dns=<base64url DNS message without padding>"))
            return
    elif head.method == "POST":
        content_type = (head.header("content-type") or b"").split(b";")[0].strip().lower()
        if content_type != MEDIA_TYPE.encode():
            await io.send(_problem(415, "Unsupported Media Type", f"the body must be {MEDIA_TYPE}"))
            return
        wire = body or b""
    else:
        await io.send(simple_response(405, "Method Not Allowed", b"", headers=[("Allow", "GET, POST")], close=False))
        return
    value = head.header("authorization")
    credentials = basic_credentials(value) if value is not None else head.proxy_credentials
    identity = runtime.authenticate(credentials, io.peer)
    if identity is None and (credentials is not None or not service.allowed(io.peer[0])):
        if credentials is not None:
            log.info("DoH: authentication failed for %s from %s", credentials[0][:64], io.peer[0])
        await io.send(_problem(401, "Unauthorized", "a device credential is needed (Basic)",
                               headers=(("WWW-Authenticate", 'Basic realm="egressd DNS"'),)))
        return
    answer = await service.answer(
        wire, io.peer, "doh", authorized=identity is not None,
        account=identity.account if identity else None, user=identity.user if identity else None,
        device=identity.device if identity else None)
    if answer is None:
        await io.send(_problem(400, "Bad Request", "not a DNS query"))
        return
    await io.send(simple_response(200, "OK", answer, headers=[("Content-Type", MEDIA_TYPE),
                                                              ("Cache-Control", "no-store")], close=False))
