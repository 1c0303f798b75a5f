"""Lab rows parsed deterministically from CSV exports and report text (PDF, OCR).

Every row is judged by the one reference-range check, ``medmitra.clinical.ranges.judge``:
its direction (``low``/``normal``/``high``/``unknown``) and the report's own marker are kept
side by side. ``critical`` comes only from the report's own marker or the documented
critical limits of ``clinical.critical``, never from a multiple of the range.

Everything here is pure and deterministic; inputs are bounded (rows, columns, line
length) so hostile files cost bounded time and memory.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal

from medmitra.clinical import critical, identity, ranges
from medmitra.clinical.ranges import Direction, parse_range, to_number
from medmitra.filetypes import detect_delimiter

MAX_ROWS = 2000
MAX_COLUMNS = 64
# Longer lines are cut before parsing; this bounds a CSV with a million columns.
MAX_LINE_CHARS = 16_384
# Longest text line considered by the free-text parser (lab lines are short).
MAX_TEXT_LINE_CHARS = 300
MAX_CELL_CHARS = 200

# The legacy per-file status of ``ai_summary.lab_values`` (pipeline spec, stage 2).
LabStatus = Literal["normal", "abnormal", "critical", "unknown"]


@dataclass
class LabRow:
    test: str
    value: str                          # as printed
    unit: str | None = None
    reference_range: str | None = None
    flag: Direction = "unknown"         # direction from ranges.judge
    lab_flag: str | None = None         # the report's own marker, as printed
    numeric: float | None = None
    critical: bool = False              # only from documented limits or the lab's marker
    page: int | None = None             # 1-based page of a PDF/OCR report
    marker_abnormal: bool = False       # the report marks it abnormal without a direction
    critical_limit: str | None = None   # the table's limit that made it critical ("> 6.2")

    @property
    def abnormal(self) -> bool:
        return self.flag in ("low", "high") or self.critical or self.marker_abnormal

    def to_dict(self, file_id: str | None = None) -> dict:
        """The row as stored (``insights.labs`` and the lab file's ``labs``)."""
        return {"analyte": self.test, "value": self.value, "numeric": self.numeric,
                "unit": self.unit, "range": self.reference_range, "flag": self.flag,
                "lab_flag": self.lab_flag, "critical": self.critical, "file_id": file_id,
                "page": self.page}

    def finding(self) -> str:
        """The row as a key finding, e.g. "Hb 9.1 g/dL (low; report marker L)"."""
        marks = [self.flag if self.flag in ("low", "high") else "abnormal"]
        if self.lab_flag:
            marks.append(f"report marker {self.lab_flag}")
        if self.critical:
            marks.append(f"critical, beyond the limit {self.critical_limit}"
                         if self.critical_limit else "critical")
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.test} {self.value}{unit} ({'; '.join(marks)})"

    @property
    def status(self) -> LabStatus:
        """normal | abnormal | critical | unknown, as ``ai_summary.lab_values`` shows it."""
        if self.critical:
            return "critical"
        if self.abnormal:
            return "abnormal"
        return "normal" if self.flag == "normal" else "unknown"


