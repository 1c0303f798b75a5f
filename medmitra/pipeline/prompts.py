"""Prompts: a system prompt per stage, one short generic example per stage, case facts once.

Every stage's messages are ``[system: RULES + case facts + the stage's role and rules,
user: earlier results + example + task + schema]``. RULES and the case facts come first and
are byte-identical in all stages of a case, so llama.cpp evaluates that prefix once and
later stages only pay for their own guidance, example and instruction (KV-cache prefix
reuse works on tokens, not on whole messages). The chat template is the GGUF's own.

Every fact the model sees has a short id: ``[L3]`` a lab row, ``[N1]`` a sentence of the
doctor's notes, ``[R2]`` a line or sentence of a radiology file (tags, report, text on the
image), ``[T4]`` a line of a lab file whose rows could not be parsed. The diagnosis and
differential stages cite evidence by these ids only (an enum in their grammar); the stored
evidence is the facts' own text (``Fact.text``), never the model's words.

Facts are trimmed by tokens (``trim_to_tokens``) at line or word boundaries, once per case,
so the prefix stays the same across stages; only ids still visible after trimming can be
cited. No patient identity goes to the model: the case's name is left out, documents lose
their identity header lines ("Patient: ...", "DOB ...", "MRN ...") and every name found in
the case or those headers is replaced (``clinical.identity.Redactor``), file names included.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from medmitra.clinical import labs
from medmitra.clinical.grounding import split_sentences
from medmitra.clinical.identity import Redactor
from medmitra.pipeline.schemas import prompt_schema_text
from medmitra.pipeline.types import CaseInput, ExtractedFile

CountFn = Callable[[str], int]

RULES = (
    "You are a careful clinical documentation assistant. Use only the case facts below; "
    "if something is not in the facts, say it is not available instead of inventing it. "
    "Each fact has an id in brackets, such as [L1]. "
    "Answer with one JSON object that matches the schema given in the task."
)
TRIM_MARK = "[... trimmed to fit]"


def trim_to_tokens(text: str, max_tokens: int, count: CountFn) -> str:
    """``text`` cut to at most ``max_tokens`` tokens, at a line or word boundary.

    Keeps as many whole lines as fit (binary search over line counts); if not even the
    first line fits, keeps as many whole words of it as fit. Appends TRIM_MARK when cut.
    """
    if max_tokens <= 0 or not text:
        return ""
    if count(text) <= max_tokens:
        return text
    budget = max_tokens - count(TRIM_MARK) - 1
    if budget <= 0:
        return ""

    def longest(parts: list[str], sep: str) -> int:
        lo, hi = 0, len(parts)  # invariant: parts[:lo] fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(sep.join(parts[:mid])) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    lines = text.splitlines()
    n_lines = longest(lines, "\n")
    if n_lines > 0:
        return "\n".join(lines[:n_lines]).rstrip() + "\n" + TRIM_MARK
    words = lines[0].split() if lines else []
    n_words = longest(words, " ")
    if n_words == 0:
        return ""
    return " ".join(words[:n_words]) + " " + TRIM_MARK


def redactor_for(case: CaseInput) -> Redactor:
    """The names to keep from the model: the case's, and those printed in its documents."""
    return Redactor.for_case(case.patient_name, [case.doctor_notes or ""]
                             + [f.text or "" for f in case.files])


@dataclass(frozen=True)
class Fact:
    """One numbered fact: ``text`` is what is stored when the model cites ``id``.
    ``informative``: it can support a diagnosis (an abnormal lab row, a sentence of the
    notes or of a report); a normal lab row or a DICOM tag cannot. ``lab``: a lab row."""
    id: str
    text: str
    informative: bool
    lab: bool = False


class _Numbering:
    def __init__(self) -> None:
        self.facts: dict[str, Fact] = {}
        self._next: dict[str, int] = {}

    def add(self, prefix: str, text: str, informative: bool) -> str:
        """``text`` as a prompt line with its new id."""
        n = self._next.get(prefix, 0) + 1
        self._next[prefix] = n
        fid = f"{prefix}{n}"
        self.facts[fid] = Fact(fid, text, informative, lab=prefix == "L")
        return f"[{fid}] {text}"


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in (text or "").splitlines() if ln.strip()]


def lab_file_text(f: ExtractedFile, redactor: Redactor | None = None,
                  numbering: _Numbering | None = None) -> str:
    """A lab file as the model sees it: parsed rows when present, else its text lines."""
    red = redactor or Redactor(())
    num = numbering or _Numbering()
    if f.lab_rows:
        return "\n".join(f"- {num.add('L', red.redact(labs.render_row(r)), r.abnormal)}"
                         for r in f.lab_rows)
    lines = _lines(red.redact(f.text or ""))
    return "\n".join(num.add("T", ln, True) for ln in lines) or "(no readable text)"


