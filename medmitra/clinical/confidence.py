"""Confidence is computed from what was checked, never taken from the model.

For a model-written section (case summary, SOAP note, diagnosis, a lab file's
interpretation):

    confidence = G x (0.60 + 0.25 x T + 0.15 x D)        (rounded to 3 decimals)

- G, grounding: of the section's sentences and list items that the grounding check looked
  at (``clinical.grounding``), the share that made at least one checkable claim (a number,
  a lab direction, an imaging claim) and whose every claim held against the sources:
  verified / (verified + unverified + dropped). Text with nothing checkable earns nothing:
  G is 0 when no sentence was verified, so a section of unchecked prose scores 0.0 whatever
  else went well -- 0.0 means "nothing here could be checked", not "wrong".
- T, first-try validity: 1.0 when the model's first answer was acceptable, 0.5 when an
  answer was rejected (invalid JSON, junk) and a retry was needed.
- D, deterministic share: of the result-like lines in the case's lab files (for a lab file:
  in that file), the share parsed into lab rows; 0 when there are no lab files.

G multiplies the rest, so validity and parsed labs never lift unchecked text.
A section whose answer was abstained (junk or invalid on every try) has no confidence
(``null``), and so has a radiology file no image model read. The overall score is the mean
of the case summary, SOAP and diagnosis scores that exist (``null`` if none does).

``confidenceThreshold``: sections are *flagged*, not withheld -- a nested section whose
confidence is null or below the threshold carries ``below_threshold: true``; the flat
fields the original frontend reads stay as they are (it renders them unchanged).
"""

from __future__ import annotations

WEIGHT_BASE = 0.60
WEIGHT_FIRST_TRY = 0.25
WEIGHT_DETERMINISTIC = 0.15
RETRIED_VALIDITY = 0.5


def deterministic_share(rows_parsed: int, lines_not_parsed: int) -> float:
    total = rows_parsed + lines_not_parsed
    return rows_parsed / total if total else 0.0


def section(status: str, grounded_share: float | None, determ_share: float) -> float | None:
    """The confidence of one section (formula in the module doc); None if abstained.

    ``grounded_share``: ``Grounder.share`` of the section (None: nothing was checked)."""
    if status == "abstained":
        return None
    g = 0.0 if grounded_share is None else min(1.0, max(0.0, grounded_share))
    t = 1.0 if status == "ok" else RETRIED_VALIDITY
    d = min(1.0, max(0.0, determ_share))
    return round(g * (WEIGHT_BASE + WEIGHT_FIRST_TRY * t + WEIGHT_DETERMINISTIC * d), 3)


def overall(scores: list[float | None]) -> float | None:
    xs = [x for x in scores if x is not None]
    return round(sum(xs) / len(xs), 3) if xs else None


def below(score: float | None, threshold: float | None) -> bool:
    """True when a threshold is set and the score is missing or under it."""
    return threshold is not None and (score is None or score < threshold)
