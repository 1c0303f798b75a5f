"""Analysis stages 2-9: lab and radiology per file, summary, SOAP, diagnosis, differential,
recommendations, compile.

``run_analysis`` is synchronous and blocking (the worker runs it in a thread). Each model
call decodes under the stage's JSON-schema grammar, then ``schemas.check_output`` parses,
clamps and fills defaults. A bad answer is retried with another seed, at most
MAX_ATTEMPTS times in all, then ``StageError(stage, reason)``. Deterministic facts win
over the model: parsed lab flags, ICD-10 codes checked against the code table, and no
radiology findings without an image model.
"""

from __future__ import annotations

import importlib
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from medmitra.clinical import labs
from medmitra.config import LLMSettings
from medmitra.llm.runtime import LLMError, LLMRuntime, Usage
from medmitra.pipeline import prompts, schemas
from medmitra.pipeline.schemas import InvalidOutput, check_output, clamp_score, fit_schema
from medmitra.pipeline.types import (STAGES, AnalysisResult, Cancelled, CaseInput,
                                     ExtractedFile, ProgressFn, StageError, StageMetrics,
                                     StopFn)

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3                 # first try + 2 retries, each with a different seed
SEED_STEP = 7919                 # seed offset between attempts
# Room kept free in the context for the chat template's tokens, plus a safety share of
# n_ctx because the token count of parts differs slightly from that of the whole.
TEMPLATE_MARGIN_TOKENS = 48
SAFETY_CTX_DIVISOR = 50
# Tokens reserved in every prompt for results of earlier stages (summaries, diagnosis).
CONTEXT_RESERVE_TOKENS = 320
KEY_ABNORMALITIES_MAX_ITEMS = 6

NO_IMAGE_MODEL = "No image model is configured; the image was not read."
IMAGING_NOT_REQUESTED = "Imaging analysis was not requested; the image was not read."
IMAGE_UNREADABLE = "The image could not be decoded; it was not read."
LAB_NOT_REQUESTED = "Lab interpretation was not requested."


# --------------------------------------------------------------------------- ICD-10

def _icd10() -> Any | None:
    # Imported lazily: the code table is large and owned by another module.
    try:
        return importlib.import_module("medmitra.pipeline.icd10")
    except ImportError:
        log.warning("ICD-10 table unavailable; diagnosis codes are left empty")
        return None


def resolve_icd(code: str, diagnosis: str) -> tuple[str | None, str]:
    """(valid code or None, its description). Never passes an unchecked code through."""
    icd = _icd10()
    if icd is None:
        return None, ""
    try:
        valid = icd.normalize_code(code) if code.strip() else None
        if valid is None and diagnosis.strip():
            hits = icd.search(diagnosis, 1)
            valid = hits[0][0] if hits else None
        return (valid, icd.describe(valid) or "") if valid else (None, "")
    except Exception:  # a bug in the table lookup must not fail the whole analysis
        log.exception("ICD-10 lookup failed")
        return None, ""


# --------------------------------------------------------------------------- runner

