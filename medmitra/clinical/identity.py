"""Patient identity kept away from the model: names and identifiers found in the case and
in document headers are removed from everything a prompt is built from.

- ``is_identity_line``: a report header line that carries identity ("Patient: ...",
  "Name: ...", "DOB ...", "MRN ...", "UHID ...", "Age/Sex ...", "Ref. by Dr ..."). Such a
  line is never a lab row and is dropped from text sent to a model.
- ``Redactor``: built from the case's patient name and the names printed in identity lines
  of the case's documents; ``redact(text)`` drops identity lines and replaces every
  remaining occurrence of a name (whole words, any case) with NAME_MARK.

Pure, no model, no I/O.
"""

from __future__ import annotations

import re
from typing import Iterable

NAME_MARK = "[patient]"
# Name parts shorter than this are not redacted on their own ("Li" would hit "Lithium").
MIN_NAME_PART_CHARS = 3

_LABELS = (r"patient(?:'s)?\s*name|patient|pt\.?\s*name|pt\.?|name|dob|d\.o\.b\.?|date\s+of\s+birth"
           r"|birth\s*date|mrn|m\.r\.n\.?|uhid|patient\s*id|pid|hospital\s*(?:no|number|id)"
           r"|reg(?:istration)?\.?\s*(?:no|number|id)|ip\s*no|op\s*no|age\s*/\s*sex"
           r"|sex\s*/\s*age|age\s*/\s*gender|gender\s*/\s*age|ref(?:erred)?\.?\s*by|address"
           r"|phone|mobile|tel\.?|email|ssn|nhs\s*(?:no|number)|aadhaar|insurance\s*(?:no|id)"
           r"|guardian|father(?:'s)?\s*name|husband(?:'s)?\s*name|mother(?:'s)?\s*name")
_IDENTITY_LINE_RE = re.compile(rf"^\W*(?:{_LABELS})\s*[:#.\-]", re.IGNORECASE)
# "Patient: <name>" up to the next label, a separator or the end of the line.
_NAME_AFTER_RE = re.compile(
    r"(?:patient(?:'s)?\s*name|patient|pt\.?\s*name|name)\s*[:\-]\s*"
    r"((?:(?:mr|mrs|ms|miss|dr|master|baby)\.?\s+)?[A-Za-z][A-Za-z'\-.]*(?:\s[A-Za-z][A-Za-z'\-.]*){0,4})",
    re.IGNORECASE)
_FIELD_WORDS = frozenset({"age", "sex", "gender", "dob", "mrn", "uhid", "id", "date", "ref",
                          "referred", "by", "years", "yrs", "y", "male", "female", "m", "f",
                          "sample", "collected", "reported", "lab", "no", "report"})
_TITLES = frozenset({"mr", "mrs", "ms", "miss", "dr", "master", "baby"})


def is_identity_label(cell: str) -> bool:
    """True if a table cell is an identity label ("Patient", "Name", "DOB", "MRN" ...)."""
    return bool(re.fullmatch(rf"\W*(?:{_LABELS})\W*", (cell or "").strip(), re.IGNORECASE))


def is_identity_line(line: str) -> bool:
    """True if ``line`` is a header line that carries patient identity."""
    return bool(_IDENTITY_LINE_RE.match(line.strip()))


def names_in_text(text: str) -> list[str]:
    """Names printed after "Patient:" / "Name:" labels in ``text``."""
    out: list[str] = []
    for m in _NAME_AFTER_RE.finditer(text or ""):
        parts: list[str] = []
        for w in m.group(1).split():
            # A name is capitalised; a lower-case word ("complains") ends it.
            if w.lower().strip(".") in _FIELD_WORDS or not w[:1].isupper():
                break
            parts.append(w.strip("."))
        parts = [p for p in parts if p.lower() not in _TITLES]
        if parts:
            out.append(" ".join(parts))
    return out


class Redactor:
    """Removes identity lines and the given names from text bound for a model."""

    def __init__(self, names: Iterable[str]):
        terms: set[str] = set()
        for name in names:
            name = " ".join(str(name or "").split())
            if not name:
                continue
            terms.add(name)
            terms.update(p for p in re.split(r"[\s,]+", name)
                         if len(p.strip(".'-")) >= MIN_NAME_PART_CHARS
                         and p.lower().strip(".") not in _TITLES)
        # Longest first so "Asha Verma" goes before "Asha".
        self.terms = sorted(terms, key=len, reverse=True)
        self._re = (re.compile(r"(?<![A-Za-z0-9])(?:" + "|".join(re.escape(t) for t in self.terms)
                               + r")(?![A-Za-z0-9])", re.IGNORECASE) if self.terms else None)

    @classmethod
    def for_case(cls, patient_name: str | None, texts: Iterable[str | None]) -> "Redactor":
        names = [patient_name or ""]
        for t in texts:
            names.extend(names_in_text(t or ""))
        return cls(names)

    def redact(self, text: str | None, *, document: bool = True) -> str:
        """``text`` without names; a ``document``'s identity header lines are dropped too
        (a clinician's own notes keep their lines, only names go)."""
        if not text:
            return text or ""
        out = text
        if document:
            out = "\n".join(ln for ln in text.split("\n") if not is_identity_line(ln))
        return self._re.sub(NAME_MARK, out) if self._re is not None else out

    def found_in(self, text: str) -> bool:
        """True if any name still occurs in ``text`` (for checks and tests)."""
        return bool(self._re is not None and self._re.search(text or ""))
