"""Personalized FL on synthetic chest X-ray hospitals: Local, FedAvg and every pFL algorithm.

Every algorithm runs as a real job in the NVFlare simulator (the same path as ``medsilo sim``) on the
same hospitals, seeds and training settings: four CXR hospitals with full scanner shift and
Dirichlet(α) label skew. The table gives, at each run's round chosen on validation accuracy, the mean
over sites, the worst site and the pooled test accuracy, the mean test AUROC, the rounds, the wall
time of the whole job and of its rounds, and the upload per site per round.

Run::

    python -m benchmarks.pfl                       # all algorithms, ~25 min on 2 cores
    python -m benchmarks.pfl --algorithms local fedavg fedrep --rounds 10

It prints a Markdown table and writes ``benchmarks/results/pfl_cxr_seed<SEED>.json``.
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
from medsilo.components.algorithms import PFL_ALGORITHMS


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=list(PFL_ALGORITHMS), choices=PFL_ALGORITHMS,
                        metavar="NAME")  # fmt: skip
    add_hospital_args(parser)
    args = parser.parse_args(argv)

    req, sites_yml = hospitals(args, "pfl", force=True)
    base = base_spec(args, req)
    variants = {name: {"algorithm": {"name": name}} for name in args.algorithms}
    runs = run_variants(variants, base, sites_yml, WORK / "pfl_runs")
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    result = save(f"pfl_cxr_seed{args.seed}", settings, req.to_json(), runs, out=args.out,
                  title="pFL benchmark on synthetic chest X-ray hospitals")  # fmt: skip
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
