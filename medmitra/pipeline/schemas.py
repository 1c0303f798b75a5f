"""JSON schemas of the stage outputs, and the check that turns decoded text into clean data.

Every string has ``maxLength`` and every array ``maxItems``: a small model decoding under an
unbounded grammar loops until ``max_tokens`` and the JSON is cut off. ``fit_schema``
shrinks the string bounds so the longest answer the grammar allows fits the stage's token
budget. llama.cpp's grammar ignores ``minimum``/``maximum``, so ``coerce`` clamps numbers
after decoding (non-finite -> 0.0) and fills missing fields with safe defaults.

Each schema's ``title`` is its stage name (the fake runtime scripts answers by it).
"""

from __future__ import annotations

import copy
import json
import math
import re
import unicodedata
from typing import Any, Iterable

SCORE = {"type": "number", "minimum": 0, "maximum": 1}
URGENCIES = ["urgent", "routine", "follow-up"]
# Upper bound of one JSON number the grammar admits (sign, 16+16 digits, exponent).
NUMBER_MAX_CHARS = 40
# Strings are never shrunk below this many characters by fit_schema (nor below their own
# maxLength): room for one short clinical sentence. Below it a model writing real
# sentences is cut mid-word by the grammar ("To assess the patient's").
MIN_STRING_CHARS = 60
# fit_schema keeps this many items of a list (or its maxItems if lower) before it shrinks
# strings; below it only when strings are at MIN_STRING_CHARS.
LIST_SOFT_MIN_ITEMS = 2
# Conservative characters per token for the worst-case length of an answer.
CHARS_PER_TOKEN = 3.0
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _s(max_len: int, min_len: int = 0) -> dict:
    out: dict[str, Any] = {"type": "string", "maxLength": max_len}
    if min_len:
        out["minLength"] = min_len
    return out


def _list(items: dict, max_items: int, min_items: int = 0) -> dict:
    out: dict[str, Any] = {"type": "array", "items": items, "maxItems": max_items}
    if min_items:
        out["minItems"] = min_items
    return out


def _obj(title: str | None, **props: dict) -> dict:
    out: dict[str, Any] = {"type": "object", "properties": props, "required": list(props)}
    if title:
        out = {"title": title, **out}
    return out


# A lab file whose rows were parsed deterministically: the model only interprets them.
LAB_INTERPRETATION = _obj(
    "lab_analysis",
    summary=_s(300, 1),
    key_abnormalities=_list(_s(100), 4),
    confidence_score=SCORE,
)

RADIOLOGY = _obj(
    "radiology_analysis",
    findings=_s(300, 1),
    impressions=_s(200),
    summary=_s(200),
    key_abnormalities=_list(_s(100), 4),
    confidence_score=SCORE,
)

CASE_SUMMARY = _obj(
    "case_summary",
    comprehensive_summary=_s(400, 1),
    key_findings=_list(_s(100), 5),
    confidence_score=SCORE,
)

SOAP_NOTE = _obj(
    "soap_note",
    subjective=_s(220, 1),
    objective=_s(220, 1),
    assessment=_s(220, 1),
    plan=_s(220, 1),
    confidence_score=SCORE,
)

# Evidence is cited by fact id only (prompts.Fact): ``cite`` turns this placeholder into
# an enum of the case's fact ids, so the grammar admits nothing else.
EVIDENCE = "supporting_evidence"
FACT_ID_MAX_CHARS = 8
# An enum longer than this is shown to the model as a description, not listed.
PROMPT_ENUM_MAX = 8

DIAGNOSIS = _obj(
    "diagnosis",
    primary_diagnosis=_s(100, 1),
    description=_s(200),
    supporting_evidence=_list(_s(FACT_ID_MAX_CHARS), 4),
    confidence_score=SCORE,
)

DIFFERENTIAL = _obj(
    "differential",
    differential_diagnoses=_list(
        _obj(None, condition=_s(80, 1), probability=SCORE, reasoning=_s(160),
             distinguishing_factors=_list(_s(60), 3),
             supporting_evidence=_list(_s(FACT_ID_MAX_CHARS), 2)),
        5, 3),
)

_INVESTIGATION = _obj(None, investigation_type=_s(80, 1),
                      urgency={"type": "string", "enum": URGENCIES},
                      rationale=_s(140), expected_findings=_s(100))
_TREATMENT = _obj(None, treatment_type=_s(80, 1), description=_s(140), dosage=_s(60),
                  duration=_s(40), precautions=_list(_s(60), 3))

