"""Per-user isolation (api.md sections 1-2): user B gets 404 — never 403, never data — on
every route for user A's case and files; signed download links open exactly one file for
a limited time; a ``user_id`` field naming someone else is refused with 403."""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any, Iterator

import httpx
import pytest

from conftest import Served, User, make_settings, make_user, serve_in_process
from medmitra.db.models import Case, CaseFile, Job
from medmitra.services.links import LinkSigner
from tests import docfactory as df

SECRET_NAME = "Kavya Menon-Isolated"


def fetch(server: Served, url: str) -> httpx.Response:
    """GET with no Authorization header, as a browser tab opening file_url."""
    with server.client() as c:
        return c.get(url)


class World:
    """Alice's case with two files and Bob's case with one, on one shared server."""

    def __init__(self, server: Served):
        self.server = server
        self.alice, self.bob = make_user(), make_user()
        self.a_case, self.a_files = self._create(self.alice, SECRET_NAME,
                                                 [("lab_files", ("cbc.csv", df.lab_csv())),
                                                  ("radiology_files", ("cxr.png", df.xray_png()))])
        self.b_case, self.b_files = self._create(self.bob, "Bob Patient",
                                                 [("lab_files", ("b.pdf", df.text_pdf()))])

    def _create(self, user: User, name: str, files: list) -> tuple[dict, list[dict]]:
        with self.server.client(user.token) as c:
            r = c.post("/cases/create_case", files=files,
                       data={"patient_name": name, "patient_age": "40",
                             "patient_gender": "female", "case_summary": "private history"})
        assert r.status_code == 201, r.text
        return r.json()["case"], r.json()["uploaded_files"]

    def snapshot(self) -> dict[str, Any]:
        """Everything a stray request could change."""
        s = self.server
        return {
            "cases": s.run(Case.all().order_by("id").values()),
            "files": s.run(CaseFile.all().order_by("id").values()),
            "jobs": s.run(Job.all().order_by("id").values("id", "case_id", "state")),
            "disk": sorted(p.name for p in (s.settings.data_path / "files").rglob("*")
                           if p.is_file()),
            "tmp": sorted(p.name for p in (s.settings.data_path / "tmp").iterdir()),
        }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    settings = make_settings(tmp_path_factory.mktemp("iso"))
    with serve_in_process(settings, start_workers=False) as server:
        yield World(server)


# Each row: how Bob (or anyone) reaches for one of Alice's things. ``w`` is the World.
def _upload_into(ident_of):
    def call(c: httpx.Client, w: World) -> httpx.Response:
        return c.post("/cases/upload", data={"case_id": ident_of(w), "category": "lab"},
                      files={"file": ("x.csv", df.lab_csv())})
    return call


MATRIX = {
    "get case by uuid": lambda c, w: c.get(f"/cases/cases/{w.a_case['case_id']}"),
    "get case by int id": lambda c, w: c.get(f"/cases/cases/{w.a_case['id']}"),
    "update case": lambda c, w: c.put(f"/cases/cases/{w.a_case['case_id']}",
                                      json={"patient_name": "Hijacked"}),
    "update case by int id": lambda c, w: c.put(f"/cases/cases/{w.a_case['id']}",
                                                json={"status": "completed"}),
    "delete case": lambda c, w: c.delete(f"/cases/cases/{w.a_case['case_id']}"),
    "delete case by int id": lambda c, w: c.delete(f"/cases/cases/{w.a_case['id']}"),
    "analyze": lambda c, w: c.post(f"/cases/analyze/{w.a_case['case_id']}"),
    "analyze by int id": lambda c, w: c.post(f"/cases/analyze/{w.a_case['id']}", json={}),
    "upload into case": _upload_into(lambda w: w.a_case["case_id"]),
    "upload into case by int id": _upload_into(lambda w: str(w.a_case["id"])),
    "files list": lambda c, w: c.get(f"/cases/files/{w.a_case['case_id']}"),
    "files list by int id": lambda c, w: c.get(f"/cases/files/{w.a_case['id']}"),
    "file get": lambda c, w: c.get(f"/cases/file/{w.a_files[0]['file_id']}"),
    "file get by int id": lambda c, w: c.get(f"/cases/file/{w.a_files[1]['id']}"),
    "file delete": lambda c, w: c.delete(f"/cases/file/{w.a_files[0]['file_id']}"),
    "file delete by int id": lambda c, w: c.delete(f"/cases/file/{w.a_files[1]['id']}"),
    "file delete naming own case": lambda c, w: c.delete(
        f"/cases/file/{w.a_files[0]['file_id']}", params={"case_id": w.b_case["case_id"]}),
    # Bob's own file, but claimed to be in Alice's case: the case lookup is scoped too.
    "own file delete naming other's case": lambda c, w: c.delete(
        f"/cases/file/{w.b_files[0]['file_id']}", params={"case_id": w.a_case["case_id"]}),
}


