"""Does the synthetic data teach what federated learning needs? The site × site accuracy matrix.

For each synthetic hospital, a small CNN is trained on that hospital's training split only and tested
on every hospital's test split. A useful federated benchmark shows high accuracy on the diagonal (the
task is learnable) and a clear drop off it (sites differ). Two more rows and columns help read it:

* ``pooled``: one model trained on all sites' training images together (what sharing data would give);
* ``AdaBN``: the source model with BatchNorm statistics re-estimated on the target site's unlabelled
  training images — how much of the shift is low-level intensity statistics (what FedBN-style
  personalisation exploits).

Run::

    python -m benchmarks.site_shift --modality cxr
    python -m benchmarks.site_shift --modality pathology

It prints Markdown tables and writes ``benchmarks/results/site_shift_<modality>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

from medsilo.components.training import (
    classification_metrics,
    local_epochs,
    predict,
    recalibrate_batchnorm,
)
from medsilo.config import load_sites_file, read_manifest
from medsilo.medical.data import ImageSet, channels_of, load_site_data
from medsilo.medical.models import build_model
from medsilo.medical.synth import SynthRequest, synthesize

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(__file__).resolve().parent / "work"


def _loader(data: ImageSet, batch: int, shuffle: bool, seed: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(data, batch_size=batch, shuffle=shuffle, generator=g, drop_last=shuffle)


def _train(train: ImageSet, args: argparse.Namespace, channels: int, k: int, seed: int) -> torch.nn.Module:
    model = build_model("cnn", in_channels=channels, num_classes=k, feature_dim=64, seed=seed)
    loader = _loader(train, args.batch_size, True, seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * len(loader))
    local_epochs(model, loader, opt, epochs=args.epochs, scheduler=sched)
    return model


def _acc(model: torch.nn.Module, test: ImageSet, batch: int) -> float:
    return classification_metrics(*predict(model, _loader(test, batch, False, 0)))["acc"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modality", choices=["cxr", "pathology"], default="cxr")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--images-per-site", type=int, default=1000)
    parser.add_argument("--shift", type=float, default=1.0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    req = SynthRequest(args.modality, args.sites, args.images_per_site, seed=args.seed, shift=args.shift)
    data_dir = WORK / f"site_shift_{args.modality}_{args.sites}x{args.images_per_site}_s{args.seed}_shift{args.shift:g}"
    sites_file = load_sites_file(synthesize(data_dir, req, force=True))
    t_synth = time.perf_counter() - t0
    classes = list(req.class_names())
    names = list(sites_file.sites)
    data = {
        n: load_site_data(read_manifest(e.manifest, classes), modality=e.modality, image_size=args.image_size, seed=args.seed)
        for n, e in sites_file.sites.items()
    }
    channels = channels_of(args.modality)

    t1 = time.perf_counter()
    plain: dict[str, dict[str, float]] = {}
    adabn: dict[str, dict[str, float]] = {}
    for i, src in enumerate(names):
        model = _train(data[src].train, args, channels, len(classes), args.seed + i)
        plain[src] = {dst: _acc(model, data[dst].test, 256) for dst in names}
        adabn[src] = {}
        for dst in names:
            adapted = copy.deepcopy(model)
            unlabelled = ImageSet(data[dst].train.images, data[dst].train.labels)  # no augmentation
            recalibrate_batchnorm(adapted, _loader(unlabelled, args.batch_size, False, 0))
            adabn[src][dst] = _acc(adapted, data[dst].test, 256)
        print(f"trained on {src}: " + ", ".join(f"{d} {plain[src][d]:.3f}" for d in names), flush=True)
    pooled_train = ImageSet(
        torch.cat([data[n].train.images for n in names]),
        torch.cat([data[n].train.labels for n in names]),
        data[names[0]].train.augment,
    )
    pooled_model = _train(pooled_train, args, channels, len(classes), args.seed + 100)
    pooled = {dst: _acc(pooled_model, data[dst].test, 256) for dst in names}
    t_train = time.perf_counter() - t1

    result = {
        "benchmark": "site_shift",
        "command": "python -m benchmarks.site_shift " + " ".join(sys.argv[1:] if argv is None else argv),
        "modality": args.modality,
        "classes": classes,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "train_images_per_site": {n: len(data[n].train) for n in names},
        "test_images_per_site": {n: len(data[n].test) for n in names},
        "accuracy": plain,
        "accuracy_adabn": adabn,
        "accuracy_pooled": pooled,
        "seconds": {"synthesize": round(t_synth, 1), "train_and_test": round(t_train, 1)},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"site_shift_{args.modality}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    """The accuracy matrices as Markdown (train site ↓, test site →)."""
    names = list(result["accuracy"])
    head = "| train ↓ / test → | " + " | ".join(names) + " | | AdaBN: " + " | ".join(names) + " |"
    rule = "|---|" + "---:|" * len(names) + "---|" + "---:|" * len(names)
    lines = [head, rule]
    for src in names:
        cells = [f"**{result['accuracy'][src][d]:.3f}**" if d == src else f"{result['accuracy'][src][d]:.3f}" for d in names]
        ada = [f"{result['accuracy_adabn'][src][d]:.3f}" for d in names]
        lines.append(f"| {src} | " + " | ".join(cells) + " | | " + " | ".join(ada) + " |")
    lines.append("| pooled (all sites) | " + " | ".join(f"{result['accuracy_pooled'][d]:.3f}" for d in names) + " | |" + " |" * len(names))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