RECOMMENDATIONS = _obj(
    "recommendations",
    investigations=_list(_INVESTIGATION, 3),
    treatments=_list(_TREATMENT, 3),
)
RECOMMENDATIONS_NO_TREATMENT = _obj(
    "recommendations",
    investigations=_list(_INVESTIGATION, 3),
)

ALL_SCHEMAS = (LAB_INTERPRETATION, RADIOLOGY, CASE_SUMMARY, SOAP_NOTE, DIAGNOSIS,
               DIFFERENTIAL, RECOMMENDATIONS, RECOMMENDATIONS_NO_TREATMENT)


def cite(schema: dict, fact_ids: list[str]) -> dict:
    """A copy of ``schema`` whose evidence lists admit only ``fact_ids`` (an enum); with
    no ids, the evidence lists are left out of the schema (nothing can be cited)."""
    out = copy.deepcopy(schema)

    def walk(node: dict) -> None:
        props = node.get("properties") or {}
        if EVIDENCE in props:
            if fact_ids:
                props[EVIDENCE]["items"] = {"type": "string", "enum": list(fact_ids)}
            else:
                del props[EVIDENCE]
                node["required"] = [k for k in node.get("required", []) if k != EVIDENCE]
        for sub in props.values():
            walk(sub)
        if isinstance(node.get("items"), dict):
            walk(node["items"])
    walk(out)
    return out


# --------------------------------------------------------------------------- sizing

def max_json_chars(schema: dict) -> int:
    """Longest compact JSON text (characters) an instance of ``schema`` can have."""
    if "enum" in schema:
        return max(len(json.dumps(v)) for v in schema["enum"])
    typ = schema.get("type")
    if typ == "object":
        props = schema.get("properties", {})
        inner = sum(len(json.dumps(k)) + 1 + max_json_chars(v) for k, v in props.items())
        return 2 + inner + max(0, len(props) - 1)
    if typ == "array":
        n = int(schema["maxItems"])
        return 2 + n * max_json_chars(schema.get("items", {})) + max(0, n - 1)
    if typ == "string":
        return int(schema["maxLength"]) + 2
    if typ in ("number", "integer"):
        return NUMBER_MAX_CHARS
    if typ == "boolean":
        return 5
    return 4  # null


def _scale_strings(schema: dict, factor: float) -> None:
    if schema.get("type") == "string" and "maxLength" in schema and "enum" not in schema:
        new = max(MIN_STRING_CHARS, int(schema["maxLength"] * factor))
        schema["maxLength"] = min(schema["maxLength"], new)
        if schema.get("minLength", 0) > schema["maxLength"]:
            schema["minLength"] = schema["maxLength"]
    for sub in schema.get("properties", {}).values():
        _scale_strings(sub, factor)
    if isinstance(schema.get("items"), dict):
        _scale_strings(schema["items"], factor)


def fit_schema(schema: dict, max_tokens: int) -> dict:
    """A copy of ``schema`` whose longest possible answer fits in ``max_tokens`` tokens.

    Lists lose items first, one at a time from the list with the most items to spare,
    down to LIST_SOFT_MIN_ITEMS (or their minItems); then string bounds shrink
    proportionally, never below MIN_STRING_CHARS; then lists go down to their minItems
    (at least 1). Fewer complete items are worth more than more items cut off
    mid-sentence. A generous budget leaves the schema unchanged; a budget too small for
    the floors gives the best effort.
    """
    budget_chars = int(max_tokens * CHARS_PER_TOKEN)
    for floor in (LIST_SOFT_MIN_ITEMS, 1):
        out = copy.deepcopy(schema)
        while max_json_chars(out) > budget_chars and _drop_one_item(out, floor):
            pass
        for _ in range(64):  # proportional shrink converges in a few rounds
            total = max_json_chars(out)
            if total <= budget_chars:
                return out
            _scale_strings(out, max(0.1, budget_chars / total * 0.95))
            if max_json_chars(out) == total:
                break  # strings at their floor: fewer items, from the original bounds
    return out  # lists at their minimum, strings at their floor: best effort


def _arrays(schema: dict) -> Iterable[dict]:
    if schema.get("type") == "array":
        yield schema
        if isinstance(schema.get("items"), dict):
            yield from _arrays(schema["items"])
    for sub in schema.get("properties", {}).values():
        yield from _arrays(sub)


