"""Multi-label chest X-ray: FedAvg and FedPer against Local on synthetic hospitals, macro-AUROC over 3 seeds.

Every run is a real job in the NVFlare simulator (the path of ``medsilo sim``) with ``task: multilabel`` on
synthetic hospitals whose images carry co-occurring findings (:mod:`medsilo.medical.synth.multilabel`: pneumonia,
effusion, nodule, cardiomegaly; 10 % of training label cells blank, masked out under ``unknown: ignore``), with
full scanner shift and per-site prevalence skew (``--dirichlet-alpha``). Each seed synthesizes its own hospitals
and seeds training; every algorithm of a seed sees the same hospitals, so differences are paired.

Figures are read at each run's round selected on the sites' mean *validation* macro-AUROC: the mean over sites
of the test macro-AUROC, the worst site's, and the mean test AUROC of each label. The tables give the mean over
seeds ± the 95 % Student-t half-width, and each federated method's paired difference to Local.

Run::

    python -m benchmarks.multilabel                         # defaults below, ~7 min on 1 core
    python -m benchmarks.multilabel --seeds 0 --rounds 4    # a quick look

It prints Markdown tables and writes ``benchmarks/results/multilabel.json`` with every run's per-site numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.digits import t_half_width
from benchmarks.runner import RESULTS, WORK
from medsilo.config import JobSpec
from medsilo.jobs.simulate import run_simulation
from medsilo.medical.synth import SynthRequest, synthesize
from medsilo.medical.synth.multilabel import ML_FINDINGS
from medsilo.report import label_aurocs

ALGORITHMS = ("local", "fedavg", "fedper")


def spec_for(algorithm: str, seed: int, args: argparse.Namespace) -> JobSpec:
    """The job every algorithm of a seed runs: the same data, model and training, only the algorithm differs."""
    return JobSpec(name=f"ml-{algorithm}-s{seed}", modality="cxr", task="multilabel", labels=list(ML_FINDINGS),
                   unknown="ignore", dataset="cxr", image_size=args.image_size, model="cnn", feature_dim=32,
                   algorithm={"name": algorithm}, seed=seed,
                   training={"rounds": args.rounds, "local_epochs": args.local_epochs, "batch_size": args.batch_size,
                             "lr": args.lr, "optimizer": "sgd", "momentum": 0.9})  # fmt: skip


def _cell(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {t_half_width(values):.3f}"


def tables(runs: list[dict[str, Any]], algorithms: list[str]) -> str:
    """Markdown: macro-AUROC (mean, worst site), paired difference to Local, and AUROC per label."""
    by = {(r["algorithm"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    lines = ["| algorithm | mean macro-AUROC | worst-site macro-AUROC | Δ mean vs Local (paired) | "
             "selected rounds |", "|---|---:|---:|---:|---|"]  # fmt: skip
    for algo in algorithms:
        mine = [by[(algo, s)] for s in seeds]
        diff = "—" if algo == "local" or "local" not in algorithms else \
            _cell([by[(algo, s)]["mean_macro_auroc"] - by[("local", s)]["mean_macro_auroc"] for s in seeds])  # fmt: skip
        lines.append(f"| {algo} | {_cell([r['mean_macro_auroc'] for r in mine])} | "
                     f"{_cell([r['worst_macro_auroc'] for r in mine])} | {diff} | "
                     f"{', '.join(str(r['selected_round']) for r in mine)} |")  # fmt: skip
    lines += ["", "| algorithm | " + " | ".join(ML_FINDINGS) + " |", "|---|" + "---:|" * len(ML_FINDINGS)]
    for algo in algorithms:
        cells = []
        for label in ML_FINDINGS:
            values = [by[(algo, s)]["label_auroc"][label] for s in seeds]
            cells.append("n/a" if any(v is None for v in values) else _cell(values))
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), metavar="NAME")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--images-per-site", type=int, default=200)
    parser.add_argument(
        "--dirichlet-alpha", type=float, default=1.0, help="per-site prevalence skew (default 1)"
    )
    parser.add_argument("--shift", type=float, default=1.0)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=RESULTS / "multilabel.json")
    args = parser.parse_args(argv)

    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    for seed in args.seeds:
        req = SynthRequest("cxr", args.sites, args.images_per_site, seed=seed, dirichlet_alpha=args.dirichlet_alpha,
                           shift=args.shift, multilabel=True)  # fmt: skip
        tag = f"{args.sites}x{args.images_per_site}_a{args.dirichlet_alpha:g}_s{args.shift:g}_seed{seed}"
        sites_yml = synthesize(WORK / f"multilabel_cxr_{tag}", req, progress=False, force=True)
        for algo in args.algorithms:
            spec = spec_for(algo, seed, args)
            t0 = time.perf_counter()
            result = run_simulation(spec, sites_yml, WORK / "multilabel_runs" / spec.name, progress=False,
                                    label=spec.name)  # fmt: skip
            final = result["final"]
            runs.append({"algorithm": algo, "seed": seed, "mean_macro_auroc": final["mean_macro_auroc"],
                         "worst_macro_auroc": final["worst_macro_auroc"], "label_auroc": label_aurocs(result),
                         "mean_acc": final["mean_acc"], "selected_round": result["selected_round"],
                         "per_site": final["per_site"], "wall_seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
            print(f"seed {seed} {algo:>7}: macro-AUROC mean {final['mean_macro_auroc']:.3f} worst "
                  f"{final['worst_macro_auroc']:.3f} (round {result['selected_round']}, {runs[-1]['wall_seconds']} s)",
                  flush=True)  # fmt: skip
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    out = {"benchmark": "multilabel", "settings": settings, "labels": list(ML_FINDINGS),
           "total_seconds": round(time.perf_counter() - started, 1), "runs": runs}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print("\n(mean over seeds ± 95 % t-interval half-width)\n")
    print(tables(runs, args.algorithms))
    return out


if __name__ == "__main__":
    main()
