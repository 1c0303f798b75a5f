"""Content sniffing (magic bytes, never names), category rules, display-name cleaning."""

from __future__ import annotations

import pytest

from medmitra import filetypes as ft
import docfactory as df


def head(data: bytes) -> bytes:
    return data[: ft.SNIFF_BYTES]


@pytest.mark.parametrize("data, mime", [
    (df.text_pdf(["Hello"]), "application/pdf"),
    (df.scanned_pdf(["Scan"], size=(200, 100)), "application/pdf"),
    (df.xray_png(), "image/png"),
    (df.report_photo_png(["x"]), "image/png"),
    (df.jpeg(), "image/jpeg"),
    (df.dicom(), "application/dicom"),
    (df.lab_csv(), "text/csv"),
    (df.lab_csv(delimiter=";"), "text/csv"),
    (df.lab_csv(delimiter="\t"), "text/csv"),
    (df.lab_csv(bom=True), "text/csv"),
    (b"Hemoglobin 9.1 g/dL 13.5-17.5\nPlatelets 250 10^3/uL 150-400\n", "text/plain"),
    ("Hämoglobin 9,1 g/dL\nBefund: unauffällig\n".encode("utf-8"), "text/plain"),
    ("Hämoglobin 9,1 g/dL\nBefund: unauffällig\n".encode("latin-1"), "text/plain"),
    (b"single line note", "text/plain"),
])
def test_sniff_accepted_types(data: bytes, mime: str) -> None:
    assert ft.sniff(head(data)) == mime


def test_pdf_header_after_junk_is_still_pdf() -> None:
    # Readers accept up to 1 KiB of junk before %PDF-; a text file naming "%PDF-" later is text.
    assert ft.sniff(b"\n" * 300 + df.text_pdf(["x"])[:2000]) == "application/pdf"
    assert ft.sniff(b"a" * 1100 + b"%PDF-1.4\n") == "text/plain"


@pytest.mark.parametrize("data", [
    df.elf_exe(), df.mz_exe(), df.macho_exe(), df.zip_bytes(), df.gif_bytes(),
    bytes(range(256)) * 8,             # binary junk
    b"\x00" * 100 + b"text",           # NULs
    "text in utf-16".encode("utf-16"),  # NULs everywhere
    b"",
])
def test_sniff_refuses_binaries(data: bytes) -> None:
    assert ft.sniff(head(data)) is None


def test_sniff_ignores_the_name_png_declared_as_pdf() -> None:
    # The route never consults the name: a PNG uploaded as "report.pdf" is a PNG, and a
    # PDF uploaded as "xray.png" to radiology is a PDF (a report), which lab refuses as
    # an image would be: it is accepted as what it is, a PDF.
    assert ft.sniff(head(df.xray_png())) == "image/png"
    pdf_as_png = ft.sniff(head(df.text_pdf(["x"])))
    assert pdf_as_png == "application/pdf" and ft.accepts("radiology", pdf_as_png)
    # An executable named "cbc.csv" is refused for every category.
    assert ft.sniff(head(df.elf_exe())) is None


def test_dicom_detected_whatever_the_preamble_holds() -> None:
    data = bytearray(df.dicom())
    data[0:4] = b"II*\x00"  # a TIFF header in the preamble (dual-personality files)
    assert ft.sniff(head(bytes(data))) == "application/dicom"
    assert ft.sniff(head(bytes(data[:128]) + b"DICX" + bytes(data[132:]))) != "application/dicom"


def test_csv_needs_a_consistent_delimiter() -> None:
    assert ft.sniff(b"a,b,c\n1,2,3\n4,5,6\n") == "text/csv"
    assert ft.sniff(b'"Test, name",Value\n"Hb, total",9.1\n') == "text/csv"
    # Prose with a comma here and there is text, not CSV.
    assert ft.sniff(b"Patient seen today, feels better.\nNo fever.\nPlan: rest, fluids, review\n") \
        == "text/plain"


def test_head_cut_inside_a_utf8_character_is_still_text() -> None:
    data = ("Befund " + "ä" * 3000).encode("utf-8")  # 2-byte chars across the 4096 cut
    assert len(data) > ft.SNIFF_BYTES
    # 7 ASCII bytes then 2-byte chars: the 4096-byte head ends inside a character, which
    # must not turn the whole head into latin-1 mojibake.
    assert ft.decode_text_head(data[: ft.SNIFF_BYTES], complete=False).startswith("Befund ää")
    assert ft.sniff(data[: ft.SNIFF_BYTES]) == "text/plain"


@pytest.mark.parametrize("category, mime, ok", [
    ("lab", "application/pdf", True), ("lab", "text/csv", True), ("lab", "text/plain", True),
    ("lab", "image/jpeg", True), ("lab", "image/png", True), ("lab", "application/dicom", False),
    ("radiology", "image/jpeg", True), ("radiology", "image/png", True),
    ("radiology", "application/dicom", True), ("radiology", "application/pdf", True),
    ("radiology", "text/csv", False), ("other", "image/png", False), ("lab", None, False),
])
def test_accepts(category: str, mime: str | None, ok: bool) -> None:
    assert ft.accepts(category, mime) is ok


@pytest.mark.parametrize("mime, category", [
    ("application/dicom", "radiology"), ("application/pdf", "lab"), ("text/csv", "lab"),
    ("text/plain", "lab"), ("image/jpeg", None), ("image/png", None), (None, None),
])
def test_infer_category(mime: str | None, category: str | None) -> None:
    assert ft.infer_category(mime) == category


@pytest.mark.parametrize("raw, clean", [
    ("report.pdf", "report.pdf"),
    ("../../etc/passwd", "passwd"),
    ("..\\..\\windows\\system32\\cmd.exe", "cmd.exe"),
    ("C:\\Users\\dr\\Desktop\\cbc.csv", "cbc.csv"),
    ("/abs/path/x-ray.png", "x-ray.png"),
    ("evil\x00name.pdf", "evilname.pdf"),
    ("line\r\nbreak.pdf", "line break.pdf"),
    ("tab\tand  spaces .png", "tab and spaces .png"),
    ("del\x7fchar.pdf", "delchar.pdf"),
    ("bidi\u202egpj.exe", "bidigpj.exe"),   # right-to-left override removed
    ("zero\u200bwidth.pdf", "zerowidth.pdf"),
    (".hidden", "hidden"),
    ("...", "file"),
    ("..", "file"),
    ("", "file"),
    (None, "file"),
    ("dir/", "file"),
    ("\x00\x01\x02", "file"),
    ("Befund Müller.pdf", "Befund Müller.pdf"),
])
def test_safe_display_name(raw: str | None, clean: str) -> None:
    assert ft.safe_display_name(raw) == clean


def test_safe_display_name_trims_long_names_keeping_the_extension() -> None:
    name = ft.safe_display_name("a" * 1000 + ".pdf")
    assert len(name) == 200 and name.endswith(".pdf") and name.startswith("aaa")
    assert ft.safe_display_name("b" * 50, max_chars=10) == "b" * 10
    odd = ft.safe_display_name("c" * 300 + "." + "d" * 40)  # "extension" too long to keep
    assert len(odd) == 200 and odd == ("c" * 300)[:200]
