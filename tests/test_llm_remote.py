"""RemoteRuntime against a real OpenAI-compatible server: llama-cpp-python's own server
(``python -m llama_cpp.server``) running the SmolLM2-135M GGUF in a subprocess on a
loopback port, started once for the module with an API key.

Fault cases use the same real server, reached through an httpx transport that fails a
connection or hides the tokenize endpoints; only the unreachable case has no server.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from medmitra import contract, filetypes
from medmitra.config import LLMSettings, Settings, app_root
from medmitra.db.models import Case, CaseFile, Insight, Job
from medmitra.jobs import queue
from medmitra.jobs.pool import WorkerPool
from medmitra.llm.remote import (ESTIMATE_BYTES_PER_TOKEN, RemoteRuntime, base_url,
                                 display_url, echoes_prompt, estimate_tokens,
                                 load_remote_runtime)
from medmitra.llm.runtime import LLMError, ModelUnavailable
from medmitra.pipeline import schemas
from medmitra.pipeline.stages import NO_IMAGE_MODEL, run_analysis
from medmitra.pipeline.types import CaseInput, ExtractedFile, LabRow
from medmitra.storage import Storage
from tests.conftest import add_file, new_case, run_with_db, wait_until

MODEL = app_root() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SERVER_N_CTX = 2048
THREADS = max(1, min(2, os.cpu_count() or 1))
API_KEY = "test-remote-key-" + "k" * 16
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0
WAIT_S = 120.0
PATIENT = "Zebulon Quartermaine"
CLINICAL_TEXTS = [
    "Hemoglobin 10.1 g/dL (12-16), WBC 13,400/µL; CRP 48 mg/L.",
    "Three days of productive cough and fever. Crackles right base. SpO2 93 % on air.",
    "Na 128 mmol/L, K 5.9 mmol/L, creatinine 2.31 mg/dL, eGFR 27 mL/min/1.73m2",
    "गर्भवती महिला, 日本語 テキスト, température 38,9 °C",
]
# The server extras of llama-cpp-python (pip install "llama-cpp-python[server]").
SERVER_MODULES = ("fastapi", "uvicorn", "sse_starlette", "starlette_context",
                  "pydantic_settings")
_missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]




def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory) -> Iterator[str]:
    if _missing:
        pytest.skip("llama-cpp-python server extras not installed (missing: "
                    f"{', '.join(_missing)}): pip install fastapi uvicorn sse-starlette "
                    "starlette-context pydantic-settings")
    if not MODEL.is_file():
        pytest.skip(f"{MODEL} not installed")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(MODEL),
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(SERVER_N_CTX),
           "--n_threads", str(THREADS), "--n_threads_batch", str(THREADS), "--api_key", API_KEY]
    # As medmitra.llm.llama does in-process: OpenMP's default spin-wait made calls several
    # times slower on a machine shared with other work (measured: 42 s vs 8 s first call).
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        with httpx.Client(timeout=2.0) as probe:
            while True:  # readiness poll: the server binds only after loading the model
                if proc.poll() is not None:
                    pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n"
                                + log_path.read_text(errors="replace")[-2000:])
                try:
                    if probe.get(url + "/v1/models", headers={
                            "Authorization": f"Bearer {API_KEY}"}).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"llama_cpp.server not ready in {START_TIMEOUT_S} s")
                time.sleep(0.1)
        print(f"\nllama_cpp.server ready in {time.perf_counter() - started:.1f} s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)


def _llm(url: str, **kw) -> LLMSettings:
    # llama-cpp-python's server doesn't report its context size: llm.n_ctx must match.
    base = dict(remote_url=url, remote_api_key=API_KEY, remote_timeout_s=60.0,
                n_ctx=SERVER_N_CTX, max_tokens_lab=96, max_tokens_summary=96,
                max_tokens_soap=128, max_tokens_diagnosis=96, max_tokens_differential=200,
                max_tokens_recommendations=128)
    return LLMSettings(**(base | kw))


@pytest.fixture(scope="module")
def remote(server_url) -> Iterator[RemoteRuntime]:
    rt = load_remote_runtime(_llm(server_url + "/v1/"))  # an OpenAI-style base URL works
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The in-process backend on the same GGUF (behind a symlink, so the hash sidecar is
    written in a temp dir, not in models/)."""
    from medmitra.llm.llama import LlamaRuntime

    link = tmp_path_factory.mktemp("models") / MODEL.name
    link.symlink_to(MODEL)
    rt = LlamaRuntime(link, n_ctx=512, threads=1, seed=42)
    yield rt
    rt.close()


