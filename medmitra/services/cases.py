"""Cases and their files: validation, all-or-nothing writes, per-user isolation.

Every lookup is scoped to the owner; another user's case answers exactly like a missing
one (404). Files are validated (size, content judged from the bytes) before anything is
written; they are renamed into place, then the rows are committed in one transaction; if
the transaction fails the renamed bytes are removed again.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

import orjson
from tortoise.transactions import in_transaction

from medmitra import contract, filetypes, textsafe
from medmitra.config import LimitsSettings
from medmitra.contract import CaseStatus, FileCategory
from medmitra.db import reads
from medmitra.db.models import Case, CaseFile
from medmitra.db.reads import Reader
from medmitra.errors import (BadRequest, NotFound, PayloadTooLarge, TooManyRequests,
                             UnsupportedMediaType, field_error)
from medmitra.jobs import queue
from medmitra.services.compat import flat_insights
from medmitra.storage import FilePart, Storage

log = logging.getLogger("medmitra.cases")

_AGE_RULE = (f"must be an integer from {contract.AGE_MIN_YEARS} to "
             f"{contract.AGE_MAX_YEARS}")
_INT_RE = re.compile(r"^-?[0-9]{1,12}$")   # one optional minus, ASCII digits


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


# -- identifiers -------------------------------------------------------------------------

def parse_ident(raw: str, what: str) -> dict[str, Any]:
    """``{id}`` path values: the integer id or the UUID."""
    raw = raw.strip()
    if raw.isascii() and raw.isdigit() and len(raw) <= 18:
        value = int(raw)
        if value > contract.MAX_ID:   # names no row; PostgreSQL would refuse it as out of range
            raise NotFound(f"{what.capitalize()} not found")
        return {"id": value}
    try:
        return {f"{what}_id": str(uuid.UUID(raw))}
    except ValueError:
        raise BadRequest(f"{what}_id must be an integer id or a UUID") from None


async def get_case(user_id: str, ident: str) -> Case:
    case = await Case.get_or_none(user_id=user_id, **parse_ident(ident, "case"))
    if case is None:
        raise NotFound("Case not found")
    return case


async def get_file(user_id: str, ident: str) -> CaseFile:
    f = await CaseFile.get_or_none(user_id=user_id, **parse_ident(ident, "file"))
    if f is None:
        raise NotFound("File not found")
    return f


async def case_uuid_of(f: CaseFile) -> str:
    """The UUID of the case a file belongs to (the ``case_id`` of the file object)."""
    return (await Case.get(id=f.case_id)).case_id


async def file_for_download(file_id: str, user_id: str) -> CaseFile | None:
    """The file a verified download link names, if it still exists."""
    return await CaseFile.get_or_none(file_id=file_id, user_id=user_id)


async def known_file_ids() -> set[str]:
    """Every stored file's id: what the start-up storage sweep must keep."""
    return set(await CaseFile.all().values_list("file_id", flat=True))


# -- field validation --------------------------------------------------------------------

_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_text(name: str, value: Any, *, max_chars: int, required: bool,
               where: str = "form") -> str | None:
    if value is None:
        if required:
            raise field_error(name, "field required", where)
        return None
    if not isinstance(value, str):
        raise field_error(name, "must be a string", where)
    if not textsafe.is_storable(value):
        raise field_error(name, "contains characters that are not valid text", where)
    if len(value) > max_chars:
        raise field_error(name, f"too long (at most {max_chars} characters)", where)
    value = _CTRL.sub("", value).strip()
    if required and not value:
        raise field_error(name, "must not be empty", where)
    return value


def clean_age(value: Any, where: str = "form") -> int:
    if value is None:
        raise field_error("patient_age", "field required", where)
    if isinstance(value, bool):
        raise field_error("patient_age", _AGE_RULE, where)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        s = value.strip()
        if not (s.isascii() and s.isdigit() and len(s) <= 3):
            raise field_error("patient_age", _AGE_RULE, where)
        value = int(s)
    if not isinstance(value, int) or \
            not contract.AGE_MIN_YEARS <= value <= contract.AGE_MAX_YEARS:
        raise field_error("patient_age", _AGE_RULE, where)
    return value


