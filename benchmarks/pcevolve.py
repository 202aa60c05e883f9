"""Does PCEvolve help a scarce hospital? Accuracy with and without DP synthetic images.

Synthetic CXR hospitals where ``hospital-4`` keeps only ``--scarce`` training images (val/test as
usual). The zoo's small CNN is trained from scratch on that site's train split alone, five ways:

* ``none`` — its few private images only;
* ``unselected`` — plus the same number of synthetic images drawn by the procedural generator with no
  selection at all (what PCEvolve must beat);
* ``pcevolve ε=…`` — plus PCEvolve's synthetic images at each ε (and ``ε = ∞``: the best candidate is
  taken each iteration, no privacy).

Each variant is trained with several training seeds; the table gives the mean test accuracy at the
scarce site (its own real test split) and the spread. PCEvolve runs once per ε with the benchmark seed;
its selections use fresh OS randomness, so reruns differ.

Then the same hospitals run a federated job (``--federated``, FedAvg by default, ``--rounds``) without
and with ``augmentation.pcevolve`` at the scarce site (ε = ``--federated-epsilon``), through the
NVFlare simulator: the scarce site's and the other sites' test accuracy.

Run::

    python -m benchmarks.pcevolve            # ~7 min on 2 cores
    python -m benchmarks.pcevolve --epsilons 8 --train-seeds 2

It prints a Markdown table and writes ``benchmarks/results/pcevolve_cxr_seed<SEED>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import numpy as np
import torch

from benchmarks.runner import RESULTS, WORK
from medsilo.components.training import classification_metrics, local_epochs, predict
from medsilo.config.manifest import read_manifest
from medsilo.config.site import load_sites_file
from medsilo.medical.data import ImageSet, load_site_data
from medsilo.medical.models import build_model
from medsilo.medical.synth import SynthRequest, synthesize
from medsilo.medical.synth.pcevolve.evolve import PCEvolveConfig, evolve, selectivity
from medsilo.medical.synth.pcevolve.generators import procedural

SITE = "hospital-4"


def train_and_test(images: torch.Tensor, labels: torch.Tensor, test: ImageSet, args, seed: int) -> float:
    """Test accuracy of the zoo cnn trained from scratch on ``images``/``labels``."""
    model = build_model("cnn", in_channels=images.shape[1], num_classes=2, feature_dim=64, seed=seed)
    data = ImageSet(images, labels)
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    local_epochs(model, loader, opt, epochs=args.epochs)
    test_loader = torch.utils.data.DataLoader(test, batch_size=64)
    return classification_metrics(*predict(model, test_loader))["acc"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 4.0, 8.0, math.inf])
    parser.add_argument("--scarce", type=int, default=10, help="training images left at the scarce site")
    parser.add_argument("--images-per-site", type=int, default=300)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=64)
    parser.add_argument("--encoder", choices=["random-cnn", "pixels"], default="random-cnn")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train-seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--federated", default="fedavg", help="algorithm of the federated part ('' skips it)")
    parser.add_argument("--federated-epsilon", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    req = SynthRequest("cxr", 4, args.images_per_site, seed=args.seed, scarce={SITE: args.scarce})
    sites_yml = synthesize(WORK / f"pcevolve_cxr_{args.images_per_site}_scarce{args.scarce}_seed{args.seed}", req,
                           force=False)  # fmt: skip
    entry = load_sites_file(sites_yml).sites[SITE]
    manifest = read_manifest(entry.manifest)
    classes = list(manifest.classes)
    data = load_site_data(manifest, modality="cxr", image_size=args.image_size)
    private_x, private_y = data.train.images, data.train.labels
    print(f"{SITE}: {len(private_y)} private training images ({torch.bincount(private_y).tolist()} per class), "
          f"{len(data.test)} test images", flush=True)  # fmt: skip
    generator = procedural("cxr", classes, args.image_size)
    n_syn = args.per_class * len(classes)

    variants: dict[str, tuple[torch.Tensor, torch.Tensor]] = {"none": (private_x, private_y)}
    rng = np.random.default_rng(args.seed + 1)
    unselected = [c for label in range(len(classes)) for c in generator.random(label, args.per_class, rng)]
    variants["unselected"] = _with(private_x, private_y, unselected)
    picks_info = {}
    for eps in args.epsilons:
        config = PCEvolveConfig(epsilon=eps, iterations=args.iterations, per_class=args.per_class,
                                encoder=args.encoder, seed=args.seed)  # fmt: skip
        result = evolve(private_x, private_y, classes, generator, config, charge=lambda event, it: None)
        label = f"pcevolve ε={eps:g}" if math.isfinite(eps) else "pcevolve ε=∞"
        variants[label] = _with(private_x, private_y, result.synthetic)
        per_pick = config.epsilon_per_pick(len(classes))
        picks_info[label] = {"epsilon_per_pick": per_pick, "selectivity": selectivity(per_pick),
                             "passing_filter": result.passing}  # fmt: skip

    rows = []
    for label, (x, y) in variants.items():
        accs = [train_and_test(x, y, data.test, args, seed) for seed in range(args.train_seeds)]
        row = {"variant": label, "train_images": len(y), "synthetic": len(y) - len(private_y),
               "mean_acc": statistics.fmean(accs), "stdev": statistics.pstdev(accs), "accs": accs,
               **picks_info.get(label, {})}  # fmt: skip
        rows.append(row)
        print(f"{label}: {row['mean_acc']:.3f} ± {row['stdev']:.3f}", flush=True)
    settings = {k: (v if not isinstance(v, float) or math.isfinite(v) else "inf") for k, v in vars(args).items()
                if k not in ("out", "epsilons")} | {"epsilons": [e if math.isfinite(e) else "inf" for e in args.epsilons],
                                                     "synthetic_images": n_syn}  # fmt: skip
    result = {"benchmark": f"pcevolve_cxr_seed{args.seed}", "settings": settings, "synthetic_data": req.to_json(),
              "rows": rows, "federated": federated(args, sites_yml, classes) if args.federated else []}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"pcevolve_cxr_seed{args.seed}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(table(result))
    return result


def federated(args, sites_yml: Path, classes: list[str]) -> list[dict]:
    """The same hospitals in a federated job, without and with PCEvolve at the scarce site."""
    from benchmarks.runner import run_variants
    from medsilo.config.site import load_sites_file

    sites = list(load_sites_file(sites_yml).sites)
    base = dict(modality="cxr", classes=classes, dataset="cxr", image_size=args.image_size, model="cnn",
                seed=args.seed, algorithm={"name": args.federated},
                training={"rounds": args.rounds, "local_epochs": 1, "batch_size": 16, "lr": 0.01, "optimizer": "sgd",
                          "momentum": 0.9})  # fmt: skip
    aug = {"pcevolve": {"sites": [SITE], "epsilon": args.federated_epsilon, "images_per_class": args.per_class,
                        "iterations": args.iterations}}  # fmt: skip
    variants = {f"{args.federated}": {}, f"{args.federated} + pcevolve ε={args.federated_epsilon:g}": {"augmentation": aug}}
    runs = run_variants(variants, base, sites_yml, WORK / "pcevolve_runs")
    rows = []
    for run in runs:
        per_site = run["final"]["per_site"]
        rows.append({"variant": run["label"], "scarce_acc": per_site[SITE]["test_acc"],
                     "mean_acc": run["final"]["mean_acc"], "others_mean_acc": statistics.fmean(
                         per_site[s]["test_acc"] for s in sites if s != SITE), "synthetic": run.get("synthetic", {})})  # fmt: skip
    return rows


def _with(x: torch.Tensor, y: torch.Tensor, synthetic: list) -> tuple[torch.Tensor, torch.Tensor]:
    sx = torch.as_tensor(np.stack([c.image for c in synthetic]))
    sy = torch.tensor([c.label for c in synthetic], dtype=torch.int64)
    return torch.cat([x, sx]), torch.cat([y, sy])


def table(result: dict) -> str:
    """The accuracy table as Markdown."""
    lines = ["| training data | images | test acc (mean ± sd over training seeds) | ε per pick | selectivity |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["rows"]:
        per = r.get("epsilon_per_pick")
        per_s = "—" if per is None else ("∞" if not math.isfinite(per) else f"{per:.3g}")
        sel = r.get("selectivity")
        sel_s = "—" if sel is None else ("∞" if not math.isfinite(sel) else f"×{sel:.3g}")
        lines.append(f"| {r['variant']} | {r['train_images']} | {r['mean_acc']:.3f} ± {r['stdev']:.3f} | {per_s} | "
                     f"{sel_s} |")  # fmt: skip
    if result.get("federated"):
        lines += ["", f"| federated job | {SITE} test acc | other sites' mean | mean acc |", "|---|---:|---:|---:|"]
        lines += [f"| {r['variant']} | {r['scarce_acc']:.3f} | {r['others_mean_acc']:.3f} | {r['mean_acc']:.3f} |"
                  for r in result["federated"]]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
