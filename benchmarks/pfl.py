"""Personalized FL on synthetic chest X-ray hospitals (or pathology labs): Local, FedAvg and every pFL algorithm.

Every algorithm runs as a real job in the NVFlare simulator (the same path as ``medsilo sim``) on the
same hospitals, seeds and training settings: four CXR hospitals with full scanner shift and
Dirichlet(α) label skew. The table gives, at each run's round chosen on validation accuracy, the mean
over sites, the worst site and the pooled test accuracy, the mean test AUROC, the rounds, the wall
time of the whole job and of its rounds, and the upload per site per round.

Run::

    python -m benchmarks.pfl                       # all algorithms, ~25 min on 2 cores
    python -m benchmarks.pfl --algorithms local fedavg fedrep --rounds 10

It prints a Markdown table and writes ``benchmarks/results/pfl_cxr_seed<SEED>.json``. ``--modality pathology``
runs the same on synthetic pathology labs (``pfl_pathology_…`` files), e.g. the three grades::

    python -m benchmarks.pfl --modality pathology --classes normal low-grade high-grade --seeds 0 1 2 …

With ``--seeds`` it runs every seed on its own hospitals (the same hospitals for every algorithm of a seed),
writes one file per seed and ``pfl_cxr_<settings>_seeds.json``, and prints the tables over seeds: mean ±
95 % interval, paired gains over Local and FedAvg, and each site's paired gain over Local
(:mod:`benchmarks.seeds`). A run with ``--params`` (``--algorithms ditto --params ditto.mu=1``) names its files
after them and takes Local and FedAvg from the plain run's file of each seed, when one was written with the same
settings. The issue-16 setting::

    python -m benchmarks.pfl --sites 8 --classes normal pneumonia effusion nodule --dirichlet-alpha 0.3 \
        --seeds 0 1 2 3 4 --algorithms local fedavg fedper fedrep
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from benchmarks import seeds as over_seeds
from benchmarks.runner import (
    WORK,
    add_hospital_args,
    base_spec,
    hospitals,
    kept_seed,
    markdown,
    run_variants,
    save,
    seed_result,
    settings_tag,
)
from medsilo.components.algorithms import PFL_ALGORITHMS
from medsilo.fs import write_atomic


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=list(PFL_ALGORITHMS), choices=PFL_ALGORITHMS,
                        metavar="NAME")  # fmt: skip
    add_hospital_args(parser)
    parser.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                        help="run these seeds (overrides --seed) and add tables over seeds")  # fmt: skip
    parser.add_argument("--params", nargs="+", default=[], metavar="ALGO.KEY=VALUE",
                        help="algorithm hyper-parameters, e.g. ditto.mu=1 (numbers)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.seeds:
        return many_seeds(args)
    return one_seed(args, f"pfl_{args.modality}_seed{args.seed}")


def one_seed(args: argparse.Namespace, name: str, labels: set[str] | None = None) -> dict:
    """The algorithms in ``labels`` (default: all of ``args.algorithms``) on the hospitals of ``args.seed``; writes
    ``<out>/<name>.json``."""
    req, sites_yml = hospitals(args, "pfl", force=True)
    base = base_spec(args, req)
    variants = {name: {"algorithm": {"name": name, "params": hyper_parameters(args.params).get(name, {})}}
                for name in args.algorithms if labels is None or name in labels}  # fmt: skip
    runs = run_variants(variants, base, sites_yml, WORK / "pfl_runs" / name)  # seeds may run side by side
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    result = save(name, settings, req.to_json(), runs, out=args.out,
                  title=f"pFL benchmark on synthetic {'chest X-ray hospitals' if req.modality == 'cxr' else 'pathology labs'}")  # fmt: skip
    print(markdown(result))
    return result


def hyper_parameters(items: list[str]) -> dict[str, dict[str, float]]:
    """``["ditto.mu=1"]`` → ``{"ditto": {"mu": 1.0}}``."""
    out: dict[str, dict[str, float]] = {}
    for item in items:
        key, _, value = item.partition("=")
        algorithm, _, name = key.partition(".")
        if not (algorithm and name and value):
            raise SystemExit(f"--params: expected ALGO.KEY=VALUE, got {item!r}")
        out.setdefault(algorithm, {})[name] = float(value)
    return out


IGNORED = ("seeds", "algorithms")
"""Options a kept seed's file may differ in."""


def many_seeds(args: argparse.Namespace) -> dict:
    """:func:`one_seed` for each of ``args.seeds``, then the tables over seeds (written and printed)."""
    tag = plain_tag = settings_tag(args)
    for algorithm, values in hyper_parameters(args.params).items():  # so do hyper-parameters: ditto_mu1
        tag += f"_{algorithm}" + "".join(f"_{key}{value:g}" for key, value in values.items())
    # A hyper-parameter run compares against the Local and FedAvg runs of the plain file of each seed, when it has them.
    bases = [a for a in ("local", "fedavg") if a not in args.algorithms] if args.params else []
    plain = argparse.Namespace(**{**vars(args), "algorithms": bases, "params": []})
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        args.seed = plain.seed = seed
        name = f"pfl_{args.modality}_{tag}_seed{seed}"
        results = [seed_result(args, name, set(args.algorithms), IGNORED, lambda name, labels: one_seed(args, name, labels))]
        if bases:
            results += [r for r in [kept_seed(plain, f"pfl_{args.modality}_{plain_tag}_seed{seed}", set(bases), IGNORED)] if r]
        for result in results:
            runs += over_seeds.runs_of(result, seed, [*args.algorithms, *bases])
    algorithms = [a for a in bases if any(r["algorithm"] == a for r in runs)] + list(args.algorithms)
    text = over_seeds.tables(runs, algorithms, ["local", "fedavg"])
    settings = {key: v for key, v in vars(args).items() if key not in ("out", "seed")}
    out = {"benchmark": f"pfl_{args.modality}_{tag}_seeds", "settings": settings, "runs": runs, "tables": text}
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / f"pfl_{args.modality}_{tag}_seeds.json", json.dumps(out, indent=2) + "\n")
    print(text)
    return out


if __name__ == "__main__":
    main()
