"""Analysis benchmark (issue: offline AI analysis). Prints, for the default model:

1. generation speed: raw llama-cpp-python tokens/s (same model, threads, chat API and
   sampling), without and with a stage's JSON-schema grammar, vs the tokens/s achieved
   inside a full case analysis (generation time = stage time minus prompt-reading time, as
   llama.cpp reports it), their ratio (goal >= 0.9), and the grammar's own cost (time
   outside llama_decode, with vs without the grammar);
2. wall time of one full analysis of a 3-file case (text PDF, CSV, DICOM) and its split by
   stage, with prompt/cached/completion tokens (goal <= 60 s on 2 cores);
3. p99 latency of GET /health while 2 analyses run vs idle (goal <= 3x idle);
4. throughput in cases/hour with 1 and with 2 workers.

Every figure comes from a real server process started here (python -m medmitra serve).
Usage: .venv/bin/python bench/analysis_bench.py [--cases 4] [--skip-throughput]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import docfactory as df  # noqa: E402

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp: Path, workers: int, threads: int = 0):
        self.data = tmp / f"data-w{workers}-{uuid.uuid4().hex[:6]}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEDMITRA_")}
        env.update({"MEDMITRA_STORAGE_DATA_DIR": str(self.data),
                    "MEDMITRA_SERVER_PORT": str(self.port), "MEDMITRA_LLM_WORKERS": str(workers),
                    "MEDMITRA_LLM_THREADS": str(threads), "MEDMITRA_LOG_LEVEL": "WARNING",
                    "MEDMITRA_LLM_MODEL_PATH": str(MODEL)})
        self.proc = subprocess.Popen([sys.executable, "-m", "medmitra", "serve"], cwd=ROOT,
                                     env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                h = httpx.get(self.url + "/health", timeout=2).json()
                if h.get("model", {}).get("state") == "ready":
                    break
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.1)
        token = subprocess.run([sys.executable, "-m", "medmitra", "token", "create",
                                "--user-id", str(uuid.uuid4()), "--data-dir", str(self.data)],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout
        self.client = httpx.Client(base_url=self.url, timeout=60,
                                   headers={"Authorization": f"Bearer {token.strip()}"})

    def create(self, files: list) -> str:
        r = self.client.post("/cases/create_case", files=files, data={
            "patient_name": "Bench Patient", "patient_age": "58", "patient_gender": "female",
            "case_summary": "Three weeks of fatigue, pallor and breathlessness on stairs."})
        r.raise_for_status()
        return r.json()["case"]["case_id"]

    def wait_all(self, ids: list[str], timeout_s: float = 1800) -> None:
        deadline = time.monotonic() + timeout_s
        pending = set(ids)
        while pending and time.monotonic() < deadline:
            for cid in list(pending):
                if self.client.get(f"/cases/cases/{cid}").json()["case"]["status"] != "processing":
                    pending.discard(cid)
            time.sleep(0.2)
        if pending:
            raise SystemExit(f"{len(pending)} case(s) did not finish in {timeout_s} s")

    def stages(self, case_id: str) -> list[dict]:
        db = sqlite3.connect(self.data / "medmitra.sqlite3")
        row = db.execute('SELECT i."stages" FROM "ai_insights" i JOIN "cases" c ON c."id" = '
                         'i."case_id" WHERE c."case_id" = ? ORDER BY i."id" DESC LIMIT 1',
                         (case_id,)).fetchone()
        db.close()
        return json.loads(row[0]) if row else []

    def stop(self) -> None:
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def three_files() -> list:
    return [("lab_files", ("cbc.pdf", df.text_pdf(df.DEFAULT_LAB_LINES), "application/pdf")),
            ("lab_files", ("cbc.csv", df.lab_csv(), "text/csv")),
            ("radiology_files", ("chest.dcm", df.dicom(), "application/dicom"))]


def raw_generation(threads: int, rounds: int = 3, n_tokens: int = 200) -> dict[str, dict]:
    """Plain llama-cpp-python generation with the same model, threads, chat API, sampling
    (temperature, seed, repeat penalty) and streaming as the analysis, without and with
    the JSON-schema grammar of a real stage (case summary); the two interleaved, ``rounds``
    times. Tokens/s = completion tokens over the call's wall time minus its prompt reading
    (decoding + sampling), measured as inside the analysis. ``outside_decode`` is the share
    of that time spent outside llama_decode (llama.cpp's own eval timer): sampling, the
    grammar, Python; the grammar's own cost is its increase over the plain run."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as medmitra.llm.llama does
    import llama_cpp
    from llama_cpp import LlamaGrammar

    from medmitra.llm.llama import N_BATCH_TOKENS
    from medmitra.pipeline import schemas

    llm = llama_cpp.Llama(model_path=str(MODEL), n_ctx=2048, n_threads=threads, seed=1,
                          n_batch=N_BATCH_TOKENS, verbose=False)
    grammar = LlamaGrammar.from_json_schema(json.dumps(schemas.CASE_SUMMARY), verbose=False)
    messages = [{"role": "user", "content": "Summarise this case as JSON. A 58-year-old "
                 "woman with three weeks of fatigue, pallor and breathlessness on stairs; "
                 "haemoglobin 8.1 g/dL (low), ferritin 6 ng/mL (low)."}]
    out: dict[str, dict] = {"plain": {"tps": [], "outside": []},
                            "grammar": {"tps": [], "outside": []}}
    for _ in range(rounds):
        for name, g in (("plain", None), ("grammar", grammar)):
            llm.reset()
            llama_cpp.llama_perf_context_reset(llm.ctx)
            started = time.perf_counter()
            tokens = 0
            for chunk in llm.create_chat_completion(
                    messages=messages, grammar=g, max_tokens=n_tokens, temperature=0.2,
                    seed=7, repeat_penalty=1.1, stream=True):
                if (chunk["choices"][0].get("delta") or {}).get("content"):
                    tokens += 1
            perf = llama_cpp.llama_perf_context(llm.ctx)
            gen_s = time.perf_counter() - started - perf.t_p_eval_ms / 1000.0
            out[name]["tps"].append(tokens / gen_s)
            out[name]["outside"].append(1.0 - perf.t_eval_ms / 1000.0 / gen_s)
    llm.close()
    return {name: {"tps": statistics.median(v["tps"]), "tps_all": v["tps"],
                   "outside_decode": statistics.median(v["outside"])}
            for name, v in out.items()}


def latency_p99(client: httpx.Client, n: int = 300) -> tuple[float, float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.get("/health").raise_for_status()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=4, help="cases per throughput run")
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="medmitra-abench-"))
    print(f"machine: {cores} cores; model {MODEL.name}")
    try:
        # -- 1 + 2: one full analysis, 1 worker with all cores --------------------------
        srv = Server(tmp, workers=1)
        t0 = time.perf_counter()
        cid = srv.create(three_files())
        srv.wait_all([cid])
        wall = time.perf_counter() - t0
        body = srv.client.get(f"/cases/cases/{cid}").json()
        stages = srv.stages(cid)
        srv.stop()
        print(f"\nfull analysis of a 3-file case: {wall:.1f} s wall "
              f"(status {body['case']['status']}; goal <= 60 s)")
        print(f"{'stage':20} {'s':>7} {'prompt':>7} {'cached':>7} {'gen':>5} {'read s':>7}")
        gen_tokens = gen_time = 0.0
        for s in stages:
            print(f"{s['stage']:20} {s['duration_s']:7.2f} {s['prompt_tokens']:7d} "
                  f"{s.get('cached_tokens', 0):7d} {s['completion_tokens']:5d} "
                  f"{s.get('prompt_eval_s', 0.0):7.2f}")
            if s["completion_tokens"]:
                gen_tokens += s["completion_tokens"]
                gen_time += s["duration_s"] - s.get("prompt_eval_s", 0.0)
        inside = gen_tokens / gen_time if gen_time else 0.0
        raw = raw_generation(threads=cores)
        plain, gram = raw["plain"], raw["grammar"]
        print(f"\ngeneration (raw: median of 3 interleaved runs each):")
        print(f"  raw llama-cpp-python, no grammar:   {plain['tps']:6.1f} tok/s "
              f"({' '.join(f'{x:.1f}' for x in plain['tps_all'])}), "
              f"{100 * plain['outside_decode']:.0f}% of it outside llama_decode")
        print(f"  raw, same grammar and sampling:     {gram['tps']:6.1f} tok/s "
              f"({' '.join(f'{x:.1f}' for x in gram['tps_all'])}), "
              f"{100 * gram['outside_decode']:.0f}% of it outside llama_decode")
        print(f"  inside the analysis:                {inside:6.1f} tok/s")
        print(f"  ratio inside / raw with grammar {inside / gram['tps']:.2f} (goal >= 0.9); "
              f"inside / raw without {inside / plain['tps']:.2f}; grammar's own cost: "
              f"{100 * (gram['outside_decode'] - plain['outside_decode']):.0f}% of "
              f"generation time")

        # -- 3: /health latency idle vs 2 analyses running ------------------------------
        srv = Server(tmp, workers=2)
        idle50, idle99 = latency_p99(srv.client)
        ids = [srv.create(three_files()) for _ in range(2)]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            states = [srv.client.get(f"/cases/cases/{i}").json()["analysis"]["state"]
                      for i in ids]
            if states.count("running") == 2:
                break
            time.sleep(0.05)
        busy50, busy99 = latency_p99(srv.client)
        srv.wait_all(ids)
        srv.stop()
        print(f"\nGET /health: idle p50 {idle50:.2f} ms p99 {idle99:.2f} ms; while 2 analyses "
              f"run p50 {busy50:.2f} ms p99 {busy99:.2f} ms; p99 ratio {busy99 / idle99:.2f} "
              f"(goal <= 3)")

        # -- 4: throughput ----------------------------------------------------------------
        if not args.skip_throughput:
            print()
            for workers in (1, 2):
                srv = Server(tmp, workers=workers)
                t0 = time.perf_counter()
                ids = [srv.create(three_files()) for _ in range(args.cases)]
                srv.wait_all(ids)
                took = time.perf_counter() - t0
                srv.stop()
                print(f"throughput, {workers} worker(s) x {max(1, cores // workers)} thread(s): "
                      f"{args.cases} cases in {took:.0f} s = {args.cases * 3600 / took:.0f} "
                      f"cases/hour")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
