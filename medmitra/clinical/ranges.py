"""The one reference-range check: a printed value against a printed range.

Everything that flags a lab value (CSV rows, text-PDF and OCR lines, the model's own list of
values) goes through ``judge``. It answers a *direction* -- ``low``, ``normal``, ``high`` or
``unknown`` -- and keeps the report's own marker (``H``, ``L``, ``#``, ``*``, ``HH`` ...)
beside it as printed.

Rules (each one table-tested in tests/test_ranges.py):

- Numbers: decimal comma ("10,2" is 10.2; "1,200" with three digits after the comma is
  1200), numbers split by OCR ("15 .1", "15. 1" are 15.1), values glued to a unit or a
  marker ("1.30ng/L", "8.8#", "6.1H").
- Ranges: "13.5-17.5", "13.5 – 17.5", "13.5 to 17.5", "(3.5-5.0)", "[150 - 400]", a unit
  before or after ("13.5-17.5 g/dL"), one-sided bounds "<5", "≤ 200", "up to 40",
  "> 40", "≥60". Two-sided ranges are inclusive at both ends. One-sided bounds are read
  literally: "<5" excludes 5 (a value of 5 is high), "≤5" includes it; ">40" excludes 40
  (a value of 40 is low), "≥40" includes it.
- A value printed with a comparator ("<0.1", ">90") is judged only when every value it
  stands for falls on the same side ("<0.1" against "<5" is normal; against "0-5" it is
  unknown because it could lie below 0).
- When value and range decide, they win over the report's marker; when they cannot
  (no range, text result), the marker's direction is used: H/HH/high/↑ -> high,
  L/LL/low/↓ -> low. Markers without a direction (``#``, ``*``, ``A``) leave the direction
  ``unknown`` but still mark the row abnormal (``marker_abnormal``).

Pure functions, no model, no I/O; inputs are short strings (longer ones are refused).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

Direction = Literal["low", "normal", "high", "unknown"]
DIRECTIONS: tuple[Direction, ...] = ("low", "normal", "high", "unknown")

MAX_VALUE_CHARS = 40
MAX_RANGE_CHARS = 80

_DASHES = "\u2010\u2011\u2012\u2013\u2014\u2212\u2015"  # hyphens, en/em dash, minus sign
_NUM = r"[-+]?\d+(?:[.,]\d+)?"
# A printed result marker: the lab's own flag, as a token or glued to the number.
MARKER_RE = r"(?:HH|LL|H|L|A|C|#|\*{1,2}|↑|↓|\(H\)|\(L\)|\[H\]|\[L\])"

# Markers and what they say. Direction None: abnormal without a direction.
_MARKERS: dict[str, tuple[Direction | None, bool]] = {
    # marker: (direction, critical)
    "h": ("high", False), "high": ("high", False), "↑": ("high", False),
    "l": ("low", False), "low": ("low", False), "↓": ("low", False),
    "hh": ("high", True), "ll": ("low", True), "critical high": ("high", True),
    "critical low": ("low", True),
    "#": (None, False), "*": (None, False), "a": (None, False), "abn": (None, False),
    "abnormal": (None, False),
    "**": (None, True), "c": (None, True), "critical": (None, True), "crit": (None, True),
    "panic": (None, True),
}
_NORMAL_MARKERS = frozenset({"n", "normal", "wnl"})

_SPLIT_DECIMAL_RE = re.compile(r"(?<![\d.,])(\d+)(?:\s+([.,])\s*|([.,])\s+)(\d+)(?![\d.,])")
_VALUE_RE = re.compile(rf"^(<=|>=|=<|=>|<|>|≤|≥)?\s*({_NUM})\s*(.*)$")
_RANGE_RE = re.compile(rf"^({_NUM})\s*(?:-|to|\.\.)\s*({_NUM})(?:\s*[^\d\s].*)?$",
                       re.IGNORECASE)
_UPPER_WORDS = r"<=|=<|<|≤|up\s*to|upto|below|less\s+than|under|max\.?"
_LOWER_WORDS = r">=|=>|>|≥|above|over|more\s+than|greater\s+than|min\.?"
_UPPER_RE = re.compile(rf"^({_UPPER_WORDS})\s*({_NUM})(?:\s*[^\d\s].*)?$", re.IGNORECASE)
_LOWER_RE = re.compile(rf"^({_LOWER_WORDS})\s*({_NUM})(?:\s*[^\d\s].*)?$", re.IGNORECASE)
# A unit written before the range ("g/dL 13.5-17.5", "% 4-6"): it starts with a letter or
# '%' and contains '/', '%' or '^' (so words such as "up to" are never taken for one).
_LEADING_UNIT_RE = re.compile(r"^(?=\S*[/%^])[A-Za-zµμ%][A-Za-z0-9µμ%/^*.]*\s+(?=[<>≤≥\d(\[-])")


@dataclass(frozen=True)
class Range:
    low: float | None
    high: float | None
    low_inclusive: bool = True
    high_inclusive: bool = True


@dataclass(frozen=True)
class Value:
    numeric: float | None            # the number printed (None for text results)
    comparator: str | None = None    # "<", "<=", ">", ">=" when printed with one
    unit: str | None = None          # a unit glued to or following the number
    marker: str | None = None        # the report's own marker glued to the number


@dataclass(frozen=True)
class Judgement:
    direction: Direction
    numeric: float | None
    lab_flag: str | None             # the report's own marker, as printed
    marker_abnormal: bool = False    # the report marks it abnormal (any marker but N)
    marker_critical: bool = False    # the report marks it critical (HH, LL, "critical")
    comparator: str | None = None    # "<", "<=", ">", ">=" when the value has one
    unit: str | None = None          # a unit glued to or following the value

    @property
    def abnormal(self) -> bool:
        return self.direction in ("low", "high") or self.marker_abnormal


def join_split_decimals(text: str) -> str:
    """OCR splits "15.1" into "15 .1" or "15. 1": join a number broken at its separator."""
    return _SPLIT_DECIMAL_RE.sub(lambda m: f"{m.group(1)}{m.group(2) or m.group(3)}{m.group(4)}",
                                 text)


def to_number(raw: str | None) -> float | None:
    """A plain number ("10.2", "10,2" decimal comma, "1,200" thousands) as float, else None."""
    if raw is None:
        return None
    s = str(raw).strip()
    if not s or len(s) > MAX_VALUE_CHARS or not re.fullmatch(_NUM, s):
        return None
    if "," in s:
        head, _, tail = s.partition(",")
        s = head + tail if len(tail) == 3 else f"{head}.{tail}"
    try:
        x = float(s)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _norm(text: str) -> str:
    s = str(text).strip()
    for d in _DASHES:
        s = s.replace(d, "-")
    return " ".join(s.split())


def _comparator(sym: str) -> str:
    s = sym.lower().replace(" ", "")
    if s in ("<=", "=<", "≤", "upto", "max", "max."):
        return "<="
    if s in ("<", "below", "lessthan", "under"):
        return "<"
    if s in (">=", "=>", "≥", "min", "min."):
        return ">="
    return ">"  # ">", "above", "over", "more than", "greater than"


def parse_value(text: str | None) -> Value:
    """The number printed in a result cell, with its comparator, glued unit and marker."""
    if text is None:
        return Value(None)
    s = join_split_decimals(_norm(text))
    if not s or len(s) > MAX_VALUE_CHARS:
        return Value(None)
    m = _VALUE_RE.match(s)
    if not m:
        return Value(None)
    numeric = to_number(m.group(2))
    if numeric is None:
        return Value(None)
    rest = m.group(3).strip()
    marker = unit = None
    if rest:
        mm = re.match(rf"^({MARKER_RE})(?:\s+|$)", rest)
        if mm:
            marker, rest = mm.group(1), rest[len(mm.group(1)):].strip()
        if rest:
            mt = re.search(rf"\s+({MARKER_RE})$", rest)
            if mt and marker is None:
                marker, rest = mt.group(1), rest[:mt.start()].strip()
            unit = rest or None
    cmp_ = _comparator(m.group(1)) if m.group(1) else None
    return Value(numeric, cmp_, unit, marker)


def parse_range(text: str | None) -> Range | None:
    """The reference range printed in ``text``, or None when it does not parse."""
    if text is None:
        return None
    s = _norm(text)
    if not s or len(s) > MAX_RANGE_CHARS:
        return None
    s = s.strip("()[]{} ")
    s = _LEADING_UNIT_RE.sub("", s, count=1).strip("()[]{} ")
    s = join_split_decimals(s)
    m = _RANGE_RE.match(s)
    if m:
        low, high = to_number(m.group(1)), to_number(m.group(2))
        if low is None or high is None or low > high:
            return None
        return Range(low, high)
    m = _UPPER_RE.match(s)
    if m:
        high = to_number(m.group(2))
        return None if high is None else Range(None, high,
                                               high_inclusive=_comparator(m.group(1)) == "<=")
    m = _LOWER_RE.match(s)
    if m:
        low = to_number(m.group(2))
        return None if low is None else Range(low, None,
                                              low_inclusive=_comparator(m.group(1)) == ">=")
    return None


def _below(x: float, rng: Range) -> bool:
    return rng.low is not None and (x < rng.low if rng.low_inclusive else x <= rng.low)


def _above(x: float, rng: Range) -> bool:
    return rng.high is not None and (x > rng.high if rng.high_inclusive else x >= rng.high)


def direction(value: Value, rng: Range | None) -> Direction:
    """Where ``value`` lies against ``rng``; ``unknown`` when that is not decided."""
    x = value.numeric
    if x is None or rng is None:
        return "unknown"
    if value.comparator is None:
        if _below(x, rng):
            return "low"
        if _above(x, rng):
            return "high"
        return "normal"
    # A censored value ("<0.1", ">90") stands for an interval: decide only if the whole
    # interval falls on one side.
    if value.comparator in ("<", "<="):
        if rng.low is not None:
            # Every possible value is below x; below the low bound if x is at/under it.
            if x < rng.low or (x == rng.low and value.comparator == "<"):
                return "low"
            return "unknown"
        assert rng.high is not None
        if x < rng.high or (x == rng.high and (value.comparator == "<" or rng.high_inclusive)):
            return "normal"
        return "unknown"
    if rng.high is not None:
        if x > rng.high or (x == rng.high and value.comparator == ">"):
            return "high"
        return "unknown"
    assert rng.low is not None
    if x > rng.low or (x == rng.low and (value.comparator == ">" or rng.low_inclusive)):
        return "normal"
    return "unknown"


def read_marker(text: str | None) -> tuple[Direction | None, bool, bool] | None:
    """(direction or None, abnormal, critical) of a report's marker; None if not one."""
    if not text:
        return None
    key = " ".join(str(text).strip().strip("()[]").lower().split())
    if key in _NORMAL_MARKERS:
        return ("normal", False, False)
    if key in _MARKERS:
        d, crit = _MARKERS[key]
        return (d, True, crit)
    return None


def judge(value: str | None, reference_range: str | None,
          lab_flag: str | None = None) -> Judgement:
    """Direction of a printed ``value`` against a printed ``reference_range``, plus the
    report's own marker (a separate ``lab_flag`` cell, or one glued to the value)."""
    v = parse_value(value)
    marker = (lab_flag or "").strip() or v.marker
    d = direction(v, parse_range(reference_range))
    read = read_marker(marker)
    abnormal = critical = False
    if read is not None:
        marker_dir, abnormal, critical = read
        if d == "unknown" and marker_dir is not None:
            d = marker_dir
    return Judgement(direction=d, numeric=v.numeric, lab_flag=marker or None,
                     marker_abnormal=abnormal, marker_critical=critical,
                     comparator=v.comparator, unit=v.unit)


def flag(value: str | None, reference_range: str | None) -> Direction:
    """Just the direction of ``value`` against ``reference_range`` (no marker)."""
    return direction(parse_value(value), parse_range(reference_range))
