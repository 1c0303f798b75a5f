"""Bad input (api.md section 1 and issue 2 "Bad input"): a table of bad requests. Each row
asserts the exact status, the error body {"detail", "error"} with equal strings,
``WWW-Authenticate: Bearer`` on 401, and that nothing changed: no case, file or job row,
no bytes under data_dir/files, nothing left in data_dir/tmp, the existing case untouched.
Then file names and exact limits. The app is served in process; what only Sanic's HTTP
server does (the whole-request cap, early refusals on a kept connection) is in
tests/test_http_wire.py."""

from __future__ import annotations

import json
import time
import unicodedata
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import httpx
import pytest

from conftest import TEST_SECRET, Served, User, make_settings, make_user, serve_in_process
from medmitra.auth.jwt import issue_token
from medmitra.db.models import Case, CaseFile, Job
from tests import docfactory as df

LAB_MAX = 8 * 1024
RAD_MAX = 16 * 1024
FILES_MAX = 3
LIMITS = {"lab_max_bytes": LAB_MAX, "radiology_max_bytes": RAD_MAX,
          "files_per_request": FILES_MAX}
MiB = 1024 * 1024
CAP = 1 * MiB          # whole-request limit (server.request_max_bytes)
CREATE = "/cases/create_case"
GOOD = {"patient_name": "Ok Patient", "patient_age": "40", "patient_gender": "male"}


def pad_pdf(size: int) -> bytes:
    head = df.text_pdf()
    return head + b"%" * (size - len(head))


def pad_png(size: int) -> bytes:
    head = df.xray_png()
    return head + b"\x00" * (size - len(head))


@dataclass
class World:
    server: Served
    alice: User
    case: dict[str, Any]
    file: dict[str, Any]

    def snapshot(self) -> dict[str, Any]:
        data = self.server.settings.data_path
        return {
            "cases": self.server.run(Case.all().order_by("id").values()),
            "files": self.server.run(CaseFile.all().order_by("id").values()),
            "jobs": self.server.run(Job.all().order_by("id").values()),
            "disk": sorted(str(p) for p in (data / "files").rglob("*") if p.is_file()),
            "tmp": sorted(p.name for p in (data / "tmp").iterdir()),
        }


def world_settings(tmp_path_factory: Any, name: str) -> Any:
    """Small file limits and a 1 MiB request cap."""
    return make_settings(tmp_path_factory.mktemp(name), limits=LIMITS,
                         server={"request_max_bytes": CAP})


def make_world(server: Served) -> World:
    """One existing case with one file, which every bad request must leave as it was."""
    alice = make_user()
    with server.client(alice.token) as c:
        r = c.post(CREATE, data={**GOOD, "case_summary": "baseline"},
                   files={"lab_files": ("base.csv", df.lab_csv())})
    assert r.status_code == 201, r.text
    return World(server, alice, r.json()["case"], r.json()["uploaded_files"][0])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    """One app for the whole module (tortoise keeps one global connection set, so two apps
    must not overlap)."""
    with serve_in_process(world_settings(tmp_path_factory, "bad"),
                          start_workers=False) as server:
        yield make_world(server)


def assert_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["detail"] == body["error"]
    assert set(body) <= {"detail", "error", "errors"}
    assert "Traceback" not in r.text and "sqlite" not in r.text.lower()
    if status == 401:
        assert r.headers.get("www-authenticate") == "Bearer"
    return body


# -- request builders (each row: client, world -> response) -----------------------------

Call = Callable[[httpx.Client, World], httpx.Response]


def create(files: list | None = None, **over: str | None) -> Call:
    data = {k: v for k, v in {**GOOD, **over}.items() if v is not None}
    return lambda c, w: c.post(CREATE, data=data, files=files)


def upload(files: Any, case: str | None = "uuid", **extra: str) -> Call:
    def call(c: httpx.Client, w: World) -> httpx.Response:
        data = dict(extra)
        if case == "uuid":
            data["case_id"] = w.case["case_id"]
        elif case is not None:
            data["case_id"] = case
        return c.post("/cases/upload", data=data, files=files)
    return call


def raw(path: str, body: bytes, ctype: str | None, method: str = "POST") -> Call:
    headers = {"content-type": ctype} if ctype else {}
    return lambda c, w: c.request(method, path, content=body, headers=headers)


