"""Realistic test documents as bytes: lab PDFs (text and scanned), CSV exports, report
photos, X-ray PNG/JPEG, DICOM, executables, and hostile files.

Pure functions, deterministic output, no files written. Used by many test modules.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

from PIL import Image, ImageDraw, ImageFont

DEFAULT_LAB_LINES = [
    "CITY DIAGNOSTICS LAB - COMPLETE BLOOD COUNT",
    "Hemoglobin 9.1 g/dL 13.5-17.5",
    "WBC 7.2 10^3/uL 4.0-11.0",
    "Platelets 250 10^3/uL 150-400",
]

# The same report laid out as a printed table (tab = next column), for images/scans.
TABLE_LAB_LINES = [
    "CITY DIAGNOSTICS LAB",
    "Hemoglobin\t9.1\tg/dL\t13.5-17.5",
    "WBC\t7.2\t10^3/uL\t4.0-11.0",
    "Platelets\t250\t10^3/uL\t150-400",
]

# ----------------------------------------------------------------------------- PDF


def _pdf_escape(text: str) -> bytes:
    raw = text.encode("cp1252", errors="replace")
    return raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")


def _content_stream(lines: list[str], *, font_size: int = 11) -> bytes:
    leading = font_size + 4
    parts = [b"BT", f"/F1 {font_size} Tf {leading} TL 72 740 Td".encode()]
    for line in lines:
        parts.append(b"(" + _pdf_escape(line) + b") Tj T*")
    parts.append(b"ET")
    return b"\n".join(parts)


def _assemble_pdf(objects: list[bytes]) -> bytes:
    """A PDF file from object bodies (object i+1 = objects[i]); xref offsets computed."""
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for num, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(f"{num} 0 obj\n".encode() + body + b"\nendobj\n")
    xref_at = out.tell()
    out.write(f"xref\n0 {len(objects) + 1}\n".encode())
    out.write(b"0000000000 65535 f \n")
    for off in offsets:
        out.write(f"{off:010d} 00000 n \n".encode())
    out.write(f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\n"
              f"startxref\n{xref_at}\n%%EOF\n".encode())
    return out.getvalue()


def _stream(data: bytes) -> bytes:
    return f"<< /Length {len(data)} >>\nstream\n".encode() + data + b"\nendstream"


def text_pdf(lines: list[str] | None = None, pages: int = 1) -> bytes:
    """A real PDF with a Helvetica text layer; every page shows ``lines`` followed by
    "Page i of n" (so page breaks are checkable)."""
    lines = DEFAULT_LAB_LINES if lines is None else lines
    # 1 catalog, 2 pages, 3 font, then (page, content) pairs.
    objects: list[bytes] = [b"<< /Type /Catalog /Pages 2 0 R >>", b"",
                            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica "
                            b"/Encoding /WinAnsiEncoding >>"]
    kids = []
    for i in range(pages):
        page_num, content_num = len(objects) + 1, len(objects) + 2
        kids.append(f"{page_num} 0 R")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                       f"/Resources << /Font << /F1 3 0 R >> >> "
                       f"/Contents {content_num} 0 R >>".encode())
        objects.append(_stream(_content_stream([*lines, f"Page {i + 1} of {pages}"])))
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {pages} >>".encode()
    return _assemble_pdf(objects)


def pdf_many_pages(n: int) -> bytes:
    """A small file declaring ``n`` pages that all share one content stream."""
    objects: list[bytes] = [b"<< /Type /Catalog /Pages 2 0 R >>", b"",
                            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
                            _stream(_content_stream(["Repeated page"]))]
    first_page = len(objects) + 1
    for _ in range(n):
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                       b"/Resources << /Font << /F1 3 0 R >> >> /Contents 4 0 R >>")
    kids = " ".join(f"{first_page + i} 0 R" for i in range(n))
    objects[1] = f"<< /Type /Pages /Kids [{kids}] /Count {n} >>".encode()
    return _assemble_pdf(objects)


def truncated_pdf() -> bytes:
    """The first 40 % of a text PDF: header and part of the objects, no xref/trailer."""
    data = text_pdf(["Truncated report line"], pages=3)
    return data[: int(len(data) * 0.4)]


def _text_image(lines: list[str], *, font_size: int = 32, size: tuple[int, int] | None = None,
                column_px: int = 260, margin_px: int = 40) -> Image.Image:
    """Black text on white. A line with tabs is drawn as table columns ``column_px`` apart
    (wide gaps, as on a printed report, so OCR keeps the fields apart)."""
    font = ImageFont.load_default(size=font_size)
    line_h = int(font_size * 1.8)
    if size is None:
        widest = 0
        for line in lines:
            cells = line.split("\t")
            widest = max(widest, column_px * (len(cells) - 1) + int(font.getlength(cells[-1])))
        size = (widest + 2 * margin_px, line_h * len(lines) + 2 * margin_px)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    for row, line in enumerate(lines):
        y = margin_px + row * line_h
        for col, cell in enumerate(line.split("\t")):
            draw.text((margin_px + col * column_px, y), cell, fill="black", font=font)
    return img


def scanned_pdf(lines: list[str] | None = None, *, size: tuple[int, int] = (1275, 1650)) -> bytes:
    """An image-only PDF (no text layer): text rendered with Pillow, saved as PDF at 150 dpi.
    Tabs in ``lines`` separate table columns."""
    lines = TABLE_LAB_LINES if lines is None else lines
    img = _text_image(lines, size=size)
    buf = io.BytesIO()
    img.save(buf, format="PDF", resolution=150.0)
    return buf.getvalue()


# ----------------------------------------------------------------------------- CSV

LAB_CSV_ROWS = [
    ("Hemoglobin", "9.1", "g/dL", "13.5-17.5", "L"),
    ("WBC", "7.2", "10^3/uL", "4.0-11.0", ""),
    ("Platelets", "250", "10^3/uL", "150-400", ""),
    ("Glucose (fasting)", "240", "mg/dL", "70-100", "H"),
    ("Creatinine", "1.0", "mg/dL", "0.7 - 1.3", ""),
    ("HbA1c", "8.2", "%", "< 5.7", "H"),
    ("HIV 1/2 antibody", "Non-reactive", "", "Non-reactive", ""),
]


def lab_csv(rows: list[tuple[str, ...]] | None = None, *, delimiter: str = ",",
            bom: bool = False) -> bytes:
    """A lab system's CSV export: header + rows (incl. abnormal and critical values)."""
    rows = LAB_CSV_ROWS if rows is None else rows
    header = ["Test Name", "Result", "Units", "Reference Range", "Flag"]
    lines = [delimiter.join(header)]
    for row in rows:
        cells = [f'"{c}"' if delimiter in c or '"' in c else c for c in row]
        lines.append(delimiter.join(cells))
    data = ("\r\n".join(lines) + "\r\n").encode("utf-8")
    return (b"\xef\xbb\xbf" + data) if bom else data


