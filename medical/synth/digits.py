"""Real images as hospitals: scikit-learn's handwritten digits split across sites (modality ``image``).

The 1,797 digits (8×8 grayscale, 10 classes, about 180 each) ship inside the scikit-learn wheel, so they are
real pixels nobody here drew, available offline. :func:`write_digit_sites` upsamples each to ``size``×``size``
(bicubic), writes it as an 8-bit grayscale PNG, and deals the images to N sites the way personalized-FL
papers partition data (PFLlib's ``separate_data``):

* ``dirichlet``: for every class, the shares of the sites are drawn from Dirichlet(α), redrawn until
  every site has at least ``min_per_site`` images (α = 0.1: most sites hold a few classes);
* ``pathological``: site i holds ``classes_per_site`` classes, i·c … i·c + c − 1 (mod 10), and each class is
  split evenly among the sites that hold it;
* ``iid``: every site gets an even share of every class.

Each site's images are split into train/val/test per class (``shares``; every image its own patient) and
written as in :mod:`.hospitals`: ``OUT/sites.yml``, ``OUT/digits.json`` (request and counts), and
``OUT/<site>/manifest.csv`` + ``images/``. Everything is written to a temporary sibling folder and renamed
into place; the same request finds the folder and reuses it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from medsilo.config.manifest import SPLITS, write_manifest
from medsilo.errors import MedsiloError
from medsilo.medical.synth.hospitals import publish

CLASSES = tuple(str(d) for d in range(10))
"""Class names: the digits as text, in label order."""


@dataclass(frozen=True)
class DigitsRequest:
    """How to deal the digits to sites.

    Attributes:
        sites: number of sites (1–64).
        split: ``dirichlet``, ``pathological`` or ``iid``.
        alpha: Dirichlet concentration (``dirichlet`` only; > 0, smaller = more skewed).
        classes_per_site: classes each site holds (``pathological`` only; 1–10).
        size: side of the written images in pixels (8–128).
        shares: train/val/test shares of each class at a site.
        min_per_site: fewest images a site may get (``dirichlet`` redraws until it holds).
        seed: seeds the partition and the splits.
    """

    sites: int = 4
    split: Literal["dirichlet", "pathological", "iid"] = "dirichlet"
    alpha: float = 0.1
    classes_per_site: int = 2
    size: int = 32
    shares: tuple[float, float, float] = (0.6, 0.2, 0.2)
    min_per_site: int = 30
    seed: int = 0

    def check(self) -> None:
        """Raise :class:`MedsiloError` naming the first bad field."""
        if not 1 <= self.sites <= 64:
            raise MedsiloError(f"digits: sites must be 1–64, got {self.sites}")
        if self.split not in ("dirichlet", "pathological", "iid"):
            raise MedsiloError(f"digits: split must be dirichlet, pathological or iid, got {self.split!r}")
        if self.alpha <= 0:
            raise MedsiloError(f"digits: alpha must be > 0, got {self.alpha}")
        if not 1 <= self.classes_per_site <= len(CLASSES):
            raise MedsiloError(f"digits: classes_per_site must be 1–10, got {self.classes_per_site}")
        if not 8 <= self.size <= 128:
            raise MedsiloError(f"digits: size must be 8–128 pixels, got {self.size}")
        if len(self.shares) != 3 or min(self.shares) <= 0:
            raise MedsiloError(f"digits: shares must be three positive numbers (train, val, test), got {self.shares}")
        if self.sites * self.min_per_site > 1797:
            raise MedsiloError(f"digits: {self.sites} sites × min_per_site {self.min_per_site} is more than the "
                               f"1797 images")  # fmt: skip

    def site_names(self) -> list[str]:
        """``site-1`` … ``site-N``."""
        return [f"site-{i + 1}" for i in range(self.sites)]


def partition(labels: np.ndarray, req: DigitsRequest, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices of ``labels`` per site, as :class:`DigitsRequest` ``split`` says (each sorted)."""
    k = len(CLASSES)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(k)]
    if req.split == "iid":
        parts = [np.array_split(idx, req.sites) for idx in by_class]
        return [np.sort(np.concatenate([p[s] for p in parts])) for s in range(req.sites)]
    if req.split == "pathological":
        holders = {c: [s for s in range(req.sites)
                       if c in {(s * req.classes_per_site + j) % k for j in range(req.classes_per_site)}]
                   for c in range(k)}  # fmt: skip
        out: list[list[np.ndarray]] = [[] for _ in range(req.sites)]
        for c, sites in holders.items():
            for s, chunk in zip(sites, np.array_split(by_class[c], len(sites)) if sites else [], strict=True):
                out[s].append(chunk)
        return [np.sort(np.concatenate(chunks)) if chunks else np.array([], dtype=int) for chunks in out]
    for _ in range(1000):
        out = [[] for _ in range(req.sites)]
        for idx in by_class:
            cuts = (np.cumsum(rng.dirichlet(np.full(req.sites, req.alpha)))[:-1] * len(idx)).astype(int)
            for s, chunk in enumerate(np.split(idx, cuts)):
                out[s].append(chunk)
        sites = [np.sort(np.concatenate(chunks)) for chunks in out]
        if min(len(s) for s in sites) >= req.min_per_site:
            return sites
    raise MedsiloError(f"digits: no Dirichlet({req.alpha}) draw in 1000 gave every one of {req.sites} sites "
                       f"{req.min_per_site} images; lower min_per_site or raise alpha")  # fmt: skip


