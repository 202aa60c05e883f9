"""Does PCEvolve help a scarce hospital? ε × encoder × utility, over data seeds, with paired intervals.

Synthetic CXR hospitals (``--sites``, full scanner shift) where ``hospital-4`` keeps only ``--scarce``
training images; its validation and test splits are real and full size. Per data seed:

1. **Federated job first** (``--federated``, FedAvg, ``--rounds``; the real NVFlare simulator): its
   ``hospital-4`` model, exported at the end of the job, is the ``federated`` encoder — a non-private
   reference (ε = ∞ only): it was fitted on hospital-4's own images. The same run is the federated
   "without PCEvolve" row.
2. **Alone**: the zoo's small CNN trained from scratch on hospital-4's train split (Adam, ``--epochs``,
   ``--train-seeds`` training seeds averaged), with:

   * ``none`` — its few private images only;
   * ``unselected`` — plus the same number of procedural synthetic images drawn with no selection;
   * ``ε / encoder / utility`` — plus PCEvolve's images (``keep: val``: the kept iteration is chosen
     privately on the validation split at ε/4; ε = ∞ takes the best candidates and set).

3. **Federated with PCEvolve**: FedAvg and ``--pfl`` with ``augmentation.pcevolve`` at hospital-4
   (``--federated-epsilon``, the ``--federated-encoder``, vote utility) against the same jobs without it.

Every cell is a data seed's mean test accuracy at hospital-4; the tables give the mean over seeds with a 95 %
Student-t interval, and *paired* differences (same seed, same split) against ``none`` and ``unselected``.

Run::

    python -m benchmarks.pcevolve                       # 5 seeds, ~40 min on 2 cores
    python -m benchmarks.pcevolve --seeds 0 --epsilons 8 --encoders pretrained --utilities vote --no-federated

Writes ``benchmarks/results/pcevolve.json`` and prints the Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.digits import t_half_width
from benchmarks.runner import RESULTS, WORK, run_variants
from medsilo.components.export import bundle_encoder
from medsilo.components.training import classification_metrics, local_epochs, predict
from medsilo.config.manifest import read_manifest
from medsilo.config.site import load_sites_file
from medsilo.medical.data import ImageSet, load_site_data
from medsilo.medical.models import build_model
from medsilo.medical.synth import SynthRequest, synthesize
from medsilo.medical.synth.pcevolve.evolve import PCEvolveConfig, encoder, evolve
from medsilo.medical.synth.pcevolve.generators import procedural

SITE = "hospital-4"


def train_and_test(images: torch.Tensor, labels: torch.Tensor, test: ImageSet, args, seed: int) -> float:
    """Test accuracy of the zoo cnn trained from scratch on ``images``/``labels``."""
    model = build_model("cnn", in_channels=images.shape[1], num_classes=2, feature_dim=64, seed=seed)
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(ImageSet(images, labels), batch_size=args.batch_size, shuffle=True, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    local_epochs(model, loader, opt, epochs=args.epochs)
    return classification_metrics(*predict(model, torch.utils.data.DataLoader(test, batch_size=128)))["acc"]


def label_of(eps: float, enc: str, utility: str) -> str:
    return f"ε={'∞' if not math.isfinite(eps) else f'{eps:g}'} / {enc} / {utility}"


def one_seed(args, seed: int) -> dict:
    """Every variant of one data seed (module docstring)."""
    req = SynthRequest("cxr", args.sites, args.images_per_site, seed=seed, scarce={SITE: args.scarce})
    sites_yml = synthesize(WORK / f"pcevolve_cxr_{args.sites}x{args.images_per_site}_scarce{args.scarce}_seed{seed}",
                           req, force=False)  # fmt: skip
    manifest = read_manifest(load_sites_file(sites_yml).sites[SITE].manifest)
    classes = list(manifest.classes)
    data = load_site_data(manifest, modality="cxr", image_size=args.image_size)
    x, y = data.train.images, data.train.labels
    print(f"seed {seed}: {SITE} has {len(y)} training images ({torch.bincount(y).tolist()}), {len(data.val)} val, "
          f"{len(data.test)} test", flush=True)  # fmt: skip
    fed_runs = federated(args, sites_yml, classes, seed) if args.federated else []
    embeds = {}
    for enc in args.encoders:
        if enc == "federated":
            run_dir = WORK / "pcevolve_runs" / f"seed{seed}" / args.federated
            embeds[enc] = bundle_encoder(run_dir / "models" / SITE, x.shape[1], None)[0]
        else:
            embeds[enc] = encoder(enc, x.shape[1], seed)
    generator = procedural("cxr", classes, args.image_size)
    rng = np.random.default_rng(seed + 1)
    unselected = [c for label in range(len(classes)) for c in generator.random(label, args.per_class, rng)]
    variants = {"none": ((x, y), {}), "unselected": (_with(x, y, unselected), {})}
    for eps in args.epsilons:
        for enc in args.encoders:
            if enc == "federated" and math.isfinite(eps):
                continue  # fitted on the site's images: a non-private reference only (PCEvolveConfig refuses it)
            for utility in args.utilities:
                config = PCEvolveConfig(epsilon=eps, iterations=args.iterations, candidates=args.candidates,
                                        per_class=args.per_class, picks=args.picks, utility=utility, keep="val",
                                        keep_epsilon=eps / 4 if math.isfinite(eps) else 1.0, encoder=enc, seed=seed)  # fmt: skip
                t0 = time.perf_counter()
                result = evolve(x, y, classes, generator, config, charge=lambda event, it: None, embed=embeds[enc],
                                val_images=data.val.images, val_labels=data.val.labels)  # fmt: skip
                variants[label_of(eps, enc, utility)] = (_with(x, y, result.synthetic), {
                    "epsilon_per_pick": config.epsilon_per_pick(len(classes)), "kept_iteration": result.kept_iteration,
                    "diversity": result.diversity, "voters": result.voters, "seconds": time.perf_counter() - t0})  # fmt: skip
    rows = {}
    for label, ((vx, vy), info) in variants.items():
        accs = [train_and_test(vx, vy, data.test, args, s) for s in range(args.train_seeds)]
        rows[label] = {"acc": statistics.fmean(accs), "accs": accs, **info}
        print(f"  {label}: {rows[label]['acc']:.3f}", flush=True)
    return {"seed": seed, "rows": rows, "federated": fed_runs}


def federated(args, sites_yml: Path, classes: list[str], seed: int) -> list[dict]:
    """FedAvg and ``--pfl`` without and with PCEvolve at the scarce site (real simulator)."""
    base = dict(modality="cxr", classes=classes, dataset="cxr", image_size=args.image_size, model="cnn", seed=seed,
                training={"rounds": args.rounds, "local_epochs": 1, "batch_size": 16, "lr": 0.01, "optimizer": "sgd",
                          "momentum": 0.9})  # fmt: skip
    aug = {"pcevolve": {"sites": [SITE], "epsilon": args.federated_epsilon, "images_per_class": args.per_class,
                        "iterations": args.iterations, "candidates": args.candidates, "picks": args.picks,
                        "encoder": args.federated_encoder}}  # fmt: skip
    variants = {}
    for algo in [args.federated, *args.pfl]:
        variants[algo] = {"algorithm": {"name": algo}}
        variants[f"{algo} + pcevolve"] = {"algorithm": {"name": algo}, "augmentation": aug}
    runs = run_variants(variants, base, sites_yml, WORK / "pcevolve_runs" / f"seed{seed}")
    sites = list(load_sites_file(sites_yml).sites)
    return [{"variant": run["label"], "scarce_acc": run["final"]["per_site"][SITE]["test_acc"],
             "others_acc": statistics.fmean(run["final"]["per_site"][s]["test_acc"] for s in sites if s != SITE)}
            for run in runs]  # fmt: skip


def _with(x: torch.Tensor, y: torch.Tensor, synthetic: list) -> tuple[torch.Tensor, torch.Tensor]:
    sx = torch.as_tensor(np.stack([c.image for c in synthetic]))
    sy = torch.tensor([c.label for c in synthetic], dtype=torch.int64)
    return torch.cat([x, sx]), torch.cat([y, sy])


def summarise(seeds: list[dict]) -> dict:
    """Mean ± t-interval over seeds per variant, and paired differences against ``none`` and ``unselected``."""
    labels = list(seeds[0]["rows"])
    out = {}
    for label in labels:
        accs = [s["rows"][label]["acc"] for s in seeds]
        d_none = [s["rows"][label]["acc"] - s["rows"]["none"]["acc"] for s in seeds]
        d_uns = [s["rows"][label]["acc"] - s["rows"]["unselected"]["acc"] for s in seeds]
        div = [s["rows"][label].get("diversity") for s in seeds]
        out[label] = {"mean": statistics.fmean(accs), "ci": t_half_width(accs),
                      "vs_none": statistics.fmean(d_none), "vs_none_ci": t_half_width(d_none),
                      "vs_unselected": statistics.fmean(d_uns), "vs_unselected_ci": t_half_width(d_uns),
                      "diversity": statistics.fmean(div) if None not in div else None}  # fmt: skip
    fed = {}
    if seeds[0]["federated"]:
        for i, row in enumerate(seeds[0]["federated"]):
            scarce = [s["federated"][i]["scarce_acc"] for s in seeds]
            others = [s["federated"][i]["others_acc"] for s in seeds]
            fed[row["variant"]] = {"scarce": statistics.fmean(scarce), "scarce_ci": t_half_width(scarce),
                                   "others": statistics.fmean(others), "others_ci": t_half_width(others)}  # fmt: skip
        for name in list(fed):
            if name.endswith(" + pcevolve"):
                base = name.removesuffix(" + pcevolve")
                i, j = [r["variant"] for r in seeds[0]["federated"]].index(base), \
                    [r["variant"] for r in seeds[0]["federated"]].index(name)  # fmt: skip
                gain = [s["federated"][j]["scarce_acc"] - s["federated"][i]["scarce_acc"] for s in seeds]
                loss = [s["federated"][j]["others_acc"] - s["federated"][i]["others_acc"] for s in seeds]
                fed[name] |= {"scarce_gain": statistics.fmean(gain), "scarce_gain_ci": t_half_width(gain),
                              "others_change": statistics.fmean(loss), "others_change_ci": t_half_width(loss)}  # fmt: skip
    return {"alone": out, "federated": fed}


def table(summary: dict, n: int) -> str:
    """The tables as Markdown."""
    lines = [f"| {SITE}'s training data (n = {n} seeds) | test acc | vs none (paired) | vs unselected (paired) | "
             "diversity |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for label, r in summary["alone"].items():
        div = "—" if r["diversity"] is None else f"{r['diversity']:.3f}"
        lines.append(f"| {label} | {r['mean']:.3f} ± {r['ci']:.3f} | {r['vs_none']:+.3f} ± {r['vs_none_ci']:.3f} | "
                     f"{r['vs_unselected']:+.3f} ± {r['vs_unselected_ci']:.3f} | {div} |")  # fmt: skip
    if summary["federated"]:
        lines += ["", f"| federated job | {SITE} test acc | gain (paired) | other sites | their change (paired) |",
                  "|---|---:|---:|---:|---:|"]  # fmt: skip
        for label, r in summary["federated"].items():
            gain = f"{r['scarce_gain']:+.3f} ± {r['scarce_gain_ci']:.3f}" if "scarce_gain" in r else "—"
            change = f"{r['others_change']:+.3f} ± {r['others_change_ci']:.3f}" if "others_change" in r else "—"
            lines.append(f"| {label} | {r['scarce']:.3f} ± {r['scarce_ci']:.3f} | {gain} | "
                         f"{r['others']:.3f} ± {r['others_ci']:.3f} | {change} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 4.0, 8.0, math.inf])
    parser.add_argument("--encoders", nargs="+", default=["random-cnn", "federated", "pretrained"],
                        choices=["random-cnn", "pixels", "federated", "pretrained"])  # fmt: skip
    parser.add_argument("--utilities", nargs="+", default=["paper", "vote"], choices=["paper", "vote"])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--scarce", type=int, default=10, help="training images left at the scarce site")
    parser.add_argument("--images-per-site", type=int, default=600)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--picks", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train-seeds", type=int, default=2)
    parser.add_argument("--federated", default="fedavg", help="the federated job (its model is the federated encoder)")
    parser.add_argument("--pfl", nargs="*", default=["fedper"], help="pFL methods also run with and without PCEvolve")
    parser.add_argument("--no-federated", dest="run_federated", action="store_false")
    parser.add_argument("--federated-epsilon", type=float, default=8.0)
    parser.add_argument("--federated-encoder", default="pretrained")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not args.run_federated:
        args.encoders = [e for e in args.encoders if e != "federated"]
    args.federated = args.federated if args.run_federated else ""
    t0 = time.perf_counter()
    seeds = [one_seed(args, s) for s in args.seeds]
    summary = summarise(seeds)
    settings = {k: (v if not isinstance(v, float) or math.isfinite(v) else "inf") for k, v in vars(args).items()
                if k not in ("out", "epsilons")} | {"epsilons": [e if math.isfinite(e) else "inf" for e in args.epsilons]}  # fmt: skip
    result = {"benchmark": "pcevolve_cxr", "settings": settings, "seeds": seeds, "summary": summary,
              "wall_seconds": round(time.perf_counter() - t0)}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pcevolve.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(table(summary, len(seeds)))
    return result


if __name__ == "__main__":
    main()
