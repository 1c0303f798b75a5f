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
    # A hang guard, not a speed claim (speed is measured in bench/): the work is bounded
    # by MAX_ROWS/MAX_COLUMNS; 5 s failed on a loaded 2-core machine (load 15).
    assert time.perf_counter() - started < 60


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


# --------------------------------------------------------------------------- critical limits

@pytest.mark.parametrize("test, value, unit, rng, flag, expected_flag, critical", [
    # issue 9: an INR of 2.7 (a patient on warfarin) is high, not critical (limit > 5.0)
    ("INR", "2.7", None, "0.8-1.2", None, "high", False),
    ("PT INR", "5.4", None, "0.8-1.2", None, "high", True),
    ("Potassium", "6.8", "mmol/L", "3.5-5.1", None, "high", True),
    ("K", "6.8", "mmol/L", None, None, "high", True),            # no range: the limit's side
    ("Serum potassium", "6.8", "mEq/L", "3.5-5.1", None, "high", True),
    ("Potassium", "2.5", "mmol/L", "3.5-5.1", None, "low", True),
    ("Potassium", "6.2", "mmol/L", "3.5-5.1", None, "high", False),  # limits are exclusive
    ("Potassium", "6.8", None, None, None, "unknown", False),        # no unit: not from table
    ("Potassium", "6.8", "mg/dL", None, None, "unknown", False),     # unknown unit for K
    ("Glucose", "40", "mg/dL", "70-100", None, "low", True),
    ("Glucose", "40", "mmol/L", "3.9-5.6", None, "high", True),
    ("Glucose (fasting)", "240", "mg/dL", "70-100", None, "high", False),
    ("Blood glucose", ">600", "mg/dL", "70-140", None, "high", True),
    # twice outside its range but within the limits: not critical
    ("Sodium", "128", "mmol/L", "135-145", None, "low", False),
    ("Haemoglobin", "6.1", "g/dL", "12-16", None, "low", True),
    ("Hb", "61", "g/L", "120-160", None, "low", True),
    ("Hemoglobin", "9.1", "g/dL", "13.5-17.5", "L", "low", False),
    ("Hemoglobin A1c", "15", "%", "4-6", None, "high", False),       # not haemoglobin
    ("Platelet count", "15", "10^3/uL", "150-400", None, "low", True),
    ("Platelets", "15", "x10^9/L", "150-400", None, "low", True),
    ("WBC", "45.0", "10^9/L", "4-11", None, "high", True),
    ("WBC", "22.0", "10^9/L", "4-11", None, "high", False),          # twice the top: not critical
    ("Troponin I", "0.45", "ng/mL", "<0.04", None, "high", True),
    ("Troponin I", "<0.01", "ng/mL", "<0.04", None, "normal", False),
    ("pH", "7.12", None, "7.35-7.45", None, "low", True),
    ("pCO2", "72", "mmHg", "35-45", None, "high", True),
    ("Calcium", "14.1", "mg/dL", "8.5-10.5", None, "high", True),
    ("Ionised calcium", "0.70", "mmol/L", "1.15-1.30", None, "low", True),
    # the report's own range calls it normal: the table does not override the lab
    ("Glucose", "40", "mmol/L", "30-50", None, "normal", False),
    # the lab's own critical marker still counts, whatever the table says
    ("Potassium", "5.9", "mmol/L", "3.5-5.1", "HH", "high", True),
    ("Ferritin", "3", "ng/mL", "15-150", "LL", "low", True),
    ("Sodium", "131", "mmol/L", None, "critical", "unknown", True),
])
def test_critical_only_from_documented_limits_or_the_lab_marker(
        test, value, unit, rng, flag, expected_flag, critical) -> None:
    row = labs.make_row(test, value, unit, rng, flag)
    assert (row.flag, row.critical) == (expected_flag, critical)
    assert row.status == ("critical" if critical else row.status)


def test_every_parser_applies_the_critical_limits() -> None:
    csv_rows = labs.parse_csv("test,value,unit,range\nPotassium,6.8,mmol/L,3.5-5.1\n"
                              "INR,2.7,,0.8-1.2\n")
    assert [(r.test, r.critical) for r in csv_rows] == [("Potassium", True), ("INR", False)]
    text_rows = labs.parse_text_lines("Potassium 6.8 mmol/L 3.5-5.1\nGlucose 40 mg/dL 70-100\n"
                                      "Sodium 128 mmol/L 135-145")
    assert [(r.test, r.critical) for r in text_rows] == [
        ("Potassium", True), ("Glucose", True), ("Sodium", False)]
    # The key finding says which documented limit made it critical; the lab's own marker
    # needs no limit.
    assert text_rows[0].finding() == \
        "Potassium 6.8 mmol/L (high; critical, beyond the limit > 6.2)"
    assert labs.make_row("Ferritin", "3", "ng/mL", "15-150", "LL").finding() == \
        "Ferritin 3 ng/mL (low; report marker LL; critical)"


def test_the_critical_table_is_one_documented_table() -> None:
    from medmitra.clinical import critical
    for lim in critical.LIMITS:
        assert lim.source in (critical.KOST_1990, critical.ARUP_2019)
        assert lim.low is not None or lim.high is not None
        assert lim.low is None or lim.high is None or lim.low < lim.high
    # one name never means two analytes in the same unit
    seen: dict[tuple[str, str], str] = {}
    for lim in critical.LIMITS:
        for n in lim.names:
            for u in lim.units or ("",):
                key = (critical.norm_name(n), critical.norm_unit(u))
                assert seen.setdefault(key, lim.analyte) == lim.analyte, key