def radiology_file_text(f: ExtractedFile, redactor: Redactor | None = None,
                        numbering: _Numbering | None = None) -> str:
    """Non-identifying DICOM tags and any report or OCR text of a radiology file."""
    red = redactor or Redactor(())
    num = numbering or _Numbering()
    parts = [num.add("R", red.redact(f"{k}: {v}", document=False), False)
             for k, v in sorted(f.dicom_tags.items()) if v]
    if f.report_sections:
        for k, v in f.report_sections.items():
            parts += [num.add("R", f"Report {k}: {sent}", True)
                      for sent in split_sentences(" ".join(red.redact(v).split()))]
    elif f.text and f.text.strip():
        kind = "Report text" if f.mime == "application/pdf" else "Text on the image"
        parts += [num.add("R", f"{kind}: {sent}", True)
                  for sent in split_sentences(" ".join(red.redact(f.text).split()))]
    return "\n".join(parts) or "(no tags or text)"


def notes_text(notes: str, redactor: Redactor, numbering: _Numbering) -> str:
    """The doctor's notes, one numbered sentence a line."""
    text = " ".join(redactor.redact((notes or "").strip(), document=False).split())
    return "\n".join(numbering.add("N", sent, True) for sent in split_sentences(text)) \
        or "(none given)"


def file_label(kind: str, index: int, f: ExtractedFile, redactor: Redactor | None = None) -> str:
    name = (redactor or Redactor(())).redact(f.file_name, document=False)
    return f"{kind} file {index} ({name})"


def numbered_case_facts(case: CaseInput, budget_tokens: int, count: CountFn,
                        redactor: Redactor | None = None) -> tuple[str, dict[str, Fact]]:
    """The case facts block shared by every stage, at most ``budget_tokens`` tokens, and
    its facts by id (only those whose id is still in the block after trimming).

    The budget is shared out fairly: small documents keep their full text and what they
    don't use goes to the larger ones.
    """
    red = redactor or redactor_for(case)
    num = _Numbering()
    header = [f"CASE FACTS\nPatient: age {case.patient_age}, gender {case.patient_gender}."]
    docs: list[tuple[str, str]] = [("Doctor's notes", notes_text(case.doctor_notes or "", red,
                                                                  num))]
    labs = [f for f in case.files if f.category == "lab"]
    rads = [f for f in case.files if f.category == "radiology"]
    docs += [(file_label("Lab", i, f, red), lab_file_text(f, red, num))
             for i, f in enumerate(labs, 1)]
    docs += [(file_label("Radiology", i, f, red), radiology_file_text(f, red, num))
             for i, f in enumerate(rads, 1)]
    if not labs:
        header.append("Lab files: none.")
    if not rads:
        header.append("Radiology files: none.")

    fixed = "\n".join(header) + "".join(f"\n{title}:\n" for title, _ in docs)
    remaining = max(0, budget_tokens - count(fixed))
    bodies: dict[int, str] = {}
    order = sorted(range(len(docs)), key=lambda i: count(docs[i][1]))
    for pos, i in enumerate(order):
        share = remaining // (len(order) - pos)
        body = trim_to_tokens(docs[i][1], share, count)
        bodies[i] = body
        remaining -= count(body)
    blocks = [f"{title}:\n{bodies[i] or TRIM_MARK}" for i, (title, _) in enumerate(docs)]
    text = "\n".join(header) + "\n" + "\n".join(blocks)
    visible = {fid: f for fid, f in num.facts.items() if f"[{fid}]" in text}
    return text, visible


def system_message(facts: str, stage: str = "") -> dict:
    """RULES and the facts first (the prefix shared by every stage), then the stage's own
    role and rules."""
    guide = STAGE_SYSTEM.get(stage, "")
    return {"role": "system", "content": f"{RULES}\n\n{facts}" + (f"\n\n{guide}" if guide
                                                                    else "")}


def task_message(task: str, schema: dict, context: str = "", stage: str = "") -> dict:
    """The stage-specific part, always last so the shared prefix comes first."""
    ctx = f"{context.strip()}\n\n" if context.strip() else ""
    example = _fit_example(STAGE_EXAMPLE.get(stage), schema)
    ex = (f"Example (another patient): {json.dumps(example, separators=(',', ':'))}\n"
          if example else "")
    return {"role": "user",
            "content": f"{ctx}{ex}TASK: {task}\nJSON schema: {prompt_schema_text(schema)}"}


def _fit_example(example, schema: dict):
    """The example without the keys ``schema`` does not have (e.g. no treatments asked)."""
    if isinstance(example, dict) and schema.get("type") == "object":
        props = schema.get("properties") or {}
        return {k: _fit_example(v, props[k]) for k, v in example.items() if k in props}
    if isinstance(example, list) and isinstance(schema.get("items"), dict):
        return [_fit_example(v, schema["items"]) for v in example]
    return example


