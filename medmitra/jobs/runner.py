"""Run one claimed job: case rows -> extract -> LLM stages -> one insights transaction.

The database work happens on the event loop; the blocking work (file extraction, model
calls) runs in the worker's own thread, so the API stays responsive while a model
computes. The thread talks back only through two thread-safe channels: progress updates
(forwarded to ``queue.set_progress`` in order by a small pump task) and ``should_stop``
(the job's cancel flag or the current stage's deadline).

Outcome of ``run_job`` (never raises for a failed analysis; only for cancellation of the
asyncio task itself):
  "completed"  insights written, case completed, in one transaction
  "queued"     the attempt failed and the job was re-queued for another try
  "failed"     the attempt failed and the job gave up (case failed, reason stored)
  "cancelled"  cancelled (case deleted / superseded / shutdown): nothing written
  "lost"       the job was no longer ours when we tried to record its result
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

from tortoise.transactions import in_transaction

from medmitra import textsafe
from medmitra.config import LLMSettings
from medmitra.contract import JobState
from medmitra.db.models import Case, CaseFile, Insight, Job
from medmitra.jobs import queue
from medmitra.llm.runtime import LLMError, LLMRuntime
from medmitra.pipeline.extract import extract_file
from medmitra.pipeline.stages import run_analysis
from medmitra.pipeline.types import (STAGES, AnalysisOptions, AnalysisResult, CaseInput, Cancelled,
                                     ExtractedFile, StageError)
from medmitra.storage import Storage

log = logging.getLogger("medmitra.jobs")

# Stored reasons are shown to the user in ``analysis.error``; keep them readable.
REASON_MAX_CHARS = 1000
# How long to wait for queued progress writes when a job ends; they are advisory.
PROGRESS_DRAIN_S = 5.0
# How long extraction waits for a file's text to be written before going on without it.
TEXT_SAVE_S = 10.0
EXTRACT_STAGE = "extract"

_OPTION_FIELDS = {f.name for f in dataclasses.fields(AnalysisOptions)}


class _NotOurs(Exception):
    """Raised inside the result transaction to roll it back: the job was cancelled,
    superseded or its case deleted while it ran."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def options_from(raw: Any) -> AnalysisOptions:
    """AnalysisOptions from a job's stored options; unknown keys are ignored."""
    if not isinstance(raw, dict):
        return AnalysisOptions()
    return AnalysisOptions(**{k: v for k, v in raw.items() if k in _OPTION_FIELDS})


