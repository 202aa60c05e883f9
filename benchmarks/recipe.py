"""Which training recipe should a job use? A sweep on validation data, over seeds.

Each algorithm runs with each recipe (the job's ``training`` options: learning rate, schedule, warm-up, weight
decay, class weights) as a real NVFlare simulator job on the same hospitals per seed. A recipe is chosen per
algorithm on the **validation** figure its rounds were selected on (``selection_score`` in ``results.json``:
mean validation balanced accuracy over the sites), averaged over seeds; the test figures are printed beside
it for the record and play no part in the choice.

Run (four CXR hospitals of 300 images, two findings, Dirichlet 1.0: the demo's hospitals until the demo moved to
the four-finding setting; ~25 min on 2 cores, ~12 min with one process per seed)::

    python -m benchmarks.recipe --seeds 0 1 2

It writes ``benchmarks/results/recipe_<settings>_seed<N>.json`` per seed (a rerun with the same settings keeps
finished seeds) and ``recipe_<settings>.json`` with the table and the choice.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

from benchmarks.runner import WORK, add_hospital_args, base_spec, hospitals, run_variants, save, seed_result
from medsilo.components.algorithms.base import COSINE_RECIPE, PLAIN_RECIPE
from medsilo.fs import write_atomic
from medsilo.stats import mean_interval, paired_interval

RECIPES: dict[str, Mapping[str, Any]] = {
    "plain": PLAIN_RECIPE,
    "cosine": {**COSINE_RECIPE, "class_weights": "none"},
    "cosine balanced": COSINE_RECIPE,
}  # fmt: skip
"""The recipes swept: the job default (``plain``, lr 0.01 constant), and a larger learning rate that a cosine
schedule with warm-up brings down, with light weight decay, without and with class-balanced loss weights."""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=["local", "fedavg", "fedper"], metavar="NAME")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES), metavar="NAME")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="SEED")
    add_hospital_args(parser)
    parser.set_defaults(sites=4, images_per_site=300)  # four hospitals, two findings (BENCHMARKS "Which training recipe")
    args = parser.parse_args(argv)
    k = len(args.classes) if args.classes else 2
    tag = f"{args.sites}x{args.images_per_site}_a{args.dirichlet_alpha:g}_k{k}_r{args.rounds}"
    tag = tag if args.modality == "cxr" else f"{args.modality}_{tag}"
    wanted = {f"{a}/{r}" for a in args.algorithms for r in args.recipes}
    runs = []
    for seed in args.seeds:
        args.seed = seed
        name = f"recipe_{tag}_seed{seed}"
        result = seed_result(args, name, wanted, ("seeds", "algorithms", "recipes"),
                             lambda name, labels: one_seed(args, name, labels))  # fmt: skip
        for row in result["rows"]:
            algorithm, recipe = row["label"].split("/", 1)
            runs.append({"algorithm": algorithm, "recipe": recipe, "seed": seed,
                         "val": row["selection_score"], "test_balanced": row["mean_balanced_acc"],
                         "test_acc": row["mean_acc"]})  # fmt: skip
    # the table covers every algorithm the seed files hold (an earlier sweep's and the ones added now)
    algorithms = list(dict.fromkeys(r["algorithm"] for r in runs))
    text, chosen = table(runs, algorithms, [r for r in RECIPES if any(x["recipe"] == r for x in runs)])
    settings = {key: v for key, v in vars(args).items() if key not in ("out", "seed")}
    out = {"benchmark": f"recipe_{tag}", "settings": settings, "runs": runs, "chosen": chosen, "table": text}
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / f"recipe_{tag}.json", json.dumps(out, indent=2, default=str) + "\n")
    print(text)
    return out


def one_seed(args: argparse.Namespace, name: str, labels: set[str]) -> dict:
    """The ``algorithm/recipe`` runs in ``labels`` on the hospitals of ``args.seed``; writes ``<out>/<name>.json``."""
    req, sites_yml = hospitals(args, "recipe")
    base = base_spec(args, req)
    variants = {f"{algorithm}/{recipe}": {"algorithm": {"name": algorithm},
                                          "training": {**base["training"], **RECIPES[recipe]}}
                for algorithm in args.algorithms for recipe in args.recipes
                if f"{algorithm}/{recipe}" in labels}  # fmt: skip
    runs = run_variants(variants, base, sites_yml, WORK / "recipe_runs" / name)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    return save(name, settings, req.to_json(), runs, out=args.out, title="Training-recipe sweep (validation)")


def table(runs: list[dict[str, Any]], algorithms: list[str], recipes: list[str]) -> tuple[str, dict[str, str]]:
    """Markdown: per algorithm and recipe, mean validation score ± 95 % half-width over seeds, its paired
    difference to ``plain``, and the test figures; plus the recipe chosen per algorithm (best mean validation).
    """
    lines = ["| algorithm | recipe | validation (selection) | − plain, paired | test balanced acc | test acc | seeds |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    chosen = {}
    for algorithm in algorithms:
        best, best_val = None, -1.0
        for recipe in recipes:
            rs = sorted((r for r in runs if r["algorithm"] == algorithm and r["recipe"] == recipe),
                        key=lambda r: r["seed"])  # fmt: skip
            if not rs:
                continue
            val = mean_interval([r["val"] for r in rs])
            plain = {r["seed"]: r["val"] for r in runs if r["algorithm"] == algorithm and r["recipe"] == "plain"}
            paired = [(r["val"], plain[r["seed"]]) for r in rs if r["seed"] in plain]
            diff = "—"
            if recipe != "plain" and len(paired) >= 2:
                d = paired_interval([a for a, _ in paired], [b for _, b in paired])
                diff = f"{d}{' *' if d.excludes_zero() else ''}"
            tb, ta = mean_interval([r["test_balanced"] for r in rs]), mean_interval([r["test_acc"] for r in rs])
            lines.append(f"| {algorithm} | {recipe} | {val.value:.3f} ± {val.half_width:.3f} | {diff} | "
                         f"{tb.value:.3f} ± {tb.half_width:.3f} | {ta.value:.3f} ± {ta.half_width:.3f} | {len(rs)} |")  # fmt: skip
            if val.value > best_val:
                best, best_val = recipe, val.value
        if best is not None:
            chosen[algorithm] = best
    lines.append("")
    lines.append("Chosen on validation: " + ", ".join(f"{a} → {r}" for a, r in chosen.items()))
    return "\n".join(lines), chosen


if __name__ == "__main__":
    main()
