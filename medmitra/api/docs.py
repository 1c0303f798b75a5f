"""Offline API docs: /openapi.json, Swagger UI at /docs and ReDoc at /redoc.

Every asset comes from this server: Swagger UI straight from the installed
``swagger-ui-bundle-v2`` wheel (module ``swagger_ui_bundle``), ReDoc from the bundle
vendored in ``medmitra/static/redoc`` (refreshed by scripts/update-docs-assets.sh), and the
pages and their start-up scripts from ``medmitra/static/docs``. Pages carry a
Content-Security-Policy that only allows this origin, so even a stray remote URL inside a
vendored bundle cannot load. No auth on these routes: the document is public.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
import json
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from string import Template

from sanic import Request, Sanic
from sanic.response import HTTPResponse, raw

from medmitra.api.openapi import TITLE, build_openapi

SPEC_URL = "/openapi.json"
STATIC_PREFIX = "/static/docs"

# Versioned vendor URLs never change content, so browsers may keep them for a year.
IMMUTABLE_CACHE = "public, max-age=31536000, immutable"
# Pages, the document and our own small scripts change with a deploy: revalidate by ETag.
REVALIDATE_CACHE = "no-cache"

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".png": "image/png",
}
# Worth compressing: the two bundles shrink from ~1.5 MB / 1.1 MB to about a third.
COMPRESSIBLE = (".js", ".css", ".json", ".map", ".html")
COMPRESS_MIN_BYTES = 1024

# Styles: Swagger UI sets inline style attributes and ReDoc (styled-components) injects
# <style> tags, so styles need 'unsafe-inline'. Scripts do not: both pages start from files.
# ReDoc runs its search index in a Worker made from a blob: URL.
PAGE_CSP = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self' 'unsafe-inline'",
    "img-src 'self' data: blob:",
    "font-src 'self' data:",
    "connect-src 'self'",
    "worker-src 'self' blob:",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'self'",
])

SWAGGER_FILES = ("swagger-ui-bundle.js", "swagger-ui-bundle.js.map", "swagger-ui.css",
                 "swagger-ui.css.map", "favicon-16x16.png", "favicon-32x32.png")
REDOC_FILES = ("redoc.standalone.js",)
OWN_FILES = ("swagger-init.js", "redoc-init.js", "docs.css")


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    cache_control: str
    etag: str
    gzipped: bytes | None = None


def _make_asset(body: bytes, name: str, cache_control: str) -> Asset:
    ext = name[name.rfind("."):]
    gz = None
    if ext in COMPRESSIBLE and len(body) >= COMPRESS_MIN_BYTES:
        # mtime=0 keeps the compressed bytes (and so caches) identical across restarts.
        gz = gzip.compress(body, compresslevel=6, mtime=0)
    # Weak: the gzip and identity encodings share it, which RFC 9110 allows for W/ tags.
    etag = 'W/"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    return Asset(body, CONTENT_TYPES[ext], cache_control, etag, gz)


def _static_root() -> Traversable:
    return importlib.resources.files("medmitra") / "static"


def _swagger_dir() -> Traversable:
    from swagger_ui_bundle import swagger_ui_path  # the swagger-ui-bundle-v2 wheel

    return swagger_ui_path


def swagger_version() -> str:
    return _swagger_dir().name.removeprefix("swagger-ui-")


def redoc_version() -> str:
    return (_static_root() / "redoc" / "VERSION").read_text(encoding="utf-8").strip()


def _bases() -> dict[str, str]:
    return {
        "swagger_base": f"{STATIC_PREFIX}/swagger-ui-{swagger_version()}",
        "redoc_base": f"{STATIC_PREFIX}/redoc-{redoc_version()}",
        "own_base": f"{STATIC_PREFIX}/app",
    }


@functools.lru_cache(maxsize=1)
def _assets() -> dict[str, Asset]:
    """URL path -> asset, read once. Only listed files are served (no directory walking)."""
    bases = _bases()
    out: dict[str, Asset] = {}
    for name in SWAGGER_FILES:
        out[f"{bases['swagger_base']}/{name}"] = _make_asset(
            (_swagger_dir() / name).read_bytes(), name, IMMUTABLE_CACHE)
    for name in REDOC_FILES:
        out[f"{bases['redoc_base']}/{name}"] = _make_asset(
            (_static_root() / "redoc" / name).read_bytes(), name, IMMUTABLE_CACHE)
    for name in OWN_FILES:
        out[f"{bases['own_base']}/{name}"] = _make_asset(
            (_static_root() / "docs" / name).read_bytes(), name, REVALIDATE_CACHE)
    return out


@functools.lru_cache(maxsize=1)
def _pages() -> dict[str, Asset]:
    values = {**_bases(), "spec_url": SPEC_URL, "title": TITLE}
    out = {}
    for route, template in (("/docs", "swagger.html"), ("/redoc", "redoc.html")):
        text = (_static_root() / "docs" / template).read_text(encoding="utf-8")
        out[route] = _make_asset(Template(text).substitute(values).encode(), template,
                                 REVALIDATE_CACHE)
    return out


@functools.lru_cache(maxsize=1)
def _openapi_asset() -> Asset:
    # No ``servers``: the document then resolves against the URL it was loaded from, which
    # is right behind any host name or port.
    body = json.dumps(build_openapi(), ensure_ascii=False, separators=(",", ":")).encode()
    return _make_asset(body, "openapi.json", REVALIDATE_CACHE)


def _respond(request: Request, asset: Asset, extra: dict[str, str] | None = None
             ) -> HTTPResponse:
    headers = {"Cache-Control": asset.cache_control, "ETag": asset.etag,
               "X-Content-Type-Options": "nosniff", **(extra or {})}
    if asset.gzipped is not None:
        headers["Vary"] = "Accept-Encoding"
    inm = request.headers.get("if-none-match", "")
    # Weak comparison (RFC 9110 13.1.2): the W/ prefix does not matter.
    tags = {tag.strip().removeprefix("W/") for tag in inm.split(",")}
    if asset.etag.removeprefix("W/") in tags or "*" in tags:
        return HTTPResponse(status=304, headers=headers)
    body = asset.body
    if asset.gzipped is not None and "gzip" in request.headers.get("accept-encoding", ""):
        body = asset.gzipped
        headers["Content-Encoding"] = "gzip"
    return raw(body, headers=headers, content_type=asset.content_type)


def _not_found() -> HTTPResponse:
    msg = "Not found"
    return raw(json.dumps({"detail": msg, "error": msg}).encode(), status=404,
               content_type="application/json")


def register_docs(app: Sanic) -> None:
    """Add GET /openapi.json, /docs, /redoc and the asset routes under /static/docs/."""
    # sanic-ext, when installed, is loaded automatically at server start and registers its
    # own /docs, /openapi.json ... (with CDN assets): that would clash with these routes.
    app.config.AUTO_EXTEND = False
    # Read everything now: a missing asset fails start-up, not the first visitor.
    assets, pages = _assets(), _pages()
    _openapi_asset()
    page_headers = {"Content-Security-Policy": PAGE_CSP, "Referrer-Policy": "no-referrer",
                    "X-Frame-Options": "SAMEORIGIN"}

    async def openapi_json(request: Request) -> HTTPResponse:
        return _respond(request, _openapi_asset())

    async def swagger_page(request: Request) -> HTTPResponse:
        return _respond(request, pages["/docs"], page_headers)

    async def redoc_page(request: Request) -> HTTPResponse:
        return _respond(request, pages["/redoc"], page_headers)

    async def docs_asset(request: Request, asset_path: str) -> HTTPResponse:
        asset = assets.get(f"{STATIC_PREFIX}/{asset_path}")
        return _not_found() if asset is None else _respond(request, asset)

    app.add_route(openapi_json, SPEC_URL, name="docs_openapi_json")
    app.add_route(swagger_page, "/docs", name="docs_swagger")
    app.add_route(redoc_page, "/redoc", name="docs_redoc")
    app.add_route(docs_asset, f"{STATIC_PREFIX}/<asset_path:path>", name="docs_asset")


def main(argv: list[str] | None = None) -> None:
    """Serve only the docs, for previewing them and for the docs tests.

    ``python -m medmitra.api.docs --port 0`` binds a free port and prints
    ``listening on http://HOST:PORT`` before serving.
    """
    import argparse
    import socket

    parser = argparse.ArgumentParser(prog="python -m medmitra.api.docs")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 = any free port")
    args = parser.parse_args(argv)

    # Bind here rather than in Sanic so that port 0 works and the caller learns the port.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(128)  # connections now wait in the backlog: no race with the caller
    host, port = sock.getsockname()[:2]
    app = Sanic("medmitra_docs_preview")
    register_docs(app)
    print(f"listening on http://{host}:{port}", flush=True)
    app.run(sock=sock, single_process=True, motd=False, access_log=False)


if __name__ == "__main__":
    main()
