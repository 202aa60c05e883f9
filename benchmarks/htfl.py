"""Heterogeneous FL on synthetic chest X-ray hospitals: a different backbone per hospital.

Four CXR hospitals (full scanner shift, Dirichlet(α) label skew) run three architecture families —
``cnn`` (plain), ``resnet10-lite`` (residual) and ``densenet-lite`` (dense connections) — and share
only what the method exchanges: prototypes (FedProto, FedTGP), ETF-space prototypes and generated
image–latent pairs (FedKTL), per-class logits (FedDistill) or the linear head (LG-FedAvg). FedTGP and
FedKTL run in both server forms: ``published`` (the server learns from each site's prototypes) and
``aggregate`` (only from their per-class sums, the form that runs under encryption). Every variant is
a real job in the NVFlare simulator.

Run::

    python -m benchmarks.htfl                   # all variants, ~20 min on 2 cores
    python -m benchmarks.htfl --variants local fedproto --rounds 5

It prints a Markdown table (with upload and download KiB per site per round) and writes
``benchmarks/results/htfl_cxr_seed<SEED>.json``.

With ``--seeds`` it runs each seed on its own hospitals, writes ``htfl_cxr_<settings>_seed<N>.json`` (a rerun with
the same settings keeps finished seeds; seeds may run side by side as separate invocations) and
``htfl_cxr_<settings>_seeds.json``, and prints the tables over seeds with paired gains over Local
(:mod:`benchmarks.seeds`). The issue-16 setting, eight four-finding hospitals with the recipe::

    python -m benchmarks.htfl --sites 8 --images-per-site 400 --classes normal pneumonia effusion nodule \
        --dirichlet-alpha 0.3 --rounds 50 --lr 0.03 --lr-schedule cosine --warmup-rounds 3 --weight-decay 0.0005 \
        --class-weights balanced --seeds 0 1 --variants local fedproto "fedtgp published"
"""

from __future__ import annotations

import argparse
import json

from benchmarks import seeds as over_seeds
from benchmarks.runner import (
    WORK,
    add_hospital_args,
    base_spec,
    hospitals,
    markdown,
    run_variants,
    save,
    seed_result,
    settings_tag,
)
from medsilo.fs import write_atomic

BACKBONES = ("cnn", "resnet10-lite", "densenet-lite")
VARIANTS: dict[str, dict] = {
    "local": {"name": "local"},
    "fedproto": {"name": "fedproto"},
    "fedproto normalized": {"name": "fedproto", "params": {"normalize": True}},
    "fedtgp published": {"name": "fedtgp", "params": {"form": "published"}},
    "fedtgp aggregate": {"name": "fedtgp", "params": {"form": "aggregate"}},
    "fedtgp aggregate normalized": {"name": "fedtgp", "params": {"form": "aggregate", "normalize": True}},
    "fedktl published": {"name": "fedktl", "params": {"form": "published"}},
    "fedktl aggregate": {"name": "fedktl", "params": {"form": "aggregate"}},
    "feddistill": {"name": "feddistill"},
    "lgfedavg": {"name": "lgfedavg"},
}


def backbones(sites: int) -> dict[str, str]:
    """Site → backbone, cycling through the three families."""
    return {f"hospital-{i + 1}": BACKBONES[i % len(BACKBONES)] for i in range(sites)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="NAME",
                        help=f"subset of: {', '.join(VARIANTS)} (quote names with spaces)")  # fmt: skip
    add_hospital_args(parser)
    parser.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                        help="run these seeds (overrides --seed) and add tables over seeds")  # fmt: skip
    args = parser.parse_args(argv)
    if args.seeds:
        return many_seeds(args)
    k = f"_k{len(args.classes)}" if args.classes else ""
    return one_seed(args, f"htfl_cxr{k}_seed{args.seed}", WORK / "htfl_runs")


def one_seed(args: argparse.Namespace, name: str, runs_dir, labels: set[str] | None = None) -> dict:
    """The variants in ``labels`` (default: all of ``args.variants``) on the hospitals of ``args.seed``; writes
    ``<out>/<name>.json``."""
    req, sites_yml = hospitals(args, "htfl")
    models = backbones(args.sites)
    base = base_spec(args, req, model=models)
    variants = {label: {"algorithm": VARIANTS[label]} for label in args.variants if labels is None or label in labels}
    runs = run_variants(variants, base, sites_yml, runs_dir)
    settings = {k: v for k, v in vars(args).items() if k != "out"} | {"models": models}
    result = save(name, settings, req.to_json(), runs, out=args.out,
                  title="Heterogeneous FL on synthetic chest X-ray hospitals")  # fmt: skip
    print(markdown(result, down=True))
    return result


def many_seeds(args: argparse.Namespace) -> dict:
    """:func:`one_seed` for each of ``args.seeds`` (keeping finished ones), then the tables over seeds."""
    tag = settings_tag(args)
    runs = []
    for seed in args.seeds:
        args.seed = seed
        name = f"htfl_{args.modality}_{tag}_seed{seed}"
        result = seed_result(args, name, set(args.variants), ("seeds", "variants", "models"),
                             lambda name, labels: one_seed(args, name, WORK / "htfl_runs" / name, labels))  # seeds may run side by side
        runs += over_seeds.runs_of(result, seed, args.variants)
    text = over_seeds.tables(runs, list(args.variants), ["local"])
    settings = {key: v for key, v in vars(args).items() if key not in ("out", "seed")}
    out = {"benchmark": f"htfl_{args.modality}_{tag}_seeds", "settings": settings, "runs": runs, "tables": text}
    write_atomic(args.out / f"htfl_{args.modality}_{tag}_seeds.json", json.dumps(out, indent=2) + "\n")
    print(text)
    return out


if __name__ == "__main__":
    main()
