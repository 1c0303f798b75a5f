"""Model inference in a child process: ``ProcessRuntime``, an ``LLMRuntime`` whose
``LlamaRuntime`` lives in a process of its own (one per worker).

Why: llama-cpp-python samples every token in Python, so a model computing in a thread of
the server holds the GIL between native calls and every request waits for it (measured:
/health p99 3.6-3.8x idle while two analyses ran). In a child process the model has its
own interpreter; the server's worker thread only waits on a pipe.

The pipe protocol (pickled tuples over one ``multiprocessing`` connection):

  parent -> child   ("call", id, method, args, kwargs)   method of LlamaRuntime, or
                                                         "extract_file" (below)
                    ("stop", id)                         end call ``id``'s answer early
                    ("close",)                           free the model and exit
  child -> parent   ("ready", info, has_vision) | ("unavailable", reason) |
                    ("error", reason)                    once, after loading
                    ("ok", id, result) | ("llm_error", id, reason) |
                    ("fail", id, exception type name)    one per call

Lifetime: the child exits when it reads "close", and also as soon as its end of the pipe
reports EOF, which the kernel delivers when the server process ends in any way (SIGKILL
included): no orphan keeps a model in memory. It ignores SIGINT and SIGTERM (a Ctrl-C or
a service manager signals the whole process group; the server's graceful shutdown decides
when the model stops). A child that dies (killed, out of memory, native crash) fails the
call in progress with ``LLMError`` and every later one; the worker pool then starts a new
child before its next job, and the durable queue retries the failed job.

Reading the case's files (``extract_file``: PDFium, OCR, DICOM and image decoding) runs
in the child too: in the server, decoding a DICOM file or OCR-reading a scanned page holds
the GIL for long stretches (py-spy on the server while 2 analyses ran found its worker
threads decoding DICOM), and a native decoder that crashes on a malformed upload then ends
the child, not the server. The child is niced like the model.

Started with the "spawn" method (a fresh interpreter; fork would copy the server's threads
and locks). In the PyInstaller binary the child is the binary itself, routed to
``multiprocessing``'s entry by ``freeze_support()`` in ``medmitra/__main__.py``.
"""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import multiprocessing.util  # noqa: F401  (its exit hook must be registered before ours)
import os
import signal
import sys
import threading
import weakref
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable

from medmitra.config import LLMSettings
from medmitra.llm.runtime import LLMError, ModelUnavailable, Usage

log = logging.getLogger(__name__)

# How often the waiting worker thread looks at the job's stop flag during a call.
STOP_POLL_S = 0.05
# How long close() waits for the child to free its model and exit before killing it.
CLOSE_WAIT_S = 5.0
# Token counts are asked for repeatedly with the same text (prompt trimming searches).
COUNT_CACHE_ENTRIES = 512
# The child (all of its threads, llama.cpp's included) runs in Linux's SCHED_IDLE class:
# a waking thread of the server (or of anything else) takes a CPU from the model at once,
# and the model gets every cycle nothing else wants. Lowering its niceness was not enough:
# with nice 19, /health's p99 while 2 analyses ran was 2.7-3.8x the idle p99, with
# SCHED_IDLE 1.5-1.8x, and the server's loop thread waited 88-109 us per request for a CPU
# against 37-52 us (bench/calm_bench.py, the two interleaved, 3 rounds each). Where the
# class is missing or refused, the child lowers its niceness by CHILD_NICE instead.
CHILD_NICE = 10

_METHODS = ("complete_json", "describe_image_json", "count_tokens", "set_threads")
EXTRACT = "extract_file"   # pipeline/extract.py's extract_file, run in the child
_live: "weakref.WeakSet[ProcessRuntime]" = weakref.WeakSet()
# Workers load at the same time; one start at a time (PyInstaller's one-file spawn support
# has not always been safe for concurrent starts from several threads).
_start_lock = threading.Lock()


