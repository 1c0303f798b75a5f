"""ICD-10 by lookup (medmitra.clinical.coding) on the shipped code table."""

from __future__ import annotations

import pytest

from medmitra.clinical import coding, icd10


@pytest.mark.parametrize("diagnosis, expected_first", [
    ("Iron deficiency anemia", "D50"),
    ("Type 2 diabetes", "E11"),
    ("Community acquired pneumonia", "J18"),
    ("Urinary tract infection", "N39.0"),
    ("Acute myocardial infarction", "I21"),
    ("Anemia", "D64.9"),
])
def test_candidates_agree_with_the_diagnosis(diagnosis, expected_first) -> None:
    cands = coding.candidates(diagnosis)
    assert cands and cands[0][0] == expected_first
    for code, title in cands:
        assert icd10.title(code) == title and coding.agreement(diagnosis, code) is None


@pytest.mark.parametrize("diagnosis, code", [
    ("Cardiovascular disease", "B20"),           # stored 8 times in the evaluation
    ("Community acquired pneumonia", "P23"),     # congenital pneumonia
    ("Type 2 diabetes", "E10"),                  # type 1
    ("Cardiovascular disease", "C96"),           # a code cut back from C96.1
    ("Iron deficiency anemia", "E11.9"),
])
def test_a_code_whose_title_disagrees_is_refused(diagnosis, code) -> None:
    assert coding.agreement(diagnosis, code) is not None


def test_nothing_specific_or_unknown_gets_no_candidate() -> None:
    assert coding.candidates("disease") == []
    assert coding.candidates("Zorblax syndrome") == []
    assert coding.agreement("Anemia", "NOT.A.CODE") is not None


@pytest.mark.parametrize("diagnosis, not_offered", [
    ("Urinary tract infection", "P39.3"),        # neonatal
    ("Urinary tract infection", "O23.4"),        # in pregnancy
    ("Acute myocardial infarction", "I22.9"),    # subsequent infarction
    ("Chronic kidney disease", "I12"),           # hypertensive
])
def test_candidates_adding_words_the_diagnosis_does_not_say_are_not_offered(
        diagnosis, not_offered) -> None:
    assert not_offered not in [c for c, _ in coding.candidates(diagnosis)]
