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

from tortoise.transactions import in_transaction

from medmitra import filetypes, textsafe
from medmitra.api.multipart import FilePart
from medmitra.config import LimitsSettings
from medmitra.db import reads
from medmitra.db.models import CASE_STATUSES, Case, CaseFile
from medmitra.db.reads import Reader
from medmitra.errors import (BadRequest, NotFound, PayloadTooLarge, UnsupportedMediaType,
                             field_error)
from medmitra.jobs import queue
from medmitra.services.compat import ANALYZE_OPTIONS, flat_insights
from medmitra.storage import Storage

log = logging.getLogger("medmitra.cases")

MAX_AGE = 150
SORT_FIELDS = ("created_at", "updated_at", "patient_name", "patient_age")
# Ids are tortoise IntFields: 32-bit (SERIAL) on PostgreSQL.
MAX_ID = 2**31 - 1


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


# -- identifiers -------------------------------------------------------------------------

def parse_ident(raw: str, what: str) -> dict[str, Any]:
    """``{id}`` path values: the integer id or the UUID."""
    raw = raw.strip()
    if raw.isascii() and raw.isdigit() and len(raw) <= 18:
        value = int(raw)
        if value > MAX_ID:   # names no row; PostgreSQL would refuse it as out of range
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
        raise field_error("patient_age", "must be an integer from 0 to 150", where)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        s = value.strip()
        if not (s.isascii() and s.isdigit() and len(s) <= 3):
            raise field_error("patient_age", "must be an integer from 0 to 150", where)
        value = int(s)
    if not isinstance(value, int) or not 0 <= value <= MAX_AGE:
        raise field_error("patient_age", "must be an integer from 0 to 150", where)
    return value


def check_user_field(user_id: str, claimed: str | None) -> None:
    """The original trusted a ``user_id`` field; it must now name the token's user."""
    from medmitra.errors import Forbidden

    if claimed is None or claimed.strip() == "":
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


def vet_files(parts: list[tuple[FilePart, str | None]], limits: LimitsSettings) -> list[AcceptedFile]:
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
                "radiology" if mime in ("image/png", "image/jpeg") else None)
        if mime is None or category is None or not filetypes.accepts(category, mime):
            raise UnsupportedMediaType(
                f"File '{label}' is not an accepted {category or 'lab or radiology'} file "
                f"(content looks like {mime or 'an unknown type'})")
        limit = limits.lab_max_bytes if category == "lab" else limits.radiology_max_bytes
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
    gender = clean_text("patient_gender", fields.get("patient_gender"), max_chars=64,
                        required=True)
    summary = clean_text("case_summary", fields.get("case_summary"),
                         max_chars=limits.text_field_max_chars, required=False) or None
    accepted = vet_files(files, limits)
    now = now_utc()

    async def write(conn: Any) -> tuple[Case, list[CaseFile]]:
        case = await Case.create(case_id=str(uuid.uuid4()), user_id=user_id, patient_name=name,
                                 patient_age=age, patient_gender=gender, case_summary=summary,
                                 status="processing", created_at=now, updated_at=now,
                                 using_db=conn)
        rows = [_file_row(a, case, now) for a in accepted]
        for row in rows:
            await row.save(using_db=conn)
        await queue.enqueue(case, {}, max_attempts=max_attempts, conn=conn)
        return case, rows

    case, rows = await _store_and_commit(storage, accepted, write)
    log.info("case %s created with %d file(s)", case.case_id, len(rows))
    return case, rows


async def add_files(storage: Storage, limits: LimitsSettings, max_attempts: int, *,
                    case: Case, files: list[tuple[FilePart, str | None]]) -> list[CaseFile]:
    accepted = vet_files(files, limits)
    now = now_utc()

    async def write(conn: Any) -> list[CaseFile]:
        # The case may have been deleted while the bytes were arriving.
        if not await Case.filter(id=case.id).using_db(conn).exists():
            raise NotFound("Case not found")
        rows = [_file_row(a, case, now) for a in accepted]
        for row in rows:
            await row.save(using_db=conn)
        await Case.filter(id=case.id).using_db(conn).update(status="processing", updated_at=now)
        await queue.enqueue(case, {}, max_attempts=max_attempts, conn=conn)
        return rows

    rows = await _store_and_commit(storage, accepted, write)
    case.status, case.updated_at = "processing", now
    log.info("case %s: %d file(s) added", case.case_id, len(rows))
    return rows


async def update_case(case: Case, body: Any, limits: LimitsSettings) -> Case:
    if not isinstance(body, dict):
        raise BadRequest("Body must be a JSON object")
    allowed = {"patient_name", "patient_age", "patient_gender", "case_summary", "status"}
    data = {k: v for k, v in body.items() if k in allowed}
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
                                               max_chars=64, required=True, where="body")
    if "case_summary" in data:
        changes["case_summary"] = clean_text("case_summary", data["case_summary"],
                                             max_chars=limits.text_field_max_chars,
                                             required=False, where="body") or None
    if "status" in data:
        if data["status"] not in CASE_STATUSES:
            raise field_error("status", f"must be one of {', '.join(CASE_STATUSES)}", "body")
        changes["status"] = data["status"]
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
    for key, value in body.items():
        if key in ANALYZE_OPTIONS:
            if not isinstance(value, bool):
                raise field_error(key, "must be true or false", "body")
            opts[ANALYZE_OPTIONS[key]] = value
        elif key == "confidenceThreshold":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(value) or not 0 <= value <= 1:
                raise field_error(key, "must be a number from 0 to 1", "body")
            opts["confidence_threshold"] = float(value)
    return opts


