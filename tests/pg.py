"""A throwaway PostgreSQL server for the tests: initdb into a temp dir, start it on a free
loopback port with trust auth, hand out fresh databases, remove it all afterwards.

Uses the server binaries of the Debian ``postgresql`` package (or any ``pg_config`` on
PATH). PostgreSQL refuses to run as root, so as root the server runs as the ``postgres``
OS user. Whatever is missing (binaries, asyncpg, that user) skips the tests with the reason.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from tortoise.backends.base.executor import EXECUTOR_CACHE

START_TIMEOUT_S = 60
SUPERUSER = "postgres"


def find_bin_dir() -> Path | None:
    """The newest server binaries: Debian's /usr/lib/postgresql/N/bin, else pg_config's."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit()
                        else 0)
    for d in reversed(candidates):
        if (Path(d) / "initdb").is_file() and (Path(d) / "pg_ctl").is_file():
            return Path(d)
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        d = Path(out.stdout.strip())
        if out.returncode == 0 and (d / "initdb").is_file():
            return d
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """One postgres process on 127.0.0.1:<port> with its data in a private temp dir."""

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.port = 0
        self.root: Path | None = None
        self._user: str | None = None     # OS user that runs postgres (None = us)
        self._started = False

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam(SUPERUSER)
            except KeyError:
                raise RuntimeError("running as root and there is no 'postgres' OS user "
                                   "to run the server as") from None
            self._user = SUPERUSER
        # Under /tmp, not pytest's tmp dir: that one is 0700 root, which the postgres user
        # cannot enter. The short path also keeps the socket path under its length limit.
        self.root = Path(tempfile.mkdtemp(prefix="medmitra-pg-"))
        atexit.register(self.stop)
        if self._user is not None:
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        data = self.root / "data"
        self._run([str(self.bin_dir / "initdb"), "-D", str(data), "-A", "trust",
                   "-U", SUPERUSER, "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"])
        self.port = _free_port()
        # -F: no fsync (a test cluster need not survive power loss); -k: the unix socket
        # goes into our own dir, not /var/run/postgresql.
        opts = f"-p {self.port} -h 127.0.0.1 -k {self.root} -F -c max_connections=200"
        self._run([str(self.bin_dir / "pg_ctl"), "-D", str(data), "-l",
                   str(self.root / "server.log"), "-w", "-t", str(START_TIMEOUT_S),
                   "-o", opts, "start"])
        self._started = True

    def stop(self) -> None:
        if self.root is None:
            return
        if self._started:
            self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.root / "data"),
                       "-m", "immediate", "-w", "stop"], check=False)
            self._started = False
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def _run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(cmd, user=self._user, cwd=self.root, capture_output=True,
                             text=True, timeout=START_TIMEOUT_S + 30)
        if check and out.returncode != 0:
            log = ""
            if self.root is not None and (self.root / "server.log").is_file():
                log = (self.root / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{Path(cmd[0]).name} failed ({out.returncode}): "
                               f"{out.stderr.strip() or out.stdout.strip()} {log}".strip())
        return out

    # -- databases -----------------------------------------------------------------------

    def url(self, database: str) -> str:
        return f"postgres://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def psql(self, url: str, sql: str) -> None:
        """Run SQL in the database of ``url`` from a separate client (blocking)."""
        self._psql(sql, database=url.rsplit("/", 1)[1])

    def _psql(self, sql: str, database: str = "postgres") -> None:
        self._run([str(self.bin_dir / "psql"), "-h", "127.0.0.1", "-p", str(self.port),
                   "-U", SUPERUSER, "-d", database, "-v", "ON_ERROR_STOP=1", "-qc", sql])

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; returns its URL (the form MEDMITRA_DATABASE_URL takes)."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        self._psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        # WITH (FORCE): a connection the test left open must not keep the database alive.
        self._psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_or_skip() -> PgServer:
    try:
        import asyncpg  # noqa: F401  (tortoise's PostgreSQL driver)
    except ImportError:
        pytest.skip("asyncpg is not installed (pip install '.[postgres]')")
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql)")
    server = PgServer(bin_dir)
    try:
        server.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        server.stop()
        pytest.skip(f"could not start a throwaway PostgreSQL server: {exc}")
    return server


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server for one test module, removed (data and all) after it."""
    server = start_or_skip()
    # tortoise caches each model's INSERT statement per connection *name* ("default"), not
    # per dialect: after SQLite tests in the same process it would send SQLite's "?"
    # placeholders to PostgreSQL. One process only ever uses one database outside tests.
    EXECUTOR_CACHE.clear()
    try:
        yield server
    finally:
        EXECUTOR_CACHE.clear()
        server.stop()


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh empty database for one test, dropped after it."""
    url = pg_server.create_database()
    try:
        yield url
    finally:
        pg_server.drop_database(url)


def settings_kw(url: str) -> dict[str, Any]:
    """make_settings(tmp_path, **settings_kw(url)) -> settings on that database."""
    return {"database": {"url": url}}