def _drop_one_item(schema: dict, floor: int = 1) -> bool:
    """Lower ``maxItems`` by one on the list with the most items above its floor
    (max(floor, minItems)), the one with the larger items among equals; False if every
    list is at its floor."""
    spare = [(a["maxItems"] - max(floor, int(a.get("minItems", 0))),
              max_json_chars(a.get("items", {})), i, a)
             for i, a in enumerate(_arrays(schema))]
    spare = [x for x in spare if x[0] > 0]
    if not spare:
        return False
    best = max(spare, key=lambda x: (x[0], x[1], -x[2]))
    best[3]["maxItems"] -= 1
    return True


def prompt_schema_text(schema: dict) -> str:
    """The schema as shown to the model: compact, without ``title`` and ``required``."""
    return json.dumps(_for_prompt(schema), separators=(",", ":"))


def _for_prompt(schema: Any) -> Any:
    # "required" lists every key again and "title" is for routing: both only cost tokens
    # (the grammar makes every key required anyway).
    # A long enum (the case's fact ids) is described, not listed: the grammar holds it.
    if isinstance(schema, dict):
        if len(schema.get("enum") or ()) > PROMPT_ENUM_MAX:
            return {"type": "string", "description": "a fact id in brackets, e.g. "
                                                     f"{schema['enum'][0]}"}
        return {k: _for_prompt(v) for k, v in schema.items() if k not in ("title", "required")}
    return schema


# --------------------------------------------------------------------------- checking

class InvalidOutput(ValueError):
    """The model's text is not a usable answer (empty, cut off, not a JSON object)."""


def parse_json_object(text: str) -> dict:
    """The first JSON object in ``text``; ``InvalidOutput`` with a readable reason if none.

    ``json`` maps ``Infinity``/``NaN``/``1e999`` to non-finite floats; ``coerce`` zeroes them.
    Raw control characters inside strings (a newline or tab the model wrote literally) are
    accepted here (``strict=False``) and removed by ``coerce``: they are a repairable
    formatting slip, not a reason to throw the answer away.
    """
    stripped = (text or "").strip()
    if not stripped:
        raise InvalidOutput("the model returned an empty answer")
    start = stripped.find("{")
    if start < 0:
        raise InvalidOutput("the model's answer contains no JSON object")
    try:
        value, _end = json.JSONDecoder(strict=False).raw_decode(stripped, start)
    except json.JSONDecodeError as exc:
        raise InvalidOutput(f"the model's answer is not valid JSON ({exc.msg} at "
                            f"character {exc.pos})") from None
    except RecursionError:
        raise InvalidOutput("the model's answer is nested too deeply") from None
    if not isinstance(value, dict):
        raise InvalidOutput("the model's answer is not a JSON object")
    return value


def clamp_score(value: Any) -> float:
    """A number in [0, 1]; non-numbers and non-finite numbers become 0.0."""
    if isinstance(value, bool):
        return 0.0
    if isinstance(value, str):
        try:
            value = float(value.strip().rstrip("%")) / (100.0 if value.strip().endswith("%")
                                                         else 1.0)
        except ValueError:
            return 0.0
    if not isinstance(value, (int, float)):
        return 0.0
    try:
        value = float(value)
    except OverflowError:  # an int too large for a float
        return 0.0
    if not math.isfinite(value):
        return 0.0
    return min(1.0, max(0.0, value))


def _default(schema: dict) -> Any:
    if "enum" in schema:
        return schema["enum"][-1]
    return {"object": lambda: coerce({}, schema), "array": list, "string": str,
            "number": float, "integer": int, "boolean": bool}.get(schema.get("type"),
                                                                   lambda: None)()


# Where a cut-off text may end: after a sentence ("e.g." and initials are no sentence
# end); a list item may also end before a clause break.
_SENTENCE_END_RE = re.compile(r"(?<![.\s(][A-Za-z])[.!?](?=\s|$)|(?<=^[A-Za-z])[.!?](?=\s)")
_CLAUSE_END_RE = re.compile(r"[;,:](?=\s|$)|\s[-\u2013\u2014]\s")
# A text of this many Latin letters ending in one letter of another script was cut off
# ("To assess the patient's\u8840"): the stray letter is the start of a word the grammar cut.
FOREIGN_TAIL_MIN_LATIN = 8


def _foreign_tail(text: str) -> bool:
    """True when Latin-script ``text`` ends in a letter of another script (Greek aside:
    "TNF-\u03b1" is a name)."""
    if not text or not text[-1].isalpha():
        return False
    name = unicodedata.name(text[-1], "")
    if name.startswith(("LATIN", "GREEK", "MICRO")):
        return False
    latin = sum(1 for ch in text if ch.isascii() and ch.isalpha())
    return latin >= FOREIGN_TAIL_MIN_LATIN


