"""``medsilo predict``: run a site's exported model (``models/<site>/``) on images listed in a manifest.

Images are read the way the job read them (the bundle's modality reader, with the same checks: identifying
DICOMs and unreadable files are reported and skipped), preprocessed as the bundle's metadata says, and
scored in batches by ``models/model.ts``. The output CSV has ``path,pred,score_<class>…`` and, when the
manifest has labels, ``label,correct``; a one-line accuracy/AUROC summary follows. On the site's own test
split it reproduces the test accuracy the job reported for that site.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import warnings
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="run a site's exported model on the images of a manifest",
        description=(
            "Score the images of MANIFEST (CSV path[,label,patient_id,split]) with the model a job exported at "
            "this site (its folder: RUN_DIR/models/<site>/ in simulation, <workspace>/models/<job id>/ when "
            "deployed) and write one row per image to --out."
        ),
    )
    p.add_argument("--model", type=Path, required=True, metavar="MODEL_DIR", help="the exported model folder")
    p.add_argument("--manifest", type=Path, required=True, metavar="CSV", help="images to score")
    p.add_argument("--split", choices=["train", "val", "test"], default=None, help="only rows of this split")
    p.add_argument("--out", type=Path, required=True, metavar="CSV", help="predictions file to write")
    p.add_argument("--device", default="cpu", help="torch device (default cpu; e.g. cuda)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--allow-identifiable", action="store_true",
                   help="score DICOMs whose identifying attributes are filled in (as data.allow_identifiable_dicom)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def load_bundle(folder: Path) -> dict:
    """The ``medsilo`` section of a bundle's ``configs/metadata.json``, after checking ``models/model.ts``
    is the file the export recorded (its SHA-256).

    Raises:
        MedsiloError: not an exported model folder, or a model file that differs from the recorded one.
    """
    from medsilo.errors import MedsiloError

    meta_file, model_file = folder / "configs" / "metadata.json", folder / "models" / "model.ts"
    if not meta_file.is_file() or not model_file.is_file():
        raise MedsiloError(f"{folder}: not an exported model (expected configs/metadata.json and models/model.ts)")
    try:
        meta = json.loads(meta_file.read_text())["medsilo"]
        fields = (meta["modality"], meta["classes"], meta["channels"], meta["image_size"], meta["model_sha256"])
    except (ValueError, KeyError, TypeError) as exc:
        raise MedsiloError(f"{meta_file}: not medsilo model metadata ({type(exc).__name__}: {exc})") from None
    if hashlib.sha256(model_file.read_bytes()).hexdigest() != fields[4]:
        raise MedsiloError(f"{model_file}: differs from the model the export recorded (SHA-256 in "
                           f"{meta_file}); re-export it or restore it from backup")  # fmt: skip
    return meta


def _rows(manifest: Path, classes: list[str], split: str | None) -> list[tuple[Path, str, int | None]]:
    """(image path, path as written, label index or ``None``) of the manifest's rows in ``split``."""
    from medsilo.config.manifest import read_manifest

    with manifest.open(encoding="utf-8-sig", newline="") as fh:
        header = [h.strip().lower() for h in next(csv.reader(fh), [])]
    if "label" in header:
        rows = read_manifest(manifest, classes).rows
        base = manifest.resolve().parent
        return [(r.path, os.path.relpath(r.path, base), r.label) for r in rows if split is None or r.split == split]
    from medsilo.config.manifest import image_path
    from medsilo.errors import MedsiloError

    if split is not None:
        raise MedsiloError(f"{manifest}: --split needs a manifest with split and label columns")
    base = manifest.resolve().parent
    with manifest.open(encoding="utf-8-sig", newline="") as fh:
        records = list(csv.DictReader(fh))
    return [(image_path(rec["path"].strip(), base, False, f"{manifest}: line {i}"), rec["path"].strip(), None)
            for i, rec in enumerate(records, start=2) if (rec.get("path") or "").strip()]  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from medsilo.components.training import classification_metrics
    from medsilo.errors import MedsiloError
    from medsilo.fs import atomic_open
    from medsilo.medical.data import UnreadableImage, reader_for
    from medsilo.medical.data.transforms import normalize, preprocess

    meta = load_bundle(args.model)
    classes = list(meta["classes"])
    rows = _rows(args.manifest, classes, args.split)
    if not rows:
        raise MedsiloError(f"{args.manifest}: no rows{f' in split {args.split}' if args.split else ''} to score")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated", category=DeprecationWarning)
        model = torch.jit.load(str(args.model / "models" / "model.ts"), map_location=args.device).eval()
    reader = reader_for(meta["modality"], allow_identifiable=args.allow_identifiable, channels=meta["channels"])
    resize = preprocess(int(meta["image_size"]))

    scored: list[tuple[str, int | None, np.ndarray]] = []
    skipped: list[UnreadableImage] = []
    batch: list[tuple[str, int | None, np.ndarray]] = []

    def flush() -> None:
        if not batch:
            return
        x = normalize(torch.from_numpy(np.stack([b[2] for b in batch]))).to(args.device)
        with torch.no_grad():
            probs = model(x).float().cpu().numpy()
        scored.extend((shown, label, p) for (shown, label, _), p in zip(batch, probs, strict=True))
        batch.clear()

    for path, shown, label in tqdm(rows, desc="predict", unit="img", disable=args.quiet, leave=False):
        try:
            batch.append((shown, label, np.asarray(resize(reader(path)), dtype=np.float32)))
        except UnreadableImage as exc:
            skipped.append(exc)
            continue
        if len(batch) == args.batch_size:
            flush()
    flush()

    labelled = all(label is not None for _, label, _ in scored)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(args.out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "pred", *[f"score_{c}" for c in classes], *(["label", "correct"] if labelled else [])])
        for shown, label, p in scored:
            pred = int(p.argmax())
            extra = [classes[label], int(pred == label)] if labelled else []
            writer.writerow([shown, classes[pred], *[f"{v:.6f}" for v in p], *extra])

    for exc in skipped[:5]:
        print(f"skipped {exc.path}: {exc.reason}")
    summary = f"scored {len(scored)} image(s), skipped {len(skipped)}"
    if labelled and scored:
        m = classification_metrics(torch.from_numpy(np.stack([p for _, _, p in scored])),
                                   torch.tensor([label for _, label, _ in scored]))  # fmt: skip
        correct = sum(int(p.argmax() == label) for _, label, p in scored)
        auroc = "n/a" if np.isnan(m["auroc"]) else f"{m['auroc']:.4f}"
        summary += f"; accuracy {m['acc']:.4f} ({correct}/{len(scored)}), AUROC {auroc}"
    print(f"{summary}; wrote {args.out}")
    return 0
