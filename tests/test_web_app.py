"""The clinician web app (/app/) driven in a real headless Chromium against a real server on
loopback, signed in through /auth/v1 with a real local account.

Every page visit checks that no request left the server, and runs axe-core (tests/js,
test-only) for serious or critical accessibility violations. Screenshots of every page at
1366x768 and 768x1024 land in test-artifacts/web/ (git-ignored; MEDMITRA_TEST_ARTIFACTS
moves it) for a person to look at.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import httpx
import pytest

import docfactory as df
from conftest import AXE, CHROMIUM, MODEL_PATH, ROOT, Served, chromium, make_settings, make_user

ARTIFACTS = Path(os.environ.get("MEDMITRA_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "web"
SIZES = ((1366, 768), (768, 1024))
PASSWORD = "correct horse battery staple"
TIMEOUT_MS = 20_000
# Small output budgets keep a real analysis with the tiny model to seconds.
FAST_LLM = {"max_tokens_lab": 96, "max_tokens_radiology": 96, "max_tokens_summary": 96,
            "max_tokens_soap": 128, "max_tokens_diagnosis": 96,
            "max_tokens_differential": 200, "max_tokens_recommendations": 200, "n_ctx": 2048,
            "threads": 1}

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
    pytest.mark.skipif(not AXE.is_file(),
                       reason="axe-core missing: run scripts/setup-test-tools.sh (npm in tests/js)"),
]


# ---------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


class Watch:
    """Every request a page made, and everything it complained about."""

    def __init__(self, page: Any, base_url: str) -> None:
        self.base = urlsplit(base_url)
        self.requests: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.failed: list[str] = []
        page.on("request", lambda r: self.requests.append((r.method, r.url)))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        # HTTP error answers the test provoked (a wrong password ...) are logged by Chromium
        # as "Failed to load resource"; anything else on the console is a fault.
        page.on("console", lambda m: self.errors.append(m.text)
                if m.type == "error" and "Failed to load resource" not in m.text else None)
        page.on("requestfailed", lambda r: self.failed.append(f"{r.url} {r.failure}")
                if "ERR_ABORTED" not in (r.failure or "") else None)

    def urls(self, pattern: str) -> list[str]:
        return [u for _, u in self.requests if re.search(pattern, u)]

    def assert_local_only(self) -> None:
        assert self.requests
        for _, url in self.requests:
            parts = urlsplit(url.removeprefix("blob:"))
            if parts.scheme == "data":
                continue
            assert (parts.scheme, parts.hostname, parts.port) == \
                (self.base.scheme, "127.0.0.1", self.base.port), f"left the server: {url}"
        assert not self.failed, self.failed
        assert not self.errors, self.errors


def new_page(browser: Any, server: Served, size: tuple[int, int] = SIZES[0]):
    context = browser.new_context(viewport={"width": size[0], "height": size[1]})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    return page, Watch(page, server.url)


def shoot(page: Any, name: str, *, full_page: bool = True) -> None:
    """Screenshots at both sizes, then back to the first."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for w, h in SIZES:
        page.set_viewport_size({"width": w, "height": h})
        page.wait_for_timeout(150)   # let the layout settle after the resize
        page.screenshot(path=str(ARTIFACTS / f"{name}-{w}x{h}.png"), full_page=full_page)
    page.set_viewport_size({"width": SIZES[0][0], "height": SIZES[0][1]})


def axe_check(page: Any, where: str) -> None:
    """No serious or critical axe-core violation on the page as it is now."""
    if not page.evaluate("() => typeof window.axe === 'object'"):
        page.evaluate(AXE.read_text(encoding="utf-8"))   # CDP evaluation: not subject to CSP
    result = page.evaluate(
        "async () => await axe.run(document, {resultTypes: ['violations']})")
    bad = [f"{v['id']} ({v['impact']}): {v['help']} -> "
           f"{[n['target'] for n in v['nodes']][:3]}"
           for v in result["violations"] if v["impact"] in ("serious", "critical")]
    assert not bad, f"{where}: {bad}"


def add_user(server: Served, email: str | None = None, *, disabled: bool = False) -> str:
    from medmitra.auth import users

    email = email or f"dr-{uuid.uuid4().hex[:8]}@clinic.test"

    async def create() -> None:
        user = await users.create_user(email, PASSWORD)
        if disabled:
            await users.set_disabled(user, True)

    server.run(create())
    return email


