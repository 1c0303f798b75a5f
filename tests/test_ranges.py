"""The one reference-range check (medmitra.clinical.ranges), table-tested.

The rows quoted from issue 14 / issue 9 are inputs on which the two former checks
(stages.lab_status, labs.flag) disagreed.
"""

from __future__ import annotations

import pytest

from medmitra.clinical import ranges
from medmitra.clinical.ranges import Range


@pytest.mark.parametrize("text, expected", [
    ("13.5-17.5", Range(13.5, 17.5)),
    ("13.5 - 17.5", Range(13.5, 17.5)),
    ("13.5 – 17.5", Range(13.5, 17.5)),          # en dash
    ("13.5 to 17.5", Range(13.5, 17.5)),
    ("(4.0-11.0)", Range(4.0, 11.0)),
    ("(3.5-5.0)", Range(3.5, 5.0)),
    ("[150 - 400]", Range(150.0, 400.0)),
    ("13.5-17.5 g/dL", Range(13.5, 17.5)),
    ("g/dL 13.5-17.5", Range(13.5, 17.5)),       # unit printed before the range
    ("9,0-11,0", Range(9.0, 11.0)),              # decimal commas
    ("13 .5-17.5", Range(13.5, 17.5)),           # OCR-split number
    ("-2 - 2", Range(-2.0, 2.0)),
    ("1,200-3,400", Range(1200.0, 3400.0)),
    ("<5", Range(None, 5.0, high_inclusive=False)),
    ("< 5.7", Range(None, 5.7, high_inclusive=False)),
    ("<= 200", Range(None, 200.0)),
    ("≤ 200", Range(None, 200.0)),
    ("up to 5", Range(None, 5.0)),
    ("Upto 40 U/L", Range(None, 40.0)),
    ("less than 150", Range(None, 150.0, high_inclusive=False)),
    ("> 40", Range(40.0, None, low_inclusive=False)),
    ("≥60", Range(60.0, None)),
    (">= 60 mL/min", Range(60.0, None)),
    ("above 90", Range(90.0, None, low_inclusive=False)),
    ("Non-reactive", None), ("Negative", None), ("", None), (None, None),
    ("17.5-13.5", None), ("see comment", None), ("5", None), ("x" * 500, None),
])
def test_parse_range(text, expected) -> None:
    assert ranges.parse_range(text) == expected


@pytest.mark.parametrize("value, rng, direction", [
    # issue 14 / 9: the inputs the two former checks disagreed on
    ("10,2", "9-11", "normal"),                  # decimal comma (was read as 102)
    ("10,2", "9–11", "normal"),
    ("5", "<5", "high"),                         # strict bound excludes 5
    ("4.9", "<5", "normal"),
    ("5", "≤5", "normal"),
    ("5", "<=5", "normal"),
    ("40", ">40", "low"),                        # strict bound excludes 40
    ("41", ">40", "normal"),
    ("40", "≥40", "normal"),
    ("39", "≥ 40", "low"),
    ("15", "13.5-17.5 g/dL", "normal"),          # range with a unit
    ("12", "13.5-17.5 g/dL", "low"),
    ("3.5", "(3.5-5.0)", "normal"),              # bracketed, inclusive bound
    ("3.4", "(3.5-5.0)", "low"),
    ("5.1", "[3.5-5.0]", "high"),
    ("15 .1", "13.5-17.5", "normal"),            # OCR-split number
    ("9. 1", "13.5-17.5", "low"),
    ("1.30ng/L", "0.00-0.50", "high"),           # value glued to its unit
    ("8.8#", "12.0-15.0", "low"),                # the lab's '#' marker glued on
    ("6.1H", "3.5-5.1", "high"),
    # the usual cases
    ("13.5", "13.5-17.5", "normal"),
    ("17.5", "13.5-17.5", "normal"),
    ("17.6", "13.5-17.5", "high"),
    ("240", "70-100", "high"),
    ("-3", "-2 - 2", "low"),
    ("1,200", "150-450", "high"),                # thousands separator
    ("61", ">60", "normal"),
    # censored values: decided only when every value they stand for is on one side
    ("<0.1", "<5", "normal"),
    ("<0.1", "0-5", "unknown"),
    ("<2", "3-5", "low"),
    (">90", ">60", "normal"),
    (">200", "70-100", "high"),
    (">50", "70-100", "unknown"),
    # not decidable
    ("Positive", "Negative", "unknown"),
    ("9.1", None, "unknown"), ("9.1", "", "unknown"), ("", "13.5-17.5", "unknown"),
    ("abc", "13.5-17.5", "unknown"), ("3", "see note", "unknown"),
])
def test_direction_table(value, rng, direction) -> None:
    assert ranges.judge(value, rng).direction == direction
    assert ranges.flag(value, rng) == direction


@pytest.mark.parametrize("value, rng, lab_flag, direction, kept, abnormal, critical", [
    # computed direction wins, the report's marker is kept as printed
    ("9.1", "13.5-17.5", "L", "low", "L", True, False),
    ("9.0", "0.4-4.0", "N", "high", "N", True, False),
    ("8.8#", "12-15", None, "low", "#", True, False),
    # no range: the marker's direction is used
    ("9.1", None, "L", "low", "L", True, False),
    ("Growth", "see note", "H", "high", "H", True, False),
    ("1", None, "HH", "high", "HH", True, True),
    ("1", None, "LL", "low", "LL", True, True),
    ("1", None, "(H)", "high", "(H)", True, False),
    ("1", None, "↑", "high", "↑", True, False),
    # markers without a direction: abnormal, direction unknown
    ("8.8", None, "#", "unknown", "#", True, False),
    ("8.8", None, "*", "unknown", "*", True, False),
    ("8.8*", None, None, "unknown", "*", True, False),
    ("Reactive", None, "A", "unknown", "A", True, False),
    ("1", None, "N", "normal", "N", False, False),      # the lab says normal
    ("1", None, "zz", "unknown", "zz", False, False),
    ("1", None, None, "unknown", None, False, False),
])
def test_lab_markers(value, rng, lab_flag, direction, kept, abnormal, critical) -> None:
    j = ranges.judge(value, rng, lab_flag)
    assert (j.direction, j.lab_flag, j.abnormal, j.marker_critical) == \
        (direction, kept, abnormal, critical)


@pytest.mark.parametrize("text, numeric, comparator, unit, marker", [
    ("10,2", 10.2, None, None, None),
    ("1,200", 1200.0, None, None, None),
    ("15 .1", 15.1, None, None, None),
    ("1.30ng/L", 1.3, None, "ng/L", None),
    ("1.30 ng/L", 1.3, None, "ng/L", None),
    ("8.8#", 8.8, None, None, "#"),
    ("240 H mg/dL", 240.0, None, "mg/dL", "H"),
    ("12 mg/dL H", 12.0, None, "mg/dL", "H"),
    ("<0.1", 0.1, "<", None, None),
    ("≥ 90", 90.0, ">=", None, None),
    ("Negative", None, None, None, None),
    ("1" * 100, None, None, None, None),
])
def test_parse_value(text, numeric, comparator, unit, marker) -> None:
    v = ranges.parse_value(text)
    assert (v.numeric, v.comparator, v.unit, v.marker) == (numeric, comparator, unit, marker)


def test_no_critical_from_a_multiple_of_the_range() -> None:
    # An INR of 2.7 against 0.8-1.2 (a patient on warfarin) is high, not critical.
    j = ranges.judge("2.7", "0.8-1.2")
    assert j.direction == "high" and not j.marker_critical
