"""How fast are synthetic hospitals made and read? Images per second on one core, per site profile.

For every reference chest X-ray scanner and pathology stain profile, at its own matrix and at 128²:

* ``generate``: render + acquisition chain, array only;
* ``+ write``: the same plus writing the DICOM / PNG file;
* ``read``: reading the file back through the medsilo reader (MONAI ``LoadImage``) and resizing to 64².

Run::

    python -m benchmarks.synth_speed [--images 40]

It prints a Markdown table and writes ``benchmarks/results/synth_speed.json``. One process, so the
numbers are per core; ``medsilo synth`` uses up to two processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from medsilo.medical.data.readers import LoadCXR, LoadPatch
from medsilo.medical.data.transforms import preprocess
from medsilo.medical.synth import cxr, pathology

RESULTS = Path(__file__).resolve().parent / "results"


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1)


def _cxr_row(name: str, scanner: cxr.CXRScanner, n: int, tmp: Path) -> dict:
    rng = np.random.default_rng(0)
    patients = [cxr.sample_patient(rng, ("normal", "pneumonia")[i % 2]) for i in range(n)]
    t = time.perf_counter()
    stored = [cxr.acquire(cxr.render_density(p, rng), scanner, rng) for p in patients]
    t_gen = time.perf_counter() - t
    t = time.perf_counter()
    paths = []
    for i, p in enumerate(patients):
        arr = cxr.acquire(cxr.render_density(p, rng), scanner, rng)
        path = tmp / f"{name}-{i}.dcm"
        cxr.write_cxr_dicom(path, arr, scanner, patient_pseudonym=f"P{i}", uid_seed=f"{name}/{i}",
                            study_date="20240101", institution="bench")  # fmt: skip
        paths.append(path)
    t_write = time.perf_counter() - t
    load, resize = LoadCXR(), preprocess(64)
    t = time.perf_counter()
    for path in paths:
        resize(load(path))
    t_read = time.perf_counter() - t
    return {
        "site": name, "matrix": f"{stored[0].shape[0]}²", "generate_img_s": _rate(n, t_gen),
        "generate_write_img_s": _rate(n, t_write), "read_resize_img_s": _rate(n, t_read),
        "file_kib": round(np.mean([p.stat().st_size for p in paths]) / 1024, 1),
    }  # fmt: skip


def _path_row(name: str, site: pathology.StainSite, size: int, n: int, tmp: Path) -> dict:
    rng = np.random.default_rng(0)
    atypia = [pathology.sample_atypia(rng, ("normal", "tumor")[i % 2]) for i in range(n)]
    t = time.perf_counter()
    for a in atypia:
        pathology.stain_patch(a, site, rng, size)
    t_gen = time.perf_counter() - t
    t = time.perf_counter()
    paths = []
    for i, a in enumerate(atypia):
        path = tmp / f"{name}-{size}-{i}.png"
        pathology.write_png(path, pathology.stain_patch(a, site, rng, size))
        paths.append(path)
    t_write = time.perf_counter() - t
    load, resize = LoadPatch(), preprocess(64)
    t = time.perf_counter()
    for path in paths:
        resize(load(path))
    t_read = time.perf_counter() - t
    return {
        "site": name, "matrix": f"{size}²", "generate_img_s": _rate(n, t_gen),
        "generate_write_img_s": _rate(n, t_write), "read_resize_img_s": _rate(n, t_read),
        "file_kib": round(np.mean([p.stat().st_size for p in paths]) / 1024, 1),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40, help="images per measurement")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows: dict[str, list[dict]] = {"cxr": [], "pathology": []}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for i, scanner in enumerate(cxr.CXR_SCANNERS):
            rows["cxr"].append(_cxr_row(f"hospital-{i + 1}", scanner, args.images, tmp))
            small = dataclasses.replace(scanner, matrix=128)
            rows["cxr"].append(_cxr_row(f"hospital-{i + 1}", small, args.images, tmp))
        for i, site in enumerate(pathology.STAIN_SITES):
            for size in (96, 128):
                rows["pathology"].append(_path_row(f"hospital-{i + 1}", site, size, args.images, tmp))
    result = {"benchmark": "synth_speed", "images_per_measurement": args.images, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "synth_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    """One table per modality."""
    lines = []
    for modality, rows in result["rows"].items():
        lines += [f"| {modality} site | matrix | generate img/s | + write img/s | read + resize to 64² img/s | file KiB |",
                  "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        lines += [f"| {r['site']} | {r['matrix']} | {r['generate_img_s']} | {r['generate_write_img_s']} | "
                  f"{r['read_resize_img_s']} | {r['file_kib']} |" for r in rows]  # fmt: skip
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
