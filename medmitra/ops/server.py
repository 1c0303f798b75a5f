"""What the ops modules add to a running server, installed by create_app in one call:
request ids (``X-Request-Id``, JSON logs), the audit trail's request hook, ``/metrics``,
the FHIR export route and scheduled backups.

One request and one response middleware serve all of them and the response hooks the app
passes in (security headers, access log, CORS): each middleware costs Sanic a call, an
awaitable check and two signal dispatches per request, so they are not split per concern.
The request middleware is a plain function (no coroutine to create and await).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any, Callable, Sequence

from sanic import Request, Sanic
from sanic.response import HTTPResponse

from medmitra.config import Settings
from medmitra.ops import audit as audit_mod
from medmitra.ops.logs import REQUEST_ID, request_id_from, use_json

# A case or file reference is recorded only when it is an id (UUID or number): the trail
# never keeps free text a client put in a URL.
_REF_RE = re.compile(r"[0-9]{1,18}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                     r"[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_UUID_LEN = 36


def _ref(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    return value.lower() if _REF_RE.fullmatch(value) else "<invalid>"


def install(app: Sanic, settings: Settings,
            response_hooks: Sequence[Callable[[Request, HTTPResponse], None]] = ()) -> None:
    from medmitra.ops import fhir, metrics as metrics_mod

    app.ctx.last_backup_at = None
    tasks: list[asyncio.Task] = []    # background loops, cancelled at stop
    app.ctx.audit = None
    app.ctx.metrics = None
    # Without trusted proxies (server.trusted_proxies, app.py) Sanic's remote_addr is always
    # empty, yet parsing the forwarding headers to find that out costs ~3% of a cached read.
    proxied = bool(settings.server.trusted_proxies)
    app.blueprint(fhir.bp)
    if settings.log.format == "json":
        use_json()
    if settings.metrics.enabled:
        app.ctx.metrics = metrics_mod.Metrics(app)
        app.ctx.metrics_networks = metrics_mod.allowed_networks(settings)
        app.blueprint(metrics_mod.bp)

    @app.before_server_start
    async def start_ops(app: Sanic) -> None:
        if settings.audit.enabled:
            data = settings.data_path
            trail = audit_mod.AuditTrail(
                audit_mod.load_or_create_key(data), durability=settings.audit.durability,
                flush_ms=settings.audit.flush_ms, head_path=data / audit_mod.HEAD_FILE)
            trail.start()
            app.ctx.audit = trail
            if settings.audit.retention_days > 0:
                tasks.append(asyncio.get_running_loop().create_task(
                    _retention_loop(trail, settings), name="medmitra-audit-retention"))
        if app.ctx.metrics is not None:
            await app.ctx.metrics.start()
        if settings.backup.every_h > 0:
            from medmitra.ops.backup import run_schedule

            def done(result: Any) -> None:
                app.ctx.last_backup_at = time.time()

            tasks.append(asyncio.get_running_loop().create_task(
                run_schedule(settings, on_done=done), name="medmitra-backups"))

    @app.after_server_stop
    async def stop_ops(app: Sanic) -> None:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # after_server_stop listeners run in reverse order: this one before the database
        # closes, so every queued audit row is written.
        if app.ctx.audit is not None:
            await app.ctx.audit.close()

    hooks = tuple(response_hooks)

    @app.on_request
    def ops_request(request: Request) -> None:
        request.ctx.t0 = time.perf_counter()
        rid = request_id_from(request.headers.get("x-request-id"))
        request.ctx.request_id = rid
        REQUEST_ID.set(rid)

    @app.on_response
    async def ops_response(request: Request, response: HTTPResponse) -> None:
        for hook in hooks:
            hook(request, response)
        ctx = request.ctx
        rid = getattr(ctx, "request_id", None) or request_id_from(None)
        response.headers["X-Request-Id"] = rid
        route = f"/{request.route.path}" if request.route is not None else None
        status = response.status
        metrics = request.app.ctx.metrics
        if metrics is not None:
            t0 = getattr(ctx, "t0", None)
            metrics.observe(request.method, route or "<unmatched>", status,
                            time.perf_counter() - t0 if t0 is not None else 0.0)
        trail = request.app.ctx.audit
        if trail is None:
            return
        action = audit_mod.action_for(request.method, route, request.get_args)
        if action is None:
            return
        fut = trail.record(_audit_row(request, response, route, action, rid, proxied))
        if fut is not None:
            await fut


def _audit_row(request: Request, response: HTTPResponse, route: str | None, action: str,
               rid: str, proxied: bool = True) -> dict[str, Any]:
    ctx = request.ctx
    status = response.status
    user_id, kind, session = getattr(ctx, "auth_user", None) or (None, None, None)
    match = request.match_info
    case_ref = _ref(match.get("case_id"))
    file_ref = _ref(match.get("file_id"))
    detail = None
    if "token" in match and action == "download":
        found = request.app.ctx.links.verify(match["token"])
        if found is not None:
            file_ref, user_id, kind = found[0], found[1], "signed-link"
    body = getattr(response, "body", None)
    if 200 <= status < 300 and body and (
            request.method == "POST" and (case_ref is None or action in ("sign-in",
                                                                          "sign-up"))
            or case_ref is not None and len(case_ref) != _UUID_LEN):
        # Creates and uploads name their new ids only in the body; an integer case id is
        # resolved to the case's UUID there too. Only ids are taken from it.
        b_case, b_files, b_user = audit_mod.refs_from_body(body)
        case_ref = b_case or case_ref
        file_ref = b_files or file_ref
        user_id = user_id or b_user
    if status == 401:
        detail = "credentials refused"
    return {"ts": audit_mod.utc_now_iso(), "user_id": user_id, "auth_kind": kind,
            "session_id": session, "action": action, "method": request.method[:8],
            "route": (route or "")[:200] or None, "case_ref": case_ref, "file_ref": file_ref,
            "client": ((request.remote_addr if proxied else None) or request.ip or None),
            "status": status,
            "request_id": rid, "detail": detail}


async def _retention_loop(trail: Any, settings: Settings) -> None:
    import logging

    log = logging.getLogger("medmitra.ops.audit")
    while True:
        try:
            n = await audit_mod.prune(trail.key, settings.audit.retention_days,
                                      trail.head_path)
            if n:
                log.info("audit retention: %d row(s) older than %d day(s) removed", n,
                         settings.audit.retention_days)
        except Exception as exc:
            log.error("audit retention failed: %s", type(exc).__name__)
        await asyncio.sleep(86400)