def check_user_field(user_id: str, claimed: str | None) -> None:
    """The original trusted a ``user_id`` field; it must now name the token's user."""
    from medmitra.errors import Forbidden

    if claimed is None:
        return
    if not isinstance(claimed, str):
        raise field_error("user_id", "must be a string (the user's UUID)", "body")
    if claimed.strip() == "":
        return
    try:
        same = str(uuid.UUID(claimed.strip())) == user_id
    except ValueError:
        same = False
    if not same:
        raise Forbidden("user_id does not match the authenticated user")


# -- files -------------------------------------------------------------------------------

@dataclass
class AcceptedFile:
    part: FilePart
    category: str
    mime: str
    display_name: str
    file_id: str


def vet_files(parts: list[tuple[FilePart, str | None]],
              limits: LimitsSettings) -> list[AcceptedFile]:
    """Check every file before anything is written. ``category`` None = infer from content."""
    out = []
    for part, category in parts:
        up = part.upload
        label = filetypes.safe_display_name(part.filename, max_chars=limits.name_max_chars)
        if up.size == 0:
            raise BadRequest(f"File '{label}' is empty",
                             errors=[{"loc": ["form", part.field], "msg": "empty file"}])
        mime = filetypes.sniff(up.head)
        if category is None:
            category = (filetypes.infer_category(mime) if mime else None) or (
                FileCategory.RADIOLOGY if mime in (filetypes.PNG, filetypes.JPEG) else None)
        if mime is None or category is None or not filetypes.accepts(category, mime):
            raise UnsupportedMediaType(
                f"File '{label}' is not an accepted {category or 'lab or radiology'} file "
                f"(content looks like {mime or 'an unknown type'})")
        limit = (limits.lab_max_bytes if category == FileCategory.LAB
                 else limits.radiology_max_bytes)
        if up.size > limit:
            raise PayloadTooLarge(f"File '{label}' is larger than the {limit} byte limit")
        out.append(AcceptedFile(part, category, mime, label, str(uuid.uuid4())))
    return out


def _file_row(acc: AcceptedFile, case: Case, now: datetime) -> CaseFile:
    return CaseFile(file_id=acc.file_id, case_id=case.id, user_id=case.user_id,
                    file_name=acc.display_name, file_type=acc.mime, file_size=acc.part.upload.size,
                    file_category=acc.category, sha256=acc.part.upload.sha256,
                    uploaded_at=now)


async def _store_and_commit(storage: Storage, accepted: list[AcceptedFile], write) -> Any:
    """Rename the vetted uploads into place, then run ``write(conn)`` in one transaction.
    If the transaction fails the renamed bytes are removed: nothing is left behind."""
    placed: list[str] = []
    try:
        for acc in accepted:
            storage.commit(acc.part.upload, acc.file_id)
            placed.append(acc.file_id)
        async with in_transaction() as conn:
            return await write(conn)
    except BaseException:
        storage.delete(placed)
        raise


# -- operations --------------------------------------------------------------------------

async def create_case(storage: Storage, limits: LimitsSettings, max_attempts: int, *,
                      user_id: str, fields: dict[str, Any],
                      files: list[tuple[FilePart, str | None]]) -> tuple[Case, list[CaseFile]]:
    name = clean_text("patient_name", fields.get("patient_name"),
                      max_chars=limits.name_max_chars, required=True)
    age = clean_age(fields.get("patient_age"))
    gender = clean_text("patient_gender", fields.get("patient_gender"),
                        max_chars=contract.GENDER_MAX_CHARS, required=True)
    summary = clean_text("case_summary", fields.get("case_summary"),
                         max_chars=limits.text_field_max_chars, required=False) or None
    accepted = vet_files(files, limits)
    now = now_utc()

    async def write(conn: Any) -> tuple[Case, list[CaseFile]]:
        case = await Case.create(case_id=str(uuid.uuid4()), user_id=user_id, patient_name=name,
                                 patient_age=age, patient_gender=gender, case_summary=summary,
                                 status=CaseStatus.PROCESSING, created_at=now, updated_at=now,
                                 using_db=conn)
        rows = [_file_row(a, case, now) for a in accepted]
        for row in rows:
            await row.save(using_db=conn)
        await queue.enqueue(case, {}, max_attempts=max_attempts, conn=conn)
        return case, rows

    case, rows = await _store_and_commit(storage, accepted, write)
    log.info("case %s created with %d file(s)", case.case_id, len(rows))
    return case, rows


async def _check_backlog(case: Case, max_queued: int | None, conn: Any = None) -> None:
    if max_queued is None:
        return
    try:
        await queue.check_user_backlog(case, max_queued, conn)
    except queue.QueueFull as exc:
        raise TooManyRequests(str(exc)) from None


