"""The backbone follows the configuration: peers added, moved or removed by a new snapshot."""

from __future__ import annotations

import ssl

from egressd.model.deployment import load_deployment
from egressd.model.snapshot import Snapshot
from egressd.pop.backbone import MuxBackbone, Peer


def snapshot(*pops: tuple[str, str | None]) -> Snapshot:
    text = ""
    for slot, (code, backbone) in enumerate(pops, start=1):
        text += f"""
[[data_centers]]
code = "{code}"
city = "City {code}"
country = "US"
latitude = 0.0
longitude = {slot}.0
shared_ipv4 = ["198.51.100.{slot}"]
slot = {slot}
""" + (f'backbone = "{backbone}"\n' if backbone else "")
    return load_deployment(text)


async def test_peers_follow_the_snapshot() -> None:
    backbone = MuxBackbone("las", {}, ssl.create_default_context(), port=7443)
    await backbone.follow(snapshot(("las", "203.0.113.1"), ("lax", "203.0.113.2")), 7443)
    assert backbone.peers == {"lax": Peer("lax", "203.0.113.2", 7443)}
    lax = backbone.client("lax")
    # jfk joins, lax moves: its old link is closed and a new client will dial the new address.
    await backbone.follow(snapshot(("las", "203.0.113.1"), ("lax", "203.0.113.22"),
                                   ("jfk", "203.0.113.3")), 7443)
    assert set(backbone.peers) == {"lax", "jfk"}
    assert backbone.client("lax") is not lax
    assert backbone.client("lax").host == "203.0.113.22"
    # A data center without a backbone address is no peer.
    await backbone.follow(snapshot(("las", "203.0.113.1"), ("lax", None)), 7443)
    assert backbone.peers == {}
    await backbone.close()
