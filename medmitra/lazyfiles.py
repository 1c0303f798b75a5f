"""Parts of the one-file binary that are unpacked when first imported, not at every start.

PyInstaller's one-file bootloader unpacks every library and data file of its archive into a
temp folder (``sys._MEIPASS``) before Python starts: ~370 MB and about 2 s of CPU, most of it
for the model (numpy, llama.cpp), OCR (onnxruntime, the OCR models) and documents
(PDFium, Pillow) and the ICD-10-CM table, none of which is needed to answer ``/health``.
``build.spec`` gives the
archive entries of those groups a type code that the bootloader does not unpack
(``LAZY_TYPECODE``) and lists them in ``MANIFEST``; :func:`install` adds an import hook
that unpacks a whole group into the same folder, under the same names, the first time one of
its packages is imported. The libraries then load exactly as if the bootloader had
unpacked them (the bootloader's ``LD_LIBRARY_PATH`` points at that folder), and the folder is
removed on exit as before.

From the source tree (not frozen) nothing here runs.
"""

from __future__ import annotations

import importlib
import json
import os
import struct
import sys
import threading
import zlib

# group -> (imports that need it, archive paths in it). An import name also claims its own
# folder; a path ending in ".libs/" is an auditwheel folder of vendored libraries, whose
# files PyInstaller may move to the top level (matched by where they were collected from).
GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "model": (("numpy", "llama_cpp"), ("numpy.libs/",)),
    "ocr": (("onnxruntime", "rapidocr_onnxruntime", "shapely", "pyclipper"),
            ("shapely.libs/", "onnxruntime.libs/")),
    "documents": (("PIL", "pypdfium2", "pypdfium2_raw"), ("pillow.libs/",)),
    # the ICD-10-CM table, first opened by the model worker's warm-up or an analysis
    "icd10": (("medmitra.clinical.icd10",), ("medmitra/clinical/data/icd10cm.sqlite",)),
}

LAZY_TYPECODE = b"L"        # not one of PyInstaller's, so its bootloader skips the entry
MANIFEST = "medmitra/lazy-manifest.json"   # {entry name: group}, unpacked at start

# PyInstaller's CArchive layout (PyInstaller/archive/readers.py): a cookie at the end, then
# a table of contents of fixed-size headers, each followed by its padded name.
_COOKIE_MAGIC = b"MEI\014\013\012\013\016"
_COOKIE = struct.Struct("!8sIIII64s")
_ENTRY = struct.Struct("!IIIIBc")
_CHUNK = 1 << 20

_lock = threading.Lock()
_done: set[str] = set()
# "<_MEIPASS>|group,group": groups unpacked so far, inherited by a child process of the
# binary (the model's process, medmitra/llm/process.py), which shares the folder and must
# not unpack the same files again while another child loads them.
UNPACKED_ENV = "MEDMITRA_LAZY_UNPACKED"
_triggers: dict[str, str] = {}


def group_of(dest: str, src: str = "") -> str | None:
    """The group of an archive entry (build time): by its path, or by the vendored library
    folder it was collected from."""
    dest, src = dest.replace(os.sep, "/"), src.replace(os.sep, "/")
    for group, (imports, paths) in GROUPS.items():
        prefixes = tuple(name.replace(".", "/") + "/" for name in imports if "." not in name)
        if dest.startswith(prefixes + paths):
            return group
        if any(f"/{p}" in src for p in paths if p.endswith(".libs/")):
            return group
    return None


def _archive_toc(fh) -> tuple[int, int, int]:
    """(archive start, toc offset, toc length) of the CArchive in an open executable."""
    fh.seek(0, os.SEEK_END)
    end = fh.tell()
    window = min(end, 64 * 1024)
    fh.seek(end - window)
    tail = fh.read(window)
    at = tail.rfind(_COOKIE_MAGIC)
    if at < 0:
        raise OSError("no PyInstaller archive in the executable")
    _magic, length, toc_offset, toc_length, _py, _lib = _COOKIE.unpack_from(tail, at)
    start = end - window + at + _COOKIE.size - length
    return start, toc_offset, toc_length