class ProcessRuntime:
    """``LLMRuntime`` forwarding every call to a ``LlamaRuntime`` in a child process.

    One instance per worker, used from that worker's thread (``close`` and the stop flag
    are safe from any thread). ``alive`` turns False for good once the child has died.
    """

    def __init__(self, llm: LLMSettings, *, threads: int, cache_dir: Path | None = None,
                 name: str = "inference"):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._send_lock = threading.Lock()
        self._call_lock = threading.Lock()
        self._seq = 0
        self._dead: str | None = None
        self._closed = False
        self.interrupt: Callable[[], bool] | None = None
        self.info: dict[str, Any] = {}
        self._vision = False
        self._proc = ctx.Process(target=_child_main, name=f"medmitra-{name}",
                                 args=(child_conn, llm, threads, cache_dir,
                                       logging.getLogger("medmitra").getEffectiveLevel()))
        # The one-file binary: the model's libraries are unpacked here, once, before the
        # children (which share the folder) start; a no-op from source.
        from medmitra import lazyfiles

        lazyfiles.ensure("model")
        with _start_lock:
            self._proc.start()
        child_conn.close()   # only the child holds its end: its death is our EOF
        _live.add(self)
        self._count_cached = functools.lru_cache(maxsize=COUNT_CACHE_ENTRIES)(
            functools.partial(self._call, "count_tokens"))
        try:
            msg = self._receive(None)   # LLMError if the child dies while loading
        except BaseException:
            self.close()
            raise
        if msg[0] == "ready":
            self.info, self._vision = msg[1], bool(msg[2])
            return
        self.close()
        if msg[0] == "unavailable":
            raise ModelUnavailable(msg[1])
        raise LLMError(f"the inference process could not load the model: {msg[1]}")

    # -- state --------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._dead is None and not self._closed and self._proc.is_alive()

    def _died(self) -> LLMError:
        if self._dead is None:
            self._proc.join(1.0)
            code = self._proc.exitcode
            how = (f"killed by signal {-code}" if code is not None and code < 0
                   else f"exit code {code}")
            self._dead = f"the inference process ended unexpectedly ({how})"
            if not self._closed:
                log.error("%s", self._dead)
        return LLMError(self._dead)

    # -- the pipe -----------------------------------------------------------------------

    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def _receive(self, call_id: int | None) -> tuple:
        """The next message for ``call_id`` (None: the start-up message), forwarding the
        stop flag to the child meanwhile; LLMError if the child dies first."""
        stop_sent = False
        while True:
            try:
                ready = wait([self._conn, self._proc.sentinel], timeout=STOP_POLL_S)
                if self._conn in ready:
                    msg = self._conn.recv()
                    if call_id is None or msg[1] == call_id:
                        return msg
                    continue   # the answer to a call whose caller gave up: stale
            except (EOFError, OSError, ValueError):
                raise self._died() from None
            if self._proc.sentinel in ready:
                raise self._died()
            if call_id is not None and not stop_sent:
                check = self.interrupt
                if check is not None and check():
                    stop_sent = True
                    try:
                        self._send(("stop", call_id))
                    except (OSError, ValueError):
                        raise self._died() from None

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self._call_lock:
            if self._closed:
                raise LLMError("the inference process was closed")
            if self._dead is not None:
                raise LLMError(self._dead)
            self._seq += 1
            call_id = self._seq
            try:
                self._send(("call", call_id, method, args, kwargs))
            except (OSError, ValueError):
                raise self._died() from None
            msg = self._receive(call_id)
        if msg[0] == "ok":
            return msg[2]
        if msg[0] == "llm_error":
            raise LLMError(msg[2])
        # Only the type: the message of an unexpected error may quote clinical text.
        raise LLMError(f"the inference process failed ({msg[2]})")

    # -- LLMRuntime ---------------------------------------------------------------------

    def complete_json(self, messages: list[dict], schema: dict, *, max_tokens: int,
                      temperature: float, seed: int, repeat_penalty: float) -> tuple[str, Usage]:
        return self._call("complete_json", messages, schema, max_tokens=max_tokens,
                          temperature=temperature, seed=seed, repeat_penalty=repeat_penalty)

    def count_tokens(self, text: str) -> int:
        return self._count_cached(text)

    def has_vision(self) -> bool:
        return self._vision

    def describe_image_json(self, image: Any, prompt: str, schema: dict, *, max_tokens: int,
                            temperature: float = 0.1, seed: int = 0,
                            repeat_penalty: float = 1.1) -> tuple[str, Usage]:
        if not self._vision:
            raise LLMError("no vision model is configured")
        return self._call("describe_image_json", image, prompt, schema,
                          max_tokens=max_tokens, temperature=temperature, seed=seed,
                          repeat_penalty=repeat_penalty)

    def set_threads(self, threads: int) -> None:
        self._call("set_threads", threads)

    # -- reading files ------------------------------------------------------------------

    def extract_file(self, path: Path, *, file_id: str, category: str, mime: str,
                     file_name: str) -> Any:
        """``pipeline.extract.extract_file`` in the child (see the module notes); LLMError
        if the child dies meanwhile."""
        return self._call(EXTRACT, str(path), file_id=file_id, category=category, mime=mime,
                          file_name=file_name)

    def close(self) -> None:
        """Ask the child to free its model and exit; kill it if it does not in time. Safe
        from any thread, also while a call runs (that call then fails with LLMError)."""
        if self._closed:
            return
        self._closed = True
        _live.discard(self)
        if self._proc.is_alive():
            try:
                self._send(("close",))
            except (OSError, ValueError):
                pass
            self._proc.join(CLOSE_WAIT_S)
            if self._proc.is_alive():
                log.warning("the inference process did not exit in %g s; killed",
                            CLOSE_WAIT_S)
                self._proc.kill()
                self._proc.join(CLOSE_WAIT_S)
        # The connection is closed by its owner thread's last use, or here when idle.
        if self._call_lock.acquire(timeout=1.0):
            try:
                self._conn.close()
            finally:
                self._call_lock.release()


