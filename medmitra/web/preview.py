"""GET /cases/file/{file_id}/preview.png: a picture a browser can show of a DICOM image or
of one page of a PDF.

Authenticated and isolated exactly like GET /cases/file/{file_id} (another user's file
answers 404). DICOM: the first frame, windowed with the file's own WindowCenter/WindowWidth
and rescale (pipeline/images.dicom_image, the same rendering the analysis uses), MONOCHROME1
inverted. PDF: page ``?page=N`` (default 1) rendered by PDFium, with the page count in the
``X-Page-Count`` header, so every browser shows PDFs inline the same way (headless and
locked-down browsers often have no PDF viewer). Photos need no preview: the browser shows
them from their signed download URL.
"""

from __future__ import annotations

import asyncio
import io

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, raw

from medmitra import filetypes
from medmitra.api.auth import current_user
from medmitra.errors import ApiError, UnsupportedMediaType, field_error
from medmitra.services import cases as svc

# Longest side of a preview; enough for a case page and a printed report.
PREVIEW_MAX_SIDE_PX = 1024

bp = Blueprint("web_preview", url_prefix="/cases")


class PreviewUnavailable(ApiError):
    # The bytes are a valid upload, but no picture can be made from them (no pixel data,
    # an unsupported compression): the client shows the reason and offers the download.
    status = 422
    default_message = "No preview can be made of this file"


def render_dicom_png(path) -> bytes:
    import pydicom
    from pydicom.errors import InvalidDicomError

    # Imported here, not with the routes: it brings numpy and Pillow, which the server
    # does not need before it answers its first /health.
    from medmitra.pipeline.images import ImageRefused, dicom_image

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise PreviewUnavailable(f"The DICOM file could not be read ({type(exc).__name__})") \
            from None
    except Exception as exc:  # pydicom raises many types on malformed input
        raise PreviewUnavailable(f"The DICOM file could not be read ({type(exc).__name__})") \
            from None
    try:
        img = dicom_image(ds, max_side_px=PREVIEW_MAX_SIDE_PX)
    except ImageRefused as exc:
        raise PreviewUnavailable(f"No preview: {exc}") from None
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=False, compress_level=6)
    return out.getvalue()


def render_pdf_page_png(path, page_number: int) -> tuple[bytes, int]:
    """(PNG of page ``page_number`` (1-based), the PDF's page count)."""
    import pypdfium2 as pdfium

    # PDFium is not thread-safe: the analysis's extraction shares this lock.
    from medmitra.pipeline.extract import PDFIUM_LOCK

    with PDFIUM_LOCK:
        try:
            pdf = pdfium.PdfDocument(str(path))
        except pdfium.PdfiumError:
            raise PreviewUnavailable("The PDF could not be opened (damaged, truncated or "
                                     "password-protected)") from None
        try:
            count = len(pdf)
            if not 1 <= page_number <= count:
                raise field_error("page", f"must be between 1 and {count}", "query")
            try:
                page = pdf[page_number - 1]
            except pdfium.PdfiumError:
                raise PreviewUnavailable(f"Page {page_number} could not be read") from None
            try:
                width_pt, height_pt = page.get_size()
                if width_pt <= 0 or height_pt <= 0:
                    raise PreviewUnavailable(f"Page {page_number} has no size")
                bitmap = page.render(scale=PREVIEW_MAX_SIDE_PX / max(width_pt, height_pt))
                try:
                    img = bitmap.to_pil().convert("RGB")   # copied out of pdfium's buffer
                finally:
                    bitmap.close()
            except pdfium.PdfiumError:
                raise PreviewUnavailable(f"Page {page_number} could not be rendered") from None
            finally:
                page.close()
        finally:
            pdf.close()
    out = io.BytesIO()
    img.save(out, format="PNG", compress_level=6)
    return out.getvalue(), count


def _page_arg(request: Request) -> int:
    raw_page = (request.args.get("page") or "1").strip()
    if not (raw_page.isascii() and raw_page.isdigit()) or len(raw_page) > 6:
        raise field_error("page", "must be a page number from 1", "query")
    return int(raw_page)


@bp.get("/file/<file_id:str>/preview.png", name="file_preview")
async def file_preview(request: Request, file_id: str) -> HTTPResponse:
    user_id = await current_user(request)
    f = await svc.get_file(user_id, file_id)
    if f.file_type not in (filetypes.DICOM, filetypes.PDF):
        raise UnsupportedMediaType("Previews are rendered for DICOM and PDF files; images "
                                   "and text are shown from the file's download link")
    page = _page_arg(request)
    storage = request.app.ctx.storage
    if not storage.exists(f.file_id):
        raise PreviewUnavailable("The stored file is missing")
    headers = {"Cache-Control": "private, no-store", "X-Content-Type-Options": "nosniff"}
    path = storage.path_for(f.file_id)
    if f.file_type == filetypes.PDF:
        png, count = await asyncio.to_thread(render_pdf_page_png, path, page)
        headers["X-Page-Count"] = str(count)
    else:
        if page != 1:
            raise field_error("page", "must be 1 (a DICOM preview shows the first frame)",
                              "query")
        png = await asyncio.to_thread(render_dicom_png, path)
    return raw(png, content_type="image/png", headers=headers)
