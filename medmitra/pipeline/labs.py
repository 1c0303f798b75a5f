"""Lab values: reference ranges, deterministic flags, and rows parsed from CSV or text.

Flag rule (``flag``), with bounds inclusive:
  - "normal"   low <= value <= high (a one-sided range checks its one bound);
  - "critical" value > 2 x high (high > 0) or value < 0.5 x low (low > 0);
  - "abnormal" any other value outside the range;
  - "unknown"  the value or the range does not parse (qualitative results such as
    "Negative", values written "<0.1", free-text ranges).
The critical margin is deliberately coarse: it marks values far outside the range for the
reader's attention; it is not a substitute for a laboratory's own critical limits.

Everything here is pure and deterministic; inputs are bounded (rows, columns, line
length) so hostile files cost bounded time and memory.
"""

from __future__ import annotations

import csv
import io
import re
from typing import Iterable, Iterator

from medmitra.filetypes import detect_delimiter
from medmitra.pipeline.types import LabRow, LabStatus

MAX_ROWS = 2000
MAX_COLUMNS = 64
# Longer lines are cut before parsing; this bounds a CSV with a million columns.
MAX_LINE_CHARS = 16_384
# Longest text line considered by the free-text parser (lab lines are short).
MAX_TEXT_LINE_CHARS = 300
MAX_CELL_CHARS = 200
CRITICAL_HIGH_FACTOR = 2.0
CRITICAL_LOW_FACTOR = 0.5

_NUM = r"[-+]?\d+(?:[.,]\d+)?"
_DASHES = "\u2010\u2011\u2012\u2013\u2014\u2212"  # hyphen, en/em dash, minus sign
_RANGE_RE = re.compile(rf"^\s*({_NUM})\s*(?:-|to|\.\.)\s*({_NUM})(?:\s*[^\d\s].*)?\s*$",
                       re.IGNORECASE)
_UPPER_RE = re.compile(rf"^\s*(?:<=?|≤|=<|up\s*to|upto|below|less\s+than|under|max\.?)\s*({_NUM})"
                       r"(?:\s*[^\d\s].*)?\s*$", re.IGNORECASE)
_LOWER_RE = re.compile(rf"^\s*(?:>=?|≥|=>|above|over|more\s+than|greater\s+than|min\.?)\s*"
                       rf"({_NUM})(?:\s*[^\d\s].*)?\s*$", re.IGNORECASE)
_VALUE_RE = re.compile(rf"^\s*({_NUM})\s*$")


def to_number(text: str | None) -> float | None:
    """A plain number ("10.2", "1,200", "10,2") as float; anything else None."""
    if text is None:
        return None
    s = str(text)
    m = _VALUE_RE.match(s) if len(s) < 40 else None
    if not m:
        return None
    raw = m.group(1)
    if "," in raw:
        head, _, tail = raw.partition(",")
        # "1,200" is thousands; "10,2" is a decimal comma.
        raw = head + tail if len(tail) == 3 else head + "." + tail
    try:
        return float(raw)
    except ValueError:
        return None


def parse_range(text: str | None) -> tuple[float | None, float | None] | None:
    """(low, high) of a reference range; one side may be None; None if unparseable.

    Handles "13.5-17.5", "13.5 - 17.5", "13.5 to 17.5", "(13.5-17.5)", "<5", "> 40",
    "≤ 200", "up to 5"; a trailing unit ("13.5-17.5 g/dL") is ignored.
    """
    if text is None:
        return None
    s = str(text).strip()
    if not s or len(s) > 80:
        return None
    for d in _DASHES:
        s = s.replace(d, "-")
    s = s.strip("()[]{} ")
    m = _RANGE_RE.match(s)
    if m:
        low, high = to_number(m.group(1)), to_number(m.group(2))
        if low is None or high is None or low > high:
            return None
        return low, high
    m = _UPPER_RE.match(s)
    if m:
        high = to_number(m.group(1))
        return None if high is None else (None, high)
    m = _LOWER_RE.match(s)
    if m:
        low = to_number(m.group(1))
        return None if low is None else (low, None)
    return None


def flag(value: str | None, reference_range: str | None) -> LabStatus:
    """Deterministic status of ``value`` against ``reference_range`` (rule in module doc)."""
    v = to_number(value)
    rng = parse_range(reference_range)
    if v is None or rng is None:
        return "unknown"
    low, high = rng
    if high is not None and v > high:
        return "critical" if high > 0 and v > CRITICAL_HIGH_FACTOR * high else "abnormal"
    if low is not None and v < low:
        return "critical" if low > 0 and v < CRITICAL_LOW_FACTOR * low else "abnormal"
    return "normal"


