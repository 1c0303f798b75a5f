"""The audit trail: who touched which patient record, when, from where, with what outcome.

Rows (table ``audit_log``, migration 0005; on SQLite in a file of its own,
``audit.sqlite3``: ops/audit_store.py) carry ids and route templates only: user id,
token kind and session id, action, method, route template (never the URL), case and file
ids, client address, HTTP status, request id. Never patient names or clinical text.

Tamper evidence: each row's ``hash`` is HMAC-SHA256(key, prev_hash + row fields), chaining
it to the row before; the key is ``<data_dir>/audit_key`` (0600, in backups), so someone who
can write the database but not read the key cannot forge a consistent chain. The newest
(id, hash) is also kept in ``<data_dir>/audit_head``, so rows cut off the end are noticed.
``verify_rows`` names each edited, deleted or inserted row.

Writes are batched: requests hand their row to one writer task, which inserts everything
waiting in one transaction (group commit). Durability (``audit.durability``):
- ``batch`` (default): the writer commits every ``audit.flush_ms`` (200 ms); a crash may
  lose the rows of requests answered in the last ``flush_ms`` before it;
- ``ack``: a response is sent only after its row is committed, so a crash never loses the
  row of an answered request; each request then waits for a commit (fsync), which costs
  read throughput (measured in bench/api_bench.py).
If the database cannot be written (disk full), requests are still answered; their rows stay
in memory and are retried.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import hmac
import io
import json
import logging
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import orjson

from medmitra import filemodes
from medmitra.atomicfile import write_atomic

log = logging.getLogger("medmitra.ops.audit")

KEY_FILE = "audit_key"
HEAD_FILE = "audit_head"
GENESIS = "0" * 64
# Hashed in this order; changing it invalidates every existing chain.
FIELDS = ("id", "ts", "user_id", "auth_kind", "session_id", "action", "method", "route",
          "case_ref", "file_ref", "client", "status", "request_id", "detail")
COLUMNS = FIELDS + ("prev_hash", "hash")
DURABILITY = ("ack", "batch")
# Key of the PostgreSQL advisory lock that serialises chain appends across nodes.
PG_AUDIT_LOCK_KEY = 0x6D6D617564697400
# Rows written per transaction at most; more wait for the next one.
MAX_BATCH = 2000
# Rows held in memory at most while the database cannot be written; older ones are dropped
# (and counted) beyond this.
MAX_PENDING = 100_000
RETRY_S = 1.0
# Rows chained per turn of the event loop. A row's HMAC costs ~11 us of Python on the loop;
# a 200 ms batch of a busy server (130 rows at 650 requests/s) chained in one go held the
# loop for 1.5 ms, and requests that arrived meanwhile waited.
HASH_SLICE = 16
# The head file is written by this one thread: off the event loop (creating and renaming it
# took 0.7 ms at every flush, and the slowest 1% of requests of an idle server were those
# that arrived meanwhile), and in commit order, since heads are queued as commits end. At
# exit the interpreter finishes what is queued.
_HEAD_WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medmitra-audit-head")
_PRUNED_RE = re.compile(r"pruned_through=(\d+)")


def load_or_create_key(data_dir: Path) -> bytes:
    """The HMAC key in ``data_dir/audit_key``, created once (0600, atomic)."""
    from medmitra.auth.keys import _read_secret, _write_new

    path = Path(data_dir) / KEY_FILE
    existing = _read_secret(path)
    if existing is None:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        _write_new(path, os.urandom(32).hex())   # False if another process won: read theirs
        existing = _read_secret(path)
    assert existing is not None
    return existing.encode("ascii")


_SECOND: tuple[int, str] = (-1, "")   # the current second and its text (one object: threads)


def utc_now_iso() -> str:
    """Now as ``datetime.now(timezone.utc).isoformat(timespec="microseconds")`` writes it
    (the rows' ``ts``; compared as text by ``list --since``), at half its cost: the date and
    time of day are formatted once per second."""
    global _SECOND
    t = time.time()
    sec = int(t)
    second = _SECOND
    if second[0] != sec:
        second = _SECOND = (sec, datetime.fromtimestamp(sec, timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%S"))
    return f"{second[1]}.{int((t - sec) * 1_000_000):06d}+00:00"


def _payload(values: list[Any]) -> bytes:
    """``json.dumps(values, separators=(",", ":"), ensure_ascii=True)`` as bytes (the hashed
    form; changing it invalidates every chain). orjson writes the same bytes ~25x faster
    when its output is ASCII without DEL (json escapes DEL, orjson does not); otherwise
    json writes it. tests/test_audit.py holds the two equal over random rows."""
    try:
        out = orjson.dumps(values)
    except TypeError:       # e.g. an int beyond 64 bits
        out = b"\x7f"
    if out.isascii() and b"\x7f" not in out:
        return out
    return json.dumps(values, separators=(",", ":"), ensure_ascii=True).encode("ascii")


# The keyed HMAC state of each key in use; a row's hash copies it (building a new HMAC
# object per row cost ~35 us, more than the rest of an audited request's trail work).
_KEYED: dict[bytes, Any] = {}


def row_hash(key: bytes, prev_hash: str, row: dict[str, Any]) -> str:
    base = _KEYED.get(key)
    if base is None:
        if len(_KEYED) > 16:
            _KEYED.clear()
        base = _KEYED[key] = hmac.new(key, digestmod=hashlib.sha256)
    h = base.copy()
    h.update(prev_hash.encode("ascii") + b"\n" + _payload([row.get(f) for f in FIELDS]))
    return h.hexdigest()


def _placeholders(dialect: str, n_cols: int, n_rows: int) -> str:
    if dialect == "sqlite":
        one = "(" + ", ".join("?" * n_cols) + ")"
        return ", ".join([one] * n_rows)
    groups = []
    for r in range(n_rows):
        groups.append("(" + ", ".join(f"${r * n_cols + c + 1}" for c in range(n_cols)) + ")")
    return ", ".join(groups)


INSERT_HEAD = 'INSERT INTO "audit_log" (' + ", ".join(f'"{c}"' for c in COLUMNS) + ") VALUES "


async def append_rows(rows: Sequence[dict[str, Any]], key: bytes,
                      head_path: Path | None = None) -> tuple[int, str]:
    """Chain and insert ``rows`` in one transaction; returns the new head (id, hash).
    Safe against other writers (other processes, other nodes): the head is read inside the
    transaction (PostgreSQL: under an advisory lock), and a clash on the id is retried."""
    from tortoise.exceptions import IntegrityError, OperationalError

    from medmitra.ops import audit_store

    conn = await audit_store.connection()
    dialect = conn.capabilities.dialect
    for attempt in range(10):
        try:
            async with conn._in_transaction() as tx:
                if dialect != "sqlite":
                    await tx.execute_query(f"SELECT pg_advisory_xact_lock({PG_AUDIT_LOCK_KEY})")
                last = await tx.execute_query_dict(
                    'SELECT "id", "hash" FROM "audit_log" ORDER BY "id" DESC LIMIT 1')
                next_id, prev = (int(last[0]["id"]) + 1, last[0]["hash"]) if last else \
                    (1, GENESIS)
                values: list[Any] = []
                for i, row in enumerate(rows):
                    if i and not i % HASH_SLICE:
                        await asyncio.sleep(0)   # let requests in between (HASH_SLICE)
                    full = {**row, "id": next_id}
                    h = row_hash(key, prev, full)
                    values += [full.get(c) for c in FIELDS] + [prev, h]
                    prev, next_id = h, next_id + 1
                await tx.execute_query(
                    INSERT_HEAD + _placeholders(dialect, len(COLUMNS), len(rows)), values)
            head = (next_id - 1, prev)
            if head_path is not None:
                # Queued, not awaited: after the commit there is no await at which a
                # cancelled flush would keep rows that are written queued for writing again.
                _HEAD_WRITER.submit(_write_head, head_path, head).add_done_callback(
                    _head_written)
            return head
        except (IntegrityError, OperationalError) as exc:
            # Another process appended meanwhile (id clash) or the database was busy.
            if attempt == 9:
                raise
            log.debug("audit append retried: %s", type(exc).__name__)
            await asyncio.sleep(0.01 * (attempt + 1))
    raise RuntimeError("unreachable")


def _head_written(fut: Any) -> None:
    exc = fut.exception()
    if exc is not None:   # the rows are committed; only the cut-off check lags behind
        log.warning("audit trail: the head file could not be written (%s)",
                    type(exc).__name__)


def wait_for_head() -> None:
    """Return once every head queued so far is in its file (for readers in this process)."""
    _HEAD_WRITER.submit(lambda: None).result()


def _write_head(path: Path, head: tuple[int, str]) -> None:
    # Not fsynced (durable=False): the database commit is the durable record, the head file
    # only lets verify notice rows cut off the end, and a head older than the rows after a
    # power cut is still a prefix of the chain.
    write_atomic(path, f"{head[0]} {head[1]}\n", mode=filemodes.FILE_MODE, durable=False)


def read_head(path: Path) -> tuple[int, str] | None:
    try:
        n, h = path.read_text(encoding="ascii").split()
        return int(n), h
    except (OSError, ValueError):
        return None


class AuditTrail:
    """The server's single chain writer (one per process), fed by ``record``."""

    def __init__(self, key: bytes, *, durability: str = "batch", flush_ms: int = 200,
                 head_path: Path | None = None):
        self.key = key
        self.durability = durability
        self.flush_s = flush_ms / 1000
        self.head_path = head_path
        self._pending: list[tuple[dict[str, Any], asyncio.Future | None]] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self.written = 0
        self.dropped = 0
        self.errors = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                              name="medmitra-audit-writer")

    def record(self, row: dict[str, Any]) -> asyncio.Future | None:
        """Queue one row; in ``ack`` mode returns a future done once it is committed."""
        fut = asyncio.get_running_loop().create_future() if self.durability == "ack" \
            and self._task is not None and not self._closing else None
        if len(self._pending) >= MAX_PENDING:
            _, old = self._pending.pop(0)
            self.dropped += 1
            if old is not None and not old.done():
                old.set_result(False)
        self._pending.append((row, fut))
        if self._wake is not None and (fut is not None or len(self._pending) >= MAX_BATCH):
            self._wake.set()
        return fut

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            if self.durability == "batch" and not self._closing:
                try:
                    await asyncio.wait_for(self._wake.wait(), self.flush_s)
                except asyncio.TimeoutError:
                    pass
            else:
                await self._wake.wait()
            self._wake.clear()
            while self._pending:
                if not await self._flush_once():
                    break
            if self._closing and not self._pending:
                return

    async def _flush_once(self, retry: bool = True) -> bool:
        batch = self._pending[:MAX_BATCH]
        try:
            await append_rows([r for r, _ in batch], self.key, self.head_path)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.errors += 1
            log.error("audit trail: %d row(s) could not be written (%s); kept in memory and "
                      "retried", len(batch), type(exc).__name__)
            # Answer the waiting requests anyway: availability first; the rows stay queued.
            for _, fut in batch:
                if fut is not None and not fut.done():
                    fut.set_result(False)
            if not retry:
                return False
            await asyncio.sleep(RETRY_S)
            if self._wake is not None:
                self._wake.set()
            return False
        del self._pending[:len(batch)]
        self.written += len(batch)
        for _, fut in batch:
            if fut is not None and not fut.done():
                fut.set_result(True)
        return True

    async def close(self) -> None:
        """Write what is queued, then stop the writer."""
        self._closing = True
        task = self._task
        if task is not None and not task.done():
            assert self._wake is not None
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(task), 10)
            except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        # The writer may have been cancelled by a shutdown that cancels every task: write
        # the rest here, still before the database closes.
        while self._pending:
            if not await self._flush_once(retry=False):
                log.error("audit trail: %d row(s) not written at shutdown", len(self._pending))
                return


