"""Benchmark of the ICD-10-CM code table (medmitra.clinical.icd10).

    .venv/bin/python bench/icd10_bench.py [--repeat 5]

Each figure is measured in a fresh Python process (so nothing is cached in memory from
a previous step), --repeat times, and printed as median [min-max]:
- ready: from ``import`` to the first answered lookup, for the prebuilt SQLite table and
  for the baseline, the simple-icd-10-cm package the table is built from (it parses its
  XML at import);
- per call: ``is_valid``/``title`` of a code, ``info``, and ``search`` with common
  diagnosis phrases and single very common words ("fracture", "disease"), against the
  baseline's ``is_valid_item`` + ``get_description``.
The baseline needs the test extras (scripts/setup.sh --test).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PHRASES = ["Hypertension", "Type 2 diabetes mellitus", "Cardiovascular disease",
           "Community acquired pneumonia", "Chronic obstructive pulmonary disease",
           "Acute myocardial infarction", "Urinary tract infection", "Iron deficiency anemia",
           "Gastroesophageal reflux disease", "Fracture of femur"]
COMMON = ["fracture", "disease"]
CODES = ["E11.9", "e119", "S52.501A", "I10", "E11.99999", "J18.9", "T14.90XA", "Z99"]

# Seconds per call of fn over args, in both child processes.
PER_CALL = r"""
def per_call(fn, args, rounds):
    t = time.perf_counter()
    for _ in range(rounds):
        for a in args:
            fn(a)
    return (time.perf_counter() - t) / (rounds * len(args))
"""

CHILD_TABLE = r"""
import json, sys, time
t0 = time.perf_counter()
from medmitra.clinical import icd10
assert icd10.title("E11.9")
ready = time.perf_counter() - t0
{per_call}phrases, common, codes = json.loads(sys.argv[1])
print(json.dumps({
    "ready": ready,
    "lookup": per_call(lambda c: icd10.is_valid(c) and icd10.title(c), codes, 200),
    "info": per_call(icd10.info, codes, 200),
    "search phrase": per_call(icd10.search, phrases, 10),
    "search common word": per_call(icd10.search, common, 5),
    "search phrase, any word": per_call(
        lambda p: icd10.search(p, 5, require_all=False), phrases, 5),
}))
""".replace("{per_call}", PER_CALL)

CHILD_BASELINE = r"""
import json, sys, time, warnings
t0 = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import simple_icd_10_cm as cm
assert cm.get_description("E11.9")
ready = time.perf_counter() - t0
{per_call}phrases, common, codes = json.loads(sys.argv[1])
def lookup(c):
    c = c.strip().upper()
    return cm.is_valid_item(c) and cm.get_description(c)
print(json.dumps({"ready": ready, "lookup": per_call(lookup, codes, 200)}))
""".replace("{per_call}", PER_CALL)


def _run(child: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", child, json.dumps([PHRASES, COMMON, CODES])],
                         cwd=ROOT, capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout)


def _fmt(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    return f"{statistics.median(ms):9.3f} ms [{ms[0]:.3f}-{ms[-1]:.3f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    table: dict[str, list[float]] = {}
    base: dict[str, list[float]] = {}
    for _ in range(args.repeat):      # interleaved, so both see the same machine load
        for key, value in _run(CHILD_TABLE).items():
            table.setdefault(key, []).append(value)
        try:
            for key, value in _run(CHILD_BASELINE).items():
                base.setdefault(key, []).append(value)
        except subprocess.CalledProcessError:
            pass
    print(f"ICD-10-CM table, {args.repeat} fresh processes each, median [min-max]")
    print(f"{'':26} {'prebuilt SQLite table':>32} {'simple-icd-10-cm (baseline)':>32}"
          "  baseline/table")
    for key, values in table.items():
        b = base.get(key)
        ratio = f"{statistics.median(b) / statistics.median(values):10.3g}" if b else ""
        print(f"{key:26} {_fmt(values):>32} {_fmt(b) if b else '-':>32}  {ratio}")
    if not base:
        print("(baseline not measured: simple-icd-10-cm is not installed; "
              "scripts/setup.sh --test installs it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
