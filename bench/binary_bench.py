"""Benchmark of the one-file binary against the same server run from the source tree.

    .venv/bin/python bench/binary_bench.py [--binary dist/medmitra] [--runs 3]
    .venv/bin/python bench/binary_bench.py --size-only dist/medmitra

Measured for both (side by side, with binary/source ratios):
- size of the binary and its split by component (compressed bytes inside the archive);
- cold start: process start to the first 200 on /health, in a fresh empty folder with no
  config file (so it includes creating the data dir and migrating); median of --runs;
  with the CPU seconds the process tree had used by then (steadier than wall time on a
  shared machine);
- time until the model is ready (health ``model.state == "ready"``);
- peak RSS of the whole process tree (the binary's bootloader + its Python), idle after
  the model is ready and during one analysis (a text PDF + an image, to ``completed``).

Two more variants of the same binary, made by changing one byte per archive entry of a copy
(medmitra/lazyfiles.py), show where the time goes:
- "binary, all unpacked at start": the lazily unpacked groups unpacked by the bootloader at
  every start, as before lazyfiles.py (same files, same build);
- the floor: the bootloader unpacking the same payload and starting Python with no script
  at all (the main script entry is skipped), timed to its exit; once with what the binary
  unpacks at start, once with everything.

"Cold" here means a new process and a new data dir, with the OS file cache warm (the binary
was just built or read); dropping the page cache would slow every other user of the machine.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MiB = 1024 * 1024
HEALTH_POLL_S = 0.02      # how often start-up is probed; the resolution of the start time
RSS_SAMPLE_S = 0.05
IDLE_WINDOW_S = 3.0
ANALYSIS_TIMEOUT_S = 600.0

# Archive entry name prefix -> component. First match wins; order matters.
COMPONENTS: list[tuple[str, tuple[str, ...]]] = [
    ("llama.cpp (llama_cpp libs)", ("llama_cpp/", "libllama", "libggml", "libmtmd")),
    ("onnxruntime", ("onnxruntime/", "onnxruntime.libs/")),
    ("opencv (must not be there: ocr_imgops replaces it)", ("cv2/", "opencv_python")),
    ("OCR models (rapidocr)", ("rapidocr_onnxruntime/",)),
    ("numpy", ("numpy/", "numpy.libs/")),
    ("pdfium", ("pypdfium2",)),
    ("pillow", ("PIL/", "pillow.libs/")),
    ("cryptography/ssl", ("cryptography", "libcrypto", "libssl", "_cffi")),
    ("ICD-10 table", ("medmitra/clinical/data/",)),
    ("docs assets (Swagger UI, ReDoc)", ("swagger_ui_bundle/", "medmitra/static/")),
    ("shapely/pyclipper", ("shapely", "pyclipper")),
    ("pydantic", ("pydantic",)),
    ("python runtime (libpython, lib-dynload, base_library)",
     ("libpython", "python3", "lib-dynload/", "base_library.zip")),
]


def _vendored_libs() -> dict[str, str]:
    """Library file name -> component, for the libraries wheels vendor in ``<dist>.libs/``
    folders (auditwheel); PyInstaller may collect them to the archive's top level."""
    import site

    roots = list(map(Path, site.getsitepackages()))
    out = {}
    for root in roots:
        for libs in root.glob("*.libs") if root.is_dir() else ():
            label = _by_prefix(libs.name + "/")
            for lib in libs.iterdir():
                out.setdefault(lib.name, label or f"{libs.name} (vendored libs)")
    return out


def _by_prefix(name: str) -> str | None:
    for label, prefixes in COMPONENTS:
        if name.startswith(prefixes):
            return label
    return None


def _component(name: str, vendored: dict[str, str]) -> str:
    label = _by_prefix(name) or vendored.get(name.rsplit("/", 1)[-1])
    if label:
        return label
    if "/" not in name and name.startswith("lib"):
        return "system libs (libstdc++, sqlite, gomp, ...)"
    return "other python extensions and data"