def _close_all_at_exit() -> None:
    # Registered after multiprocessing's own exit hook, so it runs first: that hook joins
    # every child, and ours wait for "close" or EOF (they ignore SIGTERM).
    for runtime in list(_live):
        runtime.close()


atexit.register(_close_all_at_exit)


def load_process_runtime(llm: LLMSettings, *, threads: int, cache_dir: Path | None = None,
                         name: str = "inference") -> ProcessRuntime:
    return ProcessRuntime(llm, threads=threads, cache_dir=cache_dir, name=name)


# --------------------------------------------------------------------------- the child

def _yield_cpu_to_others() -> None:
    """This thread, and every thread it starts from now on, gives way to any other."""
    if hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
        except OSError:
            pass
    if sys.platform != "win32":
        try:
            os.nice(CHILD_NICE)
        except OSError:  # not permitted here: run at normal priority
            pass


def _child_main(conn: Connection, llm: LLMSettings, threads: int, cache_dir: Path | None,
                log_level: int) -> None:
    """Entry of the child process: load the model, then answer calls until "close"."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s[inference "
                               f"{os.getpid()}]: %(message)s")
    _yield_cpu_to_others()
    requests: list[tuple] = []
    wake = threading.Condition()
    closing = threading.Event()
    stopped: set[int] = set()   # ids of calls the parent asked to end early
    current = [0]               # id of the call being answered

    def read() -> None:
        # The lifeline: EOF means the server is gone (closed, crashed or killed).
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                os._exit(0)
            if msg[0] == "stop":
                stopped.add(msg[1])
                continue
            with wake:
                if msg[0] == "close":
                    closing.set()
                requests.append(msg)
                wake.notify()

    threading.Thread(target=read, name="medmitra-inference-pipe", daemon=True).start()

    from medmitra.llm.llama import load_runtime

    try:
        runtime = load_runtime(llm, threads=threads, cache_dir=cache_dir)
    except ModelUnavailable as exc:
        conn.send(("unavailable", str(exc)))
        return
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    runtime.interrupt = lambda: closing.is_set() or current[0] in stopped
    conn.send(("ready", runtime.info, runtime.has_vision()))
    try:
        while True:
            with wake:
                while not requests:
                    wake.wait()
                msg = requests.pop(0)
            if msg[0] == "close":
                return
            _, call_id, method, args, kwargs = msg
            stopped.discard(current[0])
            current[0] = call_id
            try:
                if method == EXTRACT:
                    from medmitra.pipeline.extract import extract_file

                    result = extract_file(Path(args[0]), **kwargs)
                elif method in _METHODS:
                    result = getattr(runtime, method)(*args, **kwargs)
                else:
                    raise ValueError(f"unknown method {method}")
                reply: tuple = ("ok", call_id, result)
            except LLMError as exc:
                reply = ("llm_error", call_id, str(exc))
            except Exception as exc:
                log.debug("call failed", exc_info=True)
                reply = ("fail", call_id, type(exc).__name__)
            conn.send(reply)
    finally:
        runtime.close()
