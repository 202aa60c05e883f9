"""Whole-slide images → pathology patches at a fixed magnification, with a tissue mask, cached.

A pathology dataset may list whole slides instead of patches. Its manifest is a CSV whose header has a
``slide`` column (DESIGN §7 manifest, one row per slide or per region)::

    slide,label,patient_id,split,x,y,w,h
    slides/case-01.svs,tumor,p01,train,,,,          # the whole slide carries the label
    slides/case-02.svs,normal,p02,val,0,0,4000,3000  # a region: x, y, w, h in level-0 pixels
    slides/case-02.svs,tumor,p02,val,6000,2000,2048,2048

``slide`` is relative to the manifest's folder (or absolute; outside the folder only with
``data.allow_paths_outside_manifest``), in any format OpenSlide reads (Aperio SVS, generic tiled TIFF,
Hamamatsu, MIRAX …). ``patient_id`` and ``split`` behave as in an image manifest
(:mod:`medsilo.config.manifest`); without ``patient_id`` every slide is its own patient, so a slide's patches
never straddle two splits. The region columns are optional; a row whose region cells are blank labels the
whole slide.

Tiling (:func:`tile_slides`), with the site's :class:`~medsilo.config.site.SlideTiling` settings:

1. Scale: a patch is ``patch_size`` pixels at the target ``mpp`` (or ``magnification``); the slide's own
   level-0 resolution comes from ``openslide.mpp-x`` (or ``openslide.objective-power``), else from the
   settings' ``slide_mpp`` / ``slide_magnification``, else the slide is refused. One patch covers
   ``F = patch_size · mpp / slide_mpp`` level-0 pixels.
2. Tissue mask (:mod:`.tissue`): the slide is read once at low resolution (about 8 × 8 mask pixels per patch, from the pyramid
   level nearest below that), and a pixel is tissue when its HSV saturation is above Otsu's threshold of the
   whole slide (and above a floor, so a blank slide has none). Transparent pixels (outside the scanned area)
   are background.
3. Candidates: the non-overlapping ``F × F`` grid of the region (or slide) from its top-left corner; a cell is
   kept when at least ``min_tissue`` of it is tissue.
4. Pick: at most ``max_patches`` per row, drawn without replacement by a generator seeded with the settings'
   ``seed`` and the row (slide path and region), so the same settings pick the same patches on every machine.
5. Read: each picked cell from the pyramid level nearest below the target scale, composited on white, resized
   to ``patch_size`` and written as RGB PNG.

The cache is ``slides.cache`` (default ``.medsilo-tiles/`` beside the slide manifest). Each row's patches go
to ``<cache>/<key>/`` with a ``tiles.json`` written last; the key hashes the slide's resolved path, size and
modification time, the region and every tiling setting, so a second load re-uses the tiles and a changed slide
or setting tiles afresh (stale folders are left for the site to delete). The patch manifest
``<cache>/<manifest stem>-<digest>.csv`` (``path,label,patient_id,split``) is an ordinary manifest that
:func:`medsilo.config.manifest.read_manifest` and the pathology pipeline read.

Every error names the slide manifest, its line and the slide file, on one line. Patches are patient data and
stay in the cache; logs carry counts and timings only.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image
from tqdm import tqdm

from medsilo.config.manifest import SPLITS, ManifestError, image_path, write_manifest
from medsilo.config.site import SlideTiling
from medsilo.errors import DataError, did_you_mean
from medsilo.fs import atomic_open
from medsilo.medical.data.tissue import MASK_PIXELS_PER_PATCH, candidates, on_white, slide_mask

log = logging.getLogger(__name__)

SLIDE_COLUMNS: tuple[str, ...] = ("slide", "label", "patient_id", "split", "x", "y", "w", "h")
"""Columns of a slide manifest; ``slide`` and ``label`` are required, ``x,y,w,h`` come together."""
REGION_COLUMNS: tuple[str, ...] = ("x", "y", "w", "h")
CACHE_DIR = ".medsilo-tiles"
"""Default cache folder, beside the slide manifest."""
TILES_FILE = "tiles.json"
"""Written last into a row's cache folder: its presence means the row's patches are complete."""
TILER_VERSION = 1
"""Part of every cache key: bump when the tiling changes what a slide yields."""
DEFAULT_MPP = 0.5
"""Target microns per pixel when the settings give neither ``mpp`` nor ``magnification`` (about 20×)."""
MAX_READ_PIXELS = 1 << 26
"""Most pixels one OpenSlide read may return (256 MB of RGBA): a slide whose mask block or patch would need more
(it declares an enormous size, or lacks a pyramid level near the target scale) is refused before reading."""
PATCH_NAME = re.compile(r"^x[0-9]+_y[0-9]+\.png$")
"""The only file names a row's ``tiles.json`` may list (a tampered one could name a file elsewhere)."""


