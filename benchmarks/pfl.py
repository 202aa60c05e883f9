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
    markdown,
    run_variants,
    same_settings,
    save,
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


def one_seed(args: argparse.Namespace, name: str) -> dict:
    """Every algorithm on the hospitals of ``args.seed``; writes ``<out>/<name>.json``."""
    req, sites_yml = hospitals(args, "pfl", force=True)
    base = base_spec(args, req)
    variants = {name: {"algorithm": {"name": name, "params": hyper_parameters(args.params).get(name, {})}}
                for name in args.algorithms}  # fmt: skip
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


def earlier(args: argparse.Namespace, name: str) -> dict | None:
    """``<out>/<name>.json`` when an earlier run wrote it with these settings and every algorithm asked for
    (a stopped multi-seed benchmark resumes from its finished seeds); else ``None``."""
    path = args.out / f"{name}.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    same = same_settings(result, args, ignore=("seeds", "algorithms"))
    if not same or not set(args.algorithms) <= {row["label"] for row in result["rows"]}:
        return None
    print(f"seed {args.seed}: kept {path.name}", flush=True)
    return result


def many_seeds(args: argparse.Namespace) -> dict:
    """:func:`one_seed` for each of ``args.seeds``, then the tables over seeds (written and printed)."""
    k = len(args.classes) if args.classes else 2
    tag = f"{args.sites}x{args.images_per_site}_a{args.dirichlet_alpha:g}_k{k}_r{args.rounds}"
    if (args.lr_schedule, args.warmup_rounds, args.weight_decay, args.class_weights) != ("constant", 0, 0.0, "none"):
        tag += (f"_lr{args.lr:g}_{args.lr_schedule}{args.warmup_rounds}_wd{args.weight_decay:g}"
                f"{'_balanced' if args.class_weights == 'balanced' else ''}")  # the recipe names the files too
    plain_tag = tag
    for algorithm, values in hyper_parameters(args.params).items():  # so do hyper-parameters: ditto_mu1
        tag += f"_{algorithm}" + "".join(f"_{key}{value:g}" for key, value in values.items())
    # A hyper-parameter run compares against the Local and FedAvg runs of the plain file of each seed, when it has them.
    bases = [a for a in ("local", "fedavg") if a not in args.algorithms] if args.params else []
    plain = argparse.Namespace(**{**vars(args), "algorithms": bases, "params": []})
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        args.seed = plain.seed = seed
        name = f"pfl_{args.modality}_{tag}_seed{seed}"
        results = [earlier(args, name) or one_seed(args, name)]
        results += [r for r in [earlier(plain, f"pfl_{args.modality}_{plain_tag}_seed{seed}")] if r and bases]
        for result in results:
            for row in result["rows"]:
                if row["label"] in args.algorithms or row["label"] in bases:
                    runs.append({**{key: v for key, v in row.items() if key != "models"}, "algorithm": row["label"],
                                 "seed": seed, "per_site": result["per_site"][row["label"]]})  # fmt: skip
    algorithms = [a for a in bases if any(r["algorithm"] == a for r in runs)] + list(args.algorithms)
    text = "\n\n".join([
        over_seeds.summary(runs, algorithms, ["mean_balanced_acc", "mean_acc", "worst_acc", "mean_auroc"]),
        "Paired gain in mean balanced accuracy (mean [95 % interval] over seeds; * excludes 0):",
        over_seeds.paired_table(runs, algorithms, ["local", "fedavg"], "mean_balanced_acc"),
        "Each site's paired gain in balanced accuracy over Local:",
        over_seeds.site_table(runs, [a for a in algorithms if a != "local"], "local", "test_balanced_acc"),
    ])  # fmt: skip
    settings = {key: v for key, v in vars(args).items() if key not in ("out", "seed")}
    out = {"benchmark": f"pfl_{args.modality}_{tag}_seeds", "settings": settings, "runs": runs, "tables": text}
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / f"pfl_{args.modality}_{tag}_seeds.json", json.dumps(out, indent=2) + "\n")
    print(text)
    return out


if __name__ == "__main__":
    main()
