#!/usr/bin/env python3
"""Build medmitra/clinical/data/icd10cm.sqlite, the ICD-10-CM code table the server reads.

The source is the simple-icd-10-cm package (the CMS tabular list and code list it ships);
it is needed only here and in the tests that check the table against it, never at run
time. Re-run after upgrading that package, then run tests/test_icd10_table.py:

    .venv/bin/python scripts/build-icd10-table.py

What goes in (every diagnosis code: categories, subcategories and 7th-character
extensions; chapters and blocks are not diagnosis codes and are left out):

- codes(id, key, kind, parent_id, billable, title): ``key`` is the code without its dot,
  ``parent_id`` the parent's row (NULL for a category), ``billable`` 1 for a leaf code.
  ``title`` is the official description; for a 7th-character extension (half the table)
  only what the 7th character adds ("initial encounter for closed fracture"), since its
  official description is always its parent's plus ", " plus that (the view code_titles
  joins them; the build checks it).
- names(id, code_id, in_title, term, key_hash): one row per name of a code: its title
  (``in_title`` 1, ``term`` NULL: the text is the code's title) and each index term
  (inclusion terms and "includes" notes, in the source's order). Titles of 7th-character
  extensions are not names: their words are their parent's plus the encounter, and a
  search names the code a clinician names. ``key_hash`` is
  medmitra.clinical.icd10.name_hash of the name's essential words (words in parentheses
  are nonessential modifiers, as the tabular list writes them: "Essential (primary)
  hypertension" is "essential hypertension"); a search whose words are exactly a name
  ranks it first.
- code_search: an FTS5 index over the names (Porter stemming, diacritics folded, hyphens
  dropped: "gastro-esophageal" is "gastroesophageal"), one row per name so that every
  word of a query must be found in one title or one term, not spread over several.
  The view name_text is its external content, so the text is stored once. Searched with
  SQLite's BM25.
- frequent_tokens(id, token, matches), frequent_words(word, token_id),
  frequent_ranked(token_id, pos, code_id, rank): for each search term (a Porter stem) of
  more than icd10.FREQUENT_MATCHES names, the words of the names that search for it
  ("fracture", "fractures") and its best icd10.FREQUENT_RANKED codes in search order
  (icd10.rank_order over every match, each code with its best name's BM25 rank), so a
  one-word search for it reads them instead of ranking thousands of names.
- meta(name, value): the source and its version.

The output is deterministic for a given source: rows in the table's own order.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sqlite3
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from medmitra.clinical.icd10 import (  # noqa: E402
    _FILLER, FREQUENT_MATCHES, FREQUENT_RANKED, RANKED_SQL, TABLE_FILE, match_expression,
    name_hash, name_key, rank_order, words_of)

DEFAULT_OUT = ROOT / "medmitra" / "clinical" / "data" / TABLE_FILE
TOKENIZE = "porter unicode61 remove_diacritics 2"

SCHEMA = """
CREATE TABLE codes (
    id        INTEGER PRIMARY KEY,
    key       TEXT NOT NULL UNIQUE,
    kind      TEXT NOT NULL CHECK (kind IN ('category', 'subcategory', 'extension')),
    parent_id INTEGER REFERENCES codes (id),
    billable  INTEGER NOT NULL CHECK (billable IN (0, 1)),
    title     TEXT NOT NULL
);
CREATE VIEW code_titles (id, key, kind, parent_id, billable, title) AS
    SELECT c.id, c.key, c.kind, c.parent_id, c.billable,
           CASE c.kind WHEN 'extension' THEN p.title || ', ' || c.title ELSE c.title END
    FROM codes AS c LEFT JOIN codes AS p ON p.id = c.parent_id;
CREATE TABLE names (
    id       INTEGER PRIMARY KEY,
    code_id  INTEGER NOT NULL REFERENCES codes (id),
    in_title INTEGER NOT NULL CHECK (in_title IN (0, 1)),
    term     TEXT,
    key_hash INTEGER NOT NULL
);
CREATE INDEX names_by_key ON names (key_hash);
CREATE INDEX names_by_code ON names (code_id);
CREATE VIEW name_text (id, title, term) AS
    SELECT n.id, replace(CASE n.in_title WHEN 1 THEN c.title ELSE '' END, '-', ''),
           replace(coalesce(n.term, ''), '-', '')
    FROM names AS n JOIN codes AS c ON c.id = n.code_id;