# A lab's own flag column, used only when value/range cannot be judged.
_LAB_FLAGS: dict[str, LabStatus] = {
    "h": "abnormal", "l": "abnormal", "high": "abnormal", "low": "abnormal",
    "a": "abnormal", "abnormal": "abnormal", "*": "abnormal", "abn": "abnormal",
    "hh": "critical", "ll": "critical", "c": "critical", "critical": "critical",
    "crit": "critical", "panic": "critical", "**": "critical",
    "n": "normal", "normal": "normal", "wnl": "normal",
}


def status_for(value: str, reference_range: str | None, lab_flag: str | None = None) -> LabStatus:
    """``flag`` when value and range parse; otherwise the lab's own flag if it has one."""
    status = flag(value, reference_range)
    if status == "unknown" and lab_flag:
        return _LAB_FLAGS.get(lab_flag.strip().strip("()[]").lower(), "unknown")
    return status


# ---------------------------------------------------------------------------- CSV

_HEADER_SYNONYMS: dict[str, tuple[str, ...]] = {
    "test": ("test", "test name", "name", "analyte", "parameter", "investigation",
             "component", "item", "description", "lab test", "test description"),
    "value": ("value", "result", "results", "observed value", "reading", "observation",
              "result value", "your value", "measured value"),
    "unit": ("unit", "units", "uom", "unit of measure"),
    "range": ("reference range", "ref range", "ref", "normal range", "range", "reference",
              "reference interval", "biological reference interval", "ref. range",
              "normal values", "reference value", "reference values", "normal"),
    "flag": ("flag", "status", "abnormal flag", "h/l", "indicator", "interpretation"),
}
_HEADER_LOOKUP = {syn: key for key, syns in _HEADER_SYNONYMS.items() for syn in syns}
_HEADER_SCAN_ROWS = 10


def _norm_header(cell: str) -> str:
    s = re.sub(r"[^a-z/ .]", " ", cell.lower())
    return " ".join(s.split()).strip(" .")


def _header_map(row: list[str]) -> dict[str, int] | None:
    found: dict[str, int] = {}
    for i, cell in enumerate(row):
        key = _HEADER_LOOKUP.get(_norm_header(cell))
        if key and key not in found:
            found[key] = i
    return found if "test" in found and "value" in found else None


def _bounded_lines(text: str) -> Iterator[str]:
    """Lines of ``text`` (with endings), each cut to MAX_LINE_CHARS, a bounded number."""
    for n, line in enumerate(io.StringIO(text, newline="")):
        if n >= MAX_ROWS + _HEADER_SCAN_ROWS + 10:
            return
        yield line if len(line) <= MAX_LINE_CHARS else line[:MAX_LINE_CHARS] + "\n"


def read_table(text: str) -> list[list[str]]:
    """Rows of a delimited text, bounded in rows, columns and cell size; never raises."""
    delim = detect_delimiter(text[:8192]) or ","
    rows: list[list[str]] = []
    reader = csv.reader(_bounded_lines(text), delimiter=delim)
    try:
        for row in reader:
            if len(rows) >= MAX_ROWS + _HEADER_SCAN_ROWS:  # room for title/header lines
                break
            cells = [c.replace("\x00", "").strip()[:MAX_CELL_CHARS] for c in row[:MAX_COLUMNS]]
            if any(cells):
                rows.append(cells)
    except csv.Error:
        pass  # keep the rows read so far (e.g. an oversized field later on)
    return rows


def _cell(row: list[str], idx: int | None) -> str | None:
    if idx is None or idx >= len(row):
        return None
    return row[idx] or None