class SlideError(DataError):
    """A slide manifest or slide that cannot be tiled."""


@dataclass(frozen=True)
class SlideRow:
    """One row of a slide manifest.

    Attributes:
        slide: absolute path of the slide file, ``..`` and symbolic links resolved.
        cell: the ``slide`` cell as written (seeds the pick, so it is the same on every machine).
        label: class name.
        patient_id: the site's pseudonym of the patient (``slide:<cell>`` when the manifest has none).
        split: ``train``, ``val``, ``test``, or ``""`` (assigned from the patient later).
        region: ``(x, y, w, h)`` in level-0 pixels, or ``None`` for the whole slide.
        line: 1-based line in the CSV, for messages.
    """

    slide: Path
    cell: str
    label: str
    patient_id: str
    split: str
    region: tuple[int, int, int, int] | None
    line: int


@dataclass(frozen=True)
class TilingResult:
    """What :func:`tile_slides` produced.

    Attributes:
        manifest: the patch manifest (``path,label,patient_id,split``), inside the cache folder.
        patches: patches listed in it.
        tiled: rows tiled by this call.
        cached: rows whose patches came from the cache.
    """

    manifest: Path
    patches: int
    tiled: int
    cached: int


def is_slide_manifest(path: str | Path) -> bool:
    """Whether ``path`` is a slide manifest (its header has a ``slide`` column); ``False`` when unreadable."""
    try:
        with Path(path).open("r", encoding="utf-8-sig", newline="") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return "slide" in {h.strip().lower() for h in header}


def read_slide_manifest(
    path: str | Path, classes: Sequence[str] | None = None, *, allow_outside: bool = False
) -> list[SlideRow]:
    """Parse and check a slide manifest.

    Args:
        path: the CSV file.
        classes: the job's class names; ``None`` accepts any label.
        allow_outside: accept slides outside the manifest's folder (``data.allow_paths_outside_manifest``).

    Returns:
        One :class:`SlideRow` per row.

    Raises:
        SlideError: unknown or missing column, a row of the wrong length, an empty or unknown label, a bad
            split, a region that is not four non-negative integers with ``w, h > 0``, a row listed twice, a
            patient in two splits — each naming the file, line and column.
    """
    path = Path(path)
    if not path.is_file():
        raise SlideError(
            f"{path}: slide manifest not found; check the dataset's 'manifest' path in the site config"
        )
    try:
        with path.open("r", encoding="utf-8-sig", newline="") as fh:
            raw = list(csv.reader(fh))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise SlideError(f"{path}: not a readable UTF-8 CSV file ({exc})") from None
    header = [h.strip().lower() for h in raw[0]] if raw else []
    for name in header:
        if name not in SLIDE_COLUMNS:
            raise SlideError(
                f"{path}: line 1: unknown column '{name}'; {did_you_mean(name, SLIDE_COLUMNS)}"
                f"allowed columns: {', '.join(SLIDE_COLUMNS)}"
            )
    for required in ("slide", "label"):
        if required not in header:
            raise SlideError(
                f"{path}: line 1: missing required column '{required}' (header: {','.join(header)})"
            )
    if len(set(header)) != len(header):
        raise SlideError(f"{path}: line 1: repeated column name in header {','.join(header)}")
    has_region = [c in header for c in REGION_COLUMNS]
    if any(has_region) and not all(has_region):
        raise SlideError(
            f"{path}: line 1: region columns come together: x,y,w,h (header: {','.join(header)})"
        )

    records = [
        (n, {h: c.strip() for h, c in zip(header, cells)}, len(cells))
        for n, cells in enumerate(raw[1:], start=2)
        if any(c.strip() for c in cells)
    ]
    if not records:
        raise SlideError(f"{path}: slide manifest has a header but no rows")
    has_split = "split" in header and any(rec["split"] for _, rec, _ in records)
    base = path.resolve().parent
    rows: list[SlideRow] = []
    seen: dict[tuple, int] = {}
    patient_split: dict[str, tuple[str, int]] = {}
    for lineno, rec, width in records:
        where = f"{path}: line {lineno}"
        if width != len(header):
            raise SlideError(f"{where}: expected {len(header)} values, got {width}")
        if not rec["slide"]:
            raise SlideError(f"{where}: slide: empty")
        try:
            slide = image_path(rec["slide"], base, allow_outside, where)
        except ManifestError as exc:
            raise SlideError(str(exc).replace(f"{where}: path:", f"{where}: slide:", 1)) from None
        label = rec["label"]
        if not label or (classes is not None and label not in classes):
            known = (
                f"{did_you_mean(label, classes)}classes: {', '.join(classes)}"
                if classes
                else "give a class name"
            )
            raise SlideError(f"{where}: label: '{label}' is not a class of this job; {known}")
        region = _region(rec, where) if all(has_region) else None
        if (slide, region) in seen:
            raise SlideError(f"{where}: same slide and region as line {seen[slide, region]}; list each once")
        seen[slide, region] = lineno
        if "patient_id" in header and not rec["patient_id"]:
            raise SlideError(f"{where}: patient_id: empty; give every row the patient's pseudonym")
        patient = rec.get("patient_id") or f"slide:{rec['slide']}"
        split = rec["split"].lower() if has_split else ""
        if has_split and split not in SPLITS:
            raise SlideError(
                f"{where}: split: '{rec['split']}' is not a split; {did_you_mean(split, SPLITS)}"
                f"use one of {', '.join(SPLITS)}"
            )
        if patient in patient_split and patient_split[patient][0] != split:
            other, other_line = patient_split[patient]
            raise SlideError(
                f"{where}: split: this patient is in '{other}' on line {other_line} and in '{split}' "
                "here; splits must be by patient"
            )
        patient_split.setdefault(patient, (split, lineno))
        rows.append(SlideRow(slide, rec["slide"], label, patient, split, region, lineno))
    return rows


