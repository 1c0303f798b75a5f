"""Lab rows from reports nobody on the team wrote: synthetic inpatients from a public
generator (clinosim, from the package registry), rendered as CSV, text PDF and scanned
PDF by bench/clinical_eval.py's renderers, read by the pipeline's own extraction.

This is the deterministic half of bench/clinical_eval.py (no model, seconds), so the
issue-9 lab-row goals are checked on every CI run: F1 >= 0.95 on CSV and text PDF,
>= 0.85 on scans; the lab's own H/L markers give the direction (as often as the F1 goal: OCR may lose
a marker); the report's patient
header line never becomes a row.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import clinical_eval as ce
from medmitra.pipeline.extract import extract_file

DISEASES = ["bacterial_pneumonia", "urinary_tract_infection", "acute_mi"]
GOAL_F1 = {"csv": 0.95, "pdf": 0.95, "scan": 0.85}


@pytest.fixture(scope="module")
def patients() -> list[ce.Truth]:
    truths = ce.generate(DISEASES, 1, seed=20261130)
    assert len(truths) == len(DISEASES) and all(len(t.labs) >= 5 for t in truths)
    return truths


@pytest.mark.parametrize("fmt", ["csv", "pdf", "scan"])
def test_lab_rows_of_generated_patients(fmt: str, patients: list[ce.Truth],
                                        tmp_path: Path) -> None:
    tp = got_n = want_n = 0
    judged = right = 0
    for i, t in enumerate(patients):
        name, data, mime = ce.render(t, fmt)
        path = tmp_path / f"{i}-{name}"
        path.write_bytes(data)
        out = extract_file(path, file_id=f"f{i}", category="lab", mime=mime, file_name=name)
        got = {ce._norm(r.test): r for r in out.lab_rows}
        truth = {ce._norm(n): (v, f) for n, v, _u, f in t.labs}
        got_n, want_n = got_n + len(got), want_n + len(truth)
        for key, (value, flag) in truth.items():
            row = got.get(key)
            if row is None or row.numeric is None:
                continue
            if ce.value_matches(row.numeric, value):
                tp += 1
            if flag in ce.FLAG_WORDS:
                judged += 1
                right += row.flag == ce.FLAG_WORDS[flag]
        # The header "Patient: <name>  Age/Sex: ..." is identity, never a lab row.
        parts = [p for p in t.name.split() if len(p) >= 3]
        for r in out.lab_rows:
            row_text = f"{r.test} {r.value} {r.unit or ''}"
            assert not any(re.search(rf"\b{re.escape(p)}\b", row_text) for p in parts), r
    precision, recall = tp / max(got_n, 1), tp / max(want_n, 1)
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    print(f"\n[clinosim] {fmt}: {want_n} results, {got_n} rows, precision {precision:.2f}, "
          f"recall {recall:.2f}, F1 {f1:.2f}, H/L direction {right}/{judged}")
    assert f1 >= GOAL_F1[fmt]
    assert judged == 0 or right / judged >= GOAL_F1[fmt]
