"""Start-up of a simulator job: where the seconds before training go, with a cold and a warm image cache.

    python -m benchmarks.startup                    # 4 sites, 3 rounds, 3 repeats each way; ~4 min on 2 cores

Runs FedAvg (cnn, 64 px, ``--images-per-site`` synthetic CR files per hospital) in the NVFlare simulator,
``--repeats`` times with the sites' preprocessed-image cache emptied first (**cold**: every DICOM decoded) and
``--repeats`` times with it kept (**warm**: the second job at a site). Per run:

* **wall s** — the whole ``run_simulation`` call (process start, imports, data, rounds, export, shutdown);
* **rounds s** — the sum of the server's per-round times (``results.json``), the part that trains;
* **overhead s** — wall − rounds: start-up, final evaluation/export and shutdown;
* **load s** — the slowest site's data loading ("loaded … in X s" in its log);
* **round 1 / later** — round 1's time over the median of later rounds (issue target: ≤ 2).

Medians over repeats; writes ``--out/startup.json`` and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import time
from pathlib import Path

from benchmarks.runner import RESULTS, WORK
from medsilo.config import JobSpec
from medsilo.jobs.simulate import run_simulation
from medsilo.medical.synth import SynthRequest, synthesize

LOAD_LINE = re.compile(r"(hospital-\d+): loaded \S+ train/val/test images in ([0-9.]+) s")


def one_run(spec: JobSpec, sites_yml: Path, run_dir: Path) -> dict:
    t0 = time.perf_counter()
    result = run_simulation(spec, sites_yml, run_dir, progress=False)
    wall = time.perf_counter() - t0
    rounds = [r["seconds"] for r in result["rounds"]]
    loads = [float(m.group(2)) for log in (run_dir / "workspace").glob("hospital-*/log.txt")
             for m in LOAD_LINE.finditer(log.read_text(errors="replace"))]  # fmt: skip
    return {"wall": wall, "rounds": sum(rounds), "overhead": wall - sum(rounds), "load": max(loads, default=0.0),
            "round1_ratio": rounds[0] / statistics.median(rounds[1:]) if len(rounds) > 1 else None,
            "round_seconds": rounds}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--images-per-site", type=int, default=600)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    req = SynthRequest("cxr", args.sites, args.images_per_site, seed=0)
    sites_yml = synthesize(WORK / f"startup_cxr_{args.sites}x{args.images_per_site}", req, force=False)
    spec = JobSpec(name="startup", modality="cxr", classes=list(req.class_names()), dataset="cxr",
                   image_size=args.image_size, model="cnn", algorithm={"name": "fedavg"},
                   training={"rounds": args.rounds, "local_epochs": 1, "batch_size": 32, "lr": 0.01})  # fmt: skip
    cache = sites_yml.parent / "cache"
    runs: dict[str, list[dict]] = {"cold": [], "warm": []}
    for i in range(args.repeats):
        for kind in ("cold", "warm"):
            if kind == "cold":
                shutil.rmtree(cache, ignore_errors=True)
            run = one_run(spec, sites_yml, WORK / "startup_runs" / kind)
            runs[kind].append(run)
            print(f"{kind} {i + 1}: wall {run['wall']:.1f} s, rounds {run['rounds']:.1f} s, load {run['load']:.2f} s, "
                  f"round 1 / later {run['round1_ratio']:.2f}", flush=True)  # fmt: skip
    summary = {kind: {key: statistics.median(r[key] for r in rs) for key in ("wall", "rounds", "overhead", "load",
                                                                            "round1_ratio")}
               for kind, rs in runs.items()}  # fmt: skip
    result = {"benchmark": "startup", "settings": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
              "summary": summary}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "startup.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(summary, args))
    return result


def table(summary: dict, args) -> str:
    lines = [f"| image cache ({args.sites} sites × {args.images_per_site} CR, {args.rounds} rounds) | wall s | rounds s | "
             "overhead s | slowest load s | round 1 / later |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for kind, s in summary.items():
        lines.append(f"| {kind} | {s['wall']:.1f} | {s['rounds']:.1f} | {s['overhead']:.1f} | {s['load']:.2f} | "
                     f"{s['round1_ratio']:.2f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
