"""The prebuilt ICD-10-CM table (medmitra.clinical.icd10) against its source, the
simple-icd-10-cm package, code by code; and its search with real diagnosis phrases."""

from __future__ import annotations

import sqlite3
import warnings

import pytest

from medmitra.clinical import icd10


@pytest.fixture(scope="module")
def cm():
    with warnings.catch_warnings():
        # The package reads its data with importlib.resources.read_text (deprecated).
        warnings.simplefilter("ignore", DeprecationWarning)
        import simple_icd_10_cm
    return simple_icd_10_cm


def test_every_code_matches_the_source(cm) -> None:
    """Every item of the source: each diagnosis code is in the table with the same title,
    kind, parent, billable flag and index terms; chapters and blocks are not codes."""
    diagnosis = set()
    for code in cm.get_all_codes(with_dots=True):
        if not cm.is_category_or_subcategory(code):
            assert not icd10.is_valid(code), code
            assert icd10.info(code) is None, code
            continue
        diagnosis.add(code)
        found = icd10.info(code)
        assert found is not None, code
        assert found.code == code
        assert found.title == cm.get_description(code), code
        assert icd10.title(code.replace(".", "").lower()) == found.title
        assert found.billable == cm.is_leaf(code), code
        kind = ("extension" if cm.is_extended_subcategory(code)
                else "category" if cm.is_category(code) else "subcategory")
        assert found.kind == kind, code
        assert found.parent == (None if kind == "category" else cm.get_parent(code)), code
        assert found.category == code[:3]
        terms = [t.strip() for t in cm.get_inclusion_term(code) + cm.get_includes(code)]
        assert found.terms == tuple(dict.fromkeys(t for t in terms if t)), code
    db = sqlite3.connect(str(icd10._table_path()))
    try:
        assert db.execute("SELECT count(*) FROM codes").fetchone()[0] == len(diagnosis)
    finally:
        db.close()
    assert len(diagnosis) > 90_000


@pytest.mark.parametrize("raw, code", [
    ("E11.9", "E11.9"), ("e119", "E11.9"), (" E11.9 ", "E11.9"), ("E11", "E11"),
    ("S52501A", "S52.501A"), ("t14.90xa", "T14.90XA"), ("F32.A", "F32.A"), ("I10", "I10"),
])
def test_spellings_of_a_code(raw: str, code: str) -> None:
    assert icd10.is_valid(raw)
    assert icd10.canonical(raw) == code


@pytest.mark.parametrize("raw", [
    None, "", "   ", 42, "E11.99999", "E11.Z", "E08-E13", "4", "A0", "ZZZ.9", "E1 1.9",
    "E11..9", "E11.9;", "' OR 1=1 --", "\"E11\"", "E" * 10_000, "I10.9", "J18.99",
])
def test_not_a_code(raw) -> None:
    assert not icd10.is_valid(raw)
    assert icd10.canonical(raw) is None
    assert icd10.title(raw) is None
    assert icd10.info(raw) is None


def test_billable_and_category() -> None:
    e11 = icd10.info("E11")
    assert e11 is not None and e11.kind == "category" and not e11.billable
    assert e11.parent is None and "diabetes NOS" in e11.terms
    assert icd10.is_billable("E11.9") and not icd10.is_billable("E11")
    s = icd10.info("S52.501A")
    assert s is not None and s.kind == "extension" and s.billable
    assert s.parent == "S52.501" and s.category == "S52"
    assert s.title == ("Unspecified fracture of the lower end of right radius, "
                       "initial encounter for closed fracture")
    assert not icd10.is_billable("S52.501")   # needs its 7th character
    assert icd10.source()["source_version"]


# Diagnosis phrases as clinicians and problem lists write them, with the code (or
# category) a coder would pick; "Cardiovascular disease" once came out as B20 (HIV).
@pytest.mark.parametrize("phrase, first", [
    ("Hypertension", "I10"),
    ("Essential hypertension", "I10"),
    ("Type 2 diabetes mellitus", "E11"),
    ("Diabetes mellitus type 2", "E11"),
    ("Acute myocardial infarction", "I21"),
    ("Iron deficiency anemia", "D50"),
    ("Anemia", "D64.9"),
    ("Heart failure", "I50"),
    ("Congestive heart failure", "I50.9"),
    ("Chronic obstructive pulmonary disease", "J44"),
    ("COPD exacerbation", "J44.1"),
    ("Gastroesophageal reflux disease", "K21"),
    ("Gastro-esophageal reflux disease", "K21"),
    ("Acute bronchitis", "J20"),
    ("Chronic sinusitis", "J32"),
    ("Osteoarthritis of knee", "M17"),
    ("Hyperlipidemia", "E78.5"),
    ("Prediabetes", "R73.03"),
    ("Asthma", "J45"),
    ("Migraine", "G43"),
    ("Gout", "M10"),
    ("Fracture of femur", "S72"),
    ("Chronic kidney disease stage 3", "N18.3"),
    # Single common words (read from the stored ranking): the code whose name is the word.
    ("Pain", "R52"),               # "Pain NOS"
    ("Fracture", "T14.8"),         # "Fracture NOS"
    ("Injury", "T14.9"),           # "Unspecified injury"
    ("Hemorrhage", "R58"),         # "Hemorrhage NOS"
])
def test_search_ranks_the_named_code_first(phrase: str, first: str) -> None:
    results = icd10.search(phrase, 5)
    assert results, phrase
    code, title, score = results[0]
    assert code == first or code.startswith(first + "."), (phrase, results)
    assert title == icd10.title(code) and score > 0


