"""The llama.cpp runtime with the real SmolLM2-135M GGUF, plus model facts and config errors.

Tests marked ``slow`` load the real model; they run in the normal suite (a few tens of
seconds on two cores). Timings are printed (``pytest -s``) for the record.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from medmitra.config import LLMSettings, app_root
from medmitra.llm.runtime import ModelUnavailable, model_info, read_gguf_metadata
from medmitra.pipeline import prompts, schemas
from medmitra.pipeline.stages import NO_IMAGE_MODEL, run_analysis
from medmitra.pipeline.types import CaseInput, ExtractedFile, LabRow

MODEL = app_root() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
THREADS = max(1, min(2, os.cpu_count() or 1))

needs_model = pytest.mark.skipif(not MODEL.is_file(), reason=f"{MODEL} not installed")


@pytest.fixture(scope="module")
def model_link(tmp_path_factory) -> Path:
    """The model behind a symlink in a temp dir, so the hash sidecar isn't written in models/."""
    link = tmp_path_factory.mktemp("models") / MODEL.name
    link.symlink_to(MODEL)
    return link


@pytest.fixture(scope="module")
def runtime(model_link):
    from medmitra.llm.llama import LlamaRuntime

    rt = LlamaRuntime(model_link, n_ctx=2048, threads=THREADS, seed=42)
    yield rt
    rt.close()


# --------------------------------------------------------------------------- no model needed

def _fake_gguf(path: Path, name: str = "tiny", file_type: int = 15) -> Path:
    def s(text: str) -> bytes:
        raw = text.encode()
        return len(raw).to_bytes(8, "little") + raw

    kvs = (s("general.architecture") + (8).to_bytes(4, "little") + s("llama")
           + s("tokenizer.ggml.tokens") + (9).to_bytes(4, "little") + (8).to_bytes(4, "little")
           + (2).to_bytes(8, "little") + s("a") + s("b")
           + s("general.name") + (8).to_bytes(4, "little") + s(name)
           + s("general.file_type") + (4).to_bytes(4, "little") + file_type.to_bytes(4, "little"))
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little")
                     + (4).to_bytes(8, "little") + kvs + b"\0" * 64)
    return path