@dataclass
class _Run:
    case: CaseInput
    runtime: LLMRuntime
    llm: LLMSettings
    progress: ProgressFn
    should_stop: StopFn
    system: dict = field(default_factory=dict)
    n_ctx: int = 0
    metrics: list[StageMetrics] = field(default_factory=list)

    def count(self, text: str) -> int:
        return self.runtime.count_tokens(text)

    def checkpoint(self, stage: str, fraction: float) -> None:
        if self.should_stop():
            raise Cancelled(f"cancelled before {stage}")
        self.progress(stage, fraction)

    def margin(self) -> int:
        return TEMPLATE_MARGIN_TOKENS + self.n_ctx // SAFETY_CTX_DIVISOR

    @contextmanager
    def stage(self, name: str) -> Iterator[StageMetrics]:
        """Bookkeeping around one stage: cancel checkpoint, progress, metrics, timing."""
        m = StageMetrics(stage=name, duration_s=0.0, attempts=0)
        self.metrics.append(m)
        started = time.perf_counter()
        self.checkpoint(name, _stage_fraction(name))
        try:
            yield m
        finally:
            m.duration_s = round(time.perf_counter() - started, 4)
            log.info("stage %s: %.2f s, %d prompt + %d completion tokens, %d attempt(s)",
                     m.stage, m.duration_s, m.prompt_tokens, m.completion_tokens, m.attempts)

    def ask(self, stage: str, schema: dict, task: str, context: str, max_tokens: int,
            m: StageMetrics, check: Callable[[dict], None] | None = None) -> dict:
        """One model answer for ``stage``, checked; retried with new seeds; else StageError."""
        schema = fit_schema(schema, max_tokens)
        bare = prompts.task_message(task, schema)
        room = (self.n_ctx - max_tokens - self.count(self.system["content"])
                - self.count(bare["content"]) - self.margin())
        context = prompts.trim_to_tokens(context, room, self.count)
        messages = [self.system, prompts.task_message(task, schema, context)]
        return self._attempts(stage, m, max_tokens, schema, lambda seed: self.runtime.complete_json(
            messages, schema, max_tokens=max_tokens, temperature=self.llm.temperature,
            seed=seed, repeat_penalty=self.llm.repeat_penalty), check)

    def ask_image(self, stage: str, schema: dict, image: Any, prompt: str, max_tokens: int,
                  m: StageMetrics) -> dict:
        schema = fit_schema(schema, max_tokens)
        prompt = f"{prompt}\nJSON schema: {schemas.prompt_schema_text(schema)}"
        return self._attempts(stage, m, max_tokens, schema,
                              lambda seed: self.runtime.describe_image_json(
                                  image, prompt, schema, max_tokens=max_tokens,
                                  temperature=self.llm.temperature, seed=seed,
                                  repeat_penalty=self.llm.repeat_penalty))

    def _attempts(self, stage: str, m: StageMetrics, max_tokens: int, schema: dict,
                  call: Callable[[int], tuple[str, Usage]],
                  check: Callable[[dict], None] | None = None) -> dict:
        started = time.monotonic()
        reason = "no attempt was made"
        for attempt in range(MAX_ATTEMPTS):
            if attempt and time.monotonic() - started > self.llm.stage_timeout_s:
                reason = f"took longer than {self.llm.stage_timeout_s:g} s ({reason})"
                break
            m.attempts = max(m.attempts, attempt + 1)
            try:
                text, usage = call(self.llm.seed + attempt * SEED_STEP)
            except LLMError as exc:
                reason = f"the model runtime failed: {exc}"
                log.warning("%s attempt %d: runtime error", stage, attempt + 1)
                continue
            m.prompt_tokens += usage.prompt_tokens
            m.completion_tokens += usage.completion_tokens
            m.cached_tokens += usage.cached_tokens
            m.prompt_eval_s += usage.prompt_eval_s
            try:
                data = check_output(text, schema)
                if check is not None:
                    check(data)
                return data
            except InvalidOutput as exc:
                reason = str(exc)
                if usage.completion_tokens >= max_tokens:
                    reason += f" (cut off at the {max_tokens}-token limit)"
                log.warning("%s attempt %d: invalid answer", stage, attempt + 1)
        raise StageError(stage, f"no valid answer after {m.attempts} attempt(s): {reason}")


def _stage_fraction(stage: str, sub: float = 0.0) -> float:
    return (STAGES.index(stage) + sub) / len(STAGES)


