"""The quiet signal router skips only built-in events that have no handler."""

from __future__ import annotations

from pathlib import Path

from conftest import make_settings, serve_in_process
from medmitra.app import create_app


def test_handlers_still_fire_and_unhandled_events_are_remembered(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path), start_workers=False)
    seen: list[str] = []

    @app.signal("http.lifecycle.response")
    async def on_response(request, response) -> None:
        seen.append(request.path)

    with serve_in_process(app=app) as server, server.client() as c:
        for _ in range(3):
            assert c.get("/").status_code == 200
    assert seen.count("/") == 3                        # a handled event is never skipped
    skipped = app.signal_router._no_handlers
    assert ("http.routing.before", None) in skipped    # an unhandled one is remembered
    assert not any(name == "http.lifecycle.response" for name, _ in skipped)


def test_serve_rewrites_its_request_path_once_listening(tmp_path: Path) -> None:
    """`medmitra serve` runs Sanic's TouchUp after it starts listening; before and after,
    every part of the request path still runs: routes, auth, errors, the response
    middlewares (X-Request-Id, no-store)."""
    import time

    import httpx

    from conftest import cli_token, free_port, kill_group, spawn_server, wait_healthy

    data, port, log = tmp_path / "data", free_port(), tmp_path / "server.log"
    proc = spawn_server(data, port, log, MEDMITRA_LLM_WORKERS="0")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        h = {"Authorization": f"Bearer {cli_token(data, '8d0c1f5e-6a43-4d0b-9a57-3c1f0e2b7a10')}"}

        def check() -> None:
            with httpx.Client(base_url=url, timeout=10) as c:
                r = c.get("/cases/all_cases", headers=h)
                assert r.status_code == 200 and r.json()["total"] == 0
                assert len(r.headers["x-request-id"]) == 32
                assert r.headers["cache-control"] == "no-store"
                assert c.get("/cases/all_cases").status_code == 401
                assert c.get("/no/such/route").status_code == 404
                assert c.get("/health").status_code == 200

        check()
        deadline = time.monotonic() + 30
        while "request path rewritten" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)   # waiting for the server's scheduled step, not covering a race
        assert "request path rewritten without unused signal dispatches" in log.read_text()
        for _ in range(3):
            check()
    finally:
        kill_group(proc)
    assert "not rewritten" not in log.read_text()