def api_token(server: Served, email: str) -> str:
    r = httpx.post(f"{server.url}/auth/v1/token?grant_type=password",
                   json={"email": email, "password": PASSWORD}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


def sign_in(page: Any, server: Served, email: str, password: str = PASSWORD) -> None:
    page.goto(f"{server.url}/")
    page.wait_for_url("**/app/signin**")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()


def wait_until(check: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out waiting for {what}")


def write_files(folder: Path, files: dict[str, bytes]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        out.append(str(folder / name))
    return out


def ct_sample() -> bytes:
    """pydicom's bundled public sample CT slice (with its own window centre/width)."""
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm")).read_bytes()


# ------------------------------------------------------------------ server-side routes

def test_root_redirects_browsers_and_serves_the_shell(start_server, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, limits={"lab_max_bytes": 123_456, "files_per_request": 7})
    server = start_server(settings)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
        assert r.status_code == 302 and r.headers["location"] == "/app/"
        for accept in ("*/*", "application/json", "application/json, text/html"):
            r = c.get("/", headers={"Accept": accept})
            assert r.json() == {"message": "MedMitra Backend API is running!"}, accept
        assert c.get("/app").headers["location"] == "/app/"
        shell = c.get("/app/", headers={"Accept-Encoding": "gzip"})
        assert shell.status_code == 200 and shell.headers["content-encoding"] == "gzip"
        csp = shell.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        for page in ("/app/signin", "/app/cases/new", f"/app/cases/{uuid.uuid4()}"):
            assert c.get(page).text == shell.text
        # Every module the shell loads, and every module those import, is served.
        seen: set[str] = set()
        todo = re.findall(r'(?:href|src)="(/app/static/[^"]+)"', shell.text)
        while todo:
            url = todo.pop()
            if url in seen:
                continue
            seen.add(url)
            r = c.get(url)
            assert r.status_code == 200, url
            if url.endswith(".js"):
                assert r.headers["content-type"].startswith("text/javascript")
                base = url.rsplit("/", 1)[0]
                todo += [f"{base}/{m}" for m in re.findall(r'(?:from|import\() ?"\./([\w-]+\.js)"',
                                                            r.text)]
        assert {"/app/static/js/main.js", "/app/static/js/casepage.js",
                "/app/static/app.css"} <= seen
        assert c.get("/app/static/js/nope.js").status_code == 404
        assert c.get("/app/static/README.md").status_code == 404
        # The limits the upload form checks come from the server's settings.
        cfg = c.get("/app/config.json").json()
        assert cfg["limits"]["lab_max_bytes"] == 123_456
        assert cfg["limits"]["files_per_request"] == 7
        assert cfg["limits"]["radiology_max_bytes"] == settings.limits.radiology_max_bytes
        assert "application/dicom" in cfg["accepted"]["radiology"]["types"]
        assert ".dcm" in cfg["accepted"]["radiology"]["extensions"]
        assert "application/dicom" not in cfg["accepted"]["lab"]["types"]
        assert ".pdf" in cfg["accepted"]["lab"]["extensions"]


def test_dicom_and_pdf_previews_for_the_owner_only(server: Served) -> None:
    import numpy as np
    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    alice, bob = make_user(), make_user()
    sample = ct_sample()
    with server.client(alice.token) as c:
        r = c.post("/cases/create_case",
                   data={"patient_name": "Preview Patient", "patient_age": "40",
                         "patient_gender": "male"},
                   files=[("radiology_files", ("ct.dcm", sample, "application/dicom")),
                          ("radiology_files", ("bad.dcm", df.corrupt_dicom(), "application/dicom")),
                          ("lab_files", ("labs.csv", df.lab_csv(), "text/csv")),
                          ("lab_files", ("two.pdf", df.text_pdf(pages=2), "application/pdf")),
                          ("lab_files", ("cut.pdf", df.truncated_pdf(), "application/pdf"))])
        assert r.status_code == 201, r.text
        dcm, bad, csv, pdf, cut = r.json()["uploaded_files"]
        res = c.get(f"/cases/file/{dcm['file_id']}/preview.png")
        assert res.status_code == 200 and res.headers["content-type"] == "image/png"
        img = Image.open(io.BytesIO(res.content))
        ds = pydicom.dcmread(io.BytesIO(sample))
        assert img.size == (ds.Columns, ds.Rows)
        # Oracle: pydicom's own VOI LUT with the file's window centre/width.
        want = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(float)
        lo, hi = float(want.min()), float(want.max())
        want = (want - lo) / (hi - lo) * 255
        got = np.asarray(img.convert("L"), dtype=float)
        assert np.abs(got - want).mean() < 3, np.abs(got - want).mean()
        assert got.std() > 20   # a picture, not a flat field
        # The integer id works like the UUID, as on every file route.
        assert c.get(f"/cases/file/{dcm['id']}/preview.png").content == res.content
        assert c.get(f"/cases/file/{bad['file_id']}/preview.png").status_code == 422
        assert c.get(f"/cases/file/{dcm['file_id']}/preview.png?page=2").status_code == 400
        r = c.get(f"/cases/file/{csv['file_id']}/preview.png")
        assert r.status_code == 415 and "DICOM and PDF" in r.json()["detail"]
        # A PDF page, rendered; the page count travels in a header.
        pages = []
        for n in (1, 2):
            r = c.get(f"/cases/file/{pdf['file_id']}/preview.png?page={n}")
            assert r.status_code == 200 and r.headers["x-page-count"] == "2"
            pages.append(Image.open(io.BytesIO(r.content)).convert("L"))
        assert max(pages[0].size) == 1024 and pages[0].size[1] > pages[0].size[0]  # portrait
        assert np.asarray(pages[0]).min() < 100          # there is dark text on the page
        assert pages[0].tobytes() != pages[1].tobytes()  # "Page 1 of 2" vs "Page 2 of 2"
        for bad_page in ("3", "0", "x"):
            r = c.get(f"/cases/file/{pdf['file_id']}/preview.png?page={bad_page}")
            assert r.status_code == 400 and r.json()["errors"][0]["loc"] == ["query", "page"]
        assert c.get(f"/cases/file/{cut['file_id']}/preview.png").status_code == 422
        assert c.get(f"/cases/file/{uuid.uuid4()}/preview.png").status_code == 404
    with server.client(bob.token) as c:
        assert c.get(f"/cases/file/{dcm['file_id']}/preview.png").status_code == 404
    with server.client() as c:
        r = c.get(f"/cases/file/{dcm['file_id']}/preview.png")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


# --------------------------------------------------------------------------- browser

def test_sign_in_messages_wrong_password_disabled_and_rate_limit(
        browser, start_server, tmp_path: Path) -> None:
    server = start_server(make_settings(tmp_path, auth={"rate_limit_per_min": 6}))
    email = add_user(server)
    banned = add_user(server, disabled=True)
    page, watch = new_page(browser, server)
    alert = page.get_by_role("alert")

    sign_in(page, server, email, "not the password")
    assert alert.inner_text() == "Wrong email or password."
    assert page.get_by_label("Password").input_value() == ""
    shoot(page, "signin-wrong-password")
    axe_check(page, "sign-in page with an error")

    sign_in(page, server, banned)
    page.wait_for_selector("text=This account is disabled")

    for _ in range(8):
        page.get_by_label("Email").fill(email)
        page.get_by_label("Password").fill("still wrong")
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_function("() => !document.querySelector('form.signin button').disabled")
        if "Too many sign-in attempts" in alert.inner_text():
            break
    assert re.match(r"Too many sign-in attempts from this computer\. Wait \d+ seconds",
                    alert.inner_text()), alert.inner_text()
    # No password or token ever travels in a URL.
    assert not [u for _, u in watch.requests if "password=" in u or "token=" in u.lower()]
    watch.assert_local_only()
    page.context.close()


def test_new_case_shows_server_messages_and_refuses_files(
        browser, start_server, tmp_path: Path) -> None:
    # A small lab limit proves the page checks the server's published limit.
    server = start_server(make_settings(tmp_path, limits={"lab_max_bytes": 50_000}))
    email = add_user(server)
    page, watch = new_page(browser, server)
    sign_in(page, server, email)
    page.get_by_role("heading", name="No cases yet").wait_for()
    shoot(page, "list-empty")
    axe_check(page, "empty case list")

    page.get_by_role("link", name="Create the first case").click()
    page.get_by_role("heading", name="New case").wait_for()
    submit = page.get_by_role("button", name="Create case and start the analysis")
    submit.click()
    # The server's own messages, next to each field.
    name_box = page.locator(".field[data-field='patient_name'] .field-error")
    name_box.wait_for()
    assert name_box.inner_text() == "Must not be empty"
    assert page.get_by_label("Patient name").get_attribute("aria-invalid") == "true"
    page.get_by_label("Patient name").fill("Asha Verma")
    page.get_by_label("Age (years)").fill("200")
    page.get_by_label("Gender").select_option("female")
    submit.click()
    age_error = page.locator(".field[data-field='patient_age'] .field-error")
    page.wait_for_function("() => document.querySelector(\"[data-field='patient_age'] "
                           ".field-error\").textContent.includes('0 to 150')")
    assert age_error.inner_text() == "Must be an integer from 0 to 150"
    assert page.locator(".field[data-field='patient_name'] .field-error").is_hidden()
    page.get_by_label("Age (years)").fill("52")

    files = write_files(tmp_path / "pick", {
        "photo.gif": df.gif_bytes(),                # refused by type before sending
        "big.csv": df.lab_csv() * 1200,             # > 50 000 bytes: refused by size
        "scan.pdf": df.zip_bytes(),                 # named .pdf, but the bytes are a ZIP
        "labs.csv": df.lab_csv(),
    })
    lab_input = page.locator("input[type=file][data-category='lab']")
    lab_input.set_input_files(files)
    lab_zone = page.locator(".dropzone[data-category='lab']")
    assert "photo.gif: Not an accepted lab file" in lab_zone.inner_text()
    assert re.search(r"big\.csv: Too large: .*the limit for a lab file is 48\.8 KB",
                     lab_zone.inner_text())
    assert lab_zone.locator("li.file:not(.refused)").count() == 2
    shoot(page, "newcase-refused-files")
    axe_check(page, "new case with refused files")

    submit.click()
    page.wait_for_selector("li.file.refused[data-name='scan.pdf'] .field-error")
    assert "File 'scan.pdf' is not an accepted lab file" in \
        lab_zone.locator("li[data-name='scan.pdf']").inner_text()
    assert "Nothing was saved" in page.locator(".form-status").inner_text()
    shoot(page, "newcase-server-refused")
    # Nothing half-created: no case, no stored bytes.
    with server.client(api_token(server, email)) as c:
        assert c.get("/cases/all_cases").json()["total"] == 0
    assert not [p for p in server.settings.data_path.joinpath("files").rglob("*") if p.is_file()]

    # Remove the refused file and create the case for real (no model: it stays queued).
    lab_zone.get_by_role("button", name="Remove scan.pdf").click()
    submit.click()
    page.wait_for_url(re.compile(r"/app/cases/[0-9a-f-]{36}$"))
    page.get_by_role("heading", name="Asha Verma").wait_for()
    page.wait_for_selector("#analysis[data-state='queued']")
    assert "Waiting in the queue: position 1" in page.locator("#analysis").inner_text()
    assert page.locator(".file-card").count() == 1
    watch.assert_local_only()
    page.context.close()


def _seed(server: Served, token: str, n: int) -> list[dict]:
    names = ["Asha Verma", "Ravi Kumar", "Meera Iyer", "John Doe", "Fatima Khan"]
    out = []
    with server.client(token) as c:
        for i in range(n):
            r = c.post("/cases/create_case", data={
                "patient_name": f"{names[i % 5]} {i:02d}", "patient_age": str(20 + i * 2),
                "patient_gender": ("female", "male")[i % 2],
                "case_summary": "chest pain" if i % 4 == 0 else "fatigue"})
            assert r.status_code == 201, r.text
            out.append(r.json()["case"])
        for case in out[:3]:
            c.put(f"/cases/cases/{case['case_id']}", json={"status": "completed"})
        for case in out[3:4]:
            c.put(f"/cases/cases/{case['case_id']}", json={"status": "failed"})
    return out


def test_case_list_search_filters_sort_paging_and_live_badges(
        browser, start_server, tmp_path: Path) -> None:
    server = start_server()
    email = add_user(server)
    token = api_token(server, email)
    cases = _seed(server, token, 25)
    page, watch = new_page(browser, server)
    sign_in(page, server, email)
    rows = page.locator("table.cases tbody tr")
    page.get_by_text("Page 1 of 2 · 25 cases").wait_for()
    assert rows.count() == 20
    page.evaluate("window.__sameDocument = true")
    shoot(page, "list")
    axe_check(page, "case list")

    page.get_by_role("button", name="Next page").click()
    page.get_by_text("Page 2 of 2 · 25 cases").wait_for()
    assert rows.count() == 5
    assert "page=2" in page.url

    page.get_by_label("Search").fill("asha")
    page.get_by_text("Page 1 of 1 · 5 cases").wait_for()
    assert all(t.startswith("Asha Verma") for t in rows.locator("th").all_inner_texts())
    page.get_by_label("Search").fill("chest pain")   # the summary is searched too
    page.get_by_text("7 cases").wait_for()
    page.get_by_role("button", name="Clear", exact=True).click()

    page.get_by_label("Status").select_option("failed")
    page.get_by_text("Page 1 of 1 · 1 case").wait_for()
    assert rows.locator(".badge").inner_text() == "Failed"
    page.get_by_label("Status").select_option("")
    page.get_by_label("Gender").select_option("male")
    page.get_by_text("12 cases").wait_for()
    page.get_by_label("Age from").fill("50")
    page.get_by_label("Age to").fill("60")
    page.get_by_label("Age to").press("Enter")
    page.get_by_text("· 3 cases").wait_for()     # male, 50 to 60: ages 50, 54, 58
    assert sorted(int(a) for a in rows.locator("td:nth-child(2)").all_inner_texts()) == \
        [50, 54, 58]
    page.get_by_role("button", name="Clear", exact=True).click()
    page.get_by_text("25 cases").wait_for()

    page.get_by_label("Sort").select_option("patient_age:asc")
    page.wait_for_function("() => document.querySelector('table.cases tbody td')"
                           "?.textContent === '20'")
    page.get_by_label("Sort").select_option("patient_name:asc")
    page.wait_for_function("() => document.querySelector('table.cases tbody th')"
                           "?.textContent.startsWith('Asha Verma 00')")
    page.get_by_label("Created to").fill("2001-01-01")
    page.get_by_role("heading", name="No cases match").wait_for()
    shoot(page, "list-no-match")
    page.get_by_role("button", name="Clear filters").click()
    page.get_by_text("25 cases").wait_for()

    # A badge follows the case's status while the page stays open.
    page.get_by_label("Sort").select_option("created_at:desc")
    newest = cases[-1]["case_id"]
    badge = page.locator(f"tr[data-case='{newest}'] .badge")
    assert badge.inner_text() == "Analysing"
    with server.client(token) as c:
        c.put(f"/cases/cases/{newest}", json={"status": "completed"})
    page.wait_for_function(f"() => document.querySelector(\"tr[data-case='{newest}'] .badge\")"
                           ".textContent === 'Completed'", timeout=10_000)
    assert page.evaluate("window.__sameDocument") is True
    watch.assert_local_only()
    page.context.close()


def test_case_page_by_keyboard_drop_upload_progress_and_download(
        browser, start_server, tmp_path: Path) -> None:
    import base64

    server = start_server()
    email = add_user(server)
    token = api_token(server, email)
    case = _seed(server, token, 1)[0]
    page, watch = new_page(browser, server, SIZES[1])

    # Keyboard only: the form has the focus, Enter submits; each new page puts the focus on
    # its heading, and Tab walks on from there.
    page.goto(f"{server.url}/app/signin")
    page.get_by_label("Email").wait_for()
    page.keyboard.type(email)                      # the email field has the focus
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    page.get_by_text("1 case").wait_for()
    assert page.evaluate("[document.activeElement.tagName, document.activeElement.textContent]"
                         ) == ["H1", "Cases"]
    for _ in range(40):                            # on to the patient's link in the table
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent") == case["patient_name"]:
            break
    else:
        raise AssertionError("the case link is not reachable with Tab")
    page.keyboard.press("Enter")
    page.get_by_role("heading", name=case["patient_name"]).wait_for()
    assert page.evaluate("document.activeElement.tagName") == "H1"   # focus moved to the page
    page.wait_for_selector("#analysis[data-state='queued']")
    axe_check(page, "case page, analysis queued")

    # Files dropped onto the zone; the upload bar moves (uploads throttled to 256 KB/s).
    big_csv = df.lab_csv() * 2000                  # ~550 KB
    drop = [("labs-big.csv", big_csv, "text/csv"), ("notes.gif", df.gif_bytes(), "image/gif")]
    transfer = page.evaluate_handle("""(files) => {
        const dt = new DataTransfer();
        for (const [name, b64, type] of files) {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            dt.items.add(new File([bytes], name, { type }));
        }
        return dt;
    }""", [[n, base64.b64encode(b).decode(), t] for n, b, t in drop])
    zone = page.locator(".add-files .dropzone[data-category='lab']")
    zone.dispatch_event("drop", {"dataTransfer": transfer})
    assert "notes.gif: Not an accepted lab file" in zone.inner_text()
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                                                  "downloadThroughput": -1,
                                                  "uploadThroughput": 256 * 1024})
    page.get_by_role("button", name="Upload and re-analyse").click()
    page.wait_for_function("() => { const p = document.querySelector('.add-files progress');"
                           " return p && p.value > 0.05 && p.value < 0.95; }")
    shoot(page, "case-uploading", full_page=False)
    page.locator(".file-card", has_text="labs-big.csv").wait_for()
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                                                  "downloadThroughput": -1,
                                                  "uploadThroughput": -1})
    # The download link gives back the very bytes.
    href = page.locator(".file-card", has_text="labs-big.csv").get_by_role(
        "link", name="Download labs-big.csv").get_attribute("href")
    assert httpx.get(href, timeout=30).content == big_csv

    # The confirmation is a real dialog: Escape cancels, nothing is deleted.
    page.get_by_role("button", name="Delete labs-big.csv").click()
    page.get_by_role("dialog").wait_for()
    page.keyboard.press("Escape")
    page.get_by_role("dialog").wait_for(state="hidden")
    assert page.locator(".file-card", has_text="labs-big.csv").count() == 1
    watch.assert_local_only()
    page.context.close()


