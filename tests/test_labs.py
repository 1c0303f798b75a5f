"""Reference ranges, deterministic lab flags, CSV and free-text lab parsing."""

from __future__ import annotations

import time

import pytest

import docfactory as df
from medmitra.pipeline import labs


@pytest.mark.parametrize("text, expected", [
    ("13.5-17.5", (13.5, 17.5)),
    ("13.5 - 17.5", (13.5, 17.5)),
    ("13.5 – 17.5", (13.5, 17.5)),          # en dash
    ("13.5 to 17.5", (13.5, 17.5)),
    ("(4.0-11.0)", (4.0, 11.0)),
    ("[150 - 400]", (150.0, 400.0)),
    ("13.5-17.5 g/dL", (13.5, 17.5)),
    ("-2 - 2", (-2.0, 2.0)),
    ("<5", (None, 5.0)),
    ("< 5.7", (None, 5.7)),
    ("<= 200", (None, 200.0)),
    ("≤ 200", (None, 200.0)),
    ("up to 5", (None, 5.0)),
    ("Upto 40 U/L", (None, 40.0)),
    ("less than 150", (None, 150.0)),
    ("> 40", (40.0, None)),
    ("≥60", (60.0, None)),
    ("above 90", (90.0, None)),
    ("1,200-3,400", (1200.0, 3400.0)),
    ("Non-reactive", None),
    ("Negative", None),
    ("", None),
    (None, None),
    ("17.5-13.5", None),                    # inverted
    ("see comment", None),
    ("5", None),
])
def test_parse_range(text: str | None, expected) -> None:
    assert labs.parse_range(text) == expected


@pytest.mark.parametrize("value, rng, status", [
    ("15.0", "13.5-17.5", "normal"),
    ("13.5", "13.5-17.5", "normal"),        # bounds are inclusive
    ("17.5", "13.5-17.5", "normal"),
    ("10.2", "13.5-17.5", "abnormal"),
    ("6.5", "13.5-17.5", "critical"),       # < 0.5 x low
    ("18", "13.5-17.5", "abnormal"),
    ("35.1", "13.5-17.5", "critical"),      # > 2 x high
    ("35.0", "13.5-17.5", "abnormal"),      # exactly 2 x high is not beyond it
    ("240", "70-100", "critical"),
    ("8.2", "< 5.7", "abnormal"),
    ("12", "<5", "critical"),
    ("4", "<5", "normal"),
    ("30", "> 40", "abnormal"),
    ("15", "> 40", "critical"),
    ("55", "> 40", "normal"),
    ("-3", "-2 - 2", "abnormal"),           # low <= 0: no critical margin below
    ("10,2", "13.5-17.5", "abnormal"),      # decimal comma
    ("Positive", "Negative", "unknown"),
    ("9.1", None, "unknown"),
    ("9.1", "", "unknown"),
    ("", "13.5-17.5", "unknown"),
    ("<0.1", "0-5", "unknown"),
    ("abc", "13.5-17.5", "unknown"),
])
def test_flag_table(value: str, rng: str | None, status: str) -> None:
    assert labs.flag(value, rng) == status


def test_parse_csv_rows_and_flags() -> None:
    rows = labs.parse_csv(df.lab_csv().decode("utf-8"))
    by_test = {r.test: r for r in rows}
    assert list(by_test) == [r[0] for r in df.LAB_CSV_ROWS]
    hb = by_test["Hemoglobin"]
    assert (hb.value, hb.unit, hb.reference_range, hb.status) == \
        ("9.1", "g/dL", "13.5-17.5", "abnormal")
    assert by_test["WBC"].status == "normal"
    assert by_test["Glucose (fasting)"].status == "critical"
    assert by_test["Creatinine"].status == "normal"
    assert by_test["HbA1c"].status == "abnormal"
    assert by_test["HIV 1/2 antibody"].status == "unknown"
    assert by_test["HIV 1/2 antibody"].unit is None


@pytest.mark.parametrize("delimiter", [",", ";", "\t"])
def test_parse_csv_any_delimiter_and_bom(delimiter: str) -> None:
    text = df.lab_csv(delimiter=delimiter, bom=True).decode("utf-8-sig")
    rows = labs.parse_csv(text)
    assert len(rows) == len(df.LAB_CSV_ROWS)
    assert rows[0].test == "Hemoglobin" and rows[0].status == "abnormal"


def test_parse_csv_header_after_title_lines_and_synonyms() -> None:
    text = ("City Lab export,,,\nPatient,REDACTED,,\n"
            "Analyte,Observed Value,UOM,Biological Reference Interval\n"
            "Potassium,6.1,mmol/L,3.5 - 5.1\nSodium,140,mmol/L,135-145\n")
    rows = labs.parse_csv(text)
    assert [(r.test, r.value, r.unit, r.status) for r in rows] == [
        ("Potassium", "6.1", "mmol/L", "abnormal"), ("Sodium", "140", "mmol/L", "normal")]


def test_parse_csv_uses_lab_flag_only_when_range_does_not_parse() -> None:
    text = "Test,Result,Range,Flag\nCulture,Growth,see note,H\nTSH,9.0,0.4-4.0,N\nX,1,,HH\n"
    rows = labs.parse_csv(text)
    assert [r.status for r in rows] == ["abnormal", "critical", "critical"]


def test_parse_csv_without_header_uses_positions() -> None:
    rows = labs.parse_csv("Hemoglobin,9.1,g/dL,13.5-17.5\nPlatelets,250,10^3/uL,150-400\n")
    assert [(r.test, r.status) for r in rows] == \
        [("Hemoglobin", "abnormal"), ("Platelets", "normal")]


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
    ("Hemoglobin 10.2 g/dL 13.5-17.5", ("Hemoglobin", "10.2", "g/dL", "13.5-17.5", "abnormal")),
    ("WBC: 7.2 10^3/uL (4.0 - 11.0)", ("WBC", "7.2", "10^3/uL", "(4.0 - 11.0)", "normal")),
    ("Platelets 250 150-400", ("Platelets", "250", None, "150-400", "normal")),
    ("Glucose, fasting 240 H mg/dL 70-100",
     ("Glucose, fasting", "240", "mg/dL", "70-100", "critical")),
    ("HbA1c 8.2 % < 5.7", ("HbA1c", "8.2", "%", "< 5.7", "abnormal")),
    ("Vitamin B12 350 pg/mL 200-900", ("Vitamin B12", "350", "pg/mL", "200-900", "normal")),
    ("Serum Creatinine 1.0 mg/dL", ("Serum Creatinine", "1.0", "mg/dL", None, "unknown")),
])
def test_parse_text_lines(line: str, expected: tuple) -> None:
    rows = labs.parse_text_lines(line)
    assert len(rows) == 1
    r = rows[0]
    assert (r.test, r.value, r.unit, r.reference_range, r.status) == expected


@pytest.mark.parametrize("line", [
    "Page 1 of 2", "Age 45 years", "Date 12/03/2024", "CITY DIAGNOSTICS LAB",
    "Sample collected at 10 am", "Dr. Smith, MBBS", "Report ID 44512", "", "   ",
])
def test_parse_text_lines_ignores_non_results(line: str) -> None:
    assert labs.parse_text_lines(line) == []


def test_parse_text_lines_on_a_report() -> None:
    text = "\n".join(df.DEFAULT_LAB_LINES + ["Page 1 of 1", "x" * 10_000])
    rows = labs.parse_text_lines(text)
    assert [(r.test, r.status) for r in rows] == [
        ("Hemoglobin", "abnormal"), ("WBC", "normal"), ("Platelets", "normal")]
