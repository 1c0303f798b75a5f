"""The durable job queue (medmitra/jobs/queue.py), each test on a real SQLite file and on a
throwaway PostgreSQL server (conftest's run_db): atomic claims (coroutines and separate
processes), leases, heartbeats, retries, supersession, status fields and recovery of jobs
left by dead processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from datetime import datetime

import pytest
from tortoise.transactions import in_transaction

from medmitra.db.models import Case, Job
from medmitra.jobs import queue
from tests.conftest import ROOT, new_case, queued_jobs

WAIT_S = 30.0


def ts(value: object) -> datetime:
    assert isinstance(value, str) and value.endswith("+00:00"), value
    return datetime.fromisoformat(value)


# --- claims -----------------------------------------------------------------------------

def test_concurrent_claims_never_share_a_job(run_db):
    async def body():
        jobs = await queued_jobs(5)
        owners = [queue.new_owner() for _ in range(20)]
        got = await asyncio.gather(*(queue.claim(o, 60) for o in owners))
        claimed = [(o, j.id) for o, j in zip(owners, got) if j is not None]
        ids = [jid for _, jid in claimed]
        assert sorted(ids) == sorted(j.id for j in jobs)      # each job once, none twice
        assert sum(j is None for j in got) == 15
        for owner, jid in claimed:
            row = await Job.get(id=jid)
            assert (row.state, row.lease_owner, row.attempts) == ("running", owner, 1)
            assert row.lease_expires_at > time.time() + 50
            assert row.started_at is not None and row.started_at.tzinfo is not None
        assert await queue.claim(queue.new_owner(), 60) is None
        assert await queue.queue_depth() == {"queued": 0, "running": 5}
    run_db(body)


def test_queue_depth_on_the_read_path_counts_what_the_orm_counts(run_db):
    """/health counts through db/reads.py's Reader (its own connection and cache): the same
    numbers as the ORM, and a commit in between is never answered from the cache."""
    from pathlib import Path

    from medmitra.db import reads

    async def body():
        reader = reads.Reader(Path(run_db.url.removeprefix("sqlite://"))
                              if run_db.dialect == "sqlite" else None)
        try:
            assert await queue.queue_depth(reader) == {"queued": 0, "running": 0}
            await queued_jobs(4)
            assert await queue.queue_depth(reader) == {"queued": 4, "running": 0}
            await queue.claim(queue.new_owner(), 60)
            want = await queue.queue_depth()
            assert want == {"queued": 3, "running": 1}
            assert await queue.queue_depth(reader) == want
            assert await queue.queue_depth(reader) == want      # a cached answer
        finally:
            reader.close()
    run_db(body)


CLAIMER = textwrap.dedent("""
    import asyncio, json, sys, time
    from pathlib import Path
    from medmitra.config import Settings
    from medmitra.db.setup import open_db, close_db
    from medmitra.jobs import queue

    async def main(url, go_file):
        await open_db(Settings().replace("database", url=url), migrate=False)
        await queue.queue_depth()              # connect before the start signal
        print("ready", flush=True)
        deadline = time.monotonic() + 30
        while not Path(go_file).exists():      # start together with the other process
            if time.monotonic() > deadline:
                raise SystemExit("no go signal")
            await asyncio.sleep(0.005)
        owner, got = queue.new_owner(), []
        while (job := await queue.claim(owner, 60)) is not None:
            got.append(job.id)
        await close_db()
        print(json.dumps(got), flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
""")


def test_claims_from_two_processes_never_share_a_job(run_db, tmp_path):
    """Two worker nodes (OS processes, each with its own connection) drain one queue."""
    n_jobs = 150

    async def setup():
        return [j.id for j in await queued_jobs(n_jobs)]
    ids = run_db(setup)

    go_file = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, run_db.url, str(go_file)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        go_file.touch()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=WAIT_S)
            assert p.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    together = results[0] + results[1]
    assert len(together) == len(set(together)) == n_jobs
    assert sorted(together) == sorted(ids)

    async def check():
        rows = await Job.all().values("state", "attempts")
        assert {(r["state"], r["attempts"]) for r in rows} == {("running", 1)}
    run_db(check)


def test_lapsed_lease_is_claimed_again_and_the_dead_owner_is_locked_out(run_db):
    async def body():
        [job] = await queued_jobs(1)
        dead = queue.new_owner()
        first = await queue.claim(dead, -1)        # a lease that has already lapsed
        assert first.id == job.id and first.attempts == 1
        alive = queue.new_owner()
        again = await queue.claim(alive, 60)
        assert again is not None and again.id == job.id
        assert (again.attempts, again.lease_owner) == (2, alive)
        assert again.started_at == first.started_at       # the first start is kept
        assert await queue.claim(queue.new_owner(), 60) is None
        # The dead worker can neither renew, report nor finish it any more.
        assert await queue.heartbeat(job.id, dead, 60) is False
        assert await queue.set_progress(job.id, dead, "soap_note", 0.5) is False
        assert await queue.finish(job.id, dead, state="completed") is False
        assert await queue.heartbeat(job.id, alive, 60) is True
        assert await queue.set_progress(job.id, alive, "soap_note", 0.5) is True
        status = await queue.analysis_status(job.case_id)
        assert (status["state"], status["stage"], status["progress"], status["attempts"]) == \
            ("running", "soap_note", 0.5, 2)
        assert status["queue_position"] is None
        assert ts(status["started_at"]) == first.started_at
    run_db(body)


def test_heartbeat_of_a_cancelled_or_deleted_job_is_false(run_db):
    async def body():
        [job] = await queued_jobs(1)
        owner = queue.new_owner()
        await queue.claim(owner, 60)
        assert await queue.heartbeat(job.id, owner, 60) is True
        assert await queue.still_ours(job.id, owner) is True
        case = await Case.get(id=job.case_id)
        newer = await queue.enqueue(case, {}, max_attempts=3)   # re-analysis supersedes
        assert await queue.heartbeat(job.id, owner, 60) is False
        assert await queue.still_ours(job.id, owner) is False
        assert await queue.set_progress(job.id, owner, "soap_note", 0.5) is False
        old = await Job.get(id=job.id)
        assert (old.state, old.lease_owner) == ("cancelled", None)
        assert (await Job.get(id=newer.id)).state == "queued"

        [job2] = await queued_jobs(1)
        owner2 = queue.new_owner()
        assert (await queue.claim(owner2, 60)).id == newer.id     # oldest first
        assert (await queue.claim(owner2, 60)).id == job2.id
        assert await queue.heartbeat(job2.id, owner2, 60) is True
        await Case.filter(id=job2.case_id).delete()               # cascades to its jobs
        assert await queue.heartbeat(job2.id, owner2, 60) is False
    run_db(body)


def test_fail_attempt_requeues_then_fails_with_reason(run_db):
    async def body():
        [job] = await queued_jobs(1, max_attempts=2)
        o1 = queue.new_owner()
        await queue.claim(o1, 60)
        assert await queue.fail_attempt(job.id, o1, "diagnosis: bad JSON") == "queued"
        row = await Job.get(id=job.id)
        assert (row.state, row.lease_owner, row.error) == ("queued", None,
                                                            "diagnosis: bad JSON")
        assert (await Case.get(id=job.case_id)).status == "processing"
        assert await queue.fail_attempt(job.id, o1, "again") is None   # no longer ours

        o2 = queue.new_owner()
        assert (await queue.claim(o2, 60)).attempts == 2
        assert await queue.fail_attempt(job.id, o2, "diagnosis: bad JSON") == "failed"
        row = await Job.get(id=job.id)
        assert row.state == "failed" and row.lease_owner is None
        assert row.error == "diagnosis: bad JSON (gave up after 2 attempts)"
        assert row.finished_at is not None
        assert (await Case.get(id=job.case_id)).status == "failed"
        status = await queue.analysis_status(job.case_id)
        assert status["state"] == "failed" and status["attempts"] == 2
        assert status["error"].startswith("diagnosis: bad JSON")
    run_db(body)


def test_finish_commits_and_rolls_back_with_the_callers_transaction(run_db):
    async def body():
        [job] = await queued_jobs(1)
        owner = queue.new_owner()
        await queue.claim(owner, 60)
        with pytest.raises(RuntimeError):
            async with in_transaction() as conn:
                assert await queue.finish(job.id, owner, state="completed", conn=conn)
                raise RuntimeError("insights could not be written")
        assert (await Job.get(id=job.id)).state == "running"
        assert (await Case.get(id=job.case_id)).status == "processing"
        # release gives it back without counting the attempt
        await queue.release(job.id, owner)
        row = await Job.get(id=job.id)
        assert (row.state, row.attempts, row.lease_owner) == ("queued", 0, None)

        owner = queue.new_owner()
        await queue.claim(owner, 60)
        async with in_transaction() as conn:
            assert await queue.finish(job.id, owner, state="completed", conn=conn) is True
        assert (await Case.get(id=job.case_id)).status == "completed"
        status = await queue.analysis_status(job.case_id)
        assert (status["state"], status["progress"], status["error"]) == ("completed", 1.0, None)
        assert ts(status["finished_at"]) >= ts(status["started_at"])
    run_db(body)


def test_enqueue_cancels_previous_runs_and_finish_of_superseded_job_is_false(run_db):
    async def body():
        case = await new_case()
        first = await queue.enqueue(case, {}, max_attempts=3)
        second = await queue.enqueue(case, {"include_treatment": False}, max_attempts=3)
        assert (await Job.get(id=first.id)).state == "cancelled"   # queued -> cancelled
        owner = queue.new_owner()
        claimed = await queue.claim(owner, 60)
        assert claimed.id == second.id and claimed.options == {"include_treatment": False}
        third = await queue.enqueue(case, {}, max_attempts=3)       # running -> cancelled
        row = await Job.get(id=second.id)
        assert row.state == "cancelled" and "superseded" in row.error
        assert await queue.finish(second.id, owner, state="completed") is False
        assert (await Case.get(id=case.id)).status == "processing"  # untouched
        assert [j.state for j in await Job.filter(case_id=case.id).order_by("id")] == [
            "cancelled", "cancelled", "queued"]
        o3 = queue.new_owner()
        assert (await queue.claim(o3, 60)).id == third.id
        assert await queue.finish(third.id, o3, state="completed") is True
        assert (await Case.get(id=case.id)).status == "completed"
    run_db(body)


def test_analysis_status_fields_and_queue_position(run_db):
    async def body():
        a, b, c = await queued_jobs(3)
        assert await queue.analysis_status(999999) is None
        sb = await queue.analysis_status(b.case_id)
        assert sb == {"state": "queued", "stage": None, "progress": 0.0, "queue_position": 2,
                      "error": None, "started_at": None, "finished_at": None, "attempts": 0}
        assert (await queue.analysis_status(c.case_id))["queue_position"] == 3
        owner = queue.new_owner()
        assert (await queue.claim(owner, 60)).id == a.id
        assert (await queue.analysis_status(b.case_id))["queue_position"] == 1
        assert await queue.set_progress(a.id, owner, "soap_note", 0.44444) is True
        sa = await queue.analysis_status(a.case_id)
        assert (sa["state"], sa["stage"], sa["progress"], sa["queue_position"]) == (
            "running", "soap_note", 0.4444, None)
        assert sa["started_at"] is not None and sa["finished_at"] is None
        assert sa["attempts"] == 1
        assert await queue.finish(a.id, owner, state="completed") is True
        sa = await queue.analysis_status(a.case_id)
        assert (sa["state"], sa["progress"], sa["error"]) == ("completed", 1.0, None)
        assert sa["finished_at"] is not None
        assert await queue.queue_depth() == {"queued": 2, "running": 0}
    run_db(body)


def test_recover_dead_local_owners_requeues_only_dead_pids(run_db):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                    # a pid that no longer runs

    async def body():
        j_dead, j_live, j_other_host = await queued_jobs(3)
        await queue.claim(f"{queue.HOST}:{dead.pid}:deadbeef", 3600)
        # The test runner's parent is alive; a job of another host is not ours to judge.
        await queue.claim(f"{queue.HOST}:{os.getppid()}:cafe0000", 3600)
        await queue.claim("some-other-host:1:00000000", 3600)
        assert await queue.recover_dead_local_owners() == 1
        rows = {j.id: j for j in await Job.all()}
        assert (rows[j_dead.id].state, rows[j_dead.id].lease_owner) == ("queued", None)
        assert rows[j_live.id].state == "running"
        assert rows[j_other_host.id].state == "running"
    run_db(body)