def make_row(test: str, value: str, unit: str | None = None,
             reference_range: str | None = None, lab_flag: str | None = None,
             page: int | None = None) -> LabRow:
    """A LabRow judged by the one reference-range check and the one critical-limits table
    (every parser makes its rows here).

    ``critical``: the report's own critical marker, or a value beyond a documented critical
    limit (``clinical.critical``) -- unless the report's range says the value is normal or
    on the other side. A value beyond a critical limit is outside any reference range, so
    when the report prints no range its direction is the limit's side."""
    j = ranges.judge(value, reference_range, lab_flag)
    direction = j.direction
    beyond = critical.critical_side(test, unit or j.unit, j.numeric, j.comparator)
    limit_text = None
    if beyond is not None and direction in ("unknown", beyond[0]):
        side, lim = beyond
        direction = side
        limit_text = f"< {lim.low:g}" if side == "low" else f"> {lim.high:g}"
    return LabRow(test=test, value=value, unit=unit, reference_range=reference_range,
                  flag=direction, lab_flag=j.lab_flag, numeric=j.numeric,
                  critical=j.marker_critical or limit_text is not None, page=page,
                  marker_abnormal=j.marker_abnormal, critical_limit=limit_text)


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
                    and to_number(row[0]) is None and not identity.is_identity_label(row[0]):
                unit = row[2] if len(row) > 2 and row[2] else None
                rng = row[3] if len(row) > 3 and row[3] else None
                if unit and parse_range(unit) and not rng:
                    unit, rng = None, unit
                out.append(make_row(row[0], row[1], unit, rng))
        return out[:MAX_ROWS]
    assert cols is not None
    for row in rows[header_at + 1:]:
        test, value = _cell(row, cols["test"]), _cell(row, cols["value"])
        if not test or value is None or identity.is_identity_label(test):
            continue
        unit = _cell(row, cols.get("unit"))
        rng = _cell(row, cols.get("range"))
        lab_flag = _cell(row, cols.get("flag"))
        out.append(make_row(test, value, unit, rng, lab_flag))
    return out[:MAX_ROWS]


def unparsed_table_rows(table: list[list[str]], rows: list[LabRow]) -> int:
    """Table rows holding a number that did not become lab rows (title, header and
    identity rows aside)."""
    numeric = sum(1 for row in table
                  if row and not identity.is_identity_label(row[0])
                  and any(to_number(c) is not None for c in row[1:]))
    return max(0, numeric - len(rows))


def parse_csv(text: str) -> list[LabRow]:
    """Lab rows of a CSV export (delimiter sniffed; header columns matched by synonym)."""
    return rows_from_table(read_table(text))


# ---------------------------------------------------------------------- free text

_NUM = r"[-+]?\d+(?:[.,]\d+)?"
_FLAG_TOKENS = frozenset({"h", "l", "hh", "ll", "high", "low", "*", "**", "(h)", "(l)",
                          "[h]", "[l]", "a", "abnormal", "critical", "c", "#", "↑", "↓"})
_UNIT_WORDS = frozenset({"fl", "pg", "g", "mg", "ug", "µg", "ng", "u", "iu", "mmol", "ratio",
                         "sec", "s", "sec.", "mm", "cells", "million", "lakhs", "thou", "mu"})
_NUM_TOKEN_RE = re.compile(rf"^[<>]?{_NUM}$")
_TEST_RE = re.compile(r"[A-Za-z]")
_RANGE_START_RE = re.compile(rf"^[(\[]?(?:[<>≤≥]|{_NUM}|up|upto|below|above|less|more)",
                             re.IGNORECASE)
# A number with a marker or a unit glued to it ("8.8#", "6.1H", "1.30ng/L"); "10^3/uL"
# (a unit that starts with digits) is not split because '^' is not a letter.
# A unit may also start with "/" before a letter ("10831/uL"), never before a digit
# ("120/80" stays one value).
_GLUED_RE = re.compile(
    rf"^([<>]?{_NUM})(#|\*{{1,2}}|HH|LL|H|L|↑|↓|(?:[A-Za-zµμ%]|/[A-Za-zµμ])[A-Za-z0-9µμ%/^.]*)$")


def _looks_like_unit(tok: str) -> bool:
    t = tok.lower()
    # "[" and "{" cover UCUM spellings a lab system exports ("mm[Hg]", "[IU]/L", "{INR}").
    if t in _UNIT_WORDS or "/" in t or "%" in t or "^" in t or "[" in t or t.startswith("{") \
            or t.startswith(("x10", "10e", "10*")):
        return True
    return False


