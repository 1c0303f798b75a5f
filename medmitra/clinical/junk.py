"""Junk checks for model-written text: what must never be stored as an insight.

A small model decoding under a JSON grammar produces valid JSON whose *content* can still
be junk. Seen in an evaluation of 17 cases (issue 9): a lab summary of ``{``, fields such
as ``TASK_1``, ``maxLength:220``, ``{{1}}``, ``array`` as an investigation type, field
names echoed as values, looping repetitions, duplicated differentials, differentials
repeating the primary diagnosis and "probabilities" that sum to 3.95.

``junk_reason(text, field)`` names the first problem found, or None. The stage code
rejects (and retries, then abstains) an answer whose required prose is junk, and drops
junk items from lists. Pure functions, no model, no I/O.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

# Minimal length (letters and digits, not counting spaces or punctuation) of a field's
# text: below it the text cannot say anything. Fields not listed have no minimum.
FIELD_MIN_CHARS: dict[str, int] = {
    "comprehensive_summary": 30, "summary": 20, "findings": 10, "impressions": 8,
    "subjective": 8, "objective": 8, "assessment": 8, "plan": 8,
    "primary_diagnosis": 2, "condition": 2, "reasoning": 12,
    "investigation_type": 3, "treatment_type": 3, "key_findings": 4,
    "key_abnormalities": 4, "supporting_evidence": 4, "distinguishing_factors": 4,
    "precautions": 4, "rationale": 8,
}
# A probability list may sum a little over 1 through rounding.
PROBABILITY_SUM_TOLERANCE = 0.05
# Repetition: a word n-gram of this size seen this many times, or this share of unique
# words in a text of at least REPEAT_MIN_WORDS words.
REPEAT_NGRAM = 3
REPEAT_NGRAM_TIMES = 3
REPEAT_MIN_WORDS = 12
REPEAT_UNIQUE_SHARE = 0.35
SAME_WORD_RUN = 4
# Prompt echo: this many consecutive words of an instruction appearing in the answer.
ECHO_NGRAM = 6

# JSON-schema vocabulary and type names: they belong to the prompt, never to an answer.
_SCHEMA_RE = re.compile(
    r"\b(?:maxLength|minLength|maxItems|minItems|additionalProperties|\$schema|\$ref)\b"
    r"|\"?\b(?:type|properties|required|items|enum)\"?\s*:"
    r"|\b(?:json\s+schema)\b", re.IGNORECASE)
_TYPE_WORDS = frozenset({"string", "array", "object", "number", "integer", "boolean", "null",
                         "none", "n/a", "na", "value", "text", "example", "todo", "tbd",
                         "unknown", "string[]", "list", "dict", "true", "false", "..."})
# Template and chat-format markers, placeholders.
_TEMPLATE_RE = re.compile(
    r"\{\{.*?\}\}|\{[A-Za-z_][A-Za-z0-9_]*\}|\$\{|<\|[^>]*\|>|\[/?INST\]|<</?SYS>>|</?s>"
    r"|\bTASK[_ ]?\d+\b|\bTASK:|\bim_(?:start|end)\b|\bassistant:|\buser:|\bsystem:"
    r"|\b(?:placeholder|lorem ipsum)\b|\bxx+\b|<[a-z_]+>", re.IGNORECASE)
# An identifier with an underscore (a schema field name such as key_findings).
_IDENT_RE = re.compile(r"\b[a-z]+(?:_[a-z0-9]+)+\b")
_FRAGMENT_RE = re.compile(r"^[\s{}\[\]\":,.;0-9\-+eE]*$")
_KEY_VALUE_RE = re.compile(r"\"\s*:\s*[\"\[{0-9]|[{\[]\s*\"")
_TIMESTAMP_RE = re.compile(
    r"^\s*\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?\s*$"
    r"|^\s*\d{1,2}:\d{2}(?::\d{2})?\s*$")
_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def _content_chars(text: str) -> int:
    return sum(ch.isalnum() for ch in text)


def _repetition(ws: list[str]) -> str | None:
    run = 1
    for a, b in zip(ws, ws[1:]):
        run = run + 1 if a == b else 1
        if run >= SAME_WORD_RUN:
            return f"the word {a!r} repeated {run} times"
    grams: dict[tuple[str, ...], int] = {}
    for i in range(len(ws) - REPEAT_NGRAM + 1):
        g = tuple(ws[i:i + REPEAT_NGRAM])
        grams[g] = grams.get(g, 0) + 1
        if grams[g] >= REPEAT_NGRAM_TIMES:
            return f"the phrase {' '.join(g)!r} repeated {grams[g]} times"
    if len(ws) >= REPEAT_MIN_WORDS and len(set(ws)) / len(ws) < REPEAT_UNIQUE_SHARE:
        return "the text repeats itself"
    return None


def _ngrams(ws: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)}


def junk_reason(text: Any, field: str, *, field_names: Iterable[str] = (),
                prompt_texts: Iterable[str] = ()) -> str | None:
    """Why ``text`` (the value of ``field``) is junk, or None if it may be stored.

    ``field_names``: the schema's property names (an answer that quotes one is echoing
    the schema); ``prompt_texts``: the instructions the model was given (an answer that
    repeats ECHO_NGRAM consecutive words of one is echoing the prompt).
    """
    if not isinstance(text, str):
        return None
    s = " ".join(text.split())
    if not s:
        return None  # emptiness is judged by the caller (required or not)
    name = field.replace("_", " ")
    low = s.lower().strip(" .:;,!-\"'")
    if _TIMESTAMP_RE.match(s):
        return "a timestamp, not text"
    if _FRAGMENT_RE.match(s) or _KEY_VALUE_RE.search(s) or s.lstrip().startswith(("{", "[")):
        return "a JSON fragment"
    if _SCHEMA_RE.search(s):
        return "JSON-schema words"
    if low in _TYPE_WORDS:
        return f"a placeholder word ({low!r})"
    if _TEMPLATE_RE.search(s):
        return "a template or prompt marker"
    names = {n.lower() for n in field_names} | {field.lower()}
    if low in names or low in {n.replace("_", " ") for n in names} or low == name:
        return "an echo of a field name"
    snake = {n for n in names if "_" in n}
    for ident in _IDENT_RE.findall(s.lower()):
        if ident in names or any(ident.startswith(n) for n in snake):
            return "an echo of a field name"
    ws = words(s)
    rep = _repetition(ws)
    if rep:
        return rep
    min_chars = FIELD_MIN_CHARS.get(field, 0)
    if _content_chars(s) < min_chars:
        return f"too short for {name} (under {min_chars} characters)"
    answer_grams = _ngrams(ws, ECHO_NGRAM)
    if answer_grams:
        for prompt in prompt_texts:
            if answer_grams & _ngrams(words(prompt), ECHO_NGRAM):
                return "an echo of the prompt"
    return None


def text_fields(obj: Any, key: str = "") -> Iterable[tuple[str, str]]:
    """(field name, text) of every string in a JSON-like value (list items carry the
    name of their list): what ``junk_reason`` is asked about."""
    if isinstance(obj, str):
        yield key, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from text_fields(v, k)
    elif isinstance(obj, list):
        for v in obj:
            yield from text_fields(v, key)


def normalise_condition(text: str) -> str:
    """A diagnosis name reduced for comparison: lower case, no punctuation or filler."""
    ws = [w for w in words(text) if w not in ("the", "a", "an", "of", "with", "and", "acute",
                                                "chronic", "unspecified", "possible",
                                                "probable", "suspected", "likely")]
    return " ".join(ws)


def same_condition(a: str, b: str) -> bool:
    """True when two condition names say the same (equal, or one contains the other)."""
    na, nb = normalise_condition(a), normalise_condition(b)
    if not na or not nb:
        return False
    return na == nb or f" {na} " in f" {nb} " or f" {nb} " in f" {na} "


def differential_problems(items: list[dict], primary: str) -> tuple[list[dict], list[str]]:
    """(the items to keep, the reasons items were dropped): duplicates and repeats of the
    primary diagnosis go. The caller rejects the answer if too few remain."""
    kept: list[dict] = []
    dropped: list[str] = []
    for item in items:
        cond = str(item.get("condition") or "")
        if primary and same_condition(cond, primary):
            dropped.append(f"{cond!r} repeats the primary diagnosis")
        elif any(same_condition(cond, k["condition"]) for k in kept):
            dropped.append(f"{cond!r} is listed twice")
        else:
            kept.append(item)
    return kept, dropped


def probabilities_problem(probabilities: list[float]) -> str | None:
    """Why the probabilities of alternative diagnoses are not a distribution, or None."""
    if any(p < 0 or p > 1 for p in probabilities):
        return "a probability outside 0-1"
    total = sum(probabilities)
    if total > 1 + PROBABILITY_SUM_TOLERANCE:
        return f"the probabilities sum to {total:.2f}, more than 1"
    return None


class JunkAnswer(ValueError):
    """A required field of the answer is junk: the answer is rejected (and retried)."""


def screen_answer(data: dict, schema: dict, *, prompt_texts: Iterable[str] = ()) -> dict:
    """``data`` (already shaped by its JSON schema) with junk removed.

    - a required text (``minLength`` >= 1 in the schema) that is junk, or that repeats
      another field of the same object word for word, rejects the whole answer
      (``JunkAnswer``); at the top level this means a retry, then abstention;
    - an optional text that is junk is blanked;
    - a list item that is junk (or whose required text is) is dropped.
    """
    prompts = list(prompt_texts)
    names = _property_names(schema)
    return _screen_object(data, schema, names, prompts)


def _property_names(schema: dict) -> set[str]:
    out: set[str] = set()
    for k, sub in (schema.get("properties") or {}).items():
        out.add(k)
        out |= _property_names(sub)
    if isinstance(schema.get("items"), dict):
        out |= _property_names(schema["items"])
    return out


def _required_text(schema: dict) -> bool:
    return schema.get("type") == "string" and "enum" not in schema and \
        int(schema.get("minLength", 0)) >= 1


def _screen_object(data: dict, schema: dict, names: set[str], prompts: list[str]) -> dict:
    out = dict(data)
    seen: dict[str, str] = {}
    for key, sub in (schema.get("properties") or {}).items():
        value = out.get(key)
        if sub.get("type") == "string" and "enum" not in sub and isinstance(value, str):
            reason = junk_reason(value, key, field_names=names, prompt_texts=prompts)
            norm = " ".join(words(value))
            if reason is None and norm and _required_text(sub):
                for other, other_norm in seen.items():
                    if norm == other_norm:
                        reason = f"a repeat of {other.replace('_', ' ')}"
                        break
                seen[key] = norm
            if reason is not None:
                if _required_text(sub):
                    raise JunkAnswer(f"{key.replace('_', ' ')} is {reason}")
                out[key] = ""
        elif sub.get("type") == "array" and isinstance(value, list):
            out[key] = _screen_list(value, key, sub, names, prompts)
        elif sub.get("type") == "object" and isinstance(value, dict):
            out[key] = _screen_object(value, sub, names, prompts)
    return out


def _screen_list(items: list, key: str, schema: dict, names: set[str],
                 prompts: list[str]) -> list:
    item_schema = schema.get("items") or {}
    kept: list = []
    seen: set[str] = set()
    for item in items:
        if isinstance(item, str):
            if junk_reason(item, key, field_names=names, prompt_texts=prompts):
                continue
            norm = " ".join(words(item))
            if norm in seen:
                continue  # the same item twice
            seen.add(norm)
            kept.append(item)
        elif isinstance(item, dict):
            try:
                kept.append(_screen_object(item, item_schema, names, prompts))
            except JunkAnswer:
                continue
        else:
            kept.append(item)
    return kept
