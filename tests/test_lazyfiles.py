"""medmitra/lazyfiles.py on a real PyInstaller archive (written by PyInstaller's own
CArchiveWriter, read back by its CArchiveReader). The one-file binary itself, with the
bootloader skipping the marked entries and OCR and the model working after an unpack on
first import, is exercised by tests/test_binary.py."""

from __future__ import annotations

import json
import sys
import threading
import zlib
from pathlib import Path

import pytest

from medmitra import lazyfiles

PKG = "lazyprobe"   # a package that exists only inside the test archive


def _executable(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A stand-in executable: some leading bytes (the bootloader's place) followed by a
    CArchive, as PyInstaller appends it; compressed and stored entries."""
    writers = pytest.importorskip("PyInstaller.archive.writers",
                                  reason="PyInstaller (a test extra) is not installed")
    files = {
        f"{PKG}/__init__.py": b"from .core import VALUE\n",
        f"{PKG}/core.py": b"VALUE = 'unpacked on import'\n" + b"# padding\n" * 5000,
        f"{PKG}/data/table.bin": bytes(range(256)) * 300,
        "kept/at_start.txt": b"the bootloader unpacks this one\n",
    }
    entries = []
    for i, (name, data) in enumerate(files.items()):
        src = tmp_path / "src" / name
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(data)
        entries.append((name, str(src), i % 2 == 0, "x" if name.endswith(".py") else "b"))
    archive = tmp_path / "pkg.archive"
    writers.CArchiveWriter(str(archive), entries, "libpython3.so")
    exe = tmp_path / "medmitra"
    exe.write_bytes(b"\x7fELF" + b"\0" * 4096 + archive.read_bytes())
    return exe, files


def test_retype_changes_only_the_type_codes(tmp_path):
    exe, files = _executable(tmp_path)
    before = exe.read_bytes()
    lazy = {n for n in files if n.startswith(PKG)}
    assert lazyfiles.mark_lazy(str(exe), lazy) == len(lazy)
    after = exe.read_bytes()
    assert len(after) == len(before)
    assert sum(a != b for a, b in zip(before, after)) == len(lazy)
    from PyInstaller.archive.readers import CArchiveReader

    toc = CArchiveReader(str(exe)).toc
    assert {n for n, e in toc.items() if e[4] == "L"} == lazy
    assert toc["kept/at_start.txt"][4] == "b"
    # the same entries through lazyfiles' own reader, offsets included
    for name, _at, offset, clen, compressed, typecode in lazyfiles.entries(str(exe)):
        assert typecode == (b"L" if name in lazy else b"b" if name.endswith("txt") else b"x")
        blob = after[offset:offset + clen]
        assert (zlib.decompress(blob) if compressed else blob) == files[name]


def test_import_unpacks_the_group_first(tmp_path, monkeypatch):
    exe, files = _executable(tmp_path)
    lazy = {n for n in files if n.startswith(PKG)}
    lazyfiles.mark_lazy(str(exe), lazy)
    meipass = tmp_path / "_MEI123"
    (meipass / "medmitra").mkdir(parents=True)
    (meipass / lazyfiles.MANIFEST).write_text(json.dumps({n: "probe" for n in lazy}))
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "_MEIPASS", str(meipass), raising=False)
    monkeypatch.setattr(sys, "executable", str(exe))
    monkeypatch.setitem(lazyfiles.GROUPS, "probe", ((PKG,), ()))
    monkeypatch.setattr(lazyfiles, "_done", set())
    monkeypatch.setattr(lazyfiles, "_triggers", {})
    monkeypatch.syspath_prepend(str(meipass))
    meta_path = list(sys.meta_path)
    try:
        lazyfiles.install()
        assert not (meipass / PKG).exists()          # nothing unpacked before the import
        errors = []

        def load():
            try:
                __import__(PKG)
            except Exception as exc:   # reported below
                errors.append(exc)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert sys.modules[PKG].VALUE == "unpacked on import"
        for name in lazy:
            assert (meipass / name).read_bytes() == files[name]
        assert not list(meipass.rglob("*.part"))
        assert not (meipass / "kept").exists()       # not in the group: left to the bootloader
        lazyfiles.ensure("probe")                    # once only: nothing is rewritten
        assert lazyfiles._done == {"probe"}
    finally:
        sys.meta_path[:] = meta_path
        for mod in [m for m in sys.modules if m == PKG or m.startswith(PKG + ".")]:
            del sys.modules[mod]


def test_a_failed_unpack_is_an_import_error(tmp_path, monkeypatch):
    exe, files = _executable(tmp_path)
    lazyfiles.mark_lazy(str(exe), {n for n in files if n.startswith(PKG)})
    meipass = tmp_path / "_MEI9"
    (meipass / "medmitra").mkdir(parents=True)
    (meipass / lazyfiles.MANIFEST).write_text(json.dumps({f"{PKG}/core.py": "probe"}))
    exe.write_bytes(exe.read_bytes()[:-200])       # the archive's table cut off
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "_MEIPASS", str(meipass), raising=False)
    monkeypatch.setattr(sys, "executable", str(exe))
    monkeypatch.setattr(lazyfiles, "_done", set())
    with pytest.raises(ImportError, match="cannot unpack the probe files"):
        lazyfiles.ensure("probe")
    assert lazyfiles._done == set()


def test_groups_cover_the_heavy_packages():
    assert lazyfiles.group_of("onnxruntime/capi/onnxruntime_pybind11_state.so") == "ocr"
    assert lazyfiles.group_of("libgeos-a1b2c3d4.so.3.13.1",
                              "/x/site-packages/shapely.libs/libgeos-a1b2c3d4.so.3.13.1") \
        == "ocr"
    assert lazyfiles.group_of("numpy.libs/libscipy_openblas64_.so") == "model"
    assert lazyfiles.group_of("llama_cpp/lib/libllama.so.0") == "model"
    assert lazyfiles.group_of("rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx") == "ocr"
    assert lazyfiles.group_of("PIL/_imaging.cpython-311-x86_64-linux-gnu.so") == "documents"
    assert lazyfiles.group_of("medmitra/clinical/data/icd10cm.sqlite") == "icd10"
    # what /health needs stays with the bootloader
    for name in ("libpython3.11.so.1.0", "medmitra/static/redoc/redoc.standalone.js",
                 "numpyish/x.so", "cv2x/y.so",
                 "uvloop/loop.cpython-311-x86_64-linux-gnu.so", "base_library.zip"):
        assert lazyfiles.group_of(name) is None


def test_a_module_can_trigger_a_group(monkeypatch):
    calls = []
    monkeypatch.setattr(lazyfiles, "ensure", calls.append)
    monkeypatch.setattr(lazyfiles, "_done", set())
    monkeypatch.setattr(lazyfiles, "_triggers",
                        {"medmitra.clinical.icd10": "icd10", "numpy": "model"})
    finder = lazyfiles._Finder()
    assert finder.find_spec("medmitra.clinical.icd10") is None
    assert finder.find_spec("medmitra.clinical.labs") is None
    assert finder.find_spec("numpy.linalg") is None
    assert calls == ["icd10", "model"]
