"""Clinical evaluation (issue 9): synthetic inpatients from a public generator (clinosim,
from the package registry; not written by this team) rendered as CSV, text-PDF and
scanned-image-PDF lab reports, analysed by a real server process with the configured model,
scored against the generator's ground truth.

Per case and in total it prints: failed cases, abstained stages, junk fields stored,
lab-row precision/recall, direction accuracy, abnormal rows missing from key_findings,
ungrounded claims stored, identity leaks, ICD-10 code/description disagreements, ICD-10
category match with the known condition, stored diagnoses no fact supports, evidence items
that are not a fact's own text, codes withheld (null) with their reason, seconds per case,
and the model's token counts per case (prompt tokens it had to evaluate -- not reused
from the KV cache -- and tokens it wrote; read from the server's own stage records, so
they do not depend on how loaded the machine is). Nothing is committed as an
expected output: the set is generated on every run with its ground truth.

Usage: .venv/bin/python bench/clinical_eval.py [--patients 2] [--diseases a,b]
       [--formats csv,pdf,scan] [--model PATH] [--remote-url URL]
Needs the bench extra: pip install clinosim (a dev/bench dependency, never shipped).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import docfactory as df  # noqa: E402  (PDF and scan renderers of the test suite)
from bench.load import free_port  # noqa: E402
from medmitra.clinical import coding, junk  # noqa: E402
from medmitra.clinical.grounding import Grounder  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DISEASES = ("bacterial_pneumonia", "urinary_tract_infection", "acute_mi")
FORMATS = ("csv", "pdf", "scan")
# Model-written fields scored for junk (the facts and copied fields are not).
MODEL_SECTIONS = ("soap_note", "primary_diagnosis", "differential_diagnoses",
                  "investigation_recommendations", "treatment_recommendations")


# ----------------------------------------------------------------------- the data set

@dataclass
class Truth:
    name: str
    age: int
    sex: str
    icd: str                          # the generator's admission diagnosis code
    disease: str
    labs: list[tuple[str, float, str, str]] = field(default_factory=list)  # name, value, unit, flag


def generate(diseases: list[str], per_disease: int, seed: int) -> list[Truth]:
    logging.disable(logging.CRITICAL)   # the generator logs every nursing document
    from clinosim.api import SimulatorConfig, run_forced
    from clinosim.types.config import ForcedScenario

    out: list[Truth] = []
    for i, disease in enumerate(diseases):
        ds = run_forced(ForcedScenario(disease_id=disease, count=per_disease),
                        SimulatorConfig(random_seed=seed + i))
        for p in ds.patients:
            first: dict[str, tuple[str, float, str, str]] = {}
            for r in sorted(p.lab_results, key=lambda r: r.result_datetime):
                if r.lab_name not in first and isinstance(r.value, (int, float)):
                    first[r.lab_name] = (r.lab_name, float(r.value), r.unit or "",
                                         (r.flag or "").upper())
            name = p.patient.name.display_name
            out.append(Truth(name=name, age=int(p.patient.age), sex=p.patient.sex,
                             icd=p.clinical_diagnosis.admission_diagnosis_code or "",
                             disease=disease, labs=list(first.values())))
    logging.disable(logging.NOTSET)
    return out


def _num(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".") if x != int(x) else str(int(x))


def render(t: Truth, fmt: str) -> tuple[str, bytes, str]:
    header = [f"Patient: {t.name}   Age/Sex: {t.age}/{t.sex}", "ADMISSION LABORATORY REPORT"]
    if fmt == "csv":
        rows = ["Test,Result,Unit,Flag"] + [f"{n},{_num(v)},{u},{f}" for n, v, u, f in t.labs]
        return "labs.csv", ("\n".join(rows) + "\n").encode(), "text/csv"
    lines = [f"{n} {_num(v)} {u} {f}".strip() for n, v, u, f in t.labs]
    if fmt == "pdf":
        return "labs.pdf", df.text_pdf(header + lines), "application/pdf"
    return "labs-scan.pdf", df.scanned_pdf(header + [ln.replace(" ", "\t", 1) for ln in lines]),\
        "application/pdf"


# ----------------------------------------------------------------------- the server

class Server:
    def __init__(self, tmp: Path, model: Path | None, remote_url: str | None):
        self.data = tmp / "data"
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEDMITRA_")}
        env.update({"MEDMITRA_STORAGE_DATA_DIR": str(self.data),
                    "MEDMITRA_SERVER_PORT": str(port), "MEDMITRA_LLM_WORKERS": "1",
                    "MEDMITRA_LOG_LEVEL": "WARNING"})
        if remote_url:
            env["MEDMITRA_LLM_REMOTE_URL"] = remote_url
        else:
            env["MEDMITRA_LLM_MODEL_PATH"] = str(model)
        self.proc = subprocess.Popen([sys.executable, "-m", "medmitra", "serve"], cwd=ROOT,
                                     env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).json().get(
                        "model", {}).get("state") == "ready":
                    break
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.2)
        else:
            self.stop()
            raise SystemExit("the server did not get ready")
        token = subprocess.run([sys.executable, "-m", "medmitra", "token", "create",
                                "--user-id", str(uuid.uuid4()), "--data-dir", str(self.data)],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout
        self.client = httpx.Client(base_url=self.url, timeout=60,
                                   headers={"Authorization": f"Bearer {token.strip()}"})

    def analyse(self, t: Truth, file: tuple[str, bytes, str], timeout_s: float) -> dict:
        r = self.client.post("/cases/create_case", files=[("lab_files", file)], data={
            "patient_name": t.name, "patient_age": str(t.age),
            "patient_gender": {"F": "female", "M": "male"}.get(t.sex, "other"),
            "case_summary": f"{t.name} admitted for evaluation."})
        r.raise_for_status()
        cid = r.json()["case"]["case_id"]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            body = self.client.get(f"/cases/cases/{cid}").json()
            if body["case"]["status"] != "processing":
                return body
            time.sleep(0.5)
        return body

    def tokens(self, case_id: str) -> dict:
        """The stage records of the case's newest insights (the server's SQLite file)."""
        import sqlite3
        db = sqlite3.connect(f"file:{self.data / 'medmitra.sqlite3'}?mode=ro", uri=True,
                             timeout=30)
        try:
            row = db.execute("SELECT i.stages FROM ai_insights i JOIN cases c ON c.id = "
                             "i.case_id WHERE c.case_id = ? ORDER BY i.id DESC LIMIT 1",
                             (case_id,)).fetchone()
        finally:
            db.close()
        stages = json.loads(row[0]) if row else []
        return {"prompt_tok": sum(s.get("prompt_tokens", 0) - s.get("cached_tokens", 0)
                                  for s in stages),
                "gen_tok": sum(s.get("completion_tokens", 0) for s in stages)}

    def stop(self) -> None:
        try:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            self.proc.kill()


# ----------------------------------------------------------------------- scoring

def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


# The generator's H/L markers as the pipeline's lab flags.
FLAG_WORDS = {"H": "high", "L": "low"}


def value_matches(read: float, truth: float) -> bool:
    """A lab value read back is the generator's: equal within the 2 decimals ``_num``
    prints (the rule every scorer of lab rows here uses)."""
    return abs(read - truth) <= 1e-6 * max(1.0, abs(truth)) + 0.01


def score(t: Truth, body: dict, seconds: float) -> dict:
    s = {"failed": int(body["case"]["status"] != "completed"), "seconds": round(seconds, 1)}
    ins = body.get("insights") or {}
    if s["failed"] or not ins:
        return s | {"error": (body.get("analysis") or {}).get("error")}
    s["abstained"] = sum(1 for v in ins["stages"].values() if v["status"] == "abstained")
    # supporting_evidence is the cited facts' own text (scored as evidence_not_fact below).
    skip = ("icd_code", "urgency", "icd_reason", "supporting_evidence")
    s["junk"] = sum(1 for sec in MODEL_SECTIONS for k, v in junk.text_fields(ins[sec], sec)
                    if v and v != "Not available." and k not in skip
                    and junk.junk_reason(v, k) is not None)
    truth = {_norm(n): (v, f) for n, v, _u, f in t.labs}
    got = {_norm(r["analyte"]): r for r in ins["labs"]}
    tp = sum(1 for k, r in got.items() if k in truth and r["numeric"] is not None
             and value_matches(r["numeric"], truth[k][0]))
    s["precision"] = tp / len(got) if got else 0.0
    s["recall"] = tp / len(truth) if truth else 1.0
    # The generator prints no reference ranges: a row it calls normal can only be
    # "unknown" here (nothing to judge it by), so direction is scored on its H/L rows.
    judged = [(got[k]["flag"], FLAG_WORDS[f]) for k, (_v, f) in truth.items() if k in got
              and f in FLAG_WORDS]
    s["direction_acc"] = (sum(a == b for a, b in judged) / len(judged)) if judged else 1.0
    kf = " | ".join(ins["case_summary"]["key_findings"])
    s["abnormal_missing"] = sum(1 for r in ins["labs"] if r["flag"] in ("low", "high")
                                and f"{r['analyte']} {r['value']}" not in kf)
    files = body.get("files") or []
    texts = [ins["case_summary"].get("doctor_notes") or ""] + [f.get("text_data") or ""
                                                               for f in files]
    from medmitra.clinical.labs import make_row
    rows = [make_row(r["analyte"], r["value"], r["unit"], r["range"], r["lab_flag"])
            for r in ins["labs"]]
    g = Grounder(rows, texts + [str(t.age)], has_radiology=False)
    s["ungrounded"] = sum(len(g.problems(v)[1]) for sec in MODEL_SECTIONS
                          for k, v in junk.text_fields(ins[sec], sec)
                          if v and k not in skip)
    # Model-written text only: patient_context and doctor_notes are the case's own fields.
    model_text = json.dumps({k: v for k, v in ins.items() if k != "case_summary"}) + \
        json.dumps({k: v for k, v in ins["case_summary"].items()
                    if k not in ("patient_context", "doctor_notes")}) + \
        json.dumps([f.get("ai_summary") for f in files])
    parts = [p for p in t.name.split() if len(p) >= 3]
    s["identity_leaks"] = sum(1 for p in parts
                              if re.search(rf"(?<![A-Za-z0-9]){re.escape(p)}(?![A-Za-z0-9])",
                                           model_text))
    # Diagnoses stored as findings: each must cite an informative fact (an abnormal row,
    # a sentence of the notes or the files) or be named in the case's text.
    from medmitra.clinical.identity import Redactor
    from medmitra.pipeline.prompts import Fact
    abnormal = {labs_render(r) for r in rows if r.abnormal}
    normal = {labs_render(r) for r in rows if not r.abnormal}
    # The facts the model saw had the patient's name replaced: so does the evidence.
    sources = Redactor.for_case(t.name, texts).redact(" ".join(" ".join(x.split())
                                                              for x in texts), document=False)

    def cited(evidence: list[str]) -> list:
        return [Fact("", e, e in abnormal or (e not in normal and e in sources),
                     lab=e in abnormal) for e in evidence]
    stored = [(ins["primary_diagnosis"]["primary_diagnosis"],
               ins["primary_diagnosis"].get("supporting_evidence") or [])] + \
        [(d["condition"], d.get("supporting_evidence") or []) for d in
         ins["differential_diagnoses"]]
    stored = [(c, e) for c, e in stored if c and c != "Not available."]
    s["dx_unsupported"] = sum(1 for c, e in stored if g.diagnosis_problem(c, cited(e)))
    s["evidence_not_fact"] = sum(1 for _c, e in stored for x in e
                                 if x not in abnormal and x not in normal and x not in sources)
    pd = ins["primary_diagnosis"]
    s["dx"] = (pd["primary_diagnosis"] or "")[:40].replace(" ", "_")
    code = pd.get("icd_code")
    s["icd_disagree"] = int(bool(code) and coding.agreement(pd["primary_diagnosis"], code)
                            is not None)
    s["icd_category_match"] = int(bool(code) and code[:3] == t.icd[:3])
    s["icd_code"] = code
    s["icd_null_reason"] = int(not code and bool(pd.get("icd_reason")))
    return s


def labs_render(row) -> str:
    from medmitra.clinical.labs import render_row
    return render_row(row)


# ----------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", type=int, default=1, help="patients per disease")
    ap.add_argument("--diseases", default=",".join(DEFAULT_DISEASES))
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--remote-url", default=None)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--case-timeout", type=float, default=900)
    ap.add_argument("--dump", type=Path, default=None, metavar="DIR",
                    help="also write each case's GET /cases/cases/{id} answer to DIR, one "
                         "JSON file per case, to read the outputs")
    args = ap.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f in FORMATS]
    started = time.monotonic()
    truths = generate(args.diseases.split(","), args.patients, args.seed)
    print(f"generated {len(truths)} patient(s) with clinosim in "
          f"{time.monotonic() - started:.0f} s; formats: {', '.join(formats)}")
    results: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="medmitra-eval-") as tmp:
        server = Server(Path(tmp), args.model, args.remote_url)
        try:
            for t in truths:
                for fmt in formats:
                    t0 = time.monotonic()
                    body = server.analyse(t, render(t, fmt), args.case_timeout)
                    s = score(t, body, time.monotonic() - t0)
                    s |= server.tokens(body["case"]["case_id"])
                    label = f"{t.disease}/{fmt}"
                    results.append((label, s))
                    if args.dump is not None:
                        args.dump.mkdir(parents=True, exist_ok=True)
                        (args.dump / f"{t.disease}-{fmt}.json").write_text(
                            json.dumps(body, indent=1, ensure_ascii=False), encoding="utf-8")
                    print(f"{label:40s} " + " ".join(f"{k}={v:.2f}" if isinstance(v, float)
                                                     else f"{k}={v}" for k, v in s.items()),
                          flush=True)
        finally:
            server.stop()
    done = [s for _, s in results if not s["failed"]]
    print("\nTOTAL over", len(results), "case(s)")
    print(f"  failed cases           {sum(s['failed'] for _, s in results)}")
    for key in ("abstained", "junk", "abnormal_missing", "ungrounded", "identity_leaks",
                "icd_disagree", "icd_category_match", "icd_null_reason", "dx_unsupported",
                "evidence_not_fact"):
        print(f"  {key:22s} {sum(s.get(key, 0) for s in done)}")
    for fmt in formats:
        rs = [s for label, s in results if label.endswith("/" + fmt) and not s["failed"]]
        if rs:
            p = sum(s["precision"] for s in rs) / len(rs)
            r = sum(s["recall"] for s in rs) / len(rs)
            f1 = 2 * p * r / (p + r) if p + r else 0.0
            acc = sum(s["direction_acc"] for s in rs) / len(rs)
            print(f"  lab rows {fmt:5s} precision {p:.2f} recall {r:.2f} F1 {f1:.2f} "
                  f"direction accuracy {acc:.2f}")
    secs = [s["seconds"] for _, s in results]
    print(f"  seconds per case       {sum(secs) / len(secs):.1f} (max {max(secs):.1f})")
    for key in ("prompt_tok", "gen_tok"):
        xs = [s.get(key, 0) for _, s in results]
        print(f"  {key:22s} {sum(xs) / len(xs):.0f} per case")
    return 0


if __name__ == "__main__":
    sys.exit(main())
