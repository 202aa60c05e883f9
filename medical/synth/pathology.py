"""Synthetic H&E pathology patches with per-site stain, optics and compression differences.

Tissue is drawn as two optical-density maps, haematoxylin (nuclei) and eosin (stroma, cytoplasm),
then turned into RGB with the Beer–Lambert law, ``I = I0 · exp(−(H·h + E·e))``, using the
Ruifrok–Johnston stain vectors ``h`` and ``e``. A site (:class:`StainSite`) changes stain strength,
stain hue (rotation of the vectors about the grey axis), illuminant, magnification, focus, noise and
JPEG quality — the things that differ between real labs.

The class signal is a latent *atypia* in [0, 1]: Beta(2, 5) for ``normal``, Beta(5, 2) for ``tumor``.
Atypia raises nuclear density, size, pleomorphism and hyperchromasia and makes glands fewer and
irregular. The two Beta laws overlap, so even a perfect classifier errs on ~11 % of patches (by design:
the task is learnable, not trivial). For a graded task the tumour class splits in two: ``low-grade``
Beta(9, 9) (atypia around 0.5) and ``high-grade`` Beta(7, 2) (around 0.78), so ``normal``, ``low-grade``,
``high-grade`` are three ordered grades whose neighbours overlap more than normal and tumor do (the laws
cross near atypia 0.36 and 0.65). Hyperchromasia interacts with the site's haematoxylin strength and
nuclear size with its magnification, so stain shift genuinely moves the class boundary.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage, optimize, stats

PATHOLOGY_CLASSES: tuple[str, ...] = ("normal", "tumor", "low-grade", "high-grade")
"""Every class the generator can draw; a job picks two or more (default ``normal``/``tumor``; graded:
``normal``, ``low-grade``, ``high-grade``)."""
ATYPIA_LAWS: dict[str, tuple[float, float]] = {
    "normal": (2, 5), "tumor": (5, 2), "low-grade": (9, 9), "high-grade": (7, 2),
}  # fmt: skip
"""Beta(a, b) law of each class's latent atypia."""


def atypia_boundary(lower: str, upper: str) -> float:
    """Where the atypia laws of two classes cross between their modes: the atypia above which ``upper`` is the
    likelier class (e.g. ``atypia_boundary("normal", "tumor")`` = 0.5). ``lower``'s law must peak below ``upper``'s."""
    (a1, b1), (a2, b2) = ATYPIA_LAWS[lower], ATYPIA_LAWS[upper]
    lo, hi = (a1 - 1) / (a1 + b1 - 2), (a2 - 1) / (a2 + b2 - 2)  # the modes (every law has a, b > 1)
    if not lo < hi:
        raise ValueError(f"atypia_boundary: {lower!r} must peak below {upper!r}")
    return float(optimize.brentq(lambda x: stats.beta.logpdf(x, a1, b1) - stats.beta.logpdf(x, a2, b2), lo, hi))


H_VECTOR = np.array([0.650, 0.704, 0.286], dtype=np.float32)
E_VECTOR = np.array([0.072, 0.990, 0.105], dtype=np.float32)
"""Ruifrok & Johnston (2001) optical-density vectors of haematoxylin and eosin."""


@dataclass(frozen=True)
class StainSite:
    """One lab's staining, scanning and compression.

    Attributes:
        h_scale, e_scale: haematoxylin / eosin strength (1 = reference).
        h_rot, e_rot: hue rotation of each stain vector about the grey axis, degrees.
        illuminant: I0 per RGB channel (0–255).
        mpp_scale: apparent object size (magnification), 1 = reference.
        blur: Gaussian σ in pixels (focus).
        noise: sensor noise std in 8-bit units.
        jpeg_quality: JPEG round-trip quality, or ``None`` for lossless.
    """

    h_scale: float = 1.0
    e_scale: float = 1.0
    h_rot: float = 0.0
    e_rot: float = 0.0
    illuminant: tuple[float, float, float] = (242.0, 238.0, 244.0)
    mpp_scale: float = 1.0
    blur: float = 0.0
    noise: float = 2.0
    jpeg_quality: int | None = None

    def scaled(self, strength: float) -> StainSite:
        """This site with its stain, optics and noise shift scaled from neutral (0) to full (1)."""
        s = float(strength)
        neutral = StainSite()

        def lerp(name: str) -> float:
            a, b = getattr(neutral, name), getattr(self, name)
            return a + s * (b - a)

        io = tuple(n + s * (v - n) for n, v in zip(neutral.illuminant, self.illuminant))
        return replace(
            self,
            **{k: lerp(k) for k in ("h_scale", "e_scale", "h_rot", "e_rot", "mpp_scale", "blur", "noise")},
            illuminant=io,  # type: ignore[arg-type]
        )


