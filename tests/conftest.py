"""Shared fixtures and helpers.

Two ways to serve the app to a test:

- in process (``server``, ``start_app``, ``serve_in_process``): the app behind Sanic's ASGI
  interface, driven by httpx's ASGI transport on an event loop of its own; listeners run
  through the ASGI lifespan, no socket is opened. Every API test that does not need the
  wire uses this.
- on a loopback socket (``start_server``, ``serve_on_socket``): Sanic's own HTTP server in
  a thread. Only for tests marked ``e2e`` (the fixture refuses others): protocol-level
  behaviour, or clients that need a URL (browsers, node, schemathesis).

Both hand the test a ``Served``: ``client(token)`` (a sync httpx client), ``run(awaitable)``
(an ORM query on the app's loop), ``url``, ``app`` and ``settings``. One app at a time:
tortoise's connection is process-global.

Also here: settings on a temp data dir, users with tokens, a database opened for a test body
(SQLite or a throwaway PostgreSQL), sample cases, and helpers for server processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import httpx
import pytest

from bench.load import free_port
from medmitra.auth.jwt import issue_token
from medmitra.config import Settings, load_settings
from tests.pg import pg_server, pg_url  # noqa: F401  (fixtures, for run_db's PostgreSQL)

ROOT = Path(__file__).resolve().parent.parent
MODEL_PATH = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEST_SECRET = "test-secret-" + "x" * 40
# pytest-timeout: pyproject's ``timeout`` holds for every test; slow ones (real model, server
# processes) get this instead unless they set their own @pytest.mark.timeout.
SLOW_TIMEOUT_S = 600
# Waits on the app's loop (a request, a query, start-up); far above any healthy duration.
LOOP_WAIT_S = 120.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


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


# -- serving the app ------------------------------------------------------------------------

class _LoopThread:
    """An event loop running in a daemon thread; ``call`` runs a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, aw: Awaitable[Any], timeout: float = LOOP_WAIT_S) -> Any:
        async def run() -> Any:
            return await aw
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_asyncgens()
        try:
            self.call(cancel_rest(), 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
            if not self._thread.is_alive():
                self.loop.close()


class _ASGIBridge(httpx.BaseTransport):
    """A sync httpx transport that hands each request to httpx's ASGI transport on the
    app's loop, so sync tests drive the app without a socket."""

    def __init__(self, app: Any, loop: _LoopThread) -> None:
        self._asgi = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
        self._loop = loop

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()    # a sync body (file, iterator) becomes bytes the async side can send

        async def call() -> tuple[int, httpx.Headers, bytes]:
            response = await self._asgi.handle_async_request(request)
            raw = b"".join([chunk async for chunk in response.stream])  # type: ignore
            return response.status_code, response.headers, raw
        status, headers, raw = self._loop.call(call())
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(raw),
                              request=request)


@dataclass
class Served:
    """The app as a test sees it, in process or on a socket."""

    url: str
    app: Any
    settings: Settings
    loop: asyncio.AbstractEventLoop
    _transport: Callable[[], httpx.BaseTransport] | None = None

    def client(self, token: str | None = None, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if self._transport is not None:
            kw["transport"] = self._transport()
        else:
            kw.setdefault("verify", False)   # plain HTTP: skipping the TLS set-up saves ~0.1 s
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kw)

    def run(self, aw: Awaitable[Any], timeout: float = 30) -> Any:
        """Await a coroutine or an ORM query (a QuerySet is awaitable) on the app's loop."""
        async def run() -> Any:
            return await aw
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)


async def _close_db_after_failed_start() -> None:
    # Close what start-up opened, or every later test inherits tortoise's connections.
    from medmitra.db.setup import close_db
    with contextlib.suppress(Exception):
        await close_db()


def _app(settings: Settings | None, app: Any, kw: dict[str, Any], tmp: Path | None) -> Any:
    from tortoise.backends.base.executor import EXECUTOR_CACHE

    # tortoise caches statements per connection name, not per dialect (see tests/pg.py).
    EXECUTOR_CACHE.clear()
    if app is not None:
        return app
    from medmitra.app import create_app
    if settings is None:
        assert tmp is not None
        settings = make_settings(tmp)
    kw.setdefault("start_workers", settings.llm.workers != 0)
    return create_app(settings, **kw)


