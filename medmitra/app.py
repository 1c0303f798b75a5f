"""create_app(settings) -> Sanic. No import-time side effects: listeners open and close
the database, storage and worker pool; everything lives on ``app.ctx``."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import orjson
from sanic import Request, Sanic
from sanic.exceptions import SanicException
from sanic.response import HTTPResponse, empty, json as json_response, redirect

from medmitra import __version__, filemodes, httpsec
from medmitra.api.cases import bp as cases_bp, downloads as downloads_bp
from medmitra.api.docs import register_docs
from medmitra.api.headers import install as install_header_fast_path
from medmitra.api.signals import QuietSignalRouter
from medmitra.auth.jwt import TokenVerifier
from medmitra.auth.keys import load_or_create_secret
from medmitra.auth.trust import check_settings as check_trust_mode
from medmitra.config import Settings
from medmitra.contract import ModelState
from medmitra.db.errors import is_database_full
from medmitra.db.reads import Reader
from medmitra.db.setup import close_db, open_db
from medmitra.errors import ApiError, InsufficientStorage
from medmitra.jobs import queue
from medmitra.services import cases as cases_svc
from medmitra.services.links import LinkSigner
from medmitra.storage import Storage
from medmitra.web import register_web, wants_html

log = logging.getLogger("medmitra.app")

CORS_HEADERS = ("authorization, content-type, apikey, x-client-info, x-supabase-api-version, "
                "x-requested-with, accept")


def _error_response(status: int, message: str, extra: dict[str, Any] | None = None,
                    headers: dict[str, str] | None = None) -> HTTPResponse:
    body: dict[str, Any] = {"detail": message, "error": message}
    if extra:
        body.update(extra)
    return json_response(body, status=status, headers=headers)


async def handle_api_error(request: Request, exc: ApiError) -> HTTPResponse:
    if exc.status >= 500:
        log.warning("%s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
    return json_response(exc.body(), status=exc.status, headers=exc.headers)


async def handle_sanic_error(request: Request, exc: SanicException) -> HTTPResponse:
    status = getattr(exc, "status_code", 500) or 500
    if status == 405 and request is not None and request.method == "OPTIONS":
        return empty(status=204)   # CORS preflight of an existing route
    if status >= 500:
        log.error("server error on %s %s", request.method if request else "?",
                  request.path if request else "?", exc_info=exc)
        return _error_response(500, "Internal server error")
    message = str(exc) or {404: "Not found", 405: "Method not allowed"}.get(status, "Bad request")
    # Sanic's own messages are generic (route not found, bad JSON, body too large).
    return _error_response(status, message, headers=getattr(exc, "headers", None) or None)


async def handle_unexpected(request: Request, exc: Exception) -> HTTPResponse:
    if is_database_full(exc):
        # The database could not grow: like a file that does not fit, a 507 (the
        # transaction was rolled back), on every route.
        log.warning("%s %s: the database could not grow (disk full)",
                    request.method if request else "?", request.path if request else "?")
        return await handle_api_error(request, InsufficientStorage())
    log.error("unhandled error on %s %s", request.method if request else "?",
              request.path if request else "?", exc_info=exc)
    return _error_response(500, "Internal server error")


def create_app(settings: Settings, *, start_workers: bool = True,
               runtime_factory: Any = None, name: str | None = None) -> Sanic:
    check_trust_mode(settings)    # ConfigError: trust mode with a CORS wildcard
    install_header_fast_path()
    # orjson renders a 100-case list ~5x faster than the standard library.
    app = Sanic(name or f"medmitra_{uuid.uuid4().hex[:12]}", dumps=orjson.dumps,
                signal_router=QuietSignalRouter())
    # Every non-streaming body (JSON, sign-in) is capped while it arrives, before auth; the
    # streaming upload routes set their own cap (server.request_max_bytes, multipart.py).
    app.config.REQUEST_MAX_SIZE = settings.server.json_max_bytes
    app.config.KEEP_ALIVE_TIMEOUT = settings.server.keep_alive_timeout_s
    app.config.REQUEST_TIMEOUT = 120
    app.config.RESPONSE_TIMEOUT = 300
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = settings.server.graceful_shutdown_s
    app.config.FALLBACK_ERROR_FORMAT = "json"
    # Sanic's TouchUp rewrites classes process-wide: only `serve` turns it on (signals.py).
    app.config.TOUCHUP = False
    # Sanic's access log writes full URLs (queries, signed links): httpsec logs templates.
    app.config.ACCESS_LOG = False
    if settings.server.trusted_proxies:   # else X-Forwarded-For is ignored (spoofable)
        app.config.PROXIES_COUNT = settings.server.trusted_proxies
    app.config.MOTD = False
    # sanic-ext, when installed in the same env, would add CDN-backed /docs and
    # /openapi.json of its own; the project serves offline ones (api/docs.py).
    app.config.AUTO_EXTEND = False
    app.ctx.settings = settings
    app.ctx.started_at = time.time()
    app.ctx.pool = None
    app.ctx.session_check = None
    app.ctx.ready = False

    app.blueprint(cases_bp)
    app.blueprint(downloads_bp)
    _register_system_routes(app)
    register_docs(app)
    register_web(app)   # the clinician app under /app/ and the DICOM preview route
    app.error_handler.add(ApiError, handle_api_error)
    app.error_handler.add(SanicException, handle_sanic_error)
    app.error_handler.add(Exception, handle_unexpected)

    # Plain functions the one response middleware runs (ops/server.py), in this order.
    response_hooks = [httpsec.protector(log_access=settings.server.access_log)]
    if settings.server.cors_origins:
        response_hooks.append(
            _cors_hook([o.strip() for o in settings.server.cors_origins.split(",")]))

    @app.before_server_start
    async def open_resources(app: Sanic) -> None:
        data = settings.data_path
        filemodes.private_dir(data)
        filemodes.tighten(data)     # installs made before files were private; logs if any
        await open_db(settings)
        # Hot reads use a read-only connection of their own (db/reads.py).
        app.ctx.reader = Reader(
            Path(settings.database_url.removeprefix("sqlite://")) if settings.is_sqlite
            else None, settings.database.busy_timeout_ms)
        storage = Storage(data, min_free_bytes=settings.storage.min_free_bytes)
        storage.open()
        known = await cases_svc.known_file_ids()
        temps, orphans = storage.sweep(known)
        if temps or orphans:
            log.info("start-up sweep removed %d unfinished upload(s) and %d orphan file(s)",
                     temps, orphans)
        app.ctx.storage = storage
        secret = load_or_create_secret(data, settings.auth.jwt_secret)
        app.ctx.jwt_secret = secret
        app.ctx.verifier = TokenVerifier.from_settings(settings, secret)
        app.ctx.links = LinkSigner(secret, settings.limits.file_url_ttl_s)

    # Registered before everything that uses the database: Sanic runs after_server_stop
    # listeners in reverse order, so this one runs last. The audit trail is closed here
    # too (closing twice is harmless): its last rows must be written before the database
    # closes, whatever order the listeners end up in.
    @app.after_server_stop
    async def close_resources(app: Sanic) -> None:
        audit = getattr(app.ctx, "audit", None)
        if audit is not None:
            await audit.close()
        reader = getattr(app.ctx, "reader", None)
        if reader is not None:
            reader.close()
        await close_db()

    # The local Supabase Auth subset adds its routes and a start-up listener that runs after
    # open_resources (listeners run in registration order).
    from medmitra.api.supabase_auth import register_auth_api

    register_auth_api(app)
    from medmitra.api.authorize import register_authorize

    register_authorize(app)
    # After open_resources: audit trail, metrics, request ids, FHIR route, backups.
    from medmitra.ops.server import install as install_ops

    install_ops(app, settings, response_hooks)

    @app.after_server_start
    async def start_workers_when_listening(app: Sanic) -> None:
        # Last, once every start-up step has succeeded: a start that fails earlier leaves
        # no model-loading threads behind to keep the process alive.
        if start_workers:
            from medmitra.jobs.pool import WorkerPool

            pool = WorkerPool(settings, app.ctx.storage, runtime_factory=runtime_factory)
            app.ctx.pool = pool
            await pool.start()
        app.ctx.ready = True

    @app.before_server_stop
    async def stop_workers(app: Sanic) -> None:
        app.ctx.ready = False
        if app.ctx.pool is not None:
            await app.ctx.pool.stop()


    return app


def _cors_hook(allowed: list[str]) -> Callable[[Request, HTTPResponse], None]:
    """CORS for browser clients (the original frontend, supabase-js), as a response hook.
    Preflight OPTIONS requests are answered by handle_sanic_error (Sanic routes them to a
    405)."""
    any_origin = "*" in allowed

    def cors_headers(request: Request, response: HTTPResponse) -> None:
        origin = request.headers.get("origin")
        if not origin:
            return   # not a browser cross-origin request: nothing to add
        if any_origin or origin in allowed:
            h = response.headers
            h["Access-Control-Allow-Origin"] = "*" if any_origin else origin
            h["Access-Control-Allow-Headers"] = CORS_HEADERS
            h["Access-Control-Allow-Methods"] = "GET, POST, PUT, DELETE, OPTIONS"
            h["Access-Control-Max-Age"] = "600"
            if not any_origin:
                h["Vary"] = "Origin"

    return cors_headers


def _register_system_routes(app: Sanic) -> None:
    @app.get("/")
    async def root(request: Request) -> HTTPResponse:
        if wants_html(request):   # a browser: the clinician app; API clients get the JSON
            return redirect("/app/")
        return json_response({"message": "MedMitra Backend API is running!"})

    @app.get("/health")
    async def health(request: Request) -> HTTPResponse:
        ctx = request.app.ctx
        checks: dict[str, Any] = {"version": __version__,
                                  "uptime_s": round(time.time() - ctx.started_at, 3)}
        ok = bool(ctx.ready)
        try:
            depth = await queue.queue_depth(getattr(ctx, "reader", None))
            checks["database"] = {"status": "ok"}
            checks["queue"] = depth
        except Exception as exc:  # the database is down: say so instead of a 500
            ok = False
            checks["database"] = {"status": "error", "error": type(exc).__name__}
        storage = getattr(ctx, "storage", None)
        if storage is not None:
            free = storage.free_bytes()
            checks["storage"] = {"status": "ok" if free >= storage.min_free_bytes else "low",
                                 "free_bytes": free}
        if ctx.pool is not None:
            pool = ctx.pool.status()
            checks["model"] = pool["model"]
            checks["workers"] = pool["workers"]
        else:
            checks["model"] = {"state": ModelState.DISABLED, "name": None, "error": None}
            checks["workers"] = []
        checks["status"] = "ok" if ok else "unavailable"
        return json_response(checks, status=200 if ok else 503)