async def add_files(storage: Storage, limits: LimitsSettings, max_attempts: int, *,
                    case: Case, files: list[tuple[FilePart, str | None]],
                    max_queued: int | None = None) -> list[CaseFile]:
    accepted = vet_files(files, limits)
    now = now_utc()
    await _check_backlog(case, max_queued)   # before any byte is moved into place

    async def write(conn: Any) -> list[CaseFile]:
        # The case may have been deleted while the bytes were arriving.
        if not await Case.filter(id=case.id).using_db(conn).exists():
            raise NotFound("Case not found")
        rows = [_file_row(a, case, now) for a in accepted]
        for row in rows:
            await row.save(using_db=conn)
        await Case.filter(id=case.id).using_db(conn).update(status=CaseStatus.PROCESSING,
                                                            updated_at=now)
        await queue.enqueue(case, {}, max_attempts=max_attempts, conn=conn)
        return rows

    rows = await _store_and_commit(storage, accepted, write)
    case.status, case.updated_at = CaseStatus.PROCESSING, now
    log.info("case %s: %d file(s) added", case.case_id, len(rows))
    return rows


async def update_case(case: Case, body: Any, limits: LimitsSettings) -> Case:
    if not isinstance(body, dict):
        raise BadRequest("Body must be a JSON object")
    data = {k: v for k, v in body.items() if k in contract.CASE_UPDATE_FIELDS}
    if not data:
        raise BadRequest("No data provided for update")
    changes: dict[str, Any] = {}
    if "patient_name" in data:
        changes["patient_name"] = clean_text("patient_name", data["patient_name"],
                                             max_chars=limits.name_max_chars, required=True,
                                             where="body")
    if "patient_age" in data:
        changes["patient_age"] = clean_age(data["patient_age"], where="body")
    if "patient_gender" in data:
        changes["patient_gender"] = clean_text("patient_gender", data["patient_gender"],
                                               max_chars=contract.GENDER_MAX_CHARS,
                                               required=True, where="body")
    if "case_summary" in data:
        changes["case_summary"] = clean_text("case_summary", data["case_summary"],
                                             max_chars=limits.text_field_max_chars,
                                             required=False, where="body") or None
    if "status" in data:
        changes["status"] = _one_of("status", data["status"], tuple(CaseStatus), "body")
    changes["updated_at"] = now_utc()
    await Case.filter(id=case.id).update(**changes)
    for k, v in changes.items():
        setattr(case, k, v)
    return case


async def delete_case(storage: Storage, case: Case) -> None:
    async with in_transaction() as conn:
        file_ids = await CaseFile.filter(case_id=case.id).using_db(conn).values_list(
            "file_id", flat=True)
        # Cascades to files, insights and jobs rows; a running job notices at its next
        # heartbeat/checkpoint and writes nothing.
        await Case.filter(id=case.id).using_db(conn).delete()
    storage.delete(file_ids)


async def delete_file(storage: Storage, f: CaseFile) -> None:
    async with in_transaction() as conn:
        await CaseFile.filter(id=f.id).using_db(conn).delete()
        await Case.filter(id=f.case_id).using_db(conn).update(updated_at=now_utc())
    storage.delete([f.file_id])


def parse_analyze_options(body: Any) -> dict[str, Any]:
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest("Body must be a JSON object")
    opts: dict[str, Any] = {}
    threshold_key, threshold_option = contract.ANALYZE_THRESHOLD
    for key, value in body.items():
        if key in contract.ANALYZE_OPTIONS:
            if not isinstance(value, bool):
                raise field_error(key, "must be true or false", "body")
            opts[contract.ANALYZE_OPTIONS[key]] = value
        elif key == threshold_key:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(value) or \
                    not contract.CONFIDENCE_MIN <= value <= contract.CONFIDENCE_MAX:
                raise field_error(key, f"must be a number from {contract.CONFIDENCE_MIN:g} "
                                       f"to {contract.CONFIDENCE_MAX:g}", "body")
            opts[threshold_option] = float(value)
    return opts


async def analyze(case: Case, options: dict[str, Any], max_attempts: int,
                  max_queued: int | None = None) -> Case:
    now = now_utc()
    async with in_transaction() as conn:
        await _check_backlog(case, max_queued, conn)
        await Case.filter(id=case.id).using_db(conn).update(status=CaseStatus.PROCESSING,
                                                            updated_at=now)
        await queue.enqueue(case, options, max_attempts=max_attempts, conn=conn)
    case.status, case.updated_at = CaseStatus.PROCESSING, now
    return case


