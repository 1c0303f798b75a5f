"""Grounding: every claim a model writes is checked against the case's sources.

Checked claims, per sentence (or list item) of model-written text:

- numbers: every number must appear in the sources (lab values and range bounds, the
  doctor's notes, extracted text, the patient's age);
- lab directions: each direction word (high/raised/elevated..., low/reduced/deficient...,
  normal/within range) is a claim about the lab named nearest to it in its clause (clauses
  end at , ; : and at and/but/while/whereas/with...; a clause naming no lab and no subject of
  its own speaks of the lab named before it: "Hb 9.1, which is low"); it must agree with that row's flag.
  A lab is named by the row's own name, that name without qualifiers ("S. Creatinine" ->
  creatinine) or a synonym from the critical-value table ("Hb" for haemoglobin). A
  condition word that implies a direction (anaemia = low haemoglobin, hyperkalaemia = high
  potassium ...: CONDITION_DIRECTIONS) is a claim about its lab when the case has that row.
  A direction claimed for a row whose direction is unknown (no range, no directional
  marker) cannot be verified and fails like a contradiction;
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

from medmitra.clinical import coding, critical
from medmitra.clinical.labs import LabRow
from medmitra.clinical.ranges import join_split_decimals, to_number

_NUMBER_RE = re.compile(r"(?<![A-Za-z0-9.,])\d+(?:[.,]\d+)?(?![0-9])")
_SENTENCE_RE = re.compile(r"(?<=[.!?;])\s+(?=[A-Z0-9(])")
# Direction words (hyper-/hypo- words are conditions, see CONDITION_DIRECTIONS: on their
# own, "hypertension" says nothing about a lab).
_HIGH = r"high|higher|raised|elevated|increased|above|excess\w*"
_LOW = r"low|lower|reduced|decreased|below|deficien\w*|depleted"
_NORMAL = r"normal|within (?:the )?(?:normal )?range|unremarkable"
_DIRECTION_RE = re.compile(rf"\b(?:(?P<high>{_HIGH})|(?P<low>{_LOW})|(?P<normal>{_NORMAL}))\b",
                           re.IGNORECASE)
# Where a clause ends: a direction word speaks of a lab named in its own clause.
_CLAUSE_END_RE = re.compile(r"[,;:()]|\b(?:and|but|while|whereas|although|though|with|"
                            r"without|whilst|however|or)\b", re.IGNORECASE)
# A clause before its direction word made only of these words has no subject of its own.
_NO_SUBJECT_RE = re.compile(r"(?:\s|\b(?:which|that|is|are|was|were|be|been|being|also|"
                            r"both|still|now|remains?|appears?|seems?|slightly|mildly|"
                            r"moderately|markedly|significantly|very|clearly|persistently)\b)*",
                            re.IGNORECASE)
# Condition words that state a lab's direction: (pattern, direction, analyte as named in
# critical.LIMITS). Checked against the case's row of that analyte when there is one.
CONDITION_DIRECTIONS: tuple[tuple[str, str, str], ...] = (
    (r"an(?:a)?emi(?:a|c)", "low", "Haemoglobin"),
    (r"polycyth(?:a)?emi(?:a|c)", "high", "Haemoglobin"),
    (r"thrombocytopeni(?:a|c)", "low", "Platelets"),
    (r"thrombocytos[ie]s|thrombocyth(?:a)?emi(?:a|c)", "high", "Platelets"),
    (r"leu[ck]ocytos[ie]s", "high", "White blood cells"),
    (r"leu[ck]openi(?:a|c)", "low", "White blood cells"),
    (r"hyperkal(?:a)?emi(?:a|c)", "high", "Potassium"),
    (r"hypokal(?:a)?emi(?:a|c)", "low", "Potassium"),
    (r"hypernatr(?:a)?emi(?:a|c)", "high", "Sodium"),
    (r"hyponatr(?:a)?emi(?:a|c)", "low", "Sodium"),
    (r"hyperglyc(?:a)?emi(?:a|c)", "high", "Glucose"),
    (r"hypoglyc(?:a)?emi(?:a|c)", "low", "Glucose"),
    (r"hypercalc(?:a)?emi(?:a|c)", "high", "Calcium (total)"),
    (r"hypocalc(?:a)?emi(?:a|c)", "low", "Calcium (total)"),
    (r"hyperbilirubin(?:a)?emi(?:a|c)", "high", "Bilirubin (total)"),
)
_CONDITION_RE = [(re.compile(rf"\b(?:{pat})\b", re.IGNORECASE), said, analyte)
                 for pat, said, analyte in CONDITION_DIRECTIONS]
# The names of each analyte of the critical-value table (its synonyms), by normalised name.
_SYNONYMS: dict[str, set[str]] = {}
_ANALYTE_OF: dict[str, set[str]] = {}
for _lim in critical.LIMITS:
    for _n in _lim.names:
        _SYNONYMS.setdefault(critical.norm_name(_n), set()).update(_lim.names)
        _ANALYTE_OF.setdefault(critical.norm_name(_n), set()).add(_lim.analyte)
assert {a for _, _, a in CONDITION_DIRECTIONS} <= {lim.analyte for lim in critical.LIMITS}
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
        # Each row with the patterns of the names it goes by (rule in the docstring).
        self._analytes = []
        for r in self.rows:
            key = critical.norm_name(r.test)
            names = {r.test, key} | _SYNONYMS.get(key, set())
            names = sorted((n for n in names if len(n) >= 2), key=len, reverse=True)
            if names:
                self._analytes.append((r, re.compile(
                    r"(?<![A-Za-z0-9])(?:" + "|".join(re.escape(n) for n in names)
                    + r")(?![A-Za-z0-9])", re.IGNORECASE), _ANALYTE_OF.get(key, set())))
        named = self.source_texts + [r.finding() for r in self.rows if r.abnormal]
        self._stems = coding.stems(w for t in named for w in coding.words(t))

    # ------------------------------------------------------------------ checks

    def problems(self, sentence: str) -> tuple[int, list[str]]:
        """(claims checked, the failed ones) of one sentence."""
        checked, failed = 0, []
        for x in _numbers(sentence):
            checked += 1
            if x not in self._numbers:
                failed.append(f"the number {x:g} is in no source")
        for rows, said in self.direction_claims(sentence):
            checked += 1
            flags = {r.flag for r in rows}
            if said not in flags:
                name = rows[0].test
                known = sorted(flags & {"low", "high", "normal"})
                failed.append(f"{name} is {' / '.join(known)}, not {said}" if known else
                              f"{name} has no known direction, so {said} cannot be verified")
        if _IMAGING_RE.search(sentence):
            checked += 1
            if not self._imaging_source:
                failed.append("an imaging study that is in no source")
        return checked, failed

    def direction_claims(self, sentence: str) -> list[tuple[list[LabRow], str]]:
        """(the rows a claim is about, the direction claimed) for each direction word and
        each direction-implying condition word of ``sentence`` (rules in the docstring)."""
        ends = [m.start() for m in _CLAUSE_END_RE.finditer(sentence)]

        def clause(pos: int) -> int:
            return sum(1 for e in ends if e < pos)

        mentions = []          # (start, end, row)
        for row, pat, _ in self._analytes:
            for m in pat.finditer(sentence):
                mentions.append((m.start(), m.end(), row))
        out = []
        for d in _DIRECTION_RE.finditer(sentence):
            said = "high" if d.group("high") else "low" if d.group("low") else "normal"
            near = [(max(s - d.end(), d.start() - e, 0), s, row) for s, e, row in mentions
                    if clause(s) == clause(d.start())]
            if not near and _NO_SUBJECT_RE.fullmatch(sentence[max([e + 1 for e in ends
                                                                 if e < d.start()] or [0]):
                                                            d.start()]):
                # "Hb 9.1 g/dL, which is low": a clause with no subject of its own speaks
                # of the lab named before it.
                near = [(d.start() - e, s, row) for s, e, row in mentions if e <= d.start()]
            if near:
                best = min(k for k, _, _ in near)
                start = min(s for k, s, _ in near if k == best)
                out.append(([row for k, s, row in near if k == best and s == start], said))
        for pat, said, analyte in _CONDITION_RE:
            if pat.search(sentence):
                rows = [row for row, _, analytes in self._analytes if analyte in analytes]
                if rows:
                    out.append((rows, said))
        return out

    def diagnosis_problem(self, condition: str, cited: Iterable) -> str | None:
        """None when ``condition`` is supported (rule in the module docstring), else why
        not. ``cited``: the facts it cites (``prompts.Fact``: ``informative``, ``lab``)."""
        want = coding.stems(coding.specific_words(condition))
        for f in cited:
            if f.informative and (f.lab or want & coding.stems(coding.words(f.text))):
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
