"""The OpenAPI document (medmitra/api/openapi.py) and the docs routes (medmitra/api/docs.py).

The document is checked against the OpenAPI 3.1 meta-schema, against the contract's list of
routes and fields, and by validating sample records with its own schemas. The routes are
checked on a real server (``python -m medmitra.api.docs``) on a loopback port.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate as validate_spec

from medmitra import contract
from medmitra.api.openapi import build_openapi

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "medmitra" / "static"
HTTP_TIMEOUT_S = 10.0

DOC = build_openapi()
SCHEMAS = DOC["components"]["schemas"]
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}

REQUIRED_OPERATIONS = {
    ("get", "/"), ("get", "/health"),
    ("post", "/cases/create_case"), ("get", "/cases/all_cases"),
    ("get", "/cases/cases/{case_id}"), ("put", "/cases/cases/{case_id}"),
    ("delete", "/cases/cases/{case_id}"), ("post", "/cases/analyze/{case_id}"),
    ("post", "/cases/upload"), ("get", "/cases/files/{case_id}"),
    ("get", "/cases/file/{file_id}"), ("delete", "/cases/file/{file_id}"),
    ("get", "/cases/file/{file_id}/preview.png"),
    ("get", "/files/download/{token}"),
    ("get", "/cases/cases/{case_id}/fhir"), ("get", "/metrics"),
    ("post", "/auth/v1/signup"), ("post", "/auth/v1/token"), ("get", "/auth/v1/user"),
    ("put", "/auth/v1/user"), ("post", "/auth/v1/logout"), ("get", "/auth/v1/settings"),
    ("get", "/auth/v1/health"), ("get", "/auth/v1/.well-known/jwks.json"),
    ("get", "/auth/v1/authorize"), ("post", "/auth/v1/authorize"),
}
# HTML pages, not JSON: their answers are pages (or a redirect), not error bodies.
HTML_OPERATIONS = {("get", "/auth/v1/authorize"), ("post", "/auth/v1/authorize")}

COMPONENT_FIELDS = {
    "Case": set(contract.CASE_FIELDS),
    "CaseFile": set(contract.FILE_FIELDS),
    "AiInsightsFlat": set(contract.FLAT_INSIGHT_FIELDS),
    "Insights": set(contract.INSIGHT_FIELDS),
    "Analysis": set(contract.ANALYSIS_FIELDS),
    "Error": {"detail", "error"},
}


def operations(doc: dict = DOC) -> Iterator[tuple[str, str, dict]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in HTTP_METHODS:
                yield method, path, op


def params_of(path: str, method: str) -> dict[str, dict]:
    item = DOC["paths"][path]
    return {p["name"]: p for p in item.get("parameters", []) + item[method].get("parameters",
                                                                                 [])}


def schema_validator(name: str) -> OAS31Validator:
    """A validator for one component, with the document's components for its $refs."""
    return OAS31Validator({"$ref": f"#/components/schemas/{name}",
                           "components": DOC["components"]})


def types_of(schema: dict) -> set[str]:
    t = schema.get("type")
    if t is not None:
        return {t} if isinstance(t, str) else set(t)
    return set().union(*(types_of(s) for s in schema.get("anyOf", [])))


# ------------------------------------------------------------------- the document

def test_document_is_valid_openapi() -> None:
    assert DOC["openapi"].startswith("3.1")
    validate_spec(DOC)


def test_server_url_is_optional_and_valid() -> None:
    assert "servers" not in DOC  # relative to wherever /openapi.json was loaded from
    with_server = build_openapi("http://clinic.local:8000/")
    assert with_server["servers"] == [{"url": "http://clinic.local:8000"}]
    validate_spec(with_server)


def test_build_returns_an_independent_copy() -> None:
    first = build_openapi()
    first["paths"].clear()
    first["components"]["schemas"]["Case"]["required"].append("bogus")
    again = build_openapi()
    assert again == DOC
    assert "bogus" not in again["components"]["schemas"]["Case"]["required"]