def put(body: Any) -> Call:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return lambda c, w: c.put(f"/cases/cases/{w.case['case_id']}", content=content,
                              headers={"content-type": "application/json"})


def analyze(body: bytes) -> Call:
    return lambda c, w: c.post(f"/cases/analyze/{w.case['case_id']}", content=body,
                               headers={"content-type": "application/json"})


def mp(*parts: bytes, boundary: bytes = b"B0UND") -> bytes:
    return b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts) + \
        b"--" + boundary + b"--\r\n"


def text_part(name: str, value: bytes) -> bytes:
    return f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value


def file_part(name: str, filename: str, data: bytes) -> bytes:
    return (f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode("utf-8") + data


GOOD_PARTS = [text_part(k, v.encode()) for k, v in GOOD.items()]
# Extra text fields, each under the field limit, together over the request cap.
NOTES = {f"note{i}": "n" * 60000 for i in range(20)}
OVER_CAP_NOTES = [text_part(k, v.encode()) for k, v in NOTES.items()]
MP = "multipart/form-data; boundary=B0UND"


def lab(name: str, data: bytes):
    return ("lab_files", (name, data))


def rad(name: str, data: bytes):
    return ("radiology_files", (name, data))


# -- the table ---------------------------------------------------------------------------

ROWS: list[tuple[str, Call, int]] = [
    # sizes
    ("lab file over its limit", create([lab("big.pdf", pad_pdf(LAB_MAX + 1))]), 413),
    ("radiology file over its limit", create([rad("big.png", pad_png(RAD_MAX + 1))]), 413),
    ("good files then one too big", create([lab("a.csv", df.lab_csv()),
                                            lab("b.pdf", df.text_pdf()),
                                            lab("big.pdf", pad_pdf(LAB_MAX + 1))]), 413),
    ("upload over radiology limit",
     upload({"file": ("big.png", pad_png(RAD_MAX + 1))}, category="radiology"), 413),
    ("upload lab over lab limit", upload({"file": ("big.pdf", pad_pdf(LAB_MAX + 1))},
                                         category="lab"), 413),
    ("upload PDF over lab limit, no category", upload({"file": ("b.pdf", pad_pdf(LAB_MAX + 1))}),
     413),
    # content judged from the bytes
    ("ELF renamed .pdf in lab", create([lab("report.pdf", df.elf_exe())]), 415),
    ("ELF as radiology", create([rad("xray.png", df.elf_exe())]), 415),
    ("Windows exe in lab", create([lab("r.pdf", df.mz_exe())]), 415),
    ("Mach-O in lab", create([lab("r.csv", df.macho_exe())]), 415),
    ("zip in lab", create([lab("r.pdf", df.zip_bytes())]), 415),
    ("GIF in radiology", create([rad("x.png", df.gif_bytes())]), 415),
    ("DICOM in lab", create([lab("scan.dcm", df.dicom(16, 16))]), 415),
    ("CSV as radiology", create([rad("x.csv", df.lab_csv())]), 415),
    ("good lab file then DICOM in lab", create([lab("a.csv", df.lab_csv()),
                                                lab("scan.dcm", df.dicom(16, 16))]), 415),
    ("upload ELF, no category", upload({"file": ("x.pdf", df.elf_exe())}), 415),
    ("upload DICOM as lab", upload({"file": ("x.dcm", df.dicom(16, 16))}, category="lab"), 415),
    # empty files
    ("zero-byte lab file", create([lab("empty.pdf", b"")]), 400),
    ("zero-byte radiology file after a good one", create([rad("a.png", df.xray_png()),
                                                          rad("e.png", b"")]), 400),
    ("upload zero-byte file", upload({"file": ("empty.csv", b"")}, category="lab"), 400),
    # patient_age
    *[(f"patient_age {v!r}", create(patient_age=v), 400)
      for v in ("abc", "-1", "151", "4.5", "", "  ", "1e2", "0x10", "+5", "40abc", "\u0663",
                "１０", "99999999999999999999")],
    # required fields
    ("patient_name missing", create(patient_name=None), 400),
    ("patient_age missing", create(patient_age=None), 400),
    ("patient_gender missing", create(patient_gender=None), 400),
    ("patient_name blank", create(patient_name="   "), 400),
    ("patient_name only control chars", create(patient_name="\x01\x02"), 400),
    ("patient_gender empty", create(patient_gender=""), 400),
    ("patient_name too long", create(patient_name="n" * 201), 400),
    ("case_summary of several MB, urlencoded", create(case_summary="x" * (5 * MiB)), 413),
    ("case_summary of 200 KB", create([lab("a.csv", df.lab_csv())],
                                      case_summary="x" * (200 * 1024)), 400),
    ("case_summary of 200 KB, urlencoded", create(case_summary="x" * (200 * 1024)), 400),
    ("case_summary one char over the limit", create(case_summary="x" * 20001), 400),
    ("no fields at all", raw(CREATE, mp(), MP), 400),
    ("hundreds of form parts", raw(CREATE, mp(*GOOD_PARTS, *[text_part(f"x{i}", b"1")
                                                            for i in range(300)]), MP), 400),
    # categories and fields
    ("unknown category", upload({"file": ("a.csv", df.lab_csv())}, category="xray"), 400),
    ("category in upper case", upload({"file": ("a.csv", df.lab_csv())}, category="LAB"), 400),
    ("unexpected file field on create", create([("files", ("a.csv", df.lab_csv()))]), 400),
    ("unexpected file field on upload", upload([lab("a.csv", df.lab_csv())]), 400),
    ("upload without case_id", upload({"file": ("a.csv", df.lab_csv())}, case=None), 400),
    ("upload without a file", upload(None, category="lab"), 400),
    ("upload case_id not an id", upload({"file": ("a.csv", df.lab_csv())}, case="abc"), 400),
    ("upload to a missing case", upload({"file": ("a.csv", df.lab_csv())},
                                        case=str(uuid.uuid4())), 404),
    ("upload to a missing integer id", upload({"file": ("a.csv", df.lab_csv())},
                                              case="987654"), 404),
    ("too many files on create", create([lab(f"{i}.csv", df.lab_csv())
                                         for i in range(FILES_MAX + 1)]), 400),
    ("too many files on upload", upload([("files", (f"{i}.csv", df.lab_csv()))
                                         for i in range(FILES_MAX + 1)]), 400),
    # malformed multipart and other bodies
    ("multipart without boundary", raw(CREATE, mp(*GOOD_PARTS), "multipart/form-data"), 400),
    ("boundary too long", raw(CREATE, mp(*GOOD_PARTS, boundary=b"b" * 300),
                              "multipart/form-data; boundary=" + "b" * 300), 400),
    ("garbage body", raw(CREATE, b"\x00\xff garbage \r\n\r\n--", MP), 400),
    ("wrong boundary in body", raw(CREATE, mp(*GOOD_PARTS, boundary=b"OTHER"), MP), 400),
    ("truncated body: no closing boundary",
     raw(CREATE, mp(*GOOD_PARTS, file_part("lab_files", "a.csv", df.lab_csv()))[:-12], MP), 400),
    ("truncated body inside a file", raw(CREATE, mp(*GOOD_PARTS, file_part(
        "lab_files", "a.csv", df.lab_csv()))[:-60], MP), 400),
    ("part without Content-Disposition",
     raw(CREATE, mp(*GOOD_PARTS, b"Content-Type: text/plain\r\n\r\nhello"), MP), 400),
    ("part without a name", raw(CREATE, mp(*GOOD_PARTS, b"Content-Disposition: form-data\r\n"
                                                        b"\r\nhello"), MP), 400),
    ("field value not UTF-8", raw(CREATE, mp(text_part("patient_name", b"\xff\xfe\xfa"),
                                             *GOOD_PARTS[1:]), MP), 400),
    ("JSON body on create", raw(CREATE, json.dumps(GOOD).encode(), "application/json"), 400),
    ("text body on create", raw(CREATE, b"patient_name=x", "text/plain"), 400),
    ("no content type on create", raw(CREATE, b"abc", None), 400),
    ("urlencoded create with a bad age",
     raw(CREATE, b"patient_name=A&patient_gender=m&patient_age=old",
         "application/x-www-form-urlencoded"), 400),
    ("JSON body on upload", raw("/cases/upload", b'{"case_id": 1}', "application/json"), 400),
    # PUT
    ("PUT bad JSON", put(b"{not json"), 400),
    ("PUT invalid UTF-8", put(b'{"patient_name": "\xff"}'), 400),
    ("PUT JSON array", put([{"status": "completed"}]), 400),
    ("PUT JSON string", put("completed"), 400),
    ("PUT empty object", put({}), 400),
    ("PUT empty body", put(b""), 400),
    ("PUT only unknown keys", put({"doctor_id": str(uuid.uuid4())}), 400),
    ("PUT invalid status", put({"status": "done"}), 400),
    ("PUT null status", put({"status": None}), 400),
    *[(f"PUT patient_age {v!r}", put({"patient_age": v}), 400)
      for v in ("abc", -1, 151, True, 4.5, "", None, [40])],
    ("PUT blank patient_name", put({"patient_name": " "}), 400),
    ("PUT numeric patient_name", put({"patient_name": 123}), 400),
    ("PUT null patient_gender", put({"patient_gender": None}), 400),
    ("PUT numeric case_summary", put({"case_summary": 5}), 400),
    ("PUT huge case_summary", put({"case_summary": "y" * (200 * 1024)}), 400),
    ("PUT one good field and one bad", put({"patient_name": "New", "patient_age": "x"}), 400),
    # analyze
    ("analyze bad JSON", analyze(b"{oops"), 400),
    ("analyze JSON array", analyze(b"[]"), 400),
    ("analyze option not a bool", analyze(b'{"includeImagingAnalysis": "yes"}'), 400),
    ("analyze threshold above 1", analyze(b'{"confidenceThreshold": 2}'), 400),
    ("analyze threshold as string", analyze(b'{"confidenceThreshold": "0.5"}'), 400),
    ("analyze threshold NaN", analyze(b'{"confidenceThreshold": NaN}'), 400),
    # list filters
    *[(f"list {k}={v!r}", (lambda k, v: lambda c, w: c.get("/cases/all_cases",
                                                           params={k: v}))(k, v), 400)
      for k, v in (("page", "0"), ("page", "abc"), ("page", "-1"), ("limit", "0"),
                   ("limit", "101"), ("limit", "1.5"), ("status", "bogus"),
                   ("sort_by", "password"), ("sortBy", "id; DROP TABLE cases"),
                   ("sort_order", "up"), ("start_date", "yesterday"),
                   ("endDate", "2026-13-45"), ("min_age", "-1"), ("max_age", "151"),
                   ("minAge", "abc"), ("search", "s" * 201))],
    # wrong methods
    *[(f"{m} {p}", (lambda m, p: lambda c, w: c.request(
        m, p.format(case=w.case["case_id"], file=w.file["file_id"])))(m, p), 405)
      for m, p in (("GET", CREATE), ("PUT", CREATE), ("GET", "/cases/upload"),
                   ("DELETE", "/cases/all_cases"), ("POST", "/cases/all_cases"),
                   ("POST", "/cases/cases/{case}"), ("PATCH", "/cases/cases/{case}"),
                   ("GET", "/cases/analyze/{case}"), ("DELETE", "/cases/analyze/{case}"),
                   ("POST", "/cases/files/{case}"), ("PUT", "/cases/file/{file}"),
                   ("POST", "/"), ("DELETE", "/"))],
    # unknown routes
    *[(f"unknown route {p}", (lambda p: lambda c, w: c.get(p))(p), 404)
      for p in ("/nope", "/cases", "/cases/nope", "/cases/cases", "/cases/cases/1/extra",
                "/cases/file", "/files/download", "/cases/create_case/1")],
]

# Bad ids on every route that takes one: 400 when it is no id at all, 404 when it could be.
ID_ROUTES = [("GET", "/cases/cases/{}"), ("PUT", "/cases/cases/{}"),
             ("DELETE", "/cases/cases/{}"), ("POST", "/cases/analyze/{}"),
             ("GET", "/cases/files/{}"), ("GET", "/cases/file/{}"),
             ("DELETE", "/cases/file/{}")]
BAD_IDS = [("abc", 400), ("1e9", 400), ("-1", 400), ("1.0", 400), ("0x1", 400),
           ("9" * 19, 400), ("9" * 40, 400), ("12345678-1234-1234-1234-12345678901z", 400),
           ("%00", 400), ("0", 404), ("9" * 18, 404), ("424242", 404),
           (str(uuid.uuid4()), 404)]
for method, path in ID_ROUTES:
    for ident, status in BAD_IDS:
        ROWS.append((f"{method} {path.format(ident[:24])}",
                     (lambda m, u: lambda c, w: c.request(
                         m, u, json={"status": "completed"} if m == "PUT" else None))(
                         method, path.format(ident)), status))


# Over the whole-request cap (server.request_max_bytes), which Sanic's HTTP server counts
# as the body arrives: these run on a socket, in tests/test_http_wire.py.
CAP_ROWS: list[tuple[str, Call, int]] = [
    ("case_summary of several MB", create([lab("a.csv", df.lab_csv())],
                                          case_summary="x" * (5 * MiB)), 413),
    ("fields each fine, together over the request cap",
     create([lab("a.csv", df.lab_csv())], **NOTES), 413),
    ("PUT body over the request cap", put({"case_summary": "y" * (3 * MiB)}), 413),
]


def test_table_names_are_unique() -> None:
    names = [r[0] for r in ROWS + CAP_ROWS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name, call, status", ROWS, ids=[r[0] for r in ROWS])
def test_bad_request_changes_nothing(world: World, name: str, call: Call, status: int) -> None:
    refused_without_a_trace(world, call, status)


def refused_without_a_trace(world: World, call: Call, status: int) -> None:
    """``call`` answers ``status`` with the error body, and nothing changed."""
    before = world.snapshot()
    with world.server.client(world.alice.token) as c:
        r = call(c, world)
    body = assert_error(r, status)
    if status == 400 and "errors" in body:
        assert all(isinstance(e["loc"], list) and e["msg"] for e in body["errors"])
    assert world.snapshot() == before


def test_empty_update_message(world: World) -> None:
    with world.server.client(world.alice.token) as c:
        r = put({})(c, world)
    assert assert_error(r, 400)["detail"] == "No data provided for update"


@pytest.mark.parametrize("value", ["abc", "-1", "151", "4.5", ""])
def test_age_errors_name_the_field(world: World, value: str) -> None:
    with world.server.client(world.alice.token) as c:
        r = create(patient_age=value)(c, world)
    body = assert_error(r, 400)
    assert body["errors"][0]["loc"] == ["form", "patient_age"]
    assert "patient_age" in body["detail"]


# -- authentication ----------------------------------------------------------------------

def _expired() -> str:
    return issue_token(TEST_SECRET, user_id=str(uuid.uuid4()), expires_in_s=60,
                       now=time.time() - 3600)


AUTH_HEADERS = {
    "missing": None,
    "garbage bearer": "Bearer garbage",
    "bearer without token": "Bearer",
    "basic scheme": "Basic YWxpY2U6c2VjcmV0",
    "three dots": "Bearer a.b.c",
    "bare uuid (trust_user_id off)": f"Bearer {uuid.uuid4()}",
    "other secret": "Bearer " + issue_token("other-secret-" + "z" * 40,
                                            user_id=str(uuid.uuid4())),
    "expired": "Bearer " + _expired(),
}
AUTH_ROUTES = [("GET", "/cases/all_cases"), ("GET", "/cases/cases/{case}"),
               ("PUT", "/cases/cases/{case}"), ("DELETE", "/cases/cases/{case}"),
               ("POST", "/cases/analyze/{case}"), ("GET", "/cases/files/{case}"),
               ("GET", "/cases/file/{file}"), ("DELETE", "/cases/file/{file}"),
               ("POST", CREATE), ("POST", "/cases/upload")]


@pytest.mark.parametrize("method, path", AUTH_ROUTES)
@pytest.mark.parametrize("kind", list(AUTH_HEADERS))
def test_bad_tokens_answer_401(world: World, method: str, path: str, kind: str) -> None:
    before = world.snapshot()
    url = path.format(case=world.case["case_id"], file=world.file["file_id"])
    headers = {"Authorization": AUTH_HEADERS[kind]} if AUTH_HEADERS[kind] else {}
    kw: dict[str, Any] = {}
    if path in (CREATE, "/cases/upload"):
        kw = {"data": {**GOOD, "case_id": world.case["case_id"], "user_id": world.alice.id},
              "files": {"lab_files" if path == CREATE else "file": ("a.csv", df.lab_csv())}}
    elif method == "PUT":
        kw = {"json": {"status": "completed"}}
    with world.server.client() as c:
        r = c.request(method, url, headers=headers, **kw)
    assert_error(r, 401)
    assert world.snapshot() == before


# -- file names --------------------------------------------------------------------------

NAMES = [  # as sent (raw bytes of the multipart header), stored display name
    ("../../etc/passwd", "passwd"),
    ("..\\..\\windows\\system32\\boot.ini", "boot.ini"),
    ("/abs/path/report.csv", "report.csv"),
    ("a\x01b\x1b[31mc\x7f.csv", "ab[31mc.csv"),
    ("tab\there.csv", "tab here.csv"),
    ("\u202etxt.exe.csv", "txt.exe.csv"),
    ("....hidden.csv", "hidden.csv"),
    ("nul\x00byte.csv", "nulbyte.csv"),
    ("../", "file"),
    ("r\u00e9sum\u00e9 \u0930\u093f\u092a\u094b\u0930\u094d\u091f.csv",
     "r\u00e9sum\u00e9 \u0930\u093f\u092a\u094b\u0930\u094d\u091f.csv"),
]


def test_hostile_file_names_are_sanitised_and_stored_by_uuid(world: World) -> None:
    data = world.server.settings.data_path
    with world.server.client(world.alice.token) as c:
        stored = []
        for i in range(0, len(NAMES), FILES_MAX):
            chunk = NAMES[i:i + FILES_MAX]
            parts = [*GOOD_PARTS] + [file_part("lab_files", s, df.lab_csv()) for s, _ in chunk]
            r = raw(CREATE, mp(*parts), MP)(c, world)
            assert r.status_code == 201, r.text
            stored += r.json()["uploaded_files"]
            c.delete(f"/cases/cases/{r.json()['case']['case_id']}")   # keep the world clean
            for f in r.json()["uploaded_files"]:
                assert not (data / "files" / f["file_id"][:2] / f["file_id"]).exists()
    assert [f["file_name"] for f in stored] == [want for _, want in NAMES]
    for f in stored:
        assert "/" not in f["file_name"] and "\\" not in f["file_name"]
        assert not any(unicodedata.category(ch) == "Cc" for ch in f["file_name"])
    # Nothing was ever written outside data_dir/files/<2 hex>/<uuid>.
    assert not (data / "etc").exists() and not (data.parent / "etc").exists()
    assert not list(data.rglob("passwd")) and not list(data.rglob("*.ini"))


def test_stored_path_is_the_file_uuid(world: World) -> None:
    data = world.server.settings.data_path
    before = {p for p in (data / "files").rglob("*") if p.is_file()}
    parts = [*GOOD_PARTS, file_part("lab_files", "../../../../tmp/evil.csv", df.lab_csv())]
    with world.server.client(world.alice.token) as c:
        r = raw(CREATE, mp(*parts), MP)(c, world)
        assert r.status_code == 201, r.text
        fid = r.json()["uploaded_files"][0]["file_id"]
        new = [p for p in (data / "files").rglob("*") if p.is_file() and p not in before]
        c.delete(f"/cases/cases/{r.json()['case']['case_id']}")
    assert [p.relative_to(data).as_posix() for p in new] == [f"files/{fid[:2]}/{fid}"]
    assert not list(data.rglob("evil.csv"))


# -- exact limits ------------------------------------------------------------------------

def test_files_exactly_at_their_limits_are_accepted(world: World) -> None:
    with world.server.client(world.alice.token) as c:
        r = create([lab("at.pdf", pad_pdf(LAB_MAX)), rad("at.png", pad_png(RAD_MAX)),
                    lab("c.csv", df.lab_csv())])(c, world)
        assert r.status_code == 201, r.text
        assert [f["file_size"] for f in r.json()["uploaded_files"]] == \
            [LAB_MAX, RAD_MAX, len(df.lab_csv())]
        assert c.delete(f"/cases/cases/{r.json()['case']['case_id']}").status_code == 200


def test_boundary_ages_are_accepted(world: World) -> None:
    with world.server.client(world.alice.token) as c:
        for age in ("0", "150", " 007 "):
            r = create(patient_age=age)(c, world)
            assert r.status_code == 201, r.text
            assert r.json()["case"]["patient_age"] == int(age)
            c.delete(f"/cases/cases/{r.json()['case']['case_id']}")
