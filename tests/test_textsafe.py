"""Text the database cannot store is refused from clients and scrubbed from models."""

from __future__ import annotations

import pytest

from medmitra import textsafe


@pytest.mark.parametrize("value, ok", [
    ("plain", True), ("नमस्ते", True), ({"a": ["b", {"c": 1}]}, True), (None, True),
    ("nul\x00inside", False), ("\ud800", False), ({"k\x00": "v"}, False),
    ({"k": ["ok", "\udfff"]}, False), ([[[["deep\x00"]]]], False),
])
def test_is_storable(value, ok) -> None:
    assert textsafe.is_storable(value) is ok


def test_scrub_keeps_good_text_and_repairs_bad() -> None:
    out = textsafe.scrub({"a\x00": ["x\x00y", "\ud800z"], "n": 1.5, "t": "fine"})
    assert out == {"a": ["xy", "?z"], "n": 1.5, "t": "fine"}
    assert textsafe.is_storable(out)


def test_api_refuses_unstorable_text(server, alice) -> None:
    with server.client(alice.token) as c:
        r = c.post("/cases/create_case", data={"patient_name": "A", "patient_age": "3",
                                               "patient_gender": "f"})
        case_id = r.json()["case"]["case_id"]
        body = '{"case_summary": "x\\ud800"}'
        r = c.put(f"/cases/cases/{case_id}", content=body,
                  headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["detail"].startswith("case_summary")
        assert c.get(f"/cases/cases/{case_id}").json()["case"]["case_summary"] is None
