"""GET /metrics, request ids and JSON logs (issue 12 part 3), on a real server on loopback."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import docfactory as df
from conftest import (ROOT, TEST_SECRET, Served, free_port, make_settings, make_user,
                      wait_healthy)
from medmitra.llm.runtime import FakeRuntime
from medmitra.ops.logs import REQUEST_ID, JsonFormatter


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_scrape_has_every_family(start_app, tmp_path: Path) -> None:
    server = start_app(make_settings(tmp_path, llm={"workers": 1},
                                        jobs={"poll_s": 0.05}),
                          runtime_factory=FakeRuntime)
    user = make_user()
    with server.client(user.token) as c:
        r = c.post("/cases/create_case", data={"patient_name": "Metrics Patient",
                                               "patient_age": "50",
                                               "patient_gender": "female"},
                   files=[("lab_files", ("cbc.csv", df.lab_csv(), "text/csv"))])
        case = r.json()["case"]["case_id"]
        deadline = time.monotonic() + 60
        while c.get(f"/cases/cases/{case}").json()["case"]["status"] == "processing":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert c.get("/no/such/route").status_code == 404
    # The trail commits in batches (every flush_ms): let the first batch land before the
    # scrape that counts it.
    deadline = time.monotonic() + 10
    while server.app.ctx.audit.written < 3:
        assert time.monotonic() < deadline, "no audit batch written in 10 s"
        time.sleep(0.05)
    r = server.client().get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    s = _samples(r.text)
    route = "/cases/cases/<case_id:str>"
    assert s[("medmitra_http_requests_total",
              (("method", "GET"), ("route", route), ("status", "200")))] >= 1
    assert s[("medmitra_http_request_duration_seconds_count",
              (("method", "POST"), ("route", "/cases/create_case"), ("status", "201")))] == 1
    assert s[("medmitra_http_requests_total",
              (("method", "GET"), ("route", "<unmatched>"), ("status", "404")))] == 1
    assert not any("no/such" in str(k) for k in s)       # never the raw URL
    assert s[("medmitra_queue_jobs", (("state", "completed"),))] == 1
    assert s[("medmitra_queue_jobs", (("state", "queued"),))] == 0
    assert s[("medmitra_model_state", (("medmitra_model_state", "ready"),))] == 1
    assert s[("medmitra_workers", (("state", "idle"),))] == 1
    assert s[("medmitra_disk_free_bytes", ())] > 0
    assert s[("medmitra_database_size_bytes", ())] > 4096
    stages = {dict(k[1])["stage"] for k in s
              if k[0] == "medmitra_analysis_stage_duration_seconds_count"}
    assert {"extract", "summary"} <= stages or len(stages) >= 3, stages
    assert any(k[0] == "medmitra_llm_tokens_per_second" for k in s)
    assert s[("medmitra_audit_rows_written_total", ())] >= 3
    # Stages are counted once, not again at the next scrape.
    again = _samples(server.client().get("/metrics").text)
    key = next(k for k in s if k[0] == "medmitra_analysis_stage_duration_seconds_count")
    assert again[key] == s[key]


def test_metrics_refused_outside_allow_list(start_app, tmp_path: Path) -> None:
    server = start_app(make_settings(tmp_path, metrics={"allow_from": "10.1.2.0/24"}))
    r = server.client().get("/metrics")
    assert r.status_code == 403 and "allow_from" in r.json()["detail"]


def test_metrics_bearer_token(start_app, tmp_path: Path) -> None:
    server = start_app(make_settings(tmp_path, metrics={"bearer_token": "scrape-secret"}))
    assert server.client().get("/metrics").status_code == 401
    assert server.client().get("/metrics",
                     headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = server.client().get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
    assert r.status_code == 200 and "medmitra_http_requests_total" in r.text


def test_metrics_can_be_disabled(start_app, tmp_path: Path) -> None:
    server = start_app(make_settings(tmp_path, metrics={"enabled": False}))
    assert server.client().get("/metrics").status_code == 404


def test_request_id_is_echoed_or_made(server: Served) -> None:
    r = server.client().get("/", headers={"X-Request-Id": "abc-123.x"})
    assert r.headers["x-request-id"] == "abc-123.x"
    r = server.client().get("/", headers={"X-Request-Id": "bad id\twith spaces"})
    assert r.headers["x-request-id"] != "bad id\twith spaces"
    assert len(r.headers["x-request-id"]) == 32
    r1, r2 = server.client().get("/health"), server.client().get("/health")
    assert r1.headers["x-request-id"] != r2.headers["x-request-id"]
    r = server.client().get("/cases/all_cases")      # errors carry it too
    assert r.status_code == 401 and len(r.headers["x-request-id"]) == 32


def test_json_formatter_carries_the_request_id() -> None:
    rec = logging.LogRecord("medmitra.x", logging.WARNING, __file__, 1, "disk %s", ("low",),
                            None)
    token = REQUEST_ID.set("req-1")
    try:
        line = JsonFormatter().format(rec)
    finally:
        REQUEST_ID.reset(token)
    obj = json.loads(line)
    assert obj["message"] == "disk low" and obj["level"] == "WARNING"
    assert obj["request_id"] == "req-1" and obj["logger"] == "medmitra.x"
    assert "request_id" not in json.loads(JsonFormatter().format(rec))


@pytest.mark.e2e
def test_served_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "MEDMITRA_STORAGE_DATA_DIR": str(tmp_path / "data"),
           "MEDMITRA_SERVER_PORT": str(port), "MEDMITRA_LLM_WORKERS": "0",
           "MEDMITRA_AUTH_JWT_SECRET": TEST_SECRET, "MEDMITRA_LOG_FORMAT": "json",
           "MEDMITRA_SERVER_ACCESS_LOG": "true", "MEDMITRA_STORAGE_MIN_FREE_BYTES": "0"}
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "medmitra", "serve"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=log)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, proc, timeout_s=60)
            rid = httpx.get(url + "/", headers={"X-Request-Id": "trace-42"}).headers[
                "x-request-id"]
            assert rid == "trace-42"
            time.sleep(0.3)
        finally:
            proc.terminate()
            proc.wait(30)
    lines = [x for x in log_path.read_text().splitlines() if x.strip()]
    objs = [json.loads(x) for x in lines]                  # every line is one JSON object
    assert objs and all({"ts", "level", "logger", "message"} <= o.keys() for o in objs)
    assert any(o.get("request_id") == "trace-42" for o in objs), lines[-5:]


def test_request_series_are_prometheus_client_s_own() -> None:
    """Metrics.observe keeps plain counters and exports them at scrape time: the scrape
    is sample for sample what prometheus-client's Counter and Histogram give for the same
    requests (bucket edges included: "le" is less-or-equal). A client's made-up methods
    are all OTHER, so they cannot grow the series (or the scrape)."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from medmitra.ops.metrics import LATENCY_BUCKETS_S, Metrics

    m = Metrics(SimpleNamespace(ctx=SimpleNamespace()))
    ref = CollectorRegistry()
    labels = ["method", "route", "status"]
    counter = Counter("medmitra_http_requests", "HTTP requests", labels, registry=ref)
    hist = Histogram("medmitra_http_request_duration_seconds",
                     "HTTP request latency, from request to response", labels,
                     buckets=LATENCY_BUCKETS_S, registry=ref)
    requests = [(f"M{i}", "<unmatched>", 405, 0.001) for i in range(200)]
    requests += [("GET", "/health", 200, t) for t in (0.001, 0.002, 0.0025, 0.7, 31.0, 0.0)]
    requests += [("POST", "/cases/create_case", 201, 0.3)]
    for method, route, status, seconds in requests:
        m.observe(method, route, status, seconds)
        shown = method if method in ("GET", "POST") else "OTHER"
        counter.labels(shown, route, str(status)).inc()
        hist.labels(shown, route, str(status)).observe(seconds)

    def http(registry) -> dict:
        return {k: v for k, v in _samples(generate_latest(registry).decode()).items()
                if k[0].startswith("medmitra_http_")}

    ours = http(m.registry)
    assert ours == http(ref)
    assert ours[("medmitra_http_requests_total",
                 (("method", "OTHER"), ("route", "<unmatched>"), ("status", "405")))] == 200
    health = (("method", "GET"), ("route", "/health"), ("status", "200"))
    assert ours[("medmitra_http_request_duration_seconds_bucket",
                 (("le", "0.001"),) + health)] == 2        # 0.0 and 0.001, not 0.002
    assert ours[("medmitra_http_request_duration_seconds_bucket",
                 (("le", "+Inf"),) + health)] == 6
    assert {k[1][1:] for k in ours if k[0] == "medmitra_http_requests_total"} == {
        (("route", "<unmatched>"), ("status", "405")), (("route", "/health"), ("status", "200")),
        (("route", "/cases/create_case"), ("status", "201"))}