"""All-or-nothing writes (api.md section 4, "Create case"): a request that fails at any
point — a bad third file, a failure inside the database transaction, a full disk while
moving files into place — leaves no case row, no file row, no job, no bytes and no temp
files behind; an upload into an existing case leaves that case as it was."""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest

from medmitra import storage as storage_mod
from medmitra.db.models import Case, CaseFile, Job
from medmitra.jobs import queue
from tests import docfactory as df

FIELDS = {"patient_name": "Crash Test", "patient_age": "61", "patient_gender": "male",
          "case_summary": "consistency"}
GOOD_TWO = [("lab_files", ("cbc.csv", df.lab_csv())),
            ("radiology_files", ("cxr.png", df.xray_png()))]


def state(server: Any) -> dict[str, Any]:
    data = server.settings.data_path
    return {
        "cases": server.run(Case.all().order_by("id").values()),
        "files": server.run(CaseFile.all().order_by("id").values()),
        "jobs": server.run(Job.all().order_by("id").values()),
        "disk": sorted(str(p.relative_to(data)) for p in (data / "files").rglob("*")
                       if p.is_file()),
        "tmp": sorted(p.name for p in (data / "tmp").iterdir()),
    }


EMPTY = {"cases": [], "files": [], "jobs": [], "disk": [], "tmp": []}


@pytest.mark.parametrize("third, status", [
    (("lab_files", ("evil.pdf", df.elf_exe())), 415),
    (("radiology_files", ("scan.dcm", b"")), 400),
    (("lab_files", ("scan.dcm", df.dicom())), 415),
    (("radiology_files", ("big.png", df.xray_png() + b"\x00" * 20000)), 413),
])
def test_create_with_a_bad_third_file_leaves_nothing(start_app, tmp_path, alice, third,
                                                     status) -> None:
    from conftest import make_settings

    server = start_app(make_settings(tmp_path, limits={"radiology_max_bytes": 16384}))
    with server.client(alice.token) as c:
        r = c.post("/cases/create_case", data=FIELDS, files=[*GOOD_TWO, third])
        assert r.status_code == status, r.text
        assert c.get("/cases/all_cases").json()["total"] == 0
    assert state(server) == EMPTY


@pytest.fixture
def existing(server, alice) -> dict[str, Any]:
    with server.client(alice.token) as c:
        r = c.post("/cases/create_case", data=FIELDS, files=[GOOD_TWO[0]])
        assert r.status_code == 201, r.text
        c.put(f"/cases/cases/{r.json()['case']['case_id']}", json={"status": "completed"})
    return r.json()["case"]


def test_upload_with_a_bad_third_file_leaves_the_case_as_it_was(server, alice,
                                                                existing) -> None:
    before = state(server)
    files = [("files", ("a.pdf", df.text_pdf())), ("files", ("b.png", df.xray_png())),
             ("files", ("c.pdf", df.elf_exe()))]
    with server.client(alice.token) as c:
        r = c.post("/cases/upload", data={"case_id": existing["case_id"]}, files=files)
        assert r.status_code == 415, r.text
        case = c.get(f"/cases/cases/{existing['case_id']}").json()["case"]
    assert state(server) == before
    assert case["status"] == "completed"


def _fail_on_call(n: int, exc: BaseException):
    """A replacement for an async method that raises ``exc`` on its n-th call."""
    calls = {"n": 0}

    def wrap(original):
        async def patched(*args: Any, **kw: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == n:
                raise exc
            return await original(*args, **kw)
        return patched
    return wrap, calls


def test_failure_inside_the_transaction_leaves_no_bytes(server, alice, monkeypatch) -> None:
    """The second file row fails to save after both files were moved into place: the
    transaction rolls back (no case row) and the moved bytes are removed."""
    wrap, calls = _fail_on_call(2, RuntimeError("disk I/O error (injected)"))
    monkeypatch.setattr(CaseFile, "save", wrap(CaseFile.save))
    with server.client(alice.token) as c:
        r = c.post("/cases/create_case", data=FIELDS,
                   files=[*GOOD_TWO, ("lab_files", ("c.pdf", df.text_pdf()))])
    assert calls["n"] == 2
    assert r.status_code == 500
    assert r.json() == {"detail": "Internal server error", "error": "Internal server error"}
    assert state(server) == EMPTY


def test_failure_queueing_the_job_rolls_back_the_case(server, alice, monkeypatch) -> None:
    wrap, calls = _fail_on_call(1, RuntimeError("queue broken (injected)"))
    monkeypatch.setattr(queue, "enqueue", wrap(queue.enqueue))
    with server.client(alice.token) as c:
        r = c.post("/cases/create_case", data=FIELDS, files=GOOD_TWO)
    assert calls["n"] == 1 and r.status_code == 500
    assert "injected" not in r.text
    assert state(server) == EMPTY


def test_failure_inside_the_upload_transaction_leaves_no_bytes(server, alice, existing,
                                                               monkeypatch) -> None:
    before = state(server)
    wrap, calls = _fail_on_call(1, RuntimeError("queue broken (injected)"))
    monkeypatch.setattr(queue, "enqueue", wrap(queue.enqueue))
    with server.client(alice.token) as c:
        r = c.post("/cases/upload", data={"case_id": existing["case_id"]},
                   files=[("files", ("a.pdf", df.text_pdf())),
                          ("files", ("b.png", df.xray_png()))])
    assert calls["n"] == 1 and r.status_code == 500
    assert state(server) == before


def test_disk_full_while_moving_files_into_place(server, alice, monkeypatch) -> None:
    """ENOSPC on the second rename: 507, the first file's bytes are removed again."""
    real_replace = os.replace
    files_dir = str(server.settings.data_path / "files")
    moved = []

    def replace(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
        if str(dst).startswith(files_dir):
            moved.append(dst)
            if len(moved) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(storage_mod.os, "replace", replace)
    with server.client(alice.token) as c:
        r = c.post("/cases/create_case", data=FIELDS,
                   files=[*GOOD_TWO, ("lab_files", ("c.pdf", df.text_pdf()))])
    monkeypatch.undo()
    assert len(moved) == 2
    assert r.status_code == 507, r.text
    assert r.json()["detail"] == r.json()["error"]
    assert state(server) == EMPTY