class StageClock:
    """The deadline of the stage running now; restarted whenever the stage changes."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self.stage = EXTRACT_STAGE
        self._started = time.monotonic()

    def enter(self, stage: str) -> None:
        with self._lock:
            if stage != self.stage:
                self.stage = stage
                self._started = time.monotonic()

    def expired(self) -> bool:
        with self._lock:
            return time.monotonic() - self._started > self.timeout_s


class ProgressPump:
    """Forwards progress from the worker thread to the job row, in order, on the loop.

    One pump task per job writes updates sequentially (a burst is coalesced to its
    newest value), so a late, stale update can never overwrite a newer one.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, job_id: int, owner: str,
                 on_stage: Callable[[str], None] | None):
        self._loop = loop
        self._job_id = job_id
        self._owner = owner
        self._on_stage = on_stage
        self._q: asyncio.Queue[tuple[str, float] | None] = asyncio.Queue()
        self._task = loop.create_task(self._run(), name=f"medmitra-progress-{job_id}")

    def push(self, stage: str, fraction: float) -> None:
        """Called from the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._q.put_nowait, (stage, fraction))
        except RuntimeError:  # loop closed during shutdown: progress no longer matters
            pass

    async def _run(self) -> None:
        while True:
            item = await self._q.get()
            while item is not None and not self._q.empty():
                nxt = self._q.get_nowait()
                if nxt is None:
                    await self._write(item)
                    return
                item = nxt
            if item is None:
                return
            await self._write(item)

    async def _write(self, item: tuple[str, float]) -> None:
        stage, fraction = item
        if self._on_stage is not None:
            self._on_stage(stage)
        try:
            await queue.set_progress(self._job_id, self._owner, stage, float(fraction))
        except Exception as exc:  # advisory only; the heartbeat notices a lost job
            log.debug("job %d: progress not saved: %r", self._job_id, exc)

    def abort(self) -> None:
        self._task.cancel()

    async def close(self) -> None:
        self._q.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._task), PROGRESS_DRAIN_S)
        except TimeoutError:
            self._task.cancel()


def _extract_all(storage: Storage, files: list[dict[str, Any]], report: Callable[[str, float],
                 None], should_stop: Callable[[], bool],
                 on_file: Callable[[ExtractedFile], None] = lambda f: None,
                 extract: Callable[..., ExtractedFile] = extract_file
                 ) -> list[ExtractedFile]:
    out = []
    for i, f in enumerate(files):
        if should_stop():
            raise Cancelled()
        # Overall progress, like the later stages: extract is the first of STAGES.
        report(EXTRACT_STAGE, i / max(1, len(files)) / len(STAGES))
        try:
            path = storage.path_for(f["file_id"])
            out.append(extract(path, file_id=f["file_id"], category=f["file_category"],
                               mime=f["file_type"], file_name=f["file_name"]))
            on_file(out[-1])
        except Exception as exc:  # extract_file should not raise; a missing file can
            log.warning("file %s could not be read for analysis (%s)", f["file_id"],
                        type(exc).__name__)
            out.append(ExtractedFile(file_id=f["file_id"], category=f["file_category"],
                                     file_name=f["file_name"], mime=f["file_type"],
                                     notes=[f"the stored file could not be read "
                                            f"({type(exc).__name__})"]))
    return out


@dataclasses.dataclass
class _Work:
    files: list[ExtractedFile]
    result: AnalysisResult
    extract_s: float


def _reason(text: str) -> str:
    text = " ".join(str(text).split())
    return text[:REASON_MAX_CHARS] or "unknown error"


async def run_job(job: Job, *, owner: str, runtime: LLMRuntime, storage: Storage,
                  llm: LLMSettings, cancel: threading.Event,
                  run_blocking: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None,
                  on_stage: Callable[[str], None] | None = None) -> str:
    """Run one claimed job to its end and record the outcome (see module docstring).

    ``run_blocking(fn)`` runs fn off the event loop (the worker's own thread); default:
    ``asyncio.to_thread``."""
    loop = asyncio.get_running_loop()
    if run_blocking is None:
        run_blocking = asyncio.to_thread
    case = await Case.get_or_none(id=job.case_id)
    if case is None:  # deleted after the claim; its job rows went with it
        return JobState.CANCELLED
    files = await CaseFile.filter(case_id=case.id).order_by("id").values(
        "file_id", "file_category", "file_type", "file_name")
    options = options_from(job.options)
    clock = StageClock(llm.stage_timeout_s)
    pump = ProgressPump(loop, job.id, owner, on_stage)

    def report(stage: str, fraction: float) -> None:
        clock.enter(stage)
        pump.push(stage, fraction)

    def should_stop() -> bool:
        return cancel.is_set() or clock.expired()

    def save_text(f: ExtractedFile) -> None:
        # The text is kept as soon as a file is read, whatever happens to the analysis.
        fut = asyncio.run_coroutine_threadsafe(_save_text(job, f), loop)
        try:
            fut.result(TEXT_SAVE_S)
        except Exception as exc:  # advisory: the final transaction writes it again
            fut.cancel()
            log.debug("job %d: text of file %s not saved yet: %r", job.id, f.file_id, exc)

    def work() -> _Work:
        started = time.perf_counter()
        # A runtime whose model lives in a child process reads the files there too
        # (llm/process.py); otherwise they are read in this thread.
        extracted = _extract_all(storage, files, report, should_stop, save_text,
                                 getattr(runtime, "extract_file", extract_file))
        extract_s = time.perf_counter() - started
        if should_stop():
            raise Cancelled()
        case_input = CaseInput(case_id=case.case_id, patient_name=case.patient_name,
                               patient_age=case.patient_age,
                               patient_gender=case.patient_gender,
                               doctor_notes=case.case_summary, files=extracted,
                               options=options, attempt=max(1, job.attempts or 1))
        # A runtime that can stop mid-generation checks the same flag between tokens, so
        # a cancel, a stage deadline or a shutdown does not wait for a long answer.
        runtime.interrupt = should_stop
        try:
            # Between stages only a cancel stops the run: a stage that overran its deadline
            # was interrupted mid-answer and abstains; the next stage starts a new clock.
            result = run_analysis(case_input, runtime, llm, progress=report,
                                  should_stop=cancel.is_set)
        finally:
            runtime.interrupt = None
        return _Work(extracted, result, extract_s)

    report(EXTRACT_STAGE, 0.0)
    try:
        done = await run_blocking(work)
    except asyncio.CancelledError:
        pump.abort()  # the task itself is cancelled (shutdown gave up on this run)
        raise
    except Cancelled:
        await pump.close()
        if cancel.is_set() or not clock.expired():
            # Still ours (e.g. cancel_case raced with a re-queue of this very job, or
            # shutdown): hand it back untouched instead of leaving it 'running'.
            await queue.release(job.id, owner)
            return JobState.CANCELLED
        return await _fail(job, owner, f"stage {clock.stage} took longer than the limit of "
                                       f"{llm.stage_timeout_s:g} s")
    except StageError as exc:
        await pump.close()
        return await _fail(job, owner, f"{exc.stage}: {exc.reason}")
    except LLMError as exc:
        await pump.close()
        return await _fail(job, owner, f"{clock.stage}: the model failed: {exc}")
    except Exception as exc:
        await pump.close()
        # The message or traceback may quote clinical text: only the type above DEBUG.
        log.error("job %d: unexpected %s in stage %s", job.id, type(exc).__name__,
                  clock.stage)
        log.debug("job %d: traceback", job.id, exc_info=True)
        return await _fail(job, owner, f"{clock.stage}: internal error "
                                       f"({type(exc).__name__})")
    await pump.close()
    return await _save(job, owner, done)


async def _save_text(job: Job, f: ExtractedFile) -> None:
    await CaseFile.filter(file_id=f.file_id, case_id=job.case_id).update(
        text_data=textsafe.scrub(f.text))


async def _fail(job: Job, owner: str, reason: str) -> str:
    state = await queue.fail_attempt(job.id, owner, _reason(reason))
    if state is None:
        return "lost"
    log.warning("job %d: attempt %d failed (%s)", job.id, job.attempts,
                "re-queued" if state == JobState.QUEUED else "gave up")
    log.debug("job %d: reason: %s", job.id, reason)
    return state


def _stage_dicts(done: _Work) -> list[dict[str, Any]]:
    stages = [dataclasses.asdict(m) for m in done.result.stages]
    if not any(s.get("stage") == EXTRACT_STAGE for s in stages):
        stages.insert(0, {"stage": EXTRACT_STAGE, "duration_s": round(done.extract_s, 4),
                          "prompt_tokens": 0, "completion_tokens": 0, "attempts": 1,
                          "status": "ok", "reason": None})
    return stages


async def _save(job: Job, owner: str, done: _Work) -> str:
    """Insights, file texts/summaries and the job + case status in ONE transaction;
    rolled back entirely if the job stopped being ours meanwhile."""
    summaries = done.result.file_summaries
    try:
        async with in_transaction() as conn:
            # finish first: it takes SQLite's write lock at once (no read->write upgrade),
            # and a deleted case is detected before the insert hits its foreign key.
            if not await queue.finish(job.id, owner, state=JobState.COMPLETED, conn=conn):
                raise _NotOurs()
            now = _now()
            # Model output and extracted text are scrubbed of what a database cannot store
            # (NUL, lone surrogates): PostgreSQL would refuse the whole transaction.
            await Insight.create(case_id=job.case_id, job_id=job.id,
                                 data=textsafe.scrub(done.result.insights),
                                 model=textsafe.scrub(done.result.model),
                                 stages=_stage_dicts(done), generated_at=now, created_at=now,
                                 updated_at=now, using_db=conn)
            for f in done.files:
                summary = summaries.get(f.file_id)
                await CaseFile.filter(file_id=f.file_id, case_id=job.case_id).using_db(
                    conn).update(text_data=textsafe.scrub(f.text),
                                 ai_summary=json.dumps(textsafe.scrub(summary))
                                 if summary is not None else None)
    except _NotOurs:
        log.info("job %d: finished but no longer current; result discarded", job.id)
        return "lost"
    return JobState.COMPLETED
