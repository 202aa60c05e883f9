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
import io
import os
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

    from medsilo.components.export import load_bundle
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
