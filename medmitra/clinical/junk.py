"""Junk checks for model-written text: what must never be stored as an insight.

A small model decoding under a JSON grammar produces valid JSON whose *content* can still
be junk. Seen in an evaluation of 17 cases (issue 9): a lab summary of ``{``, fields such
as ``TASK_1``, ``maxLength:220``, ``{{1}}``, ``array`` as an investigation type, field
names echoed as values, looping repetitions, duplicated differentials, differentials
repeating the primary diagnosis and "probabilities" that sum to 3.95.

Seen afterwards with the default model: echoes of the instruction in other words
("Primary diagnosis of the" as the primary diagnosis; "Evidence from the facts. The evidence
provided by the facts." as supporting evidence). So an answer is also junk when its content
words are nearly all words of the prompt, the field names or filler; when it is one
sentence ending in a function word ("of the"); when it says the same twice in other words;
and when it prints a dose above any dose in routine use of the drug it names.

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
# Prompt echo in other words: an answer whose content words (function words aside) are at
# least this share prompt, schema-field or filler words says nothing of the case
# ("Primary diagnosis of the", "Evidence from the facts").
ECHO_WORD_SHARE = 0.8
# Paraphrased repetition: two sentences of one text (or two required fields of one
# answer) whose content-word sets overlap this much (Jaccard) say the same thing twice.
PARAPHRASE_OVERLAP = 0.6
PARAPHRASE_FIELD_OVERLAP = 0.8
PARAPHRASE_MIN_WORDS = 2

# Function words: they carry no content, and a one-sentence answer that ends in one was
# cut off ("Primary diagnosis of the").
_FUNCTION_WORDS = frozenset("""
a an the of and or but nor to in on at by for from with without as is are was were be been
being am this that these those it its their there here which who whom whose what when where
why how than then so such into onto about per via not no do does did has have had can could
may might must shall should will would our your his her they them we you i me my he she also
any all some each other more most very only just both either neither if""".split())
_DANGLING_END = frozenset("""
the a an of and or but nor to in on at by for from with as is are was were be been than that
which whose its their his her this these those into onto if via""".split())
# Words that fill an answer without saying anything about the patient.
_FILLER_WORDS = frozenset("""
facts fact provided given based information data details detail following above below
mentioned described stated listed shown according relevant appropriate various etc thing
things something case patient text field answer output input json schema response question
task instruction instructions note notes section item items available""".split())
# What the model was told to write when it has nothing: a legitimate answer.
_NOT_AVAILABLE_RE = re.compile(
    r"^(?:(?:this|the) )?(?:information |data )?(?:is )?not available"
    r"(?: (?:in|from) the (?:case )?facts)?$")
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?;])\s+")

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

# Invented doses ("steroid 25g/day" was stored in the evaluation). A printed mass is
# compared, as a single dose, with the largest daily dose in routine use of the drug named
# beside it (British National Formulary, adult maxima): corticosteroids 1 g/day
# (methylprednisolone pulse), paracetamol 4 g/day. Any other drug: DOSE_MAX_GRAMS_ANY, above
# the largest single oral/IV doses in routine use (e.g. macrogol 17 g sachets).
# Reading a mass as one dose never over-counts, so a plausible dose is never rejected.
DOSE_MAX_GRAMS_ANY = 50.0
DOSE_MAX_GRAMS: tuple[tuple[re.Pattern[str], float], ...] = (
    (re.compile(r"\b(?:cortico)?steroids?\b|\b(?:methyl)?prednisol?one\b|\bprednisone\b"
                r"|\bdexamethasone\b|\bhydrocortisone\b|\bbetamethasone\b", re.IGNORECASE), 1.0),
    (re.compile(r"\bparacetamol\b|\bacetaminophen\b", re.IGNORECASE), 4.0),
)
# No "kg": a weight in a plan ("weight 70 kg") is not a dose.
_GRAMS_PER_UNIT = {"g": 1.0, "gm": 1.0, "gram": 1.0, "grams": 1.0,
                   "mg": 1e-3, "mcg": 1e-6, "ug": 1e-6, "µg": 1e-6, "μg": 1e-6}
# A mass, not a concentration ("Hb 70 g/L", "glucose 600 mg/dL" are results, not doses).
_MASS_RE = re.compile(r"(\d+(?:[.,]\d+)?)\s*(grams?|gm|g|mg|mcg|ug|µg|μg)(?![a-z])"
                      r"(?!\s*/\s*(?:[dcm]?l|lit|100\s*ml)\b)", re.IGNORECASE)
# The fields where a dose is written (treatments, the SOAP plan).
DOSE_FIELDS = frozenset({"dosage", "treatment_type", "description", "plan", "precautions"})


def dose_problem(text: str, drug: str = "") -> str | None:
    """Why a dose printed in ``text`` is implausible for the drug named in ``drug`` or
    ``text`` (rules above DOSE_MAX_GRAMS_ANY), or None."""
    named = f"{drug} {text}"
    ceiling = min((g for pat, g in DOSE_MAX_GRAMS if pat.search(named)),
                  default=DOSE_MAX_GRAMS_ANY)
    for m in _MASS_RE.finditer(text):
        grams = float(m.group(1).replace(",", ".")) * _GRAMS_PER_UNIT[m.group(2).lower()]
        if grams > ceiling:
            return (f"an implausible dose ({m.group(0)} is above {ceiling:g} g, the largest "
                    f"daily dose in routine use)")
    return None


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


def content_words(text: str) -> list[str]:
    """The words of ``text`` that can carry content: function words left out."""
    return [w for w in words(text) if w not in _FUNCTION_WORDS]


def _overlap(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


def prompt_vocabulary(field: str, field_names: Iterable[str] = (),
                      prompt_texts: Iterable[str] = ()) -> frozenset[str]:
    """Words an answer may not consist of: those of the instructions, of the schema's field
    names, and filler. Numbers are never prompt words (they are facts or doses)."""
    vocab = set(_FILLER_WORDS)
    for n in list(field_names) + [field]:
        vocab.update(words(n.replace("_", " ")))
    for p in prompt_texts:
        vocab.update(words(p))
    return frozenset(w for w in vocab if not w.isdigit() and w not in _FUNCTION_WORDS)


def _echo_in_other_words(s: str, vocab: frozenset[str]) -> str | None:
    cws = content_words(s)
    if not cws:
        return "no content words"
    echoed = sum(w in vocab for w in cws)
    if echoed / len(cws) >= ECHO_WORD_SHARE:
        return "an echo of the prompt or field names in other words"
    return None


def _dangling(s: str) -> str | None:
    """A one-sentence answer ending in a function word was cut off."""
    if _SENTENCE_SPLIT_RE.search(s.strip()):
        return None  # longer prose: a cut last sentence is not the whole answer
    tail = re.findall(r"[A-Za-z]+", s)
    if not tail:
        return None
    last = tail[-1]
    if last.lower() in _DANGLING_END and last != "A":  # "Hepatitis A", "Vitamin A"
        return f"a fragment ending in {last.lower()!r}"
    return None


def _paraphrase(s: str) -> str | None:
    sets = [set(content_words(x)) for x in _SENTENCE_SPLIT_RE.split(s)]
    sets = [x for x in sets if len(x) >= PARAPHRASE_MIN_WORDS]
    for i, a in enumerate(sets):
        for b in sets[i + 1:]:
            if _overlap(a, b) >= PARAPHRASE_OVERLAP:
                return "the same said twice in other words"
    return None


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
    prompts = list(prompt_texts)
    answer_grams = _ngrams(ws, ECHO_NGRAM)
    if answer_grams:
        for prompt in prompts:
            if answer_grams & _ngrams(words(prompt), ECHO_NGRAM):
                return "an echo of the prompt"
    if _NOT_AVAILABLE_RE.match(low):
        return None  # what the rules ask the model to say when the facts are silent
    return (_echo_in_other_words(s, prompt_vocabulary(field, field_names, prompts))
            or _dangling(s) or _paraphrase(s)
            or (dose_problem(s) if field in DOSE_FIELDS else None))


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
    seen: dict[str, set[str]] = {}
    for key, sub in (schema.get("properties") or {}).items():
        value = out.get(key)
        if sub.get("type") == "string" and "enum" not in sub and isinstance(value, str):
            reason = junk_reason(value, key, field_names=names, prompt_texts=prompts)
            if reason is None and value.strip() and key in DOSE_FIELDS:
                # A dose is judged with the drug the rest of the object names.
                others = " ".join(v for k, v in data.items() if k != key and isinstance(v, str))
                reason = dose_problem(value, others)
            cws = set(content_words(value)) or set(words(value))
            if reason is None and cws and _required_text(sub):
                for other, other_cws in seen.items():
                    if cws == other_cws or (len(cws) >= PARAPHRASE_MIN_WORDS and _overlap(
                            cws, other_cws) >= PARAPHRASE_FIELD_OVERLAP):
                        reason = f"a repeat of {other.replace('_', ' ')}"
                        break
                seen[key] = cws
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
            # An enum item (a fact id) was chosen by the grammar among fixed options: it
            # is not prose, only a repeat of it is dropped.
            if "enum" not in item_schema and junk_reason(item, key, field_names=names,
                                                         prompt_texts=prompts):
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
