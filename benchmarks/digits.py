"""Real pixels: scikit-learn's handwritten digits dealt to label-skewed sites, with and without augmentation.

The 1,797 digits ship inside scikit-learn (:mod:`medsilo.medical.synth.digits`): real images nobody here drew,
upsampled to 32×32 grayscale PNGs and read through the generic ``image`` modality. Each seed deals them afresh
to the sites (Dirichlet(α) over sites per class, as PFLlib partitions) and seeds training; every algorithm of a
seed sees the same partition, so differences between algorithms are paired. Training is the reference's
setting scaled to the job: batch 10, lr 0.01, SGD with momentum 0.9, 1 local epoch, 30 rounds.

Each algorithm runs under three augmentation recipes (``training.augmentation``):

* ``none`` — the exact pixels (the ``image`` modality's default);
* ``flips+rot90`` — the geometric half of the pathology recipe, what RGB data got when it had to pretend to
  be pathology (a flipped 2 is not a 2; a rotated 6 is a 9);
* ``affine`` — a small rotation/shift/scale, the kind of recipe that suits digits.

Run::

    python -m benchmarks.digits                                   # ~35 min on 2 cores
    python -m benchmarks.digits --seeds 0 --augmentations none --algorithms fedavg local

It prints Markdown tables (mean over seeds ± the 95 % t-interval half-width, paired gains over Local and FedAvg,
each site's paired gain over Local) and writes ``benchmarks/results/digits.json`` with every run's per-site
numbers, after every job. Run again with the same ``--out`` and settings, it keeps the jobs already there and
runs only the missing ones (a stopped benchmark resumes; more seeds or algorithms can be added later).

The issue-16 setting (PFLlib's: 20 sites, 2 classes each, 50 rounds)::

    python -m benchmarks.digits --sites 20 --split pathological --rounds 50 --seeds 0 1 2 3 4 \
        --augmentations none --algorithms local fedavg fedper fedrep ditto --out benchmarks/results/digits_path20.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks import seeds
from benchmarks.runner import RESULTS, WORK
from medsilo.config import JobSpec
from medsilo.fs import write_atomic
from medsilo.jobs.simulate import run_simulation
from medsilo.medical.synth.digits import CLASSES, DigitsRequest, write_digit_sites
from medsilo.stats import mean_interval

RECIPES: dict[str, Any] = {
    "none": "none",
    "flips+rot90": [{"transform": "RandFlip", "spatial_axis": 0}, {"transform": "RandFlip", "spatial_axis": 1},
                    {"transform": "RandRotate90"}],
    "affine": [{"transform": "RandAffine", "prob": 0.5, "rotate_range": 0.15, "scale_range": 0.08,
                "translate_range": 2}],
}  # fmt: skip
"""Augmentation recipes compared, by label."""

ALGORITHMS = ("local", "fedavg", "fedper", "fedrep", "ditto", "fedproto")


def spec_for(algorithm: str, recipe: str, seed: int, args: argparse.Namespace) -> JobSpec:
    """The job of one cell: the reference-like training on the digit sites, ``recipe``'s augmentation."""
    return JobSpec(name=f"digits-{algorithm}-{recipe.replace('+', '-')}-s{seed}", modality="image",
                   classes=list(CLASSES), channels=1, dataset="digits", image_size=args.size, model="cnn",
                   feature_dim=64, seed=seed, algorithm={"name": algorithm},
                   training={"rounds": args.rounds, "local_epochs": 1, "batch_size": args.batch_size, "lr": args.lr,
                             "optimizer": "sgd", "momentum": args.momentum, "augmentation": RECIPES[recipe]})  # fmt: skip


