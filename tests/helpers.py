"""Small builders shared by tests: hand-made DICOM files with exactly the tags a test sets."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

from medsilo.components.toy import tiny_setup  # noqa: F401 - algorithm tests build their sites with it
from medsilo.medical.data import ImageSet


def write_dicom(
    path: str | Path,
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    voi_function: str | None = None,
    deidentified: bool = True,
    **tags: Any,
) -> Path:
    """Write a CR file holding ``stored`` (uint16, (rows, cols)) with only the tags given.

    ``deidentified`` sets Patient Identity Removed = YES and a pseudonym; extra ``tags`` (keyword=value)
    are set last, so a test can add identifying attributes.
    """
    path = Path(path)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    if deidentified:
        ds.PatientName = "ANON-1"
        ds.PatientID = "ANON-1"
        ds.PatientIdentityRemoved = "YES"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if slope is not None:
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept or 0:g}"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def aggregate(uploads):
    """Element-wise sum of uploads (what the server computes), as a plain dict."""
    keys = set().union(*(u.keys() for u in uploads))
    return {k: sum(u[k] for u in uploads if k in u) for k in keys}


def check_exported_models(results: dict, models_dir: Path, sites_yml: Path) -> dict[str, Path]:
    """Assert every site kept its model of the selected round (``models_dir/<site>/``), recorded in its ledger,
    and that ``medsilo predict`` on the site's test split gives exactly the ``test_acc`` results.json reports.
    Returns site → model folder."""
    import csv
    import hashlib

    import yaml

    from medsilo.cli import main
    from medsilo.secure.ledger import LEDGER_FILE, entries

    sites = yaml.safe_load(sites_yml.read_text())["sites"]
    folders = {}
    for site in results["sites"]:
        export = results["exports"][site]
        assert export["round"] == results["selected_round"], export
        folder = models_dir / site
        model = folder / "models" / "model.ts"
        assert hashlib.sha256(model.read_bytes()).hexdigest() == export["sha256"]
        assert {p.name for p in folder.rglob("*") if p.is_file()} == {
            "metadata.json", "inference.json", "model.ts", "model.pt", "README.md"}  # fmt: skip
        recorded = [e for e in entries(sites_yml.parent / "ledgers" / site / LEDGER_FILE)
                    if e["event"] == "model_export" and e["job"] == results["job_id"]]  # fmt: skip
        assert [e["what"]["model_sha256"] for e in recorded] == [export["sha256"]]
        out = models_dir.parent / f"predictions-{site}.csv"
        manifest = sites_yml.parent / sites[site]["manifest"]
        ledgers = sites_yml.parent / "ledgers"
        assert main(["predict", "--model", str(folder), "--manifest", str(manifest), "--split", "test",
                     "--out", str(out), "--ledger", str(ledgers / site / LEDGER_FILE),
                     "--root-ca", str(ledgers / "pki" / "rootCA.pem"), "--quiet"]) == 0  # fmt: skip
        with out.open() as fh:
            rows = list(csv.DictReader(fh))
        accuracy = sum(int(r["correct"]) for r in rows) / len(rows)
        assert accuracy == results["final"]["per_site"][site]["test_acc"], (site, accuracy)
        folders[site] = folder
    return folders


def multilabel_setup(site: str = "a", *, n: int = 12, labels: int = 3, seed: int = 0, **kwargs: Any):
    """:func:`tiny_setup` as a multi-label site (``task: multilabel``): K = ``labels`` outputs, targets ``(N, K)``
    where label k is present when the image's k-th quarter-row band is bright, and every 5th training entry is
    unknown (NaN)."""
    setup = tiny_setup(site, n=n, num_classes=labels, seed=seed, **kwargs)
    g = torch.Generator().manual_seed(seed + 1000)

    def relabel(split: ImageSet, unknown: bool) -> ImageSet:
        count = len(split)
        targets = (torch.rand(count, labels, generator=g) < 0.5).float()
        images = split.images.clone()
        for k in range(labels):
            images[:, :, 4 * k : 4 * k + 4, :] += 0.4 * targets[:, k].view(-1, 1, 1, 1)
        if unknown:
            targets.view(-1)[::5] = float("nan")
        return ImageSet(images.clamp(0, 1), targets, split.augment)

    data = dataclasses.replace(setup.data, train=relabel(setup.data.train, True), val=relabel(setup.data.val, False),
                               test=relabel(setup.data.test, False))  # fmt: skip
    return dataclasses.replace(setup, data=data, task="multilabel")
