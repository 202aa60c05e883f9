"""``medsilo predict``: run a site's exported model (``models/<site>/``) on images listed in a manifest.

Images are read the way the job read them (the bundle's modality reader, with the same checks: identifying
DICOMs and unreadable files are reported and skipped), preprocessed as the bundle's metadata says, and
scored in batches by ``models/model.ts``. The output CSV has ``path,pred,score_<class>…`` and, when the
manifest has labels, ``label,correct``; a one-line accuracy/AUROC summary follows. On the site's own test
split it reproduces the test accuracy the job reported for that site.

A multi-label model (``task: multilabel``) writes ``path,prob_<label>…,pred_<label>…`` — each label's sigmoid
probability and 1/0 at the threshold the site chose on validation (the bundle's ``thresholds``) — and, when the
manifest has the label columns, ``true_<label>…`` (blank = unknown) and a per-label AUROC / macro-AUROC summary.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any


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
    p.add_argument("--ledger", type=Path, default=None, metavar="LEDGER",
                   help="the exporting site's privacy_ledger.jsonl: the model must be the one its verified "
                        "model_export entry records (a model file is code; check where it came from)")  # fmt: skip
    p.add_argument("--root-ca", type=Path, default=None, metavar="PEM",
                   help="the network's root CA (startup/rootCA.pem) the ledger's signatures are checked against")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def load_bundle(folder: Path, ledger: Path | None = None, root_ca: Path | None = None) -> tuple[dict, bytes]:
    """The ``medsilo`` section of a bundle's ``configs/metadata.json`` and the exact bytes of ``models/model.ts``,
    after checking them.

    A TorchScript file is code: loading and running it can do what any program of the user can. So the bytes
    that will be loaded are the bytes that were hashed, and with ``ledger`` (and the network's ``root_ca``) the
    model and metadata digests must be the ones a verified ``model_export`` entry of the exporting site
    recorded — without it, the model is only checked against its own metadata (which whoever can change the
    model can change too).

    Raises:
        MedsiloError: not an exported model folder, metadata out of its allowed ranges, a model file that
            differs from the recorded one, or (with ``ledger``) no verified export entry of these digests.
    """
    from medsilo.config.common import MODALITY_CHANNELS, SITE_NAME_PATTERN
    from medsilo.errors import MedsiloError

    meta_file, model_file = folder / "configs" / "metadata.json", folder / "models" / "model.ts"
    if not meta_file.is_file() or not model_file.is_file():
        raise MedsiloError(f"{folder}: not an exported model (expected configs/metadata.json and models/model.ts)")
    meta_bytes, model = meta_file.read_bytes(), model_file.read_bytes()
    try:
        meta = json.loads(meta_bytes)["medsilo"]
        ok = (meta["modality"] in MODALITY_CHANNELS and meta["channels"] in (1, 3)
              and isinstance(meta["image_size"], int) and 8 <= meta["image_size"] <= 512
              and isinstance(meta["classes"], list) and len(meta["classes"]) >= 2
              and all(isinstance(c, str) and re.fullmatch(CLASS_NAME, c) for c in meta["classes"])
              and re.fullmatch(SITE_NAME_PATTERN, str(meta["site"])) is not None
              and isinstance(meta["model_sha256"], str))  # fmt: skip
    except (ValueError, KeyError, TypeError) as exc:
        raise MedsiloError(f"{meta_file}: not medsilo model metadata ({type(exc).__name__}: {exc})") from None
    if not ok:
        raise MedsiloError(f"{meta_file}: modality, channels, image_size, classes or site out of their allowed values")
    if meta.get("task", "single") not in ("single", "multilabel"):
        raise MedsiloError(f"{meta_file}: task must be 'single' or 'multilabel', got {meta.get('task')!r}")
    if meta.get("task") == "multilabel":
        cut = meta.get("thresholds")
        if not (isinstance(cut, dict) and list(cut) == meta["classes"]
                and all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in cut.values())):  # fmt: skip
            raise MedsiloError(f"{meta_file}: a multi-label model needs thresholds: one number in [0, 1] per label")
    digest = hashlib.sha256(model).hexdigest()
    if digest != meta["model_sha256"]:
        raise MedsiloError(f"{model_file}: differs from the model the export recorded (SHA-256 in "
                           f"{meta_file}); re-export it or restore it from backup")  # fmt: skip
    if ledger is not None:
        from medsilo.secure.ledger import verified_entries

        meta_digest = hashlib.sha256(meta_bytes).hexdigest()
        entries = verified_entries(ledger, root_ca)
        if not any(e["event"] == "model_export" and e.get("party") == meta["site"] and
                   e["what"].get("model_sha256") == digest and e["what"].get("metadata_sha256") == meta_digest
                   for e in entries):  # fmt: skip
            raise MedsiloError(f"{folder}: no verified model_export entry of site {meta['site']} in {ledger} records "
                               "this model and metadata; it is not the model that site exported")  # fmt: skip
    return meta, model


CLASS_NAME = r"[A-Za-z0-9][A-Za-z0-9_ .-]{0,62}"
"""Class names as a job spec allows them (``medsilo.config.job.ClassName``)."""


def _rows(manifest: Path, classes: list[str], split: str | None,
          multilabel: bool = False) -> list[tuple[Path, str, Any]]:  # fmt: skip
    """(image path, path as written, label index, targets tuple (multi-label) or ``None``) of the manifest's rows
    in ``split``."""
    from medsilo.config.manifest import read_manifest

    with manifest.open(encoding="utf-8-sig", newline="") as fh:
        header = [h.strip().lower() for h in next(csv.reader(fh), [])]
    if multilabel and all(c.lower() in header for c in classes):
        rows = read_manifest(manifest, labels=classes).rows  # blanks stay unknown (NaN)
        base = manifest.resolve().parent
        return [(r.path, os.path.relpath(r.path, base), r.targets) for r in rows if split is None or r.split == split]
    if "label" in header and not multilabel:
        rows = read_manifest(manifest, classes).rows
        base = manifest.resolve().parent
        return [(r.path, os.path.relpath(r.path, base), r.label) for r in rows if split is None or r.split == split]
    from medsilo.config.manifest import image_path
    from medsilo.errors import MedsiloError

    if split is not None:
        what = f"the label columns ({', '.join(classes)})" if multilabel else "split and label columns"
        raise MedsiloError(f"{manifest}: --split needs a manifest with {what}")
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

    meta, model_bytes = load_bundle(args.model, args.ledger, args.root_ca)
    if args.ledger is None:
        print(f"note: {args.model} is checked against its own metadata only; a model file is code, so run "
              "models your site exported, or pass --ledger (and --root-ca) to check the site's signed record")
    classes = list(meta["classes"])
    multilabel = meta.get("task") == "multilabel"
    rows = _rows(args.manifest, classes, args.split, multilabel)
    if not rows:
        raise MedsiloError(f"{args.manifest}: no rows{f' in split {args.split}' if args.split else ''} to score")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated", category=DeprecationWarning)
        model = torch.jit.load(io.BytesIO(model_bytes), map_location=args.device).eval()  # the bytes hashed
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
    if multilabel:
        return _write_multilabel(args, meta, scored, skipped, labelled and bool(scored))
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


def _write_multilabel(args: argparse.Namespace, meta: dict, scored: list, skipped: list, labelled: bool) -> int:
    """Write a multi-label model's predictions (probabilities, thresholded labels, truth) and print its summary."""
    import numpy as np
    import torch

    from medsilo.components.training import multilabel_metrics
    from medsilo.fs import atomic_open

    labels = list(meta["classes"])
    cut = np.array([float(meta["thresholds"][c]) for c in labels])
    truth = lambda v: "" if np.isnan(v) else str(int(v))  # noqa: E731
    with atomic_open(args.out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", *[f"prob_{c}" for c in labels], *[f"pred_{c}" for c in labels],
                         *([f"true_{c}" for c in labels] if labelled else [])])  # fmt: skip
        for shown, targets, p in scored:
            writer.writerow([shown, *[f"{v:.6f}" for v in p], *[int(v) for v in p >= cut],
                             *([truth(v) for v in targets] if labelled else [])])  # fmt: skip
    for exc in skipped[:5]:
        print(f"skipped {exc.path}: {exc.reason}")
    summary = f"scored {len(scored)} image(s), skipped {len(skipped)}"
    if labelled:
        m = multilabel_metrics(torch.from_numpy(np.stack([p for _, _, p in scored])),
                               torch.tensor([list(t) for _, t, _ in scored], dtype=torch.float64), labels,
                               cut.tolist())  # fmt: skip
        show = lambda x: "n/a" if np.isnan(x) else f"{x:.4f}"  # noqa: E731
        per_label = ", ".join(f"{c} {show(m[f'auroc/{c}'])}" for c in labels)
        summary += f"; macro-AUROC {show(m['macro_auroc'])} (AUROC {per_label}), exact match {show(m['acc'])}"
    print(f"{summary}; wrote {args.out}")
    return 0