def test_every_contract_route_is_documented() -> None:
    documented = {(m, p) for m, p, _ in operations()}
    missing = REQUIRED_OPERATIONS - documented
    assert not missing, f"undocumented: {sorted(missing)}"
    assert documented == REQUIRED_OPERATIONS, "undocumented extra routes crept in"


def test_operations_have_unique_ids_and_known_tags() -> None:
    ids = [op["operationId"] for _, _, op in operations()]
    assert len(ids) == len(set(ids))
    tag_names = {t["name"] for t in DOC["tags"]}
    assert tag_names == {"Cases", "Files", "Analysis", "System", "Auth"}
    used = set()
    for _, path, op in operations():
        assert len(op["tags"]) == 1 and op["tags"][0] in tag_names, path
        used.add(op["tags"][0])
    assert used == tag_names
    assert DOC["paths"]["/cases/analyze/{case_id}"]["post"]["tags"] == ["Analysis"]
    assert all(op["tags"] == ["Auth"] for _, p, op in operations() if p.startswith("/auth/"))


def test_components_have_contract_fields() -> None:
    for name, fields in COMPONENT_FIELDS.items():
        schema = SCHEMAS[name]
        assert fields <= set(schema["properties"]), (name, fields - set(schema["properties"]))
        assert fields <= set(schema["required"]), (name, fields - set(schema["required"]))
    assert "errors" in SCHEMAS["Error"]["properties"]
    assert "errors" not in SCHEMAS["Error"]["required"]


def test_field_types_match_the_contract() -> None:
    case = SCHEMAS["Case"]["properties"]
    assert case["patient_age"] == {"type": "integer", "minimum": 0, "maximum": 150}
    assert case["status"]["enum"] == ["processing", "completed", "failed"]
    assert types_of(case["case_summary"]) == {"string", "null"}
    assert types_of(case["id"]) == {"integer"}
    for ts in ("created_at", "updated_at"):
        assert case[ts]["format"] == "date-time"

    f = SCHEMAS["CaseFile"]["properties"]
    assert types_of(f["ai_summary"]) == {"string", "null"}  # a JSON *string*, not an object
    assert types_of(f["text_data"]) == {"string", "null"}
    assert types_of(f["file_type"]) == {"string"}           # never null
    assert f["file_category"]["enum"] == ["lab", "radiology"]
    assert f["upload_date"]["format"] == f["uploaded_at"]["format"] == "date-time"

    a = SCHEMAS["Analysis"]["properties"]
    assert a["state"]["enum"] == ["queued", "running", "completed", "failed"]
    assert (a["progress"]["minimum"], a["progress"]["maximum"]) == (0, 1)
    assert types_of(a["queue_position"]) == {"integer", "null"}
    assert types_of(a["error"]) == {"string", "null"}

    flat = SCHEMAS["AiInsightsFlat"]["properties"]
    for key in ("key_findings", "supporting_evidence"):
        assert flat[key]["type"] == "array"  # never a JSON-encoded string
    assert flat["patient_context"]["type"] == "object"


def _scores(schema: Any, path: str = "") -> Iterator[tuple[str, dict]]:
    if isinstance(schema, dict):
        for key, sub in schema.get("properties", {}).items():
            if key.endswith("score") or key == "probability":
                yield f"{path}.{key}", sub
            yield from _scores(sub, f"{path}.{key}")
        if "items" in schema:
            yield from _scores(schema["items"], f"{path}[]")


def test_every_score_is_a_number_between_0_and_1() -> None:
    found = list(_scores(SCHEMAS["AiInsightsFlat"])) + list(_scores(SCHEMAS["Insights"]))
    assert len(found) >= 9  # 5 flat scores, 4 nested ones, plus probability
    for where, schema in found:
        # null where nothing was assessed (an abstained section); probabilities never null
        kind = ["number", "null"] if where.endswith("confidence_score") else "number"
        assert (schema["type"], schema["minimum"], schema["maximum"]) == (kind, 0, 1), where


