"""Images for the pipeline: open safely, normalise for a model, decode DICOM.

Every image leaving this module is a fresh RGB ``PIL.Image`` with no metadata (EXIF, ICC,
text chunks are dropped by building a new image from the pixels), orientation applied,
longest side capped. Decompression bombs are refused: Pillow's own limit is set to
``MAX_IMAGE_PIXELS`` and its warning is escalated to an error process-wide, so an
oversized image never gets decoded.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

MAX_IMAGE_PIXELS = 50_000_000
# Longest side of the image handed to a vision model.
MODEL_MAX_SIDE_PX = 1024
# Longest side of an image handed to OCR (small print needs more pixels than a model).
OCR_MAX_SIDE_PX = 2000
MAX_DICOM_TAG_CHARS = 120

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# Between 1x and 2x the limit Pillow only warns; refuse those too.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


class ImageRefused(Exception):
    """The image is too large, corrupt or of an unexpected kind; the message is readable."""


def open_image(path: Path, *, max_side_px: int = MODEL_MAX_SIDE_PX) -> Image.Image:
    """Open a PNG/JPEG file and return it normalised (see ``normalise``)."""
    try:
        with Image.open(path, formats=["PNG", "JPEG"]) as img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ImageRefused(f"too large ({w}x{h} pixels)")
            if img.format == "JPEG":
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that is still big
                # enough: a 24 MP photo then costs a fraction of the time and memory.
                img.draft(img.mode, (max_side_px, max_side_px))
            return normalise(img, max_side_px=max_side_px)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRefused("declared size is too large") from exc
    except ImageRefused:
        raise
    except Exception as exc:
        # Pillow reports truncated/corrupt data as OSError, SyntaxError, ValueError,
        # struct.error ... ; whatever it is, the file is refused with a readable reason.
        raise ImageRefused("it could not be decoded (corrupt or truncated)") from exc


def normalise(img: Image.Image, *, max_side_px: int = MODEL_MAX_SIDE_PX) -> Image.Image:
    """EXIF orientation applied, RGB, longest side <= max_side_px, no metadata."""
    img.load()
    img = ImageOps.exif_transpose(img) or img
    img = _to_rgb(img)
    if max(img.size) > max_side_px:
        img.thumbnail((max_side_px, max_side_px), Image.Resampling.LANCZOS)
    # A new image from raw pixels carries no EXIF/ICC/text chunks at all.
    return Image.frombytes("RGB", img.size, img.tobytes())


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit and float greyscale: stretch to 8 bit (a plain convert clips at 255).
        return Image.fromarray(to_uint8(np.asarray(img)), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def to_uint8(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Linear map of [lo, hi] (default min..max) to 0..255, clipped."""
    a = arr.astype(np.float32, copy=False)
    if lo is None or hi is None:
        finite = a[np.isfinite(a)]
        if finite.size == 0:
            return np.zeros(a.shape, dtype=np.uint8)
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    out = (np.nan_to_num(a, nan=lo) - lo) * (255.0 / (hi - lo))
    return np.clip(out, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------- DICOM

# Allow-list: only these tags are ever copied out of a DICOM file. Identifying tags
# (PatientName, PatientID, birth date, addresses, institution, physicians, accession
# numbers, UIDs ...) are simply never read.
DICOM_TAGS: tuple[tuple[str, str], ...] = (
    ("Modality", "Modality"),
    ("BodyPartExamined", "Body part"),
    ("StudyDescription", "Study"),
    ("SeriesDescription", "Series"),
    ("ProtocolName", "Protocol"),
    ("ViewPosition", "View"),
    ("Laterality", "Laterality"),
    ("ImageLaterality", "Image laterality"),
    ("PatientPosition", "Patient position"),
    ("StudyDate", "Study date"),
    ("SeriesDate", "Series date"),
    ("AcquisitionDate", "Acquisition date"),
    ("ContrastBolusAgent", "Contrast"),
    ("KVP", "kVp"),
    ("SliceThickness", "Slice thickness"),
    ("PixelSpacing", "Pixel spacing"),
    ("Rows", "Rows"),
    ("Columns", "Columns"),
    ("NumberOfFrames", "Frames"),
    ("PhotometricInterpretation", "Photometric"),
    ("Manufacturer", "Manufacturer"),
)
# Tags that go into the one-line text summary, in this order.
_SUMMARY_TAGS = ("Modality", "BodyPartExamined", "StudyDescription", "SeriesDescription",
                 "ViewPosition", "Laterality", "StudyDate", "Rows", "Columns")


def _tag_text(value: Any) -> str:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    text = "".join(ch for ch in text if ch.isprintable()).strip()
    return text[:MAX_DICOM_TAG_CHARS]


def dicom_tags(ds: Any) -> dict[str, str]:
    """Allow-listed, non-identifying tags of a pydicom Dataset as strings."""
    tags: dict[str, str] = {}
    for keyword, _label in DICOM_TAGS:
        try:
            value = ds.get(keyword)
        except Exception:  # a malformed element: skip it, keep the rest
            continue
        if value is None or value == "":
            continue
        text = _tag_text(value)
        if text:
            tags[keyword] = text
    return tags


def dicom_summary(tags: dict[str, str]) -> str:
    labels = dict(DICOM_TAGS)
    return "; ".join(f"{labels[k]}: {tags[k]}" for k in _SUMMARY_TAGS if k in tags)


def dicom_image(ds: Any, *, max_side_px: int = MODEL_MAX_SIDE_PX) -> Image.Image:
    """First frame of a DICOM dataset, windowed to 8 bit, as a normalised RGB image.

    Raises ImageRefused with a readable reason (no pixel data, compressed syntax without
    a decoder, oversized) — callers keep the tags regardless.
    """
    from pydicom.pixels import apply_modality_lut, pixel_array

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageRefused("DICOM file has no pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ImageRefused("DICOM image size is missing") from exc
    if rows <= 0 or cols <= 0 or rows * cols > MAX_IMAGE_PIXELS:
        raise ImageRefused(f"DICOM image size refused ({cols}x{rows})")
    try:
        # index=0 decodes only the first frame of a multi-frame image.
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        arr = pixel_array(ds, index=0) if frames > 1 else ds.pixel_array
    except NotImplementedError as exc:
        raise ImageRefused("DICOM pixel data uses a compression this build cannot decode") from exc
    except Exception as exc:
        raise ImageRefused(f"DICOM pixel data could not be decoded ({type(exc).__name__})") from exc

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and not photometric.startswith("MONO"):
        rgb = arr[..., :3]
        img = Image.fromarray(rgb if rgb.dtype == np.uint8 else to_uint8(rgb), "RGB")
    else:
        if arr.ndim != 2:
            arr = arr.reshape(arr.shape[-2], arr.shape[-1]) if arr.size == rows * cols else arr[0]
        try:
            values = apply_modality_lut(arr, ds)
        except Exception:  # an odd rescale/LUT: fall back to stored values
            values = arr
        lo, hi = _window(ds)
        out = to_uint8(values, lo, hi)
        if photometric == "MONOCHROME1":  # 0 is white in MONOCHROME1
            out = 255 - out
        img = Image.fromarray(out, "L")
    return normalise(img, max_side_px=max_side_px)


def _first_number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _window(ds: Any) -> tuple[float | None, float | None]:
    """(low, high) from WindowCenter/WindowWidth; (None, None) means use min/max."""
    center = _first_number(ds.get("WindowCenter"))
    width = _first_number(ds.get("WindowWidth"))
    if center is None or width is None or width <= 1:
        return None, None
    return center - width / 2.0, center + width / 2.0
