"""Clinician web app benchmark (issue 10): app shell size and time to a rendered case list.

Starts, in one run: the MedMitra server (single process, no analysis workers) on a fresh
data dir with one local account and 100 cases, and headless Chromium (/usr/bin/chromium).
Then measures:

  1. app shell transferred size: what the browser fetched to show the case list (HTML,
     CSS, JS; not the API's JSON) with the server's gzip, from the browser's own resource
     timing. Goal <= 150 KB. Also: every asset of the app gzipped (all pages).
  2. time to a rendered list of 100 cases: from the start of a navigation to /app/?limit=100
     to the table holding 100 rows (the page's "medmitra:list-rendered" event), cold (HTTP
     cache empty) and warm (assets revalidated by ETag). Goal <= 500 ms. Every navigation
     signs in again quietly with the tab's refresh token, as a reload does.

Baseline from the same run: the bare API call GET /cases/all_cases?limit=100 with httpx
(the data the page renders); the page's time is printed as a ratio to it.

Usage: .venv/bin/python bench/web_bench.py [--runs 5]
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from load import free_port

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
EMAIL, PASSWORD = "bench@clinic.test", "bench password 123"
SHELL_GOAL_BYTES = 150 * 1024
LIST_GOAL_MS = 500.0
CASES = 100


def start_server(data: Path, port: int, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDMITRA_")}
    env.update({"MEDMITRA_STORAGE_DATA_DIR": str(data), "MEDMITRA_SERVER_PORT": str(port),
                "MEDMITRA_LLM_WORKERS": "0", "MEDMITRA_AUTH_RATE_LIMIT_PER_MIN": "10000"})
    subprocess.run([sys.executable, "-m", "medmitra", "users", "add", "--email", EMAIL,
                    "--password", PASSWORD, "--data-dir", str(data)], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "medmitra", "serve"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def wait_up(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("server exited during start-up")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit("server did not come up")


def seed(url: str) -> str:
    r = httpx.post(f"{url}/auth/v1/token?grant_type=password",
                   json={"email": EMAIL, "password": PASSWORD}, timeout=30)
    r.raise_for_status()
    token = r.json()["access_token"]
    h = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=h, timeout=30) as c:
        for i in range(CASES):
            c.post("/cases/create_case", data={
                "patient_name": f"Bench Patient {i:03d}", "patient_age": str(20 + i % 70),
                "patient_gender": ("female", "male")[i % 2],
                "case_summary": "fatigue and pallor"}).raise_for_status()
    return token


def api_baseline_ms(url: str, token: str, runs: int) -> float:
    h = {"Authorization": f"Bearer {token}"}
    times = []
    with httpx.Client(base_url=url, headers=h, timeout=30) as c:
        c.get("/cases/all_cases?limit=100")
        for _ in range(runs * 4):
            t0 = time.perf_counter()
            r = c.get("/cases/all_cases?limit=100")
            r.raise_for_status()
            assert len(r.json()["cases"]) == CASES
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def all_assets_gzipped(url: str) -> tuple[int, int, int]:
    """(files, raw bytes, gzip bytes as served) of every module and style of the app."""
    seen: set[str] = set()
    shell = httpx.get(f"{url}/app/").text
    todo = ["/app/"] + re.findall(r'(?:href|src)="(/app/static/[^"]+)"', shell)
    raw = gz = 0
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        r = httpx.get(f"{url}{path}", headers={"Accept-Encoding": "gzip"})
        r.raise_for_status()
        raw += len(r.content)
        gz += int(r.headers.get("content-length") or len(gzip.compress(r.content)))
        if path.endswith(".js"):
            base = path.rsplit("/", 1)[0]
            todo += [f"{base}/{m}" for m in re.findall(r'(?:from|import\() ?"\./([\w-]+\.js)"', r.text)]
    return len(seen), raw, gz


RENDER_PROBE = """
window.__rendered = null;
document.addEventListener('medmitra:list-rendered', (e) => {
  if (e.detail.rows >= %d && window.__rendered === null) window.__rendered = performance.now();
});
""" % CASES

SHELL_BYTES = """() => {
  const entries = [performance.getEntriesByType('navigation')[0],
                   ...performance.getEntriesByType('resource')];
  const own = entries.filter(e => /\\/app\\//.test(new URL(e.name).pathname));
  return own.reduce((n, e) => n + e.transferSize, 0);
}"""


def browser_figures(url: str, runs: int) -> dict:
    from playwright.sync_api import sync_playwright

    out: dict = {"cold_ms": [], "warm_ms": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1366, "height": 768})
            context.add_init_script(RENDER_PROBE)
            page = context.new_page()
            page.goto(f"{url}/app/signin")
            page.get_by_label("Email").fill(EMAIL)
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_selector("table.cases")
            cdp = context.new_cdp_session(page)
            cdp.send("Network.enable")
            for mode in ("cold", "warm"):
                cdp.send("Network.setCacheDisabled", {"cacheDisabled": mode == "cold"})
                for _ in range(runs):
                    page.goto(f"{url}/app/?limit=100")
                    page.wait_for_function("() => window.__rendered !== null", timeout=30_000)
                    out[f"{mode}_ms"].append(page.evaluate("window.__rendered"))
                    if mode == "cold":
                        out["shell_bytes"] = page.evaluate(SHELL_BYTES)
        finally:
            browser.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="medmitra-web-bench-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(tmp / "data", port, tmp / "server.log")
    try:
        wait_up(url, proc)
        token = seed(url)
        files, raw, gz = all_assets_gzipped(url)
        api_ms = api_baseline_ms(url, token, args.runs)
        fig = browser_figures(url, args.runs)
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)

    cold, warm = statistics.median(fig["cold_ms"]), statistics.median(fig["warm_ms"])
    shell = fig["shell_bytes"]
    print(f"app shell transferred (list page, gzip, incl. headers): {shell / 1024:.1f} KB "
          f"(goal <= {SHELL_GOAL_BYTES // 1024} KB: ratio {shell / SHELL_GOAL_BYTES:.2f})")
    print(f"all app assets: {files} files, {raw / 1024:.1f} KB raw, {gz / 1024:.1f} KB gzip")
    print(f"baseline GET /cases/all_cases?limit=100 (httpx): median {api_ms:.1f} ms")
    for name, ms, samples in (("cold cache", cold, fig["cold_ms"]),
                              ("warm cache", warm, fig["warm_ms"])):
        print(f"time to rendered list of {CASES} cases, {name}: median {ms:.0f} ms "
              f"(runs {', '.join(f'{x:.0f}' for x in samples)}) -> {ms / api_ms:.1f}x the API "
              f"call; goal <= {LIST_GOAL_MS:.0f} ms: ratio {ms / LIST_GOAL_MS:.2f}")


if __name__ == "__main__":
    main()
