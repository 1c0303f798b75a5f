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
