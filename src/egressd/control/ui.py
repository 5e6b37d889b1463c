"""The dashboard's static files: `web/index.html` at `/`, everything else under `/ui/`.

Hand-written HTML, CSS and JavaScript modules shipped inside the package: no build step,
no CDN, so the dashboard works offline. The page talks to the control plane only through
the public REST API under /v1 with the signed-in token; this module serves files and
knows nothing of the store.

The files are read once, on first use, into memory (about 150 KB) with a content hash as
their ETag: a browser revalidates (`no-cache`) and gets `304` while nothing changed. Only
names found in the package are served, so a path cannot reach outside `web/`. The CSP
allows scripts, styles and connections to this origin only: the token lives in
sessionStorage, and no inline or foreign script can read it.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from dataclasses import dataclass
from functools import cache
from importlib.resources.abc import Traversable
from typing import Annotated

from fastapi import APIRouter, Header, Path, Response

router = APIRouter(include_in_schema=False)

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def _walk(folder: Traversable, prefix: str) -> dict[str, Traversable]:
    found: dict[str, Traversable] = {}
    for entry in folder.iterdir():
        name = f"{prefix}{entry.name}"
        if entry.is_dir():
            found.update(_walk(entry, name + "/"))
        elif entry.is_file():
            found[name] = entry
    return found


@cache
def assets() -> dict[str, Asset]:
    """Every servable file of `web/`, by its path relative to `web/`."""
    web = importlib.resources.files("egressd.control").joinpath("web")
    loaded: dict[str, Asset] = {}
    for name, entry in _walk(web, "").items():
        suffix = name[name.rfind("."):] if "." in name else ""
        if suffix not in CONTENT_TYPES:
            continue
        body = entry.read_bytes()
        loaded[name] = Asset(body, CONTENT_TYPES[suffix],
                             '"' + hashlib.sha256(body).hexdigest()[:20] + '"')
    return loaded


def _serve(name: str, if_none_match: str | None) -> Response:
    asset = assets().get(name)
    if asset is None:
        return Response("not found\n", status_code=404, media_type="text/plain")
    headers = {"ETag": asset.etag, "Cache-Control": "no-cache", **SECURITY_HEADERS}
    if if_none_match is not None and asset.etag in if_none_match:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.content_type, headers=headers)


IfNoneMatch = Annotated[str | None, Header(alias="If-None-Match")]


@router.get("/")
def index(if_none_match: IfNoneMatch = None) -> Response:
    """The dashboard's single page; its views are fragments (`/#/egress`)."""
    return _serve("index.html", if_none_match)


@router.get("/ui/{name:path}")
def asset(name: Annotated[str, Path(max_length=200)],
          if_none_match: IfNoneMatch = None) -> Response:
    return _serve(f"ui/{name}", if_none_match)