STAIN_SITES: tuple[StainSite, ...] = (
    StainSite(),
    StainSite(1.5, 0.6, -10, 8, (235, 232, 246), 1.25, 0.5, 2, 80),
    StainSite(0.6, 1.5, 8, -6, (248, 240, 228), 0.75, 0.0, 5, 50),
    StainSite(1.2, 1.2, 15, 12, (228, 236, 242), 1.4, 1.2, 3, None),
)
"""The four reference labs; more are derived from these by :func:`make_stain_site`."""


def make_stain_site(index: int, rng: np.random.Generator) -> StainSite:
    """Stain profile of site ``index``: a reference lab, or for index ≥ 4 a random blend of two."""
    if index < len(STAIN_SITES):
        return STAIN_SITES[index]
    a, b = (STAIN_SITES[i] for i in rng.choice(len(STAIN_SITES), size=2, replace=False))
    t = float(rng.uniform(0.2, 0.8))
    fields = ("h_scale", "e_scale", "h_rot", "e_rot", "mpp_scale", "blur", "noise")
    mix = {k: (1 - t) * getattr(a, k) + t * getattr(b, k) for k in fields}
    io = tuple((1 - t) * p + t * q for p, q in zip(a.illuminant, b.illuminant))
    quality = a.jpeg_quality if rng.random() < 0.5 else b.jpeg_quality
    return StainSite(**mix, illuminant=io, jpeg_quality=quality)  # type: ignore[arg-type]


