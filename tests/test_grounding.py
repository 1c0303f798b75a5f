"""Grounding of lab direction claims (clinical/grounding.py): each direction word is a
claim about the lab named nearest to it in its clause; condition words imply directions;
a direction claimed for a row of unknown direction cannot be verified."""

from __future__ import annotations

import pytest

from medmitra.clinical.grounding import CONDITION_DIRECTIONS, Grounder
from medmitra.clinical.labs import make_row

ROWS = [make_row("AST", "80", "U/L", "5-40"),                  # high
        make_row("Na", "140", "mmol/L", "135-145"),            # normal
        make_row("Haemoglobin", "15.6", "g/dL"),               # no range: unknown
        make_row("S. Creatinine", "0.9", "mg/dL", "0.6-1.2"),  # normal
        make_row("Platelets", "90", "10^9/L", "150-400"),      # low
        make_row("Potassium", "4.1", "mmol/L", "3.5-5.1")]     # normal
NORMAL_HB = [make_row("Hb", "13.1", "g/dL", "12-16")]


@pytest.fixture
def g() -> Grounder:
    return Grounder(ROWS, ["Cough for three days."])


@pytest.mark.parametrize("sentence, kept", [
    # each direction word goes with the nearest lab of its clause
    ("AST is high and Na is normal.", True),
    ("Na is normal and AST is high.", True),
    ("Elevated AST, low platelets.", True),
    ("Na is low and AST is high.", False),
    ("Na is normal and AST is low.", False),
    ("AST is normal, platelets are low.", False),
    # a clause with no subject of its own speaks of the lab before it
    ("AST 80 U/L, which is raised.", True),
    ("AST 80 U/L, which is normal.", False),
    # ... but a clause with its own subject does not
    ("Platelets are low; the other results are within range.", True),
    # names: the row's own, without qualifiers, or a synonym of the critical table
    ("High creatinine.", False),
    ("Creatinine is normal.", True),
    ("Sodium is low.", False),
    ("K is within range.", True),
    # a direction for a row of unknown direction cannot be verified: dropped
    ("Hemoglobin 15.6 g/dL, which is low.", False),
    ("Haemoglobin is normal.", False),
    # condition words imply a direction of their lab
    ("Thrombocytopenia.", True),
    ("Thrombocytosis is likely.", False),
    ("Hyperkalaemia needs urgent treatment.", False),
    ("Hyponatremia is present.", False),
    # a condition word whose lab the case does not have is not checked
    ("Hyperglycaemia is suspected.", True),
    # hyper-/hypo- words that are no lab condition say nothing of a lab
    ("Hypertension with a normal sodium.", True),
    ("Cough for three days.", True),
])
def test_direction_claims(g, sentence, kept):
    checked, failed = g.problems(sentence)
    assert (not failed) is kept, failed
    if not kept:
        assert checked >= 1


@pytest.mark.parametrize("item, kept", [
    ("low Hb", False), ("Anaemia", False), ("anemic picture", False),
    ("Hb normal", True), ("Polycythaemia", False),
])
def test_bare_items_and_conditions_against_a_normal_haemoglobin(item, kept):
    g = Grounder(NORMAL_HB, [])
    assert g.items("case_summary", [item]) == ([item] if kept else [])


def test_the_condition_table_names_only_analytes_of_the_critical_table():
    from medmitra.clinical import critical
    assert {a for _, _, a in CONDITION_DIRECTIONS} <= {lim.analyte for lim in critical.LIMITS}
    assert {d for _, d, _ in CONDITION_DIRECTIONS} <= {"low", "high"}
