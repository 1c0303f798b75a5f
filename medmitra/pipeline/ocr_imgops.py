"""The OpenCV functions rapidocr calls, written with numpy and Pillow, so OCR needs no OpenCV.

rapidocr-onnxruntime does its image work through ``cv2``: resizing for the three models,
the text detector's post-processing (dilate, contours, minimum-area rectangles, polygon
masks) and the perspective crops of each text line. OpenCV is 59 MB of the binary's
150 MB (its own OpenBLAS, FFmpeg and codec libraries come with it, all load-time
dependencies), for about a dozen functions on small images. ``ocr.py`` imports rapidocr with
this module standing in for ``cv2`` (:func:`bind`), in the source tree and in the binary
alike, so the tests run what ships.

Each function follows OpenCV's own definition closely enough that rapidocr reads the same
text (``tests/test_ocr_imgops.py`` compares every function with OpenCV on real page images,
and the whole engine on scanned reports; ``bench/ocr_compare.py`` on 22 pages):

- ``resize``: bilinear with OpenCV's pixel-centre mapping and edge clamping (no
  antialiasing, like OpenCV's INTER_LINEAR); uint8 results may differ by one level, as
  OpenCV rounds in fixed point.
- ``findContours``: one contour per 8-connected region, given as the region's convex hull.
  rapidocr uses a contour only for its minimum-area rectangle, which the hull determines.
  Hole contours (OpenCV's RETR_LIST also returns those) are not returned: a hole inside a
  detected text region is not text.
- ``warpPerspective``: bicubic (a = -0.75) or bilinear sampling with replicated borders at
  unrounded source positions: within one grey level of OpenCV 5.0, where rounding them to
  1/32 pixel (the remap tables' resolution) left 0.45 % of pixels 3-5 levels apart.

Only the calls and arguments rapidocr makes on its recognition path are here; anything else
raises ``NotImplementedError`` rather than doing something different from OpenCV. Its
drawing helpers (``imwrite``, ``putText``, ``polylines``: visualisation and its CLI) and
``invert`` (word boxes, which ``ocr.py`` does not ask for) are absent on purpose.
"""

from __future__ import annotations

import sys
from types import ModuleType
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# OpenCV's constant values, as rapidocr passes them (by name or by number).
INTER_LINEAR = 1
INTER_CUBIC = 2
BORDER_CONSTANT = 0
BORDER_REPLICATE = 1
RETR_LIST = 1
CHAIN_APPROX_SIMPLE = 2
ROTATE_90_CLOCKWISE = 0
ROTATE_180 = 1
ROTATE_90_COUNTERCLOCKWISE = 2
COLOR_RGB2BGR = 4
COLOR_BGR2RGB = 4
COLOR_GRAY2BGR = 8

_CUBIC_A = -0.75        # OpenCV's bicubic kernel parameter
_FIXED = 16             # OpenCV's XY_SHIFT: polygon edges are stepped in 16.16 fixed point


def bind(module: ModuleType | None = None) -> type:
    """Import rapidocr with ``module`` (this one by default) as the ``cv2`` of each of its
    modules, and return its ``RapidOCR`` class. Binding again with another module (the
    OCR benchmark compares this one with OpenCV) rebinds every rapidocr module."""
    module = module or sys.modules[__name__]
    missing = object()
    saved = sys.modules.get("cv2", missing)
    sys.modules["cv2"] = module
    try:
        from rapidocr_onnxruntime import RapidOCR
    finally:
        if saved is missing:
            del sys.modules["cv2"]
        else:
            sys.modules["cv2"] = saved
    for name, loaded in list(sys.modules.items()):
        if name.startswith("rapidocr_onnxruntime") and hasattr(loaded, "cv2"):
            loaded.cv2 = module
    return RapidOCR


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(f"ocr_imgops: {what} is not implemented (rapidocr never asks)")


