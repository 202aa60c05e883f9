"""Personalized FL on synthetic chest X-ray hospitals: Local, FedAvg and every pFL algorithm.

Every algorithm runs as a real job in the NVFlare simulator (the same path as ``medsilo sim``) on the
same hospitals, seeds and training settings: four CXR hospitals with full scanner shift and
Dirichlet(α) label skew. The table gives, at each run's round chosen on validation accuracy, the mean
over sites, the worst site and the pooled test accuracy, the mean test AUROC, the rounds, the wall
time of the whole job and of its rounds, and the upload per site per round.

Run::

    python -m medsilo.benchmarks.pfl                       # all algorithms, ~25 min on 2 cores
    python -m medsilo.benchmarks.pfl --algorithms local fedavg fedrep --rounds 10

It prints a Markdown table and writes ``benchmarks/results/pfl_cxr_seed<SEED>.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medsilo.benchmarks.runner import RESULTS, WORK, markdown, run_variants, save
from medsilo.components.algorithms import PFL_ALGORITHMS
from medsilo.medical.synth import SynthRequest, synthesize


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=list(PFL_ALGORITHMS), choices=PFL_ALGORITHMS,
                        metavar="NAME")  # fmt: skip
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--images-per-site", type=int, default=600)
    parser.add_argument("--dirichlet-alpha", type=float, default=1.0)
    parser.add_argument("--shift", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    req = SynthRequest("cxr", args.sites, args.images_per_site, seed=args.seed, dirichlet_alpha=args.dirichlet_alpha,
                       shift=args.shift)  # fmt: skip
    tag = f"{args.sites}x{args.images_per_site}_a{args.dirichlet_alpha:g}_s{args.shift:g}_seed{args.seed}"
    sites_yml = synthesize(WORK / f"pfl_cxr_{tag}", req, force=True)
    base = dict(modality="cxr", classes=list(req.class_names()), dataset="cxr", image_size=args.image_size,
                model="cnn", feature_dim=64, seed=args.seed,
                training={"rounds": args.rounds, "local_epochs": args.local_epochs, "batch_size": args.batch_size,
                          "lr": args.lr, "optimizer": "sgd", "momentum": 0.9})  # fmt: skip
    variants = {name: {"algorithm": {"name": name}} for name in args.algorithms}
    runs = run_variants(variants, base, sites_yml, WORK / "pfl_runs")
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    result = save(f"pfl_cxr_seed{args.seed}", settings, req.to_json(), runs, out=args.out,
                  title="pFL benchmark on synthetic chest X-ray hospitals")  # fmt: skip
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
