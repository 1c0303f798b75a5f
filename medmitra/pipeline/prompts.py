"""Prompts for small local models: one task each, the schema in the prompt, case facts once.

Every stage's messages are ``[system: RULES + case facts, user: stage instruction]``. The
system message is byte-identical in all stages of a case, so llama.cpp evaluates it once
and later stages only pay for their own short instruction (KV-cache prefix reuse).

Facts are trimmed by tokens (``trim_to_tokens``) at line or word boundaries, once per case,
so the prefix stays the same across stages. No patient identity goes to the model: the
case's name is left out, documents lose their identity header lines ("Patient: ...",
"DOB ...", "MRN ...") and every name found in the case or those headers is replaced
(``clinical.identity.Redactor``), file names included.
"""

from __future__ import annotations

from typing import Callable

from medmitra.clinical import labs
from medmitra.clinical.identity import Redactor
from medmitra.pipeline.schemas import prompt_schema_text
from medmitra.pipeline.types import CaseInput, ExtractedFile

CountFn = Callable[[str], int]

RULES = (
    "You are a careful clinical documentation assistant. Use only the case facts below; "
    "if something is not in the facts, say it is not available instead of inventing it. "
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


def lab_file_text(f: ExtractedFile, redactor: Redactor | None = None) -> str:
    """A lab file as the model sees it: parsed rows when present, else its text."""
    red = redactor or Redactor(())
    if f.lab_rows:
        return red.redact("\n".join(f"- {labs.render_row(r)}" for r in f.lab_rows))
    return red.redact((f.text or "").strip()) or "(no readable text)"


def radiology_file_text(f: ExtractedFile, redactor: Redactor | None = None) -> str:
    """Non-identifying DICOM tags and any OCR text of a radiology file."""
    red = redactor or Redactor(())
    parts = [f"{k}: {v}" for k, v in sorted(f.dicom_tags.items()) if v]
    if f.report_sections:
        parts += [f"Report {k}: {red.redact(v)}" for k, v in f.report_sections.items()]
    elif f.text and f.text.strip():
        kind = "Report text" if f.mime == "application/pdf" else "Text on the image"
        parts.append(f"{kind}: " + red.redact(f.text.strip()))
    return red.redact("\n".join(parts), document=False) or "(no tags or text)"


def file_label(kind: str, index: int, f: ExtractedFile, redactor: Redactor | None = None) -> str:
    name = (redactor or Redactor(())).redact(f.file_name, document=False)
    return f"{kind} file {index} ({name})"


def case_facts(case: CaseInput, budget_tokens: int, count: CountFn,
               redactor: Redactor | None = None) -> str:
    """The case facts block shared by every stage, at most ``budget_tokens`` tokens.

    The budget is shared out fairly: small documents keep their full text and what they
    don't use goes to the larger ones.
    """
    red = redactor or redactor_for(case)
    header = [f"CASE FACTS\nPatient: age {case.patient_age}, gender {case.patient_gender}."]
    docs: list[tuple[str, str]] = [("Doctor's notes", red.redact((case.doctor_notes or "").strip(),
                                                                  document=False)
                                    or "(none given)")]
    labs = [f for f in case.files if f.category == "lab"]
    rads = [f for f in case.files if f.category == "radiology"]
    docs += [(file_label("Lab", i, f, red), lab_file_text(f, red)) for i, f in enumerate(labs, 1)]
    docs += [(file_label("Radiology", i, f, red), radiology_file_text(f, red))
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
    return "\n".join(header) + "\n" + "\n".join(blocks)


def system_message(facts: str) -> dict:
    return {"role": "system", "content": f"{RULES}\n\n{facts}"}


def task_message(task: str, schema: dict, context: str = "") -> dict:
    """The stage-specific part, always last so the shared prefix comes first."""
    ctx = f"{context.strip()}\n\n" if context.strip() else ""
    return {"role": "user",
            "content": f"{ctx}TASK: {task}\nJSON schema: {prompt_schema_text(schema)}"}


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
                  "and the supporting evidence from the facts. "
                  "confidence_score is a number from 0 to 1.")
TASK_DIAGNOSIS_CODE = ("Primary diagnosis: {diagnosis}. Choose the ICD-10-CM code that fits it "
                       "best, or none if no option fits. Options: {options}")
TASK_DIFFERENTIAL = ("List 3 to 5 differential diagnoses other than the primary diagnosis, "
                     "each with a probability from 0 to 1, reasoning and distinguishing "
                     "factors.")
TASK_RECOMMENDATIONS = ("Recommend further investigations (urgency: urgent, routine or "
                        "follow-up) and treatments for this case.")
TASK_RECOMMENDATIONS_NO_TREATMENT = ("Recommend further investigations (urgency: urgent, "
                                     "routine or follow-up) for this case.")
