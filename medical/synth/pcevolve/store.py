"""Where PCEvolve's images go: files a site's pipeline reads, and a manifest that marks them."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from medsilo.config.manifest import Manifest, write_manifest
from medsilo.medical.synth.cxr import CXR_SCANNERS, write_cxr_dicom
from medsilo.medical.synth.pathology import write_png
from medsilo.medical.synth.pcevolve.generators import Candidate


def write_synthetic(folder: Path, manifest: Manifest, synthetic: list[Candidate], modality: str, site: str,
                    extra: dict[str, str] | None = None) -> None:  # fmt: skip
    """Write ``folder/images/`` and ``folder/manifest.csv``: the site's manifest rows (absolute paths) plus
    one ``train`` row per synthetic image with ``source`` = ``pcevolve``.

    Chest X-rays become 12-bit MONOCHROME2 CR DICOM (de-identified like every synthetic file, a
    ``PCE-<n>`` pseudonym), pathology patches PNG. ``extra`` adds text files (name → content).
    Everything is written into ``<folder>.partial`` and renamed at the end, so an interrupted run
    leaves no folder that looks complete; ``folder`` must not exist.
    """
    final, folder = Path(folder), Path(folder).with_name(Path(folder).name + ".partial")
    shutil.rmtree(folder, ignore_errors=True)
    try:
        _write(folder, manifest, synthetic, modality, site)
        for name, text in (extra or {}).items():
            (folder / name).write_text(text)
        folder.replace(final)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _write(folder: Path, manifest: Manifest, synthetic: list[Candidate], modality: str, site: str) -> None:
    (folder / "images").mkdir(parents=True)
    rows = [{"path": str(r.path), "label": manifest.classes[r.label], "patient_id": r.patient_id, "split": r.split,
             "source": r.source} for r in manifest.rows]  # fmt: skip
    for i, cand in enumerate(synthetic):
        if modality == "cxr":
            stored = np.rint(np.clip(cand.image[0], 0, 1) * (2**CXR_SCANNERS[0].bits_stored - 1)).astype(np.uint16)
            scanner = replace(CXR_SCANNERS[0], matrix=stored.shape[0])  # 12-bit MONOCHROME2, the image's size
            name = f"images/pcevolve-{i:05d}.dcm"
            write_cxr_dicom(folder / name, stored, scanner, patient_pseudonym=f"PCE-{i:05d}",
                            uid_seed=f"{site}/{name}", study_date="20260101", institution="medsilo PCEvolve")  # fmt: skip
        else:
            name = f"images/pcevolve-{i:05d}.png"
            write_png(folder / name, np.rint(cand.image.transpose(1, 2, 0) * 255).astype(np.uint8))
        rows.append({"path": name, "label": manifest.classes[cand.label], "patient_id": f"PCE-{i:05d}",
                     "split": "train", "source": "pcevolve"})  # fmt: skip
    write_manifest(folder / "manifest.csv", rows)