def example_text(stage: str) -> str:
    """The stage's example answer as text (an answer that repeats it is an echo)."""
    return " ".join(str(v) for v in _strings(STAGE_EXAMPLE.get(stage, {})))


# A text of at least this many words equal to one of the example's is a copy of it.
EXAMPLE_COPY_MIN_WORDS = 3


def copies_example(stage: str, answer: dict) -> str | None:
    """The text of ``answer`` that copies the stage's example word for word (an answer
    about the example's patient, not this case), or None."""
    def norm(t: str) -> str:
        return " ".join("".join(ch if ch.isalnum() else " " for ch in t.lower()).split())
    shown = {norm(t) for t in _strings(STAGE_EXAMPLE.get(stage, {}))}
    for t in _strings(answer):
        n = norm(t)
        if len(n.split()) >= EXAMPLE_COPY_MIN_WORDS and n in shown:
            return t
    return None


def _strings(obj) -> list:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


# The role and rules of each stage (after the shared facts in the system message): short,
# since every stage pays for its own part (only RULES + facts are reused from the cache).
STAGE_SYSTEM = {
    "lab_analysis": "Role: interpret one lab report; name results and flags as the facts do.",
    "case_summary": "Role: summarise the case from the facts only; add nothing.",
    "soap_note": "Role: write a SOAP note from the facts only; keep the assessment tentative.",
    "diagnosis": "Role: name the most likely diagnosis in words; cite fact ids only.",
    "diagnosis_code": "Role: pick the option whose title matches the diagnosis, or none.",
    "differential": ("Role: list other distinct diagnoses, probabilities summing to at most "
                     "1; cite fact ids only."),
    "recommendations": ("Role: recommend investigations (urgent only if it cannot wait) and "
                        "only standard, safe treatments."),
}
# One short generic answer per stage: shows the form, not this case's content.
STAGE_EXAMPLE: dict[str, dict] = {
    "lab_analysis": {"summary": "Potassium is high.", "key_abnormalities": ["Potassium high"],
                     "confidence_score": 0.6},
    "case_summary": {"comprehensive_summary": "An adult with vomiting and a high potassium.",
                     "key_findings": ["Potassium high"], "confidence_score": 0.6},
    "soap_note": {"subjective": "Vomiting for two days.", "objective": "Potassium high.",
                  "assessment": "Hyperkalaemia.", "plan": "Repeat potassium.",
                  "confidence_score": 0.5},
    "diagnosis": {"primary_diagnosis": "Hyperkalaemia", "description": "High potassium.",
                  "supporting_evidence": ["L2"], "confidence_score": 0.5},
    "differential": {"differential_diagnoses": [
        {"condition": "Acute kidney injury", "probability": 0.3,
         "reasoning": "Can raise potassium.", "distinguishing_factors": ["Creatinine"],
         "supporting_evidence": ["L2"]}]},
    "recommendations": {"investigations": [
        {"investigation_type": "Renal function tests", "urgency": "routine",
         "rationale": "Look for a cause.", "expected_findings": "Creatinine level"}],
        "treatments": []},
}


# One short instruction per stage.
TASK_LAB = ("Interpret {label}. Write a short summary and list the key abnormal results. "
            "confidence_score is a number from 0 to 1.")
TASK_RADIOLOGY_IMAGE = ("Describe this medical image: findings, impressions, a short summary "
                        "and key abnormalities. Image details:\n{details}\n"
                        "confidence_score is a number from 0 to 1.")
TASK_SUMMARY = ("Write a comprehensive summary of this case and list its key findings. "
                "confidence_score is a number from 0 to 1.")
TASK_SOAP = "Write a SOAP note for this case. confidence_score is a number from 0 to 1."
TASK_DIAGNOSIS = ("Give the most likely primary diagnosis in words, a short description "
                  "and the ids of the facts that support it. "
                  "confidence_score is a number from 0 to 1.")
TASK_DIAGNOSIS_CODE = ("Primary diagnosis: {diagnosis}. Choose the ICD-10-CM code that fits it "
                       "best, or none if no option fits. Options: {options}")
TASK_DIFFERENTIAL = ("List 3 to 5 differential diagnoses other than the primary diagnosis, "
                     "each with a probability from 0 to 1, reasoning, distinguishing "
                     "factors and the ids of the facts that support it.")
TASK_RECOMMENDATIONS = ("Recommend further investigations (urgency: urgent, routine or "
                        "follow-up) and treatments for this case.")
TASK_RECOMMENDATIONS_NO_TREATMENT = ("Recommend further investigations (urgency: urgent, "
                                     "routine or follow-up) for this case.")