def test_cardiovascular_disease_is_not_hiv() -> None:
    results = icd10.search("Cardiovascular disease", 10)
    codes = [code for code, _t, _s in results]
    assert "B20" not in codes
    # Only codes whose title or one index term has both words.
    for code, _t, _s in results:
        info = icd10.info(code)
        assert info is not None
        names = [info.title.lower()] + [t.lower() for t in info.terms]
        assert any("cardiovascular" in n and "disease" in n for n in names), code
    assert {"I25.1", "I13"} <= set(codes)


def test_every_word_must_match_one_name() -> None:
    # No title or term says "community acquired pneumonia": nothing rather than a code
    # that shares one word.
    assert icd10.search("Community acquired pneumonia") == []
    assert icd10.search("zzqqxx") == []
    loose = icd10.search("Community acquired pneumonia", 5, require_all=False)
    assert loose and all(s > 0 for _c, _t, s in loose)
    scores = [s for _c, _t, s in icd10.search("pneumonia", 20)]
    assert len(scores) == 20


def test_search_input_is_words_not_syntax() -> None:
    for text in ['"', "NEAR(a b)", "title:asthma", "asthma*", "- OR -", "AND", "^asthma",
                 "a" * 100_000, "\x00asthma", "阿司匹林", "(", ")) OR ((", "{title}: x"]:
        icd10.search(text)          # never an FTS5 syntax error
    assert icd10.search('"asthma*:')[0][0] == icd10.search("asthma")[0][0] == "J45"
    assert icd10.search("", 5) == [] and icd10.search("asthma", 0) == []
    assert icd10.search(None) == []  # type: ignore[arg-type]
    assert len(icd10.search("fracture", 1000)) == 100


def test_name_key_normal_form() -> None:
    assert icd10.name_key("Essential (primary) hypertension") == "essential hypertension"
    assert icd10.name_key("hypertension, essential") == "essential hypertension"
    assert icd10.name_key("Human immunodeficiency virus [HIV] disease") == \
        "disease human immunodeficiency virus"
    assert icd10.name_key("Anemia, unspecified") == "anemia"
    assert icd10.name_key("Gastro-esophageal reflux") == "gastroesophageal reflux"


# Words found in the most names (each a stored ranking) and a few found in few (FTS5).
_COMMON = ["disease", "fracture", "fractures", "pain", "injury", "disorder", "syndrome",
           "assault", "unintentional", "left", "unspecified", "other", "hematoma", "asthma"]


@pytest.mark.parametrize("word", _COMMON)
def test_equal_scores_go_to_the_shorter_code(word: str) -> None:
    # "assault" once gave T61.03 before X96 (same score): the FTS5 LIMIT cut the ties.
    results = icd10.search(word, 100)
    assert len(results) >= 30
    for (code_a, _ta, score_a), (code_b, _tb, score_b) in zip(results, results[1:]):
        assert score_a >= score_b, (word, code_a, code_b)
    ranked = icd10.ranked([word], 100)
    for (_i, key_a, rank_a), (_j, key_b, rank_b) in zip(ranked, ranked[1:]):
        assert (rank_a, len(key_a), key_a) < (rank_b, len(key_b), key_b), (word, key_a, key_b)


def test_stored_rankings_are_the_fts_ranking_of_every_match() -> None:
    """Every word of more than FREQUENT_MATCHES names has a stored ranking, and it is what
    ranking all its matches with BM25 gives (computed here on its own)."""
    db = sqlite3.connect(str(icd10._table_path()))
    try:
        db.execute("CREATE VIRTUAL TABLE temp.vocab USING fts5vocab(main, code_search, row)")
        frequent = {t for (t,) in db.execute("SELECT term FROM temp.vocab WHERE doc > ?",
                                            (icd10.FREQUENT_MATCHES,))}
        stored = dict(db.execute("SELECT token, id FROM frequent_tokens").fetchall())
        # All but the words a search leaves out ("of", "and", "the", ...).
        assert {t for t in frequent if t not in stored} <= icd10._FILLER
        assert len(stored) >= 250
        words = db.execute("SELECT t.token, min(w.word), count(*) FROM frequent_words AS w "
                           "JOIN frequent_tokens AS t ON t.id = w.token_id "
                           "GROUP BY t.id").fetchall()
        assert len(words) == len(stored)
        for token, word, _n in words:
            expected = []
            for code_id, key_, rank in db.execute(
                    "SELECT n.code_id, c.key, min(s.r) FROM (SELECT rowid, "
                    "bm25(code_search, 2.0, 1.0) AS r FROM code_search "
                    "WHERE code_search MATCH ? LIMIT -1) AS s "
                    "JOIN names AS n ON n.id = s.rowid JOIN codes AS c ON c.id = n.code_id "
                    "GROUP BY n.code_id", (f'"{word}"',)):
                expected.append((rank, len(key_), key_, code_id))
            expected.sort()
            want = [(code_id, key_, rank) for rank, _n, key_, code_id
                    in expected[:icd10.FREQUENT_RANKED]]
            assert icd10.ranked([word], icd10.FREQUENT_RANKED) == want, (token, word)
    finally:
        db.close()