def test_sample_records_validate_and_bad_ones_do_not() -> None:
    case = {"id": 1, "case_id": "0b7d4b4e-8a7c-4b43-9a7b-1f0e2a9f2c11",
            "doctor_id": "5f0c4a2e-1d9b-4a8e-9c3e-2b7a6d5c4e3f",
            "user_id": "5f0c4a2e-1d9b-4a8e-9c3e-2b7a6d5c4e3f", "patient_name": "A",
            "patient_age": 45, "patient_gender": "female", "case_summary": None,
            "status": "processing", "created_at": "2026-03-04T10:30:00.123456+00:00",
            "updated_at": "2026-03-04T10:30:00.123456+00:00"}
    v = schema_validator("Case")
    assert v.is_valid(case)
    for bad in ({"patient_age": 151}, {"patient_age": "45"}, {"status": "done"},
                {"case_summary": 3}):
        assert not v.is_valid({**case, **bad}), bad
    missing = dict(case)
    del missing["updated_at"]
    assert not v.is_valid(missing)

    analysis = {"state": "running", "stage": "soap_note", "progress": 0.5,
                "queue_position": None, "error": None,
                "started_at": "2026-03-04T10:30:00+00:00", "finished_at": None, "attempts": 1}
    v = schema_validator("Analysis")
    assert v.is_valid(analysis)
    assert not v.is_valid({**analysis, "progress": 1.5})
    assert not v.is_valid({**analysis, "state": "processing"})

    err = schema_validator("Error")
    assert err.is_valid({"detail": "x", "error": "x",
                         "errors": [{"loc": ["form", "patient_age"], "msg": "bad"}]})
    assert not err.is_valid({"detail": "x"})


def test_list_filters_and_camelcase_aliases() -> None:
    p = params_of("/cases/all_cases", "get")
    expected = {"user_id", "page", "limit", "status", "search", "start_date", "end_date",
                "min_age", "max_age", "gender", "sort_by", "sort_order", "startDate",
                "endDate", "minAge", "maxAge", "sortBy", "sortOrder"}
    assert expected <= set(p)
    assert all(not prm["required"] and prm["in"] == "query" for prm in p.values())
    assert p["page"]["schema"]["minimum"] == 1
    assert (p["limit"]["schema"]["minimum"], p["limit"]["schema"]["maximum"]) == (1, 100)
    assert p["status"]["schema"]["enum"] == ["processing", "completed", "failed"]
    assert set(p["sort_by"]["schema"]["enum"]) == {"created_at", "updated_at",
                                                   "patient_name", "patient_age"}
    assert p["sort_order"]["schema"]["enum"] == ["asc", "desc"]
    for camel, snake in (("sortBy", "sort_by"), ("minAge", "min_age"),
                         ("startDate", "start_date")):
        assert p[camel]["schema"] == p[snake]["schema"]


def _form(path: str) -> dict:
    return DOC["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"][
        "schema"]


def test_multipart_bodies() -> None:
    create = _form("/cases/create_case")
    assert set(create["required"]) == {"patient_name", "patient_age", "patient_gender"}
    props = create["properties"]
    assert props["patient_age"]["type"] == "integer"
    for field in ("lab_files", "radiology_files"):
        assert props[field] == {**props[field], "type": "array",
                                "items": {"type": "string", "format": "binary"}}
    assert {"case_summary", "user_id"} <= set(props)

    upload = _form("/cases/upload")
    assert upload["required"] == ["case_id"]
    assert upload["properties"]["file"]["format"] == "binary"
    assert upload["properties"]["files"]["items"]["format"] == "binary"
    assert upload["properties"]["category"]["enum"] == ["lab", "radiology"]


def test_update_and_analyze_bodies() -> None:
    put = DOC["paths"]["/cases/cases/{case_id}"]["put"]["requestBody"]
    body = put["content"]["application/json"]["schema"]
    v = OAS31Validator(body)
    assert not v.is_valid({})  # "No data provided for update"
    assert v.is_valid({"status": "completed"})
    assert not v.is_valid({"patient_age": 200})

    analyze = DOC["paths"]["/cases/analyze/{case_id}"]["post"]
    assert analyze["requestBody"]["required"] is False
    opts = analyze["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"includeDifferentialDiagnosis", "includeTreatmentSuggestions",
            "includeLabInterpretation", "includeImagingAnalysis",
            "confidenceThreshold"} == set(opts)


