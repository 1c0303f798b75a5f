"""Benchmark of the ICD-10-CM code table (medmitra.clinical.icd10).

    .venv/bin/python bench/icd10_bench.py [--repeat 5]

Each figure is measured in a fresh Python process (so nothing is cached in memory from
a previous step), --repeat times, and printed as median [min-max]:
- ready: from ``import`` to the first answered lookup (wall and CPU time), for the
  prebuilt SQLite table and for the baseline, the simple-icd-10-cm package the table is
  built from (it parses its XML at import);
- per call: ``is_valid``/``title`` of a code, ``info``, and ``search`` with common
  diagnosis phrases and single very common words ("fracture", "disease"), against the
  baseline's ``is_valid_item`` + ``get_description``;
- search latency, each call timed on its own, p50/p99/max over all calls of all
  processes (goal: <= 5 ms per lookup), wall time and the calling thread's CPU time
  (which a busy machine inflates less), for
  - common words: single words that occur in thousands of titles and index terms;
  - real diagnosis phrases: the diagnosis and differential names of clinosim's disease
    reference data (a public synthetic-patient generator; nobody here wrote them), each
    with the shorter searches ``clinical.coding.candidates`` falls back to (words left out
    from the front: "acute tubular necrosis", "tubular necrosis", "necrosis"); without
    clinosim installed, the built-in phrase list above;
  - the same phrases with ``require_all=False`` (any word).
The baseline and clinosim need the test extras (scripts/setup.sh --test).
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
# Words found in more than a thousand titles and index terms each, and diagnosis head
# nouns a shortened search ends with (see clinical.coding.candidates).
COMMON_WORDS = ["disease", "fracture", "pain", "injury", "disorder", "infection",
                "neoplasm", "ulcer", "syndrome", "poisoning", "failure", "hemorrhage", "burn",
                "chronic", "acute", "malignant", "congenital", "pregnancy", "complication",
                "laceration", "unspecified", "other", "left", "right", "lower", "upper"]
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

# [wall seconds, CPU seconds of the thread] of each call of fn over args, rounds times
# over (so first calls count too). CPU time leaves out the waits for a busy machine's CPU.
SAMPLES = r"""
def samples(fn, args, rounds):
    out = []
    for _ in range(rounds):
        for a in args:
            t, c = time.perf_counter(), time.thread_time()
            fn(a)
            out.append([time.perf_counter() - t, time.thread_time() - c])
    return out
"""

CHILD_TABLE = r"""
import json, sys, time
t0, c0 = time.perf_counter(), time.process_time()
from medmitra.clinical import icd10
assert icd10.title("E11.9")
ready, ready_cpu = time.perf_counter() - t0, time.process_time() - c0
{per_call}{samples}phrases, common, codes, words, real = json.loads(sys.argv[1])
print(json.dumps({
    "ready": ready,
    "ready, CPU time": ready_cpu,
    "lookup": per_call(lambda c: icd10.is_valid(c) and icd10.title(c), codes, 200),
    "info": per_call(icd10.info, codes, 200),
    "search phrase": per_call(icd10.search, phrases, 10),
    "search common word": per_call(icd10.search, common, 5),
    "search phrase, any word": per_call(
        lambda p: icd10.search(p, 5, require_all=False), phrases, 5),
    "samples": {
        "common words": samples(icd10.search, words, 10),
        "diagnosis phrases": samples(lambda p: icd10.search(p, 20), real, 2),
        "diagnosis phrases, any word": samples(
            lambda p: icd10.search(p, 5, require_all=False), real, 1),
    },
}))
""".replace("{per_call}", PER_CALL).replace("{samples}", SAMPLES)

CHILD_BASELINE = r"""
import json, sys, time, warnings
t0, c0 = time.perf_counter(), time.process_time()
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import simple_icd_10_cm as cm
assert cm.get_description("E11.9")
ready, ready_cpu = time.perf_counter() - t0, time.process_time() - c0
{per_call}phrases, common, codes, _words, _real = json.loads(sys.argv[1])
def lookup(c):
    c = c.strip().upper()
    return cm.is_valid_item(c) and cm.get_description(c)
print(json.dumps({"ready": ready, "ready, CPU time": ready_cpu, "lookup": per_call(lookup, codes, 200)}))
""".replace("{per_call}", PER_CALL)


def real_phrases() -> tuple[list[str], str]:
    """The diagnosis phrases of clinosim's disease reference data with the shortened
    searches clinical.coding.candidates makes of them, and where they came from."""
    try:
        import clinosim
        import yaml
    except ImportError:
        return PHRASES, "built-in list (clinosim not installed)"
    names: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "name" and isinstance(v, str):
                    names.add(v.replace("_", " "))   # complications: "wound_infection"
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    data = Path(clinosim.__file__).parent / "modules" / "disease" / "reference_data"
    for path in sorted(data.glob("*.yaml")):
        walk(yaml.safe_load(path.read_text()))
    from medmitra.clinical.coding import specific_words, words as coding_words
    searches: dict[str, None] = {}
    for name in sorted(names):
        words = coding_words(name)
        for start in range(len(words)):
            rest = " ".join(words[start:])
            if not specific_words(rest):
                break
            searches[rest] = None
    return list(searches), (f"clinosim {clinosim.__version__}: {len(names)} names, "
                            f"{len(searches)} searches")


def _run(child: str, real: list[str]) -> dict:
    args = json.dumps([PHRASES, COMMON, CODES, COMMON_WORDS, real])
    out = subprocess.run([sys.executable, "-c", child, args],
                         cwd=ROOT, capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout)


def _pct(values: list[float], q: float) -> float:
    ms = sorted(values)
    return ms[min(len(ms) - 1, int(q * len(ms)))] * 1000


def _fmt(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    return f"{statistics.median(ms):9.3f} ms [{ms[0]:.3f}-{ms[-1]:.3f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    real, real_source = real_phrases()
    table: dict[str, list[float]] = {}
    base: dict[str, list[float]] = {}
    samples: dict[str, list[list[float]]] = {}
    for _ in range(args.repeat):      # interleaved, so both see the same machine load
        for key, value in _run(CHILD_TABLE, real).items():
            if key == "samples":
                for name, values in value.items():
                    samples.setdefault(name, []).extend(values)
            else:
                table.setdefault(key, []).append(value)
        try:
            for key, value in _run(CHILD_BASELINE, real).items():
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
    print(f"\nsearch, each call timed (goal <= 5 ms); phrases: {real_source}")
    print(f"{'':28} {'calls':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'> 5 ms':>7}"
          f"   CPU: {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, pairs in samples.items():
        wall = [w for w, _c in pairs]
        cpu = [c for _w, c in pairs]
        print(f"{name:28} {len(wall):6} {_pct(wall, .5):8.3f} {_pct(wall, .99):8.3f} "
              f"{max(wall) * 1000:8.3f} {sum(w > 0.005 for w in wall):7}        "
              f"{_pct(cpu, .5):8.3f} {_pct(cpu, .99):8.3f} {max(cpu) * 1000:8.3f}")
    if not base:
        print("(baseline not measured: simple-icd-10-cm is not installed; "
              "scripts/setup.sh --test installs it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
