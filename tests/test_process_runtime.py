"""Inference in a child process (medmitra/llm/process.py, llm.inference = "process") with
the real tiny GGUF through llama-cpp-python: answers and token counts come from the child,
a stop flag ends an answer early, a killed child fails only the job attempt it was running
(the durable queue retries it and the server keeps answering), and no child outlives the
server, whether it stops cleanly or is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import httpx
import pytest

import docfactory as df
from conftest import (MODEL_PATH, ROOT, cli_token, free_port, kill_group, spawn_server,
                      wait_healthy)
from medmitra.config import LLMSettings
from medmitra.llm.process import ProcessRuntime
from medmitra.llm.runtime import LLMError, ModelUnavailable

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not MODEL_PATH.is_file(),
                                                 reason="default model not installed")]

SCHEMA = {"title": "note", "type": "object",
          "properties": {"summary": {"type": "string", "minLength": 1, "maxLength": 200}},
          "required": ["summary"]}
MESSAGES = [{"role": "system", "content": "Answer in JSON."},
            {"role": "user", "content": "Summarise: haemoglobin 10.1 g/dL, fatigue."}]
GEN = {"max_tokens": 64, "temperature": 0.2, "seed": 7, "repeat_penalty": 1.1}
# Small output budgets keep a real analysis to seconds (as in test_analysis_e2e.py).
FAST_LLM = {"max_tokens_lab": 96, "max_tokens_radiology": 96, "max_tokens_summary": 96,
            "max_tokens_soap": 128, "max_tokens_diagnosis": 96,
            "max_tokens_differential": 200, "max_tokens_recommendations": 200, "n_ctx": 2048}
SERVER_ENV = {"MEDMITRA_LLM_WORKERS": "1", "MEDMITRA_LLM_THREADS": "1",
              "MEDMITRA_LLM_INFERENCE": "process", "MEDMITRA_LLM_MODEL_PATH": str(MODEL_PATH),
              "MEDMITRA_JOBS_LEASE_S": "30", "MEDMITRA_JOBS_HEARTBEAT_S": "1",
              "MEDMITRA_SERVER_GRACEFUL_SHUTDOWN_S": "1",
              **{f"MEDMITRA_LLM_{k.upper()}": str(v) for k, v in FAST_LLM.items()}}
GONE_WAIT_S = 15.0


def _llm(**kw) -> LLMSettings:
    return LLMSettings(model_path=str(MODEL_PATH), n_ctx=2048, **kw)


def _gone(pid: int) -> bool:
    """The process no longer exists (or is a zombie waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _wait_gone(pids: list[int], timeout_s: float = GONE_WAIT_S) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        left = [p for p in pids if not _gone(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)   # polling processes that are exiting


def _descendants(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
        for k in kids:
            out += [k] + _descendants(k)
    return out


def _inference_children(pid: int) -> list[int]:
    out = []
    for k in _descendants(pid):
        try:
            cmd = Path(f"/proc/{k}/cmdline").read_bytes()
        except OSError:
            continue
        if b"multiprocessing" in cmd and b"resource_tracker" not in cmd:
            out.append(k)
    return out


# -- the runtime on its own ------------------------------------------------------------------

def test_a_child_process_answers_with_the_real_model() -> None:
    rt = ProcessRuntime(_llm(), threads=1)
    try:
        assert rt.pid != os.getpid() and rt.alive
        assert rt.info["file"] == MODEL_PATH.name and rt.info["n_ctx"] == 2048
        assert rt.has_vision() is False
        text, usage = rt.complete_json(MESSAGES, SCHEMA, **GEN)
        assert isinstance(json.loads(text)["summary"], str)     # grammar-bound JSON
        assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= GEN["max_tokens"]
        n = rt.count_tokens("haemoglobin 10.1 g/dL")
        assert n > 3 and rt.count_tokens("") == 0
        assert rt.count_tokens("haemoglobin 10.1 g/dL " * 4) > n
        # Same seed, same prompt: the same text (the child keeps its KV cache between calls).
        again, usage2 = rt.complete_json(MESSAGES, SCHEMA, **GEN)
        assert again == text and usage2.cached_tokens > 0
    finally:
        rt.close()
    assert _wait_gone([rt.pid], 5) == []
    with pytest.raises(LLMError):
        rt.complete_json(MESSAGES, SCHEMA, **GEN)


def test_set_threads_reaches_the_child() -> None:
    rt = ProcessRuntime(_llm(), threads=2)
    try:
        rt.set_threads(1)
        text, _ = rt.complete_json(MESSAGES, SCHEMA, **GEN)
        assert isinstance(json.loads(text)["summary"], str)
        with pytest.raises(LLMError):
            rt.set_threads(0)      # refused in the child: the call fails, the child lives
        assert rt.alive and rt.complete_json(MESSAGES, SCHEMA, **GEN)[0] == text
    finally:
        rt.close()


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling class")
def test_every_thread_of_the_child_yields_the_cpu_to_the_server() -> None:
    """SCHED_IDLE for the child's main thread, its pipe reader and llama.cpp's compute
    threads (started by the first generation): the server's threads never wait behind
    the model for a CPU."""
    rt = ProcessRuntime(_llm(), threads=2)
    try:
        rt.complete_json(MESSAGES, SCHEMA, **GEN)
        tids = [int(t.name) for t in Path(f"/proc/{rt.pid}/task").iterdir()]
        assert len(tids) >= 3
        assert {os.sched_getscheduler(t) for t in tids} == {os.SCHED_IDLE}
        assert os.sched_getscheduler(0) == os.SCHED_OTHER     # the server is untouched
    finally:
        rt.close()


def test_the_stop_flag_reaches_the_child_and_ends_the_answer() -> None:
    rt = ProcessRuntime(_llm(), threads=1)
    try:
        free, _ = rt.complete_json(MESSAGES, SCHEMA, **GEN)
        rt.interrupt = lambda: True
        text, usage = rt.complete_json(MESSAGES, SCHEMA, **GEN)
        assert usage.completion_tokens < len(free) and text != free
        rt.interrupt = None
        assert rt.complete_json(MESSAGES, SCHEMA, **GEN)[0] == free   # next call unaffected
    finally:
        rt.close()


def test_a_killed_child_fails_the_call_and_stays_dead() -> None:
    rt = ProcessRuntime(_llm(), threads=1)
    try:
        os.kill(rt.pid, signal.SIGKILL)
        with pytest.raises(LLMError, match="ended unexpectedly .killed by signal 9"):
            rt.complete_json(MESSAGES, SCHEMA, **GEN)
        assert rt.alive is False
        with pytest.raises(LLMError, match="ended unexpectedly"):
            rt.count_tokens("still there?")
    finally:
        rt.close()


def test_an_unloadable_model_is_reported_unavailable(tmp_path: Path) -> None:
    broken = tmp_path / "truncated.gguf"   # a download cut short: header fine, no tensors
    with MODEL_PATH.open("rb") as f:
        broken.write_bytes(f.read(4 << 20))
    with pytest.raises(ModelUnavailable):
        ProcessRuntime(LLMSettings(model_path=str(broken)), threads=1)


def test_the_child_exits_when_its_parent_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from medmitra.config import LLMSettings
        from medmitra.llm.process import ProcessRuntime

        if __name__ == "__main__":
            rt = ProcessRuntime(LLMSettings(model_path={str(MODEL_PATH)!r}), threads=1)
            print(rt.pid, flush=True)
            time.sleep(600)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        child = int(parent.stdout.readline())
        assert not _gone(child)
        parent.kill()          # SIGKILL: no exit handler of the parent runs
        parent.wait(10)
        assert _wait_gone([child]) == [], "the inference child outlived its killed parent"
    finally:
        try:
            os.killpg(parent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        parent.stdout.close()


# -- in the server ---------------------------------------------------------------------------

def _create(url: str, h: dict) -> str:
    r = httpx.post(f"{url}/cases/create_case", headers=h, timeout=30,
                   data={"patient_name": "Process Test", "patient_age": "40",
                         "patient_gender": "male"},
                   files=[("lab_files", ("labs.csv", df.lab_csv(), "text/csv"))])
    assert r.status_code == 201, r.text
    return r.json()["case"]["case_id"]


def _wait_model_stage(url: str, h: dict, case_id: str) -> dict:
    deadline = time.monotonic() + 120
    a: dict = {}
    while time.monotonic() < deadline:
        a = httpx.get(f"{url}/cases/cases/{case_id}", headers=h, timeout=10).json()["analysis"]
        if a["state"] == "running" and a["stage"] not in (None, "extract"):
            return a
        time.sleep(0.05)   # polling a running analysis
    raise AssertionError(f"analysis never got to a model stage: {a}")


@pytest.mark.slow
@pytest.mark.e2e
def test_a_killed_inference_process_fails_one_attempt_and_the_retry_completes(
        tmp_path: Path) -> None:
    data, port, log = tmp_path / "data", free_port(), tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    h = {"Authorization": f"Bearer {cli_token(data, str(uuid.uuid4()))}"}
    proc = spawn_server(data, port, log, **SERVER_ENV)
    try:
        wait_healthy(url, proc, timeout_s=120, model=True)
        [first] = _inference_children(proc.pid)
        case_id = _create(url, h)
        _wait_model_stage(url, h, case_id)
        os.kill(first, signal.SIGKILL)
        # The server keeps answering, and a new child takes over for the retry.
        with httpx.Client(base_url=url, headers=h, timeout=10) as c:
            deadline = time.monotonic() + 600
            body: dict = {}
            while time.monotonic() < deadline:
                assert c.get("/health").status_code == 200
                body = c.get(f"/cases/cases/{case_id}").json()
                if body["case"]["status"] != "processing":
                    break
                time.sleep(0.2)
        assert body["case"]["status"] == "completed", body["analysis"]
        assert body["analysis"]["attempts"] == 2          # the killed run counted once
        assert body["insights"] is not None
        children = _inference_children(proc.pid)
        assert len(children) == 1 and children[0] != first
        assert "killed by signal 9" in log.read_text()
    finally:
        kill_group(proc)


@pytest.mark.slow
@pytest.mark.e2e
def test_no_inference_process_outlives_the_server(tmp_path: Path) -> None:
    data, port, log = tmp_path / "data", free_port(), tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    h = {"Authorization": f"Bearer {cli_token(data, str(uuid.uuid4()))}"}
    env = {**SERVER_ENV, "MEDMITRA_LLM_WORKERS": "2"}
    # A graceful stop during an analysis: the job goes back to the queue, the children exit.
    proc = spawn_server(data, port, log, **env)
    try:
        wait_healthy(url, proc, timeout_s=120, model=True)
        assert len(_inference_children(proc.pid)) == 2     # one model process per worker
        case_id = _create(url, h)
        _wait_model_stage(url, h, case_id)
        tree = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert _wait_gone(tree) == [], "a child of the server is still running"
    finally:
        kill_group(proc)
    # Killed outright: no exit handler runs; the children see their pipe close and exit.
    proc = spawn_server(data, port, log, **env)
    try:
        wait_healthy(url, proc, timeout_s=120, model=True)
        tree = _descendants(proc.pid)
        assert len(_inference_children(proc.pid)) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        assert _wait_gone(tree) == [], "a child outlived the killed server"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_the_child_reads_files_exactly_as_the_server_would(tmp_path: Path) -> None:
    """ProcessRuntime.extract_file runs pipeline/extract.py in the child: the same text,
    rows, sections, tags, notes and image as reading in the server's own thread, for good,
    scanned (OCR), malformed and hostile files; and a child that dies fails the read with
    LLMError (the runner then records the file as unreadable)."""
    import dataclasses

    from medmitra import filetypes
    from medmitra.pipeline.extract import extract_file

    files = {"report.pdf": (df.text_pdf(df.DEFAULT_LAB_LINES), filetypes.PDF, "lab"),
             "scan.pdf": (df.scanned_pdf(), filetypes.PDF, "lab"),
             "cbc.csv": (df.lab_csv(), filetypes.CSV, "lab"),
             "chest.png": (df.xray_png(), filetypes.PNG, "radiology"),
             "photo.jpg": (df.jpeg(), filetypes.JPEG, "radiology"),
             "ct.dcm": (df.dicom(), filetypes.DICOM, "radiology"),
             "bad.dcm": (df.corrupt_dicom(), filetypes.DICOM, "radiology"),
             "cut.pdf": (df.truncated_pdf(), filetypes.PDF, "lab"),
             "bomb.png": (df.bomb_png(), filetypes.PNG, "radiology")}

    def view(f):
        d = dataclasses.asdict(f)
        image = d.pop("image")
        d["image"] = None if image is None else (image.mode, image.size, image.tobytes())
        return d

    rt = ProcessRuntime(_llm(), threads=1)
    seen = {}
    try:
        for name, (data, mime, category) in files.items():
            path = tmp_path / name
            path.write_bytes(data)
            kw = {"file_id": str(uuid.uuid4()), "category": category, "mime": mime,
                  "file_name": name}
            here, there = extract_file(path, **kw), rt.extract_file(path, **kw)
            assert view(there) == view(here), name
            seen[name] = there
        assert seen["scan.pdf"].ocr_used and "Hemoglobin" in (seen["scan.pdf"].text or "")
        assert seen["cbc.csv"].lab_rows and seen["ct.dcm"].dicom_tags
        assert seen["chest.png"].image is not None and seen["bad.dcm"].notes
        os.kill(rt.pid, signal.SIGKILL)
        with pytest.raises(LLMError, match="ended unexpectedly"):
            rt.extract_file(tmp_path / "cbc.csv", file_id=str(uuid.uuid4()), category="lab",
                            mime=filetypes.CSV, file_name="cbc.csv")
    finally:
        rt.close()
