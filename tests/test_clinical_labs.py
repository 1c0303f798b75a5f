"""Lab rows from CSV exports and report text (medmitra.clinical.labs)."""

from __future__ import annotations

import time

import pytest

import docfactory as df
from medmitra.clinical import labs


def test_parse_csv_rows_and_flags() -> None:
    rows = labs.parse_csv(df.lab_csv().decode("utf-8"))
    by_test = {r.test: r for r in rows}
    assert list(by_test) == [r[0] for r in df.LAB_CSV_ROWS]
    hb = by_test["Hemoglobin"]
    assert (hb.value, hb.unit, hb.reference_range, hb.flag, hb.lab_flag, hb.numeric) == \
        ("9.1", "g/dL", "13.5-17.5", "low", "L", 9.1)
    assert hb.status == "abnormal" and not hb.critical
    assert by_test["WBC"].flag == "normal" and by_test["WBC"].lab_flag is None
    # 240 against 70-100 is high; "critical" never comes from a multiple of the range.
    assert (by_test["Glucose (fasting)"].flag, by_test["Glucose (fasting)"].critical) == \
        ("high", False)
    assert by_test["Creatinine"].flag == "normal"
    assert by_test["HbA1c"].flag == "high"
    assert by_test["HIV 1/2 antibody"].flag == "unknown"
    assert by_test["HIV 1/2 antibody"].status == "unknown"
    assert by_test["HIV 1/2 antibody"].unit is None


@pytest.mark.parametrize("delimiter", [",", ";", "\t"])
def test_parse_csv_any_delimiter_and_bom(delimiter: str) -> None:
    text = df.lab_csv(delimiter=delimiter, bom=True).decode("utf-8-sig")
    rows = labs.parse_csv(text)
    assert len(rows) == len(df.LAB_CSV_ROWS)
    assert rows[0].test == "Hemoglobin" and rows[0].flag == "low"


def test_parse_csv_header_after_title_lines_and_synonyms() -> None:
    text = ("City Lab export,,,\nPatient,REDACTED,,\n"
            "Analyte,Observed Value,UOM,Biological Reference Interval\n"
            "Potassium,6.1,mmol/L,3.5 - 5.1\nSodium,140,mmol/L,135-145\n")
    rows = labs.parse_csv(text)
    assert [(r.test, r.value, r.unit, r.flag) for r in rows] == [
        ("Potassium", "6.1", "mmol/L", "high"), ("Sodium", "140", "mmol/L", "normal")]


def test_parse_csv_uses_lab_flag_only_when_range_does_not_parse() -> None:
    text = "Test,Result,Range,Flag\nCulture,Growth,see note,H\nTSH,9.0,0.4-4.0,N\nX,1,,HH\n"
    rows = labs.parse_csv(text)
    assert [(r.flag, r.lab_flag, r.critical) for r in rows] == [
        ("high", "H", False), ("high", "N", False), ("high", "HH", True)]
    assert [r.status for r in rows] == ["abnormal", "abnormal", "critical"]


def test_parse_csv_without_header_uses_positions() -> None:
    rows = labs.parse_csv("Hemoglobin,9.1,g/dL,13.5-17.5\nPlatelets,250,10^3/uL,150-400\n")
    assert [(r.test, r.flag) for r in rows] == [("Hemoglobin", "low"), ("Platelets", "normal")]