# -- listing -----------------------------------------------------------------------------

def _one_of(name: str, value: Any, choices: tuple[str, ...], where: str) -> str:
    if value not in choices:
        raise field_error(name, f"must be one of {', '.join(choices)}", where)
    return value


def _int_param(q: dict[str, str], name: str, lo: int, hi: int | None, default: int | None):
    raw = q.get(name)
    if raw is None or raw == "":
        return default
    s = raw.strip()
    if not _INT_RE.match(s):    # one optional minus, ASCII digits ("--1" is no integer)
        raise field_error(name, "must be an integer", "query")
    v = int(s)
    if v < lo or (hi is not None and v > hi):
        raise field_error(name, f"must be between {lo} and {hi}" if hi else f"must be >= {lo}",
                          "query")
    return v


def _date_param(q: dict[str, str], name: str, end: bool) -> datetime | None:
    raw = q.get(name)
    if not raw:
        return None
    try:
        dt = datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
    except ValueError:
        raise field_error(name, "must be an ISO 8601 date or date-time", "query") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    if end and len(raw.strip()) <= 10:   # a bare date as end_date includes that whole day
        dt = dt.replace(hour=23, minute=59, second=59, microsecond=999999)
    try:
        # In UTC now: 9999-12-31T23:59:59-23:59 lies past the last representable instant.
        return dt.astimezone(timezone.utc)
    except OverflowError:
        raise field_error(name, "is outside the supported date range", "query") from None


def _no_nul(value: str, name: str) -> None:
    # Stored text never holds NUL (clean_text strips it) and PostgreSQL refuses it in a
    # text parameter outright, so it is a bad request on every backend.
    if "\x00" in value:
        raise field_error(name, "must not contain NUL characters", "query")


def parse_list_query(user_id: str, q: dict[str, str]) -> tuple[reads.CaseQuery, int]:
    """The list filters of ``GET /cases/all_cases``, validated; and the page number."""
    page = _int_param(q, "page", 1, contract.PAGE_MAX, 1)
    limit = _int_param(q, "limit", 1, contract.PAGE_LIMIT_MAX, None)
    status = q.get("status") or None
    if status is not None:
        _one_of("status", status, tuple(CaseStatus), "query")
    search = q.get("search") or None
    if search is not None:
        if len(search) > contract.SEARCH_MAX_CHARS:
            raise field_error("search", "too long", "query")
        _no_nul(search, "search")
    created_from = _date_param(q, "start_date", False)
    created_to = _date_param(q, "end_date", True)
    min_age, max_age = (_int_param(q, name, contract.AGE_MIN_YEARS, contract.AGE_MAX_YEARS,
                                   None) for name in ("min_age", "max_age"))
    gender = q.get("gender") or None
    if gender is not None:
        _no_nul(gender, "gender")
        gender = gender.strip()[:contract.GENDER_MAX_CHARS]
    sort_key = _one_of("sort_by", q.get("sort_by") or contract.DEFAULT_SORT_KEY,
                       contract.SORT_KEYS, "query")
    order = (q.get("sort_order") or contract.DEFAULT_SORT_ORDER).lower()
    if order not in contract.SORT_ORDERS:
        raise field_error("sort_order", f"must be {' or '.join(contract.SORT_ORDERS)}",
                          "query")
    query = reads.CaseQuery(
        user_id=user_id, status=status, search=search, created_from=created_from,
        created_to=created_to, min_age=min_age, max_age=max_age, gender=gender,
        sort_key=sort_key, descending=order == "desc", limit=limit,
        offset=(page - 1) * (limit or 0))
    return query, page


async def list_cases_body(reader: Reader, user_id: str, q: dict[str, str]) -> bytes:
    """The answer of ``GET /cases/all_cases``: one page of the user's cases with the total,
    page and limit, as JSON bytes (the hot read path: clients poll it). Kept by the reader
    per user and query while the database is unchanged, so a repeated poll does not join
    and encode the page again (~9 us of a 100-case page)."""
    query, page = parse_list_query(user_id, q)
    key = ("case-list", query, page)
    version = reader.version()      # before the reads the answer is made from
    body = reader.kept(key, version)
    if body is None:
        # The case array arrives as JSON text rendered by the database (db/reads.py).
        cases_json, total = await reads.list_cases_json(reader, query, case_dict)
        limit = query.limit if query.limit is not None else total
        body = (f'{{"cases":{cases_json},"total":{total},"page":{page},"limit":{limit}}}'
                .encode())
        reader.keep(key, version, body, len(body))
    return body