def _tokens(line: str) -> list[str]:
    """Whitespace tokens of a report line, OCR damage repaired: split decimals joined
    ("15 .1"), glued markers and units split off their number ("8.8#", "1.30ng/L")."""
    out: list[str] = []
    for tok in ranges.join_split_decimals(line.replace("\t", " ")).split():
        m = _GLUED_RE.match(tok)
        out.extend((m.group(1), m.group(2)) if m else (tok,))
    return out


def _parse_line(line: str, page: int | None = None) -> LabRow | None:
    if identity.is_identity_line(line):
        return None  # "Patient: <name> Age/Sex 45/M" is never a lab row
    tokens = _tokens(line)
    # The value is the first numeric token after a name that contains letters.
    for i, tok in enumerate(tokens):
        if _NUM_TOKEN_RE.match(tok) and i > 0:
            break
    else:
        return None
    name = " ".join(tokens[:i]).strip(" :=-.")
    # One letter only as an element symbol with a real unit after it ("K 4.5 mmol/L").
    short_ok = len(name) == 1 and name.isupper() and len(tokens) > i + 1 \
        and _looks_like_unit(tokens[i + 1])
    if (len(name) < 2 and not short_ok) or not _TEST_RE.search(name) or len(name) > 60:
        return None
    value = tokens[i]
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
    return make_row(name[:MAX_CELL_CHARS], value, unit, rng_text, lab_flag, page)


def parse_text_lines(text: str, page: int | None = None) -> list[LabRow]:
    """Best-effort lab rows from report text lines such as
    "Hemoglobin 10.2 g/dL 13.5-17.5" or "WBC: 7.2 10^3/uL (4.0 - 11.0)"."""
    out: list[LabRow] = []
    for line in _iter_lines(text):
        row = _parse_line(line, page)
        if row is not None:
            out.append(row)
            if len(out) >= MAX_ROWS:
                break
    return out


_RANGE_LIKE_RE = re.compile(rf"{_NUM}\s*[-–]\s*{_NUM}|[<>≤≥]\s*{_NUM}")


def unparsed_result_lines(text: str) -> int:
    """Lines that look like a result (a name, a number, and a range or a unit) but did not
    become a row: what the parser missed, counted so a reader can see it."""
    n = 0
    for line in _iter_lines(text):
        if identity.is_identity_line(line) or _parse_line(line) is not None:
            continue
        tokens = _tokens(line)
        num_at = next((i for i, t in enumerate(tokens) if _NUM_TOKEN_RE.match(t)), None)
        if num_at is None or num_at == 0 or not _TEST_RE.search(" ".join(tokens[:num_at])):
            continue
        after = tokens[num_at + 1:]
        if _RANGE_LIKE_RE.search(" ".join(after)) or any(_looks_like_unit(t) for t in after):
            n += 1
    return n


def parse_pages(pages: list[str]) -> list[LabRow]:
    """Lab rows of a paged report, each with its 1-based page number."""
    out: list[LabRow] = []
    for n, text in enumerate(pages, 1):
        out.extend(parse_text_lines(text, page=n)[:MAX_ROWS - len(out)])
        if len(out) >= MAX_ROWS:
            break
    return out


def _iter_lines(text: str) -> Iterable[str]:
    for raw in text.splitlines():
        line = raw.strip()
        if line and len(line) <= MAX_TEXT_LINE_CHARS:
            yield line


def render_row(r: LabRow) -> str:
    """One row as text, e.g. "Hemoglobin: 9.1 g/dL (reference 13.5-17.5) [low]"; the
    same words in the stored extracted text and in the model's facts."""
    line = f"{r.test}: {r.value}"
    if r.unit:
        line += f" {r.unit}"
    if r.reference_range:
        line += f" (reference {r.reference_range})"
    marks = [r.flag if r.flag != "unknown" else ("abnormal" if r.abnormal else "unknown")]
    if r.lab_flag:
        marks.append(f"report marker {r.lab_flag}")
    if r.critical:
        marks.append("critical")
    return f"{line} [{'; '.join(marks)}]"