def test_parse_csv_is_bounded() -> None:
    started = time.perf_counter()
    assert labs.parse_csv(df.wide_csv(1_000_000).decode()) == []
    table = labs.read_table(df.wide_csv(1_000_000).decode())
    assert all(len(row) <= labs.MAX_COLUMNS for row in table)
    many = "Test,Value,Unit,Range\n" + "Hb,9.1,g/dL,13.5-17.5\n" * 50_000
    assert len(labs.parse_csv(many)) == labs.MAX_ROWS
    assert labs.parse_csv("\x00\x01garbage\x7f" * 1000) == []
    assert labs.parse_csv('"unterminated,quote\n' * 10) == []
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("line, expected", [
    ("Hemoglobin 10.2 g/dL 13.5-17.5",
     ("Hemoglobin", "10.2", "g/dL", "13.5-17.5", "low", None)),
    ("WBC: 7.2 10^3/uL (4.0 - 11.0)", ("WBC", "7.2", "10^3/uL", "(4.0 - 11.0)", "normal", None)),
    ("Platelets 250 150-400", ("Platelets", "250", None, "150-400", "normal", None)),
    ("Glucose, fasting 240 H mg/dL 70-100",
     ("Glucose, fasting", "240", "mg/dL", "70-100", "high", "H")),
    ("HbA1c 8.2 % < 5.7", ("HbA1c", "8.2", "%", "< 5.7", "high", None)),
    ("Vitamin B12 350 pg/mL 200-900", ("Vitamin B12", "350", "pg/mL", "200-900", "normal", None)),
    ("Serum Creatinine 1.0 mg/dL", ("Serum Creatinine", "1.0", "mg/dL", None, "unknown", None)),
    # OCR damage seen on a real scanned report (issue 9)
    ("Haemoglobin 8.8# g/dL 12.0-15.0", ("Haemoglobin", "8.8", "g/dL", "12.0-15.0", "low", "#")),
    ("MCHC 15 .1 g/dL 13.5-17.5", ("MCHC", "15.1", "g/dL", "13.5-17.5", "normal", None)),
    ("Troponin I 1.30ng/L 0.00-0.50", ("Troponin I", "1.30", "ng/L", "0.00-0.50", "high", None)),
    ("Potassium 6.1H mmol/L 3.5-5.1", ("Potassium", "6.1", "mmol/L", "3.5-5.1", "high", "H")),
    ("Sodium 10,2 mmol/L 9,0-11,0", ("Sodium", "10,2", "mmol/L", "9,0-11,0", "normal", None)),
    ("CRP <0.5 mg/L <5", ("CRP", "<0.5", "mg/L", "<5", "normal", None)),
    # UCUM units as a lab system exports them, no range, the lab's own marker
    ("pO2 59.6 mm[Hg] L", ("pO2", "59.6", "mm[Hg]", None, "low", "L")),
    # Seen in generated reports (tests/test_clinosim_labs.py): an element symbol as the
    # name, a UCUM annotation as the unit, OCR gluing "/uL" to the value
    ("K 4.5 mmol/L", ("K", "4.5", "mmol/L", None, "unknown", None)),
    ("PT_INR 1.4 {INR} H", ("PT_INR", "1.4", "{INR}", None, "high", "H")),
    ("WBC 10831/uL H", ("WBC", "10831", "/uL", None, "high", "H")),
])
def test_parse_text_lines(line: str, expected: tuple) -> None:
    rows = labs.parse_text_lines(line)
    assert len(rows) == 1
    r = rows[0]
    assert (r.test, r.value, r.unit, r.reference_range, r.flag, r.lab_flag) == expected


@pytest.mark.parametrize("line", [
    "Page 1 of 2", "Age 45 years", "Date 12/03/2024", "CITY DIAGNOSTICS LAB",
    "Sample collected at 10 am", "Dr. Smith, MBBS", "Report ID 44512", "", "   ",
    "A 5 times", "BP 120/80 mmHg sitting",
])
def test_parse_text_lines_ignores_non_results(line: str) -> None:
    assert labs.parse_text_lines(line) == []


def test_parse_text_lines_on_a_report() -> None:
    text = "\n".join(df.DEFAULT_LAB_LINES + ["Page 1 of 1", "x" * 10_000])
    rows = labs.parse_text_lines(text)
    assert [(r.test, r.flag) for r in rows] == [
        ("Hemoglobin", "low"), ("WBC", "normal"), ("Platelets", "normal")]


def test_parse_pages_keeps_the_page_number() -> None:
    rows = labs.parse_pages(["Title only", "Hemoglobin 9.1 g/dL 13.5-17.5\nWBC 7.2 10^3/uL 4-11"])
    assert [(r.test, r.page) for r in rows] == [("Hemoglobin", 2), ("WBC", 2)]


def test_render_row_shows_direction_and_marker() -> None:
    r = labs.make_row("Hb", "8.8", "g/dL", "12-15", "#")
    assert labs.render_row(r) == "Hb: 8.8 g/dL (reference 12-15) [low; report marker #]"