def table(runs: list[dict[str, Any]], recipes: list[str], algorithms: list[str], key: str) -> str:
    """Markdown: algorithm rows, recipe columns, ``key`` (``mean_acc``, ``worst_acc``) mean ± 95 % over seeds."""
    lines = ["| algorithm | " + " | ".join(recipes) + " |", "|---|" + "---:|" * len(recipes)]
    for algo in algorithms:
        cells = []
        for recipe in recipes:
            values = [r[key] for r in runs if r["algorithm"] == algo and r["recipe"] == recipe]
            iv = mean_interval(values) if values else None
            cells.append(f"{iv.value:.3f} ± {iv.half_width:.3f} (n={iv.n})" if iv else "—")
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), metavar="NAME")
    parser.add_argument("--augmentations", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--split", choices=("dirichlet", "pathological"), default="dirichlet",
                        help="label skew: Dirichlet(α) per class, or PFLlib's pathological split (default dirichlet)")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet α of the label skew (default 0.5)")
    parser.add_argument("--classes-per-site", type=int, default=2, help="classes a site holds (pathological only)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--out", type=Path, default=RESULTS / "digits.json")
    args = parser.parse_args(argv)

    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    same = {k: v for k, v in settings.items() if k not in ("seeds", "algorithms", "augmentations", "out")}
    runs = earlier_runs(args.out, same)
    done = {(r["algorithm"], r["recipe"], r["seed"]) for r in runs}
    skew = f"a{args.alpha:g}" if args.split == "dirichlet" else f"path{args.classes_per_site}"
    tag = f"{args.sites}x_{skew}_{args.size}px"
    out = {"benchmark": "digits", "settings": settings, "recipes": {k: RECIPES[k] for k in args.augmentations},
           "complete": False, "runs": runs}  # fmt: skip
    for seed in args.seeds:
        req = DigitsRequest(sites=args.sites, split=args.split, alpha=args.alpha,
                            classes_per_site=args.classes_per_site, size=args.size, seed=seed)  # fmt: skip
        sites_yml = write_digit_sites(WORK / f"digits_{tag}_seed{seed}", req)
        for recipe in args.augmentations:
            for algo in args.algorithms:
                if (algo, recipe, seed) in done:
                    print(f"seed {seed} {recipe:>11} {algo:>9}: kept from {args.out.name}", flush=True)
                    continue
                spec = spec_for(algo, recipe, seed, args)
                t0 = time.perf_counter()
                result = run_simulation(spec, sites_yml, WORK / "digits_runs" / tag / spec.name, progress=False,
                                        label=spec.name)  # fmt: skip
                runs.append(run_row(result, algo, recipe, seed, time.perf_counter() - t0))
                print(f"seed {seed} {recipe:>11} {algo:>9}: mean {runs[-1]['mean_acc']:.3f} worst "
                      f"{runs[-1]['worst_acc']:.3f} (round {result['selected_round']}, {runs[-1]['wall_seconds']} s)",
                      flush=True)  # fmt: skip
                write_json(args.out, out)  # after every job: a stopped benchmark keeps what it finished
    out["complete"] = True
    write_json(args.out, out)
    for key in ("mean_acc", "worst_acc"):
        print(f"\n{key} (mean over seeds ± 95 % t-interval half-width)\n")
        print(table(runs, args.augmentations, args.algorithms, key))
    print(tables(runs, args.augmentations, args.algorithms))
    return out


def run_row(result: dict[str, Any], algo: str, recipe: str, seed: int, seconds: float) -> dict[str, Any]:
    """One job's numbers at its selected round, as the tables read them."""
    final = result["final"]
    return {"algorithm": algo, "recipe": recipe, "seed": seed, "mean_acc": final["mean_acc"],
            "worst_acc": final["worst_acc"], "pooled_acc": final["pooled_acc"],
            "mean_balanced_acc": final.get("mean_balanced_acc"), "selected_round": result["selected_round"],
            "per_site": final["per_site"], "wall_seconds": round(seconds, 1)}  # fmt: skip


def earlier_runs(path: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs of an earlier, stopped or shorter, benchmark at ``path`` made with the same ``settings``
    (seeds, algorithms and recipes may differ); none when there is no such file or its settings differ."""
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text())
    kept = {k: v for k, v in earlier.get("settings", {}).items() if k in settings}
    if kept != settings:
        print(f"{path}: made with other settings; starting over", flush=True)
        return []
    return list(earlier.get("runs", []))


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` whole (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def tables(runs: list[dict[str, Any]], recipes: list[str], algorithms: list[str]) -> str:
    """Per recipe: paired gains over Local and FedAvg (mean accuracy), and each site's paired gain over Local."""
    parts = []
    for recipe in recipes:
        rs = [r for r in runs if r["recipe"] == recipe]
        bases = [b for b in ("local", "fedavg") if any(r["algorithm"] == b for r in rs)]
        others = [a for a in algorithms if a != "local"]
        parts += [f"\n`{recipe}`: paired gain in mean accuracy (mean [95 % interval] over seeds; * excludes 0)\n",
                  seeds.paired_table(rs, algorithms, bases, "mean_acc")]
        if "local" in bases and others:
            parts += [f"\n`{recipe}`: each site's paired gain in test accuracy over Local\n",
                      seeds.site_table(rs, others, "local", "test_acc")]  # fmt: skip
    return "\n".join(parts)


if __name__ == "__main__":
    main()