CREATE VIRTUAL TABLE code_search USING fts5(
    title, term, content='name_text', content_rowid='id', tokenize='{tokenize}'
);
CREATE TABLE frequent_tokens (
    id      INTEGER PRIMARY KEY,
    token   TEXT NOT NULL UNIQUE,
    matches INTEGER NOT NULL
);
CREATE TABLE frequent_words (
    word     TEXT PRIMARY KEY,
    token_id INTEGER NOT NULL REFERENCES frequent_tokens (id)
) WITHOUT ROWID;
CREATE TABLE frequent_ranked (
    token_id INTEGER NOT NULL REFERENCES frequent_tokens (id),
    pos      INTEGER NOT NULL,
    code_id  INTEGER NOT NULL REFERENCES codes (id),
    rank     REAL NOT NULL,
    PRIMARY KEY (token_id, pos)
) WITHOUT ROWID;
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _rows():
    """((id, key, kind, parent_id, billable, title), [index terms]) per diagnosis code,
    in table order."""
    with warnings.catch_warnings():
        # The package reads its data with importlib.resources.read_text (deprecated on 3.11).
        warnings.simplefilter("ignore", DeprecationWarning)
        import simple_icd_10_cm as cm
    ids: dict[str, int] = {}
    for code in cm.get_all_codes(with_dots=True):
        if code in ids or not cm.is_category_or_subcategory(code):
            continue    # chapters, blocks; a block named like its only category comes twice
        ids[code] = row_id = len(ids) + 1
        title = cm.get_description(code)
        parent = None
        if cm.is_extended_subcategory(code):
            kind = "extension"
            parent = cm.get_parent(code)
            prefix = cm.get_description(parent) + ", "
            if not title.startswith(prefix) or cm.is_extended_subcategory(parent):
                raise SystemExit(f"{code}: title is not its parent's plus the 7th character's")
            title = title[len(prefix):]
        elif cm.is_category(code):
            kind = "category"
        else:
            kind = "subcategory"
            parent = cm.get_parent(code)
        terms = list(dict.fromkeys(t.strip() for t in
                                   cm.get_inclusion_term(code) + cm.get_includes(code)
                                   if t and t.strip()))
        yield (row_id, code.replace(".", ""), kind, ids[parent] if parent else None,
               int(cm.is_leaf(code)), title), terms


def _frequent(db: sqlite3.Connection) -> None:
    """Fill frequent_tokens, frequent_words and frequent_ranked (see the docstring)."""
    db.execute("CREATE VIRTUAL TABLE temp.vocab USING fts5vocab(main, code_search, row)")
    counts = dict(db.execute("SELECT term, doc FROM temp.vocab WHERE doc > ?",
                             (FREQUENT_MATCHES,)).fetchall())
    # Each word of the names, tokenised as the search tokenises it (one row per word).
    words = sorted({w for title, term in db.execute("SELECT title, term FROM name_text")
                    for w in words_of(f"{title} {term}") if w not in _FILLER})
    db.execute(f"CREATE VIRTUAL TABLE temp.surface USING fts5(word, tokenize='{TOKENIZE}')")
    db.executemany("INSERT INTO temp.surface (rowid, word) VALUES (?, ?)",
                   enumerate(words, 1))
    db.execute("CREATE VIRTUAL TABLE temp.surface_tokens "
               "USING fts5vocab(temp, surface, instance)")
    tokens: dict[int, list[str]] = {}
    for doc, token in db.execute("SELECT doc, term FROM temp.surface_tokens"):
        tokens.setdefault(doc, []).append(token)
    by_token: dict[str, list[str]] = {}
    for doc, toks in tokens.items():
        if len(toks) == 1 and toks[0] in counts:
            by_token.setdefault(toks[0], []).append(words[doc - 1])
    for token_id, token in enumerate(sorted(by_token), 1):
        db.execute("INSERT INTO frequent_tokens VALUES (?, ?, ?)",
                   (token_id, token, counts[token]))
        db.executemany("INSERT INTO frequent_words VALUES (?, ?)",
                       [(w, token_id) for w in by_token[token]])
        rows = sorted(db.execute(RANKED_SQL, (match_expression(by_token[token][:1]), -1)),
                      key=rank_order)[:FREQUENT_RANKED]
        db.executemany("INSERT INTO frequent_ranked VALUES (?, ?, ?, ?)",
                       [(token_id, pos, code_id, rank)
                        for pos, (code_id, _key, rank) in enumerate(rows)])
    db.execute("DROP TABLE temp.surface_tokens")
    db.execute("DROP TABLE temp.surface")
    db.execute("DROP TABLE temp.vocab")


def build(out: Path) -> dict[str, int]:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    db = sqlite3.connect(tmp)
    try:
        db.executescript(SCHEMA.replace("{tokenize}", TOKENIZE))
        names = []
        for code, terms in _rows():
            db.execute("INSERT INTO codes VALUES (?, ?, ?, ?, ?, ?)", code)
            row_id, kind, title = code[0], code[2], code[5]
            if kind != "extension":
                names.append((row_id, 1, None, name_hash(name_key(title))))
            names += [(row_id, 0, t, name_hash(name_key(t))) for t in terms]
        db.executemany(
            "INSERT INTO names (code_id, in_title, term, key_hash) VALUES (?, ?, ?, ?)", names)
        db.execute("INSERT INTO code_search (code_search) VALUES ('rebuild')")
        db.execute("INSERT INTO code_search (code_search) VALUES ('optimize')")
        _frequent(db)
        version = importlib.metadata.version("simple-icd-10-cm")
        db.executemany("INSERT INTO meta VALUES (?, ?)", [
            ("source", "ICD-10-CM tabular list and code list, as shipped by simple-icd-10-cm"),
            ("source_version", version),
        ])
        db.commit()
        counts = dict(db.execute("SELECT kind, count(*) FROM codes GROUP BY kind").fetchall())
        db.execute("VACUUM")
    finally:
        db.close()
    os.replace(tmp, out)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output file")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    counts = build(args.out)
    print(f"{args.out}: {sum(counts.values())} codes {counts}, "
          f"{args.out.stat().st_size / 1e6:.1f} MB, built in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
