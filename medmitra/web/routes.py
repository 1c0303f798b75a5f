"""Page and asset routes of the clinician web app.

Every page is the same HTML shell (``static/index.html``); the ES modules it loads render
the page from the URL and fetch all data through the JSON API with the user's Bearer token.
The server side of the app is therefore only: the shell, its assets, one public document
of the limits the upload form checks before sending (``/app/config.json``), and the DICOM
preview route (preview.py). No page reads the database by another path.

Assets are read once at start-up (a missing file fails start-up, not the first visitor),
served with an ETag and gzip, and pages carry a Content-Security-Policy that allows this
origin only: no CDN, no external font, and no inline script.
"""

from __future__ import annotations

import functools
import importlib.resources
import json

from sanic import Blueprint, Request, Sanic
from sanic.response import HTTPResponse, redirect

from medmitra import filetypes
from medmitra.api.docs import Asset, _make_asset, _respond
from medmitra.contract import AGE_MAX_YEARS, SORT_KEYS, CaseStatus, FileCategory
from medmitra.pipeline.types import STAGES
from medmitra.web.preview import bp as preview_bp

APP_PREFIX = "/app"
STATIC_PREFIX = f"{APP_PREFIX}/static"
# Revalidated by ETag on every use: the app changes with a deploy, and a 304 is cheap.
REVALIDATE_CACHE = "no-cache"
# File name extensions the picker offers per accepted content type (the server still
# judges every file by its bytes; this only steers the file dialog and the early check).
EXTENSIONS = {
    filetypes.PDF: [".pdf"],
    filetypes.CSV: [".csv", ".tsv"],
    filetypes.TEXT: [".txt"],
    filetypes.JPEG: [".jpg", ".jpeg"],
    filetypes.PNG: [".png"],
    filetypes.DICOM: [".dcm", ".dicom"],
}

PAGE_CSP = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    # blob: for DICOM and PDF previews fetched with the token; photos are same-origin links.
    "img-src 'self' blob: data:",
    "connect-src 'self'",
    "frame-src 'none'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])
PAGE_HEADERS = {"Content-Security-Policy": PAGE_CSP, "Referrer-Policy": "no-referrer",
                "X-Frame-Options": "DENY"}


def _static_root():
    return importlib.resources.files("medmitra.web") / "static"


def _walk(folder, prefix: str = ""):
    for entry in folder.iterdir():
        name = f"{prefix}{entry.name}"
        if entry.is_dir():
            yield from _walk(entry, f"{name}/")
        elif not entry.name.endswith(".md"):
            yield name, entry


@functools.lru_cache(maxsize=1)
def _assets() -> dict[str, Asset]:
    """URL path -> asset for every file under static/ (read once)."""
    return {f"{STATIC_PREFIX}/{name}": _make_asset(entry.read_bytes(), name, REVALIDATE_CACHE)
            for name, entry in _walk(_static_root())}


def client_config(settings) -> dict:
    """What the app needs to know before it sends anything, from the one place each fact
    lives: limits from config, accepted types from filetypes, enums from the contract."""
    lim = settings.limits
    accepted = {str(cat): sorted(filetypes.ACCEPTED[cat]) for cat in FileCategory}
    return {
        "limits": {
            "lab_max_bytes": lim.lab_max_bytes,
            "radiology_max_bytes": lim.radiology_max_bytes,
            "files_per_request": lim.files_per_request,
            "request_max_bytes": settings.server.request_max_bytes,
            "name_max_chars": lim.name_max_chars,
            "text_field_max_chars": lim.text_field_max_chars,
            "max_age": AGE_MAX_YEARS,
        },
        "accepted": {cat: {"types": types,
                           "extensions": sorted({e for t in types for e in EXTENSIONS[t]})}
                     for cat, types in accepted.items()},
        "statuses": [str(s) for s in CaseStatus],
        "sort_fields": list(SORT_KEYS),
        "stages": list(STAGES),
    }


def wants_html(request: Request) -> bool:
    """A browser navigating (Accept names text/html before any JSON), not an API client."""
    accept = request.headers.get("accept", "")
    return "text/html" in accept and "application/json" not in accept.split(",")[0]


def register_web(app: Sanic) -> None:
    """Add /app/ (pages, assets, config.json) and the file preview route."""
    assets = _assets()
    shell = assets[f"{STATIC_PREFIX}/index.html"]
    config_body = json.dumps(client_config(app.ctx.settings), separators=(",", ":")).encode()
    config_asset = _make_asset(config_body, "config.json", REVALIDATE_CACHE)
    bp = Blueprint("web", url_prefix=APP_PREFIX)

    @bp.get("/", name="web_shell_root", strict_slashes=True)
    async def shell_root(request: Request) -> HTTPResponse:
        return _respond(request, shell, PAGE_HEADERS)

    @bp.get("/<page:path>", name="web_page")
    async def page(request: Request, page: str) -> HTTPResponse:
        # Page URLs of the app (signin, cases/new, cases/<id>) all get the shell; the
        # modules render what the URL names. Asset URLs are matched exactly.
        if page.startswith("static/"):
            asset = assets.get(f"{APP_PREFIX}/{page}")
            if asset is None:
                return _not_found()
            return _respond(request, asset, {"Cross-Origin-Resource-Policy": "same-origin"})
        if page == "config.json":
            return _respond(request, config_asset)
        return _respond(request, shell, PAGE_HEADERS)

    app.blueprint(bp)
    app.blueprint(preview_bp)

    @app.get(APP_PREFIX, name="web_no_slash", strict_slashes=True)
    async def no_slash(request: Request) -> HTTPResponse:
        return redirect(f"{APP_PREFIX}/")


def _not_found() -> HTTPResponse:
    from sanic.response import json as json_response

    return json_response({"detail": "Not found", "error": "Not found"}, status=404)
