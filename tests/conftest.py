"""Shared fixtures: settings on a temp data dir, a real server on a loopback socket,
tokens for two users."""

from __future__ import annotations

import asyncio
import socket
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from medmitra.auth.jwt import issue_token
from medmitra.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
MODEL_PATH = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEST_SECRET = "test-secret-" + "x" * 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_settings(tmp_path: Path, **sections: dict[str, Any]) -> Settings:
    overrides: dict[str, dict[str, Any]] = {
        "storage": {"data_dir": str(tmp_path / "data"), "min_free_bytes": 0},
        "auth": {"jwt_secret": TEST_SECRET},
        "llm": {"model_path": str(MODEL_PATH), "workers": 0},
        "jobs": {"poll_s": 0.1, "heartbeat_s": 0.5, "lease_s": 5},
    }
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return load_settings(None, env={}, overrides=overrides)


@dataclass
class LiveServer:
    url: str
    app: Any
    settings: Settings
    loop: asyncio.AbstractEventLoop

    def client(self, token: str | None = None, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kw)

    def run(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the server's loop (e.g. an ORM query) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def _serve_in_thread(app: Any, port: int) -> tuple[threading.Thread, Callable[[], None], Any]:
    ready = threading.Event()
    state: dict[str, Any] = {}

    def target() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        state["loop"] = loop
        try:
            server = loop.run_until_complete(app.create_server(
                host="127.0.0.1", port=port, return_asyncio_server=True, access_log=False))
            loop.run_until_complete(server.startup())
            loop.run_until_complete(server.before_start())
            loop.run_until_complete(server.after_start())
            state["server"] = server
        except BaseException as exc:  # surface start-up failures to the test
            state["error"] = exc
            # Close what start-up opened, or every later test inherits tortoise's context.
            from medmitra.db.setup import close_db
            try:
                loop.run_until_complete(close_db())
            except Exception:
                pass
            ready.set()
            return
        ready.set()
        loop.run_forever()
        loop.run_until_complete(server.before_stop())
        server.close()
        loop.run_until_complete(server.wait_closed())
        for conn in list(getattr(server, "connections", ())):
            conn.close_if_idle()
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(server.after_stop())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    if not ready.wait(60):
        raise RuntimeError("server did not start in 60 s")
    if "error" in state:
        raise state["error"]

    def stop() -> None:
        state["loop"].call_soon_threadsafe(state["loop"].stop)
        thread.join(60)

    return thread, stop, state["loop"]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Factory: start_server(settings=None, **create_app kwargs) -> LiveServer."""
    from medmitra.app import create_app

    stops: list[Callable[[], None]] = []

    def start(settings: Settings | None = None, **kw: Any) -> LiveServer:
        settings = settings or make_settings(tmp_path)
        kw.setdefault("start_workers", settings.llm.workers > 0)
        app = create_app(settings, **kw)
        port = free_port()
        _, stop, loop = _serve_in_thread(app, port)
        stops.append(stop)
        return LiveServer(f"http://127.0.0.1:{port}", app, settings, loop)

    yield start
    for stop in reversed(stops):
        stop()


@pytest.fixture
def server(start_server: Callable[..., LiveServer]) -> LiveServer:
    return start_server()


@dataclass
class User:
    id: str
    token: str


def make_user(secret: str = TEST_SECRET, **kw: Any) -> User:
    uid = str(uuid.uuid4())
    return User(uid, issue_token(secret, user_id=uid, email=f"{uid[:8]}@clinic.test", **kw))


@pytest.fixture
def alice() -> User:
    return make_user()


@pytest.fixture
def bob() -> User:
    return make_user()


@pytest.fixture(scope="module")
def docs_server_url() -> Iterator[str]:
    """A real docs-only server on a free loopback port (python -m medmitra.api.docs)."""
    import re
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "medmitra.api.docs", "--host", "127.0.0.1", "--port", "0"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # printed once the socket is listening
            match = re.search(r"http://127\.0\.0\.1:\d+", line)
            if not match:
                log.seek(0)
                pytest.fail(f"docs server did not start: {line!r} {log.read()[-2000:]!r}")
            yield match.group(0)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            if proc.stdout:
                proc.stdout.close()