def wide_csv(cols: int) -> bytes:
    """A header and one row with ``cols`` columns (hostile: a million columns)."""
    header = ",".join(f"c{i}" for i in range(cols))
    row = ",".join("1" for _ in range(cols))
    return (header + "\n" + row + "\n").encode()


# ---------------------------------------------------------------------------- images


def report_photo_png(lines: list[str] | None = None) -> bytes:
    """A lab report "photo": big, clear text so OCR reads it. Tabs separate columns."""
    lines = TABLE_LAB_LINES if lines is None else lines
    buf = io.BytesIO()
    _text_image(lines).save(buf, format="PNG")
    return buf.getvalue()


def _xray_image(w: int, h: int) -> Image.Image:
    """A chest-film-like greyscale picture: dark background, two bright "lung fields"."""
    img = Image.new("L", (w, h), 20)
    draw = ImageDraw.Draw(img)
    draw.ellipse((w * 0.12, h * 0.15, w * 0.45, h * 0.85), fill=170)
    draw.ellipse((w * 0.55, h * 0.15, w * 0.88, h * 0.85), fill=150)
    draw.rectangle((w * 0.47, h * 0.05, w * 0.53, h * 0.95), fill=230)  # spine
    return img


def xray_png(w: int = 256, h: int = 256) -> bytes:
    buf = io.BytesIO()
    _xray_image(w, h).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(w: int = 200, h: int = 100, *, orientation: int | None = 6,
         camera: str = "SecretCam 3000") -> bytes:
    """An RGB JPEG whose left half is red and right half blue, with EXIF Orientation
    (6 = display rotated 90 degrees clockwise) and a Make tag that must not survive."""
    img = Image.new("RGB", (w, h), (0, 0, 255))
    ImageDraw.Draw(img).rectangle((0, 0, w // 2 - 1, h - 1), fill=(255, 0, 0))
    exif = Image.Exif()
    exif[0x010F] = camera  # Make
    if orientation is not None:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(w: int = 30000, h: int = 30000) -> bytes:
    """A tiny PNG declaring a huge greyscale image (decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def truncated_png() -> bytes:
    data = xray_png(256, 256)
    return data[: len(data) // 2]


def gif_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("P", (8, 8)).save(buf, format="GIF")
    return buf.getvalue()


# ---------------------------------------------------------------------------- DICOM

PATIENT_ID = "MRN-4455-XYZ"
INSTITUTION = "Sunrise General Hospital"
REFERRER = "HOUSE^GREGORY"


def dicom(rows: int = 64, cols: int = 64, modality: str = "CR",
          patient_name: str = "DOE^JANE", *, window: bool = True, frames: int = 1,
          photometric: str = "MONOCHROME2", compressed: bool = False) -> bytes:
    """A DICOM Part 10 file (128-byte preamble + DICM) with MONOCHROME uint16 pixels and
    identifying tags (name, ID, birth date, institution, referrer, accession number)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import (ExplicitVRLittleEndian, JPEG2000Lossless,
                             PYDICOM_IMPLEMENTATION_UID, generate_uid)
    import numpy as np

    sop_class = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    sop_instance = generate_uid(entropy_srcs=["medmitra-test", modality, str(rows), str(cols)])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = JPEG2000Lossless if compressed else ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["study", patient_name])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["series", patient_name])
    ds.PatientName = patient_name
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19800214"
    ds.PatientSex = "F"
    ds.PatientAddress = "12 Hidden Lane, Springfield"
    ds.OtherPatientIDs = "ALT-998877"
    ds.InstitutionName = INSTITUTION
    ds.ReferringPhysicianName = REFERRER
    ds.AccessionNumber = "ACC-20260301-77"
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.StudyDescription = "CHEST PA AND LATERAL"
    ds.SeriesDescription = "PA"
    ds.ViewPosition = "PA"
    ds.StudyDate = "20260301"
    ds.Rows = rows
    ds.Columns = cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if window:
        ds.WindowCenter = 2048
        ds.WindowWidth = 4096
    if frames > 1:
        ds.NumberOfFrames = frames
    # A horizontal gradient 0..4095 (12-bit), repeated per frame.
    ramp = np.linspace(0, 4095, cols, dtype=np.float64).astype(np.uint16)
    frame = np.tile(ramp, (rows, 1))
    pixels = np.stack([frame] * frames) if frames > 1 else frame
    if compressed:
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])  # bogus J2K
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = pixels.astype("<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def corrupt_dicom() -> bytes:
    """Preamble + DICM followed by junk: a group-2 element claiming a huge length."""
    junk = struct.pack("<HH2sH", 0x0002, 0x0000, b"UL", 4) + struct.pack("<I", 0xFFFFFFF0)
    junk += struct.pack("<HH2sH", 0x0002, 0x0010, b"UI", 0xFFFF) + b"\x01\x02\x03" * 50
    return b"\x00" * 128 + b"DICM" + junk


# ------------------------------------------------------------------------ executables


def elf_exe() -> bytes:
    """An ELF64 header (x86-64 executable) padded with zeros."""
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\x00" * 8
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, 0x401000, 64, 0, 0,
                                 64, 56, 1, 64, 0, 0)
    return header + b"\x00" * 512


def mz_exe() -> bytes:
    """A DOS/PE executable stub ("MZ" ... "PE\\0\\0")."""
    stub = bytearray(b"MZ" + b"\x90\x00" * 29 + b"\x00" * 2)
    stub += b"\x00" * (0x3C - len(stub)) + struct.pack("<I", 0x80)
    stub += b"\x00" * (0x80 - len(stub)) + b"PE\x00\x00" + b"\x00" * 256
    return bytes(stub)


def macho_exe() -> bytes:
    return b"\xcf\xfa\xed\xfe" + struct.pack("<IIIIII", 0x01000007, 3, 2, 0, 0, 0) + b"\x00" * 256


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("report.txt", "Hemoglobin 9.1 g/dL")
    return buf.getvalue()
