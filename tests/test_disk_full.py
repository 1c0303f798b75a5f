"""Disk full: the data dir (database, stored files, temp uploads) on a 4 MiB tmpfs mounted
by the test. Uploads that do not fit fail with a clear 507 (or 413 when over a size limit)
and leave nothing behind; reads keep working; once space is freed, writes work again.

Two ways to run out: the configured free-space floor (``storage.min_free_bytes``) refuses an
upload before a byte is written, and with the floor at 0 the filesystem itself fills up in
the middle of a write (a real ENOSPC). Needs root (CAP_SYS_ADMIN) to mount; skipped
otherwise, with the reason.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

import docfactory as df
from conftest import Served, make_settings, make_user

pytestmark = [pytest.mark.e2e]

TMPFS_SIZE = "4m"
MiB = 1024 * 1024
FILL_CHUNK_BYTES = 64 * 1024
RADIOLOGY_MAX_BYTES = 1 * MiB


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "small"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); not running as root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs",
                           str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=True)   # still busy: detach


def _serve(mount: Path, start_server: Any, tmp_path: Path, min_free_bytes: int) -> Served:
    # Radiology files are capped below the free space, so an over-limit file meets its
    # limit (413) before the disk fills (which would be an equally honest 507).
    settings = make_settings(tmp_path, storage={"data_dir": str(mount / "data"),
                                                "min_free_bytes": min_free_bytes},
                             limits={"radiology_max_bytes": RADIOLOGY_MAX_BYTES})
    return start_server(settings)


def _fill(mount: Path, leave_bytes: int = 0) -> Path:
    """Write a filler file on the tmpfs until only ``leave_bytes`` (about) are free."""
    filler = mount / "filler"
    with open(filler, "wb") as fh:
        while True:
            free = shutil.disk_usage(mount).free
            if free <= leave_bytes:
                break
            try:
                fh.write(b"\0" * min(FILL_CHUNK_BYTES, max(4096, free - leave_bytes)))
                fh.flush()
            except OSError:
                break
    return filler


def _snapshot(data: Path) -> dict[str, Any]:
    with sqlite3.connect(f"file:{data / 'medmitra.sqlite3'}?mode=ro", uri=True) as db:
        cases = db.execute('SELECT COUNT(*) FROM "cases"').fetchone()[0]
        rows = sorted(r[0] for r in db.execute('SELECT "file_id" FROM "case_files"'))
    stored = sorted(p.name for p in (data / "files").glob("*/*"))
    temps = sorted(p.name for p in (data / "tmp").iterdir())
    return {"cases": cases, "rows": rows, "stored": stored, "temps": temps}


def _big_csv(n_bytes: int) -> bytes:
    line = b"Hemoglobin,9.1,g/dL,13.5-17.5,L\n"
    head = b"Test Name,Result,Units,Reference Range,Flag\n"
    return head + line * ((n_bytes - len(head)) // len(line) + 1)


def _create(c: httpx.Client, files: list[tuple[str, tuple[str, bytes, str]]] | None = None
            ) -> httpx.Response:
    return c.post("/cases/create_case", data={"patient_name": "Disk Patient",
                                              "patient_age": "50", "patient_gender": "male"},
                  files=files)


def _reads_work(c: httpx.Client, case_id: str, file_url: str, content: bytes) -> None:
    assert c.get("/cases/all_cases").status_code == 200
    r = c.get(f"/cases/cases/{case_id}")
    assert r.status_code == 200 and r.json()["case"]["patient_name"] == "Disk Patient"
    assert c.get(f"/cases/files/{case_id}").status_code == 200
    got = httpx.get(file_url, timeout=30)
    assert got.status_code == 200 and got.content == content


def test_free_space_floor_refuses_uploads_cleanly(mount, start_server, tmp_path, capsys) -> None:
    floor = 2 * MiB
    live = _serve(mount, start_server, tmp_path, floor)
    data = mount / "data"
    user = make_user()
    small = df.lab_csv()
    with live.client(user.token) as c:
        first = _create(c, [("lab_files", ("labs.csv", small, "text/csv"))])
        assert first.status_code == 201, first.text
        case_id = first.json()["case"]["case_id"]
        file_url = first.json()["uploaded_files"][0]["file_url"]
        filler = _fill(mount, leave_bytes=floor - 512 * 1024)   # below the floor
        before = _snapshot(data)

        refused = _create(c, [("lab_files", ("labs.csv", small, "text/csv"))])
        assert refused.status_code == 507, refused.text
        assert "storage" in refused.json()["detail"].lower()
        up = c.post("/cases/upload", data={"case_id": case_id},
                    files=[("file", ("more.csv", small, "text/csv"))])
        assert up.status_code == 507, up.text
        assert _snapshot(data) == before          # nothing partial: no row, no bytes, no temp
        _reads_work(c, case_id, file_url, small)
        health = httpx.get(f"{live.url}/health", timeout=10).json()
        assert health["storage"]["status"] == "low"

        filler.unlink()
        again = c.post("/cases/upload", data={"case_id": case_id},
                       files=[("file", ("more.csv", small, "text/csv"))])
        assert again.status_code == 201, again.text
        assert len(_snapshot(data)["stored"]) == len(before["stored"]) + 1
    with capsys.disabled():
        print(f"\n[disk] floor {floor} B: create -> {refused.status_code}, upload -> "
              f"{up.status_code}, after freeing -> {again.status_code}")


def test_real_enospc_mid_write_leaves_nothing_and_recovers(mount, start_server, tmp_path,
                                                           capsys) -> None:
    live = _serve(mount, start_server, tmp_path, 0)
    data = mount / "data"
    user = make_user()
    small = df.lab_csv()
    outcomes: dict[str, int] = {}
    with live.client(user.token) as c:
        first = _create(c, [("lab_files", ("labs.csv", small, "text/csv"))])
        assert first.status_code == 201, first.text
        case_id = first.json()["case"]["case_id"]
        file_url = first.json()["uploaded_files"][0]["file_url"]
        before = _snapshot(data)
        free = shutil.disk_usage(mount).free
        # Bigger than the whole free space, within every size limit: the disk fills up
        # in the middle of writing the temp file.
        too_big = _big_csv(free + MiB)
        assert len(too_big) < live.settings.limits.lab_max_bytes

        r = _create(c, [("lab_files", ("labs.csv", small, "text/csv")),
                        ("lab_files", ("big.csv", too_big, "text/csv"))])
        outcomes["create (ENOSPC)"] = r.status_code
        assert r.status_code == 507, r.text
        assert "storage" in r.json()["detail"].lower()
        assert _snapshot(data) == before
        r = c.post("/cases/upload", data={"case_id": case_id},
                   files=[("file", ("big.csv", too_big, "text/csv"))])
        outcomes["upload (ENOSPC)"] = r.status_code
        assert r.status_code == 507, r.text
        assert _snapshot(data) == before
        _reads_work(c, case_id, file_url, small)

        # A file over its size limit (with room on the disk for the limit) is a 413.
        huge = b"\x89PNG\r\n\x1a\n" + b"\0" * (live.settings.limits.radiology_max_bytes + 1)
        r = c.post("/cases/upload", data={"case_id": case_id, "category": "radiology"},
                   files=[("file", ("huge.png", huge, "image/png"))])
        outcomes["upload over the size limit"] = r.status_code
        assert r.status_code == 413, r.text
        assert _snapshot(data) == before

        # Completely full, so even the database cannot grow: writes fail cleanly (507),
        # reads go on.
        filler = _fill(mount, leave_bytes=0)
        r = _create(c)
        outcomes["create, no files, disk at 0 B"] = r.status_code
        assert r.status_code == 507, r.text
        r = c.put(f"/cases/cases/{case_id}", json={"case_summary": "x" * 20000})
        outcomes["update, disk at 0 B"] = r.status_code
        assert r.status_code in (200, 507), r.text
        r = c.post("/cases/upload", data={"case_id": case_id},
                   files=[("file", ("more.csv", small, "text/csv"))])
        outcomes["upload, disk at 0 B"] = r.status_code
        assert r.status_code == 507, r.text
        _reads_work(c, case_id, file_url, small)
        assert _snapshot(data)["rows"] == before["rows"]
        assert _snapshot(data)["temps"] == []

        filler.unlink()
        r = _create(c, [("lab_files", ("labs.csv", small, "text/csv"))])
        outcomes["create after freeing"] = r.status_code
        assert r.status_code == 201, r.text
        after = _snapshot(data)
        assert after["cases"] == before["cases"] + 1
        assert set(after["rows"]) == set(after["stored"])
        with sqlite3.connect(f"file:{data / 'medmitra.sqlite3'}?mode=ro", uri=True) as db:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    with capsys.disabled():
        print("\n[disk] ENOSPC (min_free_bytes=0): "
              + ", ".join(f"{k} -> {v}" for k, v in outcomes.items()))


def test_a_full_database_is_recognised_without_root(tmp_path: Path) -> None:
    """The 507 mapping of a database that cannot grow, on a real SQLITE_FULL (a page cap
    instead of a full disk, so it runs without root)."""
    from medmitra.db.errors import is_database_full

    db = sqlite3.connect(tmp_path / "capped.sqlite3")
    db.execute("CREATE TABLE t (b BLOB)")
    db.commit()
    db.execute("PRAGMA max_page_count = 3")
    with pytest.raises(sqlite3.OperationalError) as info:
        db.execute("INSERT INTO t VALUES (?)", (b"\0" * 100_000,))
    db.close()
    assert is_database_full(info.value)

    class Wrapped(Exception):   # as the ORM wraps a driver error
        pass

    try:
        raise Wrapped("write failed") from info.value
    except Wrapped as exc:
        assert is_database_full(exc)
    assert not is_database_full(sqlite3.OperationalError("database is locked"))
    assert not is_database_full(ValueError("no"))