def _region(rec: dict[str, str], where: str) -> tuple[int, int, int, int] | None:
    cells = [rec[c] for c in REGION_COLUMNS]
    if not any(cells):
        return None
    if not all(cells):
        raise SlideError(f"{where}: x,y,w,h: give all four region values or none, got {','.join(cells)}")
    try:
        x, y, w, h = (int(c) for c in cells)
    except ValueError:
        raise SlideError(
            f"{where}: x,y,w,h: must be whole level-0 pixel numbers, got {','.join(cells)}"
        ) from None
    if x < 0 or y < 0 or w <= 0 or h <= 0:
        raise SlideError(f"{where}: x,y,w,h: need x, y ≥ 0 and w, h > 0, got {','.join(cells)}")
    return x, y, w, h


def _open(row: SlideRow, where: str) -> openslide.OpenSlide:
    if not row.slide.is_file():
        raise SlideError(
            f"{where}: slide {row.slide}: file not found; check the 'slide' column",
            public="a whole slide of the manifest is missing",
        )
    try:
        return openslide.OpenSlide(str(row.slide))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(
            f"{where}: slide {row.slide}: not a whole-slide format OpenSlide reads (SVS, tiled TIFF, "
            "NDPI, MRXS …)",
            public="a whole slide is in an unsupported format",
        ) from None
    except (openslide.OpenSlideError, OSError) as exc:
        raise SlideError(
            f"{where}: slide {row.slide}: unreadable ({exc})", public="a whole slide is unreadable"
        ) from None


def level0_per_pixel(slide: openslide.OpenSlide, settings: SlideTiling, name: str) -> float:
    """Level-0 pixels per patch pixel at the target magnification (> 1 means the patch is a downsample).

    Args:
        slide: the open slide.
        settings: the site's tiling settings.
        name: the slide, for messages.

    Raises:
        SlideError: the slide lacks the property the target needs and the settings give no override.
    """
    props = slide.properties
    if settings.magnification is not None:
        power = _number(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)) or settings.slide_magnification
        if power is None:
            raise SlideError(
                f"{name}: the slide has no objective power (openslide.objective-power); set "
                "slides.slide_magnification in the site config, or give slides.mpp instead",
                public="a whole slide has no magnification",
            )
        return power / settings.magnification
    mpp = _number(props.get(openslide.PROPERTY_NAME_MPP_X)) or settings.slide_mpp
    if mpp is None:
        raise SlideError(
            f"{name}: the slide has no microns per pixel (openslide.mpp-x); set slides.slide_mpp in "
            "the site config, or give slides.magnification instead",
            public="a whole slide has no resolution",
        )
    return (settings.mpp or DEFAULT_MPP) / mpp


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text else None
    except ValueError:
        return None
    return value if value and value > 0 and math.isfinite(value) else None


