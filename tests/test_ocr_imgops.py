"""ocr_imgops against OpenCV, function by function, on pages nobody on the team wrote
(clinosim's synthetic inpatients rendered as scanned reports, the way extract.py renders a
page for OCR), and the OCR engine end to end without OpenCV.

OpenCV is installed in the development environment only because rapidocr-onnxruntime
requires it by name; the server never imports it (``ocr.py`` binds ocr_imgops), and the
binary leaves it out. Here it is the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from bench import clinical_eval as ce
from bench import ocr_compare
from medmitra.pipeline import ocr, ocr_imgops
from medmitra.pipeline.extract import extract_file

ROOT = Path(__file__).resolve().parent.parent


def _page(seed: int = 0) -> np.ndarray:
    """A clinosim patient's scanned report, first page, rendered as extract.py renders it
    for OCR, in the BGR order rapidocr works in."""
    truth = ce.generate(["acute_mi"], 1, seed=20261130 + seed)[0]
    _name, data, _mime = ce.render(truth, "scan")
    img = ocr_compare._page_image(data)
    return np.ascontiguousarray(np.asarray(img.convert("RGB"))[:, :, ::-1])


@pytest.fixture(scope="module")
def page() -> np.ndarray:
    return _page()


@pytest.fixture(scope="module")
def detector_map(page: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The text detector's probability map of the page and its dilated bitmap, as rapidocr's
    DB post-processing receives them (the real model, run through ocr's own engine)."""
    engine = ocr._load_engine()
    det = engine.text_det
    prep = det.get_preprocess(max(page.shape[:2]))(page)
    pred = det.infer(prep)[0][0, 0]
    bitmap = cv2.dilate((pred > 0.3).astype(np.uint8), np.ones((2, 2)))
    return pred, bitmap


