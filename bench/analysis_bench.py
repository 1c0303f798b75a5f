"""Analysis benchmark (issue 13 items 5 and 6). Prints, for the default model:

1. wall time of one full analysis of a 3-file case (text PDF, CSV, DICOM) and its split by
   stage: prompt/cached/completion tokens, prompt-reading and generation seconds;
2. generation speed (``--part generation``): the model calls of one analysis of that case
   are recorded in-process, then replayed with the same prompts, grammar, sampling
   (temperature, seed, repeat penalty), n_ctx, n_batch and threads by raw
   llama-cpp-python without and with the grammar (the plain run capped at the grammar
   run's token count per call, so both generate the same number of tokens) and by the
   project's runtime in-process; interleaved, in each round, with one analysis of the
   same case by a real server, whose tokens/s come from the runtime's own generation
   timer. Prints the ratio inside-analysis / raw-with-grammar (goal >= 0.90) and the
   grammar's own cost in raw llama-cpp-python (ms/token with vs without it);
3. p99 latency of GET /health while 2 analyses run vs idle;
4. throughput (``--part throughput``) in cases/hour with 1 worker x all cores, 2
   workers x half the cores each, and the default ("auto", which chose 2 here), and the
   peak RSS of the server plus its model processes.

Lines to read: "RATIO" (item 5) and "THROUGHPUT" (item 6); every line shows the load.
Usage: .venv/bin/python bench/analysis_bench.py [--part all|analysis|generation|latency|
       throughput] [--rounds 3] [--calls N] [--cases 4] [--skip-throughput]
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
from load import free_port, wait_ready  # noqa: E402

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CASE = {"patient_name": "Bench Patient", "patient_age": "58", "patient_gender": "female",
        "case_summary": "Three weeks of fatigue, pallor and breathlessness on stairs."}


class Server:
    def __init__(self, tmp: Path, workers: int | str, threads: int = 0):
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
        try:
            wait_ready(self.url, self.proc)
            token = subprocess.run([sys.executable, "-m", "medmitra", "token", "create",
                                    "--user-id", str(uuid.uuid4()), "--data-dir",
                                    str(self.data)], cwd=ROOT, capture_output=True, text=True,
                                   check=True).stdout
        except BaseException:   # never leave the server behind (timeout, Ctrl-C)
            self.proc.kill()
            self.proc.wait()
            raise
        self.client = httpx.Client(base_url=self.url, timeout=60,
                                   headers={"Authorization": f"Bearer {token.strip()}"})

    def create(self, files: list) -> str:
        r = self.client.post("/cases/create_case", files=files, data=CASE)
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


def case_input():
    """The bench case (same patient fields and files as ``Server.create``), extracted
    in-process, for the runs that call the pipeline without the server."""
    from medmitra.pipeline.extract import extract_file
    from medmitra.pipeline.types import CaseInput

    folder = Path(tempfile.mkdtemp(prefix="medmitra-abench-files-"))
    files = []
    for i, (field, (name, data, mime)) in enumerate(three_files()):
        path = folder / name
        path.write_bytes(data)
        files.append(extract_file(path, file_id=f"f{i}", mime=mime, file_name=name,
                                  category="lab" if field == "lab_files" else "radiology"))
    shutil.rmtree(folder, ignore_errors=True)
    return CaseInput(case_id="bench", patient_name=CASE["patient_name"],
                     patient_age=int(CASE["patient_age"]),
                     patient_gender=CASE["patient_gender"],
                     doctor_notes=CASE["case_summary"], files=files)


def record_calls(threads: int) -> list[dict]:
    """Every model call of one analysis of the bench case (messages, schema, sampling),
    made in-process with the project's runtime: the prompts the raw runs replay. The
    pipeline is deterministic, so a server analysis of the same case sends the same ones
    (``main`` checks the prompt token counts)."""
    from medmitra.config import LLMSettings
    from medmitra.llm.llama import LlamaRuntime
    from medmitra.pipeline.stages import run_analysis

    llm = LLMSettings()
    rt = LlamaRuntime(MODEL, n_ctx=llm.n_ctx, threads=threads, seed=llm.seed)
    calls: list[dict] = []
    real = rt.complete_json

    def spy(messages, schema, **kw):
        text, usage = real(messages, schema, **kw)
        calls.append({"messages": messages, "schema": schema, "kw": kw,
                      "prompt_tokens": usage.prompt_tokens})
        return text, usage

    rt.complete_json = spy
    try:
        run_analysis(case_input(), rt, llm, progress=lambda s, x: None,
                     should_stop=lambda: False)
    finally:
        rt.close()
    return calls


class Replay:
    """The recorded calls replayed, one after another as in the analysis (so the KV prefix
    is reused the same way), by one of:

    - ``plain``: llama-cpp-python's create_chat_completion, streamed, no grammar;
    - ``grammar``: the same with the stage's grammar (the project's GBNF of the schema),
      llama-cpp-python's own sampler chain (grammar applied to the whole vocabulary);
    - ``runtime``: the project's LlamaRuntime.complete_json (in-process, no server).

    Same model file, n_ctx, n_batch, threads, temperature, seed, repeat penalty and token
    limit as the analysis. Generation time = call wall time minus prompt reading (llama.cpp's
    own prompt-eval timer), as the runtime reports it inside the analysis."""

    def __init__(self, mode: str, threads: int):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as medmitra.llm.llama does
        from medmitra.config import LLMSettings
        from medmitra.llm.llama import N_BATCH_TOKENS, LlamaRuntime

        self.mode = mode
        llm = LLMSettings()
        if mode == "runtime":
            self.rt = LlamaRuntime(MODEL, n_ctx=llm.n_ctx, threads=threads, seed=llm.seed)
        else:
            import llama_cpp
            self.llm = llama_cpp.Llama(model_path=str(MODEL), n_ctx=llm.n_ctx,
                                       n_threads=threads, seed=llm.seed,
                                       n_batch=N_BATCH_TOKENS, verbose=False)

    def run(self, calls: list[dict], caps: list[int] | None = None) -> dict:
        """``caps``: per-call token limits (the plain run stops where the grammar run of
        the same call stopped, so both generate the same number of tokens)."""
        tokens = 0
        gen_s = decode_s = 0.0
        per_call = []
        for i, c in enumerate(calls):
            if self.mode == "runtime":
                _, u = self.rt.complete_json(c["messages"], c["schema"], **c["kw"])
                tokens += u.completion_tokens
                gen_s += u.generate_s
                per_call.append(u.completion_tokens)
                continue
            import llama_cpp
            from llama_cpp import LlamaGrammar

            from medmitra.llm.llama import schema_grammar

            grammar = None
            if self.mode == "grammar":
                grammar = LlamaGrammar.from_string(schema_grammar(json.dumps(c["schema"])),
                                                   verbose=False)
            llama_cpp.llama_perf_context_reset(self.llm.ctx)
            started = time.perf_counter()
            n = 0
            for chunk in self.llm.create_chat_completion(
                    messages=c["messages"], grammar=grammar, stream=True,
                    max_tokens=caps[i] if caps else c["kw"]["max_tokens"],
                    temperature=c["kw"]["temperature"], seed=c["kw"]["seed"],
                    repeat_penalty=c["kw"]["repeat_penalty"]):
                if (chunk["choices"][0].get("delta") or {}).get("content"):
                    n += 1
            tokens += n
            per_call.append(n)
            perf = llama_cpp.llama_perf_context(self.llm.ctx)
            gen_s += time.perf_counter() - started - perf.t_p_eval_ms / 1000.0
            decode_s += perf.t_eval_ms / 1000.0
        return {"tokens": tokens, "gen_s": gen_s, "decode_s": decode_s, "per_call": per_call}

    def close(self) -> None:
        (self.rt if self.mode == "runtime" else self.llm).close()


def server_generation(tmp: Path) -> tuple[int, float, list[int], float]:
    """One analysis of the bench case by a real server (1 worker, default threads):
    (completion tokens, generation seconds as the runtime measured them, prompt tokens
    per stage, wall seconds)."""
    srv = Server(tmp, workers=1)
    try:
        t0 = time.perf_counter()
        cid = srv.create(three_files())
        srv.wait_all([cid])
        wall = time.perf_counter() - t0
        stages = srv.stages(cid)
    finally:
        srv.stop()
    tokens = sum(s.get("completion_tokens", 0) for s in stages)
    gen_s = sum(s.get("generate_s", 0.0) for s in stages)
    return tokens, gen_s, [s.get("prompt_tokens", 0) for s in stages], wall


def generation(tmp: Path, threads: int, rounds: int, n_calls: int) -> None:
    """Tokens/s inside an analysis vs raw llama-cpp-python on the same prompts, the runs
    interleaved ``rounds`` times; and the grammar's own cost."""
    calls = record_calls(threads)
    replayed = calls[:n_calls] if n_calls else calls
    print(f"\ngeneration: {len(calls)} model calls recorded, {len(replayed)} replayed; "
          f"{threads} thread(s); prompt tokens "
          f"{[c['prompt_tokens'] for c in replayed]}")
    modes = ("grammar", "plain", "runtime")
    replays = {m: Replay(m, threads) for m in modes}
    res: dict[str, list[dict]] = {m: [] for m in (*modes, "server")}
    try:
        for r in range(rounds):
            for m in modes:
                caps = res["grammar"][-1]["per_call"] if m == "plain" else None
                res[m].append(replays[m].run(replayed, caps))
            tokens, gen_s, _, wall = server_generation(tmp)
            res["server"].append({"tokens": tokens, "gen_s": gen_s, "decode_s": 0.0})
            print(f"  round {r + 1}: " + "  ".join(
                f"{m} {x[-1]['tokens'] / x[-1]['gen_s']:.1f}" for m, x in res.items())
                + f" tok/s   [{load()}]", flush=True)
    finally:
        for rep in replays.values():
            rep.close()

    def tps(m: str) -> float:
        return statistics.median(x["tokens"] / x["gen_s"] for x in res[m])

    def outside(m: str) -> float:
        return statistics.median(1 - x["decode_s"] / x["gen_s"] for x in res[m])

    ms_plain, ms_gram = 1000 / tps("plain"), 1000 / tps("grammar")
    print(f"  raw llama-cpp-python, no grammar:       {tps('plain'):6.1f} tok/s "
          f"({100 * outside('plain'):.0f}% of generation outside llama_decode)")
    print(f"  raw, same grammar and sampling:         {tps('grammar'):6.1f} tok/s "
          f"({100 * outside('grammar'):.0f}% outside llama_decode)")
    print(f"  project runtime, in-process:            {tps('runtime'):6.1f} tok/s")
    print(f"  inside a server analysis (all stages):  {tps('server'):6.1f} tok/s")
    print(f"  grammar's own cost in raw llama-cpp-python: {ms_gram - ms_plain:.1f} ms/token "
          f"= {100 * (1 - ms_plain / ms_gram):.0f}% of its generation time")
    print(f"  RATIO inside analysis / raw with grammar: {tps('server') / tps('grammar'):.2f} "
          f"(goal >= 0.90); runtime / raw with grammar {tps('runtime') / tps('grammar'):.2f}; "
          f"inside / raw without grammar {tps('server') / tps('plain'):.2f}")