def pick(cells: list[tuple[int, int]], limit: int, seed: int, row: SlideRow) -> list[tuple[int, int]]:
    """At most ``limit`` of ``cells``, drawn without replacement by a generator seeded with ``seed`` and the
    row's slide cell and region (the same on every machine); returned in grid order."""
    if len(cells) <= limit:
        return list(cells)
    identity = hashlib.sha256(json.dumps([row.cell, row.region]).encode()).digest()
    rng = np.random.default_rng([seed, int.from_bytes(identity[:8], "big")])
    chosen = rng.choice(len(cells), size=limit, replace=False)
    return [cells[k] for k in sorted(chosen)]


def _settings_key(settings: SlideTiling) -> dict:
    return settings.model_dump(mode="json", exclude={"cache"}) | {"version": TILER_VERSION}


def row_key(row: SlideRow, settings: SlideTiling) -> str:
    """The cache key of a row: slide path, size and modification time, region and tiling settings."""
    stat = row.slide.stat()
    facts = {
        "slide": str(row.slide),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "region": row.region,
        "cell": row.cell,
        "settings": _settings_key(settings),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]


def tile_slides(
    manifest: str | Path,
    settings: SlideTiling | None = None,
    *,
    classes: Sequence[str] | None = None,
    allow_outside: bool = False,
    progress: bool = False,
) -> TilingResult:
    """Tile every row of a slide manifest (or take it from the cache) and write the patch manifest.

    Args:
        manifest: the slide manifest (see the module docstring).
        settings: the site's tiling settings (``datasets.<name>.slides``); ``None``: the defaults.
        classes: the job's class names; ``None`` accepts any label.
        allow_outside: slides may lie outside the manifest's folder (``data.allow_paths_outside_manifest``).
        progress: show a progress bar over the patches being read.

    Returns:
        The patch manifest and what was tiled or re-used.

    Raises:
        SlideError: a bad manifest; a missing, unreadable or unsupported slide; a slide without the resolution
            the target needs; a region outside the slide or smaller than one patch; a row with no tissue; a
            cache folder that cannot be written — one line naming the manifest, line and slide.
    """
    manifest = Path(manifest)
    settings = settings or SlideTiling()
    rows = read_slide_manifest(manifest, classes, allow_outside=allow_outside)
    cache = settings.cache or manifest.resolve().parent / CACHE_DIR
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SlideError(
            f"{cache}: cannot create the tile cache ({exc.strerror}); set slides.cache in the site "
            "config to a writable folder",
            public="the tile cache cannot be written",
        ) from None

    t0 = time.perf_counter()
    records: list[dict[str, str]] = []
    tiled = cached = 0
    masks: dict[Path, tuple[np.ndarray, float]] = {}
    with tqdm(desc=f"tile {manifest.name}", unit="patch", disable=not progress, leave=False) as bar:
        for row in rows:
            where = f"{manifest}: line {row.line}"
            if not row.slide.is_file():
                _open(row, where)  # raises: file not found
            folder = cache / row_key(row, settings)
            patches = _cached_patches(folder)
            if patches is None:
                patches = _tile_row(row, settings, folder, where, masks, bar)
                tiled += 1
            else:
                cached += 1
            records += [
                {
                    "path": str((folder / name).relative_to(cache)),
                    "label": row.label,
                    "patient_id": row.patient_id,
                    "split": row.split,
                }
                for name in patches
            ]
    digest = hashlib.sha256(json.dumps([str(manifest.resolve()), records]).encode()).hexdigest()[:12]
    out = cache / f"{manifest.stem}-{digest}.csv"
    write_manifest(out, records)
    log.info(
        "tiled %d slide row(s), re-used %d from the cache: %d patches in %.1f s",
        tiled,
        cached,
        len(records),
        time.perf_counter() - t0,
    )
    return TilingResult(manifest=out, patches=len(records), tiled=tiled, cached=cached)


