"""``medsilo synth``: synthetic hospitals (images, manifests, ``sites.yml``) for demos, tests, benchmarks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _scarce(text: str) -> tuple[str, int]:
    site, sep, count = text.partition("=")
    if not sep or not site or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"expected SITE=COUNT with COUNT ≥ 1 (e.g. hospital-3=12), got '{text}'")
    return site, int(count)


def _classes(text: str) -> tuple[str, ...]:
    names = tuple(c.strip() for c in text.split(",") if c.strip())
    if len(names) < 2:
        raise argparse.ArgumentTypeError(f"expected 2+ comma-separated class names, got '{text}'")
    return names


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="make synthetic hospitals (DICOM chest X-rays or H&E patches)",
        description=(
            "Write N synthetic hospitals under --out: images, one manifest.csv per hospital with "
            "patient-level train/val/test splits, and sites.yml for 'medsilo sim'. Each hospital has its "
            "own scanner (chest X-ray) or stain (pathology) profile. Seeded: the same options give the "
            "same files. Re-running with the same options reuses the existing output."
        ),
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--modality", choices=["cxr", "pathology", "digits"], required=True,
                   help="digits: not synthetic — scikit-learn's 1,797 real handwritten digits dealt to the sites as "
                        "32x32 PNGs (modality 'image'), label-skewed by --dirichlet-alpha (default 0.5)")  # fmt: skip
    p.add_argument("--sites", type=int, default=4, help="number of hospitals (default 4)")
    p.add_argument("--images-per-site", type=int, default=200, help="images per hospital (default 200)")
    p.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    p.add_argument(
        "--scarce", type=_scarce, action="append", default=[], metavar="SITE=COUNT",
        help="give SITE only COUNT training images (val/test keep their size); repeatable",
    )  # fmt: skip
    p.add_argument("--classes", type=_classes, default=None, metavar="A,B[,...]",
                   help="cxr: normal,pneumonia[,effusion,nodule]; pathology: normal,tumor or the grades "
                        "normal,low-grade,high-grade; with --multilabel the labels, from pneumonia,effusion,nodule,cardiomegaly (default all four)")  # fmt: skip
    p.add_argument("--multilabel", action="store_true",
                   help="cxr: co-occurring findings per image, one manifest column per label (1/0, some training "
                        "cells blank = unknown) for 'task: multilabel' jobs; --dirichlet-alpha skews prevalences")  # fmt: skip
    p.add_argument("--dirichlet-alpha", type=float, default=None, metavar="ALPHA",
                   help="label skew across sites (smaller = more skewed); default: balanced")  # fmt: skip
    p.add_argument("--shift", type=float, default=1.0, help="site-shift strength, 0 (none) to 1 (default) or more")
    p.add_argument("--patch-size", type=int, default=96, help="pathology patch side in pixels (default 96)")
    p.add_argument("--workers", type=int, default=None, help="render processes (default: up to 2)")
    p.add_argument("--force", action="store_true", help="replace a different synthetic dataset in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medsilo.errors import MedsiloError
    from medsilo.medical.synth import SynthRequest, synthesize

    if args.modality == "digits":
        return _digits(args)

    scarce = dict(args.scarce)
    if len(scarce) != len(args.scarce):
        raise MedsiloError("--scarce: a site is named twice")
    req = SynthRequest(
        modality=args.modality,
        sites=args.sites,
        images_per_site=args.images_per_site,
        seed=args.seed,
        classes=args.classes,
        scarce=scarce,
        dirichlet_alpha=args.dirichlet_alpha,
        shift=args.shift,
        patch_size=args.patch_size,
        multilabel=args.multilabel,
    )
    sites_yml = synthesize(args.out, req, workers=args.workers, progress=not args.quiet, force=args.force)
    summary = json.loads((args.out / "synth.json").read_text())["sites"]
    classes = req.class_names()
    what = "prevalence" if req.multilabel else "class mix"
    print(f"{'site':<12} {'images':>6}  {'train':>5} {'val':>4} {'test':>4}  {what} ({'/'.join(classes)})")
    for site, info in summary.items():
        splits = info["split_counts"]
        n = info.get("split_images") or {s: sum(splits[s].values()) for s in splits}
        mix = "/".join(f"{info['prevalence'][c]:.2f}" if req.multilabel else str(info["class_counts"][c])
                       for c in classes)  # fmt: skip
        print(f"{site:<12} {info['images']:>6}  {n['train']:>5} {n['val']:>4} {n['test']:>4}  {mix}")
    print(f"wrote {sites_yml}")
    return 0


def _digits(args: argparse.Namespace) -> int:
    from medsilo.errors import MedsiloError
    from medsilo.medical.synth.digits import CLASSES, DigitsRequest, write_digit_sites

    if args.scarce or args.classes:
        raise MedsiloError("--scarce and --classes do not apply to --modality digits (ten classes, real images)")
    req = DigitsRequest(sites=args.sites, alpha=args.dirichlet_alpha or 0.5, seed=args.seed)
    sites_yml = write_digit_sites(args.out, req)
    summary = json.loads((args.out / "digits.json").read_text())["sites"]
    print(f"{'site':<8} {'train':>5} {'val':>4} {'test':>4}  images per class ({'/'.join(CLASSES)})")
    for site, splits in summary.items():
        n = {s: sum(splits[s].values()) for s in splits}
        mix = "/".join(str(sum(splits[s][c] for s in splits)) for c in CLASSES)
        print(f"{site:<8} {n['train']:>5} {n['val']:>4} {n['test']:>4}  {mix}")
    print(f"wrote {sites_yml}")
    return 0
