"""ICD-10-CM validation against the simple-icd-10-cm table."""

from __future__ import annotations

import pytest

from medmitra.pipeline import icd10


@pytest.mark.parametrize("raw, code", [
    ("E11.9", "E11.9"),
    ("e119", "E11.9"),
    (" E11.9 ", "E11.9"),
    ("E11", "E11"),
    ("I10", "I10"),
    ("j18.9", "J18.9"),
    ("S52.501A", "S52.501A"),          # 7th-character extension
    ("s52501a", "S52.501A"),
    ("ICD-10: E11.65 (with hyperglycemia)", "E11.65"),
    ("U07.1", "U07.1"),
])
def test_valid_codes_normalised(raw: str, code: str) -> None:
    assert icd10.normalize_code(raw) == code


@pytest.mark.parametrize("raw, code", [
    ("E11.99999", "E11.9"),    # longest valid prefix = nearest valid ancestor
    ("E11.Z", "E11"),
    ("E11.659", "E11.65"),
    ("I10.9", "I10"),          # I10 has no children
    ("J18.99", "J18.9"),
    ("E11.9999999999", "E11.9"),
    ("Z99Z99Z", "Z99"),               # mangled, but its category exists
    ("E1" + "1" * 10_000, "E11.11"),  # bounded: only the first 100 characters are read
])
def test_invalid_codes_fall_back_to_nearest_valid_ancestor(raw: str, code: str) -> None:
    assert icd10.normalize_code(raw) == code
    assert icd10.describe(code) is not None


@pytest.mark.parametrize("raw", [
    None, "", "   ", "garbage", "12345", "X9Y",
    "E08-E13",   # a block, not a code
    "4",         # a chapter
    "A0", "ZZZ.9", "#" * 10_000,
])
def test_garbage_gives_none(raw: str | None) -> None:
    assert icd10.normalize_code(raw) is None


def test_never_returns_an_invalid_code() -> None:
    for raw in ["A00.0", "A00.9X", "B99", "C34.90", "C34.9Z", "F32.A", "M54.50", "R51.9",
                "T14.90XA", "T14.90XZ", "Z00.00", "Z00.009"]:
        code = icd10.normalize_code(raw)
        assert code is None or icd10.describe(code) is not None, raw


def test_describe() -> None:
    assert icd10.describe("E11.9") == "Type 2 diabetes mellitus without complications"
    assert icd10.describe("e119") == "Type 2 diabetes mellitus without complications"
    assert icd10.describe("E11.99999") is None
    assert icd10.describe("E08-E13") is None
    assert icd10.describe("") is None


def test_search_by_name() -> None:
    results = icd10.search("type 2 diabetes mellitus")
    assert results and results[0][0] == "E11"
    assert all(icd10.normalize_code(code) == code for code, _desc in results)
    assert len(icd10.search("pneumonia", limit=3)) == 3
    assert any(code.startswith("J18") for code, _ in icd10.search("pneumonia unspecified organism"))
    assert icd10.search("") == [] and icd10.search("zzqqxx") == []


def test_load_time_is_recorded() -> None:
    icd10.normalize_code("E11.9")
    seconds = icd10.load_seconds()
    assert seconds is not None and 0 < seconds < 30
