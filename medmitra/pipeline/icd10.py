"""ICD-10-CM codes checked against the real code table (medmitra.clinical.icd10).

``normalize_code`` never returns an invalid code: a valid code comes back in its dotted
form; an invalid one is replaced by its longest valid prefix (its nearest valid ancestor,
e.g. "E11.99999" -> "E11.9", "E11.Z" -> "E11"), or None when not even the three-character
category exists. Chapters ("4") and blocks ("E08-E13") are not diagnosis codes and are
never returned.

The table is a prebuilt SQLite file opened in a millisecond (nothing is parsed at
start-up); ``load_seconds()`` reports how long opening it took.
"""

from __future__ import annotations

import re

from medmitra.clinical import icd10 as table

# First code-like token: letter, digit, alphanumeric, then more after an optional dot.
# All characters after the category are read so an over-long code ("E11.99999") is
# recognised and cut back, rather than silently matched as its bare category.
_CODE_RE = re.compile(r"(?<![A-Z0-9])([A-Z][0-9][0-9A-Z])(?:\.?([0-9A-Z]+))?")
# A block ("E08-E13") is a range of categories, not a code; it is blanked out first.
_BLOCK_RE = re.compile(r"[A-Z][0-9][0-9A-Z]-[A-Z][0-9][0-9A-Z]")
_MAX_INPUT_CHARS = 100


def load_seconds() -> float | None:
    """Seconds the table took to open, or None if not opened yet."""
    return table.load_seconds()


def normalize_code(code: str | None) -> str | None:
    """Canonical dotted ICD-10-CM code for ``code``, its nearest valid ancestor, or None."""
    if not code or not isinstance(code, str):
        return None
    text = _BLOCK_RE.sub("#", code[:_MAX_INPUT_CHARS].upper().replace(" ", ""))
    m = _CODE_RE.search(text)
    if not m:
        return None
    candidate = m.group(1) + (m.group(2) or "")
    # Drop trailing characters until the code exists; the category (3 chars) is the floor.
    for end in range(len(candidate), 2, -1):
        if found := table.canonical(candidate[:end]):
            return found
    return None


def describe(code: str | None) -> str | None:
    """Description of a valid code (any spelling ``normalize_code`` accepts exactly)."""
    if not code or not isinstance(code, str):
        return None
    return table.title(code.strip().replace(" ", ""))


def search(text: str | None, limit: int = 5) -> list[tuple[str, str]]:
    """Codes whose title or an index term contains every word of ``text``, best first
    (exactly named codes, then SQLite's BM25 ranking: see medmitra.clinical.icd10.search).
    Meant for a diagnosis named without a code; it is a word match, not a clinical coder."""
    if not text:
        return []
    return [(code, title) for code, title, _score in table.search(str(text), limit)]


def warm_up() -> None:
    """Open the table now (a millisecond) instead of on the first diagnosis."""
    table.warm_up()
