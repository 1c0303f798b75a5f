"""The worker pool: N asyncio workers that claim jobs from the durable queue and run them.

Each worker owns one model runtime (one model context is never used by two jobs at once)
and one thread; the model is loaded and every blocking call runs in that thread, so the
event loop only does database work. With ``llm.inference = "process"`` (the default) the
model itself lives in a child process per worker (medmitra/llm/process.py) and the thread
only waits on its pipe: token sampling then never competes with requests for the GIL. A
child that dies fails the job attempt it was running (the queue retries it) and is
replaced before the worker's next job. A job is held by a lease renewed by a heartbeat task;
a heartbeat that finds the job gone (deleted, superseded, taken over after a lapse) sets
the job's cancel flag, and the run stops at its next checkpoint without writing.

Shutdown (``stop``) is graceful-then-cancel, as in procrastinate: stop claiming, let
running jobs finish for ``server.graceful_shutdown_s``, then signal cancel and give the
jobs back to the queue (``queue.release``) so they run again after the restart.

``llm.workers = "auto"`` (the default) starts one worker with every core; once its model
has loaded, a second starts when the machine has two cores or more and memory for a second
model context (``_maybe_add_worker``). The two then split the cores.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from medmitra.config import AUTO, MiB, Settings, resolve_model_path
from medmitra.contract import JobState, ModelState, WorkerState
from medmitra.db.models import Job
from medmitra.jobs import queue, resources
from medmitra.llm.runtime import LLMRuntime, ModelUnavailable, check_gguf
from medmitra.storage import Storage

log = logging.getLogger("medmitra.jobs")

# After the graceful period and the cancel signal, how long to wait for a run to reach
# its next checkpoint before the worker task is abandoned (a model call can't be
# interrupted; its runtime is then left open rather than freed under a running call).
CANCEL_WAIT_S = 5.0
# Pause after an unexpected error in the claim loop (database busy ...), so a broken
# database does not turn the loop into a busy spin.
ERROR_BACKOFF_S = 1.0
# A missing model (no file yet, inference server not up) is looked for again this often,
# so dropping a model in place or starting the server later needs no restart.
MODEL_RETRY_S = 15.0
# llm.workers = "auto". With the default model on 2 cores, 2 workers x 1 thread analysed
# 1.19-2.09x the cases per hour of 1 x 2 (bench/analysis_bench.py --part throughput, four
# runs on different days; never less). A second
# context of the same model costs the first's anonymous memory (KV cache, compute buffers,
# heap): the weights are a memory-mapped file both share through the page cache.
AUTO_MAX_WORKERS = 2
# The second starts only if the memory available once the first has loaded is at least
# this many times the first's anonymous memory, plus a reserve: each worker's process also
# reads scans, and OCR (rapidocr) peaked at 917 MiB RSS on a full page
# (bench/ocr_compare.py), none of which the first had loaded yet when measured.
AUTO_MEMORY_FACTOR = 1.5
AUTO_MEMORY_RESERVE_BYTES = 1024 * MiB

@dataclass
class _Worker:
    name: str
    executor: ThreadPoolExecutor
    threads: int                 # CPU threads of its model
    # Started by "auto" when there was room: failing to load its model leaves the pool's
    # model state alone (the first worker goes on).
    optional: bool = False
    runtime: LLMRuntime | None = None
    task: asyncio.Task | None = None
    state: WorkerState = WorkerState.LOADING
    job_id: int | None = None
    case_pk: int | None = None
    owner: str | None = None
    stage: str | None = None
    cancel: threading.Event | None = None
    # True while a call of ours runs in the worker thread (closing the runtime under it
    # would free memory a native call is using).
    thread_busy: bool = False
    owners: set[str] = field(default_factory=set)
    # Anonymous memory its model context took when it loaded (None: not measurable here).
    context_bytes: int | None = None
    # Times the worker found the queue empty and went to sleep (shows it is polling).
    idle_waits: int = 0
    loaded_once: bool = False

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "job_id": self.job_id,
                "stage": self.stage}


class WorkerPool:
    def __init__(self, settings: Settings, storage: Storage, *,
                 runtime_factory: Callable[[], LLMRuntime] | None = None):
        self.settings = settings
        self.storage = storage
        self._auto = settings.llm.workers == AUTO
        # Workers started with the pool ("auto" may add one once the first has loaded).
        self.n_workers = 1 if self._auto else settings.llm.workers
        self._cores = resources.usable_cores()
        self._factory = runtime_factory
        if settings.llm.remote_url:  # remote inference: no local model file is used
            from medmitra.llm.remote import display_url
            self._model_path = f"remote:{display_url(settings.llm.remote_url)}"
        else:
            resolved = resolve_model_path(settings.llm.model_path)
            self._model_path = str(resolved) if resolved else settings.llm.model_path
        self._model_state = ModelState.DISABLED if self.n_workers == 0 else ModelState.LOADING
        self._model_name: str | None = None
        self._model_error: str | None = None
        self._loaded = 0
        self._workers: list[_Worker] = []
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._started = False
        self._stopped = False
        self._side_tasks: set[asyncio.Task] = set()

    def _threads_for(self, n_workers: int) -> int:
        return self.settings.llm.threads or max(1, self._cores // max(1, n_workers))

    def _load_configured_model(self, threads: int) -> LLMRuntime:
        from medmitra.clinical import icd10

        if self.settings.llm.remote_url:
            # Inference on another machine: no GGUF file here and no llama_cpp import; an
            # unreachable server raises ModelUnavailable, shown as "missing" in /health.
            from medmitra.llm.remote import load_remote_runtime

            runtime: LLMRuntime = load_remote_runtime(self.settings.llm)
        else:
            # The file is checked first so a missing model reads "missing" even where the
            # native library is absent; llama_cpp is imported only by a worker that loads.
            check_gguf(resolve_model_path(self.settings.llm.model_path))
            cache_dir = self.settings.data_path / "cache"
            if self.settings.llm.inference == "process":
                from medmitra.llm.process import load_process_runtime

                runtime = load_process_runtime(self.settings.llm, threads=threads,
                                               cache_dir=cache_dir)
            else:
                from medmitra.llm.llama import load_runtime

                runtime = load_runtime(self.settings.llm, threads=threads,
                                       cache_dir=cache_dir)
        # Open the ICD-10 table (a millisecond) here: a missing table shows at start-up.
        icd10.warm_up()
        return runtime

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover jobs of dead local processes, then start the workers; returns at once
        (models load in the workers' threads in the background)."""
        if self._started:
            return
        self._started = True
        if self.n_workers:
            # Busy worker threads hold the GIL between native calls: llama-cpp-python
            # samples each token in Python (thread mode), and with the model in a child the
            # pipeline's own Python (prompts, output checks, grounding) still runs in them.
            # At the default 5 ms switch interval a request waits up to that long per
            # hand-over (/health p99 during 2 analyses was 5.3-6.8 ms in process mode
            # against 2 ms idle); 1 ms keeps API latency flat while analyses run.
            sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        recovered = await queue.recover_dead_local_owners()
        if recovered:
            log.info("re-queued %d job(s) left running by a stopped process", recovered)
        for _ in range(self.n_workers):
            self._add_worker(self._threads_for(self.n_workers))

    def _add_worker(self, threads: int, *, optional: bool = False) -> _Worker:
        name = f"worker-{len(self._workers)}"
        w = _Worker(name=name, threads=threads, optional=optional, executor=ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"medmitra-{name}",
            initializer=_lower_thread_priority))
        w.task = asyncio.create_task(self._worker_main(w), name=f"medmitra-{name}")
        self._workers.append(w)
        return w

    async def stop(self) -> None:
        """Stop claiming; let running jobs finish for graceful_shutdown_s, then cancel and
        re-queue them; close the runtimes. No job is left 'running' with our lease."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        self._wake.set()
        for w in self._workers:
            if w.runtime is None and w.task is not None:
                # Still loading its model: there is no job to wait for. The load itself
                # can't be interrupted; the loader frees the runtime when it ends.
                w.task.cancel()
        tasks = [w.task for w in self._workers if w.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks,
                                            timeout=self.settings.server.graceful_shutdown_s)
            if pending:
                for w in self._workers:
                    if w.task in pending and w.job_id is not None:
                        log.info("%s: job %d did not finish in time; re-queued", w.name,
                                 w.job_id)
                        if w.cancel is not None:
                            w.cancel.set()
                        await queue.release(w.job_id, w.owner or "")
                _, pending = await asyncio.wait(pending, timeout=CANCEL_WAIT_S)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        for t in list(self._side_tasks):
            t.cancel()
        await asyncio.gather(*self._side_tasks, return_exceptions=True)
        await self._release_leftovers()
        closing = []
        for w in self._workers:
            w.state = WorkerState.STOPPED
            # A model in a child process can be stopped under a running call (the call
            # fails, the memory is the child's); one in a thread is left to finish.
            if w.runtime is not None and (not w.thread_busy or _separate_process(w.runtime)):
                # Off the loop, all at once: a child process is waited for until it exits.
                closing.append(asyncio.to_thread(_close, w.runtime, w.name))
                w.runtime = None
            w.executor.shutdown(wait=False)
        await asyncio.gather(*closing)

    async def _release_leftovers(self) -> None:
        # A worker task cancelled in the middle of a claim may have taken a job without
        # seeing it; nothing of ours may stay 'running' after a clean stop.
        owners = set().union(*(w.owners for w in self._workers)) if self._workers else set()
        if not owners:
            return
        rows = await Job.filter(state=JobState.RUNNING, lease_owner__in=list(owners)).values(
            "id", "lease_owner")
        for row in rows:
            await queue.release(row["id"], row["lease_owner"])

    # -- signals from the API -------------------------------------------------------------

    def notify(self) -> None:
        """A job was enqueued: wake an idle worker now instead of at its next poll."""
        self._wake.set()

    def cancel_case(self, case_pk: int) -> None:
        """The case was deleted or re-queued: its running job stops at its next checkpoint.

        Only a job that is no longer ours is cancelled: after a re-queue the same case's
        NEW job may already run here and must go on."""
        for w in self._workers:
            if w.case_pk == case_pk and w.job_id is not None and w.cancel is not None:
                task = asyncio.get_running_loop().create_task(
                    self._cancel_if_gone(w.job_id, w.owner or "", w.cancel))
                self._side_tasks.add(task)
                task.add_done_callback(self._side_tasks.discard)

    @staticmethod
    async def _cancel_if_gone(job_id: int, owner: str, cancel: threading.Event) -> None:
        try:
            ours = await queue.still_ours(job_id, owner)
        except Exception as exc:  # database trouble: stop to be safe; the job is retried
            log.warning("job %d: ownership check failed (%s)", job_id, type(exc).__name__)
            ours = False
        if not ours:
            cancel.set()

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        model = {"state": self._model_state, "name": self._model_name,
                 "path": self._model_path, "error": self._model_error}
        workers = [w.public() for w in self._workers]
        if self._model_state is ModelState.DISABLED:
            # An API-only node is ready by design; other nodes run the jobs.
            ready = not self._stopped
        else:
            ready = self._model_state is ModelState.READY and any(
                w["state"] != WorkerState.STOPPED for w in workers)
        return {"model": model, "workers": workers, "ready": ready}

    # -- workers --------------------------------------------------------------------------

    async def _in_thread(self, w: _Worker, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the worker's own thread. ``thread_busy`` follows the thread, not
        this await: if the awaiting task is cancelled, the call still runs to its end."""
        def tracked() -> Any:
            try:
                return fn()
            finally:
                w.thread_busy = False

        w.thread_busy = True
        return await asyncio.get_running_loop().run_in_executor(w.executor, tracked)

    async def _load_runtime(self, w: _Worker) -> bool:
        first = not w.loaded_once
        w.state = WorkerState.LOADING

        def load() -> LLMRuntime:
            # The job runner and the pipeline it imports (numpy, Pillow, the extractors)
            # are imported here, in the worker's thread, not before the server answers.
            import medmitra.jobs.runner  # noqa: F401

            before = resources.anonymous_bytes()
            runtime = self._factory() if self._factory else \
                self._load_configured_model(w.threads)
            if self._stopped:  # stop() gave up waiting for us: free it right away
                _close(runtime, w.name)
            w.context_bytes = _context_bytes(runtime, before)
            return runtime

        try:
            w.runtime = await self._in_thread(w, load)
        except Exception as exc:
            if w.optional:
                log.warning("%s: its model did not load (%s); the other worker goes on",
                            w.name, type(exc).__name__)
                await self._give_back_threads()
                return False
            self._model_load_failed(w, exc)
            return False
        if self._stopped:
            w.runtime = None
            return False
        w.state = WorkerState.IDLE
        info = getattr(w.runtime, "info", None) or {}
        self._model_name = info.get("name") or self._model_name
        if first:
            w.loaded_once = True
            self._loaded += 1
        if self._loaded == self.n_workers and \
                self._model_state in (ModelState.LOADING, ModelState.MISSING):
            self._model_state, self._model_error = ModelState.READY, None
            log.info("model %s ready in %d worker(s), %d thread(s) each", self._model_name,
                     self.n_workers, w.threads)
        return True

    def _model_load_failed(self, w: _Worker, exc: Exception) -> None:
        if isinstance(exc, ModelUnavailable):
            self._set_model_failed(ModelState.MISSING, str(exc))
            log.error("%s: model unavailable: %s; jobs stay queued", w.name, exc)
        else:
            self._set_model_failed(ModelState.ERROR, f"{type(exc).__name__}: {exc}")
            log.error("%s: model failed to load (%s)", w.name, type(exc).__name__)

    def _set_model_failed(self, state: ModelState, error: str) -> None:
        if self._model_state not in (ModelState.MISSING, ModelState.ERROR):
            self._model_state, self._model_error = state, error

    async def _worker_main(self, w: _Worker) -> None:
        try:
            while not await self._load_runtime(w):
                if self._model_state is not ModelState.MISSING or self._stopping.is_set():
                    return   # a broken model does not get better by loading it again
                await self._idle(MODEL_RETRY_S)
                if self._stopping.is_set():
                    return
            if self._auto and w is self._workers[0]:
                await self._maybe_add_worker(w)
            while not self._stopping.is_set():
                if not getattr(w.runtime, "alive", True):
                    if not await self._replace_runtime(w):
                        return
                    continue
                try:
                    claimed = await self._claim(w)
                except Exception as exc:
                    log.error("%s: claim failed (%s)", w.name, type(exc).__name__)
                    await self._idle(ERROR_BACKOFF_S)
                    continue
                if claimed is None:
                    w.idle_waits += 1
                    await self._idle(self.settings.jobs.poll_s)
                    continue
                job, owner = claimed
                if self._stopping.is_set():  # claimed while stop() began: give it back
                    await queue.release(job.id, owner)
                    break
                await self._run(w, job, owner)
        finally:
            w.state = WorkerState.STOPPED

    async def _maybe_add_worker(self, first: _Worker) -> None:
        """llm.workers = "auto": start a second worker if this machine has room for it,
        the first giving up half of its threads. Runs once the first worker's model has
        loaded, before that worker takes a job."""
        if len(self._workers) >= AUTO_MAX_WORKERS or self._stopping.is_set():
            return
        if self.settings.llm.remote_url:
            return   # the inference server's capacity is not measured from here
        if self._cores < 2:
            log.info("auto workers: 1 (this machine gives the server 1 core)")
            return
        cost, avail = first.context_bytes, resources.available_memory_bytes()
        if cost is None or avail is None:
            log.info("auto workers: 1 (memory use cannot be measured on this system)")
            return
        need = int(AUTO_MEMORY_FACTOR * cost) + AUTO_MEMORY_RESERVE_BYTES
        if avail < need:
            log.info("auto workers: 1 (a second model context needs %d MiB available, "
                     "%d MiB are)", need // MiB, avail // MiB)
            return
        threads = self._threads_for(AUTO_MAX_WORKERS)
        if threads != first.threads:
            set_threads = getattr(first.runtime, "set_threads", None)
            if set_threads is None:
                log.info("auto workers: 1 (this model runtime cannot share the cores)")
                return
            try:
                await self._in_thread(first, lambda: set_threads(threads))
            except Exception as exc:   # e.g. the inference process died meanwhile
                log.warning("auto workers: 1 (could not move the first to %d thread(s): "
                            "%s)", threads, type(exc).__name__)
                return
            first.threads = threads
        if self._stopping.is_set():
            return
        self._add_worker(threads, optional=True)
        log.info("auto workers: 2, %d thread(s) each (a model context took %d MiB, "
                 "%d MiB were available)", threads, cost // MiB, avail // MiB)

    async def _give_back_threads(self) -> None:
        """The auto-added worker is gone for good: the first gets every core back. Called
        from a plain thread: the runtime waits for a running call of the first's to end."""
        first = self._workers[0]
        threads = self._threads_for(1)
        set_threads = getattr(first.runtime, "set_threads", None)
        if set_threads is None or threads == first.threads:
            return
        try:
            await asyncio.to_thread(set_threads, threads)
        except Exception as exc:   # closed or died meanwhile: its replacement loads anew
            log.debug("could not give %s its threads back (%s)", first.name,
                      type(exc).__name__)
            return
        first.threads = threads

    async def _replace_runtime(self, w: _Worker) -> bool:
        """The worker's inference process died: start a new one (False: give up)."""
        log.warning("%s: the inference process is gone; starting a new one", w.name)
        assert w.runtime is not None
        await asyncio.to_thread(_close, w.runtime, w.name)
        w.runtime = None
        while not await self._load_runtime(w):
            if self._model_state is not ModelState.MISSING or self._stopping.is_set():
                return False
            await self._idle(MODEL_RETRY_S)
            if self._stopping.is_set():
                return False
        return True

    async def _claim(self, w: _Worker) -> tuple[Job, str] | None:
        # A fresh owner per claim: a stale run of an earlier job can never pass as ours.
        owner = queue.new_owner()
        w.owners.add(owner)
        job = await queue.claim(owner, self.settings.jobs.lease_s)
        if job is None:
            w.owners.discard(owner)
            return None
        return job, owner

    async def _idle(self, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await self._wake.wait()
        except TimeoutError:
            pass
        if not self._stopping.is_set():
            self._wake.clear()

    async def _run(self, w: _Worker, job: Job, owner: str) -> None:
        cancel = threading.Event()
        w.state, w.job_id, w.case_pk, w.owner, w.cancel, w.stage = (
            WorkerState.BUSY, job.id, job.case_id, owner, cancel, None)
        log.info("%s: job %d claimed (attempt %d)", w.name, job.id, job.attempts)
        beat = asyncio.create_task(self._heartbeat(job.id, owner, cancel),
                                   name=f"medmitra-heartbeat-{job.id}")
        try:
            assert w.runtime is not None
            from medmitra.jobs import runner   # imported by the worker thread already

            outcome = await runner.run_job(
                job, owner=owner, runtime=w.runtime, storage=self.storage,
                llm=self.settings.llm, cancel=cancel,
                run_blocking=lambda fn: self._in_thread(w, fn),
                on_stage=lambda stage: setattr(w, "stage", stage))
            log.info("%s: job %d %s", w.name, job.id, outcome)
        except Exception as exc:
            # run_job records failures itself; this is a database error while recording.
            # The lease then lapses and the job is claimed again, so it never stays stuck.
            log.error("%s: job %d: could not record the outcome (%s)", w.name, job.id,
                      type(exc).__name__)
            try:
                await queue.fail_attempt(job.id, owner, "internal error while saving the "
                                                        "result")
            except Exception:
                log.debug("%s: fail_attempt failed too", w.name, exc_info=True)
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
            w.owners.discard(owner)
            w.state, w.job_id, w.case_pk, w.owner, w.cancel, w.stage = (
                WorkerState.IDLE, None, None, None, None, None)

    async def _heartbeat(self, job_id: int, owner: str, cancel: threading.Event) -> None:
        jobs = self.settings.jobs
        while True:
            await asyncio.sleep(jobs.heartbeat_s)
            try:
                ours = await queue.heartbeat(job_id, owner, jobs.lease_s)
            except Exception as exc:  # database busy: try again next beat, lease permitting
                log.warning("job %d: heartbeat failed (%s)", job_id, type(exc).__name__)
                continue
            if not ours:
                log.info("job %d: no longer ours (cancelled, deleted or taken over)", job_id)
                cancel.set()
                return


GIL_SWITCH_INTERVAL_S = 0.001

# Niceness of a worker thread (and of the inference threads it starts, which inherit it).
WORKER_NICE = 10


def _lower_thread_priority() -> None:
    """Let the event loop thread win the CPU over model inference: requests stay fast
    while analyses run, and inference still gets every cycle the API does not use.
    Linux sets niceness per thread; elsewhere this is a no-op."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICE)
    except OSError:  # not permitted in this sandbox or container: run at normal priority
        log.debug("could not lower the worker thread's priority")


def _context_bytes(runtime: LLMRuntime, before: int | None) -> int | None:
    """Anonymous memory a just-loaded runtime took: its child process's own, or (a model
    in this process) how much this process's grew while loading (``before``)."""
    if _separate_process(runtime):
        return resources.anonymous_bytes(runtime.pid)  # type: ignore[attr-defined]
    after = resources.anonymous_bytes()
    if before is None or after is None:
        return None
    return max(0, after - before)


def _separate_process(runtime: LLMRuntime) -> bool:
    process = sys.modules.get("medmitra.llm.process")   # imported if it was ever used
    return process is not None and isinstance(runtime, process.ProcessRuntime)


def _close(runtime: LLMRuntime, name: str) -> None:
    try:
        runtime.close()
    except Exception as exc:
        log.warning("%s: closing the model runtime failed (%s)", name, type(exc).__name__)