@contextlib.contextmanager
def serve_in_process(settings: Settings | None = None, *, app: Any = None,
                     tmp_path: Path | None = None, **create_kw: Any) -> Iterator[Served]:
    """Serve ``app`` (or ``create_app(settings, **create_kw)``) through Sanic's ASGI
    interface: lifespan start-up (before/after_server_start listeners), requests through
    httpx's ASGI transport, lifespan shutdown on exit."""
    app = _app(settings, app, create_kw, tmp_path)
    loop = _LoopThread()
    inbox: asyncio.Queue[dict[str, Any]] | None = None
    outbox: asyncio.Queue[dict[str, Any]] | None = None
    lifespan: asyncio.Task | None = None

    async def start() -> None:
        nonlocal inbox, outbox, lifespan
        inbox, outbox = asyncio.Queue(), asyncio.Queue()
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
        lifespan = asyncio.create_task(app(scope, inbox.get, outbox.put))
        await inbox.put({"type": "lifespan.startup"})
        message = await outbox.get()
        if message["type"] != "lifespan.startup.complete":
            await _close_db_after_failed_start()
            raise RuntimeError(f"app start-up failed: {message.get('message')}")

    async def stop() -> None:
        assert inbox is not None and outbox is not None and lifespan is not None
        await inbox.put({"type": "lifespan.shutdown"})
        message = await outbox.get()
        await lifespan
        assert message["type"] == "lifespan.shutdown.complete", message

    try:
        loop.call(start())
        yield Served("http://medmitra.test", app, app.ctx.settings, loop.loop,
                     lambda: _ASGIBridge(app, loop))
        loop.call(stop())
    finally:
        loop.close()


@contextlib.contextmanager
def serve_on_socket(settings: Settings | None = None, *, app: Any = None,
                    tmp_path: Path | None = None, **create_kw: Any) -> Iterator[Served]:
    """Serve the app with Sanic's HTTP server on a free loopback port, in a thread."""
    app = _app(settings, app, create_kw, tmp_path)
    loop = _LoopThread()
    port = free_port()

    async def start() -> Any:
        server = await app.create_server(host="127.0.0.1", port=port,
                                         return_asyncio_server=True, access_log=False)
        try:
            await server.startup()
            await server.before_start()
            await server.after_start()
        except BaseException:
            await _close_db_after_failed_start()
            raise
        return server

    async def stop(server: Any) -> None:
        await server.before_stop()
        server.close()
        await server.wait_closed()
        for conn in list(getattr(server, "connections", ())):
            conn.close_if_idle()
        await server.after_stop()

    try:
        server = loop.call(start())
        yield Served(f"http://127.0.0.1:{port}", app, app.ctx.settings, loop.loop)
        loop.call(stop(server))
    finally:
        loop.close()


