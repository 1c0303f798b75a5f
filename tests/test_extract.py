"""Stage 1 extraction of every docfactory document, including hostile ones."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import pytest
from PIL import Image

import docfactory as df
from medmitra import filetypes as ft
from medmitra.pipeline import extract as ex
from medmitra.pipeline.types import ExtractedFile


def run(tmp_path: Path, data: bytes, category: str, *, mime: str | None = None,
        name: str = "upload") -> ExtractedFile:
    path = tmp_path / "stored.bin"   # stored names never come from the client
    path.write_bytes(data)
    mime = mime or ft.sniff(data[: ft.SNIFF_BYTES])
    assert mime is not None
    return ex.extract_file(path, file_id="f1", category=category, mime=mime, file_name=name)


def squash(text: str | None) -> str:
    """Lower-case text without whitespace: OCR may drop spaces inside a phrase."""
    return re.sub(r"\s+", "", (text or "").lower())


# ------------------------------------------------------------------------------ PDF

def test_text_pdf_pages_and_lab_rows(tmp_path: Path) -> None:
    out = run(tmp_path, df.text_pdf(pages=3), "lab", name="cbc.pdf")
    assert out.mime == "application/pdf" and out.file_name == "cbc.pdf"
    assert len(out.pages) == 3 and not out.ocr_used
    for i, page in enumerate(out.pages, start=1):
        assert "Hemoglobin 9.1 g/dL 13.5-17.5" in page
        assert f"Page {i} of 3" in page
    assert out.text == "\n\f\n".join(out.pages)
    assert out.text.count("\f") == 2
    hb = [r for r in out.lab_rows if r.test == "Hemoglobin"]
    assert len(hb) == 3 and all(r.flag == "low" and r.unit == "g/dL" for r in hb)
    assert [r.page for r in hb] == [1, 2, 3]
    assert {r.test for r in out.lab_rows} == {"Hemoglobin", "WBC", "Platelets"}
    assert out.notes == []


def test_text_pdf_keeps_non_ascii(tmp_path: Path) -> None:
    out = run(tmp_path, df.text_pdf(["Befund: Hämoglobin erniedrigt (µ) 5 °C"]), "lab")
    assert "Hämoglobin erniedrigt (µ) 5 °C" in out.text


def test_scanned_pdf_is_ocrd(tmp_path: Path) -> None:
    out = run(tmp_path, df.scanned_pdf(size=(1100, 420)), "lab")
    assert out.ocr_used and len(out.pages) == 1
    assert "citydiagnosticslab" in squash(out.text)
    assert "hemoglobin9.1g/dl13.5-17.5" in squash(out.text)
    rows = {r.test: r for r in out.lab_rows}
    assert rows["Hemoglobin"].value == "9.1" and rows["Hemoglobin"].flag == "low"
    assert rows["Platelets"].flag == "normal"
    assert rows["Hemoglobin"].page == 1
    assert any("OCR" in n for n in out.notes)


def test_pdf_page_cap(tmp_path: Path) -> None:
    started = time.perf_counter()
    out = run(tmp_path, df.pdf_many_pages(5000), "lab")
    assert len(out.pages) == ex.MAX_PDF_PAGES
    assert all(p == "Repeated page" for p in out.pages)
    assert any("5000 pages" in n for n in out.notes)
    assert time.perf_counter() - started < 10


def test_pdf_text_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ex, "MAX_TEXT_CHARS", 100)
    out = run(tmp_path, df.text_pdf(["x" * 60], pages=4), "lab")
    assert len(out.text) <= 100 + 2 * len(ex.PAGE_SEPARATOR)
    assert len(out.pages) < 4
    assert any("cut at 100 characters" in n for n in out.notes)


@pytest.mark.parametrize("data", [
    df.truncated_pdf(),
    b"%PDF-1.7\n" + bytes(range(256)) * 40,
    b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF",
])
def test_broken_pdfs_give_notes_not_exceptions(tmp_path: Path, data: bytes) -> None:
    out = run(tmp_path, data, "lab", mime="application/pdf")
    assert out.text is None and out.lab_rows == []
    assert out.notes and all(isinstance(n, str) and n for n in out.notes)


# ------------------------------------------------------------------------- CSV / text

def test_lab_csv(tmp_path: Path) -> None:
    out = run(tmp_path, df.lab_csv(bom=True), "lab")
    assert out.mime == "text/csv"
    rows = {r.test: r for r in out.lab_rows}
    assert len(rows) == len(df.LAB_CSV_ROWS)
    assert (rows["Hemoglobin"].value, rows["Hemoglobin"].flag) == ("9.1", "low")
    assert (rows["Glucose (fasting)"].flag, rows["Glucose (fasting)"].critical) == ("high", False)
    assert rows["Platelets"].flag == "normal"
    assert ("Hemoglobin: 9.1 g/dL (reference 13.5-17.5) [low; report marker L]"
            in out.text.splitlines())
    assert not out.text.startswith("\ufeff")


def test_csv_without_lab_columns_is_rendered_as_table(tmp_path: Path) -> None:
    out = run(tmp_path, b"a,b,c\n1,2,3\n4,5,6\n", "lab")
    assert out.lab_rows == []
    assert out.text == "a | b | c\n1 | 2 | 3\n4 | 5 | 6"
    assert any("No lab result columns" in n for n in out.notes)


def test_plain_text_lab_report(tmp_path: Path) -> None:
    data = "\n".join(df.DEFAULT_LAB_LINES).encode("cp1252")
    out = run(tmp_path, data, "lab")
    assert out.mime == "text/plain"
    assert out.text.startswith("CITY DIAGNOSTICS LAB")
    assert [r.test for r in out.lab_rows] == ["Hemoglobin", "WBC", "Platelets"]


def test_wide_and_junk_csv_is_bounded(tmp_path: Path) -> None:
    started = time.perf_counter()
    out = run(tmp_path, df.wide_csv(1_000_000), "lab", mime="text/csv")
    assert out.lab_rows == []
    assert out.text is not None and len(out.text) <= ex.MAX_TEXT_CHARS
    first = out.text.splitlines()[0]
    assert first.count(" | ") == 63   # 64 columns kept
    junk = run(tmp_path, bytes(range(1, 256)) * 4000, "lab", mime="text/csv")
    assert junk.lab_rows == []
    assert time.perf_counter() - started < 10


def test_empty_text_file(tmp_path: Path) -> None:
    out = run(tmp_path, b"   \n\n", "lab", mime="text/plain")
    assert out.text is None and out.notes


# ---------------------------------------------------------------------------- images

def test_report_photo_is_ocrd(tmp_path: Path) -> None:
    out = run(tmp_path, df.report_photo_png(), "lab")
    assert out.ocr_used
    assert "hemoglobin" in squash(out.text) and "platelets" in squash(out.text)
    rows = {r.test: r for r in out.lab_rows}
    assert (rows["Hemoglobin"].value, rows["Hemoglobin"].unit) == ("9.1", "g/dL")
    assert rows["Hemoglobin"].flag == "low"
    assert out.image is not None and out.image.mode == "RGB"


def test_radiology_png_normalised_not_ocrd(tmp_path: Path) -> None:
    out = run(tmp_path, df.xray_png(2048, 1536), "radiology")
    assert out.text is None and not out.ocr_used
    assert out.image.mode == "RGB" and out.image.size == (1024, 768)
    assert any("not OCR'd" in n for n in out.notes)


def test_jpeg_orientation_applied_and_exif_removed(tmp_path: Path) -> None:
    data = df.jpeg(200, 100, orientation=6)
    assert b"SecretCam" in data
    out = run(tmp_path, data, "radiology")
    img = out.image
    assert img.size == (100, 200)   # rotated 90 degrees for display
    # Stored left half red -> after a clockwise turn it is the top half.
    top, bottom = img.getpixel((50, 30)), img.getpixel((50, 170))
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    assert not img.getexif() and not img.info
    assert "SecretCam" not in repr(out)


def test_sixteen_bit_png_is_stretched_not_clipped(tmp_path: Path) -> None:
    import io

    import numpy as np

    arr = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (32, 1))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    out = run(tmp_path, buf.getvalue(), "radiology")
    px = np.asarray(out.image)[..., 0]
    assert px[0, 0] == 0 and px[0, -1] == 255 and 100 < px[0, 32] < 160


@pytest.mark.parametrize("data, hint", [
    (df.bomb_png(), "too large"),
    (df.bomb_png(8000, 8000), "too large"),  # between 1x and 2x Pillow's limit
    (df.truncated_png(), "corrupt"),
])
def test_hostile_images_refused(tmp_path: Path, data: bytes, hint: str) -> None:
    started = time.perf_counter()
    for category in ("radiology", "lab"):
        out = run(tmp_path, data, category)
        assert out.image is None and out.text is None and not out.ocr_used
        assert any(hint in n for n in out.notes), out.notes
    assert time.perf_counter() - started < 5


# ----------------------------------------------------------------------------- DICOM

IDENTIFYING = ("DOE", "JANE", df.PATIENT_ID, "19800214", "Hidden Lane", "ALT-998877",
               df.INSTITUTION, "HOUSE", "ACC-20260301-77")


def _assert_no_identifiers(out: ExtractedFile) -> None:
    fields = dataclasses.asdict(dataclasses.replace(out, image=None))
    dump = repr(fields) + repr(out.image.info if out.image is not None else {})
    for secret in IDENTIFYING:
        assert secret.lower() not in dump.lower(), secret
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientAddress",
                "OtherPatientIDs", "InstitutionName", "ReferringPhysicianName",
                "AccessionNumber"):
        assert key not in out.dicom_tags


def test_dicom_tags_image_and_no_patient_identifiers(tmp_path: Path) -> None:
    out = run(tmp_path, df.dicom(rows=64, cols=96), "radiology", name="DOE_JANE.dcm")
    out.file_name = "scan.dcm"  # the display name is the client's; checked elsewhere
    assert out.dicom_tags["Modality"] == "CR"
    assert out.dicom_tags["BodyPartExamined"] == "CHEST"
    assert out.dicom_tags["StudyDescription"] == "CHEST PA AND LATERAL"
    assert out.dicom_tags["StudyDate"] == "20260301"
    assert out.dicom_tags["ViewPosition"] == "PA"
    assert (out.dicom_tags["Rows"], out.dicom_tags["Columns"]) == ("64", "96")
    assert out.text.startswith("Modality: CR; Body part: CHEST; Study: CHEST PA AND LATERAL")
    assert out.image.mode == "RGB" and out.image.size == (96, 64)
    # Window 0..4096 over a 0..4095 ramp: dark on the left, bright on the right.
    assert out.image.getpixel((0, 10))[0] < 10 and out.image.getpixel((95, 10))[0] > 240
    _assert_no_identifiers(out)


def test_dicom_multiframe_monochrome1_without_window(tmp_path: Path) -> None:
    out = run(tmp_path, df.dicom(frames=3, photometric="MONOCHROME1", window=False), "radiology")
    assert out.image.size == (64, 64)
    # MONOCHROME1 is inverted: the low values on the left are now white.
    assert out.image.getpixel((0, 0))[0] == 255 and out.image.getpixel((63, 0))[0] == 0
    assert out.dicom_tags["NumberOfFrames"] == "3"
    _assert_no_identifiers(out)


def test_dicom_compressed_without_decoder_keeps_tags(tmp_path: Path) -> None:
    out = run(tmp_path, df.dicom(compressed=True), "radiology")
    assert out.image is None
    assert out.dicom_tags["Modality"] == "CR" and out.text.startswith("Modality: CR")
    assert any("No image from the DICOM file" in n for n in out.notes)
    _assert_no_identifiers(out)


def test_large_dicom_is_downscaled(tmp_path: Path) -> None:
    out = run(tmp_path, df.dicom(rows=1200, cols=1500), "radiology")
    assert max(out.image.size) == 1024


@pytest.mark.parametrize("data", [
    df.corrupt_dicom(),
    b"\x00" * 128 + b"DICM",
    df.dicom()[:400],           # cut inside the dataset
    df.dicom()[:-2000],         # pixel data cut short
])
def test_corrupt_dicom_gives_notes(tmp_path: Path, data: bytes) -> None:
    out = run(tmp_path, data, "radiology")
    assert out.image is None and out.notes
    _assert_no_identifiers(out)


# ----------------------------------------------------------------------------- misc

def test_unsupported_mime_is_a_note(tmp_path: Path) -> None:
    out = run(tmp_path, b"GIF89a", "lab", mime="image/gif")
    assert out.text is None and out.notes


def test_missing_file_is_a_note(tmp_path: Path) -> None:
    out = ex.extract_file(tmp_path / "gone", file_id="f9", category="lab",
                          mime="text/csv", file_name="gone.csv")
    assert out.text is None and out.notes == ["The file could not be read (FileNotFoundError)."]


# ------------------------------------------------------------------ OCR and threads

def test_reading_order_groups_boxes_into_lines() -> None:
    from medmitra.pipeline import ocr

    def box(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]

    result = [  # shuffled; second row slightly skewed
        [box(300, 62, 360, 88), "g/dL", 0.9],
        [box(10, 10, 200, 40), "CITY LAB", 0.9],
        [box(10, 60, 150, 90), "Hemoglobin", 0.9],
        [box(200, 61, 250, 89), "9.1", 0.9],
        [box(10, 110, 120, 140), "WBC", 0.9],
        [box(200, 112, 240, 138), "  ", 0.9],
    ]
    assert ocr._reading_order(result) == ["CITY LAB", "Hemoglobin 9.1 g/dL", "WBC"]


def test_ocr_engine_never_touches_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from medmitra.pipeline import ocr

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("OCR tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(ocr, "_engine", None)   # force a fresh load under the block
    img = df._text_image(["RESULT 42"], font_size=40)
    assert "result42" in squash(ocr.ocr_image(img))
    assert ocr._engine is not None


def test_concurrent_extraction_matches_sequential(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    docs = [(df.text_pdf([f"Patient report {i}", "Hemoglobin 9.1 g/dL 13.5-17.5"], pages=4), "lab")
            for i in range(6)] + [(df.dicom(rows=32 + i, cols=40), "radiology") for i in range(4)]
    paths = []
    for i, (data, _cat) in enumerate(docs):
        p = tmp_path / f"f{i}"
        p.write_bytes(data)
        paths.append(p)

    def one(i: int) -> ExtractedFile:
        data, cat = docs[i]
        return ex.extract_file(paths[i], file_id=f"f{i}", category=cat,
                               mime=ft.sniff(data[: ft.SNIFF_BYTES]), file_name=f"f{i}")

    sequential = [one(i) for i in range(len(docs))]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(one, range(len(docs))))
    for a, b in zip(sequential, parallel):
        assert (a.text, a.pages, a.lab_rows, a.dicom_tags, a.notes) == \
               (b.text, b.pages, b.lab_rows, b.dicom_tags, b.notes)
        assert (a.image is None) == (b.image is None)
    assert "Patient report 3" in parallel[3].text


def test_large_jpeg_is_downscaled_with_orientation(tmp_path: Path) -> None:
    out = run(tmp_path, df.jpeg(3000, 2000, orientation=6), "radiology")
    assert out.image.size == (683, 1024)
    assert out.image.getpixel((340, 100))[0] > 200   # red half on top after rotation
