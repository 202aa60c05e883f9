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
"""

from __future__ import annotations

import argparse

from benchmarks.runner import (
    WORK,
    add_hospital_args,
    base_spec,
    hospitals,
    markdown,
    run_variants,
    save,
)

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
    args = parser.parse_args(argv)

    req, sites_yml = hospitals(args, "htfl")
    models = backbones(args.sites)
    base = base_spec(args, req, model=models)
    variants = {label: {"algorithm": VARIANTS[label]} for label in args.variants}
    runs = run_variants(variants, base, sites_yml, WORK / "htfl_runs")
    settings = {k: v for k, v in vars(args).items() if k != "out"} | {"models": models}
    k = f"_k{len(args.classes)}" if args.classes else ""
    result = save(f"htfl_cxr{k}_seed{args.seed}", settings, req.to_json(), runs, out=args.out,
                  title="Heterogeneous FL on synthetic chest X-ray hospitals")  # fmt: skip
    print(markdown(result, down=True))
    return result


if __name__ == "__main__":
    main()
