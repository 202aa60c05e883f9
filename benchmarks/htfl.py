"""Heterogeneous FL on synthetic chest X-ray hospitals: a different backbone per hospital.

Four CXR hospitals (full scanner shift, Dirichlet(α) label skew) run three architecture families —
``cnn`` (plain), ``resnet10-lite`` (residual) and ``densenet-lite`` (dense connections) — and share
only what the method exchanges: prototypes (FedProto, FedTGP), ETF-space prototypes and generated
image–latent pairs (FedKTL), per-class logits (FedDistill) or the linear head (LG-FedAvg). FedTGP and
FedKTL run in both server forms: ``published`` (the server learns from each site's prototypes) and
``aggregate`` (only from their per-class sums, the form that runs under encryption). Every variant is
a real job in the NVFlare simulator.

Run::

    python -m medsilo.benchmarks.htfl                   # all variants, ~20 min on 2 cores
    python -m medsilo.benchmarks.htfl --variants local fedproto --rounds 5

It prints a Markdown table (with upload and download KiB per site per round) and writes
``benchmarks/results/htfl_cxr_seed<SEED>.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medsilo.benchmarks.runner import RESULTS, WORK, markdown, run_variants, save
from medsilo.medical.synth import SynthRequest, synthesize

BACKBONES = ("cnn", "resnet10-lite", "densenet-lite")
VARIANTS: dict[str, dict] = {
    "local": {"name": "local"},
    "fedproto": {"name": "fedproto"},
    "fedtgp published": {"name": "fedtgp", "params": {"form": "published"}},
    "fedtgp aggregate": {"name": "fedtgp", "params": {"form": "aggregate"}},
    "fedktl published": {"name": "fedktl", "params": {"form": "published"}},
    "fedktl aggregate": {"name": "fedktl", "params": {"form": "aggregate"}},
    "feddistill": {"name": "feddistill"},
    "lgfedavg": {"name": "lgfedavg"},
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="NAME",
                        help=f"subset of: {', '.join(VARIANTS)} (quote names with spaces)")  # fmt: skip
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--images-per-site", type=int, default=600)
    parser.add_argument("--dirichlet-alpha", type=float, default=1.0)
    parser.add_argument("--shift", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    req = SynthRequest("cxr", args.sites, args.images_per_site, seed=args.seed, dirichlet_alpha=args.dirichlet_alpha,
                       shift=args.shift)  # fmt: skip
    tag = f"{args.sites}x{args.images_per_site}_a{args.dirichlet_alpha:g}_s{args.shift:g}_seed{args.seed}"
    sites_yml = synthesize(WORK / f"htfl_cxr_{tag}", req, force=False)
    sites = [f"hospital-{i + 1}" for i in range(args.sites)]
    models = {site: BACKBONES[i % len(BACKBONES)] for i, site in enumerate(sites)}
    base = dict(modality="cxr", classes=list(req.class_names()), dataset="cxr", image_size=args.image_size,
                model=models, feature_dim=64, seed=args.seed,
                training={"rounds": args.rounds, "local_epochs": 1, "batch_size": args.batch_size, "lr": args.lr,
                          "optimizer": "sgd", "momentum": 0.9})  # fmt: skip
    variants = {label: {"algorithm": VARIANTS[label]} for label in args.variants}
    runs = run_variants(variants, base, sites_yml, WORK / "htfl_runs")
    settings = {k: v for k, v in vars(args).items() if k != "out"} | {"models": models}
    result = save(f"htfl_cxr_seed{args.seed}", settings, req.to_json(), runs, out=args.out,
                  title="Heterogeneous FL on synthetic chest X-ray hospitals")  # fmt: skip
    print(markdown(result, down=True))
    return result


if __name__ == "__main__":
    main()
