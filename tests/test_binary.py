"""Smoke test of the one-file binary (dist/medmitra, built from build.spec).

The binary is built by scripts/build-binary.sh when it is missing or older than the sources
(a few minutes; PyInstaller's caches make rebuilds quicker), or taken as is from
``MEDMITRA_TEST_BINARY``. Each test copies it into an empty folder with the default model in
``models/`` beside it (the documented layout, docs/binary.md) and no config file.

Where the machine allows (root: ``unshare -n``), the server runs in a network namespace of
its own that has only a loopback interface, so any attempt to reach the network fails. The
test client reaches it by moving one client thread into that namespace (setns), see
``NsClient``.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

import docfactory as df
from conftest import MODEL_PATH, ROOT, free_port
from medmitra import __version__
from medmitra.jobs import resources

BINARY = ROOT / "dist" / "medmitra"
EXE_NAME = "medmitra"
# Inputs of the binary: a change to any of them makes dist/medmitra stale.
SOURCE_GLOBS = ("medmitra/**/*.py", "medmitra/db/migrations/*.sql", "medmitra/static/**/*")
BUILD_TIMEOUT_S = 1800
START_TIMEOUT_S = 60
ANALYSIS_TIMEOUT_S = 600
STOP_TIMEOUT_S = 60
POLL_S = 0.05
CLONE_NEWNET = 0x40000000
# The first test may build the binary, then start it and run an analysis.
pytestmark = [pytest.mark.binary, pytest.mark.slow,
              pytest.mark.timeout(BUILD_TIMEOUT_S + ANALYSIS_TIMEOUT_S + 4 * START_TIMEOUT_S)]


# -- the binary -------------------------------------------------------------------------------


def _stale(binary: Path) -> bool:
    if not binary.is_file():
        return True
    built = binary.stat().st_mtime
    sources = [ROOT / "build.spec"] + [p for g in SOURCE_GLOBS for p in ROOT.glob(g)]
    return any(p.is_file() and p.stat().st_mtime > built for p in sources)


@pytest.fixture(scope="session")
def binary() -> Path:
    given = os.environ.get("MEDMITRA_TEST_BINARY")
    if given:
        return Path(given).resolve()
    if _stale(BINARY):
        r = subprocess.run([str(ROOT / "scripts" / "build-binary.sh")], cwd=ROOT,
                           capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if r.returncode != 0:
            pytest.fail(f"build failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    assert BINARY.is_file() and os.access(BINARY, os.X_OK)
    return BINARY


@pytest.fixture
def sandbox(tmp_path: Path, binary: Path) -> dict[str, Path]:
    """An empty folder holding only the binary and models/<default model>, plus a HOME and a
    TMPDIR of its own so the test can see everything the binary writes outside its folder."""
    app = tmp_path / "app"
    (app / "models").mkdir(parents=True)
    shutil.copy2(binary, app / EXE_NAME)
    try:
        os.link(MODEL_PATH, app / "models" / MODEL_PATH.name)
    except OSError:  # another file system: copy
        shutil.copy2(MODEL_PATH, app / "models" / MODEL_PATH.name)
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    return {"app": app, "home": home, "tmp": tmp, "log": tmp_path / "server.log"}


def _env(sb: dict[str, Path]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MEDMITRA_", "PYTHON", "LD_", "VIRTUAL_ENV"))}
    env.update(HOME=str(sb["home"]), TMPDIR=str(sb["tmp"]),
               PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return env


def _cli(sb: dict[str, Path], *args: str, stdin: str | None = None
         ) -> subprocess.CompletedProcess:
    return subprocess.run([f"./{EXE_NAME}", *args], cwd=sb["app"], env=_env(sb), input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_binary_leaves_opencv_out(binary: Path) -> None:
    """OCR's image work is medmitra/pipeline/ocr_imgops.py: neither OpenCV nor the codec and
    BLAS libraries it brings (59 MB packed) are in the archive; rapidocr and its models are."""
    from medmitra import lazyfiles

    names = [entry[0] for entry in lazyfiles.entries(str(binary))]
    assert any(n.startswith("rapidocr_onnxruntime/models/") for n in names)
    opencv = [n for n in names if n.startswith(("cv2/", "opencv"))
              or re.match(r"(libavcodec|libavformat|libswscale|libopenblasp|libQt5)", n)]
    assert opencv == []


# -- network isolation ------------------------------------------------------------------------


def _netns_problem() -> str | None:
    """None when ``unshare -n`` with a loopback interface works here, else why not."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "unshare or ip is not installed"
    try:
        r = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"],
                           capture_output=True, text=True, timeout=30)
    except OSError as exc:
        return f"unshare failed: {exc}"
    if r.returncode != 0:
        return f"unshare -n is not permitted here: {r.stderr.strip()}"
    return None