@pytest.fixture
def start_app(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """Factory: start_app(settings=None, **create_app kwargs) -> the app served in process."""
    with contextlib.ExitStack() as stack:
        yield lambda settings=None, **kw: stack.enter_context(
            serve_in_process(settings, tmp_path=tmp_path, **kw))


@pytest.fixture
def server(start_app: Callable[..., Served]) -> Served:
    """The app with default test settings, served in process."""
    return start_app()


@pytest.fixture
def start_server(request: pytest.FixtureRequest,
                 tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """Factory: start_server(settings=None, **create_app kwargs) -> the app on a loopback
    socket. For tests marked e2e only; the others use start_app."""
    if request.node.get_closest_marker("e2e") is None:
        pytest.fail("start_server opens a real socket: mark the test e2e or use start_app")
    with contextlib.ExitStack() as stack:
        yield lambda settings=None, **kw: stack.enter_context(
            serve_on_socket(settings, tmp_path=tmp_path, **kw))


def database_at_version(settings: Settings, version: int) -> None:
    """Create ``settings``' database with the migrations up to ``version`` only (an old
    install, for upgrade tests)."""
    from medmitra.db import setup as dbsetup

    kind = dbsetup.dialect(settings)
    upto = [m for m in dbsetup.available_migrations(kind) if m[0] <= version]

    async def build() -> None:
        await dbsetup.open_db(settings, migrate=False)
        orig = dbsetup.available_migrations
        dbsetup.available_migrations = lambda kind: upto  # type: ignore[assignment]
        try:
            await dbsetup.apply_migrations(settings)
        finally:
            dbsetup.available_migrations = orig  # type: ignore[assignment]
            await dbsetup.close_db()

    asyncio.run(build())


# -- users ----------------------------------------------------------------------------------

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


# -- the database without a server ----------------------------------------------------------

def run_with_db(settings: Settings, body: Callable[..., Awaitable[Any]],
                *, storage: bool = False) -> Any:
    """``asyncio.run(body())`` with the database of ``settings`` open (and migrated);
    with ``storage=True`` the body gets the opened Storage: ``body(storage)``."""
    from tortoise.backends.base.executor import EXECUTOR_CACHE

    from medmitra.db.setup import close_db, open_db
    from medmitra.storage import Storage

    # tortoise caches statements per connection name, not per dialect (see tests/pg.py).
    EXECUTOR_CACHE.clear()

    async def main() -> Any:
        await open_db(settings)
        try:
            if not storage:
                return await body()
            store = Storage(settings.data_path)
            store.open()
            return await body(store)
        finally:
            await close_db()
    return asyncio.run(main())


@pytest.fixture(params=["sqlite", "postgres"])
def run_db(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Any]:
    """run_db(fn): ``await fn()`` with a fresh migrated database open; parametrized over
    a SQLite file and a throwaway PostgreSQL server (tests/pg.py; skips without one).
    ``run_db.settings`` are its settings, ``run_db.url`` its database URL."""
    settings = make_settings(tmp_path)
    if request.param == "postgres":
        settings = settings.replace("database", url=request.getfixturevalue("pg_url"))

    def go(fn: Callable[[], Awaitable[Any]]) -> Any:
        return run_with_db(settings, fn)
    go.settings = settings              # type: ignore[attr-defined]
    go.url = settings.database_url      # type: ignore[attr-defined]
    go.dialect = request.param          # type: ignore[attr-defined]
    return go


async def new_case(name: str = "Test Patient", **fields: Any) -> Any:
    """A case row straight in the database (no files, no job)."""
    from medmitra.db.models import Case

    now = datetime.now(timezone.utc)
    row = {"case_id": str(uuid.uuid4()), "user_id": str(uuid.uuid4()), "patient_name": name,
           "patient_age": 40, "patient_gender": "female", "status": "processing",
           "created_at": now, "updated_at": now, **fields}
    return await Case.create(**row)


async def add_file(storage: Any, case: Any, category: str, mime: str, name: str,
                   data: bytes) -> Any:
    """A stored file of ``case``: the bytes in storage and its row."""
    from medmitra.db.models import CaseFile

    file_id = str(uuid.uuid4())
    path = storage.path_for(file_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return await CaseFile.create(file_id=file_id, case=case, user_id=case.user_id,
                                 file_name=name, file_type=mime, file_size=len(data),
                                 file_category=category, sha256="0" * 64,
                                 uploaded_at=datetime.now(timezone.utc))


async def wait_until(pred: Callable[[], Any], what: str, timeout_s: float = 30.0,
                     interval_s: float = 0.01) -> Any:
    """Poll ``pred()`` (sync or async) until it is truthy; return that value. A bounded
    wait on background work (worker pool, queue), failing with ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


async def queued_jobs(n: int, max_attempts: int = 3) -> list[Any]:
    """``n`` sample cases, each with one queued analysis job, oldest first."""
    from medmitra.jobs import queue

    return [await queue.enqueue(await new_case(), {"n": i}, max_attempts=max_attempts)
            for i in range(n)]


# -- server processes -----------------------------------------------------------------------

def spawn_server(data: Path, port: int, log: Path, *, cmd: list[str] | None = None,
                 **env: str) -> subprocess.Popen:
    """``medmitra serve`` (or ``cmd``) in its own process group, configured by environment
    only: the caller's MEDMITRA_* variables are dropped, then data dir, port and ``env``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("MEDMITRA_")}
    full.update({"MEDMITRA_STORAGE_DATA_DIR": str(data), "MEDMITRA_SERVER_PORT": str(port)})
    full.update(env)
    with log.open("ab") as out:   # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd or [sys.executable, "-m", "medmitra", "serve"], cwd=ROOT,
                                env=full, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_healthy(url: str, proc: subprocess.Popen | None = None, *, timeout_s: float = 180,
                 model: bool = False) -> dict[str, Any]:
    """Poll ``/health`` until it answers 200 (and, with ``model``, the model is ready);
    return that body. Fails early when ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited early with {proc.returncode}")
        try:
            r = httpx.get(f"{url}/health", timeout=2)
            if r.status_code == 200 and (not model or r.json()["model"]["state"] == "ready"):
                return r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.1)   # polling a process that is starting, not covering a race
    raise AssertionError(f"{url} did not become healthy in {timeout_s} s")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a spawn_server process group (no-op once it has exited) and reap it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def cli_token(data: Path, user_id: str) -> str:
    """An access token for ``user_id`` from ``medmitra token create`` on ``data``."""
    out = subprocess.run([sys.executable, "-m", "medmitra", "token", "create", "--user-id",
                          user_id, "--data-dir", str(data)], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


# -- the browser ----------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")          # Debian's package: Playwright downloads nothing
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--disable-quic"]
AXE = ROOT / "tests" / "js" / "node_modules" / "axe-core" / "axe.min.js"


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Headless Chromium driven by Playwright, closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


# -- other shared servers -------------------------------------------------------------------

@pytest.fixture(scope="module")
def docs_server_url() -> Iterator[str]:
    """A real docs-only server on a free loopback port (python -m medmitra.api.docs)."""
    import re
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