def _splits(labels: np.ndarray, shares: tuple[float, float, float], rng: np.random.Generator) -> list[str]:
    """A split name per image: each class's images divided by ``shares`` (rounded; val/test first get one
    image of a class only when it has at least three)."""
    out = [""] * len(labels)
    total = sum(shares)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = len(idx)
        n_val = int(round(n * shares[1] / total)) if n >= 3 else 0
        n_test = int(round(n * shares[2] / total)) if n >= 3 else 0
        n_val, n_test = max(n_val, 1 if n >= 3 else 0), max(n_test, 1 if n >= 3 else 0)
        for i, j in enumerate(idx):
            out[j] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return out


def write_digit_sites(out: str | Path, req: DigitsRequest = DigitsRequest()) -> Path:
    """Write the digits dealt to ``req.sites`` sites under ``out``; returns the path of ``sites.yml``.

    Raises:
        MedsiloError: a bad request, or ``out`` holds something other than digit sites.
    """
    req.check()
    out = Path(out)
    marker = out / "digits.json"
    if marker.is_file() and (out / "sites.yml").is_file():
        try:
            if json.loads(marker.read_text()).get("request") == _request_json(req):
                return out / "sites.yml"
        except (OSError, json.JSONDecodeError):
            pass
    if out.exists() and any(out.iterdir()) and not marker.is_file():
        raise MedsiloError(f"{out}: folder is not empty and holds no digit sites; choose another folder")

    digits = load_digits()
    labels = digits.target.astype(int)
    pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # the set's values are 0–16
    rng = np.random.default_rng(req.seed)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    sites_yml: dict[str, dict[str, str]] = {}
    summary: dict[str, Any] = {}
    try:
        for name, idx in zip(req.site_names(), partition(labels, req, rng), strict=True):
            (tmp / name / "images").mkdir(parents=True)
            splits = _splits(labels[idx], req.shares, rng)
            rows = []
            for i, split in zip(idx, splits, strict=True):
                file = f"images/{i:04d}.png"
                Image.fromarray(pixels[i]).resize((req.size, req.size), Image.Resampling.BICUBIC).save(tmp / name / file)
                rows.append({"path": file, "label": CLASSES[labels[i]], "patient_id": f"D{i:04d}", "split": split})
            write_manifest(tmp / name / "manifest.csv", rows)
            sites_yml[name] = {"dataset": "digits", "manifest": f"{name}/manifest.csv", "modality": "image"}
            summary[name] = {s: {c: sum(1 for r in rows if r["split"] == s and r["label"] == c) for c in CLASSES}
                             for s in SPLITS}  # fmt: skip
        publish(tmp, out, "digits.json", {"request": _request_json(req), "sites": summary}, sites_yml)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "sites.yml"


def _request_json(req: DigitsRequest) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(req)))