async def analyze(case: Case, options: dict[str, Any], max_attempts: int) -> Case:
    now = now_utc()
    async with in_transaction() as conn:
        await Case.filter(id=case.id).using_db(conn).update(status="processing", updated_at=now)
        await queue.enqueue(case, options, max_attempts=max_attempts, conn=conn)
    case.status, case.updated_at = "processing", now
    return case


# -- listing -----------------------------------------------------------------------------

def _int_param(q: dict[str, str], name: str, lo: int, hi: int | None, default: int | None):
    raw = q.get(name)
    if raw is None or raw == "":
        return default
    s = raw.strip()
    if not (s.lstrip("-").isascii() and s.lstrip("-").isdigit()) or len(s) > 12:
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
    return dt


def _no_nul(value: str, name: str) -> None:
    # Stored text never holds NUL (clean_text strips it) and PostgreSQL refuses it in a
    # text parameter outright, so it is a bad request on every backend.
    if "\x00" in value:
        raise field_error(name, "must not contain NUL characters", "query")


async def list_cases(reader: Reader, user_id: str,
                     q: dict[str, str]) -> tuple[str, int, int, int]:
    """One page of the user's cases as a JSON array text (the hot read path), with the
    total, page and limit."""
    page = _int_param(q, "page", 1, 1_000_000, 1)
    limit = _int_param(q, "limit", 1, 100, None)
    where, params = ['"user_id" = ?'], [user_id]
    like = "LIKE" if reader.is_sqlite else "ILIKE"   # SQLite's LIKE ignores ASCII case
    status = q.get("status")
    if status:
        if status not in CASE_STATUSES:
            raise field_error("status", f"must be one of {', '.join(CASE_STATUSES)}", "query")
        where.append('"status" = ?')
        params.append(status)
    search = q.get("search")
    if search:
        if len(search) > 200:
            raise field_error("search", "too long", "query")
        _no_nul(search, "search")
        # Wildcards typed by the user are taken literally.
        pattern = "%" + re.sub(r"([\\%_])", r"\\\1", search) + "%"
        where.append(f'("patient_name" {like} ? ESCAPE \'\\\' OR '
                     f'"case_summary" {like} ? ESCAPE \'\\\')')
        params += [pattern, pattern]
    for name, end_of_day, op in (("start_date", False, ">="), ("end_date", True, "<=")):
        dt = _date_param(q, name, end_of_day)
        if dt is not None:
            where.append(f'"created_at" {op} ?')
            params.append(reads.db_timestamp(dt, reader.is_sqlite))
    for name, op in (("min_age", ">="), ("max_age", "<=")):
        age = _int_param(q, name, 0, MAX_AGE, None)
        if age is not None:
            where.append(f'"patient_age" {op} ?')
            params.append(age)
    gender = q.get("gender")
    if gender:
        _no_nul(gender, "gender")
        where.append('LOWER("patient_gender") = LOWER(?)')
        params.append(gender.strip()[:64])
    sort_by = q.get("sort_by") or "created_at"
    if sort_by not in SORT_FIELDS:
        raise field_error("sort_by", f"must be one of {', '.join(SORT_FIELDS)}", "query")
    order = (q.get("sort_order") or "desc").lower()
    if order not in ("asc", "desc"):
        raise field_error("sort_order", "must be asc or desc", "query")
    # Names sort as people read them ("asha" next to "Asha"), not in byte order.
    column = 'LOWER("patient_name")' if sort_by == "patient_name" else f'"{sort_by}"'
    direction = order.upper()
    cases_json, total = await reads.list_cases_json(
        reader, where, params, f'{column} {direction}, "id" {direction}', limit,
        (page - 1) * (limit or 0), case_dict)
    return cases_json, total, page, limit if limit is not None else total


# -- rendering ---------------------------------------------------------------------------

CASE_FIELDS = ("id", "case_id", "user_id", "patient_name", "patient_age", "patient_gender",
               "case_summary", "status", "created_at", "updated_at")
FILE_FIELDS = ("id", "file_id", "user_id", "file_name", "file_type", "file_size",
               "file_category", "text_data", "ai_summary", "uploaded_at")


def case_dict(c: Case | dict[str, Any]) -> dict[str, Any]:
    r = c if isinstance(c, dict) else {k: getattr(c, k) for k in CASE_FIELDS}
    return {
        "id": r["id"], "case_id": r["case_id"], "doctor_id": r["user_id"],
        "user_id": r["user_id"], "patient_name": r["patient_name"],
        "patient_age": r["patient_age"], "patient_gender": r["patient_gender"],
        "case_summary": r["case_summary"], "status": r["status"],
        "created_at": reads.iso(r["created_at"]), "updated_at": reads.iso(r["updated_at"]),
    }


def file_dict(f: CaseFile | dict[str, Any], case_uuid: str, file_url: str) -> dict[str, Any]:
    r = f if isinstance(f, dict) else {k: getattr(f, k) for k in FILE_FIELDS}
    up = reads.iso(r["uploaded_at"])
    return {
        "id": r["id"], "file_id": r["file_id"], "case_id": case_uuid,
        "file_name": r["file_name"], "file_type": r["file_type"], "file_size": r["file_size"],
        "file_category": r["file_category"], "file_url": file_url, "upload_date": up,
        "uploaded_at": up, "text_data": r["text_data"], "ai_summary": r["ai_summary"],
    }


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


async def case_view(reader: Reader, user_id: str, ident: str) -> dict[str, Any]:
    view = await reads.case_view(reader, user_id, parse_ident(ident, "case"))
    if view is None:
        raise NotFound("Case not found")
    return view