def _rotate_about_grey(v: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate an OD vector about (1, 1, 1)/√3 (a hue change) and renormalise."""
    k = np.ones(3, dtype=np.float32) / np.sqrt(3)
    t = np.deg2rad(degrees)
    r = v * np.cos(t) + np.cross(k, v) * np.sin(t) + k * np.dot(k, v) * (1 - np.cos(t))
    r = np.clip(r, 0.01, None)
    return (r / np.linalg.norm(r)).astype(np.float32)


def _stamp(canvas: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float, value: float) -> None:
    """Add a soft filled ellipse to ``canvas`` in place (local window only)."""
    n0, n1 = canvas.shape
    reach = int(np.ceil(max(ry, rx))) + 2
    y0, y1 = max(0, int(cy) - reach), min(n0, int(cy) + reach + 1)
    x0, x1 = max(0, int(cx) - reach), min(n1, int(cx) + reach + 1)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = (c * dx + s * dy) / rx, (-s * dx + c * dy) / ry
    r = np.sqrt(u * u + v * v)
    canvas[y0:y1, x0:x1] += value * np.clip((1.0 - r) * 3.0, 0, 1)


def render_stains(atypia: float, rng: np.random.Generator, size: int, mpp_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin optical-density maps, each (size, size) float32 ≥ 0."""
    n = size
    m = mpp_scale
    # stroma: anisotropic fibres along a random axis
    fibres = ndimage.gaussian_filter(rng.standard_normal((n, n)).astype(np.float32), (0.8 * m, 5.0 * m))
    fibres /= fibres.std() + 1e-6
    if rng.random() < 0.5:
        fibres = fibres.T
    eosin = 0.38 + 0.12 * fibres
    haem = np.full((n, n), 0.03, dtype=np.float32)

    # glands: lumen + epithelial ring with basal nuclei; fewer and irregular with atypia
    n_glands = int(rng.poisson(2.2 * (1 - 0.7 * atypia)))
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    lumen = np.zeros((n, n), dtype=bool)
    for _ in range(n_glands):
        cy, cx = rng.uniform(0, n, size=2)
        r0 = rng.uniform(9, 16) * m * (1 - 0.3 * atypia)
        phase = rng.uniform(0, 2 * np.pi, size=3)
        theta = np.arctan2(yy - cy, xx - cx)
        wobble = 1 + atypia * 0.35 * sum(np.sin((k + 2) * theta + phase[k]) / (k + 1) for k in range(3))
        rad = np.hypot(yy - cy, xx - cx) / (r0 * wobble)
        ring = (rad > 0.55) & (rad < 1.0)
        lumen |= rad <= 0.55
        eosin = np.where(ring, 0.55, eosin)
        for t in np.linspace(0, 2 * np.pi, max(6, int(2 * np.pi * r0 / (4.5 * m))), endpoint=False):
            rr = 0.8 * r0 * (1 + atypia * 0.35 * np.sin(2 * t + phase[0]))
            _stamp(haem, cy + rr * np.sin(t), cx + rr * np.cos(t), 1.6 * m, 2.4 * m, t, 0.7 + 0.5 * atypia)

    # epithelial / tumour nuclei: density, size, pleomorphism and hyperchromasia rise with atypia
    area = (n / (m * 10.0)) ** 2
    n_nuclei = int(rng.poisson(area * (0.35 + 2.2 * atypia)))
    sizes = m * (2.0 + 1.8 * atypia) * np.exp(rng.normal(0, 0.08 + 0.3 * atypia, size=n_nuclei))
    for i in range(n_nuclei):
        cy, cx = rng.uniform(0, n, size=2)
        aspect = 1 + abs(rng.normal(0, 0.15 + 0.3 * atypia))
        darkness = (0.55 + 0.9 * atypia) * rng.uniform(0.8, 1.2)
        _stamp(haem, cy, cx, sizes[i], sizes[i] * aspect, rng.uniform(0, np.pi), darkness)
    # lymphocytes (small, dark, round) and fibroblasts (thin, along the fibres)
    for _ in range(int(rng.poisson(area * 0.25))):
        cy, cx = rng.uniform(0, n, size=2)
        _stamp(haem, cy, cx, 1.4 * m, 1.4 * m, 0.0, 1.1)
    for _ in range(int(rng.poisson(area * 0.3))):
        cy, cx = rng.uniform(0, n, size=2)
        _stamp(haem, cy, cx, 0.8 * m, 3.2 * m, rng.normal(0, 0.2), 0.6)

    chromatin = ndimage.gaussian_filter(rng.standard_normal((n, n)).astype(np.float32), 0.7)
    haem = np.clip(haem, 0, 2.2) * (1 + 0.35 * chromatin)

    # white space: lumens, fat and tears
    holes = ndimage.gaussian_filter(rng.standard_normal((n, n)).astype(np.float32), 4.0 * m)
    white = lumen | (holes > np.quantile(holes, 1 - rng.uniform(0.0, 0.12)))
    haem = np.where(white, 0.0, haem)
    eosin = np.where(white, 0.02, eosin)
    return np.clip(haem, 0, None).astype(np.float32), np.clip(eosin, 0, None).astype(np.float32)


def stain_patch(atypia: float, site: StainSite, rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """One RGB patch (size, size, 3) uint8 of tissue with the given atypia, as ``site`` would scan it."""
    haem, eosin = render_stains(atypia, rng, size, site.mpp_scale)
    h_vec = _rotate_about_grey(H_VECTOR, site.h_rot) * site.h_scale
    e_vec = _rotate_about_grey(E_VECTOR, site.e_rot) * site.e_scale
    od = haem[..., None] * h_vec + eosin[..., None] * e_vec
    rgb = np.asarray(site.illuminant, dtype=np.float32) * np.exp(-od)
    if site.blur > 0:
        rgb = ndimage.gaussian_filter(rgb, (site.blur, site.blur, 0))
    rgb = rgb + site.noise * rng.standard_normal(rgb.shape).astype(np.float32)
    out = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    if site.jpeg_quality is not None:
        out = _jpeg_round_trip(out, int(site.jpeg_quality))
    return out


def _jpeg_round_trip(rgb: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def sample_atypia(rng: np.random.Generator, label: str) -> float:
    """Latent atypia of a patch of class ``label`` (one of :data:`PATHOLOGY_CLASSES`), from its
    :data:`ATYPIA_LAWS` Beta law."""
    if label not in PATHOLOGY_CLASSES:
        raise ValueError(f"label must be one of {PATHOLOGY_CLASSES}, got {label!r}")
    return float(rng.beta(*ATYPIA_LAWS[label]))


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """Write an RGB patch as PNG (deterministic bytes for the same array)."""
    Image.fromarray(rgb, mode="RGB").save(path, format="PNG")