@pytest.mark.parametrize("name", list(MATRIX))
def test_other_users_things_answer_404(world: World, name: str) -> None:
    before = world.snapshot()
    with world.server.client(world.bob.token) as c:
        r = MATRIX[name](c, world)
    assert r.status_code == 404, r.text
    body = r.json()
    assert set(body) == {"detail", "error"} and body["detail"] == body["error"]
    # Nothing about Alice's case leaks into the answer ...
    for secret in (SECRET_NAME, world.a_case["case_id"], world.a_files[0]["file_id"],
                   "private history"):
        assert secret not in r.text
    # ... and nothing changed.
    assert world.snapshot() == before
    # The same request by the owner works (so the 404 is about ownership, not the route);
    # read-only routes only, so the shared world stays intact.
    if r.request.method == "GET":
        with world.server.client(world.alice.token) as c:
            assert MATRIX[name](c, world).status_code == 200


def test_list_shows_only_own_cases(world: World) -> None:
    with world.server.client(world.bob.token) as c:
        r = c.get("/cases/all_cases")
        searched = c.get("/cases/all_cases", params={"search": "Kavya"})
    assert r.status_code == 200
    assert [x["case_id"] for x in r.json()["cases"]] == [world.b_case["case_id"]]
    assert r.json()["total"] == 1
    assert SECRET_NAME not in r.text
    assert searched.json() == {"cases": [], "total": 0, "page": 1, "limit": 0}
    with world.server.client(world.alice.token) as c:
        assert [x["case_id"] for x in c.get("/cases/all_cases").json()["cases"]] == \
            [world.a_case["case_id"]]


# -- signed download links ---------------------------------------------------------------

