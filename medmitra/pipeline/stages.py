"""Analysis stages 2-9: lab and radiology per file, summary, SOAP, diagnosis, differential,
recommendations, compile.

``run_analysis`` is synchronous and blocking (the worker runs it in a thread). Each model
call decodes under the stage's JSON-schema grammar, then ``schemas.check_output`` parses,
clamps and fills defaults. A bad answer is retried with another seed and a higher
temperature, at most MAX_ATTEMPTS times per job attempt (later job attempts continue the
sequence instead of replaying it). A model answer that is still not acceptable is
*abstained*: its fields say NOT_AVAILABLE (or null / empty lists), the stage records
``status="abstained"`` and the reason, and the analysis goes on with the facts. Only a
runtime that fails on every try (no model, broken backend) raises ``StageError``, which
fails the job. Deterministic facts win over the model: parsed lab flags, ICD-10 codes
checked against the code table, and no radiology findings without an image model.
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from medmitra import filetypes
from medmitra.clinical import coding, confidence, grounding, junk
from medmitra.clinical.identity import NAME_MARK, Redactor
from medmitra.config import LLMSettings
from medmitra.llm.runtime import LLMError, LLMRuntime, Usage
from medmitra.pipeline import prompts, schemas
from medmitra.pipeline.schemas import InvalidOutput, check_output, clamp_score, fit_schema
from medmitra.pipeline.types import (STAGES, AnalysisResult, Cancelled, CaseInput,
                                     ExtractedFile, ProgressFn, StageError, StageMetrics,
                                     StopFn)

log = logging.getLogger(__name__)

# First try + 1 retry (another seed, hotter): a model that writes junk twice abstains;
# more retries of a small model mostly repeat the junk and multiply the time per case.
MAX_ATTEMPTS = 2
SEED_STEP = 7919                 # seed offset between tries
# Each further try (within a job attempt and across job attempts) decodes a little hotter,
# so a retry is not the same greedy path again; capped at TEMPERATURE_MAX.
TEMPERATURE_STEP = 0.15
TEMPERATURE_MAX = 1.0
# What an abstained text field says (the reason is in insights.stages).
NOT_AVAILABLE = "Not available."
REPORT_SUMMARY_CHARS = 400
NO_CODE = "none"   # the model's answer when no candidate ICD-10 code fits
# The bundled demonstration model (scripts/fetch-default-model.sh installs it).
DEMONSTRATION_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMONSTRATION_NOTICE = ("These insights were written by the bundled demonstration model "
                        "(135M parameters). Its prose is not medically meaningful; only the lab "
                        "rows and their flags are computed facts. Install a clinical model "
                        "for real use.")
# Room kept free in the context for the chat template's tokens, plus a safety share of
# n_ctx because the token count of parts differs slightly from that of the whole.
TEMPLATE_MARGIN_TOKENS = 48
SAFETY_CTX_DIVISOR = 50
# Tokens reserved in every prompt for results of earlier stages (summaries, diagnosis).
CONTEXT_RESERVE_TOKENS = 320
KEY_ABNORMALITIES_MAX_ITEMS = 6
# A differential needs at least this many distinct alternatives to the primary diagnosis.
DIFFERENTIAL_MIN_KEPT = 2

NO_IMAGE_MODEL = "No image model is configured; the image was not read."
IMAGING_NOT_REQUESTED = "Imaging analysis was not requested; the image was not read."
IMAGE_UNREADABLE = "The image could not be decoded; it was not read."
LAB_NOT_REQUESTED = "Lab interpretation was not requested."


# --------------------------------------------------------------------------- ICD-10

def code_diagnosis(run: "_Run", diagnosis: str, m: StageMetrics) -> tuple[str | None, str,
                                                                           str | None]:
    """(code or None, the table's title, why no code) for a diagnosis named in words.

    Candidates come from the code table (``clinical.coding``), each already agreeing with
    the diagnosis; with several, the model chooses under an enum grammar (or "none").
    The model never writes a code, and no code is ever cut back to a shorter one."""
    try:
        cands = coding.candidates(diagnosis)
    except Exception as exc:  # the table missing or broken must not fail the analysis
        log.warning("ICD-10 lookup failed (%s)", type(exc).__name__)
        return None, "", "the ICD-10-CM table could not be searched"
    if not cands:
        return None, "", "no ICD-10-CM code agrees with the diagnosis"
    chosen = cands[0][0]
    if len(cands) > 1:
        options = "; ".join(f"{c}: {t}" for c, t in cands)
        schema = {"title": "diagnosis_code", "type": "object", "required": ["code"],
                  "properties": {"code": {"type": "string",
                                          "enum": [c for c, _ in cands] + [NO_CODE]}}}
        try:
            chosen = run.ask("diagnosis_code", schema, prompts.TASK_DIAGNOSIS_CODE.format(
                diagnosis=diagnosis, options=options), "", run.llm.max_tokens_diagnosis,
                m)["code"]
        except _NoAnswer as exc:
            return None, "", f"no code was chosen among the candidates ({exc})"
        if chosen == NO_CODE:
            return None, "", "the model found no candidate code that fits"
    problem = coding.agreement(diagnosis, chosen)
    if problem:
        return None, "", problem
    return chosen, dict(cands).get(chosen, ""), None


# --------------------------------------------------------------------------- runner

@dataclass
class _Run:
    case: CaseInput
    runtime: LLMRuntime
    llm: LLMSettings
    progress: ProgressFn
    should_stop: StopFn
    facts_text: str = ""                                    # the shared facts block
    facts: dict[str, prompts.Fact] = field(default_factory=dict)  # by id, as shown
    grounder: grounding.Grounder | None = None
    n_ctx: int = 0
    redactor: Redactor = field(default_factory=lambda: Redactor(()))
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
            if m.status == "ok" and m.attempts > 1:
                m.status = "retried"
            m.duration_s = round(time.perf_counter() - started, 4)
            log.info("stage %s: %.2f s, %d prompt + %d completion tokens, %d attempt(s)",
                     m.stage, m.duration_s, m.prompt_tokens, m.completion_tokens, m.attempts)

    def try_ask(self, stage: str, schema: dict, task: str, context: str, max_tokens: int,
                m: StageMetrics, check: Callable[[dict], None] | None = None,
                what: str = "") -> dict | None:
        """``ask``, or None when the model gave no acceptable answer (the stage abstains
        for ``what``; the reason is recorded in ``m``)."""
        try:
            return self.ask(stage, schema, task, context, max_tokens, m, check)
        except _NoAnswer as exc:
            m.abstain(f"{what}: {exc}" if what else str(exc))
            return None

    def ask(self, stage: str, schema: dict, task: str, context: str, max_tokens: int,
            m: StageMetrics, check: Callable[[dict], None] | None = None) -> dict:
        """One model answer for ``stage``, checked; retried with new seeds; else _NoAnswer
        (or StageError when the runtime itself failed on every try)."""
        schema = fit_schema(schema, max_tokens)
        system = prompts.system_message(self.facts_text, stage)
        bare = prompts.task_message(task, schema, stage=stage)
        room = (self.n_ctx - max_tokens - self.count(system["content"])
                - self.count(bare["content"]) - self.margin())
        context = prompts.trim_to_tokens(context, room, self.count)
        # Last guard: no name of the case in any message (the facts are redacted already).
        messages = [system, prompts.task_message(
            task, schema, self.redactor.redact(context, document=False), stage=stage)]
        # An answer that repeats the instructions or the example is an echo, not an answer.
        echoes = (prompts.RULES, prompts.STAGE_SYSTEM.get(stage, ""),
                  prompts.example_text(stage), task)
        return self._attempts(stage, m, max_tokens, schema,
                              lambda seed, temp: self.runtime.complete_json(
                                  messages, schema, max_tokens=max_tokens, temperature=temp,
                                  seed=seed, repeat_penalty=self.llm.repeat_penalty), check,
                              prompt_texts=echoes)

    def ask_image(self, stage: str, schema: dict, image: Any, prompt: str, max_tokens: int,
                  m: StageMetrics) -> dict | None:
        schema = fit_schema(schema, max_tokens)
        prompt = self.redactor.redact(prompt, document=False)
        prompt = f"{prompt}\nJSON schema: {schemas.prompt_schema_text(schema)}"
        try:
            return self._attempts(stage, m, max_tokens, schema,
                                  lambda seed, temp: self.runtime.describe_image_json(
                                      image, prompt, schema, max_tokens=max_tokens,
                                      temperature=temp, seed=seed,
                                      repeat_penalty=self.llm.repeat_penalty),
                                  prompt_texts=(prompt,))
        except _NoAnswer as exc:
            m.abstain(str(exc))
            return None

    def sampling(self, attempt: int) -> tuple[int, float]:
        """(seed, temperature) of try ``attempt`` of this job attempt: later job attempts
        continue the sequence, so a re-queued job never replays the tries that failed."""
        k = (max(1, self.case.attempt) - 1) * MAX_ATTEMPTS + attempt
        base = self.llm.temperature
        temp = min(max(TEMPERATURE_MAX, base), base + k * TEMPERATURE_STEP)
        return self.llm.seed + k * SEED_STEP, round(temp, 4)

    def _attempts(self, stage: str, m: StageMetrics, max_tokens: int, schema: dict,
                  call: Callable[[int, float], tuple[str, Usage]],
                  check: Callable[[dict], None] | None = None,
                  prompt_texts: tuple[str, ...] = ()) -> dict:
        started = time.monotonic()
        reason = "no attempt was made"
        answered = False  # did the runtime give any text at all?
        for attempt in range(MAX_ATTEMPTS):
            if attempt and time.monotonic() - started > self.llm.stage_timeout_s:
                reason = f"took longer than {self.llm.stage_timeout_s:g} s ({reason})"
                break
            m.attempts = max(m.attempts, attempt + 1)
            try:
                text, usage = call(*self.sampling(attempt))
            except LLMError as exc:
                reason = f"the model runtime failed: {exc}"
                log.warning("%s attempt %d: runtime error", stage, attempt + 1)
                continue
            answered = True
            m.prompt_tokens += usage.prompt_tokens
            m.completion_tokens += usage.completion_tokens
            m.cached_tokens += usage.cached_tokens
            m.prompt_eval_s += usage.prompt_eval_s
            m.generate_s += usage.generate_s
            try:
                # The name placeholder the model may copy is never stored or passed on.
                data = _map_strings(check_output(text, schema), unmark)
                try:
                    data = junk.screen_answer(data, schema, prompt_texts=prompt_texts)
                except junk.JunkAnswer as exc:
                    raise InvalidOutput(str(exc)) from None
                copied = prompts.copies_example(stage, data)
                if copied:
                    raise InvalidOutput(f"a copy of the prompt's example ({copied!r})")
                if check is not None:
                    check(data)
                return data
            except InvalidOutput as exc:
                reason = str(exc)
                if usage.completion_tokens >= max_tokens:
                    reason += f" (cut off at the {max_tokens}-token limit)"
                log.warning("%s attempt %d: invalid answer", stage, attempt + 1)
        if not answered and reason.startswith("the model runtime failed"):
            # Infrastructure, not prose: the job fails (and may be retried).
            raise StageError(stage, f"no answer after {m.attempts} attempt(s): {reason}")
        raise _NoAnswer(f"no acceptable answer after {m.attempts} attempt(s): {reason}")


class _NoAnswer(Exception):
    """The model answered, but nothing it wrote was acceptable: the stage abstains."""


def _stage_fraction(stage: str, sub: float = 0.0) -> float:
    return (STAGES.index(stage) + sub) / len(STAGES)


def _merge_findings(facts: list[str], model: list[str]) -> list[str]:
    """Every fact first, unchanged; then the model's items that are not already there."""
    seen: set[str] = set()
    out = []
    for item in facts + model:
        if item and item.lower() not in seen:
            seen.add(item.lower())
            out.append(item)
    return out


def _unique_key(values: dict, name: str) -> str:
    key, n = name or "unnamed test", 2
    while key in values:
        key, n = f"{name} ({n})", n + 1
    return key


def _lab_file(run: _Run, f: ExtractedFile, label: str, m: StageMetrics) -> dict:
    """A lab file's record: its rows and flags (deterministic, final), every abnormal row
    as a key abnormality, and the model's interpretation -- which never sets a value or a
    flag: a file whose rows could not be parsed is summarised from its text, no more."""
    lab_values: dict[str, dict] = {}
    for r in f.lab_rows:
        lab_values[_unique_key(lab_values, r.test)] = {
            "value": r.value, "unit": r.unit or "", "reference_range": r.reference_range or "",
            "status": r.status}
    rows_abnormal = [r.finding() for r in f.lab_rows if r.abnormal]
    record = {"lab_values": lab_values,
              "labs": [r.to_dict(f.file_id) for r in f.lab_rows],
              "lab_counts": {"rows_parsed": len(f.lab_rows),
                             "lines_not_parsed": f.lab_lines_unparsed}}
    if not run.case.options.include_lab_interpretation:
        return record | {"summary": LAB_NOT_REQUESTED, "key_abnormalities": rows_abnormal,
                         "confidence_score": None}
    data = run.try_ask("lab_analysis", schemas.LAB_INTERPRETATION,
                       prompts.TASK_LAB.format(label=label), "", run.llm.max_tokens_lab, m,
                       what=label)
    if data is None:
        return record | {"summary": NOT_AVAILABLE, "key_abnormalities": rows_abnormal,
                         "confidence_score": None}
    extra = data["key_abnormalities"][:KEY_ABNORMALITIES_MAX_ITEMS]
    return record | {"summary": data["summary"],
                     "key_abnormalities": _merge_findings(rows_abnormal, extra),
                     "confidence_score": clamp_score(data["confidence_score"])}


def _tags_summary(f: ExtractedFile) -> str:
    tags = "; ".join(f"{k}: {v}" for k, v in sorted(f.dicom_tags.items()) if v)
    text = prompts.trim_to_tokens((f.text or "").strip(), 40, lambda s: len(s.split()))
    parts = [p for p in (tags, f"Text on the image: {text}" if text else "") if p]
    return ". ".join(parts)[:400] if parts else "No tags or text were available."


def _radiology_file(run: _Run, f: ExtractedFile, label: str, m: StageMetrics) -> dict:
    if f.mime == filetypes.PDF:
        # A radiology report: the radiologist's own findings and impression are the
        # radiology text, quoted, never turned into lab values or re-written by a model.
        sec = f.report_sections
        text = " ".join((f.text or "").split())
        findings = sec.get("findings") or (text[:REPORT_SUMMARY_CHARS] if text else
                                            "The report has no readable text.")
        return {"findings": findings, "impressions": sec.get("impression", ""),
                "summary": (sec.get("impression") or findings)[:REPORT_SUMMARY_CHARS],
                "key_abnormalities": [], "confidence_score": None,
                "source": "radiology report (text as written)"}
    use_model = run.case.options.include_imaging and run.runtime.has_vision()
    if use_model and f.image is not None:
        details = prompts.trim_to_tokens(prompts.radiology_file_text(f, run.redactor), 256,
                                         run.count)
        data = run.ask_image("radiology_analysis", schemas.RADIOLOGY, f.image,
                             prompts.TASK_RADIOLOGY_IMAGE.format(details=details),
                             run.llm.max_tokens_radiology, m)
        if data is None:
            return {"findings": NOT_AVAILABLE, "impressions": "", "summary": _tags_summary(f),
                    "key_abnormalities": [], "confidence_score": None}
        data["confidence_score"] = clamp_score(data["confidence_score"])
        return data
    # No model reads the image: report what is known and say so plainly; never invent.
    if not run.case.options.include_imaging:
        findings = IMAGING_NOT_REQUESTED
    elif use_model:
        findings = IMAGE_UNREADABLE
    else:
        findings = NO_IMAGE_MODEL
    # No number where nothing was assessed (null, not 0.0: a reader would see a score).
    return {"findings": findings, "impressions": "", "summary": _tags_summary(f),
            "key_abnormalities": [], "confidence_score": None}


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


_NOT_READ = (NO_IMAGE_MODEL, IMAGING_NOT_REQUESTED, IMAGE_UNREADABLE)


def _joined_summary(run: _Run, summaries: dict[str, dict], category: str, none: str) -> str:
    files = [f for f in run.case.files if f.category == category]
    if not files:
        return none
    lines = []
    for f in files:
        s = summaries[f.file_id]
        if category == "radiology" and s["findings"] in _NOT_READ:
            # Say first that the image was not read; then what its tags or text say.
            lines.append(f"{f.file_name}: {s['findings']} {s['summary']}".strip())
        else:
            lines.append(f"{f.file_name}: {s['summary']}")
    return "\n".join(lines)


def _differential_check(primary: str) -> Callable[[dict], None]:
    """Duplicates and repeats of the primary diagnosis are dropped; fewer than
    DIFFERENTIAL_MIN_KEPT distinct alternatives, or probabilities that are not a
    distribution, reject the answer."""
    def check(data: dict) -> None:
        items = [d for d in data["differential_diagnoses"] if d["condition"]]
        if not items:
            raise InvalidOutput("the model's differential names no condition")
        kept, dropped = junk.differential_problems(items, primary)
        if len(kept) < DIFFERENTIAL_MIN_KEPT:
            raise InvalidOutput(f"the differential names fewer than {DIFFERENTIAL_MIN_KEPT} "
                                f"distinct alternatives ({'; '.join(dropped) or 'too few'})")
        problem = junk.probabilities_problem([d["probability"] for d in kept])
        if problem:
            raise InvalidOutput(f"the differential's {problem}")
        data["differential_diagnoses"] = kept
    return check


# The name placeholder a model copied from its prompt ("The [patient]'s hemoglobin"), with
# the article before it: it is never stored, "the patient" is said instead.
_NAME_MARK_RE = re.compile(rf"(?:\b(the|a)\s+)?{re.escape(NAME_MARK)}", re.IGNORECASE)
NEUTRAL_NAME = "the patient"


def unmark(text: str) -> str:
    """``text`` with every NAME_MARK replaced by NEUTRAL_NAME ("The [patient]'s" -> "The
    patient's", "[patient] has" -> "the patient has"; capitalised at a sentence start)."""
    def repl(m: re.Match) -> str:
        first = (m.group(1) or "")[:1] or ("T" if m.start() == 0 or text[:m.start()].rstrip()
                                            .endswith((".", "!", "?")) else "t")
        return ("The" if first.isupper() else "the") + NEUTRAL_NAME[3:]
    return _NAME_MARK_RE.sub(repl, text) if NAME_MARK in text.lower() else text


def _map_strings(obj: Any, fn: Callable[[str], str]) -> Any:
    """``obj`` with ``fn`` applied to every string in it (nested dicts and lists)."""
    if isinstance(obj, str):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_strings(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_strings(v, fn) for v in obj]
    return obj


def _redact_all(obj: Any, redactor: Redactor) -> Any:
    """Every name of the case out of model-written text, said as NEUTRAL_NAME (never the
    NAME_MARK placeholder)."""
    return _map_strings(obj, lambda s: unmark(redactor.redact(s, document=False)))


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


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
            label = prompts.file_label("Lab" if category == "lab" else "Radiology", i, f,
                                       run.redactor)
            st.summaries[f.file_id] = worker(run, f, label, m)
    return stage


def _case_summary(run: _Run, st: _State, m: StageMetrics) -> None:
    st.files_ctx = _files_context(run, st.summaries)
    st.summary = run.try_ask("case_summary", schemas.CASE_SUMMARY, prompts.TASK_SUMMARY,
                             st.files_ctx, run.llm.max_tokens_summary, m) or {
        "comprehensive_summary": NOT_AVAILABLE, "key_findings": [], "confidence_score": None}
    st.summary_ctx = (f"Case summary: {st.summary['comprehensive_summary']}\n"
                      f"Key findings: {'; '.join(st.summary['key_findings']) or 'none listed'}")


def _soap_note(run: _Run, st: _State, m: StageMetrics) -> None:
    st.soap = run.try_ask("soap_note", schemas.SOAP_NOTE, prompts.TASK_SOAP,
                          f"{st.files_ctx}\n{st.summary_ctx}", run.llm.max_tokens_soap, m) or (
        dict.fromkeys(("subjective", "objective", "assessment", "plan"), NOT_AVAILABLE)
        | {"confidence_score": None})


def _cited(run: _Run, ids: list[str]) -> list[prompts.Fact]:
    return [run.facts[i] for i in ids if i in run.facts]


def _diagnosis_check(run: _Run, section: str, judged: list) -> Callable[[dict], None]:
    """A primary diagnosis no fact supports (clinical/grounding.py) rejects the answer;
    the evidence stored is the cited facts' own text. ``judged`` collects each try's
    (condition, problem) so the final outcome is recorded once."""
    def check(data: dict) -> None:
        cited = _cited(run, data.get(schemas.EVIDENCE, []))
        problem = run.grounder.diagnosis_problem(data["primary_diagnosis"], cited)
        judged.append((data["primary_diagnosis"], problem))
        if problem:
            raise InvalidOutput(f"the primary diagnosis is {problem}")
        data[schemas.EVIDENCE] = [f.text for f in cited]
    return check


def _diagnosis(run: _Run, st: _State, m: StageMetrics) -> None:
    judged: list[tuple[str, str | None]] = []
    if not any(f.informative for f in run.facts.values()):
        # Nothing a diagnosis could rest on (no notes, no abnormal result, no report).
        m.abstain("the case has no fact a diagnosis could rest on")
        dx = None
    else:
        dx = run.try_ask("diagnosis", schemas.cite(schemas.DIAGNOSIS, list(run.facts)),
                         prompts.TASK_DIAGNOSIS,
                         f"{st.summary_ctx}\nAssessment: {st.soap['assessment']}",
                         run.llm.max_tokens_diagnosis, m,
                         _diagnosis_check(run, "primary_diagnosis", judged))
    if judged:
        condition, problem = judged[-1]
        if dx is None and problem is not None:
            run.grounder.record_diagnosis("primary_diagnosis", condition, problem)
        elif dx is not None:
            run.grounder.record_diagnosis("primary_diagnosis", condition, None)
    if dx is None:
        st.dx = {"primary_diagnosis": NOT_AVAILABLE, "icd_code": None, "description": "",
                 "supporting_evidence": [], "confidence_score": None,
                 "icd_reason": "the diagnosis stage abstained"}
        st.dx_ctx = st.summary_ctx
        return
    code, title, reason = code_diagnosis(run, dx["primary_diagnosis"], m)
    dx["icd_code"], dx["icd_reason"] = code, reason
    # With a code, its description is the table's title (never the model's words).
    dx["description"] = title if code else dx["description"]
    st.dx = dx
    st.dx_ctx = f"{st.summary_ctx}\nPrimary diagnosis: {dx['primary_diagnosis']}"


def _differential(run: _Run, st: _State, m: StageMetrics) -> None:
    if run.case.options.include_differential:
        primary = st.dx["primary_diagnosis"] if st.dx["primary_diagnosis"] != NOT_AVAILABLE \
            else ""
        data = run.try_ask("differential", schemas.cite(schemas.DIFFERENTIAL, list(run.facts)),
                           prompts.TASK_DIFFERENTIAL, st.dx_ctx,
                           run.llm.max_tokens_differential, m, _differential_check(primary))
        if data is not None:
            st.differential = _supported_differentials(run, data["differential_diagnoses"], m)


def _supported_differentials(run: _Run, items: list[dict], m: StageMetrics) -> list[dict]:
    """The differentials some fact supports (clinical/grounding.py), each with its cited
    facts' own text as evidence; the others are left out and counted."""
    kept = []
    for d in items:
        cited = _cited(run, d.get(schemas.EVIDENCE, []))
        problem = run.grounder.diagnosis_problem(d["condition"], cited)
        run.grounder.record_diagnosis("differential", d["condition"], problem)
        if problem is None:
            kept.append(d | {schemas.EVIDENCE: [f.text for f in cited]})
    if items and not kept:
        m.abstain("no differential diagnosis was supported by a fact")
    return kept


def _recommendations(run: _Run, st: _State, m: StageMetrics) -> None:
    if run.case.options.include_treatment:
        recs = run.try_ask("recommendations", schemas.RECOMMENDATIONS,
                           prompts.TASK_RECOMMENDATIONS, st.dx_ctx,
                           run.llm.max_tokens_recommendations, m)
    else:
        recs = run.try_ask("recommendations", schemas.RECOMMENDATIONS_NO_TREATMENT,
                           prompts.TASK_RECOMMENDATIONS_NO_TREATMENT, st.dx_ctx,
                           run.llm.max_tokens_recommendations, m)
    st.recs = {"investigations": [], "treatments": []} | (recs or {})
    if not run.case.options.include_treatment:
        st.recs["treatments"] = []


def _grounder(case: CaseInput) -> grounding.Grounder:
    """The case's sources as the grounding checks see them (rules in clinical/grounding.py)."""
    rows = [r for f in case.files if f.category == "lab" for r in f.lab_rows]
    texts = [case.doctor_notes or "", str(case.patient_age)]
    texts += [f.text or "" for f in case.files]
    texts += [f"{k}: {v}" for f in case.files for k, v in f.dicom_tags.items()]
    return grounding.Grounder(rows, texts,
                              has_radiology=any(f.category == "radiology" for f in case.files))


def _ground(g: grounding.Grounder, run: _Run, st: _State) -> None:
    """Drop what the sources do not support from every model-written text (rules in
    clinical/grounding.py); a prose field left empty says NOT_AVAILABLE."""
    def prose(section: str, text: str) -> str:
        if text in ("", NOT_AVAILABLE):
            return text
        return g.text(section, text) or NOT_AVAILABLE

    for f in run.case.files:
        rec = st.summaries.get(f.file_id)
        if f.category != "lab" or rec is None or rec["confidence_score"] is None:
            continue
        facts = [r.finding() for r in f.lab_rows if r.abnormal]
        rec["summary"] = prose("lab_analysis", rec["summary"])
        extra = [k for k in rec["key_abnormalities"] if k not in facts]
        rec["key_abnormalities"] = _merge_findings(facts, g.items("lab_analysis", extra))
    st.summary["comprehensive_summary"] = prose("case_summary",
                                                st.summary["comprehensive_summary"])
    st.summary["key_findings"] = g.items("case_summary", st.summary["key_findings"])
    for k in ("subjective", "objective", "assessment", "plan"):
        st.soap[k] = prose("soap_note", st.soap[k])
    if not st.dx["icd_code"]:  # with a code, the description is the table's title
        st.dx["description"] = g.text("primary_diagnosis", st.dx["description"])
    # supporting_evidence is the cited facts' own text: nothing to check.
    for d in st.differential:
        d["reasoning"] = g.text("differential", d["reasoning"])
        d["distinguishing_factors"] = g.items("differential", d["distinguishing_factors"])
    for inv in st.recs["investigations"]:
        for k in ("rationale", "expected_findings"):
            inv[k] = g.text("recommendations", inv[k])
    for t in st.recs["treatments"]:
        # Doses and durations too: a number the sources do not hold is not stored.
        for k in ("description", "dosage", "duration"):
            t[k] = g.text("recommendations", t[k])
        t["precautions"] = g.items("recommendations", t["precautions"])


def _model_info(runtime: LLMRuntime, llm: LLMSettings) -> dict:
    info = runtime.info
    file = str(info.get("file") or "")
    demo = bool(file) and Path(file).name == DEMONSTRATION_MODEL_FILE
    out = {"name": info.get("name", ""), "file": Path(file).name if file else "",
           "demonstration": demo}
    if demo:
        out["notice"] = DEMONSTRATION_NOTICE
    return out


def _compile(run: _Run, st: _State, m: StageMetrics) -> None:
    case = run.case
    g = run.grounder
    _ground(g, run, st)
    summary, soap, dx = st.summary, st.soap, st.dx
    lab_files = [f for f in case.files if f.category == "lab"]
    rows = [(f, r) for f in lab_files for r in f.lab_rows]
    unparsed = sum(f.lab_lines_unparsed for f in lab_files)
    determ = confidence.deterministic_share(len(rows), unparsed)
    status = {mm.stage: mm.status for mm in run.metrics}
    # Computed, never the model's own number (formula in clinical/confidence.py).
    for f in lab_files:
        rec = st.summaries[f.file_id]
        if rec["confidence_score"] is not None:
            rec["confidence_score"] = confidence.section(
                status["lab_analysis"], g.share("lab_analysis"),
                confidence.deterministic_share(len(f.lab_rows), f.lab_lines_unparsed))
    scores = [None if x["confidence_score"] is None
              else confidence.section(status[stage], g.share(section), determ)
              for x, stage, section in ((summary, "case_summary", "case_summary"),
                                        (soap, "soap_note", "soap_note"),
                                        (dx, "diagnosis", "primary_diagnosis"))]
    threshold = case.options.confidence_threshold
    # Every abnormal row is a key finding, whatever the model wrote; the model may add.
    facts = [r.finding() for _, r in rows if r.abnormal]
    st.insights = {
        "case_summary": {
            "comprehensive_summary": summary["comprehensive_summary"],
            "key_findings": _merge_findings(facts, summary["key_findings"]),
            # Copied from the case (never model-written; the model never saw the name).
            "patient_context": {"name": case.patient_name, "age": case.patient_age,
                                "gender": case.patient_gender},
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
            "supporting_evidence": dx["supporting_evidence"], "icd_reason": dx["icd_reason"],
        },
        "differential_diagnoses": st.differential,
        "investigation_recommendations": st.recs["investigations"],
        "treatment_recommendations": st.recs["treatments"],
        "overall_confidence_score": confidence.overall(scores),
        "model": run.runtime.info.get("name", ""),
        "model_info": _model_info(run.runtime, run.llm),
        "stages": {mm.stage: {"status": mm.status, "reason": mm.reason} for mm in run.metrics
                   if mm.stage != "compile"},
        "labs": [r.to_dict(f.file_id) for f, r in rows],
        "lab_counts": {"rows_parsed": len(rows), "lines_not_parsed": unparsed},
        "grounding": g.summary(),
    }
    if threshold is not None:
        for key, score in zip(("case_summary", "soap_note", "primary_diagnosis"), scores):
            st.insights[key]["below_threshold"] = confidence.below(score, threshold)


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
    # The largest stage-specific part: its system guidance, example, task and schema.
    many_ids = [f"L{i}" for i in range(1, schemas.PROMPT_ENUM_MAX + 2)]
    task_tokens = max(
        run.count(prompts.STAGE_SYSTEM.get(stage, "")) + run.count(prompts.task_message(
            t, fit_schema(schemas.cite(s, many_ids), stage_max_tokens), stage=stage)["content"])
        for stage, t, s in (("lab_analysis", prompts.TASK_LAB, schemas.LAB_INTERPRETATION),
                            ("recommendations", prompts.TASK_RECOMMENDATIONS,
                             schemas.RECOMMENDATIONS),
                            ("differential", prompts.TASK_DIFFERENTIAL, schemas.DIFFERENTIAL),
                            ("diagnosis", prompts.TASK_DIAGNOSIS, schemas.DIAGNOSIS)))
    facts_budget = (run.n_ctx - stage_max_tokens - task_tokens - CONTEXT_RESERVE_TOKENS
                    - run.count(prompts.RULES) - run.margin())
    run.redactor = prompts.redactor_for(case)
    run.facts_text, run.facts = prompts.numbered_case_facts(case, max(0, facts_budget),
                                                            run.count, run.redactor)
    run.grounder = _grounder(case)

    st = _State()
    for name, body in STAGE_TABLE:
        with run.stage(name) as m:
            body(run, st, m)
    # The model never saw a name; should one appear anyway, it is not stored.
    # (patient_context and doctor_notes are the case's own fields, copied as they are.)
    kept = {k: st.insights["case_summary"].pop(k) for k in ("patient_context", "doctor_notes")}
    st.insights = _redact_all(st.insights, run.redactor)
    st.insights["case_summary"].update(kept)
    st.summaries = _redact_all(st.summaries, run.redactor)
    return AnalysisResult(file_summaries=st.summaries, insights=st.insights,
                          stages=run.metrics, model=dict(runtime.info))
