"""Critical (panic) limits: the one table that makes a lab row ``critical``.

A row is critical when the report marks it so (``HH``, ``LL``, "critical" -- see
``clinical.ranges``) or when its value lies beyond a documented critical limit below.
Never from a multiple of the reference range: an INR of 2.7 in a patient on warfarin is
not critical.

Sources (public, cited per row as ``source``):

- ``KOST_1990``: Kost GJ. Critical limits for urgent clinician notification at US medical
  centers. JAMA 1990;263(5):704-707 -- the mean low and high limits of 92 US medical
  centres' lists (chemistry). SI values as printed with the paper's table; the calcium
  limits in mmol/L are the mg/dL limits divided by 4.008 (the molar mass of calcium).
- ``ARUP_2019``: ARUP Laboratories (University of Utah), "Critical Values List",
  document CORP-APPEND-0104A, Rev. 34, April 2019 (blood gases, ionised calcium,
  haematology, coagulation, troponin I, bilirubin).

Limits are exclusive, as printed ("< 2.8", "> 6.2"): a value equal to a limit is not
critical. Matching is strict, because a false "critical" is as harmful as a missed one:

- the analyte by name or synonym (the whole name, qualifiers such as "serum" aside:
  "Haemoglobin A1c" and "Mean corpuscular haemoglobin" are not haemoglobin);
- the unit must be one the table lists for that analyte (spelling variants only: mEq/L is
  mmol/L for monovalent ions, 10^3/uL is 10^9/L). An unknown or missing unit is never
  critical from the table (INR and pH are unitless and need no unit);
- a value printed with a comparator ("<1.5", ">600") is critical only when every value it
  stands for is beyond the limit;
- when the report's own range says the value is normal, or on the other side, the table
  does not override it (a mismatch of analyte or unit is more likely than a panic value
  the lab itself calls normal).

Pure, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

KOST_1990 = ("Kost GJ. Critical limits for urgent clinician notification at US medical "
             "centers. JAMA 1990;263(5):704-707")
ARUP_2019 = ("ARUP Laboratories, Critical Values List, CORP-APPEND-0104A Rev. 34, "
             "April 2019")


@dataclass(frozen=True)
class Limit:
    analyte: str                 # canonical name, as shown in the documentation
    names: tuple[str, ...]       # normalised names and synonyms (see ``norm_name``)
    units: tuple[str, ...]       # normalised units (see ``norm_unit``); () = unitless
    low: float | None            # critical below this value
    high: float | None           # critical above this value
    source: str

    @property
    def unit_label(self) -> str:
        return self.units[0] if self.units else "(no unit)"


_K = ("potassium", "k", "k+", "serum k")
_NA = ("sodium", "na", "na+")
_GLU = ("glucose", "blood glucose", "plasma glucose", "glucose random", "random glucose",
        "glucose fasting", "fasting glucose", "fasting blood glucose", "random blood glucose",
        "glu", "blood sugar", "fbs", "rbs", "glucose level")
_CA = ("calcium", "total calcium", "calcium total", "ca", "calcium corrected",
       "corrected calcium", "adjusted calcium")
_ICA = ("ionized calcium", "ionised calcium", "calcium ionized", "calcium ionised",
        "free calcium", "ica", "ca++", "ca2+")
_HCO3 = ("bicarbonate", "hco3", "hco3-", "total co2", "co2", "tco2", "co2 total",
         "carbon dioxide", "co2 content")
_HB = ("haemoglobin", "hemoglobin", "hb", "hgb", "haemoglobin hb", "hemoglobin hb",
       "hemoglobin hgb", "total haemoglobin", "total hemoglobin")
_HCT = ("haematocrit", "hematocrit", "hct", "pcv", "packed cell volume")
_PLT = ("platelets", "platelet count", "platelet", "plt", "plt count", "thrombocytes",
        "platelet count plt")
_WBC = ("wbc", "white blood cells", "white blood cell count", "white cell count",
        "wbc count", "leukocytes", "leucocytes", "total leukocyte count",
        "total leucocyte count", "tlc", "white blood count", "leukocyte count",
        "leucocyte count", "total wbc count")
_INR = ("inr", "pt inr", "inr pt", "prothrombin time inr", "international normalized ratio",
        "international normalised ratio", "inr prothrombin time")
_APTT = ("aptt", "ptt", "activated partial thromboplastin time",
         "partial thromboplastin time", "appt")
_FIB = ("fibrinogen", "fibrinogen clauss")
_TNI = ("troponin i", "troponin i cardiac", "ctni", "tni", "cardiac troponin i")
_PH = ("ph", "arterial ph", "ph arterial", "blood ph")
_PCO2 = ("pco2", "paco2", "pco2 arterial", "arterial pco2", "partial pressure of co2")
_PO2 = ("po2", "pao2", "po2 arterial", "arterial po2", "partial pressure of o2")
_BILI = ("bilirubin", "total bilirubin", "bilirubin total", "t bil", "tbil", "bilirubin t")

_MMOL = ("mmol/l", "meq/l")           # the same number for a monovalent ion
_MGDL = ("mg/dl",)
_GDL = ("g/dl", "gm/dl", "gms/dl")
_PER_NL = ("10^9/l", "10^3/ul", "k/ul", "thou/ul", "10^3/mm3", "k/mm3", "thousand/ul",
           "thousand/mm3", "10e9/l", "10e3/ul", "10*9/l", "10*3/ul", "giga/l")
_MMHG = ("mmhg",)

LIMITS: tuple[Limit, ...] = (
    Limit("Potassium", _K, _MMOL, 2.8, 6.2, KOST_1990),
    Limit("Sodium", _NA, _MMOL, 120, 158, KOST_1990),
    Limit("Glucose", _GLU, _MGDL, 46, 484, KOST_1990),
    Limit("Glucose", _GLU, ("mmol/l",), 2.6, 26.9, KOST_1990),
    Limit("Calcium (total)", _CA, _MGDL, 6.6, 12.9, KOST_1990),
    Limit("Calcium (total)", _CA, ("mmol/l",), 1.65, 3.22, KOST_1990),
    Limit("Bicarbonate (total CO2)", _HCO3, _MMOL, 11, 40, KOST_1990),
    Limit("Calcium (ionised)", _ICA, ("mmol/l",), 0.78, 1.58, ARUP_2019),
    Limit("Haemoglobin", _HB, _GDL, 7.0, 21.0, ARUP_2019),
    Limit("Haemoglobin", _HB, ("g/l",), 70, 210, ARUP_2019),
    Limit("Haematocrit", _HCT, ("%",), 21, 65, ARUP_2019),
    Limit("Platelets", _PLT, _PER_NL, 20, 1000, ARUP_2019),
    Limit("White blood cells", _WBC, _PER_NL, 2.0, 40, ARUP_2019),
    Limit("INR", _INR, (), None, 5.0, ARUP_2019),
    Limit("aPTT", _APTT, ("s", "sec", "secs", "seconds"), None, 85, ARUP_2019),
    Limit("Fibrinogen", _FIB, _MGDL, 100, None, ARUP_2019),
    Limit("Troponin I", _TNI, ("ng/ml", "ug/l"), None, 0.30, ARUP_2019),
    Limit("pH (arterial)", _PH, (), 7.25, 7.6, ARUP_2019),
    Limit("pCO2 (arterial)", _PCO2, _MMHG, 20, 60, ARUP_2019),
    Limit("pO2 (arterial)", _PO2, _MMHG, 40, None, ARUP_2019),
    Limit("Bilirubin (total)", _BILI, _MGDL, None, 15, ARUP_2019),
)

# Words that qualify a name without changing the analyte.
_QUALIFIERS = frozenset({"serum", "plasma", "blood", "whole", "venous", "level", "levels",
                         "s", "p", "b", "sr", "result", "conc", "concentration", "test", "value"})
# Unitless analytes: these spellings of "no unit" are accepted.
_NO_UNIT = frozenset({"", "ratio", "inr", "units", "unit", "-", "n/a", "na"})


def norm_name(name: str) -> str:
    """Lower case, punctuation to spaces ('+' of K+/Na+ kept), qualifiers dropped."""
    s = re.sub(r"[^a-z0-9+ ]", " ", str(name).lower())
    return " ".join(w for w in s.split() if w not in _QUALIFIERS)


def norm_unit(unit: str | None) -> str:
    """Lower case, no spaces; µ/μ/mc -> u, x10^9/L and 10^9/L alike, mm[Hg] -> mmhg."""
    s = str(unit or "").strip().lower()
    s = s.replace("µ", "u").replace("μ", "u").replace(" ", "").replace("[", "").replace("]", "")
    s = s.replace("mcl", "ul").replace("mcg", "ug")
    s = re.sub(r"^(?:x|×)", "", s)
    s = s.replace("×", "").replace("10e", "10^").replace("10*", "10^")
    return s


_BY_NAME: dict[str, list[Limit]] = {}
_UNITS: dict[int, frozenset[str]] = {id(lim): frozenset(norm_unit(u) for u in lim.units)
                                     for lim in LIMITS}
for _lim in LIMITS:
    for _n in _lim.names:
        _BY_NAME.setdefault(norm_name(_n), []).append(_lim)


def limit_for(name: str, unit: str | None) -> Limit | None:
    """The critical limit of analyte ``name`` measured in ``unit``, or None."""
    cands = _BY_NAME.get(norm_name(name))
    if not cands:
        return None
    u = norm_unit(unit)
    for lim in cands:
        if lim.units:
            if u and u in _UNITS[id(lim)]:
                return lim
        elif u in _NO_UNIT:
            return lim
    return None


Side = Literal["low", "high"]


def critical_side(name: str, unit: str | None, value: float | None,
                  comparator: str | None = None) -> tuple[Side, Limit] | None:
    """("low"|"high", the limit) when ``value`` is beyond a documented critical limit of
    the analyte in that unit; None otherwise (also for unknown analytes or units)."""
    if value is None:
        return None
    lim = limit_for(name, unit)
    if lim is None:
        return None
    # A censored value stands for an interval: "<x" covers everything below x, ">x"
    # everything above it. Critical only if the whole interval is beyond the limit.
    if lim.low is not None and comparator in (None, "<", "<=") and (
            value < lim.low or (comparator == "<" and value <= lim.low)):
        return "low", lim
    if lim.high is not None and comparator in (None, ">", ">=") and (
            value > lim.high or (comparator == ">" and value >= lim.high)):
        return "high", lim
    return None