def load() -> str:
    return "load " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def latency_p99(client: httpx.Client, n: int = 300) -> tuple[float, float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.get("/health").raise_for_status()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory (VmHWM) of the server and its child processes (the model runs
    in one child per worker by default), summed, MiB."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children")
        if children.exists():
            pids += [int(c) for c in children.read_text().split()]
    total = 0
    for p in pids:
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        total += sum(int(line.split()[1]) for line in status.splitlines()
                     if line.startswith("VmHWM:"))
    return total / 1024


def full_analysis(tmp: Path) -> None:
    srv = Server(tmp, workers=1)
    t0 = time.perf_counter()
    cid = srv.create(three_files())
    srv.wait_all([cid])
    wall = time.perf_counter() - t0
    body = srv.client.get(f"/cases/cases/{cid}").json()
    stages = srv.stages(cid)
    srv.stop()
    print(f"\nfull analysis of a 3-file case: {wall:.1f} s wall "
          f"(status {body['case']['status']}; goal <= 60 s)  [{load()}]")
    print(f"{'stage':20} {'s':>7} {'prompt':>7} {'cached':>7} {'gen':>5} {'read s':>7} "
          f"{'gen s':>7}")
    for s in stages:
        print(f"{s['stage']:20} {s['duration_s']:7.2f} {s['prompt_tokens']:7d} "
              f"{s.get('cached_tokens', 0):7d} {s['completion_tokens']:5d} "
              f"{s.get('prompt_eval_s', 0.0):7.2f} {s.get('generate_s', 0.0):7.2f}")


