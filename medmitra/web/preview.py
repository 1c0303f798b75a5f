"""GET /cases/file/{file_id}/preview.png: a DICOM image rendered to a PNG a browser can show.

Authenticated and isolated exactly like GET /cases/file/{file_id} (another user's file
answers 404). The pixels are windowed with the file's own WindowCenter/WindowWidth and
rescale (pipeline/images.dicom_image, the same rendering the analysis uses); MONOCHROME1 is
inverted; the first frame of a multi-frame image is shown. Only DICOM files have a preview:
PDFs and photos are shown by the browser from their signed download URL.
"""

from __future__ import annotations

import asyncio
import io

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, raw

from medmitra import filetypes
from medmitra.api.auth import current_user
from medmitra.errors import ApiError, UnsupportedMediaType
from medmitra.pipeline.images import ImageRefused, dicom_image
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


@bp.get("/file/<file_id:str>/preview.png", name="file_preview")
async def file_preview(request: Request, file_id: str) -> HTTPResponse:
    user_id = await current_user(request)
    f = await svc.get_file(user_id, file_id)
    if f.file_type != filetypes.DICOM:
        raise UnsupportedMediaType("Previews are rendered for DICOM files only; open the "
                                   "file's download link for other types")
    storage = request.app.ctx.storage
    if not storage.exists(f.file_id):
        raise PreviewUnavailable("The stored file is missing")
    png = await asyncio.to_thread(render_dicom_png, storage.path_for(f.file_id))
    return raw(png, content_type="image/png",
               headers={"Cache-Control": "private, no-store",
                        "X-Content-Type-Options": "nosniff"})