def test_resize_matches_opencv_shrinking_and_enlarging(page: np.ndarray) -> None:
    h, w = page.shape[:2]
    crop = page[h // 3: h // 3 + 23, w // 5: w // 5 + 301]
    cases = [(page, (w * 736 // h // 32 * 32, 736)),   # the detector's input
             (crop, (481, 48)),                       # a text line for recognition
             (crop, (192, 48)),                       # a long line for the classifier
             (page[:, :, 0], (w // 3, h // 3)),
             (crop[:5, :7], (7, 5))]
    for src, size in cases:
        ours = ocr_imgops.resize(src, size)
        ref = cv2.resize(src, size)
        assert ours.shape == ref.shape and ours.dtype == ref.dtype
        diff = np.abs(ours.astype(int) - ref.astype(int))
        assert diff.max() <= 1, (size, diff.max())   # fixed-point rounding only
        assert diff.mean() < 0.05, (size, diff.mean())
    floats = page[:40, :60, 0].astype(np.float32) / 255
    assert np.allclose(ocr_imgops.resize(floats, (90, 17)), cv2.resize(floats, (90, 17)),
                       atol=1e-5)


def test_warp_perspective_matches_opencv_on_text_line_crops(page: np.ndarray) -> None:
    rng = np.random.default_rng(7)
    h, w = page.shape[:2]
    for _ in range(12):
        x, y = rng.uniform(0, w - 400), rng.uniform(0, h - 60)
        bw, bh = rng.uniform(60, 380), rng.uniform(18, 50)
        quad = np.array([[x, y], [x + bw, y], [x + bw, y + bh], [x, y + bh]], np.float32)
        quad += rng.normal(0, 3, quad.shape).astype(np.float32)      # skewed scans
        out_w = int(np.linalg.norm(quad[0] - quad[1]))
        out_h = int(np.linalg.norm(quad[0] - quad[3]))
        std = np.array([[0, 0], [out_w, 0], [out_w, out_h], [0, out_h]], np.float32)
        m_ours = ocr_imgops.getPerspectiveTransform(quad, std)
        m_ref = cv2.getPerspectiveTransform(quad, std)
        # Both solve the same 8x8 system (OpenCV by LU): equal to rounding, and ours takes
        # the quad's corners to the crop's corners.
        assert np.allclose(m_ours, m_ref, rtol=1e-4, atol=1e-6)
        mapped = np.c_[quad, np.ones(4)] @ m_ours.T
        assert np.allclose(mapped[:, :2] / mapped[:, 2:], std, atol=1e-6)
        for flags in (cv2.INTER_CUBIC, cv2.INTER_LINEAR):
            ours = ocr_imgops.warpPerspective(page, m_ref, (out_w, out_h), flags=flags,
                                              borderMode=ocr_imgops.BORDER_REPLICATE)
            ref = cv2.warpPerspective(page, m_ref, (out_w, out_h), flags=flags,
                                      borderMode=cv2.BORDER_REPLICATE)
            diff = np.abs(ours.astype(int) - ref.astype(int))
            assert diff.max() <= 1 and diff.mean() < 0.02, (flags, diff.max(), diff.mean())
    # An upright box (a whole-pixel shift) at the page's edge: the border is replicated.
    quad = np.array([[w - 50, h - 20], [w + 10, h - 20], [w + 10, h + 5], [w - 50, h + 5]],
                    np.float32)
    std = np.array([[0, 0], [60, 0], [60, 25], [0, 25]], np.float32)
    m = cv2.getPerspectiveTransform(quad, std)
    for flags in (cv2.INTER_CUBIC, cv2.INTER_LINEAR):
        assert np.array_equal(
            ocr_imgops.warpPerspective(page, m, (60, 25), flags=flags,
                                       borderMode=ocr_imgops.BORDER_REPLICATE),
            cv2.warpPerspective(page, m, (60, 25), flags=flags,
                                borderMode=cv2.BORDER_REPLICATE))


def test_dilate_is_opencvs(detector_map: tuple[np.ndarray, np.ndarray]) -> None:
    pred, _ = detector_map
    mask = (pred > 0.3).astype(np.uint8)
    kernel = np.array([[1, 1], [1, 1]])
    assert np.array_equal(ocr_imgops.dilate(mask, kernel), cv2.dilate(mask, kernel))
    three = np.ones((3, 3), np.uint8)
    assert np.array_equal(ocr_imgops.dilate(mask, three), cv2.dilate(mask, three))


def _rect_key(rect) -> tuple[float, float, float]:
    (cx, cy), (rw, rh), _angle = rect
    return round(cx, 1), round(cy, 1), round(rw * rh, 0)


def test_contours_give_opencvs_minimum_rectangles(detector_map) -> None:
    """Every text region of a real detector map: the same minimum-area rectangle (centre,
    area and corners) as OpenCV's outer contour of the region gives."""
    _, bitmap = detector_map
    ours, _ = ocr_imgops.findContours(bitmap * 255, ocr_imgops.RETR_LIST,
                                      ocr_imgops.CHAIN_APPROX_SIMPLE)
    ref, _ = cv2.findContours(bitmap * 255, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    assert len(ours) == len(ref) > 20
    ours_rects = sorted(ocr_imgops.minAreaRect(c) for c in ours)
    ref_rects = sorted(cv2.minAreaRect(c) for c in ref)
    assert sorted(map(_rect_key, ours_rects)) == sorted(map(_rect_key, ref_rects))
    for mine in ours_rects:
        theirs = min(ref_rects, key=lambda r: np.hypot(r[0][0] - mine[0][0],
                                                       r[0][1] - mine[0][1]))
        a = sorted(map(tuple, np.round(ocr_imgops.boxPoints(mine), 2)))
        b = sorted(map(tuple, np.round(cv2.boxPoints(theirs), 2)))
        assert np.allclose(a, b, atol=0.05), (a, b)


def test_min_area_rect_of_point_sets() -> None:
    rng = np.random.default_rng(3)
    for n in (3, 5, 8, 40):
        for _ in range(20):
            pts = (rng.normal(0, 1, (n, 2)) * [80, 12] @ np.array(
                [[np.cos(0.3), np.sin(0.3)], [-np.sin(0.3), np.cos(0.3)]])
                + 200).astype(np.float32)
            ours, ref = ocr_imgops.minAreaRect(pts), cv2.minAreaRect(pts)
            assert np.isclose(ours[1][0] * ours[1][1], ref[1][0] * ref[1][1], rtol=1e-4)
            assert np.allclose(ours[0], ref[0], atol=1e-2)
    # Degenerate regions: one pixel, a one-pixel line.
    assert ocr_imgops.minAreaRect(np.array([[[5, 7]]], np.int32))[1] == (0.0, 0.0)
    line = np.array([[[3, 9]], [[4, 9]], [[12, 9]]], np.int32)
    assert min(ocr_imgops.minAreaRect(line)[1]) == 0 == min(cv2.minAreaRect(line)[1])
    assert max(ocr_imgops.minAreaRect(line)[1]) == pytest.approx(9)


def test_box_score_matches_opencv(detector_map) -> None:
    """rapidocr's box score: the mean probability inside a filled polygon."""
    pred, bitmap = detector_map
    contours, _ = cv2.findContours(bitmap * 255, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    for contour in contours[:40]:
        box = cv2.boxPoints(cv2.minAreaRect(contour))
        x0, y0 = np.floor(box.min(axis=0)).astype(int).clip(0)
        x1, y1 = np.ceil(box.max(axis=0)).astype(int)
        x1, y1 = min(x1, pred.shape[1] - 1), min(y1, pred.shape[0] - 1)
        poly = (box - [x0, y0]).reshape(1, -1, 2).astype(np.int32)
        masks = []
        for lib in (ocr_imgops, cv2):
            mask = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.uint8)
            lib.fillPoly(mask, poly, 1)
            masks.append(mask)
        region = pred[y0:y1 + 1, x0:x1 + 1]
        ours, ref = ocr_imgops.mean(region, masks[0])[0], cv2.mean(region, masks[1])[0]
        assert abs(ours - ref) < 0.02, (ours, ref)
        # Any difference lies along the outline (OpenCV's and Pillow's line pixels).
        assert np.abs(masks[0].astype(int) - masks[1]).sum() <= sum(mask.shape) // 2


def test_pixel_and_colour_helpers_are_opencvs(page: np.ndarray) -> None:
    gray = page[:, :, 1].copy()
    rgba = np.dstack([page, gray])
    assert np.array_equal(ocr_imgops.cvtColor(gray, ocr_imgops.COLOR_GRAY2BGR),
                          cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
    assert np.array_equal(ocr_imgops.cvtColor(page, ocr_imgops.COLOR_RGB2BGR),
                          cv2.cvtColor(page, cv2.COLOR_RGB2BGR))
    assert all(np.array_equal(a, b) for a, b in zip(ocr_imgops.split(rgba), cv2.split(rgba)))
    chans = cv2.split(page)
    assert np.array_equal(ocr_imgops.merge(chans), cv2.merge(chans))
    assert np.array_equal(ocr_imgops.bitwise_not(gray), cv2.bitwise_not(gray))
    assert np.array_equal(ocr_imgops.bitwise_and(page, page, mask=gray),
                          cv2.bitwise_and(page, page, mask=gray))
    assert np.array_equal(ocr_imgops.add(page, page), cv2.add(page, page))
    for code in (ocr_imgops.ROTATE_180, ocr_imgops.ROTATE_90_CLOCKWISE,
                 ocr_imgops.ROTATE_90_COUNTERCLOCKWISE):
        assert np.array_equal(ocr_imgops.rotate(page[:50, :80], code),
                              cv2.rotate(page[:50, :80], code))
    for value in ((0, 0, 0), (10, 20, 30)):
        assert np.array_equal(
            ocr_imgops.copyMakeBorder(page[:30, :40], 3, 4, 5, 6, ocr_imgops.BORDER_CONSTANT,
                                      value=value),
            cv2.copyMakeBorder(page[:30, :40], 3, 4, 5, 6, cv2.BORDER_CONSTANT, value=value))


def test_what_rapidocr_never_asks_for_is_refused(page: np.ndarray) -> None:
    with pytest.raises(NotImplementedError):
        ocr_imgops.resize(page, (10, 10), interpolation=ocr_imgops.INTER_CUBIC)
    with pytest.raises(NotImplementedError):
        ocr_imgops.findContours(page[:, :, 0], 0, ocr_imgops.CHAIN_APPROX_SIMPLE)
    with pytest.raises(NotImplementedError):
        ocr_imgops.warpPerspective(page, np.eye(3), (5, 5),
                                   borderMode=ocr_imgops.BORDER_CONSTANT)
    with pytest.raises(NotImplementedError):
        ocr_imgops.cvtColor(page, 6)
    with pytest.raises(ValueError):
        ocr_imgops.resize(page, (0, 10))


def test_engine_reads_the_same_rows_with_either(tmp_path: Path) -> None:
    """The whole OCR engine on two clinosim scans: with ocr_imgops and with OpenCV the
    report gives the same lab rows (test, value, flag)."""
    page_rows = []
    for lib in (ocr_imgops, cv2):
        ocr._load_engine()
        ocr_imgops.bind(lib)
        try:
            rows = []
            for seed in (0, 1):
                truth = ce.generate(["bacterial_pneumonia"], 1, seed=20261130 + seed)[0]
                name, data, mime = ce.render(truth, "scan")
                path = tmp_path / f"{seed}-{name}"
                path.write_bytes(data)
                out = extract_file(path, file_id="f", category="lab", mime=mime,
                                   file_name=name)
                rows.append(sorted((r.test, r.value, r.flag) for r in out.lab_rows))
        finally:
            ocr_imgops.bind()
        page_rows.append(rows)
    assert all(len(rows) >= 8 for rows in page_rows[0])
    assert page_rows[0] == page_rows[1]


def test_ocr_runs_without_opencv_and_writes_nothing_outside(tmp_path: Path) -> None:
    """As in the binary, which leaves OpenCV out: a process where ``import cv2`` fails still
    loads the engine and reads a scanned report. And OCR leaves no trace outside the data
    dir: onnxruntime's telemetry (a device id in ~/.cache/Microsoft, a session file in the
    temp dir, an upload to Microsoft) is switched off, so home, temp dir and working
    directory stay empty."""
    truth = ce.generate(["acute_mi"], 1, seed=20261130)[0]
    name, data, mime = ce.render(truth, "scan")
    path = tmp_path / name
    path.write_bytes(data)
    home, tmp, cwd = (tmp_path / d for d in ("home", "tmp", "cwd"))
    for d in (home, tmp, cwd):
        d.mkdir()
    code = f"""
import json, sys
sys.modules["cv2"] = None          # import cv2 -> ImportError
from medmitra.pipeline.extract import extract_file
out = extract_file({str(path)!r}, file_id="f", category="lab", mime={mime!r},
                   file_name="scan.pdf")
import rapidocr_onnxruntime.ch_ppocr_det.utils as det_utils
print(json.dumps({{"rows": [[r.test, r.value] for r in out.lab_rows],
                   "cv2": det_utils.cv2.__name__}}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORT_")}
    env |= {"HOME": str(home), "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["cv2"] == "medmitra.pipeline.ocr_imgops"
    want = {ce._norm(n): v for n, v, _u, _f in truth.labs}
    right = sum(1 for test, value in got["rows"]
                if ce._norm(test) in want and ce.value_matches(float(value),
                                                              want[ce._norm(test)]))
    assert right >= 0.8 * len(want), (right, len(want))
    assert [list(d.rglob("*")) for d in (home, tmp, cwd)] == [[], [], []]