def size_split(binary: Path) -> tuple[int, dict[str, int]]:
    """(file size, {component: compressed bytes}) from the PyInstaller archive's table of
    contents; the bytecode archive (PYZ) is split into stdlib / medmitra / third party."""
    from PyInstaller.archive.readers import CArchiveReader, ZlibArchiveReader

    reader = CArchiveReader(str(binary))
    vendored = _vendored_libs()
    split: dict[str, int] = collections.Counter()
    for name, (_off, clen, _ulen, _flag, typecode) in reader.toc.items():
        if typecode == "z":
            with tempfile.NamedTemporaryFile(suffix=".pyz") as tmp:
                tmp.write(reader.extract(name))
                tmp.flush()
                pyz = ZlibArchiveReader(tmp.name)
                for mod, (_t, _o, length) in pyz.toc.items():
                    top = mod.split(".")[0]
                    label = ("python code: stdlib" if top in sys.stdlib_module_names
                             else "python code: medmitra" if top == "medmitra"
                             else "python code: third party")
                    split[label] += length
                split["python code: stdlib"] += clen - sum(
                    length for _t, _o, length in pyz.toc.values())   # PYZ header/toc
        elif typecode in ("s", "m", "M", "o"):  # entry scripts, bootstrap, options
            split["python runtime (libpython, lib-dynload, base_library)"] += clen
        else:
            split[_component(name, vendored)] += clen
    return binary.stat().st_size, dict(split)


def print_size(binary: Path) -> None:
    total, split = size_split(binary)
    print(f"dist/{binary.name}: {total / MiB:.1f} MiB ({total} bytes), model not included")
    for label, n in sorted(split.items(), key=lambda kv: -kv[1]):
        print(f"  {n / MiB:7.1f} MiB  {100 * n / total:5.1f} %  {label}")
    from PyInstaller.archive.readers import CArchiveReader

    unpacked = collections.Counter()
    for _off, _clen, ulen, _flag, typecode in CArchiveReader(str(binary)).toc.values():
        if typecode in ("b", "x", "Z"):
            unpacked["at every start"] += ulen
        elif typecode == "L":   # medmitra.lazyfiles.LAZY_TYPECODE
            unpacked["on first import of its group (lazyfiles.py)"] += ulen
    for when, n in unpacked.items():
        print(f"unpacked {when}: {n / 1e6:.1f} MB")


# -- running a server -----------------------------------------------------------------------


def _tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants (the binary is two processes)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid`` and its descendants (all threads)."""
    tick_s = 1.0 / os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) * tick_s   # utime, stime
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


class RssSampler:
    """Samples the tree's RSS in a thread; ``peak()`` since the last ``reset()``."""

    def __init__(self, pid: int):
        self.pid, self._peak, self._stop = pid, 0, threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            rss = _tree_rss_bytes(self.pid)
            with self._lock:
                self._peak = max(self._peak, rss)

    def reset(self) -> None:
        with self._lock:
            self._peak = _tree_rss_bytes(self.pid)

    def peak(self) -> int:
        with self._lock:
            return self._peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Variant:
    label: str
    prepare: Callable[[Path], list[str]]   # folder -> serve command (run with cwd=folder)
    cli: Callable[[Path], list[str]]       # folder -> command prefix for CLI sub-commands
    results: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))


def binary_variant(binary: Path, label: str = "binary") -> Variant:
    def prepare(folder: Path) -> list[str]:
        exe = folder / binary.name
        if not exe.exists():
            shutil.copy2(binary, exe)
            models = folder / "models"
            models.mkdir(exist_ok=True)
            _link_or_copy(ROOT / "models" / MODEL_NAME, models / MODEL_NAME)
        return [str(exe), "serve"]

    return Variant(label, prepare, lambda folder: [str(folder / binary.name)])


def source_variant() -> Variant:
    py = str(ROOT / ".venv" / "bin" / "python")
    # The source tree finds models/ beside the project (medmitra.config.app_root).
    return Variant("source", lambda folder: [py, "-m", "medmitra", "serve"],
                   lambda folder: [py, "-m", "medmitra"])


# -- variants of the built binary, and the floor ----------------------------------------------


def _lazy_names(binary: Path) -> list[str]:
    from medmitra import lazyfiles

    return [name for name, *_r, typecode in lazyfiles.entries(str(binary))
            if typecode == lazyfiles.LAZY_TYPECODE]


