"""Offline OCR with rapidocr_onnxruntime (PP-OCRv4 ONNX models shipped inside its wheel),
its image work done by ``ocr_imgops`` instead of OpenCV.

The engine is created lazily, once per process, and every call is serialised by a lock:
one engine is not safe to share between threads, and a second engine would only compete
for the same cores. onnxruntime is limited to ``OCR_THREADS`` intra-op threads so OCR does
not starve the LLM. rapidocr reads only its packaged model files; it has no download
path, and nothing here passes it a URL.

Cost on this 2-core machine (measured while another build was loading it): a report strip
of ~1200x300 px takes ~1.5-3 s, a full 150-dpi letter page ~5-7 s; engine load ~0.6 s.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from PIL import Image

log = logging.getLogger(__name__)

# onnxruntime 1.29 and later carry Microsoft's telemetry on Linux too: on first use they write
# a device id under ~/.cache/Microsoft and a session file in the temp dir, and try to upload
# events to mobile.events.data.microsoft.com. A clinic's server sends nothing anywhere. This
# variable is onnxruntime's whole opt-out (nothing created, nothing sent); it is read when
# onnxruntime initialises, so it is set here, before anything can import it.
os.environ["ORT_DISABLE_TELEMETRY"] = "1"

OCR_THREADS = max(1, min(2, os.cpu_count() or 1))
# Recognised boxes below this confidence are dropped as noise.
MIN_SCORE = 0.5

_engine: Any = None
_engine_error: str | None = None
_lock = threading.Lock()


class OcrUnavailable(Exception):
    """The OCR engine could not be loaded (missing models, broken install)."""


def _load_engine() -> Any:
    global _engine, _engine_error
    if _engine is not None:
        return _engine
    if _engine_error is not None:
        raise OcrUnavailable(_engine_error)
    try:
        from medmitra.pipeline import ocr_imgops

        # rapidocr with numpy/Pillow image functions in place of OpenCV (ocr_imgops.py).
        RapidOCR = ocr_imgops.bind()
        _engine = RapidOCR(intra_op_num_threads=OCR_THREADS, inter_op_num_threads=1,
                           # "max": never upscale the image for detection (the default
                           # "min" blows a 1000x300 strip up to 2400x736, 3x slower).
                           det_limit_type="max",
                           text_score=MIN_SCORE)
        # rapidocr gives its loggers their own DEBUG stderr handler (set up lazily, inside
        # the constructor); they never log recognised text, but keep them quiet anyway.
        for name in ("RapidOCR", "OrtInferSession"):
            logging.getLogger(name).setLevel(logging.WARNING)
    except Exception as exc:  # pragma: no cover - depends on the install
        _engine_error = f"OCR engine unavailable ({type(exc).__name__})"
        log.error("OCR engine could not be loaded: %s", exc)
        raise OcrUnavailable(_engine_error) from exc
    return _engine


def warm_up() -> None:
    """Load the engine now (e.g. at start-up) instead of on the first scanned page."""
    with _lock:
        _load_engine()


def ocr_image(img: Image.Image) -> str:
    """Text of ``img``, one line per visual line, top to bottom and left to right."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    with _lock:
        engine = _load_engine()
        # rapidocr treats a raw ndarray as BGR; a PIL image it converts from RGB itself.
        result, _elapsed = engine(rgb)
    if not result:
        return ""
    return "\n".join(_reading_order(result))


def _reading_order(result: list[Any]) -> list[str]:
    """Group detected boxes into visual lines (vertical overlap), sort by x, join."""
    boxes = []
    for box, text, _score in result:
        text = str(text).strip()
        if not text:
            continue
        ys = [p[1] for p in box]
        xs = [p[0] for p in box]
        boxes.append((min(ys), max(ys), min(xs), text))
    boxes.sort(key=lambda b: ((b[0] + b[1]) / 2, b[2]))
    lines: list[list[tuple[float, float, float, str]]] = []
    for top, bottom, left, text in boxes:
        center = (top + bottom) / 2
        if lines:
            line = lines[-1]
            line_top = min(b[0] for b in line)
            line_bottom = max(b[1] for b in line)
            if line_top <= center <= line_bottom:
                line.append((top, bottom, left, text))
                continue
        lines.append([(top, bottom, left, text)])
    return [" ".join(b[3] for b in sorted(line, key=lambda b: b[2])) for line in lines]