class Faulty(httpx.HTTPTransport):
    """The real transport, except: the first ``fail_connects`` requests fail to connect,
    and tokenize endpoints answer 404 when ``hide_tokenize`` (as on a server without
    them). Counts the requests that reached the server per path."""

    def __init__(self, *, fail_connects: int = 0, hide_tokenize: bool = False):
        super().__init__()
        self.fail_connects = fail_connects
        self.hide_tokenize = hide_tokenize
        self.sent: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.fail_connects > 0:
            self.fail_connects -= 1
            raise httpx.ConnectError("connection refused", request=request)
        if self.hide_tokenize and request.url.path in ("/tokenize", "/extras/tokenize"):
            return httpx.Response(404, json={"detail": "Not Found"})
        self.sent.append(request.url.path)
        return super().handle_request(request)


# --------------------------------------------------------------------------- runtime

@pytest.mark.slow
def test_info_names_the_served_model_and_the_server(remote, server_url):
    info = remote.info
    assert info["name"] == "SmolLM2-135M-Instruct"      # from /v1/models, as a local file
    assert info["file"] == f"remote:{server_url}"
    assert info["quantization"] == "Q4_1" and info["sha256"] == "unknown"
    assert info["n_ctx"] == SERVER_N_CTX                 # llm.n_ctx: this server can't tell
    assert info["tokenizer"] == "/extras/tokenize"
    assert remote.has_vision() is False
    with pytest.raises(LLMError, match="image input is not supported"):
        remote.describe_image_json(None, "x", {}, max_tokens=8)


