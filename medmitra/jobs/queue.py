"""The durable analysis queue: the only module that writes ``jobs`` rows.

States: queued -> running -> completed | failed, or cancelled (superseded by a newer run
or the case deleted). A worker claims a job with one atomic UPDATE, holds it by a lease
it renews (heartbeat), and finishes it in the same transaction that writes the insights
and the case status. A job whose lease lapses (its worker died) is claimed again.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import datetime, timezone
from typing import Any

from tortoise import connections
from tortoise.expressions import F
from tortoise.transactions import in_transaction

from medmitra.contract import JOB_ACTIVE_STATES, CaseStatus, JobState
from medmitra.db import reads
from medmitra.db.models import Case, Job

HOST = socket.gethostname()[:40]


def new_owner() -> str:
    """Lease owner id of one worker: host, pid and a nonce (pids are reused)."""
    return f"{HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _epoch() -> float:
    return _now().timestamp()


def _is_sqlite() -> bool:
    return connections.get("default").capabilities.dialect == "sqlite"


async def enqueue(case: Case, options: dict[str, Any], *, max_attempts: int,
                  conn: Any = None) -> Job:
    """Queue a fresh run for a case; any earlier unfinished run of it is cancelled."""
    now = _now()
    await Job.filter(case_id=case.id, state__in=JOB_ACTIVE_STATES).using_db(conn).update(
        state=JobState.CANCELLED, finished_at=now, updated_at=now, lease_owner=None,
        error="superseded by a newer analysis request")
    return await Job.create(case_id=case.id, state=JobState.QUEUED, options=options,
                            max_attempts=max_attempts, created_at=now, updated_at=now,
                            using_db=conn)


# Fair order (round-robin by owner): a job's turn is its rank among its owner's waiting
# jobs plus the number of its owner's jobs running now. One user's backlog of 300 then
# waits behind every other user's first job instead of in front of it. Ties: oldest first.
# ``{runnable}`` and ``{running}`` are the conditions for "waiting" and "running now".
_TURNS = ('SELECT j."id" AS "id", ROW_NUMBER() OVER (PARTITION BY c."user_id" ORDER BY j."id") '
          '+ COALESCE(b."n", 0) AS "turn" '
          'FROM "jobs" AS j JOIN "cases" AS c ON c."id" = j."case_id" '
          'LEFT JOIN (SELECT rc."user_id" AS "owner", COUNT(*) AS "n" FROM "jobs" AS r '
          'JOIN "cases" AS rc ON rc."id" = r."case_id" WHERE {running} '
          'GROUP BY rc."user_id") AS b ON b."owner" = c."user_id" '
          'WHERE {runnable}')
_QUEUED_TURNS = _TURNS.format(runnable=f'j."state" = \'{JobState.QUEUED}\'',
                              running=f'r."state" = \'{JobState.RUNNING}\'')
# Queued jobs ahead of job ``{job}`` (an SQL expression) in the fair order: its position - 1.
AHEAD_SQL = (f'(SELECT COUNT(*) FROM ({_QUEUED_TURNS}) AS q, ({_QUEUED_TURNS}) AS me '
             f'WHERE me."id" = {{job}} AND (q."turn" < me."turn" '
             f'OR (q."turn" = me."turn" AND q."id" < me."id")))')


class QueueFull(Exception):
    """The user already has the configured number of analyses waiting."""


async def check_user_backlog(case: Case, limit: int, conn: Any = None) -> None:
    """Refuse another queued analysis for ``case``'s owner once ``limit`` of theirs wait.
    A new run of a case that is already waiting replaces it, so it does not count."""
    waiting = await Job.filter(state=JobState.QUEUED, case__user_id=case.user_id).exclude(
        case_id=case.id).using_db(conn).count()
    if waiting >= limit:
        raise QueueFull(f"{waiting} analyses of this user are already waiting (limit {limit}); "
                        "try again when some have finished")


async def claim(owner: str, lease_s: float) -> Job | None:
    """Atomically take the next runnable job (queued, or running with a lapsed lease) in
    the fair order across owners (``_TURNS``)."""
    now = _now()
    epoch = now.timestamp()
    Q, R = JobState.QUEUED, JobState.RUNNING
    if _is_sqlite():
        turns = _TURNS.format(
            runnable=f'(j."state" = \'{Q}\' OR (j."state" = \'{R}\' '
                     'AND j."lease_expires_at" < ?))',
            running=f'r."state" = \'{R}\' AND r."lease_expires_at" >= ?')
        pick = f'SELECT k."id" FROM ({turns}) AS k ORDER BY k."turn", k."id" LIMIT 1'
        sql = (f'UPDATE "jobs" SET "state"=\'{R}\', "lease_owner"=?, "lease_expires_at"=?, '
               f'"attempts"="attempts"+1, "started_at"=COALESCE("started_at", ?), '
               f'"updated_at"=?, "stage"=NULL, "progress"=0 WHERE "id" = ({pick}) '
               f'RETURNING "id"')
        # Placeholders in text order: SET (4), then the running count, then runnable.
        params: list[Any] = [owner, epoch + lease_s, now.isoformat(), now.isoformat(),
                             epoch, epoch]
    else:
        turns = _TURNS.format(
            runnable=f'(j."state" = \'{Q}\' OR (j."state" = \'{R}\' '
                     'AND j."lease_expires_at" < $5))',
            running=f'r."state" = \'{R}\' AND r."lease_expires_at" >= $5')
        # The window function lives in a sub-select; only the jobs row taken is locked. The
        # state test is repeated on t: a row another claimer took meanwhile is re-checked
        # under READ COMMITTED once its lock is released, and must then no longer qualify.
        pick = (f'SELECT t."id" FROM "jobs" AS t JOIN ({turns}) AS k ON k."id" = t."id" '
                f'WHERE t."state" = \'{Q}\' OR (t."state" = \'{R}\' '
                f'AND t."lease_expires_at" < $5) '
                f'ORDER BY k."turn", k."id" LIMIT 1 FOR UPDATE OF t SKIP LOCKED')
        sql = (f'UPDATE "jobs" SET "state"=\'{R}\', "lease_owner"=$1, "lease_expires_at"=$2, '
               f'"attempts"="attempts"+1, "started_at"=COALESCE("started_at", $3), '
               f'"updated_at"=$4, "stage"=NULL, "progress"=0 WHERE "id" = ({pick}) '
               f'RETURNING "id"')
        params = [owner, epoch + lease_s, now, now, epoch]
    rows = await connections.get("default").execute_query_dict(sql, params)
    if not rows:
        return None
    return await Job.get_or_none(id=rows[0]["id"])


async def heartbeat(job_id: int, owner: str, lease_s: float) -> bool:
    """Renew the lease. False when the job is no longer ours (cancelled, deleted, taken)."""
    n = await Job.filter(id=job_id, lease_owner=owner, state=JobState.RUNNING).update(
        lease_expires_at=_epoch() + lease_s, updated_at=_now())
    return n == 1


async def set_progress(job_id: int, owner: str, stage: str, progress: float) -> bool:
    n = await Job.filter(id=job_id, lease_owner=owner, state=JobState.RUNNING).update(
        stage=stage, progress=max(0.0, min(1.0, progress)), updated_at=_now())
    return n == 1


async def still_ours(job_id: int, owner: str) -> bool:
    return await Job.filter(id=job_id, lease_owner=owner, state=JobState.RUNNING).exists()


async def _is_latest(job: Job, conn: Any) -> bool:
    newest = await Job.filter(case_id=job.case_id).using_db(conn).order_by("-id").first()
    return newest is not None and newest.id == job.id


async def finish(job_id: int, owner: str, *, state: JobState, error: str | None = None,
                 conn: Any = None) -> bool:
    """Mark a job completed/failed inside the caller's transaction and move the case
    status with it (only if this is the case's newest run). False if not ours."""
    now = _now()
    case_status = CaseStatus(state)   # a finished run's state names the case's status
    n = await Job.filter(id=job_id, lease_owner=owner,
                         state=JobState.RUNNING).using_db(conn).update(
        state=state, error=error, finished_at=now, updated_at=now, lease_owner=None,
        lease_expires_at=None, progress=1.0 if state == JobState.COMPLETED else 0.0)
    if n != 1:
        return False
    job = await Job.get(id=job_id, using_db=conn)
    if await _is_latest(job, conn):
        await Case.filter(id=job.case_id).using_db(conn).update(status=case_status,
                                                                 updated_at=now)
    return True


async def fail_attempt(job_id: int, owner: str, reason: str) -> JobState | None:
    """Record a failed attempt: re-queue it, or fail it for good after max_attempts.
    Returns the new state, or None if the job was no longer ours."""
    # Conditional UPDATEs first: each takes SQLite's write lock at once, instead of a read
    # that would have to upgrade to a write (which fails at once under contention).
    n = await Job.filter(id=job_id, lease_owner=owner, state=JobState.RUNNING,
                         attempts__lt=F("max_attempts")).update(
        state=JobState.QUEUED, error=reason, lease_owner=None, lease_expires_at=None,
        updated_at=_now())
    if n == 1:
        return JobState.QUEUED
    async with in_transaction() as conn:
        if not await finish(job_id, owner, state=JobState.FAILED, error=reason, conn=conn):
            return None
        job = await Job.get(id=job_id, using_db=conn)
        await Job.filter(id=job_id).using_db(conn).update(
            error=f"{reason} (gave up after {job.attempts} attempts)")
        return JobState.FAILED


async def release(job_id: int, owner: str) -> None:
    """Give a job back untouched (graceful shutdown): the attempt does not count."""
    await Job.filter(id=job_id, lease_owner=owner, state=JobState.RUNNING).update(
        state=JobState.QUEUED, lease_owner=None, lease_expires_at=None,
        attempts=F("attempts") - 1, stage=None, progress=0.0, updated_at=_now())


async def recover_dead_local_owners() -> int:
    """At start: jobs leased by a process of this host that no longer exists are re-queued
    at once instead of waiting for their lease to lapse."""
    rows = await Job.filter(state=JobState.RUNNING, lease_owner__startswith=f"{HOST}:").values(
        "id", "lease_owner")
    dead = []
    for row in rows:
        try:
            pid = int(row["lease_owner"].split(":")[1])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid() or not _pid_alive(pid):
            dead.append(row["id"])
    if dead:
        await Job.filter(id__in=dead, state=JobState.RUNNING).update(
            state=JobState.QUEUED, lease_owner=None, lease_expires_at=None, updated_at=_now())
    return len(dead)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


_DEPTH_SQL = ('SELECT "state", COUNT(*) FROM "jobs" WHERE "state" IN (?, ?) '
              'GROUP BY "state"')


async def queue_depth(reader: Any = None) -> dict[str, int]:
    """Jobs queued and running. With the server's read path (db/reads.py ``Reader``): one
    statement on its own connection, answered from its cache while nothing was written.
    Through tortoise instead, /health waited in the one connection's queue behind the
    analysis workers' writes (bench/calm_bench.py: its p99 while 2 analyses ran was 1.9-2.5x
    idle, GET case's 1.4-1.7x)."""
    if reader is None:
        queued = await Job.filter(state=JobState.QUEUED).count()
        running = await Job.filter(state=JobState.RUNNING).count()
        return {"queued": queued, "running": running}
    (rows,) = await reader.many([(_DEPTH_SQL, (JobState.QUEUED.value, JobState.RUNNING.value))],
                                tuples=True)
    counts = {state: int(n) for state, n in rows}
    return {"queued": counts.get(JobState.QUEUED.value, 0),
            "running": counts.get(JobState.RUNNING.value, 0)}


async def analysis_status(case_pk: int) -> dict[str, Any] | None:
    """The case's newest run as the API's ``analysis`` object (rendered by the same
    function as the plain-SQL read path, db/reads.py)."""
    job = await Job.filter(case_id=case_pk).order_by("-id").first()
    if job is None:
        return None
    ahead = 0
    if job.state == JobState.QUEUED:
        sql = f'SELECT {AHEAD_SQL.format(job=int(job.id))} AS "ahead"'
        rows = await connections.get("default").execute_query_dict(sql)
        ahead = int(rows[0]["ahead"])
    return reads.analysis_from_row({
        "state": job.state, "stage": job.stage, "progress": job.progress,
        "attempts": job.attempts, "error": job.error, "started_at": job.started_at,
        "finished_at": job.finished_at, "ahead": ahead})
