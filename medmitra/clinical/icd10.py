"""The ICD-10-CM code table: codes, official titles, index terms, search.

The table is a prebuilt SQLite file shipped inside the package (``data/icd10cm.sqlite``,
made by ``scripts/build-icd10-table.py`` from the simple-icd-10-cm package and checked
against it code by code in ``tests/test_icd10_table.py``). Opening it takes about a
millisecond; nothing is parsed at start-up. It holds every diagnosis code: categories
("E11"), subcategories ("E11.9") and 7th-character extensions ("S52.501A"). Chapters and
blocks ("E08-E13") are not diagnosis codes and are not in it.

- ``is_valid(code)``, ``title(code)``, ``info(code)``: exact lookups. A code is accepted
  in any case, with or without its dot and surrounding blanks ("e119" is "E11.9"); nothing
  is cut or guessed: "E11.99999" is simply not a code.
- ``search(text, limit)``: codes whose title or one of whose index terms contains every
  word of ``text``.
  First the codes a title or index term *names* exactly (its essential words, without
  the nonessential modifiers in parentheses, are the query's: "Essential hypertension"
  and "Hypertension" find I10 "Essential (primary) hypertension", whose index terms
  include "hypertension (arterial) (benign) ..."), then the rest ranked by SQLite FTS5's
  BM25 (words rare in the table weigh more; short titles that are mostly the query rank
  first). By default every word must be found: a code that shares one word ("disease")
  with the query is not a match. ``require_all=False`` ranks codes that share any of
  the words, for a list of candidates to choose from. 7th-character extensions are not
  searched (their words are their parent's plus the encounter): a search names the
  code a clinician names, and ``info`` tells whether it is billable as it is.
  A single word found in hundreds of names ("fracture", "disease", "pain": more than
  FREQUENT_MATCHES) would have BM25 score every one of them on each search (5-25 ms);
  for those words the build ranks all matches once and stores the best codes
  (``frequent_ranked``), so the search reads them in order (well under a millisecond).
  The stored order is BM25 over every match, equal ranks to the shorter code; the tests
  recompute it for every such word.

Read-only and safe to use from any thread (one connection per thread).
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections import namedtuple
from pathlib import Path

TABLE_FILE = "icd10cm.sqlite"
_MAX_QUERY_CHARS = 300
_MAX_QUERY_WORDS = 12
_CODE_FORM = re.compile(r"[A-Z][0-9A-Z]{2}(?:[0-9A-Z]{1,4})?")   # "E11.9", "QA0.0101"
_WORD = re.compile(r"[^\W_]+")
_MODIFIER = re.compile(r"\([^()]*\)|\[[^\[\]]*\]")   # "(primary)", "[HIV]"
# Words left out of a search: they carry no meaning of their own and match most titles.
_FILLER = frozenset({"a", "an", "the", "of", "in", "on", "at", "to", "for", "by", "as", "or",
                     "and", "with", "is", "are", "was", "nos", "patient"})
# Left out of a name too: "Anemia, unspecified" is what "anemia" names.
_NAME_FILLER = _FILLER | {"unspecified"}
# Column weights for BM25 (title, index term): a word in the official title counts twice
# one in an index term.
_WEIGHTS = "bm25(code_search, 2.0, 1.0)"
# A word found in more names than this has its ranked codes stored at build time
# (FREQUENT_RANKED of them, enough for the largest limit after the named codes).
FREQUENT_MATCHES = 200
_MAX_LIMIT = 100
FREQUENT_RANKED = 2 * _MAX_LIMIT

_local = threading.local()
_path: Path | None = None
_open_s: float | None = None
_lock = threading.Lock()


# A named tuple, not a dataclass: importing dataclasses (and inspect) took about a third
# of the time from import to the first answer.
class Code(namedtuple("Code", "code title kind billable parent terms")):
    """One diagnosis code of the table.

    code: str                 dotted: "E11.9", "S52.501A"
    title: str                the official description
    kind: str                 "category", "subcategory" or "extension" (7th character)
    billable: bool            a leaf code, valid on a claim (a category with children is not)
    parent: str | None        the dotted parent code; None for a category
    terms: tuple[str, ...]    index terms: inclusion terms and "includes" notes
    """

    __slots__ = ()

    @property
    def category(self) -> str:
        """The three-character category the code belongs to ("E11" for "E11.9")."""
        return self.code[:3]


def _table_path() -> Path:
    global _path
    if _path is None:
        # Next to this module, in the source tree, an installed package and the one-file
        # binary's unpack folder alike (importlib.resources took as long as all the rest).
        _path = Path(__file__).resolve().parent / "data" / TABLE_FILE
    return _path


def _db() -> sqlite3.Connection:
    db = getattr(_local, "db", None)
    if db is None:
        global _open_s
        start = time.perf_counter()
        path = _table_path()
        if not path.is_file():
            raise FileNotFoundError(f"ICD-10-CM table missing: {path}")
        # immutable: the file never changes, so SQLite takes no locks and keeps no journal
        # (it may live in a read-only install or in a one-file binary's unpack folder).
        db = sqlite3.connect(f"{path.as_uri()}?mode=ro&immutable=1", uri=True,
                             check_same_thread=True)
        db.execute("SELECT 1 FROM codes LIMIT 1").fetchone()
        _local.db = db
        with _lock:
            if _open_s is None:
                _open_s = time.perf_counter() - start
    return db


def key(code: object) -> str | None:
    """The undotted upper-case spelling of something shaped like a code, else None."""
    if not isinstance(code, str) or len(code) > 12:
        return None
    raw = code.strip().upper()
    if len(raw) > 3 and raw[3] == ".":
        raw = raw[:3] + raw[4:]
    return raw if _CODE_FORM.fullmatch(raw) else None


def dotted(raw_key: str) -> str:
    """``E119`` -> ``E11.9``; a category stays as it is."""
    return raw_key if len(raw_key) <= 3 else f"{raw_key[:3]}.{raw_key[3:]}"


_INFO_SQL = ("SELECT c.id, c.key, t.title, c.kind, c.billable, p.key FROM codes AS c "
             "JOIN code_titles AS t ON t.id = c.id LEFT JOIN codes AS p ON p.id = c.parent_id "
             "WHERE c.key = ?")
_TERMS_SQL = "SELECT term FROM names WHERE code_id = ? AND in_title = 0 ORDER BY id"


def info(code: object) -> Code | None:
    """Everything the table says about ``code``, or None when it is not a diagnosis code."""
    k = key(code)
    if k is None:
        return None
    db = _db()
    row = db.execute(_INFO_SQL, (k,)).fetchone()
    if row is None:
        return None
    code_id, k, title_, kind, billable, parent = row
    terms = tuple(t for (t,) in db.execute(_TERMS_SQL, (code_id,)).fetchall())
    return Code(dotted(k), title_, kind, bool(billable), dotted(parent) if parent else None,
                terms)


def is_valid(code: object) -> bool:
    """True for a diagnosis code of the table (category, subcategory or extension)."""
    k = key(code)
    return k is not None and _db().execute(
        "SELECT 1 FROM codes WHERE key = ?", (k,)).fetchone() is not None


def canonical(code: object) -> str | None:
    """The dotted spelling of a valid code ("e119" -> "E11.9"), else None."""
    return dotted(key(code)) if is_valid(code) else None  # type: ignore[arg-type]


def title(code: object) -> str | None:
    """The official description of a valid code, else None."""
    k = key(code)
    if k is None:
        return None
    row = _db().execute("SELECT title FROM code_titles WHERE key = ?", (k,)).fetchone()
    return row[0] if row else None


def is_billable(code: object) -> bool:
    """True for a valid leaf code (what a claim may carry)."""
    found = info(code)
    return found is not None and found.billable


def words_of(text: str) -> list[str]:
    """Every word of ``text``, lower-case, hyphens joined ("gastro-esophageal" ->
    "gastroesophageal")."""
    return _WORD.findall(text.lower().replace("-", ""))


def query_words(text: str) -> list[str]:
    """The words of ``text`` a search looks for (``words_of``), fillers left out, each
    once, at most 12."""
    words = words_of(str(text)[:_MAX_QUERY_CHARS])
    return list(dict.fromkeys(w for w in words if w not in _FILLER))[:_MAX_QUERY_WORDS]


def name_key(text: str) -> str:
    """The normal form of a name: its essential words (parenthesised and bracketed
    modifiers, fillers and "unspecified" left out), lower-case, sorted, space-separated.
    "Essential (primary) hypertension" and "hypertension, essential" are both
    "essential hypertension"."""
    text = _MODIFIER.sub(" ", str(text)[:_MAX_QUERY_CHARS].lower()).replace("-", "")
    return " ".join(sorted({w for w in _WORD.findall(text) if w not in _NAME_FILLER}))


def name_hash(key_: str) -> int:
    """The 64-bit number a name key is stored under in the table (names.key_hash)."""
    import hashlib    # on the first search, not at import (it loads OpenSSL)
    return int.from_bytes(hashlib.blake2b(key_.encode(), digest_size=8).digest(), "big",
                          signed=True)


_NAMED_SQL = ("SELECT c.id, c.key, n.in_title, coalesce(n.term, c.title) FROM names AS n "
              "JOIN codes AS c ON c.id = n.code_id WHERE n.key_hash = ?")
# The best-ranked names first, inside the FTS table (so joins see only the few rows it
# returns), then each code once with its best name's rank. LIMIT -1: every match (what
# the build stores for a frequent word).
RANKED_SQL = (f"SELECT c.id, c.key, min(r.rank) FROM (SELECT rowid, {_WEIGHTS} AS rank "
              "FROM code_search WHERE code_search MATCH ? ORDER BY rank LIMIT ?) AS r "
              "JOIN names AS n ON n.id = r.rowid JOIN codes AS c ON c.id = n.code_id "
              "GROUP BY c.id")
_FREQUENT_SQL = ("SELECT r.code_id, c.key, r.rank FROM frequent_words AS w "
                 "JOIN frequent_ranked AS r ON r.token_id = w.token_id "
                 "JOIN codes AS c ON c.id = r.code_id WHERE w.word = ? ORDER BY r.pos LIMIT ?")
_TITLE_SQL = "SELECT title FROM code_titles WHERE id = ?"


def match_expression(words: list[str], require_all: bool = True) -> str:
    """The FTS5 query for ``words``: each word quoted, so FTS5 reads it as a plain term,
    never as query syntax."""
    return (" AND " if require_all else " OR ").join(f'"{w}"' for w in words)


def rank_order(row: tuple[int, str, float]) -> tuple[float, int, str]:
    """Sort key of a ranked (id, key, rank) row: best rank first, then the shorter (more
    general) code, then the code."""
    return row[2], len(row[1]), row[1]


def ranked(words: list[str], limit: int, *,
           require_all: bool = True) -> list[tuple[int, str, float]]:
    """``[(code id, key, rank)]``, best (lowest) rank first, of the codes with a name
    matching ``words`` (query words): for a frequent single word the first ``limit`` of
    its stored ranking, else the codes of the 4 * limit + 20 best-ranked names (a code
    has a few names, so that is ``limit`` codes or more when there are)."""
    db = _db()
    if len(words) == 1:
        rows = db.execute(_FREQUENT_SQL, (words[0], limit)).fetchall()
        if rows:
            return rows
    # A code has a few names (title, terms): enough of them to fill the limit with codes.
    return sorted(db.execute(RANKED_SQL, (match_expression(words, require_all),
                                           4 * limit + 20)).fetchall(), key=rank_order)


def search(text: object, limit: int = 5, *,
           require_all: bool = True) -> list[tuple[str, str, float]]:
    """``[(code, title, score)]``, best first, for the words of ``text``.

    Words are matched in the official titles and the index terms, after Porter stemming
    ("infections" finds "infection"). With ``require_all`` (the default) a code matches
    when its title or one of its index terms contains every word, so an unknown phrase
    gives ``[]`` rather than a code that merely shares a common word; otherwise any word
    will do. Codes named exactly by the words come first (see the module's docstring),
    then the others by SQLite's BM25 relevance of their best-matching title or term;
    equal scores go to the shorter (more general) code. ``score`` is that relevance,
    sign-flipped so higher is better; an exactly named code gets the query's best score,
    so scores never rise down the list. Scores compare results of one query, not of
    different queries.
    """
    if not isinstance(text, str) or limit <= 0:
        return []
    words = query_words(text)
    if not words:
        return []
    limit = min(int(limit), _MAX_LIMIT)
    db = _db()
    # Up to ``limit`` named codes may come first: twice the limit fills it after them.
    found = ranked(words, 2 * limit, require_all=require_all)
    if not found:
        return []
    best = -found[0][2]
    # Named codes hold every word of the query in one name (the FTS condition) when the
    # query has no word a name leaves out ("unspecified", parenthesised modifiers).
    key_ = name_key(text)
    named: list[tuple[int, str, float]] = []
    if require_all and sorted(words) == key_.split():
        rows = [r for r in db.execute(_NAMED_SQL, (name_hash(key_),)).fetchall()
                if name_key(r[3]) == key_]          # a hash is not a proof
        rows.sort(key=lambda r: (-r[2], len(r[1]), r[1]))   # titles first, then general
        for code_id, k, _in_title, _name in rows:
            if code_id not in {c for c, _k, _s in named}:
                named.append((code_id, k, best))
        named = named[:limit]
    seen = {code_id for code_id, _k, _s in named}
    picked = named + [(code_id, k, -rank) for code_id, k, rank in found
                      if code_id not in seen]
    return [(dotted(k), db.execute(_TITLE_SQL, (code_id,)).fetchone()[0], round(score, 4))
            for code_id, k, score in picked[:limit]]


def warm_up() -> None:
    """Open the table now (it takes a millisecond or two)."""
    _db()


def load_seconds() -> float | None:
    """Seconds the first opening of the table took, or None before it was opened."""
    return _open_s


def source() -> dict[str, str]:
    """Where the table came from (source and its version)."""
    return dict(_db().execute("SELECT name, value FROM meta").fetchall())