def _decode(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _token(file_url: str) -> str:
    return file_url.rsplit("/", 1)[1]


def test_link_downloads_its_own_file_without_a_header(world: World) -> None:
    f = world.a_files[0]
    r = fetch(world.server, f["file_url"])
    assert r.status_code == 200 and r.content == df.lab_csv()
    # Another user's token in the header changes nothing: the link carries the permission.
    with world.server.client(world.bob.token) as c:
        r = c.get(f["file_url"])
    assert r.status_code == 200 and r.content == df.lab_csv()


def test_tampered_links_never_open_another_file(world: World) -> None:
    url = world.a_files[0]["file_url"]
    base, token = url.rsplit("/", 1)
    raw = _decode(token)
    assert len(raw) == 56          # file uuid | owner uuid | expiry | mac (see links.py)
    other_file = uuid.UUID(world.a_files[1]["file_id"]).bytes
    bobs_file = uuid.UUID(world.b_files[0]["file_id"]).bytes
    bob = uuid.UUID(world.bob.id).bytes
    far_future = (2**40).to_bytes(8, "big")
    forged = {
        "other file of the same owner": other_file + raw[16:],
        "another user's file": bobs_file + raw[16:],
        "owner swapped": raw[:16] + bob + raw[32:],
        "expiry pushed out": raw[:32] + far_future + raw[40:],
        "one mac bit flipped": raw[:-1] + bytes([raw[-1] ^ 1]),
        "mac cut off": raw[:40],
        "extra byte": raw + b"\x00",
    }
    for label, data in forged.items():
        r = fetch(world.server, f"{base}/{_encode(data)}")
        assert r.status_code == 404, label
        assert set(r.json()) == {"detail", "error"}, label
    for junk in ("", "x", "not-a-token", "A" * 75, "A" * 500, token[:-2], token + "AA",
                 "%00" + token, "..%2F..%2Fetc%2Fpasswd"):
        r = fetch(world.server, f"{base}/{junk}")
        assert r.status_code == 404, junk
    assert fetch(world.server, url).status_code == 200   # the real one still works


def test_signed_link_names_file_and_owner(world: World) -> None:
    """A correctly signed link still opens a file only for the owner it names."""
    links = LinkSigner(world.server.settings.auth.jwt_secret,
                       world.server.settings.limits.file_url_ttl_s)
    base = world.a_files[0]["file_url"].rsplit("/", 1)[0]
    a_file = world.a_files[0]["file_id"]
    assert fetch(world.server, f"{base}/{links.sign(a_file, world.alice.id)}").status_code == 200
    assert fetch(world.server, f"{base}/{links.sign(a_file, world.bob.id)}").status_code == 404
    assert fetch(world.server, f"{base}/{links.sign(str(uuid.uuid4()), world.alice.id)}").status_code == 404
    other_key = LinkSigner("another-secret-" + "y" * 40, 3600)
    assert fetch(world.server, f"{base}/{other_key.sign(a_file, world.alice.id)}").status_code == 404


def test_expired_link_answers_404(world: World) -> None:
    s = world.server.settings
    links = LinkSigner(s.auth.jwt_secret, s.limits.file_url_ttl_s)
    base = world.a_files[0]["file_url"].rsplit("/", 1)[0]
    a_file = world.a_files[0]["file_id"]
    expired = links.sign(a_file, world.alice.id, now=time.time() - s.limits.file_url_ttl_s - 5)
    fresh = links.sign(a_file, world.alice.id, now=time.time() - s.limits.file_url_ttl_s + 60)
    r = fetch(world.server, f"{base}/{expired}")
    assert r.status_code == 404
    assert r.json()["detail"] == r.json()["error"]
    assert fetch(world.server, f"{base}/{fresh}").status_code == 200


def test_file_url_expires_after_the_configured_ttl(world: World) -> None:
    """The links the server hands out carry expiry = now + file_url_ttl_s."""
    raw = _decode(_token(world.a_files[0]["file_url"]))
    exp = int.from_bytes(raw[32:40], "big")
    ttl = world.server.settings.limits.file_url_ttl_s
    assert time.time() + ttl - 120 < exp <= time.time() + ttl + 1


# -- user_id fields naming someone else: 403 ----------------------------------------------

def test_user_id_naming_someone_else_is_403(world: World) -> None:
    before = world.snapshot()
    alice = world.alice.id
    with world.server.client(world.bob.token) as c:
        responses = {
            "list user_id": c.get("/cases/all_cases", params={"user_id": alice}),
            "list userId": c.get("/cases/all_cases", params={"userId": alice}),
            "list garbage user_id": c.get("/cases/all_cases", params={"user_id": "nobody"}),
            "create": c.post("/cases/create_case",
                             data={"patient_name": "X", "patient_age": "3",
                                   "patient_gender": "male", "user_id": alice},
                             files={"lab_files": ("a.csv", df.lab_csv())}),
            "upload": c.post("/cases/upload",
                             data={"case_id": world.b_case["case_id"], "user_id": alice},
                             files={"file": ("a.csv", df.lab_csv())}),
            "update": c.put(f"/cases/cases/{world.b_case['case_id']}",
                            json={"user_id": alice, "patient_name": "X"}),
        }
    for label, r in responses.items():
        assert r.status_code == 403, (label, r.text)
        assert r.json()["detail"] == r.json()["error"], label
        assert SECRET_NAME not in r.text
    assert world.snapshot() == before
