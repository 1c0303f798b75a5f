"""ICD-10-CM codes checked against the real code table of the simple-icd-10-cm package.

``normalize_code`` never returns an invalid code: a valid code comes back in its dotted
form; an invalid one is replaced by its longest valid prefix (its nearest valid ancestor,
e.g. "E11.99999" -> "E11.9", "E11.Z" -> "E11"), or None when not even the three-character
category exists. Chapters ("4") and blocks ("E08-E13") are not diagnosis codes and are
never returned.

The table (~98 000 codes) is parsed once per process on first use, under a lock;
``load_seconds()`` reports how long that took (~1-2 s here). The word index used by
``search`` is built on its first call (~1 s more).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import warnings
from collections import defaultdict
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

# First code-like token: letter, digit, alphanumeric, then more after an optional dot.
# All characters after the category are read so an over-long code ("E11.99999") is
# recognised and cut back, rather than silently matched as its bare category.
_CODE_RE = re.compile(r"(?<![A-Z0-9])([A-Z][0-9][0-9A-Z])(?:\.?([0-9A-Z]+))?")
# A block ("E08-E13") is a range of categories, not a code; it is blanked out first.
_BLOCK_RE = re.compile(r"[A-Z][0-9][0-9A-Z]-[A-Z][0-9][0-9A-Z]")
_MAX_INPUT_CHARS = 100

_lock = threading.Lock()
_cm: ModuleType | None = None
_load_s: float | None = None
_index: dict[str, list[str]] | None = None
_desc_tokens: dict[str, tuple[str, ...]] | None = None

_STOPWORDS = frozenset({"of", "the", "and", "with", "without", "in", "to", "a", "an", "or",
                        "for", "due", "by", "on", "at", "as", "other", "not", "elsewhere",
                        "classified", "nos", "type", "unspecified", "specified"})
_WORD_RE = re.compile(r"[a-z0-9]+")


def _table() -> Any:
    """The simple_icd_10_cm module, imported (= table parsed) once."""
    global _cm, _load_s
    if _cm is not None:
        return _cm
    with _lock:
        if _cm is None:
            start = time.perf_counter()
            # The package reads its data with importlib.resources.read_text, which warns
            # DeprecationWarning on 3.11; that is the package's business, not a fault here.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                import simple_icd_10_cm as cm
            _load_s = time.perf_counter() - start
            log.info("ICD-10-CM table loaded in %.2f s", _load_s)
            _cm = cm
    return _cm


def load_seconds() -> float | None:
    """Seconds the table took to load, or None if not loaded yet."""
    return _load_s


def _is_diagnosis_code(cm: Any, code: str) -> bool:
    try:
        return bool(cm.is_category_or_subcategory(code) or cm.is_extended_subcategory(code))
    except Exception:
        return False


def normalize_code(code: str | None) -> str | None:
    """Canonical dotted ICD-10-CM code for ``code``, its nearest valid ancestor, or None."""
    if not code or not isinstance(code, str):
        return None
    text = _BLOCK_RE.sub("#", code[:_MAX_INPUT_CHARS].upper().replace(" ", ""))
    m = _CODE_RE.search(text)
    if not m:
        return None
    candidate = m.group(1) + (m.group(2) or "")
    cm = _table()
    # Drop trailing characters until the code exists; the category (3 chars) is the floor.
    for end in range(len(candidate), 2, -1):
        prefix = candidate[:end]
        if _is_diagnosis_code(cm, prefix):
            return cm.add_dot(prefix)
    return None


def describe(code: str | None) -> str | None:
    """Description of a valid code (any spelling ``normalize_code`` accepts exactly)."""
    if not code or not isinstance(code, str):
        return None
    cm = _table()
    raw = code.strip().upper().replace(" ", "")
    if not _is_diagnosis_code(cm, raw):
        return None
    try:
        return cm.get_description(raw)
    except Exception:
        return None


def _tokens(text: str) -> list[str]:
    return [w for w in _WORD_RE.findall(text.lower()) if w not in _STOPWORDS]


def _search_index() -> tuple[dict[str, list[str]], dict[str, tuple[str, ...]]]:
    global _index, _desc_tokens
    cm = _table()
    with _lock:
        if _index is None or _desc_tokens is None:
            start = time.perf_counter()
            index: dict[str, list[str]] = defaultdict(list)
            desc: dict[str, tuple[str, ...]] = {}
            for code in cm.get_all_codes(with_dots=True):
                if not _is_diagnosis_code(cm, code):
                    continue
                toks = tuple(dict.fromkeys(_tokens(cm.get_description(code))))
                desc[code] = toks
                for t in toks:
                    index[t].append(code)
            _index, _desc_tokens = dict(index), desc
            log.info("ICD-10-CM word index built in %.2f s", time.perf_counter() - start)
    return _index, _desc_tokens


def search(text: str | None, limit: int = 5) -> list[tuple[str, str]]:
    """Codes whose descriptions best share words with ``text``.

    Score = 0.8 x (share of the query's word weight matched, words weighted by rarity)
          + 0.2 x (Jaccard overlap of the word sets), so rare clinical words ("pneumonia")
    count more than common ones ("acquired"). Ties go to the shorter (more general) code.
    Meant for a diagnosis named without a code; it is a word match, not a clinical coder.
    """
    if not text or limit <= 0:
        return []
    query = set(_tokens(str(text)[:_MAX_INPUT_CHARS * 3]))
    if not query:
        return []
    index, desc = _search_index()
    total = len(desc)
    weight = {w: math.log(1 + total / (1 + len(index.get(w, ())))) for w in query}
    query_weight = sum(weight.values())
    matched: dict[str, list[str]] = defaultdict(list)
    for word in query:
        for code in index.get(word, ()):
            matched[code].append(word)

    def score(code: str) -> float:
        words = matched[code]
        coverage = sum(weight[w] for w in words) / query_weight
        jaccard = len(words) / (len(query) + len(desc[code]) - len(words))
        return 0.8 * coverage + 0.2 * jaccard

    ranked = sorted(matched, key=lambda c: (-score(c), len(c), c))
    cm = _table()
    return [(c, cm.get_description(c)) for c in ranked[:limit]]


def warm_up() -> None:
    """Load the table now (e.g. in a start-up thread) instead of on the first diagnosis."""
    _table()
