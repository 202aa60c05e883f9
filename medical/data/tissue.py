"""Tissue masks of whole slides: which grid cells of a slide are tissue (:mod:`.slides` tiles them).

A low-resolution read of the whole slide is composited on white; a pixel is tissue when its HSV saturation is
above Otsu's threshold of the slide (H&E stains are saturated, glass and background are not) and above
:data:`MIN_SATURATION`, so a blank slide has no tissue at all. Pure functions of arrays, except
:func:`slide_mask`, which reads the slide.
"""

from __future__ import annotations

import math

import numpy as np
import openslide
from PIL import Image

MASK_PIXELS_PER_PATCH = 8
"""Tissue-mask resolution: mask pixels along one side of a patch."""
MIN_SATURATION = 20
"""Floor of the saturation threshold (0–255): white glass and grey background stay below it."""
MASK_BLOCK_PIXELS = 1 << 24
"""Most level pixels read at once while building the mask (bounds memory on large slides)."""


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of 8-bit values: the ``t`` maximising the between-class variance of ``≤ t``, ``> t``.

    Args:
        values: any shape, uint8.

    Returns:
        ``t`` in 0–255 (0 when all values are equal).
    """
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    weight0 = np.cumsum(hist)
    weight1 = weight0[-1] - weight0
    mass0 = np.cumsum(hist * np.arange(256))
    mean0 = np.divide(mass0, weight0, out=np.zeros(256), where=weight0 > 0)
    mean1 = np.divide(mass0[-1] - mass0, weight1, out=np.zeros(256), where=weight1 > 0)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return int(np.argmax(between))


def tissue_mask(rgba: np.ndarray) -> np.ndarray:
    """Tissue pixels of a low-resolution slide image: saturation above Otsu's threshold and the floor.

    Args:
        rgba: ``(H, W, 4)`` uint8, as OpenSlide reads it (alpha 0 outside the scanned area).

    Returns:
        ``(H, W)`` bool.
    """
    saturation = np.asarray(Image.fromarray(on_white(rgba)).convert("HSV"))[..., 1]
    return saturation > max(otsu_threshold(saturation), MIN_SATURATION)


def on_white(rgba: np.ndarray) -> np.ndarray:
    """``(H, W, 4)`` uint8 RGBA composited on white → ``(H, W, 3)`` uint8 RGB."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    return np.round(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def slide_mask(slide: openslide.OpenSlide, downsample: float) -> np.ndarray:
    """The whole slide's tissue mask at ``downsample`` level-0 pixels per mask pixel.

    Read from the pyramid level nearest below ``downsample``, in horizontal blocks of at most
    :data:`MASK_BLOCK_PIXELS` level pixels, each resized to the mask's scale.

    Returns:
        ``(ceil(H0 / downsample), ceil(W0 / downsample))`` bool.
    """
    width, height = slide.dimensions
    level = slide.get_best_level_for_downsample(downsample)
    scale = slide.level_downsamples[level]
    level_width = slide.level_dimensions[level][0]
    mask_w, mask_h = math.ceil(width / downsample), math.ceil(height / downsample)
    rows_per_block = max(1, int(MASK_BLOCK_PIXELS / level_width * scale / downsample))
    blocks = []
    for r0 in range(0, mask_h, rows_per_block):
        r1 = min(mask_h, r0 + rows_per_block)
        y0 = int(r0 * downsample)
        rows = max(1, min(math.ceil((r1 - r0) * downsample / scale), math.ceil((height - y0) / scale)))
        block = slide.read_region((0, y0), level, (level_width, rows)).resize((mask_w, r1 - r0), Image.BOX)
        blocks.append(np.asarray(block))
    return tissue_mask(np.concatenate(blocks, axis=0))


def candidates(
    mask: np.ndarray, downsample: float, region: tuple[int, int, int, int], footprint: int, min_tissue: float
) -> list[tuple[int, int]]:
    """Top-left level-0 corners of the grid cells of ``region`` whose tissue share is at least ``min_tissue``.

    Args:
        mask: ``(Hm, Wm)`` bool, the slide's tissue mask at ``downsample``.
        downsample: level-0 pixels per mask pixel.
        region: ``(x, y, w, h)`` level-0 pixels.
        footprint: side F of a patch in level-0 pixels.
        min_tissue: least tissue share of a kept cell.
    """
    x, y, w, h = region
    kept = []
    for j in range(h // footprint):
        for i in range(w // footprint):
            px, py = x + i * footprint, y + j * footprint
            r0, c0 = int(py / downsample), int(px / downsample)
            r1 = max(r0 + 1, round((py + footprint) / downsample))
            c1 = max(c0 + 1, round((px + footprint) / downsample))
            window = mask[r0:r1, c0:c1]
            if window.size and window.mean() >= min_tissue:
                kept.append((px, py))
    return kept
