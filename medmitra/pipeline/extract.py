"""Stage 1, extract: turn one stored upload into text and facts (an ``ExtractedFile``).

``extract_file`` is synchronous and CPU-bound; the worker runs it in a thread. It never
raises for bad content: a corrupt, truncated or hostile file yields an ExtractedFile with
``text=None`` and a readable reason in ``notes``. Work is bounded: at most MAX_PDF_PAGES
pages (MAX_OCR_PAGES of them OCR'd), MAX_TEXT_CHARS of text, capped render and image
sizes, capped CSV rows/columns.

Logs carry the file id and error class only; file names and content stay at DEBUG.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path

from medmitra import filetypes
from medmitra.clinical import labs, reports
from medmitra.pipeline import images
from medmitra.pipeline.types import ExtractedFile, LabRow

log = logging.getLogger(__name__)

MAX_PDF_PAGES = 50
# OCR costs seconds per page; a long scanned PDF is OCR'd only this far.
MAX_OCR_PAGES = 20
MAX_TEXT_CHARS = 200_000
PAGE_SEPARATOR = "\n\f\n"
RENDER_DPI = 150
MAX_RENDER_PIXELS = 4_000_000   # a letter page at 150 dpi is ~2.1 MP
# Text/CSV files are read at most this far (the upload limit is smaller anyway).
MAX_TEXT_FILE_BYTES = 16 * 1024 * 1024

# PDFium is not thread-safe: every pdfium call in the process goes through this lock.
# OCR runs outside it so a scanned PDF does not block other PDFs for seconds.
PDFIUM_LOCK = threading.Lock()


def extract_file(path: Path, *, file_id: str, category: str, mime: str,
                 file_name: str) -> ExtractedFile:
    """Text, pages, lab rows, image and DICOM tags of one file (never raises for content)."""
    out = ExtractedFile(file_id=file_id, category=category,  # type: ignore[arg-type]
                        file_name=file_name, mime=mime)
    started = time.perf_counter()
    try:
        if mime == filetypes.PDF:
            _extract_pdf(Path(path), out)
        elif mime in (filetypes.CSV, filetypes.TEXT):
            _extract_text(Path(path), out)
        elif mime in (filetypes.PNG, filetypes.JPEG):
            _extract_image(Path(path), out)
        elif mime == filetypes.DICOM:
            _extract_dicom(Path(path), out)
        else:
            out.notes.append(f"File type {mime!r} is not supported for extraction.")
    except Exception as exc:  # bad content must never fail the job with a traceback
        log.warning("extract: file %s failed with %s", file_id, type(exc).__name__)
        log.debug("extract: file %s details", file_id, exc_info=True)
        out.text, out.pages, out.lab_rows, out.image = None, [], [], None
        out.notes.append(f"The file could not be read ({type(exc).__name__}).")
    log.debug("extract: file %s (%s) took %.2f s", file_id, mime, time.perf_counter() - started)
    return out


# ---------------------------------------------------------------------------- PDF

def _extract_pdf(path: Path, out: ExtractedFile) -> None:
    import pypdfium2 as pdfium

    with PDFIUM_LOCK:
        try:
            pdf = pdfium.PdfDocument(str(path))
        except pdfium.PdfiumError as exc:
            if "password" in str(exc).lower():
                out.notes.append("The PDF is password-protected and could not be read.")
            else:
                out.notes.append("The PDF could not be opened (damaged or truncated).")
            return
    try:
        with PDFIUM_LOCK:
            page_count = len(pdf)
        if page_count > MAX_PDF_PAGES:
            out.notes.append(f"The PDF has {page_count} pages; only the first "
                             f"{MAX_PDF_PAGES} were read.")
        total_chars, ocr_pages, skipped_ocr = 0, 0, 0
        for index in range(min(page_count, MAX_PDF_PAGES)):
            with PDFIUM_LOCK:
                text, bitmap = _read_page(pdf, index, render=ocr_pages < MAX_OCR_PAGES, out=out)
            if bitmap is not None:
                text = _ocr(bitmap, out)
                ocr_pages += 1
            elif not text.strip() and ocr_pages >= MAX_OCR_PAGES:
                skipped_ocr += 1
            if total_chars + len(text) > MAX_TEXT_CHARS:
                out.pages.append(text[:max(0, MAX_TEXT_CHARS - total_chars)])
                out.notes.append(f"The text was cut at {MAX_TEXT_CHARS} characters "
                                 f"(page {index + 1}).")
                break
            total_chars += len(text) + len(PAGE_SEPARATOR)
            out.pages.append(text)
        if ocr_pages:
            out.notes.append(f"{ocr_pages} page(s) had no text layer and were read by OCR.")
        if skipped_ocr:
            out.notes.append(f"{skipped_ocr} further page(s) without a text layer were not "
                             f"OCR'd (limit {MAX_OCR_PAGES}).")
    finally:
        with PDFIUM_LOCK:
            pdf.close()
    if not any(p.strip() for p in out.pages):
        out.notes.append("No text was found in the PDF.")
        out.text = None
        return
    out.text = PAGE_SEPARATOR.join(out.pages)
    if out.category == "lab":
        out.lab_rows = labs.parse_pages(out.pages)
        out.lab_lines_unparsed = sum(labs.unparsed_result_lines(p) for p in out.pages)
    else:  # a radiology report: its words, never lab values
        out.report_sections = reports.radiology_sections(out.text)


def _read_page(pdf, index: int, *, render: bool, out: ExtractedFile):
    """(text, image_or_None) of one page; the image only when the page has no text."""
    import pypdfium2 as pdfium

    try:
        page = pdf[index]
    except pdfium.PdfiumError:
        out.notes.append(f"Page {index + 1} could not be read.")
        return "", None
    try:
        textpage = page.get_textpage()
        try:
            text = _clean_text(textpage.get_text_range())
        finally:
            textpage.close()
        if text.strip() or not render:
            return text, None
        width_pt, height_pt = page.get_size()
        if width_pt <= 0 or height_pt <= 0:
            return "", None
        scale = min(RENDER_DPI / 72.0, math.sqrt(MAX_RENDER_PIXELS / (width_pt * height_pt)))
        bitmap = page.render(scale=scale)
        try:
            # convert() copies the pixels out of pdfium's buffer before it is freed.
            return "", bitmap.to_pil().convert("RGB")
        finally:
            bitmap.close()
    except pdfium.PdfiumError:
        out.notes.append(f"Page {index + 1} could not be read.")
        return "", None
    finally:
        page.close()


def _clean_text(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    # pdfium marks soft hyphens/odd glyphs with control chars; keep only newlines/tabs.
    return "".join(ch for ch in text if ch >= " " or ch in "\n\t").strip("\n")


def _ocr(img, out: ExtractedFile) -> str:
    from medmitra.pipeline import ocr

    try:
        text = ocr.ocr_image(img)
    except ocr.OcrUnavailable as exc:
        out.notes.append(f"OCR is not available: {exc}.")
        return ""
    out.ocr_used = True
    return text


# ---------------------------------------------------------------------- CSV / text

def _read_text(path: Path, out: ExtractedFile) -> str:
    with open(path, "rb") as fh:
        raw = fh.read(MAX_TEXT_FILE_BYTES + 1)
    if len(raw) > MAX_TEXT_FILE_BYTES:
        raw = raw[:MAX_TEXT_FILE_BYTES]
        out.notes.append("The file is very large; only its beginning was read.")
    raw = raw.replace(b"\x00", b"")
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def _extract_text(path: Path, out: ExtractedFile) -> None:
    text = _read_text(path, out)
    if out.mime == filetypes.CSV:
        table = labs.read_table(text)
        out.lab_rows = labs.rows_from_table(table)
        out.lab_lines_unparsed = labs.unparsed_table_rows(table, out.lab_rows)
        rendered = _render_rows(out.lab_rows) if out.lab_rows else _render_table(table)
        if table and not out.lab_rows:
            out.notes.append("No lab result columns (test, value) were recognised.")
    else:
        rendered = text.strip()
        out.lab_rows = labs.parse_text_lines(text)
        out.lab_lines_unparsed = labs.unparsed_result_lines(text)
        if not out.lab_rows and filetypes.detect_delimiter(text[:8192]):
            table = labs.read_table(text)
            out.lab_rows = labs.rows_from_table(table)
            out.lab_lines_unparsed = labs.unparsed_table_rows(table, out.lab_rows)
    if len(rendered) > MAX_TEXT_CHARS:
        rendered = rendered[:MAX_TEXT_CHARS]
        out.notes.append(f"The text was cut at {MAX_TEXT_CHARS} characters.")
    out.text = rendered or None
    if out.text is None:
        out.notes.append("The file contains no text.")


def _render_rows(rows: list[LabRow]) -> str:
    return "\n".join(labs.render_row(r) for r in rows)


def _render_table(table: list[list[str]]) -> str:
    return "\n".join(" | ".join(c for c in row) for row in table)


# ------------------------------------------------------------------------- images

def _extract_image(path: Path, out: ExtractedFile) -> None:
    try:
        if out.category == "lab":
            page = images.open_image(path, max_side_px=images.OCR_MAX_SIDE_PX)
        else:
            out.image = images.open_image(path)
    except images.ImageRefused as exc:
        out.notes.append(f"The image was refused: {exc}.")
        return
    if out.category != "lab":
        # OCR of X-rays is slow and mostly noise; the image goes to a vision model.
        out.notes.append(f"Image normalised to {out.image.width}x{out.image.height} RGB; "
                         "not OCR'd (radiology).")
        return
    out.image = images.normalise(page)
    text = _ocr(page, out)
    if not text.strip():
        out.notes.append("OCR found no text in the image.")
        return
    out.text = text[:MAX_TEXT_CHARS]
    out.pages = [out.text]
    out.lab_rows = labs.parse_pages(out.pages)
    out.lab_lines_unparsed = labs.unparsed_result_lines(out.text)


# -------------------------------------------------------------------------- DICOM

def _extract_dicom(path: Path, out: ExtractedFile) -> None:
    import pydicom
    from pydicom.errors import InvalidDicomError

    # pydicom's validation warnings quote element values (a malformed PatientName would be
    # written to the log); this process only reads DICOM, so validation is switched off.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        # force=True: the content was already sniffed (DICM at 128); the preamble is skipped.
        ds = pydicom.dcmread(str(path), force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        out.notes.append(f"The DICOM file could not be parsed ({type(exc).__name__}).")
        return
    out.dicom_tags = images.dicom_tags(ds)
    out.text = images.dicom_summary(out.dicom_tags) or None
    try:
        out.image = images.dicom_image(ds)
    except images.ImageRefused as exc:
        out.notes.append(f"No image from the DICOM file: {exc}.")
    if not out.dicom_tags:
        out.notes.append("The DICOM file has no readable descriptive tags.")
