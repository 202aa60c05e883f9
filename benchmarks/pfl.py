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
import json
import time
from pathlib import Path

from medsilo.components.algorithms import ALGORITHMS
from medsilo.config import JobSpec
from medsilo.jobs.simulate import run_simulation
from medsilo.medical.synth import SynthRequest, synthesize
from medsilo.report import summary_row, write_report

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(__file__).resolve().parent / "work"
PFL = [a for a in ALGORITHMS]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=PFL, choices=PFL, metavar="NAME")
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
    runs = []
    for name in args.algorithms:
        spec = JobSpec(
            name=f"bench-{name}", modality="cxr", classes=list(req.class_names()), dataset="cxr",
            image_size=args.image_size, model="cnn", feature_dim=64, algorithm={"name": name}, seed=args.seed,
            training={"rounds": args.rounds, "local_epochs": args.local_epochs, "batch_size": args.batch_size,
                      "lr": args.lr, "optimizer": "sgd", "momentum": 0.9},
        )  # fmt: skip
        t0 = time.perf_counter()
        result = run_simulation(spec, sites_yml, WORK / "pfl_runs" / name, label=name)
        result["wall_seconds"] = round(time.perf_counter() - t0, 1)
        runs.append(result)
        row = summary_row(result)
        print(f"{name}: mean {row['mean_acc']:.3f} worst {row['worst_acc']:.3f} ({result['wall_seconds']} s)", flush=True)

    rows = [{**summary_row(r), "wall_seconds": r["wall_seconds"]} for r in runs]
    result = {
        "benchmark": "pfl_cxr",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "synthetic_data": req.to_json(),
        "rows": rows,
        "per_site": {r["algorithm"]: r["final"]["per_site"] for r in runs},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"pfl_cxr_seed{args.seed}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(runs, WORK / f"pfl_report_seed{args.seed}.html", title="pFL benchmark on synthetic chest X-ray hospitals")
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    """The comparison table as Markdown."""
    lines = [
        "| algorithm | mean acc | worst site | pooled acc | mean AUROC | round (of) | job s | rounds s | KiB up / site / round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['algorithm']} | {r['mean_acc']:.3f} | {r['worst_acc']:.3f} | {r['pooled_acc']:.3f} | "
            f"{r['mean_auroc']:.3f} | {r['selected_round']} ({r['rounds']}) | {r['wall_seconds']:.0f} | "
            f"{r['seconds']:.0f} | {r['up_per_site_round'] / 1024:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
