"""The worker pool (medmitra/jobs/pool.py + runner.py) end to end against a real SQLite file,
the real extraction and stage code, and a scripted runtime (FakeRuntime) that can block
inside a stage, simulate compute, fail, and report which instance served which case."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from medmitra import filetypes
from medmitra.config import Settings
from medmitra.db.models import Case, CaseFile, Insight, Job
from medmitra.jobs import queue
from medmitra.jobs import pool as pool_mod
from medmitra.jobs.pool import WorkerPool
from good_answers import GoodFake
from medmitra.llm.runtime import FakeRuntime, LLMError, ModelUnavailable, Usage
from medmitra.pipeline import stages
from medmitra.pipeline.types import STAGES
from medmitra.storage import Storage
from tests.conftest import add_file, run_with_db, wait_until
from tests.conftest import new_case as sample_case

WAIT_S = 20.0
PATIENT = "Zebulon Quartermaine"
CSV_BYTES = b"test,value,unit,reference_range\nHemoglobin,10.1,g/dL,12-16\n"


@pytest.fixture(autouse=True)
def fast_icd(monkeypatch):
    # Building the ICD-10 search index takes seconds once per process; these tests are
    # about the pool, not codes (icd10 has its own tests).
    # Codes come from the shipped SQLite table (milliseconds); nothing to stub.
    return None


# --- scripted runtime ---------------------------------------------------------------------

class Gate:
    """Blocks the first model call of ``stage`` until ``release`` is set."""

    def __init__(self, stage: str):
        self.stage = stage
        self.entered = threading.Event()
        self.release = threading.Event()
        self._used = False
        self._lock = threading.Lock()

    def maybe_block(self, key: str) -> None:
        with self._lock:
            if key != self.stage or self._used:
                return
            self._used = True
        self.entered.set()
        assert self.release.wait(WAIT_S), "gate never released"


class StubRuntime(GoodFake):
    """FakeRuntime plus: a gate, simulated compute (time.sleep in the call), a failing or
    raising stage, a detector of concurrent use, and a log of (stage, case marker)."""

    def __init__(self, *, gate: Gate | None = None, compute_s: dict[str, float] | None = None,
                 bad_stage: str | None = None, raise_in: str | None = None):
        super().__init__()
        self.gate = gate
        self.compute_s = compute_s or {}
        self.bad_stage = bad_stage
        self.raise_in = raise_in
        self.served: list[tuple[str, str | None]] = []
        self.overlaps = 0
        # The runtime's stop flag as each call saw it: set (and not raised) while a job runs.
        self.stop_flags: list[bool | None] = []
        # Thread counts the pool set on it, and how many calls it had served by then.
        self.threads_set: list[tuple[int, int]] = []
        self._busy = 0
        self._lock = threading.Lock()

    def complete_json(self, messages, schema, **kw):
        with self._lock:
            self._busy += 1
            if self._busy > 1:
                self.overlaps += 1
        try:
            self.stop_flags.append(None if self.interrupt is None else self.interrupt())
            key = str(schema.get("title", ""))
            marker = re.search(r"marker-\d+", json.dumps(messages))
            self.served.append((key, marker.group(0) if marker else None))
            if self.gate is not None:
                self.gate.maybe_block(key)
            if key in self.compute_s:
                time.sleep(self.compute_s[key])      # simulated model compute
            if key == self.raise_in:
                raise RuntimeError(f"native failure for {PATIENT}")
            if key == self.bad_stage:
                self.calls.append({"key": key})
                return "Sorry, I cannot answer in JSON.", Usage(10, 8)
            return super().complete_json(messages, schema, **kw)
        finally:
            with self._lock:
                self._busy -= 1


    def set_threads(self, threads: int) -> None:
        self.threads_set.append((threads, len(self.served)))


class Factory:
    def __init__(self, **kw):
        self.kw = kw
        self.made: list[StubRuntime] = []

    def __call__(self) -> StubRuntime:
        rt = StubRuntime(**self.kw)
        self.made.append(rt)
        return rt


# --- harness ------------------------------------------------------------------------------

def make_settings(tmp_path: Path, *, workers: int | str = 1, threads: int = 1,
                  max_attempts: int = 3,
                  graceful_s: float = 10.0, poll_s: float = 0.05, heartbeat_s: float = 0.2,
                  stage_timeout_s: float = 300.0, model_path: str | None = None) -> Settings:
    s = Settings().replace("storage", data_dir=str(tmp_path))
    s = s.replace("jobs", max_attempts=max_attempts, lease_s=max(2.0, 2 * heartbeat_s),
                  heartbeat_s=heartbeat_s, poll_s=poll_s)
    s = s.replace("server", graceful_shutdown_s=graceful_s)
    llm = {"workers": workers, "threads": threads, "stage_timeout_s": stage_timeout_s}
    if model_path is not None:
        llm["model_path"] = model_path
    return s.replace("llm", **llm)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


async def new_case(storage: Storage, n: int, *, files: bool = True,
                   max_attempts: int = 3) -> tuple[Case, Job]:
    case = await sample_case(PATIENT, patient_age=52, patient_gender="male",
                             case_summary=f"marker-{n}: cough and fever for 3 days")
    if files:
        await add_file(storage, case, "lab", filetypes.CSV, "labs.csv", CSV_BYTES)
        await add_file(storage, case, "radiology", filetypes.PNG, "chest.png", _png())
    job = await queue.enqueue(case, {}, max_attempts=max_attempts)
    return case, job


async def job_state(job_id: int) -> str | None:
    job = await Job.get_or_none(id=job_id)
    return job.state if job else None


def state_is(job_id: int, state: str):
    async def check():
        return await job_state(job_id) == state
    return check


def stage_calls(rt: StubRuntime, stage: str, marker: str) -> int:
    return sum(1 for k, m in rt.served if k == stage and m == marker)


# --- tests --------------------------------------------------------------------------------

def test_job_runs_to_completed_and_writes_insights_and_files(tmp_path):
    factory = Factory()
    settings = make_settings(tmp_path)

    async def body(storage):
        case, job = await new_case(storage, 1)
        pool = WorkerPool(settings, storage, runtime_factory=factory)
        started = time.perf_counter()
        await pool.start()
        await wait_until(state_is(job.id, "completed"), "the job to complete")
        elapsed_s = time.perf_counter() - started
        status = pool.status()
        await pool.stop()

        assert (await Case.get(id=case.id)).status == "completed"
        [ins] = await Insight.filter(case_id=case.id)
        assert ins.job_id == job.id
        assert set(ins.data) >= {"case_summary", "soap_note", "primary_diagnosis",
                                 "differential_diagnoses", "investigation_recommendations",
                                 "treatment_recommendations", "overall_confidence_score"}
        assert ins.model["name"] == "fake-model" and ins.model["sha256"] == "0" * 64
        names = [s["stage"] for s in ins.stages]
        assert names[0] == "extract" and "soap_note" in names and "compile" in names
        for s in ins.stages:
            assert {"duration_s", "prompt_tokens", "completion_tokens"} <= set(s)
        soap = next(s for s in ins.stages if s["stage"] == "soap_note")
        assert soap["prompt_tokens"] > 0 and soap["completion_tokens"] > 0
        assert ins.generated_at is not None and ins.created_at == ins.generated_at

        files = {f.file_category: f for f in await CaseFile.filter(case_id=case.id)}
        assert "Hemoglobin" in files["lab"].text_data
        lab = json.loads(files["lab"].ai_summary)
        assert "lab_values" in lab and "summary" in lab
        rad = json.loads(files["radiology"].ai_summary)
        assert {"findings", "impressions", "summary", "confidence_score"} <= set(rad)

        analysis = await queue.analysis_status(case.id)
        assert analysis["state"] == "completed" and analysis["progress"] == 1.0
        assert analysis["attempts"] == 1 and analysis["error"] is None

        assert status["model"]["state"] == "ready" and status["model"]["name"] == "fake-model"
        assert status["ready"] is True
        [rt] = factory.made
        assert rt.closed                              # stop() closed the runtime
        assert stage_calls(rt, "case_summary", "marker-1") == 1
        assert rt.stop_flags and set(rt.stop_flags) == {False}   # set for every model call
        assert rt.interrupt is None                                # and cleared after the job
        assert pool.status()["workers"][0]["state"] == "stopped"
        return elapsed_s

    elapsed_s = run_with_db(settings, body, storage=True)
    assert elapsed_s < 5


def test_progress_is_visible_while_running(tmp_path):
    gate = Gate("soap_note")
    factory = Factory(gate=gate)
    settings = make_settings(tmp_path)

    async def body(storage):
        case, job = await new_case(storage, 1)
        pool = WorkerPool(settings, storage, runtime_factory=factory)
        await pool.start()
        try:
            await wait_until(gate.entered.is_set, "the soap_note call")

            async def at_soap():
                a = await queue.analysis_status(case.id)
                return a if a["stage"] == "soap_note" else None
            analysis = await wait_until(at_soap, "progress of soap_note in the job row")
            assert analysis["state"] == "running" and analysis["attempts"] == 1
            assert analysis["progress"] == pytest.approx(STAGES.index("soap_note") / len(STAGES),
                                                         abs=1e-3)
            assert (await Case.get(id=case.id)).status == "processing"
            [w] = pool.status()["workers"]
            assert (w["state"], w["job_id"], w["stage"]) == ("busy", job.id, "soap_note")
            gate.release.set()
            await wait_until(state_is(job.id, "completed"), "the job to complete")
        finally:
            gate.release.set()
            await pool.stop()
    run_with_db(settings, body, storage=True)


def test_two_workers_each_own_runtime_and_never_share_a_job(tmp_path):
    # Every call takes a little compute time, so both workers are busy at once.
    factory = Factory(compute_s={k: 0.01 for k in STAGES})
    settings = make_settings(tmp_path, workers=2)

    async def body(storage):
        jobs = [(await new_case(storage, n, files=(n % 2 == 0)))[1] for n in range(6)]
        pool = WorkerPool(settings, storage, runtime_factory=factory)
        await pool.start()
        try:
            for job in jobs:
                await wait_until(state_is(job.id, "completed"), f"job {job.id}")
        finally:
            await pool.stop()

        assert len(factory.made) == 2                       # one runtime per worker
        assert all(rt.overlaps == 0 for rt in factory.made)  # never two calls at once
        for n in range(6):
            marker = f"marker-{n}"
            owners = {id(rt) for rt in factory.made for _, m in rt.served if m == marker}
            assert len(owners) == 1, f"case {n} was served by {len(owners)} runtimes"
        used = {id(rt) for rt in factory.made if rt.served}
        assert len(used) == 2, "both workers should have run jobs"
        rows = await Job.filter(id__in=[j.id for j in jobs])
        assert all(r.attempts == 1 for r in rows)            # no job ran twice
        for job in jobs:
            assert await Insight.filter(case_id=job.case_id).count() == 1
    run_with_db(settings, body, storage=True)


def test_job_of_a_dead_worker_is_run_again(tmp_path):
    factory = Factory()
    settings = make_settings(tmp_path)

    async def body(storage):
        case, job = await new_case(storage, 1)
        # Another node claimed it and died: its lease lapses and nobody renews it.
        dead = await queue.claim("other-node:4242:deadbeef", 0.05)
        assert dead.id == job.id
        pool = WorkerPool(settings, storage, runtime_factory=factory)
        await pool.start()
        try:
            await wait_until(state_is(job.id, "completed"), "the job to be re-run")
        finally:
            await pool.stop()
        row = await Job.get(id=job.id)
        assert row.attempts == 2 and row.lease_owner is None
        assert [i.job_id for i in await Insight.filter(case_id=case.id)] == [job.id]
    run_with_db(settings, body, storage=True)


def test_case_deleted_while_queued_never_gets_insights(tmp_path):
    factory = Factory()
    settings = make_settings(tmp_path)

    async def body(storage):
        gone, gone_job = await new_case(storage, 1)
        kept, kept_job = await new_case(storage, 2)
        await Case.filter(id=gone.id).delete()
        pool = WorkerPool(settings, storage, runtime_factory=factory)
        await pool.start()
        try:
            # Jobs are claimed oldest first, so the deleted case's turn has passed.
            await wait_until(state_is(kept_job.id, "completed"), "the other job")
        finally:
            await pool.stop()
        assert [i.case_id for i in await Insight.all()] == [kept.id]
        assert await Job.get_or_none(id=gone_job.id) is None
        [rt] = factory.made
        assert all(m != "marker-1" for _, m in rt.served)    # never analysed
    run_with_db(settings, body, storage=True)


def test_case_deleted_while_running_stops_at_checkpoint_and_writes_nothing(tmp_path):
    gate = Gate("soap_note")
    factory = Factory(gate=gate)
    # A slow heartbeat: only cancel_case can flag the run in time.
    settings = make_settings(tmp_path, heartbeat_s=600)

    async def body(storage):
        case, job = await new_case(storage, 1)
        pool = WorkerPool(settings, storage, runtime_factory=factory)
        await pool.start()
        try:
            await wait_until(gate.entered.is_set, "the soap_note call")
            await Case.filter(id=case.id).delete()       # as DELETE /cases/cases/{id}
            pool.cancel_case(case.id)
            worker = pool._workers[0]
            await wait_until(lambda: worker.cancel is not None and worker.cancel.is_set(),
                             "the cancel flag")
            gate.release.set()
            await wait_until(lambda: pool.status()["workers"][0]["state"] == "idle",
                             "the worker to give up the job")
        finally:
            gate.release.set()
            await pool.stop()
        [rt] = factory.made
        assert stage_calls(rt, "soap_note", "marker-1") == 1
        assert stage_calls(rt, "diagnosis", "marker-1") == 0   # stopped at the checkpoint
        assert await Insight.all().count() == 0
        assert await Job.all().count() == 0
    run_with_db(settings, body, storage=True)


def test_superseded_run_writes_nothing_and_the_new_run_completes(tmp_path):
    gate = Gate("soap_note")
    factory = Factory(gate=gate)
    settings = make_settings(tmp_path)

    async def body(storage):
        case, old = await new_case(storage, 1)
        pool = WorkerPool(settings, storage, runtime_factory=factory)
        await pool.start()
        try:
            await wait_until(gate.entered.is_set, "the soap_note call")
            # Re-analysis: no cancel_case call here, the heartbeat must notice by itself.
            new = await queue.enqueue(case, {"include_treatment": False}, max_attempts=3)
            worker = pool._workers[0]
            await wait_until(lambda: worker.cancel is not None and worker.cancel.is_set(),
                             "the heartbeat to flag the superseded run")
            gate.release.set()
            await wait_until(state_is(new.id, "completed"), "the new run")
        finally:
            gate.release.set()
            await pool.stop()
        [ins] = await Insight.filter(case_id=case.id)
        assert ins.job_id == new.id
        assert ins.data["treatment_recommendations"] == []       # the new run's options
        assert await job_state(old.id) == "cancelled"
        [rt] = factory.made
        assert stage_calls(rt, "diagnosis", "marker-1") == 1      # the new run's only
        assert (await Case.get(id=case.id)).status == "completed"
    run_with_db(settings, body, storage=True)


def test_run_superseded_after_its_last_checkpoint_is_rolled_back(tmp_path):
    """The run finishes unaware (slow heartbeat, no cancel_case): finish() in the result
    transaction sees the job is no longer current, and the whole transaction rolls back."""
    gate = Gate("recommendations")
    factory = Factory(gate=gate)
    settings = make_settings(tmp_path, heartbeat_s=600)

    async def body(storage):
        case, old = await new_case(storage, 1)
        pool = WorkerPool(settings, storage, runtime_factory=factory)
        await pool.start()
        try:
            await wait_until(gate.entered.is_set, "the recommendations call")
            new = await queue.enqueue(case, {"include_differential": False}, max_attempts=3)
            gate.release.set()
            await wait_until(state_is(new.id, "completed"), "the new run")
        finally:
            gate.release.set()
            await pool.stop()
        [rt] = factory.made
        assert stage_calls(rt, "recommendations", "marker-1") == 2   # both runs got there
        [ins] = await Insight.filter(case_id=case.id)
        assert ins.job_id == new.id and ins.data["differential_diagnoses"] == []
        row = await Job.get(id=old.id)
        assert row.state == "cancelled" and row.finished_at is not None
    run_with_db(settings, body, storage=True)


def test_a_stage_that_always_answers_junk_is_abstained_and_the_case_completes(tmp_path):
    factory = Factory(bad_stage="diagnosis")
    settings = make_settings(tmp_path, max_attempts=2)

    async def body(storage):
        case, job = await new_case(storage, 1, max_attempts=2)
        pool = WorkerPool(settings, storage, runtime_factory=factory)
        await pool.start()
        try:
            await wait_until(state_is(job.id, "completed"), "the job to complete")
        finally:
            await pool.stop()
        row = await Job.get(id=job.id)
        assert row.attempts == 1 and row.error is None
        assert (await Case.get(id=case.id)).status == "completed"
        [insight] = await Insight.all()
        dx = insight.data["stages"]["diagnosis"]
        assert dx["status"] == "abstained" and dx["reason"].startswith(
            f"no acceptable answer after {stages.MAX_ATTEMPTS} attempt(s)")
        assert insight.data["primary_diagnosis"]["primary_diagnosis"] == "Not available."
        assert {s["stage"]: s["status"] for s in insight.stages}["diagnosis"] == "abstained"
        [rt] = factory.made
        assert stage_calls(rt, "diagnosis", "marker-1") == stages.MAX_ATTEMPTS
        assert stage_calls(rt, "differential", "marker-1") == 1   # the run went on
    run_with_db(settings, body, storage=True)


class BrokenRuntime(StubRuntime):
    """A runtime whose every call of one stage fails inside the backend."""

    def complete_json(self, messages, schema, **kw):
        if schema.get("title") == "diagnosis":
            self.calls.append({"key": "diagnosis"})
            raise LLMError("decode failed")
        return super().complete_json(messages, schema, **kw)


def test_a_runtime_failing_on_every_try_fails_the_case_but_keeps_the_extracted_text(tmp_path):
    settings = make_settings(tmp_path, max_attempts=2)
    made: list[BrokenRuntime] = []

    def factory():
        made.append(BrokenRuntime())
        return made[-1]

    async def body(storage):
        case, job = await new_case(storage, 1, max_attempts=2)
        pool = WorkerPool(settings, storage, runtime_factory=factory)
        await pool.start()
        try:
            await wait_until(state_is(job.id, "failed"), "the job to fail")
        finally:
            await pool.stop()
        row = await Job.get(id=job.id)
        assert row.attempts == 2
        assert row.error.startswith(f"diagnosis: no answer after {stages.MAX_ATTEMPTS} "
                                    "attempt(s): the model "
                                    "runtime failed: decode failed")
        assert row.error.endswith("(gave up after 2 attempts)")
        assert (await Case.get(id=case.id)).status == "failed"
        assert await Insight.all().count() == 0
        # The text read from the files is kept although the analysis failed.
        files = await CaseFile.filter(case_id=case.id)
        assert files and all(f.text_data for f in files if f.file_category == "lab")
        assert all(f.ai_summary is None for f in files)
    run_with_db(settings, body, storage=True)


def test_unexpected_exception_fails_the_attempt_without_leaking_patient_data(tmp_path,
                                                                              caplog):
    factory = Factory(raise_in="case_summary")
    settings = make_settings(tmp_path, max_attempts=1)
    caplog.set_level(logging.INFO)

    async def body(storage):
        case, job = await new_case(storage, 1, max_attempts=1)
        pool = WorkerPool(settings, storage, runtime_factory=factory)
        await pool.start()
        try:
            await wait_until(state_is(job.id, "failed"), "the job to fail")
        finally:
            await pool.stop()
        row = await Job.get(id=job.id)
        assert row.error == ("case_summary: internal error (RuntimeError) "
                             "(gave up after 1 attempts)")
        assert (await Case.get(id=case.id)).status == "failed"
    run_with_db(settings, body, storage=True)
    above_debug = [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG]
    assert any("RuntimeError" in m for m in above_debug)
    assert not any(PATIENT in m or "marker-1" in m for m in above_debug)


def test_a_stage_past_its_deadline_is_abstained_and_the_next_stage_runs(tmp_path):
    # Each try takes 1.1 s and is not acceptable: after the first, the deadline has passed.
    factory = Factory(compute_s={"soap_note": 1.1}, bad_stage="soap_note")
    settings = make_settings(tmp_path, max_attempts=1, stage_timeout_s=1.0)

    async def body(storage):
        case, job = await new_case(storage, 1, files=False, max_attempts=1)
        pool = WorkerPool(settings, storage, runtime_factory=factory)
        await pool.start()
        try:
            await wait_until(state_is(job.id, "completed"), "the job to complete")
        finally:
            await pool.stop()
        [insight] = await Insight.all()
        soap = insight.data["stages"]["soap_note"]
        assert soap["status"] == "abstained" and "took longer than 1 s" in soap["reason"]
        [rt] = factory.made
        assert stage_calls(rt, "soap_note", "marker-1") == 1
        # The next stage ran (its answer, no lab file to cite, is retried as unsupported).
        assert stage_calls(rt, "diagnosis", "marker-1") >= 1
    run_with_db(settings, body, storage=True)


def test_stop_requeues_a_running_job_and_a_new_pool_completes_it(tmp_path):
    gate = Gate("soap_note")
    first = Factory(gate=gate)
    second = Factory()
    settings = make_settings(tmp_path, graceful_s=0)

    async def body(storage):
        case, job = await new_case(storage, 1)
        pool = WorkerPool(settings, storage, runtime_factory=first)
        await pool.start()
        try:
            await wait_until(gate.entered.is_set, "the soap_note call")
            stopping = asyncio.create_task(pool.stop())

            async def released():
                row = await Job.get(id=job.id)
                return row.state == "queued" and row.lease_owner is None
            await wait_until(released, "stop() to give the job back")
        finally:
            gate.release.set()
        await asyncio.wait_for(stopping, WAIT_S)
        row = await Job.get(id=job.id)
        assert (row.state, row.lease_owner, row.lease_expires_at, row.attempts) == (
            "queued", None, None, 0)
        assert await Insight.all().count() == 0
        assert (await Case.get(id=case.id)).status == "processing"
        assert first.made[0].closed
        assert stage_calls(first.made[0], "diagnosis", "marker-1") == 0

        again = WorkerPool(settings, storage, runtime_factory=second)
        await again.start()
        try:
            await wait_until(state_is(job.id, "completed"), "the new pool to finish it")
        finally:
            await again.stop()
        assert [i.job_id for i in await Insight.filter(case_id=case.id)] == [job.id]
    run_with_db(settings, body, storage=True)


def test_stop_does_not_wait_forever_for_a_stuck_model_call(tmp_path, monkeypatch):
    monkeypatch.setattr(pool_mod, "CANCEL_WAIT_S", 0.2)
    gate = Gate("soap_note")
    factory = Factory(gate=gate)
    settings = make_settings(tmp_path, graceful_s=0)

    async def body(storage):
        case, job = await new_case(storage, 1)
        pool = WorkerPool(settings, storage, runtime_factory=factory)
        await pool.start()
        try:
            await wait_until(gate.entered.is_set, "the soap_note call")
            await asyncio.wait_for(pool.stop(), WAIT_S)     # the call is still blocked
            row = await Job.get(id=job.id)
            assert (row.state, row.lease_owner) == ("queued", None)
            assert pool.status()["workers"][0]["state"] == "stopped"
            [rt] = factory.made
            assert not rt.closed                  # never freed under a running call
        finally:
            gate.release.set()
        await wait_until(lambda: not pool._workers[0].thread_busy, "the call to return")
        assert await Insight.all().count() == 0
        assert await job_state(job.id) == "queued"
    run_with_db(settings, body, storage=True)


def test_stop_lets_a_running_job_finish_within_the_grace_period(tmp_path):
    gate = Gate("soap_note")
    factory = Factory(gate=gate)
    settings = make_settings(tmp_path, graceful_s=30)

    async def body(storage):
        case, job = await new_case(storage, 1)
        pool = WorkerPool(settings, storage, runtime_factory=factory)
        await pool.start()
        await wait_until(gate.entered.is_set, "the soap_note call")
        stopping = asyncio.create_task(pool.stop())
        await wait_until(lambda: pool._stopping.is_set(), "stop() to begin")
        gate.release.set()
        await asyncio.wait_for(stopping, WAIT_S)
        assert await job_state(job.id) == "completed"
        assert await Insight.filter(case_id=case.id).count() == 1
    run_with_db(settings, body, storage=True)


def test_event_loop_stays_responsive_while_a_job_computes(tmp_path):
    compute_s = 0.5
    factory = Factory(compute_s={"case_summary": compute_s, "soap_note": compute_s})
    settings = make_settings(tmp_path)

    async def body(storage):
        case, job = await new_case(storage, 1)
        pool = WorkerPool(settings, storage, runtime_factory=factory)
        lags: list[float] = []
        done = asyncio.Event()

        async def ticker():
            tick_s = 0.005
            while not done.is_set():
                t0 = time.perf_counter()
                await asyncio.sleep(tick_s)
                lags.append(time.perf_counter() - t0 - tick_s)

        tick = asyncio.create_task(ticker())
        started = time.perf_counter()
        await pool.start()
        try:
            await wait_until(state_is(job.id, "completed"), "the job to complete")
        finally:
            done.set()
            await tick
            await pool.stop()
        return time.perf_counter() - started, lags

    elapsed_s, lags = run_with_db(settings, body, storage=True)
    assert elapsed_s >= 2 * compute_s                # the compute really happened
    assert len(lags) > 50
    assert max(lags) < 0.2, f"event loop blocked for {max(lags):.3f} s"


def test_notify_wakes_an_idle_worker_before_its_poll(tmp_path):
    factory = Factory()
    settings = make_settings(tmp_path, poll_s=60)

    async def body(storage):
        pool = WorkerPool(settings, storage, runtime_factory=factory)
        await pool.start()
        try:
            await wait_until(lambda: pool.status()["ready"], "the model to load")
            # Let the worker's first (empty) claim happen, so it is asleep in its poll.
            await wait_until(lambda: pool._workers[0].idle_waits >= 1, "the worker to idle")
            case, job = await new_case(storage, 1)
            pool.notify()
            await wait_until(state_is(job.id, "completed"), "the job", timeout_s=10)
        finally:
            await pool.stop()
    run_with_db(settings, body, storage=True)


def test_stop_while_the_model_loads_returns_at_once_and_frees_the_model(tmp_path):
    loading, finish_loading = threading.Event(), threading.Event()
    made: list[StubRuntime] = []

    def slow_factory():
        loading.set()
        assert finish_loading.wait(WAIT_S)
        made.append(StubRuntime())
        return made[-1]

    settings = make_settings(tmp_path, graceful_s=30)

    async def body(storage):
        case, job = await new_case(storage, 1)
        pool = WorkerPool(settings, storage, runtime_factory=slow_factory)
        await pool.start()
        assert pool.status()["model"]["state"] == "loading"
        assert pool.status()["ready"] is False
        await wait_until(loading.is_set, "the load to begin")
        assert [w["state"] for w in pool.status()["workers"]] == ["loading"]
        started = time.perf_counter()
        await pool.stop()
        stop_s = time.perf_counter() - started
        finish_loading.set()
        await wait_until(lambda: made and made[0].closed, "the late runtime to be closed")
        assert await job_state(job.id) == "queued"
        return stop_s

    assert run_with_db(settings, body, storage=True) < 5          # not the 30 s grace period: no job to wait for


def test_missing_model_leaves_jobs_queued(tmp_path):
    settings = make_settings(tmp_path, workers=2,
                             model_path=str(tmp_path / "no-such-model.gguf"))

    async def body(storage):
        case, job = await new_case(storage, 1)
        pool = WorkerPool(settings, storage)               # the real loader
        await pool.start()
        try:
            await wait_until(lambda: pool.status()["model"]["state"] == "missing",
                             "the workers to find the model missing")
            status = pool.status()
        finally:
            await pool.stop()
        assert status["model"]["state"] == "missing"
        assert "no-such-model.gguf" in status["model"]["error"]
        assert status["model"]["path"].endswith("no-such-model.gguf")
        assert status["ready"] is False
        assert [w["state"] for w in pool.status()["workers"]] == ["stopped", "stopped"]
        row = await Job.get(id=job.id)
        assert (row.state, row.attempts) == ("queued", 0)
    run_with_db(settings, body, storage=True)


def test_failing_factory_reports_missing_and_error(tmp_path):
    def missing():
        raise ModelUnavailable("model file not found: /models/x.gguf")

    def broken():
        raise OSError("out of memory")

    settings = make_settings(tmp_path)

    async def body(storage):
        out = []
        for factory in (missing, broken):
            pool = WorkerPool(settings, storage, runtime_factory=factory)
            await pool.start()
            await wait_until(lambda: pool.status()["model"]["state"] in ("missing", "error"),
                             "the worker to report the model")
            out.append(pool.status()["model"])
            await pool.stop()
        return out

    missing_status, broken_status = run_with_db(settings, body, storage=True)
    assert (missing_status["state"], missing_status["error"]) == (
        "missing", "model file not found: /models/x.gguf")
    assert broken_status["state"] == "error" and "out of memory" in broken_status["error"]


def test_a_model_that_appears_later_is_picked_up_without_restart(tmp_path, monkeypatch):
    """The file is copied in (or the inference server comes up) after start: the workers
    look again, the model becomes ready and the waiting job runs."""
    from medmitra.jobs import pool as pool_mod

    monkeypatch.setattr(pool_mod, "MODEL_RETRY_S", 0.05)
    present = threading.Event()
    settings = make_settings(tmp_path)

    def factory():
        if not present.is_set():
            raise ModelUnavailable("model file not found: /models/late.gguf")
        return FakeRuntime()

    async def body(storage):
        case, job = await new_case(storage, 1)
        pool = WorkerPool(settings, storage, runtime_factory=factory)
        await pool.start()
        try:
            await wait_until(lambda: pool.status()["model"]["state"] == "missing",
                             "the model to be missing")
            assert await job_state(job.id) == "queued"
            present.set()
            await wait_until(lambda: pool.status()["model"]["state"] == "ready",
                             "the model to become ready")
            assert pool.status()["model"]["error"] is None
            await wait_until(state_is(job.id, "completed"), "the waiting job to complete")
        finally:
            await pool.stop()
    run_with_db(settings, body, storage=True)


def test_zero_workers_is_an_api_only_node(tmp_path):
    settings = make_settings(tmp_path, workers=0)
    called = []

    async def body(storage):
        case, job = await new_case(storage, 1)
        pool = WorkerPool(settings, storage, runtime_factory=lambda: called.append(1))
        await pool.start()
        status = pool.status()
        pool.notify()
        pool.cancel_case(case.id)
        await pool.stop()
        assert await job_state(job.id) == "queued"
        return status

    status = run_with_db(settings, body, storage=True)
    assert status == {"model": {"state": "disabled", "name": None,
                                "path": status["model"]["path"], "error": None},
                      "workers": [], "ready": True}
    assert called == []


def test_worker_threads_run_at_lower_priority_than_the_event_loop() -> None:
    """Inference threads inherit their worker's niceness: the API thread wins the CPU."""
    import os
    import sys
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from medmitra.jobs import pool as pool_mod

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread niceness is Linux-only")
    main_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with ThreadPoolExecutor(max_workers=1, initializer=pool_mod._lower_thread_priority) as ex:
        worker_nice = ex.submit(
            lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
        # A thread started from the worker (as llama.cpp's are) inherits it.
        child_nice = ex.submit(lambda: _nice_of_new_thread()).result()
    assert worker_nice == min(19, main_nice + pool_mod.WORKER_NICE)
    assert child_nice == worker_nice
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_nice


def _nice_of_new_thread() -> int:
    import os
    import threading

    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(
        os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
    t.start()
    t.join()
    return out[0]


def test_a_pool_with_workers_shortens_the_gil_switch_interval(tmp_path):
    """Worker threads run Python between native calls in every inference mode (the
    pipeline's own checks, with the model in a child process too); the event loop must get
    the GIL back within 1 ms, not Python's default 5 ms."""
    import sys

    settings = make_settings(tmp_path)
    assert settings.llm.inference == "process"      # the default design is covered
    before = sys.getswitchinterval()

    async def body(storage):
        pool = WorkerPool(settings, storage, runtime_factory=Factory())
        sys.setswitchinterval(0.005)
        await pool.start()
        try:
            assert sys.getswitchinterval() == pytest.approx(pool_mod.GIL_SWITCH_INTERVAL_S)
        finally:
            await pool.stop()

    try:
        run_with_db(settings, body, storage=True)
    finally:
        sys.setswitchinterval(before)


# --- llm.workers = "auto" -------------------------------------------------------------------

def _machine(monkeypatch, *, cores: int, available_mib: int | None) -> None:
    from medmitra.jobs import resources

    monkeypatch.setattr(resources, "usable_cores", lambda: cores)
    monkeypatch.setattr(resources, "available_memory_bytes",
                        lambda: None if available_mib is None else available_mib * 2**20)


def test_auto_adds_a_second_worker_when_there_is_room(tmp_path, monkeypatch, caplog):
    """2 cores and memory to spare: the first worker loads with both cores, is moved to
    one before it takes a job, and a second worker with one thread joins; the model is
    ready as soon as the first has loaded."""
    _machine(monkeypatch, cores=2, available_mib=8192)
    factory = Factory(compute_s={k: 0.01 for k in STAGES})
    settings = make_settings(tmp_path, workers="auto", threads=0)

    async def body(storage):
        jobs = [(await new_case(storage, n, files=False))[1] for n in range(4)]
        pool = WorkerPool(settings, storage, runtime_factory=factory)
        await pool.start()
        try:
            await wait_until(lambda: len(pool.status()["workers"]) == 2, "a second worker")
            for job in jobs:
                await wait_until(state_is(job.id, "completed"), f"job {job.id}")
            return pool.status(), [w.threads for w in pool._workers]
        finally:
            await pool.stop()

    with caplog.at_level(logging.INFO, logger="medmitra.jobs"):
        status, threads = run_with_db(settings, body, storage=True)
    assert status["model"]["state"] == "ready" and status["ready"] is True
    assert [w["name"] for w in status["workers"]] == ["worker-0", "worker-1"]
    assert threads == [1, 1]
    first, second = factory.made
    assert first.threads_set == [(1, 0)]       # moved to 1 thread before its first call
    assert second.threads_set == []            # the second was made with 1
    assert first.served and second.served      # both ran jobs
    assert "auto workers: 2, 1 thread(s) each" in caplog.text


@pytest.mark.parametrize("cores,available_mib,why", [
    (2, 300, "needs"),                 # below the reserve for OCR, uploads and the OS
    (1, 8192, "1 core"),
    (2, None, "cannot be measured"),
])
def test_auto_stays_at_one_worker_without_room(tmp_path, monkeypatch, caplog, cores,
                                               available_mib, why):
    _machine(monkeypatch, cores=cores, available_mib=available_mib)
    factory = Factory()
    settings = make_settings(tmp_path, workers="auto", threads=0)

    async def body(storage):
        _, job = await new_case(storage, 1, files=False)
        pool = WorkerPool(settings, storage, runtime_factory=factory)
        await pool.start()
        try:
            await wait_until(state_is(job.id, "completed"), "the job")
            return pool.status(), [w.threads for w in pool._workers]
        finally:
            await pool.stop()

    with caplog.at_level(logging.INFO, logger="medmitra.jobs"):
        status, threads = run_with_db(settings, body, storage=True)
    assert len(status["workers"]) == 1 and status["ready"] is True
    assert threads == [cores]                  # the one worker keeps every core
    [only] = factory.made
    assert only.threads_set == []
    assert "auto workers: 1" in caplog.text and why in caplog.text


def test_auto_second_worker_failing_to_load_leaves_the_first_working(tmp_path, monkeypatch):
    _machine(monkeypatch, cores=2, available_mib=8192)
    made: list[StubRuntime] = []

    def factory():
        if made:
            raise OSError("cannot allocate memory")
        made.append(StubRuntime())
        return made[-1]

    settings = make_settings(tmp_path, workers="auto", threads=0)

    async def body(storage):
        pool = WorkerPool(settings, storage, runtime_factory=factory)
        await pool.start()
        try:
            await wait_until(lambda: len(pool.status()["workers"]) == 2 and
                             pool.status()["workers"][1]["state"] == "stopped",
                             "the second worker to give up")
            _, job = await new_case(storage, 1, files=False)
            pool.notify()
            await wait_until(state_is(job.id, "completed"), "the job on the first worker")
            return pool.status()
        finally:
            await pool.stop()

    status = run_with_db(settings, body, storage=True)
    assert status["model"]["state"] == "ready" and status["model"]["error"] is None
    assert status["ready"] is True
    assert [w["state"] for w in status["workers"]] == ["idle", "stopped"]
    # The first gave up a core for the second, and got it back when the second failed.
    assert [n for n, _ in made[0].threads_set] == [1, 2]