def _check_reads(
    slide: openslide.OpenSlide, name: str, downsample: float, scale: float, footprint: int
) -> None:
    """Refuse a slide whose tissue mask, one block of its mask read, or one patch read would pass
    :data:`MAX_READ_PIXELS` (from its declared sizes, before anything is read)."""
    width, height = slide.dimensions
    mask = math.ceil(width / downsample) * math.ceil(height / downsample)
    level = slide.get_best_level_for_downsample(downsample)
    block = slide.level_dimensions[level][0] * math.ceil(downsample / slide.level_downsamples[level])
    side = math.ceil(footprint / slide.level_downsamples[slide.get_best_level_for_downsample(scale)])
    if max(mask, block, side * side) > MAX_READ_PIXELS:
        raise SlideError(
            f"{name}: the slide is too large to tile ({width}×{height} level-0 pixels; its tissue mask, a mask "
            f"read or a patch read would pass {MAX_READ_PIXELS:,} pixels, for lack of a pyramid level near the "
            "target scale); check the file, or convert it to a pyramidal format",
            public="a whole slide is too large to tile",
        )


def _cached_patches(folder: Path) -> list[str] | None:
    """The patch files a complete cache folder lists, or ``None`` when it must be tiled (again)."""
    try:
        names = json.loads((folder / TILES_FILE).read_text())["patches"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(names, list) or not all(
        isinstance(n, str)
        and PATCH_NAME.fullmatch(n)
        and (folder / n).is_file()
        and not (folder / n).is_symlink()
        for n in names
    ):
        return None
    return names


def _tile_row(
    row: SlideRow,
    settings: SlideTiling,
    folder: Path,
    where: str,
    masks: dict[Path, tuple[np.ndarray, float]],
    bar: tqdm,
) -> list[str]:
    """Tile one row into ``folder`` and write its ``tiles.json``; returns the patch file names."""
    slide = _open(row, where)
    try:
        name = f"{where}: slide {row.slide}"
        scale = level0_per_pixel(slide, settings, name)
        footprint = max(1, round(settings.patch_size * scale))
        width, height = slide.dimensions
        region = row.region or (0, 0, width, height)
        x, y, w, h = region
        if x + w > width or y + h > height:
            raise SlideError(
                f"{name}: region {x},{y},{w},{h} lies outside the slide ({width}×{height} level-0 pixels)",
                public="a region lies outside its whole slide",
            )
        if w < footprint or h < footprint:
            raise SlideError(
                f"{name}: region {w}×{h} is smaller than one patch ({footprint}×{footprint} level-0 "
                "pixels at the target magnification)",
                public="a region is smaller than one patch",
            )
        if row.slide not in masks:
            downsample = max(1.0, footprint / MASK_PIXELS_PER_PATCH)
            _check_reads(slide, name, downsample, scale, footprint)
            masks[row.slide] = (slide_mask(slide, downsample), downsample)
        mask, downsample = masks[row.slide]
        cells = candidates(mask, downsample, region, footprint, settings.min_tissue)
        if not cells:
            what = f"region {x},{y},{w},{h}" if row.region else "the slide"
            raise SlideError(
                f"{name}: no tissue found in {what} (no patch is {settings.min_tissue:.0%} tissue); "
                "check the slide or region, or lower slides.min_tissue",
                public="no tissue found in a whole slide",
            )
        chosen = pick(cells, settings.max_patches, settings.seed, row)
        bar.total = (bar.total or 0) + len(chosen)  # known row by row, once each row's cells are picked
        level = slide.get_best_level_for_downsample(scale)
        side = math.ceil(footprint / slide.level_downsamples[level])
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for px, py in chosen:
            patch = np.asarray(slide.read_region((px, py), level, (side, side)))
            image = Image.fromarray(on_white(patch))
            if side != settings.patch_size:
                image = image.resize((settings.patch_size, settings.patch_size), Image.LANCZOS)
            names.append(f"x{px}_y{py}.png")
            with atomic_open(folder / names[-1], "wb") as fh:
                image.save(fh, format="PNG")
            bar.update(1)
    except openslide.OpenSlideError as exc:
        raise SlideError(
            f"{where}: slide {row.slide}: unreadable ({exc})", public="a whole slide is unreadable"
        ) from None
    except OSError as exc:
        raise SlideError(
            f"{folder}: cannot write the tile cache ({exc.strerror}); set slides.cache in the site "
            "config to a writable folder",
            public="the tile cache cannot be written",
        ) from None
    finally:
        slide.close()
    facts = {
        "patches": names,
        "cells": [list(c) for c in chosen],
        "candidates": len(cells),
        "footprint": footprint,
        "level": level,
        "settings": _settings_key(settings),
    }
    with atomic_open(folder / TILES_FILE, "w", encoding="utf-8") as fh:
        json.dump(facts, fh, indent=1)
    return names