@pytest.mark.slow
def test_remote_model_setting_names_the_model(server_url):
    rt = load_remote_runtime(_llm(server_url, remote_model="clinic-llm"))
    try:
        assert rt.info["name"] == "clinic-llm" and rt.info["remote_model_id"] == "clinic-llm"
        text, usage = rt.complete_json(
            [{"role": "user", "content": "Say ok."}],
            {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
            max_tokens=16, temperature=0.2, seed=1, repeat_penalty=1.1)
        assert isinstance(json.loads(text)["ok"], bool)
    finally:
        rt.close()


@pytest.mark.slow
def test_complete_json_is_parseable_under_a_bounded_schema(remote):
    schema = schemas.fit_schema(schemas.DIAGNOSIS, 96)
    messages = [{"role": "system", "content": "Patient: 54, female. Fever, cough, crackles."},
                {"role": "user", "content": "TASK: Give the primary diagnosis. JSON schema: "
                 + schemas.prompt_schema_text(schema)}]
    started = time.perf_counter()
    for seed in (1, 2):
        text, usage = remote.complete_json(messages, schema, max_tokens=96, temperature=0.2,
                                           seed=seed, repeat_penalty=1.1)
        data = json.loads(text)                       # strict JSON, not repaired
        assert list(data) == list(schema["properties"])   # the grammar fixed the keys
        assert isinstance(data["primary_diagnosis"], str)
        assert isinstance(data["supporting_evidence"], list)
        assert schemas.check_output(text, schema)["primary_diagnosis"] == \
            data["primary_diagnosis"]
        assert usage.prompt_tokens > 20
        assert 0 < usage.completion_tokens <= 96
    print(f"\n2 remote completions: {time.perf_counter() - started:.1f} s")


@pytest.mark.slow
def test_count_tokens_matches_the_in_process_count(remote, local):
    assert remote.count_tokens("") == 0
    for text in CLINICAL_TEXTS + ["fever and cough " * 40]:
        assert remote.count_tokens(text) == local.count_tokens(text), text


@pytest.mark.slow
def test_count_tokens_estimates_high_without_a_tokenize_endpoint(server_url, local):
    transport = Faulty(hide_tokenize=True)
    rt = RemoteRuntime(server_url, api_key=API_KEY, n_ctx=SERVER_N_CTX, transport=transport)
    try:
        assert rt.info["tokenizer"] == "estimate"
        for text in CLINICAL_TEXTS:
            count = rt.count_tokens(text)
            assert count == estimate_tokens(text)
            assert local.count_tokens(text) <= count <= len(text.encode()) / \
                ESTIMATE_BYTES_PER_TOKEN + 1
        assert "/tokenize" not in transport.sent and "/extras/tokenize" not in transport.sent
    finally:
        rt.close()


def test_unreachable_server_is_model_unavailable():
    port = _free_port()                      # nothing listens there
    with pytest.raises(ModelUnavailable, match=rf"127\.0\.0\.1:{port} is unreachable"):
        load_remote_runtime(LLMSettings(remote_url=f"http://127.0.0.1:{port}"))
    with pytest.raises(ModelUnavailable, match="not an http"):
        load_remote_runtime(LLMSettings(remote_url="gpu-box:8080"))
    with pytest.raises(ModelUnavailable, match="remote_url is empty"):
        load_remote_runtime(LLMSettings())


@pytest.mark.slow
def test_wrong_api_key_is_model_unavailable(server_url):
    with pytest.raises(ModelUnavailable, match=r"refused access \(HTTP 401\).*remote_api_key"):
        load_remote_runtime(_llm(server_url, remote_api_key="wrong-key"))
    with pytest.raises(ModelUnavailable, match="HTTP 401"):
        load_remote_runtime(_llm(server_url, remote_api_key=""))


@pytest.mark.slow
def test_one_reconnect_then_a_readable_error(server_url):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    messages = [{"role": "user", "content": f"{PATIENT} says ok."}]
    transport = Faulty()
    rt = RemoteRuntime(server_url, api_key=API_KEY, transport=transport)
    try:
        transport.fail_connects = 1              # a dropped connection: sent once more
        text, _ = rt.complete_json(messages, schema, max_tokens=16, temperature=0.2, seed=1,
                                   repeat_penalty=1.1)
        assert isinstance(json.loads(text)["ok"], bool)
        assert transport.sent.count("/v1/chat/completions") == 1

        transport.fail_connects = 2              # still down after the reconnect: give up
        with pytest.raises(LLMError, match="unreachable") as err:
            rt.complete_json(messages, schema, max_tokens=16, temperature=0.2, seed=1,
                             repeat_penalty=1.1)
        assert PATIENT not in str(err.value)
        assert transport.fail_connects == 0 and \
            transport.sent.count("/v1/chat/completions") == 1
    finally:
        rt.close()


@pytest.mark.slow
def test_server_errors_are_llm_errors_without_prompt_text(remote, caplog):
    caplog.set_level(logging.DEBUG)
    # A 500 whose body quotes the request (llama-cpp-python echoes invalid messages).
    bad = [{"role": "patient", "content": f"{PATIENT} has a cough"}]
    with pytest.raises(LLMError, match=r"HTTP 500") as err:
        remote.complete_json(bad, {}, max_tokens=8, temperature=0.2, seed=1,
                             repeat_penalty=1.1)
    assert PATIENT not in str(err.value) and "cough" not in str(err.value)
    # A 400 for a prompt that does not fit: the reason is shown, the prompt is not.
    long_prompt = [{"role": "user", "content": f"{PATIENT} coughs. " * 800}]
    with pytest.raises(LLMError, match=r"HTTP 400.*maximum context length is 2048") as err:
        remote.complete_json(long_prompt, {}, max_tokens=8, temperature=0.2, seed=1,
                             repeat_penalty=1.1)
    assert PATIENT not in str(err.value)
    assert PATIENT not in caplog.text


@pytest.mark.slow
def test_context_size_learned_from_an_overflow(server_url):
    rt = load_remote_runtime(_llm(server_url, n_ctx=8192))   # misconfigured: server has 2048
    try:
        assert rt.info["n_ctx"] == 8192
        with pytest.raises(LLMError, match="maximum context length"):
            rt.complete_json([{"role": "user", "content": "cough " * 3000}], {},
                             max_tokens=8, temperature=0.2, seed=1, repeat_penalty=1.1)
        assert rt.info["n_ctx"] == SERVER_N_CTX     # the next analysis budgets for 2048
    finally:
        rt.close()


def test_echo_detection_and_url_helpers():
    msgs = [{"role": "user", "content": "Patient Zebulon Quartermaine, 52 y, cough"},
            {"role": "user", "content": [{"type": "text", "text": "short text"}]}]
    assert echoes_prompt("input: 'Zebulon Quartermai...'", msgs)
    assert echoes_prompt("bad value 'short text'", msgs)
    assert not echoes_prompt("This model's maximum context length is 2048 tokens.", msgs)
    assert base_url("http://gpu-box:8080/v1/") == "http://gpu-box:8080"
    assert base_url(" https://h/prefix/ ") == "https://h/prefix"
    assert display_url("http://user:secret@gpu-box:8080/v1") == "http://gpu-box:8080/v1"


class LlamaServerImitation:
    """llama.cpp's llama-server wire format (GET /props, POST /tokenize, ``timings`` in
    chat answers), as documented, for the code paths llama-cpp-python's server lacks.
    No llama-server binary is available here; the real-server tests above cover the rest."""

    def __init__(self, models_status: int = 200):
        self.models_status = models_status
        self.chat_bodies: list[dict] = []
        self.tokenize_calls = 0
        self.fail_next_chat: Exception | None = None
        self.chat_reply: dict | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.headers.get("authorization") == "Bearer k"
        path = request.url.path
        if path == "/v1/models":
            if self.models_status != 200:
                return httpx.Response(self.models_status,
                                      json={"error": {"message": "Loading model"}})
            return httpx.Response(200, json={"object": "list", "data": [
                {"id": "/models/Qwen2.5-7B-Instruct-Q4_K_M.gguf", "object": "model",
                 "owned_by": "llamacpp", "meta": {"n_ctx_train": 32768}}]})
        if path == "/props":
            return httpx.Response(200, json={"default_generation_settings": {"n_ctx": 8192},
                                             "total_slots": 2})
        if path == "/tokenize":
            body = json.loads(request.content)
            assert body["add_special"] is False
            self.tokenize_calls += 1
            return httpx.Response(200, json={"tokens": list(range(len(body["content"].split())))})
        if path == "/v1/chat/completions":
            if self.fail_next_chat is not None:
                exc, self.fail_next_chat = self.fail_next_chat, None
                raise exc
            self.chat_bodies.append(json.loads(request.content))
            return httpx.Response(200, json=self.chat_reply or {
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": '{"ok": true}'}}],
                "usage": {"prompt_tokens": 40, "completion_tokens": 5, "total_tokens": 45},
                "timings": {"cache_n": 30, "prompt_n": 10, "prompt_ms": 120.5}})
        return httpx.Response(404, json={"error": {"message": "File Not Found"}})


def test_llama_server_props_tokenize_and_timings():
    server = LlamaServerImitation()
    rt = RemoteRuntime("http://gpu-box:8080", api_key="k", n_ctx=4096,
                       transport=httpx.MockTransport(server))
    try:
        assert rt.info["name"] == "Qwen2.5-7B-Instruct"
        assert rt.info["quantization"] == "Q4_K_M"
        assert rt.info["n_ctx"] == 8192                  # the server's, not llm.n_ctx
        assert rt.info["tokenizer"] == "/tokenize"
        before = server.tokenize_calls
        assert rt.count_tokens("fever and cough") == 3
        assert rt.count_tokens("fever and cough") == 3   # cached: one round trip
        assert server.tokenize_calls == before + 1

        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
        text, usage = rt.complete_json([{"role": "user", "content": "ok?"}], schema,
                                       max_tokens=16, temperature=0.2, seed=7,
                                       repeat_penalty=1.1)
        assert json.loads(text) == {"ok": True}
        assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (40, 5, 30)
        assert usage.prompt_eval_s == pytest.approx(0.1205)
        [body] = server.chat_bodies
        assert body["response_format"] == {"type": "json_object", "schema": schema}
        assert (body["seed"], body["max_tokens"], body["repeat_penalty"]) == (7, 16, 1.1)
        assert body["model"] == "/models/Qwen2.5-7B-Instruct-Q4_K_M.gguf"

        server.fail_next_chat = httpx.ReadTimeout("timed out")
        with pytest.raises(LLMError, match="did not answer in time"):
            rt.complete_json([{"role": "user", "content": "ok?"}], schema, max_tokens=16,
                             temperature=0.2, seed=7, repeat_penalty=1.1)
        server.chat_reply = {"choices": []}
        with pytest.raises(LLMError, match="malformed chat completion"):
            rt.complete_json([{"role": "user", "content": "ok?"}], schema, max_tokens=16,
                             temperature=0.2, seed=7, repeat_penalty=1.1)
    finally:
        rt.close()


def test_server_still_loading_is_model_unavailable():
    with pytest.raises(ModelUnavailable, match=r"not ready \(HTTP 503"):
        RemoteRuntime("http://gpu-box:8080", api_key="k",
                      transport=httpx.MockTransport(LlamaServerImitation(models_status=503)))


# --------------------------------------------------------------------------- pipeline

def _case() -> CaseInput:
    return CaseInput(
        case_id="c1", patient_name=PATIENT, patient_age=61, patient_gender="male",
        doctor_notes="Three days of productive cough and fever. Crackles right base.",
        files=[
            ExtractedFile(file_id="lab-1", category="lab", file_name="cbc.csv", mime="text/csv",
                          lab_rows=[LabRow("WBC", "14.2", "10^9/L", "4-11", "high"),
                                    LabRow("CRP", "48", "mg/L", "<5", "high"),
                                    LabRow("Hb", "13.9", "g/dL", "13-17", "normal")]),
            ExtractedFile(file_id="rad-1", category="radiology", file_name="chest.dcm",
                          mime="application/dicom",
                          dicom_tags={"Modality": "CR", "BodyPartExamined": "CHEST"}),
        ])


@pytest.mark.slow
def test_full_analysis_through_the_remote_runtime(remote, server_url, caplog):
    caplog.set_level(logging.INFO)
    stages_seen: list[str] = []
    started = time.perf_counter()
    result = run_analysis(_case(), remote, _llm(server_url),
                          progress=lambda s, f: stages_seen.append(s),
                          should_stop=lambda: False)
    wall_s = time.perf_counter() - started
    print(f"\nremote full analysis: {wall_s:.1f} s")
    for m in result.stages:
        print(f"  {m.stage:20s} {m.duration_s:6.2f} s  prompt {m.prompt_tokens:5d}  "
              f"completion {m.completion_tokens:4d}  attempts {m.attempts}")

    ins = result.insights
    # Every nested field of the contract but generated_at, which is stamped when stored.
    assert set(ins) == set(contract.INSIGHT_FIELDS) - {"generated_at"}
    cs, soap, pd = ins["case_summary"], ins["soap_note"], ins["primary_diagnosis"]
    assert set(cs) == {"comprehensive_summary", "key_findings", "patient_context",
                       "doctor_notes", "lab_summary", "radiology_summary", "confidence_score"}
    # Copied from the case, name included (api.md: as the original's insights carried).
    assert cs["comprehensive_summary"] and cs["patient_context"] == {
        "name": PATIENT, "age": 61, "gender": "male"}
    for key in ("subjective", "objective", "assessment", "plan"):
        assert isinstance(soap[key], str) and soap[key]
    assert isinstance(pd["primary_diagnosis"], str) and pd["primary_diagnosis"]
    assert pd["icd_code"] is None or isinstance(pd["icd_code"], str)
    # Answered within the contract, or abstained with a reason (never junk stored).
    if ins["stages"]["differential"]["status"] == "abstained":
        assert ins["differential_diagnoses"] == [] and ins["stages"]["differential"]["reason"]
    else:
        assert 1 <= len(ins["differential_diagnoses"])
    assert all(d["condition"] for d in ins["differential_diagnoses"])
    assert isinstance(ins["investigation_recommendations"], list)
    assert isinstance(ins["treatment_recommendations"], list)
    assert ins["overall_confidence_score"] is None or 0.0 <= ins["overall_confidence_score"] <= 1.0
    assert ins["model"] == "SmolLM2-135M-Instruct"
    assert result.model["file"] == f"remote:{server_url}"
    # No image input remotely: the radiology file says so instead of inventing findings.
    assert result.file_summaries["rad-1"]["findings"] == NO_IMAGE_MODEL
    assert result.file_summaries["lab-1"]["lab_values"]["CRP"]["status"] == "abnormal"
    soap_m = next(m for m in result.stages if m.stage == "soap_note")
    assert soap_m.prompt_tokens > 0 and soap_m.completion_tokens > 0
    assert stages_seen[-1] == "compile"
    assert PATIENT not in caplog.text


# --------------------------------------------------------------------------- worker pool

CSV_BYTES = b"test,value,unit,reference_range\nHemoglobin,10.1,g/dL,12-16\nWBC,14.2,10^9/L,4-11\n"


def _pool_settings(tmp_path: Path, remote_url: str) -> Settings:
    s = Settings().replace("storage", data_dir=str(tmp_path), min_free_bytes=0)
    s = s.replace("jobs", max_attempts=2, lease_s=30.0, heartbeat_s=1.0, poll_s=0.05)
    s = s.replace("server", graceful_shutdown_s=10.0)
    llm = _llm(remote_url, max_tokens_summary=64, max_tokens_soap=96,
               max_tokens_diagnosis=64, max_tokens_recommendations=96)
    return s.replace("llm", workers=1, threads=1, model_path="/nonexistent/model.gguf",
                     **{k: getattr(llm, k) for k in (
                         "remote_url", "remote_api_key", "remote_timeout_s", "n_ctx",
                         "max_tokens_lab", "max_tokens_summary", "max_tokens_soap",
                         "max_tokens_diagnosis", "max_tokens_differential",
                         "max_tokens_recommendations")})


async def _new_case(storage: Storage) -> tuple[Case, Job]:
    case = await new_case(PATIENT, patient_age=52, patient_gender="male",
                          case_summary="Cough and fever for 3 days.")
    await add_file(storage, case, "lab", filetypes.CSV, "labs.csv", CSV_BYTES)
    # Fewer model calls keep the test short: summary, SOAP, diagnosis, recommendations.
    options = {"include_differential": False, "include_lab_interpretation": False}
    return case, await queue.enqueue(case, options, max_attempts=2)


@pytest.mark.slow
def test_pool_runs_a_case_job_on_the_remote_server(tmp_path, server_url, caplog):
    caplog.set_level(logging.INFO)
    # The model file does not exist: with remote_url set the pool must not look for it.
    settings = _pool_settings(tmp_path, server_url)

    async def body(storage):
        case, job = await _new_case(storage)
        pool = WorkerPool(settings, storage)
        assert pool.status()["model"]["path"] == f"remote:{server_url}"
        started = time.perf_counter()
        await pool.start()
        try:
            async def done():
                row = await Job.get_or_none(id=job.id)
                return row is not None and row.state in ("completed", "failed")
            await wait_until(done, "the job to finish", WAIT_S)
            status = pool.status()
        finally:
            await pool.stop()
        print(f"\npool job on the remote server: {time.perf_counter() - started:.1f} s "
              "(includes the ICD-10 warm-up)")
        row = await Job.get(id=job.id)
        assert row.state == "completed", row.error
        assert status["model"]["state"] == "ready" and status["ready"] is True
        assert status["model"]["name"] == "SmolLM2-135M-Instruct"
        assert (await Case.get(id=case.id)).status == "completed"
        [ins] = await Insight.filter(case_id=case.id)
        assert set(ins.data) >= {"case_summary", "soap_note", "primary_diagnosis",
                                 "differential_diagnoses", "investigation_recommendations",
                                 "treatment_recommendations", "overall_confidence_score"}
        assert ins.model["file"] == f"remote:{server_url}"
        assert ins.model["name"] == "SmolLM2-135M-Instruct"
        [f] = await CaseFile.filter(case_id=case.id)
        assert "lab_values" in json.loads(f.ai_summary)

    run_with_db(settings, body, storage=True)
    assert PATIENT not in caplog.text
    assert "llama_cpp" not in caplog.text


def test_pool_reports_an_unreachable_server_as_missing(tmp_path):
    settings = _pool_settings(tmp_path, f"http://127.0.0.1:{_free_port()}")

    async def body(storage):
        _, job = await _new_case(storage)
        pool = WorkerPool(settings, storage)
        await pool.start()
        try:
            async def failed():
                return pool.status()["model"]["state"] == "missing"
            await wait_until(failed, "the model state to be missing", 20)
            status = pool.status()
        finally:
            await pool.stop()
        assert status["ready"] is False
        assert "unreachable" in status["model"]["error"]
        assert (await Job.get(id=job.id)).state == "queued"   # waits for the server

    run_with_db(settings, body, storage=True)
