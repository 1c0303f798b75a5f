"""Streaming multipart/form-data: file parts go straight to temp files on disk.

A request is read chunk by chunk from Sanic's stream and fed to python-multipart's
push parser. Text fields are kept in memory up to a cap; file parts are written to
``Storage`` temp files while their size is counted against the limit. On any error every
temp file is removed, so a refused request leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from python_multipart.multipart import MultipartParser, parse_options_header
from sanic.exceptions import BadRequest as SanicBadRequest
from sanic.exceptions import PayloadTooLarge as SanicPayloadTooLarge

from medmitra.errors import ApiError, BadRequest, PayloadTooLarge
from medmitra.storage import FilePart, Storage


@dataclass
class Form:
    fields: dict[str, list[str]] = field(default_factory=dict)
    files: list[FilePart] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        vals = self.fields.get(name)
        return vals[-1] if vals else None

    def discard(self) -> None:
        for f in self.files:
            f.upload.discard()
        self.files.clear()


class _Collector:
    def __init__(self, storage: Storage, file_fields: dict[str, int], max_files: int,
                 max_field_bytes: int):
        self.storage = storage
        self.file_fields = file_fields   # field name -> max bytes of one file
        self.max_files = max_files
        self.max_field_bytes = max_field_bytes
        self.form = Form()
        self.error: ApiError | None = None
        self._hname = b""
        self._hval = b""
        self._headers: dict[bytes, bytes] = {}
        self._field: str | None = None
        self._buf: bytearray | None = None
        self._file: FilePart | None = None
        self.parts = 0

    # python-multipart callbacks --------------------------------------------------------
    def on_part_begin(self) -> None:
        self._headers = {}
        self._field = None
        self._buf = None
        self._file = None
        self.parts += 1
        if self.parts > self.max_files + 64 and self.error is None:
            self.error = BadRequest("Too many form parts")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._hval += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._hname.strip().lower()] = self._hval.strip()
        self._hname = b""
        self._hval = b""

    def on_headers_finished(self) -> None:
        if self.error:
            return
        disp = self._headers.get(b"content-disposition", b"")
        kind, params = parse_options_header(disp)
        if kind != b"form-data" or b"name" not in params:
            self.error = BadRequest("Malformed multipart part: missing form-data name")
            return
        name = _decode(params[b"name"])
        if name is None:
            self.error = BadRequest("Malformed multipart part: field name is not UTF-8")
            return
        self._field = name
        if b"filename" in params:
            if name not in self.file_fields:
                self.error = BadRequest(f"Unexpected file field '{name}'",
                                        errors=[{"loc": ["form", name], "msg": "unknown file field"}])
                return
            if len(self.form.files) >= self.max_files:
                self.error = BadRequest(f"Too many files in one request (limit {self.max_files})")
                return
            ctype = self._headers.get(b"content-type")
            upload = self.storage.new_upload()
            self._file = FilePart(name, _decode(params[b"filename"]) or None,
                                  _decode(ctype) if ctype else None, upload)
            self.form.files.append(self._file)
        else:
            self._buf = bytearray()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.error:
            return
        chunk = data[start:end]
        if self._file is not None:
            limit = self.file_fields[self._file.field]
            if self._file.upload.size + len(chunk) > limit:
                self.error = PayloadTooLarge(
                    f"File '{self._file.filename or self._field}' is larger than the "
                    f"{limit} byte limit")
                return
            self._file.upload.write(chunk)
        elif self._buf is not None:
            if len(self._buf) + len(chunk) > self.max_field_bytes:
                self.error = BadRequest(
                    f"{self._field}: field is too long",
                    errors=[{"loc": ["form", self._field], "msg": "too long"}])
                return
            self._buf += chunk

    def on_part_end(self) -> None:
        if self.error:
            return
        if self._buf is not None and self._field is not None:
            text = _decode(bytes(self._buf))
            if text is None:
                self.error = BadRequest(f"{self._field}: not valid UTF-8 text",
                                        errors=[{"loc": ["form", self._field],
                                                 "msg": "not UTF-8"}])
                return
            self.form.fields.setdefault(self._field, []).append(text)
        elif self._file is not None:
            self._file.upload.finish()


def _decode(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


async def read_form(request: Any, storage: Storage, *, file_fields: dict[str, int],
                    max_files: int, max_field_bytes: int, max_body_bytes: int) -> Form:
    """Parse a streamed multipart or urlencoded body. The caller owns the temp files.

    ``max_body_bytes`` caps the whole body: Sanic lifts its own request size limit for
    streaming handlers, so without this a client could stream (or make us drain) forever.
    """
    limit_body(request, max_body_bytes)
    ctype_raw = request.headers.get("content-type", "")
    kind, params = parse_options_header(ctype_raw)
    if kind == b"application/x-www-form-urlencoded":
        return await _read_urlencoded(request, max_field_bytes)
    if kind != b"multipart/form-data":
        await _drain(request)
        raise BadRequest("Expected a multipart/form-data body")
    boundary = params.get(b"boundary")
    if not boundary or len(boundary) > 200:
        await _drain(request)
        raise BadRequest("Malformed multipart body: missing boundary")

    col = _Collector(storage, file_fields, max_files, max_field_bytes)
    callbacks = {n: getattr(col, n) for n in (
        "on_part_begin", "on_part_data", "on_part_end", "on_header_field",
        "on_header_value", "on_header_end", "on_headers_finished")}
    got_end = False

    def on_end() -> None:
        nonlocal got_end
        got_end = True

    callbacks["on_end"] = on_end
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        while True:
            try:
                chunk = await _read_chunk(request)
            except ApiError:
                # Past the body cap: an earlier, more precise error (e.g. one file over
                # its limit) is the better answer.
                if col.error is not None:
                    raise col.error from None
                raise
            if chunk is None:
                break
            if col.error is None:
                try:
                    parser.write(chunk)
                except ApiError as exc:
                    col.error = exc
                except Exception:
                    col.error = BadRequest("Malformed multipart body")
        if col.error is None:
            try:
                parser.finalize()
            except Exception:
                col.error = BadRequest("Malformed multipart body")
        if col.error is None and not got_end:
            col.error = BadRequest("Malformed multipart body: truncated")
        if col.error is not None:
            raise col.error
    except BaseException:
        col.form.discard()
        raise
    return col.form


async def _read_urlencoded(request: Any, max_bytes: int) -> Form:
    body = bytearray()
    too_big = False
    while True:
        chunk = await _read_chunk(request)
        if chunk is None:
            break
        if len(body) + len(chunk) > max_bytes * 4:
            too_big = True
            continue
        body += chunk
    if too_big:
        raise PayloadTooLarge("Form body too large")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False,
                          max_num_fields=200)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("Malformed form body") from None
    form = Form()
    for k, v in pairs:
        form.fields.setdefault(k, []).append(v)
    return form


async def _drain(request: Any) -> None:
    # Read what the client is sending so it sees our answer instead of a broken pipe.
    while await _read_chunk(request) is not None:
        pass


def limit_body(request: Any, max_body_bytes: int) -> None:
    """Cap a streamed request body; call it first thing in a streaming handler.

    Sanic sets a streaming handler's limit to infinity; this puts the configured cap back.
    Sanic then refuses a too-large Content-Length at the first read, counts chunked bodies
    as they arrive, and drains at most the cap after an early answer (a 401 before the
    body is read), so a client within the cap reads that answer on a connection that stays
    usable. A body declared larger than the cap is never read: the answer says
    ``Connection: close`` so the client does not expect to reuse the connection.
    """
    stream = getattr(request, "stream", None)
    if stream is None:
        return
    stream.request_max_size = max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body_bytes:
        stream.keep_alive = False


async def _read_chunk(request: Any) -> bytes | None:
    """One chunk of the body (None at its end); Sanic's own errors mapped to ApiError."""
    try:
        return await request.stream.read()
    except SanicPayloadTooLarge:
        raise PayloadTooLarge(
            f"Request body is larger than the {request.stream.request_max_size} byte limit"
        ) from None
    except SanicBadRequest:
        raise BadRequest("Malformed request body") from None
