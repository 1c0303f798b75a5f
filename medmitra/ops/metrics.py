"""``GET /metrics`` in the Prometheus text format, with prometheus-client.

Each app has its own registry (tests build many apps in one process). Label values are
bounded: the route *template* (never the URL), a known HTTP method or OTHER, the status
code, job and worker states. Names follow Prometheus' conventions:
medmitra_<noun>_<unit>[_total].

Analysis stage durations and generation speed come from the stored analyses
(``ai_insights.stages``): each scrape reads the rows finished since the last one, so the
numbers are those of the database this server writes, whatever worker wrote them.

Access: loopback only by default; ``metrics.allow_from`` opens it to scrape addresses or
networks, ``metrics.bearer_token`` additionally requires ``Authorization: Bearer <token>``.
The client address is the socket peer, never a forwarded header.
"""

from __future__ import annotations

import bisect
import hmac
import json
import shutil
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Enum, Gauge, Histogram,
    disable_created_metrics, generate_latest,
)
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                   HistogramMetricFamily)
from prometheus_client.utils import floatToGoString
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, raw

from medmitra.config import Settings
from medmitra.contract import JobState, ModelState, WorkerState
from medmitra.errors import Forbidden, NotFound, Unauthorized

METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                     30)
STAGE_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
# Label values: every state of the contract's enums, so a state with no member shows 0.
JOB_STATES = tuple(s.value for s in JobState)
WORKER_STATES = tuple(s.value for s in WorkerState)
MODEL_STATES = tuple(s.value for s in ModelState)
# Stored analyses read per scrape at most (the rest are read by the next scrape).
STAGE_ROWS_PER_SCRAPE = 500


class _LiveCollector:
    """Values read from the app's objects at scrape time (no copies to keep in sync)."""

    def __init__(self, app: Any):
        self.app = app

    def describe(self) -> list:
        return []

    def collect(self) -> Any:
        ctx = self.app.ctx
        trail = getattr(ctx, "audit", None)
        if trail is not None:
            g = GaugeMetricFamily("medmitra_audit_pending_rows",
                                  "Audit rows waiting to be committed")
            g.add_metric([], trail.pending)
            yield g
            c = CounterMetricFamily("medmitra_audit_rows_written",
                                    "Audit rows committed by this process")
            c.add_metric([], trail.written)
            yield c
            c = CounterMetricFamily("medmitra_audit_write_errors",
                                    "Failed audit batch writes (rows kept and retried)")
            c.add_metric([], trail.errors)
            yield c
        pool = getattr(ctx, "pool", None)
        workers = GaugeMetricFamily("medmitra_workers", "Analysis workers by state",
                                    labels=["state"])
        counts = dict.fromkeys(WORKER_STATES, 0)
        if pool is not None:
            for w in pool.status()["workers"]:
                counts[w["state"]] = counts.get(w["state"], 0) + 1
        for state, n in counts.items():
            workers.add_metric([state], n)
        yield workers
        last = getattr(ctx, "last_backup_at", None)
        if last is not None:
            g = GaugeMetricFamily("medmitra_backup_last_success_timestamp_seconds",
                                  "When the server's last scheduled backup finished")
            g.add_metric([], last)
            yield g