def is_cut_off(raw: str, schema: dict) -> bool:
    """True when the grammar cut ``raw`` off: it reached its ``maxLength`` (the grammar
    stops a string there, mid-word or not), or it ends in a stray letter of another
    script."""
    limit = schema.get("maxLength")
    return (limit is not None and len(raw) >= int(limit)) or _foreign_tail(raw.rstrip())


def trim_cut_off(text: str, item: bool = False) -> str:
    """What is left of a cut-off text: up to its last sentence end (for a list item also
    its last clause break), or "" when it has none."""
    if _foreign_tail(text):
        text = text[:-1]
    ends = [m.end() for m in _SENTENCE_END_RE.finditer(text)]
    if item:
        ends += [m.start() for m in _CLAUSE_END_RE.finditer(text)]
    if not ends:
        return ""
    return text[:max(ends)].rstrip(" ,;:-(")


def coerce(value: Any, schema: dict, *, item: bool = False) -> Any:
    """``value`` made to fit ``schema``: clamped, truncated, defaults for what is missing.

    A string the grammar cut off (``is_cut_off``) is trimmed back to what was finished
    (``trim_cut_off``); when nothing is, a required string (``minLength`` >= 1) makes the
    answer ``InvalidOutput``, an optional one becomes "" and a list item is dropped (an
    object item whose required string was cut off too). ``item``: ``value`` is an item of
    a list of strings."""
    if "enum" in schema:
        text = str(value).strip().lower() if isinstance(value, (str, int, float)) else ""
        for option in schema["enum"]:
            if text == str(option).lower():
                return option
        return _default(schema)
    typ = schema.get("type")
    if typ == "object":
        src = value if isinstance(value, dict) else {}
        return {k: coerce(src[k], sub) if k in src else _default(sub)
                for k, sub in schema.get("properties", {}).items()}
    if typ == "array":
        item_schema = schema.get("items", {})
        item_type = "object" if isinstance(value, dict) else "string"
        if isinstance(value, (str, dict)) and item_schema.get("type") == item_type:
            value = [value]  # a lone item where a list of such items was expected
        if not isinstance(value, list):
            return []
        if "enum" in item_schema:
            # Only the options themselves, each once: an unknown one is dropped, never
            # turned into a default option (a fact id the model did not cite).
            allowed = {str(o).lower(): o for o in item_schema["enum"]}
            picked = [allowed.get(str(v).strip().lower()) for v in value
                      if isinstance(v, (str, int, float)) and not isinstance(v, bool)]
            return list(dict.fromkeys(p for p in picked if p is not None))[
                : int(schema.get("maxItems", len(value)))]
        items = []
        for v in value:
            try:
                items.append(coerce(v, item_schema, item=True))
            except InvalidOutput:
                continue  # an item cut off with nothing finished
        if item_schema.get("type") in ("string", "object"):
            items = [v for v in items if has_content(v)]  # drop empty placeholders
        return items[: int(schema.get("maxItems", len(items)))]
    if typ == "string":
        if value is None or isinstance(value, (dict, list)):
            return ""
        # Control characters become spaces, then runs of whitespace collapse to one.
        raw = str(value)
        text = " ".join(_CONTROL_RE.sub(" ", raw).split())
        text = text[: int(schema.get("maxLength", len(text)))]
        if is_cut_off(raw, schema):
            text = trim_cut_off(text, item and schema.get("type") == "string")
            if not text and int(schema.get("minLength", 0)) >= 1:
                raise InvalidOutput(f"a text cut off at its {schema.get('maxLength')}-"
                                    "character limit with no finished sentence")
        return text
    if typ == "number":
        if schema.get("minimum") == 0 and schema.get("maximum") == 1:
            return clamp_score(value)
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            return 0.0
        return number if math.isfinite(number) else 0.0
    if typ == "integer":
        try:
            return int(value)
        except (TypeError, ValueError, OverflowError):
            return 0
    if typ == "boolean":
        return bool(value)
    return value


def has_content(value: Any) -> bool:
    """True if any string in ``value`` is non-empty (an all-empty answer is retried)."""
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, dict):
        return any(has_content(v) for v in value.values())
    if isinstance(value, list):
        return any(has_content(v) for v in value)
    return False


def check_output(text: str, schema: dict) -> dict:
    """Parse, coerce and sanity-check one answer; ``InvalidOutput`` says what is wrong."""
    data = coerce(parse_json_object(text), schema)
    if not has_content(data):
        raise InvalidOutput("the model's answer has no content (all fields empty)")
    return data
