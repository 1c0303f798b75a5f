"""Judge uploads by their bytes, never by their name, and clean client file names.

``sniff`` looks only at the first ``SNIFF_BYTES`` of a file. The upload route streams the
file to disk, keeps its head, calls ``sniff`` and then ``accepts(category, mime)``; a
``None`` or a refusal becomes a 415. ``infer_category`` answers for uploads that name no
category: DICOM is radiology, PDF/CSV/text are lab, and JPEG/PNG are ambiguous (the
upload route then files images under "radiology").
"""

from __future__ import annotations

import csv
import os
import unicodedata

import filetype

from medmitra.contract import FileCategory

SNIFF_BYTES: int = 4096

PDF = "application/pdf"
PNG = "image/png"
JPEG = "image/jpeg"
DICOM = "application/dicom"
CSV = "text/csv"
TEXT = "text/plain"

ACCEPTED: dict[FileCategory, tuple[str, ...]] = {
    FileCategory.LAB: (PDF, CSV, TEXT, JPEG, PNG),
    # PDF: radiology reports (their findings/impression are the radiology text).
    FileCategory.RADIOLOGY: (JPEG, PNG, DICOM, PDF),
}

# Adobe readers accept junk before the header, so pdfium does too; look this far.
_PDF_HEADER_WINDOW_BYTES = 1024
_DICOM_MAGIC_OFFSET = 128
# Share of control characters above which "text" is judged binary junk.
_MAX_CONTROL_RATIO = 0.02
# Lines of the head used to judge a CSV delimiter.
_CSV_SAMPLE_LINES = 12
CSV_DELIMITERS = (",", ";", "\t")
_TEXT_CONTROLS_OK = frozenset(b"\t\n\r\f\v")
# Executable headers filetype does not know (Mach-O thin/fat); these are refused outright.
_MACHO_MAGICS = (b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe",
                 b"\xcf\xfa\xed\xfe", b"\xca\xfe\xba\xbe")


def sniff(head: bytes) -> str | None:
    """MIME type of a file from its first bytes, or None when it is not one we accept."""
    if not head:
        return None
    # DICOM first: its 128-byte preamble is free-form (it may even hold a TIFF header).
    if head[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return DICOM
    if head.startswith(_MACHO_MAGICS):
        return None
    kind = filetype.guess(head)
    if kind is not None:
        # Any other binary type the library recognises (zip, gif, ELF, MZ ...) is refused.
        return {PNG: PNG, JPEG: JPEG, PDF: PDF}.get(kind.mime)
    if b"%PDF-" in head[:_PDF_HEADER_WINDOW_BYTES]:
        return PDF
    text = decode_text_head(head, complete=len(head) < SNIFF_BYTES)
    if text is None:
        return None
    if detect_delimiter(text) is not None:
        return CSV
    return TEXT


def decode_text_head(head: bytes, *, complete: bool = True) -> str | None:
    """The head as text, or None if it looks binary (NUL bytes, many control chars).

    UTF-8 (with or without BOM) is tried first; otherwise the bytes are read as latin-1,
    which never fails, so the control-character ratio decides. ``complete=False`` means
    the head may end inside a multi-byte character, which is then tolerated.
    """
    if b"\x00" in head:
        return None
    controls = sum(1 for b in head if (b < 0x20 and b not in _TEXT_CONTROLS_OK) or b == 0x7F)
    if controls > _MAX_CONTROL_RATIO * len(head):
        return None
    body = head[3:] if head.startswith(b"\xef\xbb\xbf") else head
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A cut at the end of a truncated head is not an encoding error.
        if not complete and exc.start >= len(body) - 3:
            try:
                return body[:exc.start].decode("utf-8")
            except UnicodeDecodeError:
                pass
    return body.decode("latin-1")


def detect_delimiter(text: str) -> str | None:
    """The CSV delimiter used consistently on the first lines of ``text``, or None.

    Consistent = at least two non-empty lines, and at least 80 % of them split into the
    same number (>= 2) of fields with that delimiter (quotes respected by the csv module).
    """
    lines = text.splitlines()
    if len(lines) > _CSV_SAMPLE_LINES:
        lines = lines[:_CSV_SAMPLE_LINES]
    elif lines and not text.endswith(("\n", "\r")) and len(lines) > 2:
        lines = lines[:-1]  # the last line may be cut by the head window
    lines = [ln for ln in lines if ln.strip()]
    if len(lines) < 2:
        return None
    best: tuple[float, str] | None = None
    for delim in CSV_DELIMITERS:
        try:
            counts = [len(row) for row in csv.reader(lines, delimiter=delim)]
        except csv.Error:
            continue
        modal = max(set(counts), key=counts.count)
        share = counts.count(modal) / len(counts)
        if modal >= 2 and share >= 0.8 and counts.count(modal) >= 2:
            score = share + modal / 1000  # prefer consistency, then more columns
            if best is None or score > best[0]:
                best = (score, delim)
    return best[1] if best else None


def accepts(category: str, mime: str | None) -> bool:
    """True when ``mime`` (from ``sniff``) is allowed for the upload category."""
    return mime is not None and mime in ACCEPTED.get(category, ())


def infer_category(mime: str | None) -> FileCategory | None:
    """Category implied by content: DICOM -> radiology; PDF/CSV/text -> lab.

    JPEG/PNG return None because a photo of a lab report and an X-ray look alike; the
    upload route then uses "radiology" for images.
    """
    if mime == DICOM:
        return FileCategory.RADIOLOGY
    if mime in (PDF, CSV, TEXT):
        return FileCategory.LAB
    return None


_MAX_EXT_CHARS = 16


def safe_display_name(name: str | None, *, max_chars: int = 200) -> str:
    """The client's file name made safe to display and store (never used as a path)."""
    if not name:
        return "file"
    name = unicodedata.normalize("NFC", str(name))
    # Keep only the last path component, whichever separator the client used.
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    # Controls and format chars (NUL, CR/LF, DEL, bidi overrides, zero-width ...) go;
    # line/paragraph separators become spaces so words stay apart.
    chars = []
    for ch in name:
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cf", "Cs", "Co", "Cn"):
            if ch in "\t\n\r\v\f":
                chars.append(" ")
            continue
        chars.append(" " if cat in ("Zl", "Zp") else ch)
    name = " ".join("".join(chars).split())
    name = name.lstrip(". ").rstrip(" ")
    if len(name) > max_chars:
        stem, ext = os.path.splitext(name)
        if not ext or len(ext) > _MAX_EXT_CHARS or len(ext) >= max_chars:
            stem, ext = name, ""
        name = stem[:max_chars - len(ext)].rstrip(" ") + ext
    return name or "file"
