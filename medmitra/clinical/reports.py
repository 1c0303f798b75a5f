"""Radiology report text: the FINDINGS and IMPRESSION sections of a report (PDF text
layer or OCR), as the radiologist wrote them.

A heading is a line that starts with a known section name followed by a colon (or stands
alone on its line), in any case: "FINDINGS:", "Impression", "CONCLUSION:", "Opinion:".
A section runs until the next heading. Pure, no model, no I/O.
"""

from __future__ import annotations

import re

MAX_SECTION_CHARS = 4000

_FINDINGS = ("findings", "finding", "observations", "report")
_IMPRESSION = ("impression", "impressions", "conclusion", "conclusions", "opinion",
               "summary", "diagnosis")
_OTHER = ("technique", "history", "clinical history", "clinical information", "indication",
          "indications", "comparison", "procedure", "examination", "exam", "recommendation",
          "recommendations", "protocol", "contrast", "reason for exam", "signed", "radiologist")
_HEADING_RE = re.compile(
    r"^\s*(?P<name>" + "|".join(re.escape(h) for h in sorted(
        _FINDINGS + _IMPRESSION + _OTHER, key=len, reverse=True)) + r")\s*(?::|-|$)\s*",
    re.IGNORECASE | re.MULTILINE)


_PAGE_LINE_RE = re.compile(r"^\s*page\s+\d+(?:\s+of\s+\d+)?\s*$", re.IGNORECASE | re.MULTILINE)


def radiology_sections(text: str | None) -> dict[str, str]:
    """{"findings": ..., "impression": ...} as printed; a missing section is absent."""
    if not text:
        return {}
    text = _PAGE_LINE_RE.sub("", text)
    heads = list(_HEADING_RE.finditer(text))
    out: dict[str, str] = {}
    for i, m in enumerate(heads):
        name = m.group("name").lower()
        kind = "findings" if name in _FINDINGS else "impression" if name in _IMPRESSION \
            else None
        if kind is None or kind in out:
            continue
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        body = " ".join(text[m.end():end].split())[:MAX_SECTION_CHARS]
        if body:
            out[kind] = body
    return out