def _merge_abnormalities(first: list[str], second: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for item in first + second:
        if item and item.lower() not in seen:
            seen.add(item.lower())
            out.append(item)
    return out[:KEY_ABNORMALITIES_MAX_ITEMS]


def _unique_key(values: dict, name: str) -> str:
    key, n = name or "unnamed test", 2
    while key in values:
        key, n = f"{name} ({n})", n + 1
    return key


def _lab_file(run: _Run, f: ExtractedFile, label: str, m: StageMetrics) -> dict:
    lab_values: dict[str, dict] = {}
    rows_abnormal: list[str] = []
    for r in f.lab_rows:  # parsed deterministically; their flags are final
        key = _unique_key(lab_values, r.test)
        lab_values[key] = {"value": r.value, "unit": r.unit or "",
                           "reference_range": r.reference_range or "", "status": r.status}
        if r.abnormal:
            word = r.flag if r.flag in ("low", "high") else r.status
            rows_abnormal.append(f"{r.test} {r.value}{' ' + r.unit if r.unit else ''} "
                                 f"({word})")
    if not run.case.options.include_lab_interpretation:
        return {"lab_values": lab_values, "summary": LAB_NOT_REQUESTED,
                "key_abnormalities": rows_abnormal[:KEY_ABNORMALITIES_MAX_ITEMS],
                "confidence_score": 0.0}
    if f.lab_rows:
        data = run.ask("lab_analysis", schemas.LAB_INTERPRETATION,
                       prompts.TASK_LAB.format(label=label), "", run.llm.max_tokens_lab, m)
    else:
        data = run.ask("lab_analysis", schemas.LAB_FROM_TEXT,
                       prompts.TASK_LAB_TEXT.format(label=label), "", run.llm.max_tokens_lab, m)
        for item in data["lab_values"]:
            if not item["test"]:
                continue
            row = labs.make_row(item["test"], item["value"], item["unit"] or None,
                                item["reference_range"] or None)
            # The computed flag wins whenever value and range parse.
            status = row.status if row.status != "unknown" else item["status"]
            lab_values[_unique_key(lab_values, item["test"])] = {
                "value": item["value"], "unit": item["unit"],
                "reference_range": item["reference_range"], "status": status}
            if status in ("abnormal", "critical"):
                rows_abnormal.append(f"{item['test']} {item['value']} ({status})")
    return {"lab_values": lab_values, "summary": data["summary"],
            "key_abnormalities": _merge_abnormalities(rows_abnormal, data["key_abnormalities"]),
            "confidence_score": clamp_score(data["confidence_score"])}


def _tags_summary(f: ExtractedFile) -> str:
    tags = "; ".join(f"{k}: {v}" for k, v in sorted(f.dicom_tags.items()) if v)
    text = prompts.trim_to_tokens((f.text or "").strip(), 40, lambda s: len(s.split()))
    parts = [p for p in (tags, f"Text on the image: {text}" if text else "") if p]
    return ". ".join(parts)[:400] if parts else "No tags or text were available."


def _radiology_file(run: _Run, f: ExtractedFile, label: str, m: StageMetrics) -> dict:
    use_model = run.case.options.include_imaging and run.runtime.has_vision()
    if use_model and f.image is not None:
        details = prompts.trim_to_tokens(prompts.radiology_file_text(f), 256, run.count)
        data = run.ask_image("radiology_analysis", schemas.RADIOLOGY, f.image,
                             prompts.TASK_RADIOLOGY_IMAGE.format(details=details),
                             run.llm.max_tokens_radiology, m)
        data["confidence_score"] = clamp_score(data["confidence_score"])
        return data
    # No model reads the image: report what is known and say so plainly; never invent.
    if not run.case.options.include_imaging:
        findings = IMAGING_NOT_REQUESTED
    elif use_model:
        findings = IMAGE_UNREADABLE
    else:
        findings = NO_IMAGE_MODEL
    return {"findings": findings, "impressions": "", "summary": _tags_summary(f),
            "key_abnormalities": [], "confidence_score": 0.0}


def _files_context(run: _Run, summaries: dict[str, dict]) -> str:
    lines = []
    labs = [f for f in run.case.files if f.category == "lab"]
    rads = [f for f in run.case.files if f.category == "radiology"]
    if labs:
        lines.append("Lab analysis:")
        for i, f in enumerate(labs, 1):
            s = summaries[f.file_id]
            abn = "; ".join(s["key_abnormalities"])
            lines.append(f"- Lab file {i}: {s['summary']}" + (f" Abnormal: {abn}." if abn else ""))
    if rads:
        lines.append("Radiology:")
        for i, f in enumerate(rads, 1):
            s = summaries[f.file_id]
            lines.append(f"- Radiology file {i}: {s['findings']} {s['summary']}".strip())
    return "\n".join(lines)


def _joined_summary(run: _Run, summaries: dict[str, dict], category: str, none: str) -> str:
    files = [f for f in run.case.files if f.category == category]
    if not files:
        return none
    return "\n".join(f"{f.file_name}: {summaries[f.file_id]['summary']}" for f in files)


def _has_conditions(data: dict) -> None:
    if not any(d["condition"] for d in data["differential_diagnoses"]):
        raise InvalidOutput("the model's differential names no condition")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


@dataclass
class _State:
    """What the stages hand on to each other within one run."""
    summaries: dict[str, dict] = field(default_factory=dict)   # file_id -> file summary
    files_ctx: str = ""
    summary: dict = field(default_factory=dict)
    summary_ctx: str = ""
    soap: dict = field(default_factory=dict)
    dx: dict = field(default_factory=dict)
    dx_ctx: str = ""
    differential: list[dict] = field(default_factory=list)
    recs: dict = field(default_factory=dict)
    insights: dict = field(default_factory=dict)


def _per_file(category: str, worker: Callable[[_Run, ExtractedFile, str, StageMetrics], dict]
              ) -> Callable[[_Run, _State, StageMetrics], None]:
    def stage(run: _Run, st: _State, m: StageMetrics) -> None:
        files = [f for f in run.case.files if f.category == category]
        for i, f in enumerate(files, 1):
            if i > 1:
                run.checkpoint(m.stage, _stage_fraction(m.stage, (i - 1) / len(files)))
            label = prompts.file_label("Lab" if category == "lab" else "Radiology", i, f)
            st.summaries[f.file_id] = worker(run, f, label, m)
    return stage


def _case_summary(run: _Run, st: _State, m: StageMetrics) -> None:
    st.files_ctx = _files_context(run, st.summaries)
    st.summary = run.ask("case_summary", schemas.CASE_SUMMARY, prompts.TASK_SUMMARY,
                         st.files_ctx, run.llm.max_tokens_summary, m)
    st.summary_ctx = (f"Case summary: {st.summary['comprehensive_summary']}\n"
                      f"Key findings: {'; '.join(st.summary['key_findings']) or 'none listed'}")


def _soap_note(run: _Run, st: _State, m: StageMetrics) -> None:
    st.soap = run.ask("soap_note", schemas.SOAP_NOTE, prompts.TASK_SOAP,
                      f"{st.files_ctx}\n{st.summary_ctx}", run.llm.max_tokens_soap, m)


def _diagnosis(run: _Run, st: _State, m: StageMetrics) -> None:
    dx = run.ask("diagnosis", schemas.DIAGNOSIS, prompts.TASK_DIAGNOSIS,
                 f"{st.summary_ctx}\nAssessment: {st.soap['assessment']}",
                 run.llm.max_tokens_diagnosis, m)
    code, code_desc = resolve_icd(dx["icd_code"], dx["primary_diagnosis"])
    dx["icd_code"] = code
    dx["description"] = dx["description"] or code_desc
    st.dx = dx
    st.dx_ctx = f"{st.summary_ctx}\nPrimary diagnosis: {dx['primary_diagnosis']}"


def _differential(run: _Run, st: _State, m: StageMetrics) -> None:
    if run.case.options.include_differential:
        data = run.ask("differential", schemas.DIFFERENTIAL, prompts.TASK_DIFFERENTIAL,
                       st.dx_ctx, run.llm.max_tokens_differential, m, _has_conditions)
        st.differential = [d for d in data["differential_diagnoses"] if d["condition"]]


def _recommendations(run: _Run, st: _State, m: StageMetrics) -> None:
    if run.case.options.include_treatment:
        st.recs = run.ask("recommendations", schemas.RECOMMENDATIONS,
                          prompts.TASK_RECOMMENDATIONS, st.dx_ctx,
                          run.llm.max_tokens_recommendations, m)
    else:
        st.recs = run.ask("recommendations", schemas.RECOMMENDATIONS_NO_TREATMENT,
                          prompts.TASK_RECOMMENDATIONS_NO_TREATMENT, st.dx_ctx,
                          run.llm.max_tokens_recommendations, m)
        st.recs["treatments"] = []


def _compile(run: _Run, st: _State, m: StageMetrics) -> None:
    case, summary, soap, dx = run.case, st.summary, st.soap, st.dx
    scores = [clamp_score(summary["confidence_score"]), clamp_score(soap["confidence_score"]),
              clamp_score(dx["confidence_score"])]
    st.insights = {
        "case_summary": {
            "comprehensive_summary": summary["comprehensive_summary"],
            "key_findings": summary["key_findings"],
            "patient_context": {"age": case.patient_age, "gender": case.patient_gender},
            "doctor_notes": case.doctor_notes or "",
            "lab_summary": _joined_summary(run, st.summaries, "lab",
                                           "No lab results were provided."),
            "radiology_summary": _joined_summary(run, st.summaries, "radiology",
                                                 "No radiology images were provided."),
            "confidence_score": scores[0],
        },
        "soap_note": {k: soap[k] for k in ("subjective", "objective", "assessment", "plan")}
        | {"confidence_score": scores[1]},
        "primary_diagnosis": {
            "primary_diagnosis": dx["primary_diagnosis"], "icd_code": dx["icd_code"],
            "description": dx["description"], "confidence_score": scores[2],
            "supporting_evidence": dx["supporting_evidence"],
        },
        "differential_diagnoses": st.differential,
        "investigation_recommendations": st.recs["investigations"],
        "treatment_recommendations": st.recs["treatments"],
        "overall_confidence_score": _mean(scores),
        "model": run.runtime.info.get("name", ""),
    }


# The stages after extraction, in order: (name, body). Each body reads what earlier
# stages left in the _State and adds its own part; ``_Run.stage`` does the bookkeeping
# (cancel checkpoint, progress, duration, log line) around every one of them.
STAGE_TABLE: tuple[tuple[str, Callable[[_Run, _State, StageMetrics], None]], ...] = (
    ("lab_analysis", _per_file("lab", _lab_file)),
    ("radiology_analysis", _per_file("radiology", _radiology_file)),
    ("case_summary", _case_summary),
    ("soap_note", _soap_note),
    ("diagnosis", _diagnosis),
    ("differential", _differential),
    ("recommendations", _recommendations),
    ("compile", _compile),
)
assert tuple(name for name, _ in STAGE_TABLE) == STAGES[1:]


def run_analysis(case: CaseInput, runtime: LLMRuntime, llm: LLMSettings, *,
                 progress: ProgressFn, should_stop: StopFn) -> AnalysisResult:
    """Stages lab_analysis .. compile for one case; ``StageError`` or ``Cancelled`` on failure."""
    run = _Run(case, runtime, llm, progress, should_stop)
    run.n_ctx = int(runtime.info.get("n_ctx") or llm.n_ctx)

    # The facts go into one system message shared by every stage (KV prefix reuse), so
    # they are trimmed once, leaving room for the largest stage's task and answer.
    stage_max_tokens = max(llm.max_tokens_lab, llm.max_tokens_summary, llm.max_tokens_soap,
                           llm.max_tokens_diagnosis, llm.max_tokens_differential,
                           llm.max_tokens_recommendations)
    task_tokens = max(run.count(prompts.task_message(t, fit_schema(s, stage_max_tokens))["content"])
                      for t, s in ((prompts.TASK_LAB_TEXT, schemas.LAB_FROM_TEXT),
                                   (prompts.TASK_RECOMMENDATIONS, schemas.RECOMMENDATIONS),
                                   (prompts.TASK_DIFFERENTIAL, schemas.DIFFERENTIAL)))
    facts_budget = (run.n_ctx - stage_max_tokens - task_tokens - CONTEXT_RESERVE_TOKENS
                    - run.count(prompts.RULES) - run.margin())
    run.system = prompts.system_message(prompts.case_facts(case, max(0, facts_budget), run.count))

    st = _State()
    for name, body in STAGE_TABLE:
        with run.stage(name) as m:
            body(run, st, m)
    return AnalysisResult(file_summaries=st.summaries, insights=st.insights,
                          stages=run.metrics, model=dict(runtime.info))
