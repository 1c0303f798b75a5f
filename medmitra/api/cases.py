"""The case routes of the original MedMitra API (contract section 4). Thin: parse, call a
service, render."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import orjson
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, file_stream, json as json_response, raw

from medmitra import contract, httpsec
from medmitra.api.auth import current_user
from medmitra.api.multipart import Form, limit_body, read_form
from medmitra.errors import BadRequest, NotFound, field_error
from medmitra.services import cases as svc
from medmitra.services.compat import normalise_query

bp = Blueprint("cases", url_prefix="/cases")
downloads = Blueprint("downloads")


def _ctx(request: Request) -> Any:
    return request.app.ctx


def _base_url(request: Request) -> str:
    # A trusted base: the configured public URL, else never an arbitrary Host header.
    return httpsec.base_url(request, _ctx(request).settings.server.public_url)


def _file_out(request: Request, f: Any, case_uuid: str) -> dict[str, Any]:
    """A file object (from a row dict or a model) with its signed download link."""
    fid, uid = (f["file_id"], f["user_id"]) if isinstance(f, dict) else (f.file_id, f.user_id)
    token = _ctx(request).links.sign(fid, uid)
    return svc.file_dict(f, case_uuid, f"{_base_url(request)}/files/download/{token}")


def _json_body(request: Request) -> Any:
    if not request.body:
        return None
    try:
        return json.loads(request.body)
    except (ValueError, UnicodeDecodeError, RecursionError):   # RecursionError: deep nesting
        raise BadRequest("Body is not valid JSON") from None


def _notify_pool(request: Request, case_pk: int | None = None) -> None:
    pool = _ctx(request).pool
    if pool is not None:
        if case_pk is not None:
            pool.cancel_case(case_pk)
        pool.notify()


async def _read_upload_form(request: Request, file_fields: dict[str, int]) -> Form:
    settings = _ctx(request).settings
    return await read_form(request, _ctx(request).storage, file_fields=file_fields,
                           max_files=settings.limits.files_per_request,
                           max_field_bytes=settings.limits.text_field_max_chars * 4,
                           max_body_bytes=settings.server.request_max_bytes)


@bp.post("/create_case", stream=True)
async def create_case(request: Request) -> HTTPResponse:
    settings = _ctx(request).settings
    lim = settings.limits
    limit_body(request, settings.server.request_max_bytes)
    # Authenticate before reading the body: an anonymous upload is not even stored.
    header_user = None
    if request.headers.get("authorization") or not settings.auth.trust_user_id:
        header_user = await current_user(request)
    form = await _read_upload_form(request, {
        name: lim.lab_max_bytes if category == contract.FileCategory.LAB
        else lim.radiology_max_bytes for name, category in contract.CREATE_FILE_FIELDS.items()})
    try:
        user_id = header_user or await current_user(request, claimed_user_id=form.get("user_id"))
        svc.check_user_field(user_id, form.get("user_id"))
        parts = [(f, contract.CREATE_FILE_FIELDS[f.field]) for f in form.files]
        fields = {k: form.get(k) for k in contract.CASE_CREATE_FIELDS}
        case, rows = await svc.create_case(_ctx(request).storage, lim,
                                           settings.jobs.max_attempts, user_id=user_id,
                                           fields=fields, files=parts)
    finally:
        form.discard()   # no-op for uploads already moved into place
    _notify_pool(request)
    return json_response({"message": "Case created successfully", "case": svc.case_dict(case),
                          "uploaded_files": [_file_out(request, f, case.case_id) for f in rows]},
                         status=201)


@bp.get("/all_cases")
async def all_cases(request: Request) -> HTTPResponse:
    q = normalise_query(request.args)
    user_id = await current_user(request, claimed_user_id=q.get("user_id"))
    svc.check_user_field(user_id, q.get("user_id"))
    return raw(await svc.list_cases_body(_ctx(request).reader, user_id, q),
               content_type="application/json")


@bp.get("/cases/<case_id:str>")
async def get_case(request: Request, case_id: str) -> HTTPResponse:
    user_id = await current_user(request)
    parts = await svc.case_parts(_ctx(request).reader, user_id, case_id)
    files = orjson.dumps([_file_out(request, f, parts.case_uuid) for f in parts.files])
    return raw(parts.head + files + parts.tail, content_type="application/json")


@bp.put("/cases/<case_id:str>")
async def update_case(request: Request, case_id: str) -> HTTPResponse:
    user_id = await current_user(request)
    case = await svc.get_case(user_id, case_id)
    body = _json_body(request)
    if isinstance(body, dict):
        svc.check_user_field(user_id, body.get("user_id"))
    case = await svc.update_case(case, body if body is not None else {},
                                 _ctx(request).settings.limits)
    return json_response({"message": "Case updated successfully", "case": svc.case_dict(case)})


@bp.delete("/cases/<case_id:str>")
async def delete_case(request: Request, case_id: str) -> HTTPResponse:
    user_id = await current_user(request)
    case = await svc.get_case(user_id, case_id)
    await svc.delete_case(_ctx(request).storage, case)
    _notify_pool(request, case.id)
    return json_response({"message": "Case deleted successfully"})


@bp.post("/analyze/<case_id:str>")
async def analyze_case(request: Request, case_id: str) -> HTTPResponse:
    user_id = await current_user(request)
    case = await svc.get_case(user_id, case_id)
    options = svc.parse_analyze_options(_json_body(request))
    jobs = _ctx(request).settings.jobs
    case = await svc.analyze(case, options, jobs.max_attempts,
                             max_queued=jobs.max_queued_per_user)
    _notify_pool(request, case.id)
    return json_response({"message": "Case analysis started successfully",
                          "case": svc.case_dict(case)})


@bp.post("/upload", stream=True)
async def upload(request: Request) -> HTTPResponse:
    settings = _ctx(request).settings
    lim = settings.limits
    limit_body(request, settings.server.request_max_bytes)
    header_user = None
    if request.headers.get("authorization") or not settings.auth.trust_user_id:
        header_user = await current_user(request)
    biggest = max(lim.lab_max_bytes, lim.radiology_max_bytes)
    form = await _read_upload_form(request, dict.fromkeys(contract.UPLOAD_FILE_FIELDS, biggest))
    try:
        user_id = header_user or await current_user(request, claimed_user_id=form.get("user_id"))
        svc.check_user_field(user_id, form.get("user_id"))
        raw_case = form.get("case_id")
        if not raw_case:
            raise field_error("case_id", "field required")
        category = form.get("category")
        if category is not None and category.strip() == "":
            category = None
        if category is not None and category not in tuple(contract.FileCategory):
            raise field_error("category", "must be " + " or ".join(
                repr(str(c)) for c in contract.FileCategory))
        if not form.files:
            raise field_error("file", "no file in the request")
        case = await svc.get_case(user_id, raw_case)
        rows = await svc.add_files(_ctx(request).storage, lim, settings.jobs.max_attempts,
                                   case=case, files=[(f, category) for f in form.files],
                                   max_queued=settings.jobs.max_queued_per_user)
    finally:
        form.discard()
    _notify_pool(request, case.id)
    out = [_file_out(request, f, case.case_id) for f in rows]
    return json_response({"message": "File uploaded successfully", "file": out[0], "files": out},
                         status=201)


@bp.get("/files/<case_id:str>")
async def case_files(request: Request, case_id: str) -> HTTPResponse:
    user_id = await current_user(request)
    view = await svc.case_view(_ctx(request).reader, user_id, case_id)
    return json_response({"files": [_file_out(request, f, view["case"]["case_id"])
                                    for f in view["files"]]})


@bp.get("/file/<file_id:str>")
async def get_file(request: Request, file_id: str) -> HTTPResponse:
    user_id = await current_user(request)
    f = await svc.get_file(user_id, file_id)
    return json_response({"file": _file_out(request, f, await svc.case_uuid_of(f))})


@bp.delete("/file/<file_id:str>")
async def delete_file(request: Request, file_id: str) -> HTTPResponse:
    user_id = await current_user(request)
    f = await svc.get_file(user_id, file_id)
    raw_case = request.args.get("case_id")
    if raw_case:
        case = await svc.get_case(user_id, raw_case)
        if case.id != f.case_id:
            raise NotFound("File not found")
    await svc.delete_file(_ctx(request).storage, f)
    return json_response({"message": "File deleted successfully"})


@downloads.get("/files/download/<token:str>")
async def download(request: Request, token: str) -> HTTPResponse:
    found = _ctx(request).links.verify(token)
    if found is None:
        raise NotFound("File not found or link expired")
    file_id, user_id = found
    f = await svc.file_for_download(file_id, user_id)
    storage = _ctx(request).storage
    if f is None or not storage.exists(f.file_id):
        raise NotFound("File not found or link expired")
    disp = f"inline; filename*=UTF-8''{quote(f.file_name, safe='')}"
    return await file_stream(storage.path_for(f.file_id), mime_type=f.file_type,
                             headers={"Content-Disposition": disp,
                                      "X-Content-Type-Options": "nosniff",
                                      "Cache-Control": "private, no-store"})