# -- what a request becomes ----------------------------------------------------------------

# (method, route template) -> action. Routes not listed get an action from their method.
ACTIONS: dict[tuple[str, str], str | None] = {
    ("GET", "/cases/all_cases"): "list",
    ("GET", "/cases/files/<case_id:str>"): "list",
    ("GET", "/cases/cases/<case_id:str>/fhir"): "export",
    ("POST", "/cases/analyze/<case_id:str>"): "analyse",
    ("GET", "/files/download/<token:str>"): "download",
    ("POST", "/auth/v1/signup"): "sign-up",
    ("POST", "/auth/v1/logout"): "sign-out",
    ("GET", "/auth/v1/user"): "user-view",
    ("PUT", "/auth/v1/user"): "user-update",
    ("GET", "/auth/v1/authorize"): None,        # the sign-in page itself
    ("POST", "/auth/v1/authorize"): "sign-in",  # its form: 302 = signed in, 4xx = refused
}
BY_METHOD = {"GET": "view", "POST": "create", "PUT": "update", "PATCH": "update",
             "DELETE": "delete"}
# Routes that touch no patient or account data.
NOT_AUDITED = {"/", "/health", "/metrics", "/openapi.json", "/docs", "/redoc", "/app",
               "/auth/v1/settings", "/auth/v1/health", "/auth/v1/.well-known/jwks.json"}