def entries(path: str):
    """Yield (name, toc position, data offset, compressed length, compressed, typecode)
    for every entry of the executable's archive."""
    with open(path, "rb") as fh:
        start, toc_offset, toc_length = _archive_toc(fh)
        fh.seek(start + toc_offset)
        toc = fh.read(toc_length)
    pos = 0
    while pos < len(toc):
        length, offset, clen, _ulen, flag, typecode = _ENTRY.unpack_from(toc, pos)
        name = toc[pos + _ENTRY.size:pos + length].rstrip(b"\0").decode("utf-8")
        yield name, start + toc_offset + pos, start + offset, clen, bool(flag), typecode
        pos += length


def retype(executable: str, codes: dict[str, bytes]) -> int:
    """Set the type code of the named archive entries in place (one byte of each table
    entry; no offset or size changes). Returns how many entries were changed."""
    todo = [(at, codes[name]) for name, at, *_rest in entries(executable) if name in codes]
    with open(executable, "r+b") as fh:
        for at, typecode in todo:
            fh.seek(at + _ENTRY.size - 1)
            fh.write(typecode)
    return len(todo)


def mark_lazy(executable: str, names: set[str]) -> int:
    """Build time: the named binary/data entries get LAZY_TYPECODE, so the bootloader leaves
    them packed. Returns how many entries are marked."""
    return retype(executable, {name: LAZY_TYPECODE for name in names})


def _unpack(group: str) -> None:
    root = sys._MEIPASS  # type: ignore[attr-defined]
    with open(os.path.join(root, MANIFEST), encoding="utf-8") as fh:
        manifest = json.load(fh)
    wanted = {name for name, g in manifest.items() if g == group}
    with open(sys.executable, "rb") as exe:
        for name, _at, offset, clen, compressed, typecode in entries(sys.executable):
            if typecode != LAZY_TYPECODE or name not in wanted:
                continue
            target = os.path.join(root, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            # A name of this process's own: the server and its children (the model's
            # process reads documents too) may unpack the same group at the same time.
            part = f"{target}.{os.getpid()}.part"
            inflate = zlib.decompressobj() if compressed else None
            exe.seek(offset)
            left = clen
            with open(part, "wb") as out:
                while left:
                    block = exe.read(min(_CHUNK, left))
                    if not block:
                        raise OSError(f"archive entry {name} is truncated")
                    left -= len(block)
                    out.write(inflate.decompress(block) if inflate else block)
                if inflate:
                    out.write(inflate.flush())
            os.chmod(part, 0o700)
            os.replace(part, target)
    importlib.invalidate_caches()   # new files in folders the import system has listed


def ensure(group: str) -> None:
    """Unpack ``group`` unless done already (thread-safe; a no-op from source)."""
    if group in _done or not getattr(sys, "frozen", False):
        return
    with _lock:
        if group in _done:
            return
        try:
            _unpack(group)
        except OSError as exc:
            raise ImportError(f"cannot unpack the {group} files of the binary: {exc}") from exc
        _done.add(group)
        folder = sys._MEIPASS  # type: ignore[attr-defined]
        os.environ[UNPACKED_ENV] = f"{folder}|{','.join(sorted(_done))}"


class _Finder:
    """A meta path entry that only makes sure a group is unpacked before its import."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        group = _triggers.get(fullname) or _triggers.get(fullname.partition(".")[0])
        if group is not None and group not in _done:
            ensure(group)
        return None

    @staticmethod
    def invalidate_caches():
        return None


def install() -> None:
    """Frozen one-file binary only: unpack each group on first import of its packages."""
    if not getattr(sys, "frozen", False) or not hasattr(sys, "_MEIPASS"):
        return
    if not os.path.exists(os.path.join(sys._MEIPASS, MANIFEST)):
        return   # built without lazy groups (other platforms): everything is unpacked
    for group, (imports, _paths) in GROUPS.items():
        for name in imports:
            _triggers[name] = group
    folder, _, groups = os.environ.get(UNPACKED_ENV, "").partition("|")
    if folder == sys._MEIPASS:   # a child process of ours, in the same folder
        _done.update(g for g in groups.split(",") if g in GROUPS)
    sys.meta_path.insert(0, _Finder())