def test_model_info_reads_header_and_caches_hash(tmp_path):
    import hashlib

    model = _fake_gguf(tmp_path / "Tiny-Model.Q9_9.gguf")
    assert read_gguf_metadata(model) == {"general.name": "tiny", "general.file_type": 15}
    info = model_info(model)
    assert info["quantization"] == "Q4_K_M"  # general.file_type wins over the file name
    assert info["name"] == "Tiny-Model" and info["file"] == "Tiny-Model.Q9_9.gguf"
    assert info["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    sidecar = tmp_path / "Tiny-Model.Q9_9.gguf.sha256"
    record = json.loads(sidecar.read_text())
    assert record["sha256"] == info["sha256"] and record["size"] == model.stat().st_size
    # Same size and mtime: the sidecar is trusted (proved by planting a different digest).
    sidecar.write_text(json.dumps(record | {"sha256": "ab" * 32}))
    assert model_info(model)["sha256"] == "ab" * 32
    # The file changed: hashed again.
    with open(model, "ab") as f:
        f.write(b"x")
    assert model_info(model)["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()


def test_hash_cache_goes_to_the_given_folder_not_beside_the_model(tmp_path):
    """The server passes its data dir: a read-only or shared models/ folder is left alone."""
    import hashlib

    models = tmp_path / "models"
    models.mkdir()
    model = _fake_gguf(models / "m.Q4_0.gguf")
    cache = tmp_path / "data" / "cache"
    assert model_info(model, cache)["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert (cache / "m.Q4_0.gguf.sha256").is_file()
    assert sorted(p.name for p in models.iterdir()) == ["m.Q4_0.gguf"]


def test_quantization_from_file_name_when_header_lacks_it(tmp_path):
    model = _fake_gguf(tmp_path / "m-q5_k_s.gguf", file_type=999)
    assert model_info(model)["quantization"] == "Q5_K_S"


def test_missing_or_bad_model_file_is_a_clear_error(tmp_path):
    from medmitra.llm.llama import LlamaRuntime, load_runtime

    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelUnavailable, match="model file not found: .*nope.gguf"):
        model_info(missing)
    with pytest.raises(ModelUnavailable, match="not found"):
        LlamaRuntime(missing, n_ctx=512, threads=1, seed=1)
    with pytest.raises(ModelUnavailable, match="not found"):
        load_runtime(LLMSettings(model_path=str(missing)), threads=1)
    with pytest.raises(ModelUnavailable, match="no model is configured"):
        load_runtime(LLMSettings(model_path=""), threads=1)
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\3\4 this is a zip")
    with pytest.raises(ModelUnavailable, match="is not a GGUF file"):
        load_runtime(LLMSettings(model_path=str(not_gguf)), threads=1)


@needs_model
def test_vision_misconfiguration_is_a_clear_error(tmp_path, model_link):
    from medmitra.llm.llama import LlamaRuntime, load_runtime

    with pytest.raises(ModelUnavailable, match="needs both llm.vision_model_path and llm.mmproj"):
        LlamaRuntime(model_link, n_ctx=512, threads=1, seed=1, vision_model_path=model_link)
    with pytest.raises(ModelUnavailable, match="mmproj projector file not found"):
        load_runtime(LLMSettings(model_path=str(model_link), vision_model_path=str(model_link),
                                 mmproj_path=str(tmp_path / "mmproj.gguf")), threads=1)


# --------------------------------------------------------------------------- real model

@pytest.mark.slow
@needs_model
def test_load_info_and_vision_off_by_default(runtime):
    assert runtime.info["name"] == "SmolLM2-135M-Instruct"
    assert runtime.info["file"] == MODEL.name
    assert runtime.info["quantization"] == "Q4_1"
    assert runtime.info["sha256"] == MODEL_SHA256
    assert runtime.info["n_ctx"] == 2048
    assert runtime.has_vision() is False
    with pytest.raises(Exception, match="no vision model"):
        runtime.describe_image_json(None, "x", schemas.RADIOLOGY, max_tokens=16)


@pytest.mark.slow
@needs_model
def test_model_info_sha256_and_sidecar(model_link):
    sidecar = model_link.with_name(model_link.name + ".sha256")
    info = model_info(model_link)  # the runtime fixture may have hashed already
    assert info["quantization"] == "Q4_1" and info["sha256"] == MODEL_SHA256
    record = json.loads(sidecar.read_text())
    assert record["sha256"] == MODEL_SHA256
    # The second call trusts the sidecar instead of hashing 98 MB again: a planted digest
    # comes back (then the true one is put back for the other tests).
    sidecar.write_text(json.dumps(record | {"sha256": "cd" * 32}))
    try:
        assert model_info(model_link)["sha256"] == "cd" * 32
    finally:
        sidecar.write_text(json.dumps(record))
    assert model_info(model_link)["sha256"] == MODEL_SHA256


@pytest.mark.slow
@needs_model
def test_count_tokens(runtime):
    assert runtime.count_tokens("") == 0
    short, long_ = runtime.count_tokens("fever"), runtime.count_tokens("fever and cough " * 20)
    assert 1 <= short < long_ and 40 <= long_ <= 80


@pytest.mark.slow
@needs_model
def test_complete_json_is_parseable_five_times_out_of_five(runtime):
    schema = schemas.fit_schema(schemas.DIAGNOSIS, 96)
    messages = [{"role": "system", "content": "Patient: 54, female. Fever, cough, crackles."},
                {"role": "user", "content": "TASK: Give the primary diagnosis. JSON schema: "
                 + schemas.prompt_schema_text(schema)}]
    for seed in range(5):
        text, usage = runtime.complete_json(messages, schema, max_tokens=96, temperature=0.2,
                                            seed=seed, repeat_penalty=1.1)
        data = json.loads(text)
        assert list(data) == list(schema["properties"])  # keys in the schema's order
        assert isinstance(data["primary_diagnosis"], str) and data["primary_diagnosis"]
        assert isinstance(data["supporting_evidence"], list)
        checked = schemas.check_output(text, schema)
        assert 0.0 <= checked["confidence_score"] <= 1.0
        assert 0 < usage.completion_tokens <= 96 and usage.prompt_tokens > 20


@pytest.mark.slow
@needs_model
def test_set_threads_changes_the_generation_threads_of_the_loaded_context(runtime):
    """The pool moves a loaded worker from every core to half of them when a second worker
    starts ("auto" workers): llama.cpp's context must generate with the new count."""
    import llama_cpp

    ctx = runtime._llm._ctx.ctx
    batch = llama_cpp.llama_n_threads_batch(ctx)
    schema = schemas.fit_schema(schemas.DIAGNOSIS, 64)
    messages = [{"role": "user", "content": "Fever and cough. JSON: "
                 + schemas.prompt_schema_text(schema)}]
    try:
        for threads in (1, 3):
            runtime.set_threads(threads)
            assert llama_cpp.llama_n_threads(ctx) == threads
            assert llama_cpp.llama_n_threads_batch(ctx) == batch   # prompt reading keeps its own
            text, _ = runtime.complete_json(messages, schema, max_tokens=64, temperature=0.2,
                                            seed=1, repeat_penalty=1.1)
            assert isinstance(json.loads(text), dict)
    finally:
        runtime.set_threads(THREADS)
    assert llama_cpp.llama_n_threads(ctx) == THREADS


@pytest.mark.slow
@needs_model
def test_interrupt_ends_generation_between_tokens(runtime):
    """A cancelled job or a shutdown stops the answer within a token, not at max_tokens."""
    schema = schemas.fit_schema(schemas.DIAGNOSIS, 200)
    messages = [{"role": "user", "content": "Describe a diagnosis as JSON: "
                 + schemas.prompt_schema_text(schema)}]
    checks = []

    def stop_after_five() -> bool:
        checks.append(1)
        return len(checks) > 5

    runtime.interrupt = stop_after_five
    try:
        text, usage = runtime.complete_json(messages, schema, max_tokens=200, temperature=0.2,
                                            seed=1, repeat_penalty=1.1)
    finally:
        runtime.interrupt = None
    assert usage.completion_tokens <= 7
    with pytest.raises(schemas.InvalidOutput):
        schemas.check_output(text, schema)          # cut off: the stage will see why
    text, usage = runtime.complete_json(messages, schema, max_tokens=200, temperature=0.2,
                                        seed=1, repeat_penalty=1.1)
    assert usage.completion_tokens > 7              # no interrupt set: a full answer


@pytest.mark.slow
@needs_model
def test_shared_prefix_is_reused_from_the_kv_cache(runtime):
    facts = "CASE FACTS\n" + "\n".join(
        f"- Visit {i}: temperature 38.{i % 10} C, cough, fatigue, crackles." for i in range(12))
    schema = schemas.fit_schema(schemas.CASE_SUMMARY, 24)
    runs = {}
    for label, system, task in (("first", facts, "Summarise."),
                                ("same_prefix", facts, "Write the key findings."),
                                ("new_prefix", "Patient record.\n" + facts,
                                 "Write the key findings.")):
        _, usage = runtime.complete_json(
            [{"role": "system", "content": system}, {"role": "user", "content": task}], schema,
            max_tokens=24, temperature=0.2, seed=1, repeat_penalty=1.1)
        runs[label] = usage
    print("\nKV prefix reuse:", {k: (u.prompt_tokens, u.cached_tokens, round(u.prompt_eval_s, 3))
                                 for k, u in runs.items()})
    facts_tokens = runtime.count_tokens(facts)
    assert runs["same_prefix"].cached_tokens >= facts_tokens
    assert runs["new_prefix"].cached_tokens < 10
    # Timings are printed, not asserted: on a busy machine they are too noisy to compare.


class _Recorder:
    """Passes calls to the real runtime and keeps each call's Usage."""

    def __init__(self, rt):
        self.rt, self.info, self.usages, self.systems = rt, rt.info, [], []

    def complete_json(self, messages, *args, **kw):
        text, usage = self.rt.complete_json(messages, *args, **kw)
        self.usages.append(usage)
        self.systems.append(messages[0]["content"])
        return text, usage

    def __getattr__(self, name):
        return getattr(self.rt, name)


@pytest.mark.slow
@needs_model
def test_full_analysis_with_the_real_model(runtime):
    case = CaseInput(
        case_id="c1", patient_name="Test Patient", patient_age=61, patient_gender="male",
        doctor_notes="Three days of productive cough and fever. Crackles right base.",
        files=[
            ExtractedFile(file_id="lab-1", category="lab", file_name="cbc.csv", mime="text/csv",
                          lab_rows=[LabRow("WBC", "14.2", "10^9/L", "4-11", "high"),
                                    LabRow("CRP", "48", "mg/L", "<5", "high"),
                                    LabRow("Hb", "13.9", "g/dL", "13-17", "normal")]),
            ExtractedFile(file_id="rad-1", category="radiology", file_name="chest.dcm",
                          mime="application/dicom",
                          dicom_tags={"Modality": "CR", "BodyPartExamined": "CHEST",
                                      "StudyDescription": "Chest PA"}),
        ])
    # Small budgets keep the run short; the schemas shrink to fit them (fit_schema).
    llm = LLMSettings(n_ctx=2048, max_tokens_lab=96, max_tokens_summary=96,
                      max_tokens_soap=128, max_tokens_diagnosis=96,
                      max_tokens_differential=200, max_tokens_recommendations=128)
    rec = _Recorder(runtime)
    started = time.perf_counter()
    result = run_analysis(case, rec, llm, progress=lambda s, f: None, should_stop=lambda: False)
    wall_s = time.perf_counter() - started

    print(f"\nfull analysis: {wall_s:.1f} s")
    for m in result.stages:
        print(f"  {m.stage:20s} {m.duration_s:6.2f} s  prompt {m.prompt_tokens:5d}  "
              f"completion {m.completion_tokens:4d}  attempts {m.attempts}")
    print("  per call (prompt, cached, prompt_eval_s):",
          [(u.prompt_tokens, u.cached_tokens, round(u.prompt_eval_s, 2)) for u in rec.usages])

    ins = result.insights
    cs, soap, pd = ins["case_summary"], ins["soap_note"], ins["primary_diagnosis"]
    for key in ("comprehensive_summary", "doctor_notes", "lab_summary", "radiology_summary"):
        assert isinstance(cs[key], str)
    assert cs["comprehensive_summary"]
    assert isinstance(cs["key_findings"], list)
    # Copied from the case, name included (api.md: as the original's insights carried).
    assert cs["patient_context"] == {"name": "Test Patient", "age": 61, "gender": "male"}
    for key in ("subjective", "objective", "assessment", "plan"):
        assert isinstance(soap[key], str) and soap[key]
    assert isinstance(pd["primary_diagnosis"], str) and pd["primary_diagnosis"]
    assert pd["icd_code"] is None or isinstance(pd["icd_code"], str)
    assert isinstance(pd["description"], str) and isinstance(pd["supporting_evidence"], list)
    # A stage either answers within its contract or abstains with a reason (issue 9): the
    # tiny model's differentials are often duplicates, which are refused, never stored.
    if ins["stages"]["differential"]["status"] == "abstained":
        assert ins["differential_diagnoses"] == [] and ins["stages"]["differential"]["reason"]
    else:  # those no fact supports are left out (clinical/grounding.py)
        assert 1 <= len(ins["differential_diagnoses"]) <= 5
    for d in ins["differential_diagnoses"]:
        assert isinstance(d["condition"], str) and isinstance(d["reasoning"], str)
        assert isinstance(d["distinguishing_factors"], list)
    for r in ins["investigation_recommendations"]:
        assert r["urgency"] in ("urgent", "routine", "follow-up")
    for t in ins["treatment_recommendations"]:
        assert isinstance(t["precautions"], list) and isinstance(t["dosage"], str)
    # Computed confidence: a number in [0, 1], or null for an abstained section; the
    # overall score is the mean of the sections that have one.
    scores = [cs["confidence_score"], soap["confidence_score"], pd["confidence_score"]]
    probs = [d["probability"] for d in ins["differential_diagnoses"]]
    assert all(x is None or (isinstance(x, float) and 0.0 <= x <= 1.0) for x in scores)
    assert all(isinstance(x, float) and 0.0 <= x <= 1.0 for x in probs)
    given = [x for x in scores if x is not None]
    assert ins["overall_confidence_score"] == (
        pytest.approx(sum(given) / len(given), abs=1e-3) if given else None)
    assert ins["model"] == "SmolLM2-135M-Instruct"
    assert result.model["sha256"] == MODEL_SHA256
    assert result.file_summaries["lab-1"]["lab_values"]["CRP"]["status"] == "abnormal"
    assert result.file_summaries["rad-1"]["findings"] == NO_IMAGE_MODEL
    json.dumps(ins)

    # Every system message is the shared rules + facts, then the stage's own role; every
    # stage after the first reuses that shared prefix from the KV cache.
    roles = set(prompts.STAGE_SYSTEM.values())
    shared = set()
    for system in rec.systems:
        head, _, role = system.rpartition("\n\n")
        shared.add(head if role in roles else system)   # a stage without a role of its own
    assert len(rec.usages) >= 6 and len(shared) == 1
    assert len({s.rpartition("\n\n")[2] for s in rec.systems}) >= 5   # roles differ
    system_tokens = runtime.count_tokens(shared.pop())
    assert all(u.cached_tokens >= system_tokens - 2 for u in rec.usages[1:])