# The web app's shell and assets carry no patient data (its data comes through the API).
NOT_AUDITED_PREFIXES = ("/static/", "/docs/", "/redoc/", "/app/")


def action_for(method: str, route: str | None, args: Any = None) -> str | None:
    """The audit action of a request, or None when the route is not audited. ``args`` (the
    query) is read only for the token route; it may be a callable that returns it, so other
    requests never parse their query string (Sanic parses it on first access)."""
    if route is None or method == "OPTIONS":
        return None      # no route matched (nothing was read), or a CORS preflight
    if method == "HEAD":
        method = "GET"
    if route in NOT_AUDITED or route.startswith(NOT_AUDITED_PREFIXES):
        return None
    if route == "/auth/v1/token":
        if callable(args):
            args = args()
        grant = args.get("grant_type") if args is not None else None
        return "token-refresh" if grant == "refresh_token" else "sign-in"
    if (method, route) in ACTIONS:
        return ACTIONS[(method, route)]
    return BY_METHOD.get(method, method.lower()[:32])


def refs_from_body(body: bytes) -> tuple[str | None, str | None, str | None]:
    """(case id, file ids, user id) named by a 2xx JSON body of a create/upload/sign-in.
    Only ids are taken; the body is not kept."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, None, None
    if not isinstance(data, dict):
        return None, None, None
    case = data.get("case") if isinstance(data.get("case"), dict) else None
    files = data.get("uploaded_files") or data.get("files") or []
    case_id = case.get("case_id") if case else None
    if not case_id and files and isinstance(files[0], dict):
        case_id = files[0].get("case_id")
    file_ids = ",".join(str(f.get("file_id")) for f in files
                        if isinstance(f, dict) and f.get("file_id")) or None
    user = data.get("user") if isinstance(data.get("user"), dict) else None
    return (str(case_id) if case_id else None, file_ids,
            str(user.get("id")) if user and user.get("id") else None)


# -- reading: verify, list, prune ----------------------------------------------------------


@dataclass
class VerifyReport:
    rows: int
    problems: list[str]
    first_id: int | None
    last_id: int | None


def verify_rows(rows: Iterable[dict[str, Any]], key: bytes,
                head: tuple[int, str] | None = None) -> VerifyReport:
    """Walk the chain in id order and name every row that breaks it."""
    problems: list[str] = []
    rows = list(rows)
    pruned_through = 0
    for r in rows:
        if r["action"] == "retention":
            m = _PRUNED_RE.search(r.get("detail") or "")
            if m and row_hash(key, r["prev_hash"], r) == r["hash"]:
                pruned_through = max(pruned_through, int(m.group(1)))
    head_id = head[0] if head is not None else None
    prev_id: int | None = None
    prev_hash: str | None = None
    for i, r in enumerate(rows):
        rid = int(r["id"])
        good = row_hash(key, r["prev_hash"], r) == r["hash"]
        if prev_id is None:
            if rid != 1 and rid != pruned_through + 1:
                problems.append(f"rows 1-{rid - 1} are missing (deleted; no retention row "
                                "records their removal)")
            elif rid == 1 and r["prev_hash"] != GENESIS:
                problems.append(f"row {rid}: does not start the chain (edited)")
        elif rid != prev_id + 1:
            problems.append(f"rows {prev_id + 1}-{rid - 1} are missing (deleted)"
                            if rid > prev_id + 2 else f"row {prev_id + 1} is missing (deleted)")
        elif r["prev_hash"] != prev_hash and good:
            problems.append(f"row {rid}: does not link to row {prev_id} (rows between them "
                            "were replaced)")
        if not good:
            nxt = rows[i + 1] if i + 1 < len(rows) else None
            if head_id is not None and rid > head_id:
                problems.append(f"row {rid}: inserted (after the last row the server wrote, "
                                "and its hash does not match)")
            elif nxt is not None and prev_hash is not None and nxt["prev_hash"] == prev_hash:
                problems.append(f"row {rid}: inserted (the next row links past it)")
                continue   # the chain goes on from the row before it
            else:
                problems.append(f"row {rid}: edited (its hash does not match its content)")
        prev_id, prev_hash = rid, r["hash"]
    if head is not None:
        hid, hhash = head
        if prev_id is None or prev_id < hid:
            problems.append(f"rows {(prev_id or 0) + 1}-{hid} are missing from the end "
                            f"(deleted; the head file records row {hid})")
        else:
            at = next((r for r in rows if int(r["id"]) == hid), None)
            if at is not None and at["hash"] != hhash:
                problems.append(f"row {hid}: differs from the head file's record (edited)")
    return VerifyReport(len(rows), problems, int(rows[0]["id"]) if rows else None, prev_id)


async def fetch_rows(where: str = "", params: Sequence[Any] = (),
                     limit: int | None = None) -> list[dict[str, Any]]:
    from medmitra.ops import audit_store

    conn = await audit_store.connection()
    sql = "SELECT " + ", ".join(f'"{c}"' for c in COLUMNS) + ' FROM "audit_log"'
    if where:
        if conn.capabilities.dialect != "sqlite":
            n = iter(range(1, 1000))
            where = re.sub(r"\?", lambda _: f"${next(n)}", where)
        sql += f" WHERE {where}"
    sql += ' ORDER BY "id"'
    if limit:
        sql += f" LIMIT {int(limit)}"
    return [dict(r) for r in await conn.execute_query_dict(sql, list(params))]


def parse_since(text: str) -> str:
    """An ISO date/time, or a relative '7d' / '12h' / '30m', as the UTC text stored in ts."""
    m = re.fullmatch(r"(\d+)([dhm])", text.strip())
    if m:
        unit = {"d": "days", "h": "hours", "m": "minutes"}[m.group(2)]
        dt = datetime.now(timezone.utc) - timedelta(**{unit: int(m.group(1))})
    else:
        dt = datetime.fromisoformat(text.strip())
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat(timespec="microseconds")


def list_filters(user: str | None, case: str | None, since: str | None,
                 until: str | None, action: str | None) -> tuple[str, list[Any]]:
    where, params = [], []
    if user:
        where.append('"user_id" = ?')
        params.append(user)
    if case:
        where.append('"case_ref" = ?')
        params.append(case)
    if since:
        where.append('"ts" >= ?')
        params.append(parse_since(since))
    if until:
        where.append('"ts" < ?')
        params.append(parse_since(until))
    if action:
        where.append('"action" = ?')
        params.append(action)
    return " AND ".join(where), params


OUT_FIELDS = FIELDS


def render(rows: Iterable[dict[str, Any]], fmt: str) -> Iterator[str]:
    if fmt == "jsonl":
        for r in rows:
            yield json.dumps({f: r.get(f) for f in OUT_FIELDS}, ensure_ascii=False) + "\n"
        return
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(OUT_FIELDS)
        yield buf.getvalue()
        for r in rows:
            buf.seek(0)
            buf.truncate()
            w.writerow([r.get(f) if r.get(f) is not None else "" for f in OUT_FIELDS])
            yield buf.getvalue()
        return
    for r in rows:
        yield (f"{r['id']:>8} {r['ts']} {r.get('user_id') or '-':36} {r['action']:12} "
               f"{r['status']} {r.get('route') or '-'} case={r.get('case_ref') or '-'} "
               f"client={r.get('client') or '-'}\n")


async def prune(key: bytes, retention_days: int, head_path: Path | None = None) -> int:
    """Delete rows older than ``retention_days`` and record it with a chained
    ``retention`` row naming the last id removed (verify accepts the gap it explains)."""
    from medmitra.ops import audit_store

    if retention_days <= 0:
        return 0
    cutoff = (datetime.now(timezone.utc) - timedelta(days=retention_days)).isoformat(
        timespec="microseconds")
    conn = await audit_store.connection()
    ph = "?" if conn.capabilities.dialect == "sqlite" else "$1"
    rows = await conn.execute_query_dict(
        f'SELECT MAX("id") AS m, COUNT(*) AS n FROM "audit_log" WHERE "ts" < {ph}', [cutoff])
    through, n = rows[0]["m"], int(rows[0]["n"] or 0)
    if not through:
        return 0
    # The record first: a crash between the two leaves the rows and a harmless note.
    await append_rows([{"ts": utc_now_iso(), "action": "retention", "status": 0,
                        "detail": f"pruned_through={int(through)} rows={n} "
                                  f"older_than_days={retention_days}"}], key, head_path)
    ph = "?" if conn.capabilities.dialect == "sqlite" else "$1"
    await conn.execute_query(f'DELETE FROM "audit_log" WHERE "id" <= {ph}', [int(through)])
    return n


async def record_cli_event(settings: Any, action: str, *, user_id: str | None = None,
                           case_ref: str | None = None, detail: str | None = None,
                           status: int = 0) -> None:
    """One row for an administration command run from the CLI (user, key, restore)."""
    if not settings.audit.enabled:
        return
    data = settings.data_path
    await append_rows([{"ts": utc_now_iso(), "action": action[:32], "user_id": user_id,
                        "case_ref": case_ref, "auth_kind": "cli", "client": "cli", "status": status,
                        "detail": (detail or "")[:256] or None}],
                      load_or_create_key(data), data / HEAD_FILE)


# (command, sub-command) of the account and key administration CLI -> audit action.
ADMIN_ACTIONS = {("users", "add"): "user-add", ("users", "disable"): "user-disable",
                 ("users", "enable"): "user-enable",
                 ("users", "reset-password"): "user-password-reset",
                 ("keys", "rotate"): "key-rotate"}


async def audited_admin(args: Any, settings: Any, command: Any) -> int:
    """Run an administration command (cli_auth.py) and record it: action, exit status
    (0 done, 1 refused, 2 usage) and the account it named. Listing is not recorded."""
    code = await command
    sub = getattr(args, "users_command", None) or getattr(args, "keys_command", None)
    action = ADMIN_ACTIONS.get((args.command, sub))
    if action is not None:
        email = getattr(args, "email", None)
        await record_cli_event(settings, action, status=code,
                               detail=f"account={email.strip().lower()}"[:256] if email
                               else None)
    return code


# -- command line ----------------------------------------------------------------------------


def register(sub: Any, common: Any) -> None:
    p = sub.add_parser("audit", help="the audit trail: verify, list, prune")
    common(p)
    asub = p.add_subparsers(dest="audit_command", required=True)
    v = asub.add_parser("verify", help="check the hash chain; names every broken row")
    common(v)
    v.set_defaults(handler=_cli_verify)
    ls = asub.add_parser("list", help="print audit rows (oldest first)")
    common(ls)
    ls.add_argument("--user", help="user id")
    ls.add_argument("--case", help="case id as in the request (UUID or number)")
    ls.add_argument("--since", help="ISO date/time, or relative: 7d, 12h, 30m")
    ls.add_argument("--until", help="ISO date/time, or relative: 7d, 12h, 30m")
    ls.add_argument("--action", help="list, view, download, create, update, delete, "
                                     "analyse, export, sign-in, ...")
    ls.add_argument("--format", choices=("text", "jsonl", "csv"), default="text")
    ls.add_argument("--limit", type=int)
    ls.set_defaults(handler=_cli_list)
    pr = asub.add_parser("prune", help="delete rows older than audit.retention_days")
    common(pr)
    pr.add_argument("--days", type=int, help="instead of audit.retention_days")
    pr.set_defaults(handler=_cli_prune)


def _run_db(settings: Any, coro_fn: Any) -> Any:
    from medmitra.ops.db import ops_db

    async def run() -> Any:
        async with ops_db(settings):
            return await coro_fn()

    return asyncio.run(run())


def _cli_verify(args: Any, settings: Any) -> int:
    data = settings.data_path
    if not (data / KEY_FILE).is_file():
        print(f"medmitra: no audit key in {data} (no trail has been written there)",
              file=sys.stderr)
        return 1
    key = load_or_create_key(data)
    t0 = time.perf_counter()
    report = _run_db(settings, lambda: fetch_rows())
    wait_for_head()
    result = verify_rows(report, key, read_head(data / HEAD_FILE))
    for p in result.problems:
        print(f"problem: {p}")
    if result.problems:
        print(f"audit trail BROKEN: {len(result.problems)} problem(s) in {result.rows} rows",
              file=sys.stderr)
        return 1
    span = f" (ids {result.first_id}-{result.last_id})" if result.rows else ""
    print(f"audit trail ok: {result.rows} rows{span}, checked in "
          f"{time.perf_counter() - t0:.2f} s")
    return 0


def _cli_list(args: Any, settings: Any) -> int:
    try:
        where, params = list_filters(args.user, args.case, args.since, args.until, args.action)
    except ValueError as exc:
        print(f"medmitra: --since/--until: {exc}", file=sys.stderr)
        return 2
    rows = _run_db(settings, lambda: fetch_rows(where, params, args.limit))
    out = sys.stdout
    for line in render(rows, args.format):
        out.write(line)
    return 0


def _cli_prune(args: Any, settings: Any) -> int:
    days = args.days if args.days is not None else settings.audit.retention_days
    if days <= 0:
        print("audit.retention_days is 0 (keep forever): nothing pruned")
        return 0
    data = settings.data_path
    key = load_or_create_key(data)
    n = _run_db(settings, lambda: prune(key, days, data / HEAD_FILE))
    print(f"pruned {n} audit row(s) older than {days} day(s)")
    return 0
