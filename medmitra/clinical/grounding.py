"""Grounding: every claim a model writes is checked against the case's sources.

Checked claims, per sentence (or list item) of model-written text:

- numbers: every number must appear in the sources (lab values and range bounds, the
  doctor's notes, extracted text, the patient's age);
- lab directions: a sentence that names an analyte of a lab row together with a
  direction word (high/raised/elevated..., low/reduced/deficient..., normal/within range)
  must agree with that row's flag;
- imaging claims: a sentence that speaks of an imaging study (X-ray, CT, MRI, ultrasound,
  scan ...) needs a radiology file or a source that mentions imaging.

- diagnoses (the primary and each differential): a diagnosis is supported when it cites
  (by fact id, under an enum grammar) an abnormal lab row, or a sentence of the doctor's
  notes / a line of a report or of an unparsed lab file that names one specific word of
  the diagnosis, or when every specific word of its name is in the case's text or its
  abnormal lab findings (specific words: ``coding.specific_words``, compared on their
  first COMPARE_PREFIX letters). Normal lab rows, DICOM tags and sentences that do not
  name the condition ("admitted for evaluation") are nothing a diagnosis could rest on.
  Whether a cited abnormal result is medically relevant to the diagnosis is not something
  a rule can judge: the citation is shown (as the fact's own text) so the reader can.

A sentence, item or diagnosis with a failed claim is **dropped** (not kept as
"unverified"): what is stored is what the sources support. An unsupported primary
diagnosis is retried like any invalid answer, then the diagnosis stage abstains (its
fields say "Not available.", ``icd_code`` is null); an unsupported differential is left
out of the list. ``Grounder.text`` / ``Grounder.items`` return what is kept, and the counts
(claims checked, kept, dropped) accumulate per section for the ``insights.grounding``
summary, which also lists each diagnosis judged (``diagnoses``: section, condition,
supported, reason). Pure, no model, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from medmitra.clinical import coding
from medmitra.clinical.labs import LabRow
from medmitra.clinical.ranges import join_split_decimals, to_number

_NUMBER_RE = re.compile(r"(?<![A-Za-z0-9.,])\d+(?:[.,]\d+)?(?![0-9])")
_SENTENCE_RE = re.compile(r"(?<=[.!?;])\s+(?=[A-Z0-9(])")
_HIGH = r"high|higher|raised|elevated|increased|above|hyper\w*|excess\w*"
_LOW = r"low|lower|reduced|decreased|below|deficien\w*|hypo\w*|depleted"
_NORMAL = r"normal|within (?:the )?(?:normal )?range|unremarkable"
_DIRECTION_RE = re.compile(rf"\b(?:(?P<high>{_HIGH})|(?P<low>{_LOW})|(?P<normal>{_NORMAL}))\b",
                           re.IGNORECASE)
_IMAGING_RE = re.compile(r"\b(?:x-?ray|radiograph\w*|ct|cat scan|mri|ultrasound|sonograph\w*|"
                         r"echocardiogra\w*|scan|imaging|mammogra\w*|pet)\b", re.IGNORECASE)


@dataclass
class Counts:
    claims_checked: int = 0
    kept: int = 0
    dropped: int = 0
    # Sentences and items kept: with at least one checked claim (all held) / with none.
    verified: int = 0
    unverified: int = 0

    def as_dict(self) -> dict:
        return {"claims_checked": self.claims_checked, "kept": self.kept, "dropped": self.dropped,
                "verified": self.verified, "unverified": self.unverified}


@dataclass
class Grounder:
    rows: list[LabRow]
    source_texts: list[str]            # notes, extracted texts, radiology text
    has_radiology: bool = False
    by_section: dict[str, Counts] = field(default_factory=dict)
    diagnoses: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        nums: set[float] = set()
        for r in self.rows:
            for t in (r.value, r.reference_range or ""):
                nums.update(_numbers(t))
        for t in self.source_texts:
            nums.update(_numbers(t))
        self._numbers = nums
        joined = " ".join(self.source_texts)
        self._imaging_source = self.has_radiology or bool(_IMAGING_RE.search(joined))
        self._analytes = [(r, re.compile(rf"(?<![A-Za-z0-9]){re.escape(r.test)}(?![A-Za-z0-9])",
                                         re.IGNORECASE))
                          for r in self.rows if len(r.test) >= 2]
        named = self.source_texts + [r.finding() for r in self.rows if r.abnormal]
        self._stems = {w[:coding.COMPARE_PREFIX] for t in named for w in coding.words(t)}

    # ------------------------------------------------------------------ checks

    def problems(self, sentence: str) -> tuple[int, list[str]]:
        """(claims checked, the failed ones) of one sentence."""
        checked, failed = 0, []
        for x in _numbers(sentence):
            checked += 1
            if x not in self._numbers:
                failed.append(f"the number {x:g} is in no source")
        d = _DIRECTION_RE.search(sentence)
        if d:
            said = "high" if d.group("high") else "low" if d.group("low") else "normal"
            for row, pat in self._analytes:
                if pat.search(sentence) and row.flag in ("low", "high", "normal"):
                    checked += 1
                    if row.flag != said:
                        failed.append(f"{row.test} is {row.flag}, not {said}")
        if _IMAGING_RE.search(sentence):
            checked += 1
            if not self._imaging_source:
                failed.append("an imaging study that is in no source")
        return checked, failed

    def diagnosis_problem(self, condition: str, cited: Iterable) -> str | None:
        """None when ``condition`` is supported (rule in the module docstring), else why
        not. ``cited``: the facts it cites (``prompts.Fact``: ``informative``, ``lab``)."""
        want = {w[:coding.COMPARE_PREFIX] for w in coding.specific_words(condition)}
        for f in cited:
            if f.informative and (f.lab or want & {w[:coding.COMPARE_PREFIX]
                                                  for w in coding.words(f.text)}):
                return None
        if want and want <= self._stems:
            return None
        return ("supported by no fact (it cites no abnormal result and no sentence that "
                "names it, and the case's text does not name it)")

    def record_diagnosis(self, section: str, condition: str, problem: str | None) -> None:
        """Count one judged diagnosis for ``section`` and list it in the summary."""
        c = self._count(section)
        c.claims_checked += 1
        if problem is None:
            c.kept += 1
            c.verified += 1      # its support was checked and held
        else:
            c.dropped += 1
        self.diagnoses.append({"section": section, "condition": condition,
                               "supported": problem is None, "reason": problem})

    def _count(self, section: str) -> Counts:
        return self.by_section.setdefault(section, Counts())

    def text(self, section: str, text: str) -> str:
        """``text`` without its sentences that fail a check."""
        if not text:
            return text
        return " ".join(self.items(section, _SENTENCE_RE.split(text)))

    def items(self, section: str, items: Iterable[str]) -> list[str]:
        """The items (or sentences) that pass every check, counted for ``section``."""
        out = []
        c = self._count(section)
        for item in items:
            checked, failed = self.problems(item)
            c.claims_checked += checked
            if failed:
                c.dropped += 1
            else:
                c.kept += checked
                if checked:
                    c.verified += 1
                else:
                    c.unverified += 1
                out.append(item)
        return out

    def share(self, section: str) -> float | None:
        """Share of the section's sentences and items that were checked and held (verified
        / (verified + unverified + dropped)); None if the section wrote nothing checked."""
        c = self.by_section.get(section)
        if c is None:
            return None
        units = c.verified + c.unverified + c.dropped
        return c.verified / units if units else None

    def summary(self) -> dict:
        total = Counts()
        for c in self.by_section.values():
            total.claims_checked += c.claims_checked
            total.kept += c.kept
            total.dropped += c.dropped
            total.verified += c.verified
            total.unverified += c.unverified
        return total.as_dict() | {"sections": {k: v.as_dict()
                                               for k, v in sorted(self.by_section.items())},
                                  "diagnoses": list(self.diagnoses)}


def split_sentences(text: str) -> list[str]:
    """``text`` cut into sentences (the unit every check works on)."""
    return [p.strip() for p in _SENTENCE_RE.split(text or "") if p.strip()]


def _numbers(text: str) -> set[float]:
    out = set()
    for m in _NUMBER_RE.finditer(join_split_decimals(text or "")):
        x = to_number(m.group(0))
        if x is not None:
            out.add(x)
    return out
