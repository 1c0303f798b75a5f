"""Schema fuzzing: Schemathesis against the live server's own /openapi.json.

Every operation of the served document is fuzzed with a valid Bearer token, with data that
matches the schema (positive) and data that breaks it (negative). Each response must not be
a 5xx and must match the documented status codes, content types, headers and body schema.
Path ids are real ids of existing cases/files part of the time, so the handlers behind the
404 are reached too.

Examples per operation and mode: ``MEDMITRA_FUZZ_EXAMPLES`` (CI default small; the full
run, scripts/fuzz-full.sh, uses many). The figures are printed at the end.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from hypothesis.errors import Unsatisfiable
from openapi_spec_validator import validate as validate_spec
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance,
                                               response_headers_conformance,
                                               response_schema_conformance,
                                               status_code_conformance)

import docfactory as df
from conftest import Served, make_settings, make_user

pytestmark = [pytest.mark.e2e]

EXAMPLES = int(os.environ.get("MEDMITRA_FUZZ_EXAMPLES", "12"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]
# Seeded cases the fuzzer may point its ids at (some get deleted along the way).
SEED_CASES = 2
HTTP_TIMEOUT_S = 30.0


@pytest.fixture
def live(start_server, tmp_path) -> Served:
    # Auth rate limit raised so /auth/v1 is fuzzed past its first 30 requests; the
    # 429 path is documented and covered by tests/test_auth_api.py.
    return start_server(make_settings(tmp_path, auth={"rate_limit_per_min": 100000}))


def _seed(live: Served, token: str) -> dict[str, list[Any]]:
    """A few cases with a file each: real targets for path/form ids and download tokens."""
    ids: dict[str, list[Any]] = {"case": [], "file": [], "token": []}
    with live.client(token) as c:
        for i in range(SEED_CASES):
            r = c.post("/cases/create_case",
                       data={"patient_name": f"Fuzz {i}", "patient_age": "40",
                             "patient_gender": "female"},
                       files=[("lab_files", ("labs.csv", df.lab_csv(), "text/csv"))])
            assert r.status_code == 201, r.text
            body = r.json()
            ids["case"] += [body["case"]["case_id"], body["case"]["id"]]
            f = body["uploaded_files"][0]
            ids["file"] += [f["file_id"], f["id"]]
            ids["token"].append(f["file_url"].rsplit("/", 1)[1])
    return ids


def _aim(case: Any, ids: dict[str, list[Any]], pick: int) -> None:
    """Point the generated case at a real resource (index ``pick`` into the seeded ids)."""
    params = case.path_parameters or {}
    for name, kind in (("case_id", "case"), ("file_id", "file"), ("token", "token")):
        if name in params:
            params[name] = ids[kind][pick % len(ids[kind])]
    if isinstance(case.body, dict) and "case_id" in case.body and case.operation.path == \
            "/cases/upload":
        case.body["case_id"] = str(ids["case"][pick % len(ids["case"])])


def _fuzzer(strategy: Any, label: str, ids: dict[str, list[Any]], auth: dict[str, str],
            counts: Counter[str], statuses: dict[str, Counter[int]]) -> Any:
    """A Hypothesis test for one operation and generation mode (seeded: derandomize)."""

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy, aim=st.integers(min_value=-10, max_value=19))
    def run(case: Any, aim: int) -> None:
        if aim >= 0:   # two thirds of the cases hit real records, the rest random ids
            _aim(case, ids, aim)
        counts[label] += 1
        response = case.call(headers=auth, timeout=HTTP_TIMEOUT_S)
        statuses.setdefault(label, Counter())[response.status_code] += 1
        # Negative data may still be acceptable to the server (a value the schema narrows
        # but the server tolerates): the response is judged, not the verdict on the input.
        case.validate_response(response, checks=CHECKS, headers=auth)

    return run


def test_served_openapi_document_validates(live: Served) -> None:
    doc = httpx.get(f"{live.url}/openapi.json", timeout=HTTP_TIMEOUT_S).json()
    validate_spec(doc)   # raises on any violation of the OpenAPI 3.1 meta-schema
    schema = schemathesis.openapi.from_dict(doc)
    ops = [r.ok() for r in schema.get_all_operations()]
    assert len(ops) >= 21
    # Real bodies, so the fuzzer exercises them: multipart files, JSON, query filters.
    create = schema["/cases/create_case"]["POST"]
    assert "multipart/form-data" in create.definition.raw["requestBody"]["content"]
    assert "application/json" in schema["/cases/cases/{case_id}"]["PUT"].definition.raw[
        "requestBody"]["content"]
    names = {p["name"] for p in schema["/cases/all_cases"]["GET"].definition.raw["parameters"]}
    assert {"search", "status", "page", "limit", "sort_by"} <= names


def test_every_operation_survives_the_fuzzer(live: Served, capsys) -> None:
    user = make_user()
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json", timeout=HTTP_TIMEOUT_S)
    auth = {"Authorization": f"Bearer {user.token}"}
    counts: Counter[str] = Counter()
    statuses: dict[str, Counter[int]] = {}
    failures: list[str] = []
    unnegatable: list[str] = []
    ops = [r.ok() for r in schema.get_all_operations()]
    assert len(ops) >= 21, "every documented operation must be fuzzed"

    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            label = f"{op.label} [{mode.value}]"
            try:
                strategy = op.as_strategy(generation_mode=mode)
            except Exception as exc:  # an operation with nothing to negate
                counts[label] += 0
                if mode is GenerationMode.POSITIVE:
                    failures.append(f"{label}: no strategy ({exc})")
                continue

            # Fresh targets for every operation and mode: a fuzzed DELETE may have
            # removed the previous ones.
            ids = _seed(live, user.token)
            run = _fuzzer(strategy, label, ids, auth, counts, statuses)
            try:
                run()
            except Unsatisfiable:
                # Nothing in the operation can be made invalid (no parameters or body, or
                # only a free-form path string).
                assert mode is GenerationMode.NEGATIVE, f"{label}: no valid input"
                unnegatable.append(op.label)
            except Exception as exc:
                failures.append(f"{label}: {str(exc)[:2000]}")

    total = sum(counts.values())
    with capsys.disabled():
        print(f"\n[fuzz] schemathesis {schemathesis.__version__}: max_examples={EXAMPLES} "
              f"per operation and mode; {len(ops)} operations; {total} requests")
        for label in sorted(counts):
            codes = dict(sorted(statuses.get(label, Counter()).items()))
            print(f"[fuzz]   {counts[label]:5d}  {label}  {codes}")
        print(f"[fuzz] no invalid input possible for: {', '.join(unnegatable) or '-'}")
    assert not failures, "\n\n".join(failures)
    assert all(counts[f"{op.label} [positive]"] > 0 for op in ops)
    # The server is still consistent and serving afterwards.
    with live.client(user.token) as c:
        assert c.get("/cases/all_cases").status_code == 200