# -- rendering ---------------------------------------------------------------------------

def case_dict(c: Case | dict[str, Any]) -> dict[str, Any]:
    """The contract's case object (``contract.CASE_FIELDS``) from a row or a model."""
    r = c if isinstance(c, dict) else {k: getattr(c, k) for k in contract.CASE_COLUMNS}
    out = {}
    for name in contract.CASE_FIELDS:
        value = r[contract.CASE_FIELD_SOURCES.get(name, name)]
        out[name] = reads.iso(value) if name in contract.CASE_TIMESTAMPS else value
    return out


def file_dict(f: CaseFile | dict[str, Any], case_uuid: str, file_url: str) -> dict[str, Any]:
    """The contract's file object (``contract.FILE_FIELDS``) from a row or a model."""
    r = f if isinstance(f, dict) else {k: getattr(f, k) for k in contract.FILE_COLUMNS}
    uploaded = reads.iso(r["uploaded_at"])
    values = {**r, "case_id": case_uuid, "file_url": file_url, "upload_date": uploaded,
              "uploaded_at": uploaded}
    return {name: values[name] for name in contract.FILE_FIELDS}


def render_insights(case_uuid: str, row: Mapping[str, Any] | None
                    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(flat ai_insights, nested insights) from an ai_insights row, or (None, None)."""
    if row is None:
        return None, None
    gen, created = reads.iso(row["generated_at"]), reads.iso(row["created_at"])
    updated = reads.iso(row["updated_at"])
    nested = dict(reads.from_json(row["data"]))
    model = reads.from_json(row["model"]) or {}
    nested["generated_at"] = gen
    nested["model"] = model.get("name") or model.get("file")
    nested["timings"] = {s.get("stage"): s.get("duration_s")
                         for s in (reads.from_json(row["stages"]) or [])}
    flat = flat_insights(case_uuid, nested, generated_at=gen, created_at=created,
                         updated_at=updated)
    return flat, nested


def analysis_dict(job: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The contract's ``analysis`` object from the newest job row (or None)."""
    return reads.analysis_from_row(job)


async def case_view(reader: Reader, user_id: str, ident: str, *,
                    keep_rows: bool = True) -> dict[str, Any]:
    view = await reads.case_view(reader, user_id, parse_ident(ident, "case"),
                                 keep_rows=keep_rows)
    if view is None:
        raise NotFound("Case not found")
    return view


@dataclass(frozen=True)
class CaseParts:
    """GET case's answer as JSON around its file list. ``head`` and ``tail`` are pure
    functions of one database snapshot; the files' links are signed (and expire) per
    request, so the file rows are kept and rendered each time. Nobody mutates the rows."""
    case_uuid: str
    head: bytes                      # {"case":{...},"files":
    files: tuple[dict[str, Any], ...]
    tail: bytes                      # ,"ai_insights":...,"insights":...,"analysis":...}


async def case_parts(reader: Reader, user_id: str, ident: str) -> CaseParts:
    """``CaseParts`` of a user's case, kept by the reader while the database is unchanged:
    an analysed case's insights (kilobytes of JSON) are parsed, reshaped and rendered once
    per change instead of at every poll. 404 (NotFound) as ``case_view``."""
    key = ("case-parts", user_id, ident)
    version = reader.version()       # before the reads the parts are made from
    parts = reader.kept(key, version)
    if parts is not None:
        return parts
    view = await case_view(reader, user_id, ident, keep_rows=False)   # the parts are kept
    case_uuid = view["case"]["case_id"]
    flat, nested = render_insights(case_uuid, view["insight"])
    head = b'{"case":' + orjson.dumps(case_dict(view["case"])) + b',"files":'
    tail = (b',"ai_insights":' + orjson.dumps(flat) + b',"insights":' + orjson.dumps(nested)
            + b',"analysis":' + orjson.dumps(analysis_dict(view["job"])) + b"}")
    files = tuple(view["files"])
    parts = CaseParts(case_uuid, head, files, tail)
    reader.keep(key, version, parts, len(head) + len(tail) + Reader.rows_size([files]))
    return parts