class _HttpCollector:
    """The per-request series, from ``Metrics.observe``'s counters, at scrape time."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self) -> list:
        return []

    def collect(self) -> Any:
        labels = ["method", "route", "status"]
        requests = CounterMetricFamily("medmitra_http_requests", "HTTP requests", labels=labels)
        latency = HistogramMetricFamily("medmitra_http_request_duration_seconds",
                                        "HTTP request latency, from request to response",
                                        labels=labels)
        bounds = [floatToGoString(b) for b in LATENCY_BUCKETS_S] + ["+Inf"]
        for (method, route, status), (count, total, buckets) in sorted(
                self.metrics._http.items()):
            values = [method, route, str(status)]
            requests.add_metric(values, count)
            cumulative, running = [], 0
            for le, n in zip(bounds, buckets):
                running += n
                cumulative.append((le, running))
            latency.add_metric(values, cumulative, total)
        yield requests
        yield latency


class Metrics:
    def __init__(self, app: Any):
        # No *_created series: they double every line of the scrape and say little here.
        disable_created_metrics()
        self.registry = r = CollectorRegistry()
        # The request counter and latency histogram are plain counters the event loop
        # updates (observe) and _HttpCollector exports: prometheus-client's own Counter
        # and Histogram take a lock per value and cost 3-4 us a request in the server
        # (timed inline); bench/api_bench.py: GET case CPU per request 101 -> 95 us.
        # (method, route template, status) -> [requests, seconds, per-bucket counts + +Inf]
        self._http: dict[tuple[str, str, int], list[Any]] = {}
        r.register(_HttpCollector(self))
        self.queue = Gauge("medmitra_queue_jobs", "Analysis jobs by state", ["state"],
                           registry=r)
        self.stage = Histogram("medmitra_analysis_stage_duration_seconds",
                               "Duration of finished analysis stages", ["stage"],
                               buckets=STAGE_BUCKETS_S, registry=r)
        self.tokens = Counter("medmitra_llm_completion_tokens",
                              "Tokens generated by the model in finished analyses",
                              ["stage"], registry=r)
        self.tokens_per_s = Gauge("medmitra_llm_tokens_per_second",
                                  "Generation speed of the newest finished stage "
                                  "(completion tokens / generation time)", ["stage"],
                                  registry=r)
        self.model = Enum("medmitra_model_state", "State of the analysis model",
                          states=list(MODEL_STATES), registry=r)
        self.disk_free = Gauge("medmitra_disk_free_bytes", "Free space on the data dir's disk",
                               registry=r)
        self.db_size = Gauge("medmitra_database_size_bytes",
                             "Database size (SQLite: file + WAL; PostgreSQL: "
                             "pg_database_size)", registry=r)
        r.register(_LiveCollector(app))
        self.last_insight_id = 0

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request. Event-loop thread only (the response middleware),
        as is the scrape that reads the counters, so no lock is needed. The keys are
        bounded: route templates, not paths."""
        m = method if method in METHODS else "OTHER"   # a client's made-up method: one key
        key = (m, route, status)
        entry = self._http.get(key)
        if entry is None:
            entry = self._http[key] = [0, 0.0, [0] * (len(LATENCY_BUCKETS_S) + 1)]
        entry[0] += 1
        entry[1] += seconds
        # Prometheus buckets are "less than or equal": the first bound >= seconds.
        entry[2][bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1

    async def start(self) -> None:
        """Stages finished before this start are not counted again."""
        from tortoise import connections

        rows = await connections.get("default").execute_query_dict(
            'SELECT MAX("id") AS m FROM "ai_insights"')
        self.last_insight_id = int(rows[0]["m"] or 0)

    async def refresh(self, app: Any) -> None:
        """Read the values that live in the database, the pool and the disk."""
        from tortoise import connections

        conn = connections.get("default")
        counts = dict.fromkeys(JOB_STATES, 0)
        for row in await conn.execute_query_dict(
                'SELECT "state", COUNT(*) AS n FROM "jobs" GROUP BY "state"'):
            counts[row["state"]] = int(row["n"])
        for state, n in counts.items():
            self.queue.labels(state).set(n)
        ph = "?" if conn.capabilities.dialect == "sqlite" else "$1"
        rows = await conn.execute_query_dict(
            f'SELECT "id", "stages" FROM "ai_insights" WHERE "id" > {ph} ORDER BY "id" '
            f"LIMIT {STAGE_ROWS_PER_SCRAPE}", [self.last_insight_id])
        for row in rows:
            self.last_insight_id = int(row["id"])
            stages = row["stages"]
            if isinstance(stages, (str, bytes)):
                stages = json.loads(stages)
            for st in stages if isinstance(stages, list) else []:
                self._observe_stage(st)
        settings: Settings = app.ctx.settings
        pool = getattr(app.ctx, "pool", None)
        state = pool.status()["model"]["state"] if pool is not None else ModelState.DISABLED
        self.model.state(state if state in MODEL_STATES else ModelState.ERROR)
        try:
            self.disk_free.set(shutil.disk_usage(settings.data_path).free)
        except OSError:
            pass
        if settings.is_sqlite:
            db = Path(settings.database_url.removeprefix("sqlite://"))
            self.db_size.set(sum(p.stat().st_size for p in
                                 (db, db.with_name(db.name + "-wal")) if p.exists()))
        else:
            rows = await conn.execute_query_dict(
                "SELECT pg_database_size(current_database()) AS n")
            self.db_size.set(int(rows[0]["n"]))

    def _observe_stage(self, st: Any) -> None:
        if not isinstance(st, dict) or not isinstance(st.get("stage"), str):
            return
        name = st["stage"][:32]
        duration = float(st.get("duration_s") or 0)
        self.stage.labels(name).observe(duration)
        tokens = int(st.get("completion_tokens") or 0)
        if tokens > 0:
            self.tokens.labels(name).inc(tokens)
            # The runtime's own generation time when it reports one; else the stage minus
            # prompt reading (which also counts the stage's checks as generation).
            gen_s = float(st.get("generate_s") or 0) or \
                duration - float(st.get("prompt_eval_s") or 0)
            if gen_s > 0:
                self.tokens_per_s.labels(name).set(round(tokens / gen_s, 3))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def allowed_networks(settings: Settings) -> list[Any]:
    return [ip_network(n.strip(), strict=False)
            for n in settings.metrics.allow_from.split(",") if n.strip()]


bp = Blueprint("ops_metrics")


@bp.get("/metrics")
async def metrics_route(request: Request) -> HTTPResponse:
    ctx = request.app.ctx
    metrics: Metrics | None = getattr(ctx, "metrics", None)
    if metrics is None:
        raise NotFound("Not found")
    settings: Settings = ctx.settings
    try:
        peer = ip_address(request.ip)
    except ValueError:
        peer = None
    if peer is None or not any(peer in net for net in ctx.metrics_networks):
        raise Forbidden("Metrics are served to the addresses in metrics.allow_from only")
    token = settings.metrics.bearer_token
    if token:
        scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 token.encode()):
            raise Unauthorized("Metrics need the bearer token of metrics.bearer_token")
    await metrics.refresh(request.app)
    return raw(metrics.render(), content_type=CONTENT_TYPE_LATEST)
