"""Confidence is computed from what was checked, never taken from the model.

For a model-written section (case summary, SOAP note, diagnosis, a lab file's
interpretation):

    confidence = 0.5 x G + 0.3 x T + 0.2 x D        (rounded to 3 decimals)

- G, grounding: the share of the section's checked claims (numbers, lab directions,
  imaging claims) that held against the sources (``clinical.grounding``); 0.5 when the
  section made no checkable claim (nothing earned, nothing refuted);
- T, first-try validity: 1.0 when the model's first answer was acceptable, 0.5 when it
  took a retry;
- D, deterministic share: of the result-like lines in the case's lab files, the share that
  was parsed into lab rows (0 when there are no lab files): how much of what the model
  read was also computed without it.

An abstained section has no confidence (``null``), and so has a radiology file no image
model read. The overall score is the mean of the case summary, SOAP and diagnosis scores
that exist (``null`` if none does).

``confidenceThreshold``: sections are *flagged*, not withheld -- a nested section whose
confidence is null or below the threshold carries ``below_threshold: true``; the flat
fields the original frontend reads stay as they are (it renders them unchanged).
"""

from __future__ import annotations

WEIGHT_GROUNDING = 0.5
WEIGHT_FIRST_TRY = 0.3
WEIGHT_DETERMINISTIC = 0.2
NEUTRAL_GROUNDING = 0.5
RETRIED_VALIDITY = 0.5


def deterministic_share(rows_parsed: int, lines_not_parsed: int) -> float:
    total = rows_parsed + lines_not_parsed
    return rows_parsed / total if total else 0.0


def section(status: str, grounded_share: float | None, determ_share: float) -> float | None:
    """The confidence of one section (formula in the module doc); None if abstained."""
    if status == "abstained":
        return None
    g = NEUTRAL_GROUNDING if grounded_share is None else grounded_share
    t = 1.0 if status == "ok" else RETRIED_VALIDITY
    return round(WEIGHT_GROUNDING * g + WEIGHT_FIRST_TRY * t
                 + WEIGHT_DETERMINISTIC * determ_share, 3)


def overall(scores: list[float | None]) -> float | None:
    xs = [x for x in scores if x is not None]
    return round(sum(xs) / len(xs), 3) if xs else None


def below(score: float | None, threshold: float | None) -> bool:
    """True when a threshold is set and the score is missing or under it."""
    return threshold is not None and (score is None or score < threshold)
