"""Synthetic hospitals: images, per-site manifests with patient-level splits, and ``sites.yml``.

:func:`synthesize` is what ``medsilo synth`` runs. For each of N hospitals it picks a scanner (chest
X-ray) or stain profile (pathology), draws how many images of each class the site has (balanced, or
label-skewed with a Dirichlet(α) draw per site), groups images into patients (follow-up images and
several patches per patient share that patient's anatomy or tumour grade), splits *patients* into
train/val/test stratified by class, renders the images (in parallel, each image from its own seed, so
the result does not depend on the number of workers) and writes::

    OUT/
      sites.yml                     # sites: {hospital-1: {dataset, manifest, modality}, ...}
      synth.json                    # the request, the site profiles, counts per split and class
      hospital-1/manifest.csv       # path,label,patient_id,split
      hospital-1/images/000000.dcm  # CR DICOM (cxr) or .png (pathology)

A *multi-label* request (``multilabel=True``, chest X-ray only) labels every image with several findings
that co-occur (:mod:`.multilabel`: default labels pneumonia, effusion, nodule, cardiomegaly); its manifests
have one column per label (``1``/``0``, some training cells blank = unknown) instead of ``label``.

A *scarce* site (``scarce={"hospital-3": 12}``) has only that many training images; its validation and
test splits keep the normal size so its accuracy can still be measured.

Everything is written into a temporary sibling folder and renamed into place at the end, so ``OUT``
never holds half a dataset. A second call with the same request and the same generator code finds ``synth.json`` and reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from medsilo.config.manifest import SPLITS, write_manifest
from medsilo.errors import MedsiloError
from medsilo.medical.synth import cxr, multilabel, pathology

DEFAULT_CLASSES = {"cxr": ("normal", "pneumonia"), "pathology": ("normal", "tumor")}
ALLOWED_CLASSES = {"cxr": cxr.CXR_FINDINGS, "pathology": pathology.PATHOLOGY_CLASSES}


@dataclass(frozen=True)
class SynthRequest:
    """What to synthesize (validated by :meth:`check`).

    Attributes:
        modality: ``cxr`` or ``pathology``.
        sites: number of hospitals (1–64).
        images_per_site: images per hospital over all splits (≥ 10).
        seed: master seed; every image derives its own seed from (seed, site, image).
        classes: class names in label order (default: normal vs pneumonia / normal vs tumor).
        scarce: site name → number of *training* images at that site.
        dirichlet_alpha: label skew; ``None`` gives balanced classes at every site.
        shift: site-shift strength, 0 (identical scanners) … 1 (reference profiles).
        split: train/val/test shares of each class's patients.
        patch_size: pathology patch side in pixels.
        multilabel: chest X-ray only: label each image with co-occurring findings (``classes`` are then the
            labels, from :data:`.multilabel.ML_FINDINGS`; ``dirichlet_alpha`` skews each site's prevalences).
    """

    modality: str
    sites: int
    images_per_site: int
    seed: int = 0
    classes: tuple[str, ...] | None = None
    scarce: dict[str, int] = field(default_factory=dict)
    dirichlet_alpha: float | None = None
    shift: float = 1.0
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    patch_size: int = 96
    multilabel: bool = False

    def site_names(self) -> list[str]:
        """``hospital-1`` … ``hospital-N``."""
        return [f"hospital-{i + 1}" for i in range(self.sites)]

    def class_names(self) -> tuple[str, ...]:
        """The classes, defaulting per modality."""
        if self.classes:
            return tuple(self.classes)
        return multilabel.ML_FINDINGS if self.multilabel else DEFAULT_CLASSES[self.modality]

    def check(self) -> None:
        """Raise :class:`MedsiloError` naming the first bad option."""
        if self.modality not in DEFAULT_CLASSES:
            raise MedsiloError(f"--modality: must be 'cxr' or 'pathology', got {self.modality!r}")
        if not 1 <= self.sites <= 64:
            raise MedsiloError(f"--sites: must be between 1 and 64, got {self.sites}")
        if self.images_per_site < 10:
            raise MedsiloError(f"--images-per-site: must be at least 10, got {self.images_per_site}")
        if self.seed < 0:
            raise MedsiloError(f"--seed: must be ≥ 0, got {self.seed}")
        classes = self.class_names()
        if self.multilabel and self.modality != "cxr":
            raise MedsiloError("--multilabel: only chest X-ray hospitals have multi-label findings")
        allowed = multilabel.ML_FINDINGS if self.multilabel else ALLOWED_CLASSES[self.modality]
        bad = [c for c in classes if c not in allowed]
        if bad or len(set(classes)) != len(classes) or len(classes) < 2:
            raise MedsiloError(
                f"--classes: {self.modality} classes must be 2+ distinct names from {', '.join(allowed)}, "
                f"got {','.join(classes)}"
            )
        if "tumor" in classes and {"low-grade", "high-grade"} & set(classes):
            raise MedsiloError("--classes: pathology 'tumor' is what the grades split; give normal,tumor or "
                               f"grades such as normal,low-grade,high-grade, got {','.join(classes)}")  # fmt: skip
        names = self.site_names()
        for site, count in self.scarce.items():
            if site not in names:
                raise MedsiloError(f"--scarce: unknown site '{site}'; sites are {names[0]} … {names[-1]}")
            if count < len(classes):
                raise MedsiloError(
                    f"--scarce {site}={count}: needs at least one training image per class ({len(classes)})"
                )
        if self.dirichlet_alpha is not None and self.dirichlet_alpha <= 0:
            raise MedsiloError(f"--dirichlet-alpha: must be > 0, got {self.dirichlet_alpha}")
        if not 0 <= self.shift <= 2:
            raise MedsiloError(f"--shift: must be between 0 and 2, got {self.shift}")
        if abs(sum(self.split) - 1) > 1e-6 or min(self.split) <= 0:
            raise MedsiloError(f"split shares must be positive and sum to 1, got {self.split}")
        if not 32 <= self.patch_size <= 512:
            raise MedsiloError(f"--patch-size: must be between 32 and 512, got {self.patch_size}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-plain form used to recognise an identical earlier run."""
        d = asdict(self)
        d["classes"] = list(self.class_names())
        d["split"] = list(self.split)
        return d


@dataclass(frozen=True)
class _ImageJob:
    """Everything one worker needs to render and write one image (picklable)."""

    out: str
    modality: str
    seed: tuple[int, ...]
    label: str
    profile: Any
    patient: Any
    pseudonym: str
    institution: str
    study_date: str
    instance: int
    patch_size: int


def _render(job: _ImageJob) -> None:
    rng = np.random.default_rng(job.seed)
    if job.modality == "cxr":
        density = cxr.render_density(job.patient, rng)
        stored = cxr.acquire(density, job.profile, rng)
        cxr.write_cxr_dicom(
            job.out,
            stored,
            job.profile,
            patient_pseudonym=job.pseudonym,
            uid_seed="/".join(map(str, job.seed)),
            study_date=job.study_date,
            institution=job.institution,
            instance_number=job.instance,
        )
    else:
        atypia = float(np.clip(job.patient + rng.normal(0, 0.05), 0, 1))
        pathology.write_png(job.out, pathology.stain_patch(atypia, job.profile, rng, job.patch_size))


def _class_counts(n: int, k: int, alpha: float | None, rng: np.random.Generator) -> np.ndarray:
    """Images per class at one site: balanced, or Dirichlet(α)-skewed with at least 3 per class."""
    if alpha is None:
        counts = np.full(k, n // k)
        counts[: n - counts.sum()] += 1
        return counts
    floor = min(3, n // k)
    p = rng.dirichlet(np.full(k, alpha))
    counts = np.floor(p * (n - floor * k)).astype(int) + floor
    counts[np.argmax(p)] += n - counts.sum()
    return counts


def _patients(n_images: int, mean_extra: float, rng: np.random.Generator) -> list[int]:
    """Split ``n_images`` into patients with 1 + Poisson(mean_extra) images each."""
    sizes: list[int] = []
    while sum(sizes) < n_images:
        sizes.append(min(1 + int(rng.poisson(mean_extra)), n_images - sum(sizes)))
    return sizes


def _assign_splits(sizes: list[int], shares: dict[str, float], rng: np.random.Generator) -> list[str]:
    """Give each patient a split so image shares come close to ``shares``; no split left empty if avoidable."""
    names = list(shares)
    order = rng.permutation(len(sizes))
    edges = np.cumsum([shares[s] for s in names])[:-1] / sum(shares.values()) * sum(sizes)
    out = [""] * len(sizes)
    done = 0
    for p in order:
        out[p] = names[int(np.searchsorted(edges, done + sizes[p] / 2, side="right"))]
        done += sizes[p]
    if len(sizes) >= len(names):
        for s in names:
            if s not in out:
                donor = max(names, key=out.count)
                out[next(p for p in reversed(order) if out[p] == donor)] = s
    return out


def _plan_site(req: SynthRequest, index: int, name: str, out: Path) -> tuple[list[_ImageJob], list[dict[str, str]], dict]:
    """Image jobs, manifest rows and the profile description of one site."""
    if req.multilabel:
        return _plan_multilabel_site(req, index, name, out)
    classes = req.class_names()
    site_rng = np.random.default_rng([req.seed, index, 0])
    if req.modality == "cxr":
        profile: Any = cxr.make_scanner(index, site_rng).scaled(req.shift)
        ext, mean_extra = "dcm", 0.4
    else:
        profile = pathology.make_stain_site(index, site_rng).scaled(req.shift)
        ext, mean_extra = "png", 2.0

    n = req.images_per_site
    counts = _class_counts(n, len(classes), req.dirichlet_alpha, site_rng)
    scarce_train = req.scarce.get(name)
    code = f"H{index + 1}"
    jobs: list[_ImageJob] = []
    rows: list[dict[str, str]] = []
    patient_no = 0
    for k, label in enumerate(classes):
        if scarce_train is None:
            sizes = _patients(int(counts[k]), mean_extra, site_rng)
            splits = _assign_splits(sizes, dict(zip(SPLITS, req.split)), site_rng)
        else:
            # a scarce site: few training images, normal-size val/test so it can still be measured
            n_train = max(1, int(round(scarce_train * counts[k] / n)))
            n_eval = int(counts[k]) - int(round(counts[k] * req.split[0]))
            train_sizes = _patients(n_train, mean_extra, site_rng)
            eval_sizes = _patients(n_eval, mean_extra, site_rng)
            sizes = train_sizes + eval_sizes
            splits = ["train"] * len(train_sizes) + _assign_splits(
                eval_sizes, {"val": req.split[1], "test": req.split[2]}, site_rng
            )
        for size, split in zip(sizes, splits):
            patient_rng = np.random.default_rng([req.seed, index, 1, patient_no])
            if req.modality == "cxr":
                patient: Any = cxr.sample_patient(patient_rng, label)
            else:
                patient = pathology.sample_atypia(patient_rng, label)
            pseudonym = f"{code}-P{patient_no:05d}"
            study = date(2020, 1, 1) + timedelta(days=int(patient_rng.integers(0, 1500)))
            for j in range(size):
                image_no = len(jobs)
                rel = f"images/{image_no:06d}.{ext}"
                jobs.append(
                    _ImageJob(
                        out=str(out / name / rel),
                        modality=req.modality,
                        seed=(req.seed, index, 2, image_no),
                        label=label,
                        profile=profile,
                        patient=patient,
                        pseudonym=pseudonym,
                        institution=f"Synthetic Hospital {index + 1}",
                        study_date=(study + timedelta(days=30 * j)).strftime("%Y%m%d"),
                        instance=j + 1,
                        patch_size=req.patch_size,
                    )
                )
                rows.append({"path": rel, "label": label, "patient_id": pseudonym, "split": split})
            patient_no += 1
    return jobs, rows, {"profile": asdict(profile), "class_counts": dict(zip(classes, map(int, counts)))}


def _plan_multilabel_site(req: SynthRequest, index: int, name: str,
                          out: Path) -> tuple[list[_ImageJob], list[dict[str, str]], dict]:  # fmt: skip
    """:func:`_plan_site` for a multi-label request: patients with co-occurring findings (:mod:`.multilabel`)."""
    labels = req.class_names()
    site_rng = np.random.default_rng([req.seed, index, 0])
    profile = cxr.make_scanner(index, site_rng).scaled(req.shift)
    factors = multilabel.site_factors(site_rng, req.dirichlet_alpha)
    sizes = _patients(req.images_per_site, 0.4, site_rng)
    splits = _assign_splits(sizes, dict(zip(SPLITS, req.split)), site_rng)
    if req.scarce.get(name) is not None:  # few training images, full-size val/test
        budget, kept = req.scarce[name], []
        for size, split in zip(sizes, splits):
            if split != "train" or budget > 0:
                kept.append((min(size, budget) if split == "train" else size, split))
                budget -= kept[-1][0] if split == "train" else 0
        sizes, splits = [k[0] for k in kept], [k[1] for k in kept]
    code = f"H{index + 1}"
    jobs: list[_ImageJob] = []
    rows: list[dict[str, str]] = []
    for patient_no, (size, split) in enumerate(zip(sizes, splits)):
        patient_rng = np.random.default_rng([req.seed, index, 1, patient_no])
        findings = multilabel.draw_findings(patient_rng, factors)
        patient = multilabel.sample_patient(patient_rng, findings)
        pseudonym = f"{code}-P{patient_no:05d}"
        study = date(2020, 1, 1) + timedelta(days=int(patient_rng.integers(0, 1500)))
        for j in range(size):
            image_no = len(jobs)
            rel = f"images/{image_no:06d}.dcm"
            jobs.append(_ImageJob(out=str(out / name / rel), modality="cxr", seed=(req.seed, index, 2, image_no),
                                  label="+".join(sorted(findings)) or "normal", profile=profile, patient=patient,
                                  pseudonym=pseudonym, institution=f"Synthetic Hospital {index + 1}",
                                  study_date=(study + timedelta(days=30 * j)).strftime("%Y%m%d"), instance=j + 1,
                                  patch_size=req.patch_size))  # fmt: skip
            cells = multilabel.label_cells(findings, labels, split, patient_rng)
            rows.append({"path": rel, "patient_id": pseudonym, "split": split, **cells})
    prevalence = {label: round(sum(r[label] == "1" for r in rows) / max(len(rows), 1), 3) for label in labels}
    return jobs, rows, {"profile": asdict(profile), "prevalence": prevalence, "prevalence_factors": list(factors),
                        "split_images": {s: sum(r["split"] == s for r in rows) for s in SPLITS}}  # fmt: skip


def generator_fingerprint() -> str:
    """SHA-256 (first 16 hex digits) of the generator's source: a changed generator never reuses old images."""
    digest = hashlib.sha256()
    for module in (cxr, multilabel, pathology, sys.modules[__name__]):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def _cached(out: Path, req: SynthRequest) -> bool:
    marker = out / "synth.json"
    if not (marker.is_file() and (out / "sites.yml").is_file()):
        return False
    try:
        previous = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return previous.get("request") == req.to_json() and previous.get("generator") == generator_fingerprint()


def synthesize(
    out: str | Path,
    req: SynthRequest,
    *,
    workers: int | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Create synthetic hospitals under ``out``; returns the path of ``sites.yml``.

    Args:
        out: output folder. Reused as-is when it already holds the same request.
        req: what to make.
        workers: processes used to render (default: up to 2). The result does not depend on it.
        progress: show a progress bar on stderr.
        force: replace an existing, different synthetic dataset in ``out``.

    Raises:
        MedsiloError: a bad request, or ``out`` holds something else (never overwritten unasked;
            folders that medsilo did not create are never deleted).
    """
    req.check()
    out = Path(out)
    if _cached(out, req):
        return out / "sites.yml"
    if out.exists() and any(out.iterdir()):
        if not (out / "synth.json").is_file():
            raise MedsiloError(f"{out}: folder is not empty and was not made by 'medsilo synth'; choose another --out")
        if not force:
            raise MedsiloError(
                f"{out}: holds a different synthetic dataset; pass --force to replace it or choose another --out"
            )

    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    all_jobs: list[_ImageJob] = []
    sites_yml: dict[str, dict[str, str]] = {}
    summary: dict[str, Any] = {}
    for index, name in enumerate(req.site_names()):
        (tmp / name / "images").mkdir(parents=True)
        jobs, rows, info = _plan_site(req, index, name, tmp)
        write_manifest(tmp / name / "manifest.csv", rows, labels=req.class_names() if req.multilabel else ())
        all_jobs.extend(jobs)
        sites_yml[name] = {"dataset": req.modality, "manifest": f"{name}/manifest.csv", "modality": req.modality}
        split_counts = {s: {c: 0 for c in req.class_names()} for s in SPLITS}
        for r in rows:  # multi-label: images with the finding present
            for c in [c for c in req.class_names() if r.get(c) == "1"] if req.multilabel else [r["label"]]:
                split_counts[r["split"]][c] += 1
        summary[name] = {**info, "images": len(rows), "split_counts": split_counts}

    try:
        _render_all(all_jobs, workers, progress, req.modality)
        publish(tmp, out, "synth.json", {"generator": generator_fingerprint(), "request": req.to_json(),
                                         "sites": summary}, sites_yml)  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "sites.yml"


def publish(tmp: Path, out: Path, marker: str, facts: dict[str, Any], sites: dict[str, dict[str, str]]) -> None:
    """Finish a sites folder written in ``tmp`` and put it in place of ``out``: the ``marker`` JSON (what was
    asked for, per-site counts), then ``sites.yml`` — last, its presence marks a complete dataset — then the
    rename. A reader never sees half a folder."""
    (tmp / marker).write_text(json.dumps(facts, indent=2) + "\n")
    (tmp / "sites.yml").write_text(yaml.safe_dump({"sites": sites}, sort_keys=False))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _render_all(jobs: list[_ImageJob], workers: int | None, progress: bool, modality: str) -> None:
    workers = max(1, min(workers or 2, os.cpu_count() or 1))
    bar = tqdm(total=len(jobs), desc=f"synth {modality}", unit="img", disable=not progress, leave=False)
    try:
        if workers == 1:
            for job in jobs:
                _render(job)
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(_render, jobs, chunksize=16):
                    bar.update()
    finally:
        bar.close()