def _saturate(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round and clip to an integer dtype as OpenCV's saturate_cast does; floats pass."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


# ---- geometry of images ------------------------------------------------------------------

def _linear_taps(src_n: int, dst_n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output index: the two source indices and the second one's weight, as OpenCV's
    INTER_LINEAR resize maps pixel centres and clamps at the edges."""
    pos = (np.arange(dst_n, dtype=np.float64) + 0.5) * (src_n / dst_n) - 0.5
    i0 = np.floor(pos).astype(np.intp)
    frac = pos - i0
    low = i0 < 0
    i0[low], frac[low] = 0, 0.0
    high = i0 >= src_n - 1
    i0[high], frac[high] = src_n - 1, 0.0
    return i0, np.minimum(i0 + 1, src_n - 1), frac


def resize(src: np.ndarray, dsize: Sequence[int], fx: float = 0, fy: float = 0,
           interpolation: int = INTER_LINEAR) -> np.ndarray:
    """``cv2.resize(src, (width, height))`` with bilinear interpolation."""
    if interpolation != INTER_LINEAR or fx or fy:
        raise _unsupported("resize other than INTER_LINEAR to a given size")
    src = np.asarray(src)
    width, height = int(dsize[0]), int(dsize[1])
    if width <= 0 or height <= 0 or src.shape[0] == 0 or src.shape[1] == 0:
        raise ValueError(f"resize: bad size {src.shape[:2]} -> {(height, width)}")
    if (height, width) == src.shape[:2]:
        return src.copy()
    if (src.dtype == np.uint8 and height >= src.shape[0] and width >= src.shape[1]
            and (src.ndim == 2 or src.shape[2] == 3)):
        # Enlarging, Pillow's bilinear filter is OpenCV's: the same pixel-centre mapping
        # and two taps, the edge pixel repeated (it only averages when shrinking).
        return np.asarray(Image.fromarray(np.ascontiguousarray(src))
                          .resize((width, height), Image.Resampling.BILINEAR))
    y0, y1, wy = _linear_taps(src.shape[0], height)
    x0, x1, wx = _linear_taps(src.shape[1], width)
    extra = (None,) * (src.ndim - 2)
    wy = wy.astype(np.float32)[(slice(None), None) + extra]
    top = src[y0].astype(np.float32)
    rows = top + (src[y1].astype(np.float32) - top) * wy
    wx = wx.astype(np.float32)[(None, slice(None)) + extra]
    left = rows[:, x0]
    out = left + (rows[:, x1] - left) * wx
    return _saturate(out, src.dtype)


def rotate(src: np.ndarray, rotateCode: int) -> np.ndarray:
    turns = {ROTATE_90_CLOCKWISE: -1, ROTATE_180: 2, ROTATE_90_COUNTERCLOCKWISE: 1}
    if rotateCode not in turns:
        raise _unsupported(f"rotate code {rotateCode}")
    return np.ascontiguousarray(np.rot90(src, turns[rotateCode]))


def copyMakeBorder(src: np.ndarray, top: int, bottom: int, left: int, right: int,
                   borderType: int, dst: Any = None, value: Any = 0) -> np.ndarray:
    if borderType != BORDER_CONSTANT:
        raise _unsupported("copyMakeBorder other than BORDER_CONSTANT")
    src = np.asarray(src)
    pad = [(top, bottom), (left, right)] + [(0, 0)] * (src.ndim - 2)
    out = np.pad(src, pad)
    # OpenCV's Scalar: up to four channel values, missing ones 0.
    values = np.asarray(value, dtype=np.float64).ravel().tolist() + [0.0] * 4
    fill = np.array(values[:src.shape[2]] if src.ndim == 3 else values[:1])
    if np.any(fill):
        mask = np.ones(out.shape[:2], bool)
        mask[top:top + src.shape[0], left:left + src.shape[1]] = False
        out[mask] = _saturate(fill, src.dtype)
    return out


def getPerspectiveTransform(src: np.ndarray, dst: np.ndarray, *args: Any) -> np.ndarray:
    """The 3x3 matrix taking the four ``src`` points to the four ``dst`` points."""
    s = np.asarray(src, dtype=np.float64).reshape(4, 2)
    d = np.asarray(dst, dtype=np.float64).reshape(4, 2)
    a = np.zeros((8, 8))
    b = np.zeros(8)
    for i, ((x, y), (u, v)) in enumerate(zip(s, d)):
        a[i] = (x, y, 1, 0, 0, 0, -x * u, -y * u)
        a[i + 4] = (0, 0, 0, x, y, 1, -x * v, -y * v)
        b[i], b[i + 4] = u, v
    h = np.linalg.solve(a, b)
    return np.append(h, 1.0).reshape(3, 3)


def _cubic_weights(t: np.ndarray) -> list[np.ndarray]:
    a = _CUBIC_A
    w0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    w1 = ((a + 2) * t - (a + 3)) * t * t + 1
    w2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
    return [w0, w1, w2, 1 - w0 - w1 - w2]


def warpPerspective(src: np.ndarray, M: np.ndarray, dsize: Sequence[int], dst: Any = None,
                    flags: int = INTER_LINEAR, borderMode: int = BORDER_CONSTANT,
                    borderValue: Any = 0) -> np.ndarray:
    """Output pixel (x, y) samples ``src`` at ``inverse(M) @ (x, y, 1)``, borders replicated."""
    if borderMode != BORDER_REPLICATE or flags not in (INTER_LINEAR, INTER_CUBIC):
        raise _unsupported("warpPerspective other than INTER_LINEAR/INTER_CUBIC with "
                           "BORDER_REPLICATE")
    src = np.asarray(src)
    width, height = int(dsize[0]), int(dsize[1])
    if width <= 0 or height <= 0:
        raise ValueError(f"warpPerspective: bad size {(height, width)}")
    inv = np.linalg.inv(np.asarray(M, dtype=np.float64))
    shift = np.rint(inv[:2, 2])
    if (np.allclose(inv, [[1, 0, shift[0]], [0, 1, shift[1]], [0, 0, 1]], atol=1e-9)):
        # A whole-pixel translation (an upright text box): every sample falls on a pixel,
        # where both kernels weigh that pixel alone; only the borders need replicating.
        rows = np.clip(np.arange(height) + int(shift[1]), 0, src.shape[0] - 1)
        cols = np.clip(np.arange(width) + int(shift[0]), 0, src.shape[1] - 1)
        return src[rows[:, None], cols[None, :]]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    den = inv[2, 0] * xs + inv[2, 1] * ys + inv[2, 2]
    den = np.where(den == 0, np.inf, den)
    sx = (inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]) / den
    sy = (inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]) / den
    sx, sy = np.clip(sx, -1e6, 1e6), np.clip(sy, -1e6, 1e6)
    x0, y0 = np.floor(sx), np.floor(sy)
    tx, ty = sx - x0, sy - y0
    x0, y0 = x0.astype(np.intp), y0.astype(np.intp)
    if flags == INTER_CUBIC:
        offsets, wxs, wys = (-1, 0, 1, 2), _cubic_weights(tx), _cubic_weights(ty)
    else:
        offsets, wxs, wys = (0, 1), [1 - tx, tx], [1 - ty, ty]
    # The source stays in its own dtype: only the sampled pixels are converted (the source
    # is the whole page, a crop is one text line).
    flat = np.ascontiguousarray(src).reshape(src.shape[0] * src.shape[1], -1)
    out = np.zeros((height * width, flat.shape[1]), np.float32)
    h_max, w_max = src.shape[0] - 1, src.shape[1] - 1
    for oy, wy in zip(offsets, wys):
        rows = np.clip(y0 + oy, 0, h_max).ravel() * src.shape[1]
        for ox, wx in zip(offsets, wxs):
            cols = np.clip(x0 + ox, 0, w_max).ravel()
            out += (flat[rows + cols].astype(np.float32)
                    * (wy * wx).astype(np.float32).reshape(-1, 1))
    return _saturate(out.reshape((height, width) + src.shape[2:]), src.dtype)


# ---- text detector post-processing ----------------------------------------------------------

def dilate(src: np.ndarray, kernel: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
    """Grey dilation by a rectangular kernel of ones, anchored at its centre as OpenCV's
    default anchor; pixels outside the image do not count."""
    if args or kwargs:
        raise _unsupported("dilate with an anchor, iterations or a border")
    kernel = np.asarray(kernel)
    if not np.all(kernel):
        raise _unsupported("dilate with a non-rectangular kernel")
    src = np.asarray(src)
    kh, kw = kernel.shape
    ay, ax = kh // 2, kw // 2
    low = np.iinfo(src.dtype).min if np.issubdtype(src.dtype, np.integer) else -np.inf
    padded = np.pad(src, ((ay, kh - 1 - ay), (ax, kw - 1 - ax)), constant_values=low)
    out = np.full_like(src, low)
    h, w = src.shape
    for dy in range(kh):
        for dx in range(kw):
            np.maximum(out, padded[dy:dy + h, dx:dx + w], out=out)
    return out


def _label_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of a boolean image and each run's 8-connected region label:
    (row, first column, last column, label), runs in raster order."""
    w = mask.shape[1]
    edges = np.diff(np.pad(mask.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, stops = np.nonzero(edges == -1)
    ends = stops - 1
    n = len(rows)
    parent = list(range(n))
    if n:
        stride = w + 2
        start_keys = rows * stride + starts
        end_keys = rows * stride + ends
        # Runs of the row above that touch each run (8-connected): their last column is
        # at least this run's first - 1 and their first column at most this run's last + 1.
        above = rows - 1
        lo = np.searchsorted(end_keys, above * stride + starts - 1, side="left")
        hi = np.searchsorted(start_keys, above * stride + ends + 1, side="right")
        counts = np.maximum(hi - lo, 0)
        counts[rows == 0] = 0
        run_b = np.repeat(np.arange(n), counts)
        run_a = np.repeat(lo, counts) + (np.arange(counts.sum())
                                         - np.repeat(np.cumsum(counts) - counts, counts))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for a, b in zip(run_a.tolist(), run_b.tolist()):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        labels = np.array([find(i) for i in range(n)], dtype=np.intp)
    else:
        labels = np.zeros(0, dtype=np.intp)
    return rows, starts, ends, labels


def _hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (Andrew's monotone chain) of (N, 2) points, counter-clockwise, without
    repeated or collinear points; fewer than three distinct points come back as they are."""
    pts = np.unique(np.asarray(points, dtype=np.float64).reshape(-1, 2), axis=0)
    if len(pts) < 3:
        return pts
    pts_list = pts.tolist()

    def half(seq: list[list[float]]) -> list[list[float]]:
        chain: list[list[float]] = []
        for p in seq:
            while len(chain) >= 2:
                (ox, oy), (ax, ay) = chain[-2], chain[-1]
                if (ax - ox) * (p[1] - oy) - (ay - oy) * (p[0] - ox) <= 0:
                    chain.pop()
                else:
                    break
            chain.append(p)
        return chain

    lower, upper = half(pts_list), half(pts_list[::-1])
    return np.array(lower[:-1] + upper[:-1], dtype=np.float64)


def findContours(image: np.ndarray, mode: int, method: int, *args: Any
                 ) -> tuple[tuple[np.ndarray, ...], None]:
    """(contours, None): each 8-connected region of non-zero pixels as its convex hull,
    int32 points of shape (N, 1, 2), in OpenCV's order (the region found last first)."""
    if mode != RETR_LIST or method != CHAIN_APPROX_SIMPLE or args:
        raise _unsupported("findContours other than RETR_LIST with CHAIN_APPROX_SIMPLE")
    rows, starts, ends, labels = _label_runs(np.asarray(image) != 0)
    if not len(labels):
        return (), None
    # A region's hull is the hull of its runs' end pixels.
    order = np.argsort(labels, kind="stable")
    xs = np.stack([starts[order], ends[order]], axis=1).ravel()
    ys = np.repeat(rows[order], 2)
    sorted_labels = labels[order]
    firsts, bounds = np.unique(sorted_labels, return_index=True)
    bounds = np.append(bounds, len(order)) * 2
    points = np.stack([xs, ys], axis=1)
    contours = []
    for i in range(len(firsts) - 1, -1, -1):   # labels are each region's first run
        hull = _hull(points[bounds[i]:bounds[i + 1]])
        contours.append(np.rint(hull).astype(np.int32).reshape(-1, 1, 2))
    return tuple(contours), None


def minAreaRect(points: np.ndarray) -> tuple[tuple[float, float], tuple[float, float], float]:
    """((centre x, y), (width, height), angle in degrees) of the smallest rectangle around
    ``points``; the width runs along the angle (rotating calipers over the convex hull)."""
    hull = _hull(points)
    if len(hull) == 0:
        raise ValueError("minAreaRect: no points")
    if len(hull) == 1:
        return (float(hull[0, 0]), float(hull[0, 1])), (0.0, 0.0), 0.0
    if len(hull) == 2:
        d = hull[1] - hull[0]
        centre = (hull[0] + hull[1]) / 2
        return ((float(centre[0]), float(centre[1])), (float(np.hypot(*d)), 0.0),
                float(np.degrees(np.arctan2(d[1], d[0]))))
    edges = np.roll(hull, -1, axis=0) - hull
    lengths = np.hypot(edges[:, 0], edges[:, 1])
    keep = lengths > 0
    u = edges[keep] / lengths[keep, None]
    v = np.stack([-u[:, 1], u[:, 0]], axis=1)
    pu, pv = u @ hull.T, v @ hull.T
    widths = pu.max(axis=1) - pu.min(axis=1)
    heights = pv.max(axis=1) - pv.min(axis=1)
    best = int(np.argmin(widths * heights))
    mid_u = (pu[best].max() + pu[best].min()) / 2
    mid_v = (pv[best].max() + pv[best].min()) / 2
    centre = u[best] * mid_u + v[best] * mid_v
    angle = float(np.degrees(np.arctan2(u[best, 1], u[best, 0])))
    return ((float(centre[0]), float(centre[1])),
            (float(widths[best]), float(heights[best])), angle)


def boxPoints(box: tuple[tuple[float, float], tuple[float, float], float]) -> np.ndarray:
    """The four corners of a ``minAreaRect`` rectangle, float32 (4, 2), as OpenCV orders
    them."""
    (cx, cy), (w, h), angle = box
    theta = np.radians(angle)
    b, a = np.cos(theta) * 0.5, np.sin(theta) * 0.5
    p0 = (cx - a * h - b * w, cy + b * h - a * w)
    p1 = (cx + a * h - b * w, cy - b * h - a * w)
    corners = np.array([p0, p1, (2 * cx - p0[0], 2 * cy - p0[1]),
                        (2 * cx - p1[0], 2 * cy - p1[1])], dtype=np.float64)
    return corners.astype(np.float32)


def fillPoly(img: np.ndarray, pts: Any, color: Any, *args: Any) -> np.ndarray:
    """Fill each polygon of ``pts`` (integer vertices) into the 2-D uint8 ``img``, in place,
    as OpenCV's 8-connected fill does: the outline drawn as lines, then each row between
    pairs of edge crossings, the crossings kept in 16.16 fixed point and floored."""
    if img.ndim != 2 or img.dtype != np.uint8 or args:
        raise _unsupported("fillPoly other than on a 2-D uint8 mask")
    value = int(np.asarray(color).ravel()[0])
    h, w = img.shape
    canvas = Image.fromarray(img)
    draw = ImageDraw.Draw(canvas)
    edges: list[tuple[int, int, int, int]] = []
    polys = pts if isinstance(pts, (list, tuple)) else np.asarray(pts)
    for poly in polys:
        vertices = np.asarray(poly).reshape(-1, 2).astype(np.int64).tolist()
        for (x0, y0), (x1, y1) in zip(vertices, vertices[1:] + vertices[:1]):
            draw.line([(x0, y0), (x1, y1)], fill=value)
            if y0 == y1:
                continue
            if y0 > y1:
                x0, y0, x1, y1 = x1, y1, x0, y0
            step = abs((x1 - x0) << _FIXED) // (y1 - y0)     # C division: toward zero
            edges.append((y0, y1, x0 << _FIXED, step if x1 >= x0 else -step))
    out = np.array(canvas)
    if edges:
        for y in range(max(min(e[0] for e in edges), 0), min(max(e[1] for e in edges), h)):
            xs = sorted(x + dx * (y - y0) for y0, y1, x, dx in edges if y0 <= y < y1)
            for left, right in zip(xs[0::2], xs[1::2]):
                x_from, x_to = max(left >> _FIXED, 0), min(right >> _FIXED, w - 1)
                if x_from <= x_to:
                    out[y, x_from:x_to + 1] = value
    img[...] = out
    return img


def mean(src: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float, float, float]:
    """Per-channel mean of ``src`` where ``mask`` is non-zero, as a 4-tuple like OpenCV's."""
    data = np.asarray(src, dtype=np.float64)
    if data.ndim == 2:
        data = data[..., None]
    if mask is not None:
        data = data[np.asarray(mask) != 0]
    else:
        data = data.reshape(-1, data.shape[-1])
    values = data.mean(axis=0) if len(data) else np.zeros(data.shape[-1])
    padded = list(values.tolist()) + [0.0] * (4 - len(values))
    return padded[0], padded[1], padded[2], padded[3]


# ---- colour and pixel arithmetic (rapidocr's image loading) ------------------------------

def cvtColor(src: np.ndarray, code: int) -> np.ndarray:
    src = np.asarray(src)
    if code == COLOR_GRAY2BGR:
        gray = src[..., 0] if src.ndim == 3 else src
        return np.repeat(gray[..., None], 3, axis=2)
    if code == COLOR_RGB2BGR and src.ndim == 3 and src.shape[2] == 3:
        return np.ascontiguousarray(src[..., ::-1])
    raise _unsupported(f"cvtColor code {code}")


def split(src: np.ndarray) -> tuple[np.ndarray, ...]:
    src = np.asarray(src)
    return tuple(np.ascontiguousarray(src[..., i]) for i in range(src.shape[2]))


def merge(channels: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack([np.asarray(c) for c in channels], axis=2)


def bitwise_not(src: np.ndarray) -> np.ndarray:
    return np.invert(np.asarray(src))


def bitwise_and(src1: np.ndarray, src2: np.ndarray, dst: Any = None,
                mask: np.ndarray | None = None) -> np.ndarray:
    out = np.bitwise_and(np.asarray(src1), np.asarray(src2))
    if mask is not None:
        out[np.asarray(mask) == 0] = 0
    return out


def add(src1: np.ndarray, src2: np.ndarray) -> np.ndarray:
    a = np.asarray(src1)
    return _saturate(a.astype(np.int64) + np.asarray(src2).astype(np.int64), a.dtype)
