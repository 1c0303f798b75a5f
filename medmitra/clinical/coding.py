"""ICD-10-CM codes by lookup, never invented: candidates from the code table's search, a
check that the chosen code's title agrees with the diagnosis in words.

The model names the diagnosis in words. ``candidates(diagnosis)`` searches the table
(``clinical.icd10``, titles and index terms, BM25) for codes whose names hold every word
of the diagnosis; if none does, words are left out one at a time from the front
("community acquired pneumonia" -> "acquired pneumonia" -> "pneumonia"), so the head noun
of the name is kept. Only the candidates whose names add the fewest specific words the
diagnosis does not say are offered ("Neonatal urinary tract infection" is not, for a
urinary tract infection). The pipeline lets the model choose among them under an
enum grammar, then ``agreement(diagnosis, code)`` checks the choice: at least one
*specific* word of the diagnosis (not a generic one such as "disease", "acute",
"unspecified") must appear in the code's title or index terms (compared on their first
COMPARE_PREFIX letters, so "anaemia"/"anemias" do not count as the same but
"anemia"/"anemias" do). "Cardiovascular disease" therefore never gets B20 "HIV disease"
(shared word: only "disease"). A code is never cut back to a shorter one.
"""

from __future__ import annotations

import logging
import re
from typing import Iterable

log = logging.getLogger(__name__)

CANDIDATES = 5
COMPARE_PREFIX = 6
_GENERIC = frozenset({"disease", "diseases", "disorder", "disorders", "syndrome", "acute",
                      "chronic", "unspecified", "other", "condition", "conditions", "type", "stage", "severe", "mild", "moderate", "possible",
                      "probable", "suspected", "likely", "history", "with", "without", "due",
                      "left", "right", "bilateral", "patient", "finding", "findings", "of",
                      "organism", "site", "specified", "elsewhere", "classified", "not",
                      "the", "and", "in", "on", "a", "an", "to", "for", "by"})
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return [w for w in _WORD.findall((text or "").lower().replace("-", ""))
            if len(w) > 1 or w.isdigit()]


def specific_words(text: str) -> list[str]:
    return [w for w in words(text) if w not in _GENERIC]


def _table():
    from medmitra.clinical import icd10  # the shipped SQLite code table
    return icd10


def candidates(diagnosis: str, limit: int = CANDIDATES) -> list[tuple[str, str]]:
    """[(code, title)] that agree with a diagnosis named in words, best first; [] if none.

    The whole name is searched first; while nothing that agrees is found, words are left
    out from the front, keeping the head noun ("community acquired pneumonia" ->
    "acquired pneumonia" -> "pneumonia")."""
    ws = words(diagnosis)
    icd = _table()
    for start in range(len(ws)):
        rest = " ".join(ws[start:])
        if not specific_words(rest):
            break  # only generic words left ("disease"): nothing specific to look up
        hits = [(code, title) for code, title, _ in icd.search(rest, 4 * limit)
                if agreement(diagnosis, code) is None]
        if hits:
            # Fewest specific words the diagnosis does not say first ("Urinary tract
            # infection, site not specified" before "Neonatal urinary tract infection");
            # the table's own ranking breaks ties.
            # Only the candidates adding the fewest such words are offered: the model may
            # not pick "Neonatal urinary tract infection" for a urinary tract infection.
            want = stems(specific_words(diagnosis))
            extra = {code: _extra_words(code, want) for code, _ in hits}
            hits.sort(key=lambda h: extra[h[0]])
            return [h for h in hits if extra[h[0]] == extra[hits[0][0]]][:limit]
    return []


_MODIFIER = re.compile(r"\([^()]*\)|\[[^\[\]]*\]")


def _extra_words(code: str, want: set[str]) -> int:
    found = _table().info(code)
    names = [found.title, *found.terms] if found else [""]
    return min(len(stems(specific_words(_MODIFIER.sub(" ", n))) - want) for n in names)


def stems(words: Iterable[str]) -> set[str]:
    """Words as they are compared: their first COMPARE_PREFIX letters."""
    return {w[:COMPARE_PREFIX] for w in words}


def agreement(diagnosis: str, code: str) -> str | None:
    """None when the code agrees with the diagnosis, else why not. It agrees when one of
    its names (title or index term) says nothing specific the diagnosis does not say
    ("pneumonia, unspecified organism" for "community acquired pneumonia"), or when its
    names hold every specific word of the diagnosis ("type 2 diabetes" in "type 2
    diabetes mellitus")."""
    icd = _table()
    found = icd.info(code)
    if found is None:
        return f"{code!r} is not an ICD-10-CM diagnosis code"
    specific = stems(specific_words(diagnosis))
    if not specific:
        return "the diagnosis names nothing specific enough to code"
    names = [found.title, *found.terms]
    if any(stems(specific_words(n)) and stems(specific_words(n)) <= specific for n in names):
        return None
    if specific <= stems(words(" ".join(names))):
        return None
    return (f"the title of {found.code} ({found.title!r}) does not agree with "
            f"the diagnosis {diagnosis!r}")