def rows_from_table(rows: list[list[str]]) -> list[LabRow]:
    """LabRows from a table with a recognisable header; else from (test, value, ...) rows."""
    header_at, cols = None, None
    for i, row in enumerate(rows[:_HEADER_SCAN_ROWS]):
        cols = _header_map(row)
        if cols:
            header_at = i
            break
    out: list[LabRow] = []
    if header_at is None:
        # No header: accept rows shaped test, value[, unit][, range] with a numeric value.
        for row in rows:
            if len(row) >= 2 and row[0] and to_number(row[1]) is not None \
                    and to_number(row[0]) is None:
                unit = row[2] if len(row) > 2 and row[2] else None
                rng = row[3] if len(row) > 3 and row[3] else None
                if unit and parse_range(unit) and not rng:
                    unit, rng = None, unit
                out.append(LabRow(row[0], row[1], unit, rng, status_for(row[1], rng)))
        return out[:MAX_ROWS]
    assert cols is not None
    for row in rows[header_at + 1:]:
        test, value = _cell(row, cols["test"]), _cell(row, cols["value"])
        if not test or value is None:
            continue
        unit = _cell(row, cols.get("unit"))
        rng = _cell(row, cols.get("range"))
        lab_flag = _cell(row, cols.get("flag"))
        out.append(LabRow(test, value, unit, rng, status_for(value, rng, lab_flag)))
    return out[:MAX_ROWS]


def parse_csv(text: str) -> list[LabRow]:
    """Lab rows of a CSV export (delimiter sniffed; header columns matched by synonym)."""
    return rows_from_table(read_table(text))


# ---------------------------------------------------------------------- free text

_FLAG_TOKENS = frozenset({"h", "l", "hh", "ll", "high", "low", "*", "**", "(h)", "(l)",
                          "[h]", "[l]", "a", "abnormal", "critical", "c"})
_UNIT_WORDS = frozenset({"fl", "pg", "g", "mg", "ug", "µg", "ng", "u", "iu", "mmol", "ratio",
                         "sec", "s", "sec.", "mm", "cells", "million", "lakhs", "thou", "mu"})
_NUM_TOKEN_RE = re.compile(rf"^[<>]?{_NUM}$")
_TEST_RE = re.compile(r"[A-Za-z]")
_RANGE_START_RE = re.compile(rf"^[(\[]?(?:[<>≤≥]|{_NUM}|up|upto|below|above|less|more)",
                             re.IGNORECASE)


def _looks_like_unit(tok: str) -> bool:
    t = tok.lower()
    if t in _UNIT_WORDS or "/" in t or "%" in t or "^" in t or t.startswith(("x10", "10e", "10*")):
        return True
    return False


def _parse_line(line: str) -> LabRow | None:
    tokens = line.replace("\t", " ").split()
    # The value is the first numeric token after a name that contains letters.
    for i, tok in enumerate(tokens):
        if _NUM_TOKEN_RE.match(tok) and i > 0:
            break
    else:
        return None
    name = " ".join(tokens[:i]).strip(" :=-.")
    if len(name) < 2 or not _TEST_RE.search(name) or len(name) > 60:
        return None
    value = tokens[i].lstrip("<>")
    rest = tokens[i + 1:]
    lab_flag = None
    if rest and rest[0].lower() in _FLAG_TOKENS:
        lab_flag = rest.pop(0)
    unit = None
    # "10^3/uL" starts with digits but is a unit; "13.5-17.5" starts a range.
    if rest and (_looks_like_unit(rest[0]) or not _RANGE_START_RE.match(rest[0])):
        unit = rest.pop(0)
    if rest and lab_flag is None and rest[-1].lower() in _FLAG_TOKENS:
        lab_flag = rest.pop()
    rng_text = " ".join(rest).strip() or None
    rng = parse_range(rng_text) if rng_text else None
    if rng is None:
        # Without a parseable range, accept the line only with a real-looking unit.
        if unit is None or not _looks_like_unit(unit):
            return None
        rng_text = None
    elif unit is not None and not _looks_like_unit(unit) and not _TEST_RE.search(unit):
        return None
    if not tokens[i].startswith(("<", ">")):
        status = status_for(value, rng_text, lab_flag)
    else:
        status = "unknown"
        value = tokens[i]
    return LabRow(name[:MAX_CELL_CHARS], value, unit, rng_text, status)


def parse_text_lines(text: str) -> list[LabRow]:
    """Best-effort lab rows from report text lines such as
    "Hemoglobin 10.2 g/dL 13.5-17.5" or "WBC: 7.2 10^3/uL (4.0 - 11.0)"."""
    out: list[LabRow] = []
    for line in _iter_lines(text):
        row = _parse_line(line)
        if row is not None:
            out.append(row)
            if len(out) >= MAX_ROWS:
                break
    return out


def _iter_lines(text: str) -> Iterable[str]:
    for raw in text.splitlines():
        line = raw.strip()
        if line and len(line) <= MAX_TEXT_LINE_CHARS:
            yield line