def latency(tmp: Path) -> None:
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


def throughput(tmp: Path, cases: int, cores: int,
               worker_counts: tuple[int | str, ...]) -> None:
    """Cases/hour with each worker count (threads per worker = cores / workers, the
    server's default; "auto" = the server's default count, see jobs/pool.py), ``cases``
    cases submitted at once; the runs alternate. Ratios are to the first setting's run."""
    print()
    base: float | None = None
    for workers in worker_counts:
        srv = Server(tmp, workers=workers)
        try:
            t0 = time.perf_counter()
            ids = [srv.create(three_files()) for _ in range(cases)]
            srv.wait_all(ids)
            took = time.perf_counter() - t0
            rss = peak_rss_mib(srv.proc.pid)
            done = sum(srv.client.get(f"/cases/cases/{i}").json()["case"]["status"] ==
                       "completed" for i in ids)
            ran = len(srv.client.get("/health").json()["workers"])
        finally:
            srv.stop()
        per_hour = cases * 3600 / took
        base = base or per_hour
        label = f"{workers} worker(s)" if workers != "auto" else f"auto = {ran} worker(s)"
        print(f"THROUGHPUT {label} x {max(1, cores // ran)} thread(s): "
              f"{cases} cases ({done} completed) in {took:.0f} s = "
              f"{per_hour:.0f} cases/hour ({per_hour / base:.2f}x the first); peak RSS, "
              f"server + model processes, {rss:.0f} MiB  "
              f"[{load()}]", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("all", "generation", "analysis", "latency",
                                       "throughput"), default="all")
    ap.add_argument("--cases", type=int, default=4, help="cases per throughput run")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds of the generation comparison")
    ap.add_argument("--calls", type=int, default=0,
                    help="replay only the first N recorded model calls (0 = all)")
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    # A timeout's SIGTERM unwinds like an error, so every server started here is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="medmitra-abench-"))
    print(f"machine: {cores} cores; model {MODEL.name}; {load()}")
    part = args.part
    try:
        if part in ("all", "analysis"):
            full_analysis(tmp)
        if part in ("all", "generation"):
            generation(tmp, threads=cores, rounds=args.rounds, n_calls=args.calls)
        if part in ("all", "latency"):
            latency(tmp)
        if part == "throughput" or (part == "all" and not args.skip_throughput):
            throughput(tmp, args.cases, cores, (1, 2, "auto"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