@pytest.mark.slow
def test_session_expires_refreshes_quietly_and_ends_cleanly(
        browser, start_server, tmp_path: Path) -> None:
    server = start_server(make_settings(tmp_path, auth={"access_token_ttl_s": 30,
                                                        "leeway_s": 0}))
    email = add_user(server)
    token = api_token(server, email)
    _seed(server, token, 2)
    page, watch = new_page(browser, server)
    sign_in(page, server, email)
    page.get_by_text("2 cases").wait_for()
    page.evaluate("window.__sameDocument = true")
    # Tokens live in memory and this tab's sessionStorage: never in localStorage or a URL.
    assert page.evaluate("() => Object.keys(localStorage)") == []
    assert page.evaluate("() => Object.keys(sessionStorage)") == ["medmitra.session"]

    time.sleep(31)    # the access token has expired (no leeway)
    before = len(watch.urls(r"grant_type=refresh_token"))
    nav = page.get_by_role("navigation", name="Main")
    nav.get_by_role("link", name="New case").click()
    page.get_by_role("heading", name="New case").wait_for()
    nav.get_by_role("link", name="Cases", exact=True).click()
    page.get_by_text("2 cases").wait_for()
    assert len(watch.urls(r"grant_type=refresh_token")) > before
    assert page.evaluate("window.__sameDocument") is True
    assert "/signin" not in page.url

    # A reload signs in again quietly from the tab's refresh token.
    page.reload()
    page.get_by_text("2 cases").wait_for()

    # Signed out everywhere from another device: the next call ends at the sign-in page.
    httpx.post(f"{server.url}/auth/v1/logout?scope=global",
               headers={"Authorization": f"Bearer {api_token(server, email)}"}, timeout=30)
    page.get_by_label("Status").select_option("failed")
    page.wait_for_url("**/app/signin**")
    page.get_by_text("Your session has ended. Please sign in again.").wait_for()
    for _, url in watch.requests:
        assert "access_token" not in url and "refresh_token=" not in url
        assert token not in url
    watch.assert_local_only()
    page.context.close()