def test_case_and_file_ids_accept_integer_or_uuid() -> None:
    for path, method, name in (("/cases/cases/{case_id}", "get", "case_id"),
                               ("/cases/analyze/{case_id}", "post", "case_id"),
                               ("/cases/files/{case_id}", "get", "case_id"),
                               ("/cases/file/{file_id}", "delete", "file_id")):
        schema = params_of(path, method)[name]["schema"]
        v = OAS31Validator(schema, format_checker=OAS31Validator.FORMAT_CHECKER)
        assert v.is_valid(7) and v.is_valid("0b7d4b4e-8a7c-4b43-9a7b-1f0e2a9f2c11")
        assert not v.is_valid("not-a-uuid")


def _resolve(obj: dict) -> dict:
    ref = obj.get("$ref")
    if not ref:
        return obj
    node: Any = DOC
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_security_and_error_responses() -> None:
    assert DOC["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    bearer_auth_routes = {("get", "/auth/v1/user"), ("put", "/auth/v1/user"),
                          ("post", "/auth/v1/logout")}
    for method, path, op in operations():
        protected = path.startswith("/cases/") or (method, path) in bearer_auth_routes
        assert op["security"] == ([{"bearerAuth": []}] if protected else []), (method, path)
        if protected:
            assert "401" in op["responses"], (method, path)
        if (method, path) in HTML_OPERATIONS:
            for code, resp in op["responses"].items():
                if code not in ("302", "413"):
                    assert set(_resolve(resp)["content"]) == {"text/html"}, (path, code)
            continue
        error_schema = "AuthError" if path.startswith("/auth/") else "Error"
        codes = set(op["responses"])
        assert codes & {"200", "201", "204"}, (method, path)
        for code, resp in op["responses"].items():
            if code.startswith(("4", "5")) and path != "/health":
                schema = _resolve(resp)["content"]["application/json"]["schema"]
                assert schema == {"$ref": f"#/components/schemas/{error_schema}"}, (path, code)
        if path.startswith("/cases/"):
            assert {"400", "401", "403", "404"} <= codes, (method, path)
    unauthorized = DOC["components"]["responses"]["Unauthorized"]
    assert "WWW-Authenticate" in unauthorized["headers"]
    ops = {(m, p): op for m, p, op in operations()}
    assert "503" in ops[("post", "/cases/analyze/{case_id}")]["responses"]
    for key in (("post", "/cases/create_case"), ("post", "/cases/upload")):
        assert {"201", "413", "415"} <= set(ops[key]["responses"])
    assert "429" in ops[("post", "/auth/v1/token")]["responses"]
    assert set(ops[("get", "/files/download/{token}")]["responses"]) == {"200", "404"}


def test_auth_subset_shapes() -> None:
    assert {"code", "error_code", "msg"} == set(SCHEMAS["AuthError"]["required"])
    session = SCHEMAS["Session"]
    assert {"access_token", "token_type", "expires_in", "expires_at", "refresh_token",
            "user"} <= set(session["required"])
    token = params_of("/auth/v1/token", "post")["grant_type"]
    assert token["required"] and token["schema"]["enum"] == ["password", "refresh_token",
                                                               "pkce"]
    scope = params_of("/auth/v1/logout", "post")["scope"]["schema"]
    assert scope["enum"] == ["local", "global", "others"]


def test_vendored_redoc_is_offline_and_licensed() -> None:
    bundle = (STATIC / "redoc" / "redoc.standalone.js").read_text(encoding="utf-8")
    assert "cdn.redoc.ly" not in bundle
    assert (STATIC / "redoc" / "VERSION").read_text().startswith("2.")
    assert "MIT" in (STATIC / "redoc" / "LICENSE").read_text()
    notice = (STATIC / "NOTICE.md").read_text()
    assert "ReDoc" in notice and "Swagger UI" in notice


# ------------------------------------------------------------------- the served routes

@pytest.fixture(scope="module")
def base_url(docs_server_url: str) -> str:
    return docs_server_url


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=HTTP_TIMEOUT_S) as c:
        yield c