NETNS_PROBLEM = _netns_problem()


class NsClient:
    """An HTTP client whose one thread lives in the network namespace of process ``pid``
    (None: the test's own namespace). Sockets belong to the namespace of the thread that
    creates them, and setns moves only the calling thread."""

    def __init__(self, base_url: str, pid: int | None):
        self.base_url = base_url
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nsclient")
        self._client: httpx.Client | None = None
        self._pool.submit(self._enter, pid).result()

    def _enter(self, pid: int | None) -> None:
        if pid is not None:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns: {os.strerror(err)}")
            finally:
                os.close(fd)
        self._client = httpx.Client(base_url=self.base_url, timeout=60)

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        assert self._client is not None
        return self._pool.submit(self._client.request, method, url, **kw).result()

    def get(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("GET", url, **kw)

    def post(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("POST", url, **kw)

    def close(self) -> None:
        if self._client is not None:
            self._pool.submit(self._client.close).result()
            self._client = None
            self._pool.shutdown()


# -- running the server -----------------------------------------------------------------------


class Server:
    def __init__(self, sb: dict[str, Path], port: int):
        self.sb, self.port = sb, port
        self.isolated = NETNS_PROBLEM is None
        cmd = [f"./{EXE_NAME}", "serve", "--port", str(port)]
        if self.isolated:
            # exec: the bootloader takes the shell's pid, so proc.pid is the binary.
            cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', *cmd]
        with sb["log"].open("ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=sb["app"], env=_env(sb), stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        exe = (sb["app"] / EXE_NAME).resolve()
        deadline = time.monotonic() + START_TIMEOUT_S
        # Until the pid runs the binary, it may still be `unshare` in the old namespace.
        while _exe_of(self.proc.pid) != exe:
            assert self.proc.poll() is None, f"exited with {self.proc.returncode}: {self.log()}"
            assert time.monotonic() < deadline, "the binary did not start"
            time.sleep(POLL_S)
        self.client = NsClient(f"http://127.0.0.1:{port}",
                               self.proc.pid if self.isolated else None)

    def log(self) -> str:
        return self.sb["log"].read_text(errors="replace")

    def wait_health(self) -> dict:
        """Poll until the first 200 on /health; return that first body."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, \
                f"server exited with {self.proc.returncode}:\n{self.log()}"
            try:
                r = self.client.get("/health", timeout=5)
                if r.status_code == 200:
                    return r.json()
            except httpx.TransportError:
                pass
            time.sleep(POLL_S)   # probing a process that is starting up
        raise AssertionError(f"no 200 on /health in {START_TIMEOUT_S} s:\n{self.log()}")

    def wait_model_ready(self) -> dict:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            body = self.client.get("/health").json()
            assert body["model"]["state"] in ("loading", "ready"), body
            if body["model"]["state"] == "ready":
                return body
            time.sleep(POLL_S)
        raise AssertionError("the model did not finish loading")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT_S)
        finally:
            self.client.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.client.close()


def _exe_of(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return None


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for tid in os.listdir(f"/proc/{p}/task"):
            with open(f"/proc/{p}/task/{tid}/children") as fh:
                kids = [int(c) for c in fh.read().split()]
            out += kids
            todo += kids
    return out


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        s.kill()


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [v for k, v in attrs if k in ("src", "href", "action") and v]


def _jwt_claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def _wait_case_done(srv: Server, case_id: str, headers: dict) -> dict:
    deadline = time.monotonic() + ANALYSIS_TIMEOUT_S
    while time.monotonic() < deadline:
        body = srv.client.get(f"/cases/cases/{case_id}", headers=headers).json()
        if body["case"]["status"] != "processing":
            return body
        time.sleep(0.5)   # the analysis runs a real model for tens of seconds
    raise AssertionError(f"case still processing after {ANALYSIS_TIMEOUT_S} s")


# -- tests ------------------------------------------------------------------------------------


def test_every_cli_command_works_from_the_binary(sandbox: dict[str, Path]) -> None:
    r = _cli(sandbox, "--help")
    assert r.returncode == 0, r.stderr
    for command in ("serve", "migrate", "version", "token", "models", "users", "keys"):
        assert command in r.stdout

    r = _cli(sandbox, "version")
    assert (r.returncode, r.stdout.strip()) == (0, f"medmitra {__version__}"), r.stderr

    r = _cli(sandbox, "migrate")
    assert r.returncode == 0, r.stderr
    version = int(re.search(r"schema version (\d+)", r.stdout).group(1))
    assert version >= 1
    assert (sandbox["app"] / "data" / "medmitra.sqlite3").is_file()

    user = str(uuid.uuid4())
    r = _cli(sandbox, "token", "create", "--user-id", user, "--email", "dr@clinic.test")
    assert r.returncode == 0, r.stderr
    assert _jwt_claims(r.stdout.strip())["sub"] == user

    r = _cli(sandbox, "models", "show")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{sandbox['app'] / 'models' / MODEL_PATH.name} (present)" in r.stdout

    r = _cli(sandbox, "users", "add", "--email", "nurse@clinic.test", stdin="correct horse 42\n")
    assert r.returncode == 0, r.stderr   # argon2 hashing: a native library in the binary
    r = _cli(sandbox, "users", "list")
    assert r.returncode == 0 and "nurse@clinic.test" in r.stdout, r.stdout + r.stderr

    r = _cli(sandbox, "keys", "rotate")
    assert r.returncode == 0, r.stderr
    r = _cli(sandbox, "keys", "list")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr

    r = _cli(sandbox, "token", "create", "--user-id", "not-a-uuid")
    assert r.returncode == 2 and "UUID" in r.stderr


@pytest.mark.skipif(NETNS_PROBLEM is not None, reason=str(NETNS_PROBLEM))
def test_server_runs_without_any_network(sandbox: dict[str, Path],
                                         servers: list[Server]) -> None:
    srv = Server(sandbox, free_port())
    servers.append(srv)
    srv.wait_health()
    with open(f"/proc/{srv.proc.pid}/net/dev") as fh:
        interfaces = {line.split(":")[0].strip() for line in fh.readlines()[2:]}
    assert interfaces == {"lo"}
    # The test's own namespace does not see the server: the isolation is real.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{srv.port}/health", timeout=2)
    assert srv.stop() == 0


def test_binary_serves_analyses_and_restarts(sandbox: dict[str, Path],
                                             servers: list[Server]) -> None:
    app, port = sandbox["app"], free_port()
    srv = Server(sandbox, port)
    servers.append(srv)

    # /health answers before the model is loaded (it loads in a worker thread, and loading
    # includes importing llama_cpp and the ICD-10 table: well over a second, against a
    # 50 ms probe interval), then the model becomes ready.
    first = srv.wait_health()
    assert first["database"]["status"] == "ok"
    assert first["model"]["state"] == "loading", first
    ready = srv.wait_model_ready()
    assert MODEL_PATH.stem in json.dumps(ready["model"]), ready["model"]

    banner = srv.log()
    assert f"http://localhost:{port}/" in banner
    # build.spec ships the sources Sanic's TouchUp reads (api/signals.py).
    assert "request path rewritten without unused signal dispatches" in banner
    assert str(app / "data") in banner
    assert MODEL_PATH.name in banner and "found" in banner
    assert "token create --user-id" in banner

    # llm.workers = "auto" (the default) on a machine with 2+ cores and memory to spare: a
    # second worker starts once the first's model is ready.
    assert "workers: auto" in banner
    two = resources.usable_cores() >= 2
    if two:
        deadline = time.monotonic() + START_TIMEOUT_S
        while [w["state"] for w in srv.client.get("/health").json()["workers"]] != \
                ["idle", "idle"]:
            assert time.monotonic() < deadline, "the second worker never became idle"
            time.sleep(POLL_S)
        assert "auto workers: 2, 1 thread(s) each" in srv.log()

    # The one-file bootloader has exactly one child, the server (no Sanic worker
    # processes). With llm.inference = "process" (the default) the server starts a
    # model process per worker and multiprocessing's resource tracker: all are this same
    # executable, children of the server.
    server = _descendants(srv.proc.pid)[:1]
    assert len(server) == 1 and _exe_of(server[0]) == (app / EXE_NAME).resolve()
    kids = _descendants(srv.proc.pid)
    workers = 2 if two else 1
    assert 1 + workers <= len(kids) <= 2 + workers, kids
    assert all(_exe_of(k) == (app / EXE_NAME).resolve() for k in kids), kids
    assert set(kids[1:]) <= set(_descendants(server[0])), kids

    # The docs page works offline: every URL it references is relative and served here.
    r = srv.client.get("/docs")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    refs = _Refs()
    refs.feed(r.text)
    assert refs.refs, "the docs page references no assets"
    for ref in refs.refs:
        assert not re.match(r"^([a-z][a-z0-9+.-]*:|//)", ref, re.I), ref
        assert srv.client.get(ref).status_code == 200, ref
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert srv.client.get("/openapi.json").json()["paths"]

    # A token made by the binary's CLI works against the running binary.
    user = str(uuid.uuid4())
    tok = _cli(sandbox, "token", "create", "--user-id", user)
    assert tok.returncode == 0, tok.stderr
    h = {"Authorization": f"Bearer {tok.stdout.strip()}"}
    assert srv.client.get("/cases/all_cases").status_code == 401
    assert srv.client.get("/cases/all_cases", headers=h).json()["total"] == 0

    pdf = df.text_pdf(["Complete Blood Count", "Hemoglobin 9.1 g/dL 13.5-17.5",
                       "WBC 14.2 x10^3/uL 4.0-11.0"])
    png = df.xray_png()
    scan = df.scanned_pdf()     # an image-only page: OCR (onnxruntime, ocr_imgops) runs
    r = srv.client.post("/cases/create_case", headers=h,
                        data={"patient_name": "Binary Patient", "patient_age": "58",
                              "patient_gender": "male", "case_summary": "fever and cough"},
                        files=[("lab_files", ("cbc.pdf", pdf, "application/pdf")),
                               ("lab_files", ("scan.pdf", scan, "application/pdf")),
                               ("radiology_files", ("chest.png", png, "image/png"))])
    assert r.status_code == 201, r.text
    case_id = r.json()["case"]["case_id"]
    urls = {f["file_name"]: f["file_url"] for f in r.json()["uploaded_files"]}
    assert srv.client.get(urls["cbc.pdf"]).content == pdf      # signed, no Authorization
    assert srv.client.get(urls["chest.png"]).content == png

    done = _wait_case_done(srv, case_id, h)
    assert done["case"]["status"] == "completed", done["analysis"]
    assert done["ai_insights"] is not None and done["insights"]["primary_diagnosis"]
    labs = {f["file_name"]: f for f in done["files"] if f["file_category"] == "lab"}
    assert "Hemoglobin" in (labs["cbc.pdf"]["text_data"] or "")  # pdfium ran in the binary
    # OCR ran in the binary, which has no OpenCV: the scanned table was read.
    assert "Platelets 250" in (labs["scan.pdf"]["text_data"] or ""), labs["scan.pdf"]

    assert srv.stop() == 0
    assert "Binary Patient" not in srv.log() and "fever and cough" not in srv.log()
    # The bootloader removed its unpacked copy: nothing is left in the temp dir.
    assert list(sandbox["tmp"].iterdir()) == []

    # A restart on the same folder keeps the case, its analysis and its files.
    srv2 = Server(sandbox, port)
    servers.append(srv2)
    srv2.wait_health()
    again = srv2.client.get(f"/cases/cases/{case_id}", headers=h).json()
    assert again["case"]["status"] == "completed"
    assert again["case"]["patient_name"] == "Binary Patient"
    assert again["insights"] == done["insights"]
    files = {f["file_name"]: f["file_url"] for f in again["files"]}
    assert srv2.client.get(files["cbc.pdf"]).content == pdf
    assert srv2.stop() == 0

    # It wrote only inside its data dir and the temp dir: the folder holds what the test
    # put there plus data/, HOME stayed empty, and the temp dir is clean again.
    assert sorted(p.name for p in app.iterdir()) == ["data", "medmitra", "models"]
    assert [p.name for p in (app / "models").iterdir()] == [MODEL_PATH.name], \
        "the binary wrote into models/ (outside its data dir)"
    assert list(sandbox["home"].iterdir()) == []
    assert list(sandbox["tmp"].iterdir()) == []