@pytest.mark.slow
@pytest.mark.skipif(not MODEL_PATH.is_file(), reason="default model not installed")
def test_clinician_flow_with_the_real_model(browser, start_server, tmp_path: Path) -> None:
    import pypdfium2

    settings = make_settings(tmp_path, llm={**FAST_LLM, "workers": 1},
                             jobs={"lease_s": 30, "heartbeat_s": 1})
    server = start_server(settings)
    email = add_user(server)
    page, watch = new_page(browser, server)

    sign_in(page, server, email)
    page.get_by_role("heading", name="No cases yet").wait_for()
    page.evaluate("window.__sameDocument = true")
    page.get_by_role("link", name="New case", exact=True).first.click()
    page.get_by_role("heading", name="New case").wait_for()
    page.get_by_label("Patient name").fill("Meera Iyer")
    page.get_by_label("Age (years)").fill("58")
    page.get_by_label("Gender").select_option("female")
    page.get_by_label("Case summary (optional)").fill("Fatigue and pallor for three weeks.")
    lab, rad = write_files(tmp_path / "lab", {"cbc.pdf": df.text_pdf(), "cbc.csv": df.lab_csv()}), \
        write_files(tmp_path / "rad", {"ct_small.dcm": ct_sample()})
    # Through the picker's button and the file dialog, as a person would.
    with page.expect_file_chooser() as chooser:
        page.locator(".dropzone[data-category='lab']").get_by_role("button", name="Choose files…").click()
    chooser.value.set_files(lab)
    with page.expect_file_chooser() as chooser:
        page.locator(".dropzone[data-category='radiology']").get_by_role("button", name="Choose files…").click()
    chooser.value.set_files(rad)
    assert page.locator("li.file:not(.refused)").count() == 3
    shoot(page, "newcase-filled")
    page.get_by_role("button", name="Create case and start the analysis").click()
    page.wait_for_url(re.compile(r"/app/cases/[0-9a-f-]{36}$"))
    case_id = page.url.rsplit("/", 1)[1]
    page.get_by_role("heading", name="Meera Iyer").wait_for()

    # Progress moves without a reload: record what the panel shows until it completes.
    seen: list[tuple[str, str, str]] = []

    def progress() -> bool:
        snap = page.evaluate("""() => {
            const a = document.querySelector('#analysis');
            const bar = a.querySelector('progress');
            return [a.dataset.state, a.querySelector('.stage')?.textContent || '',
                    bar ? String(bar.value) : ''];
        }""")
        if not seen or seen[-1] != tuple(snap):
            seen.append(tuple(snap))
            if len(seen) == 3:
                shoot(page, "case-analysing", full_page=False)
                axe_check(page, "case page, analysis running")
        return snap[0] in ("completed", "failed")

    wait_until(progress, 600, "the analysis to finish", every_s=0.1)
    assert seen[-1][0] == "completed", seen
    running = [s for s in seen if s[0] == "running"]
    assert len({s[2] for s in running}) >= 2, seen        # the bar moved
    assert len({s[1] for s in running}) >= 2, seen        # through several stages
    assert page.locator("h1 + .badge").inner_text() == "Completed"

    # Every insight section, laid out.
    for section in ("summary", "soap", "diagnosis", "differentials", "investigations",
                    "treatments", "labs", "radiology"):
        assert page.locator(f"section#{section}").is_visible(), section
    with server.client(api_token(server, email)) as c:
        body = c.get(f"/cases/cases/{case_id}").json()
    ins = body["insights"]
    assert page.locator("#model-note").inner_text().startswith(
        f"Written by the model {(ins.get('model_info') or {}).get('name') or ins['model']}")
    # The banner shows exactly when the server says the model is the demonstration one.
    if (ins.get("model_info") or {}).get("demonstration"):
        assert "not medically meaningful" in page.locator("#demo-banner").inner_text()
    else:
        assert page.locator("#demo-banner").count() == 0
    assert page.locator("#soap dd").count() == 4
    assert page.locator("#differentials tbody tr").count() == len(ins["differential_diagnoses"])
    assert page.locator("#investigations .badge").count() == \
        len(ins["investigation_recommendations"])
    dx = ins["primary_diagnosis"]
    if dx["icd_code"]:
        assert dx["icd_code"] in page.locator("#diagnosis .icd").inner_text()
    # A section whose stage abstained says so; the others do not.
    section_stages = {"summary": "case_summary", "soap": "soap_note", "diagnosis": "diagnosis",
                      "differentials": "differential", "investigations": "recommendations",
                      "treatments": "recommendations", "labs": "lab_analysis",
                      "radiology": "radiology_analysis"}
    for section, stage in section_stages.items():
        abstained = (ins.get("stages") or {}).get(stage, {}).get("status") == "abstained"
        assert page.locator(f"section#{section} .abstained").count() == int(abstained), section
    # Lab rows: the server's deterministic rows when it sends them, else each lab file's own
    # values; the abnormal ones highlighted (haemoglobin 9.1 is low in both files).
    lab_rows = page.locator("#labs tbody tr")
    if isinstance(ins.get("labs"), list):
        assert lab_rows.count() == len(ins["labs"])
    else:
        assert lab_rows.count() == sum(
            len(json.loads(f["ai_summary"]).get("lab_values", {}))
            for f in body["files"] if f["file_category"] == "lab")
    assert lab_rows.count() >= 7
    assert page.locator("#labs tbody tr.abnormal", has_text="Hemoglobin").count() >= 1
    assert page.locator("#labs tbody tr.abnormal").count() < lab_rows.count()
    assert "ct_small.dcm" in page.locator("#radiology").inner_text()
    reading = page.locator("#radiology .reading dd").first.inner_text()
    assert reading == json_field(body, "ct_small.dcm", "findings")
    # Previews rendered by the server: the DICOM at its own size, the PDF's page.
    page.wait_for_function("() => [...document.querySelectorAll('.preview img')]"
                           ".some(i => i.src.startsWith('blob:') && i.naturalWidth === 128)")
    page.wait_for_function("() => document.querySelector(\"img[alt='Page 1 of PDF cbc.pdf']\")"
                           "?.naturalHeight === 1024")
    shoot(page, "case-completed")
    axe_check(page, "completed case page")

    # The print stylesheet: a clean report of one to three pages.
    page.emulate_media(media="print")
    page.screenshot(path=str(ARTIFACTS / "case-print-preview.png"), full_page=True)
    pdf_bytes = page.pdf(format="A4", print_background=True)
    (ARTIFACTS / "case-report.pdf").write_bytes(pdf_bytes)
    pdf = pypdfium2.PdfDocument(pdf_bytes)
    try:
        assert 1 <= len(pdf) <= 3, len(pdf)
        text = "".join(pdf[i].get_textpage().get_text_range() for i in range(len(pdf)))
        for part in ("Meera Iyer", "Primary diagnosis", "SOAP note", "Lab results",
                     ins["model"]):
            assert part in text, part
        assert "Delete case" not in text and "Choose files" not in text
        for i in range(len(pdf)):
            pdf[i].render(scale=1).to_pil().save(ARTIFACTS / f"case-report-page{i + 1}.png")
    finally:
        pdf.close()
    page.emulate_media(media="screen")

    # Edit the age.
    page.get_by_role("button", name="Edit patient details").click()
    page.get_by_label("Age (years)").fill("59")
    page.get_by_role("button", name="Save").click()
    page.locator("#patient dd", has_text="59 years").wait_for()

    # Re-analyse: the case is back in progress, without a reload.
    page.get_by_role("button", name="Re-analyse", exact=True).click()
    page.wait_for_function("() => ['queued', 'running'].includes("
                           "document.querySelector('#analysis').dataset.state)")
    assert page.locator("h1 + .badge").inner_text() == "Analysing"

    # Delete a file behind a confirmation; cancelling keeps it.
    card = page.locator(".file-card", has_text="cbc.csv")
    card.get_by_role("button", name="Delete cbc.csv").click()
    page.get_by_role("dialog").get_by_role("button", name="Cancel").click()
    assert card.count() == 1
    card.get_by_role("button", name="Delete cbc.csv").click()
    shoot(page, "confirm-delete-file", full_page=False)
    axe_check(page, "confirmation dialog")
    page.get_by_role("dialog").get_by_role("button", name="Delete file").click()
    card.wait_for(state="detached")
    assert page.locator(".file-card").count() == 2
    csv_id = next(f["file_id"] for f in body["files"] if f["file_name"] == "cbc.csv")
    assert not server.app.ctx.storage.exists(csv_id)

    # Delete the case.
    page.get_by_role("button", name="Delete case").click()
    page.get_by_role("dialog").get_by_role("button", name="Delete case").click()
    page.wait_for_url(re.compile(r"/app/$"))
    page.get_by_text("The case of Meera Iyer was deleted.").wait_for()
    page.get_by_role("heading", name="No cases yet").wait_for()
    with server.client(api_token(server, email)) as c:
        assert c.get(f"/cases/cases/{case_id}").status_code == 404
    assert not any(server.app.ctx.storage.exists(f["file_id"]) for f in body["files"])
    assert page.evaluate("window.__sameDocument") is True   # one document all along

    page.get_by_role("button", name="Sign out").click()
    page.get_by_text("You are signed out.").wait_for()
    page.goto(f"{server.url}/app/")
    page.wait_for_url("**/app/signin**")
    shoot(page, "signin")
    axe_check(page, "sign-in page")
    watch.assert_local_only()
    page.context.close()


def json_field(body: dict, file_name: str, key: str) -> str:
    f = next(f for f in body["files"] if f["file_name"] == file_name)
    return json.loads(f["ai_summary"])[key]