class _RefCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.inline_scripts = 0
        self._in_script_without_src = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        d = dict(attrs)
        for name in ("src", "href", "data-spec-url", "action", "srcset", "poster"):
            if d.get(name):
                self.refs.append(d[name] or "")
        if d.get("style"):
            self.refs += CSS_URL.findall(d["style"] or "")
        self._in_script_without_src = tag == "script" and not d.get("src")

    def handle_data(self, data: str) -> None:
        if self._in_script_without_src and data.strip():
            self.inline_scripts += 1
        self.refs += CSS_URL.findall(data)

    def handle_endtag(self, tag: str) -> None:
        self._in_script_without_src = False


CSS_URL = re.compile(r"""url\(\s*['"]?([^'")\s]+)""")


def _is_same_origin(ref: str, base_url: str) -> bool:
    """Relative, or absolute on exactly the server's scheme, host and port; data: is local."""
    if ref.startswith("data:"):
        return True
    parts = urlsplit(urljoin(base_url + "/", ref))
    return (parts.scheme, parts.netloc) == tuple(urlsplit(base_url)[:2])


@pytest.mark.e2e
def test_openapi_json_is_served_as_json(client: httpx.Client) -> None:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == json.loads(json.dumps(DOC))
    assert r.headers["cache-control"] == "no-cache"
    again = client.get("/openapi.json", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


@pytest.mark.e2e
@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_pages_reference_only_this_server(client: httpx.Client, base_url: str,
                                          page: str) -> None:
    r = client.get(page)
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    parser = _RefCollector()
    parser.feed(r.text)
    assert parser.inline_scripts == 0
    assert len(parser.refs) >= 4, parser.refs
    for ref in parser.refs:
        assert _is_same_origin(ref, base_url), ref
    # Every referenced asset is there, and the CSS it loads is same-origin too.
    for ref in set(parser.refs):
        asset = client.get(ref)
        assert asset.status_code == 200, ref
        if ref.endswith(".css"):
            for url in CSS_URL.findall(asset.text):
                assert _is_same_origin(url, base_url), (ref, url)


def test_same_origin_check_rejects_remote_refs() -> None:
    base = "http://127.0.0.1:8000"
    for bad in ("https://cdn.jsdelivr.net/x.js", "//fonts.googleapis.com/css", "http://x/y"):
        assert not _is_same_origin(bad, base)
    for good in ("/static/docs/a.js", "a.js", "data:image/png;base64,AA=="):
        assert _is_same_origin(good, base)


@pytest.mark.e2e
def test_assets_cache_and_compress(client: httpx.Client) -> None:
    page = client.get("/docs").text
    bundle = re.search(r'src="([^"]+swagger-ui-bundle\.js)"', page).group(1)
    r = client.get(bundle, headers={"Accept-Encoding": "identity"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/javascript; charset=utf-8"
    assert "immutable" in r.headers["cache-control"]
    assert r.content.startswith(b"/*!") and len(r.content) > 500_000
    zipped = client.get(bundle, headers={"Accept-Encoding": "gzip"})
    # httpx decodes gzip transparently; the header shows what went over the wire.
    assert zipped.headers["content-encoding"] == "gzip"
    assert int(zipped.headers["content-length"]) < len(r.content) // 2
    assert zipped.content == r.content
    not_modified = client.get(bundle, headers={"If-None-Match": r.headers["etag"]})
    assert not_modified.status_code == 304


@pytest.mark.e2e
@pytest.mark.parametrize("path", [
    "/static/docs/nope.js", "/static/docs/app/..%2f..%2fpyproject.toml",
    "/static/docs/app/%2e%2e/%2e%2e/pyproject.toml",
    "/static/docs/app/swagger.html",  # a file in the folder, but not a served asset
    f"/static/docs/redoc-{(STATIC / 'redoc' / 'VERSION').read_text().strip()}/LICENSE"])
def test_unknown_assets_are_404(client: httpx.Client, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 404
    assert r.json() == {"detail": "Not found", "error": "Not found"}


def test_document_is_json_serialisable_without_loss() -> None:
    assert json.loads(json.dumps(DOC)) == DOC