def _variant_copy(binary: Path, folder: Path, name: str, *, eager: bool,
                  no_script: bool) -> Path:
    """A copy of ``binary`` whose lazy entries are unpacked by the bootloader (``eager``)
    and/or whose main script is skipped (``no_script``: the floor)."""
    from medmitra import lazyfiles

    out = folder / name
    shutil.copy2(binary, out)
    codes: dict[str, bytes] = {}
    if eager:
        codes.update((n, b"x") for n in _lazy_names(binary))
    if no_script:
        codes["__main__"] = lazyfiles.LAZY_TYPECODE
    lazyfiles.retype(str(out), codes)
    return out


def run_floor(exe: Path) -> dict[str, float]:
    """Bootloader unpack + Python start with no script, to the process's exit (including
    the bootloader removing its temp folder)."""
    started = time.perf_counter()
    proc = subprocess.Popen([str(exe)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{exe.name} exited with {proc.returncode}")
    return {"floor_s": time.perf_counter() - started,
            "floor_cpu_s": usage.ru_utime + usage.ru_stime}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _env(port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDMITRA_")}
    env["MEDMITRA_SERVER_PORT"] = str(port)
    # The source variant imports medmitra from the checkout even with cwd elsewhere.
    env["PYTHONPATH"] = str(ROOT)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(variant: Variant, *, analyse: bool) -> dict[str, float]:
    import httpx

    sys.path.insert(0, str(ROOT / "tests"))
    import docfactory as df

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="medmitra-bench-") as tmp:
        folder = Path(tmp)
        cmd = variant.prepare(folder)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=folder, env=_env(port), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        sampler = RssSampler(proc.pid)
        try:
            with httpx.Client(base_url=url, timeout=30) as c:
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError(f"{variant.label}: server exited with {proc.returncode}")
                    try:
                        r = c.get("/health")
                        if r.status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(HEALTH_POLL_S)
                out["start_s"] = time.perf_counter() - started
                # CPU seconds as well: on a shared machine the wall time mostly measures
                # the others' load (unpacking is writes and inflating, both contended).
                out["start_cpu_s"] = tree_cpu_s(proc.pid)
                while c.get("/health").json()["model"]["state"] != "ready":
                    if time.perf_counter() - started > ANALYSIS_TIMEOUT_S:
                        raise RuntimeError(f"{variant.label}: model never became ready")
                    time.sleep(HEALTH_POLL_S)
                out["model_ready_s"] = time.perf_counter() - started
                out["model_ready_cpu_s"] = tree_cpu_s(proc.pid)
                sampler.reset()
                time.sleep(IDLE_WINDOW_S)   # a measuring window, not a wait for a state
                out["rss_idle_mib"] = sampler.peak() / MiB
                if analyse:
                    out.update(_analyse(variant, folder, c, sampler, df))
        finally:
            sampler.stop()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return out


def _analyse(variant: Variant, folder: Path, c, sampler: RssSampler, df) -> dict[str, float]:
    token = subprocess.run(variant.cli(folder) + ["token", "create", "--user-id",
                                                  str(uuid.uuid4())],
                           cwd=folder, env=_env(0), capture_output=True, text=True,
                           check=True).stdout.strip()
    h = {"Authorization": f"Bearer {token}"}
    sampler.reset()
    cpu0 = tree_cpu_s(sampler.pid)
    t0 = time.perf_counter()
    r = c.post("/cases/create_case", headers=h,
               data={"patient_name": "Bench Patient", "patient_age": "50",
                     "patient_gender": "female", "case_summary": "cough for two weeks"},
               files=[("lab_files", ("labs.pdf", df.text_pdf(), "application/pdf")),
                      ("radiology_files", ("chest.png", df.xray_png(), "image/png"))])
    r.raise_for_status()
    case_id = r.json()["case"]["case_id"]
    while True:
        status = c.get(f"/cases/cases/{case_id}", headers=h).json()["case"]["status"]
        if status != "processing":
            break
        if time.perf_counter() - t0 > ANALYSIS_TIMEOUT_S:
            raise RuntimeError(f"{variant.label}: analysis did not finish")
        time.sleep(0.2)
    if status != "completed":
        raise RuntimeError(f"{variant.label}: analysis ended {status}")
    # CPU time as well as wall time: on a shared machine the wall time of a model run swings
    # with other load (llama.cpp's threads wait for each other at every layer).
    return {"analysis_s": time.perf_counter() - t0,
            "analysis_cpu_s": tree_cpu_s(sampler.pid) - cpu0,
            "rss_analysis_mib": sampler.peak() / MiB}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binary", default=str(ROOT / "dist" / "medmitra"))
    parser.add_argument("--runs", type=int, default=3, help="start-up runs per variant")
    parser.add_argument("--analyses", type=int, default=1, help="analysis runs per variant")
    parser.add_argument("--size-only", metavar="BINARY", help="print the size split only")
    args = parser.parse_args(argv)
    if args.size_only:
        print_size(Path(args.size_only))
        return 0
    binary = Path(args.binary).resolve()
    if not binary.is_file():
        print(f"no binary at {binary}: run scripts/build-binary.sh", file=sys.stderr)
        return 1
    print_size(binary)
    print()
    sys.path.insert(0, str(ROOT))
    work = Path(tempfile.mkdtemp(prefix="medmitra-bench-variants-"))
    try:
        return _compare(binary, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _compare(binary: Path, work: Path, args: argparse.Namespace) -> int:
    lazy = bool(_lazy_names(binary))
    variants = [binary_variant(binary), source_variant()]
    floors: dict[str, Path] = {}
    if lazy:
        eager = _variant_copy(binary, work, binary.name + "-eager", eager=True, no_script=False)
        variants.insert(1, binary_variant(eager, "binary, all unpacked at start"))
        floors["floor: unpack at start + Python, no script"] = _variant_copy(
            binary, work, "floor-lazy", eager=False, no_script=True)
    floors["floor: unpack everything + Python, no script"] = _variant_copy(
        binary, work, "floor-eager", eager=True, no_script=True)
    floor_results: dict[str, dict[str, list[float]]] = {
        k: collections.defaultdict(list) for k in floors}
    n = max(args.runs, args.analyses)
    for i in range(n):
        for v in variants:   # interleaved, so all see the same machine load
            for key, value in run_once(v, analyse=(i < args.analyses)).items():
                v.results[key].append(value)
        for label, exe in floors.items():
            for key, value in run_floor(exe).items():
                floor_results[label][key].append(value)
    rows = [("cold start to first 200 /health", "start_s", "s"),
            ("  CPU time used until then", "start_cpu_s", "s"),
            ("start to model ready", "model_ready_s", "s"),
            ("  CPU time used until then", "model_ready_cpu_s", "s"),
            ("peak RSS idle (model loaded)", "rss_idle_mib", "MiB"),
            ("peak RSS during one analysis", "rss_analysis_mib", "MiB"),
            ("one analysis (PDF + image), wall", "analysis_s", "s"),
            ("one analysis, CPU time of the server", "analysis_cpu_s", "s")]
    src = variants[-1]
    print(f"medians of {n} start-ups and {args.analyses} analyses each, interleaved; "
          f"ratio = binary / source; load average now {os.getloadavg()[0]:.2f}")
    for v in variants[:-1]:
        print(f"\n{v.label:38} {'binary':>10} {'source':>10} {'ratio':>7}")
        for title, key, unit in rows:
            if not v.results[key] or not src.results[key]:
                continue   # --analyses 0
            bv, sv = statistics.median(v.results[key]), statistics.median(src.results[key])
            spread = "  ".join(f"{x.label.split(',')[0]} {min(x.results[key]):.2f}-"
                               f"{max(x.results[key]):.2f}" for x in (v, src))
            print(f"{title:38} {bv:10.2f} {sv:10.2f} {bv / sv:7.2f}   {unit}  ({spread})")
    print()
    for label, res in floor_results.items():
        print(f"{label:46} {statistics.median(res['floor_s']):6.2f} s wall, "
              f"{statistics.median(res['floor_cpu_s']):5.2f} s CPU  (wall "
              f"{min(res['floor_s']):.2f}-{max(res['floor_s']):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
