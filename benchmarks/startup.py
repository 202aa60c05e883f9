"""Start-up of a simulator job: where the seconds before and after training go, per way of starting sites.

    python -m benchmarks.startup                    # 4 sites, 3 rounds, 3 repeats of each configuration; ~6 min

Runs FedAvg (cnn, 64 px, ``--images-per-site`` synthetic CR files per hospital) in the NVFlare simulator, with the
sites' preprocessed-image cache emptied first (**cold**: every DICOM decoded) or kept (**warm**: the second job
at a site), and with the site workers **fork**ed from one pre-imported process (the default,
:mod:`medsilo.jobs.simworkers`) or started **fresh** (each a new interpreter, as NVFlare starts them). Per run:

* **wall s** — the whole ``run_simulation`` call (process start, imports, data, rounds, export, shutdown);
* **rounds s** — the sum of the server's per-round times (``results.json``), the part that trains;
* **overhead s** — wall − rounds;
* **load s** — the slowest site's data loading ("loaded … in X s" in its log);
* **round 1 / later** — round 1's time over the median of later rounds (issue target: ≤ 2);
* phases from the simulator's log: **launch** (call → the server's controller starts), **sites up** (→ the last
  site has joined: worker start, imports, data), **train** (first train task → export task), **export**
  (→ the job's summary line) and **shutdown** (→ the call returns; NVFlare's processes wait 3 s before exiting).

Medians over repeats; writes ``--out/startup.json`` and a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
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
STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - \w+ - "
MARKS = {"controller": "Initializing BaseModelController", "joined": r"hospital-\d+: joined job",
         "train": "Sending task train", "export": "Sending task export", "done": r"job \S+: done;"}  # fmt: skip
PHASES = ("launch", "sites_up", "train", "export", "shutdown")


def _stamps(log: Path) -> dict[str, list[float]]:
    """Seconds since the epoch of each marked line of the simulator's console log."""
    text = log.read_text(errors="replace")
    out: dict[str, list[float]] = {}
    for key, pattern in MARKS.items():
        for m in re.finditer(STAMP + ".*?" + pattern, text, flags=re.MULTILINE):
            when = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").astimezone().timestamp()
            out.setdefault(key, []).append(when)
    return out


def one_run(spec: JobSpec, sites_yml: Path, run_dir: Path, workers: str) -> dict:
    t0, p0 = time.time(), time.perf_counter()
    result = run_simulation(spec, sites_yml, run_dir, progress=False, workers=workers)
    wall, t1 = time.perf_counter() - p0, time.time()
    rounds = [r["seconds"] for r in result["rounds"]]
    loads = [float(m.group(2)) for log in (run_dir / "workspace").glob("hospital-*/log.txt")
             for m in LOAD_LINE.finditer(log.read_text(errors="replace"))]  # fmt: skip
    st = _stamps(run_dir / "simulator.log")
    edges = [t0, st["controller"][0], max(st["joined"]), st["export"][0], st["done"][0], t1]
    phases = dict(zip(PHASES, (b - a for a, b in zip(edges, edges[1:]))))
    return {"wall": wall, "rounds": sum(rounds), "overhead": wall - sum(rounds), "load": max(loads, default=0.0),
            "round1_ratio": rounds[0] / statistics.median(rounds[1:]) if len(rounds) > 1 else None,
            "round_seconds": rounds, **phases}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--images-per-site", type=int, default=600)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", nargs="+", choices=("fork", "fresh"), default=["fork", "fresh"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    req = SynthRequest("cxr", args.sites, args.images_per_site, seed=0)
    sites_yml = synthesize(WORK / f"startup_cxr_{args.sites}x{args.images_per_site}", req, force=False)
    spec = JobSpec(name="startup", modality="cxr", classes=list(req.class_names()), dataset="cxr",
                   image_size=args.image_size, model="cnn", algorithm={"name": "fedavg"},
                   training={"rounds": args.rounds, "local_epochs": 1, "batch_size": 32, "lr": 0.01})  # fmt: skip
    cache = sites_yml.parent / "cache"
    configs = [(w, c) for w in args.workers for c in ("cold", "warm")]
    runs: dict[str, list[dict]] = {f"{w}, {c}": [] for w, c in configs}
    for i in range(args.repeats):
        for workers, kind in configs:  # interleaved, so drift on a shared machine hits every configuration
            if kind == "cold":
                shutil.rmtree(cache, ignore_errors=True)
            run = one_run(spec, sites_yml, WORK / "startup_runs" / f"{workers}_{kind}", workers)
            runs[f"{workers}, {kind}"].append(run)
            print(f"{workers}, {kind} {i + 1}: wall {run['wall']:.1f} s, rounds {run['rounds']:.1f} s, "
                  f"load {run['load']:.2f} s, round 1 / later {run['round1_ratio']:.2f}, "
                  + ", ".join(f"{p} {run[p]:.1f}" for p in PHASES), flush=True)  # fmt: skip
    keys = ("wall", "rounds", "overhead", "load", "round1_ratio", *PHASES)
    summary = {name: {key: statistics.median(r[key] for r in rs) for key in keys} for name, rs in runs.items()}
    result = {"benchmark": "startup", "settings": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
              "summary": summary}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "startup.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(summary, args))
    return result


def table(summary: dict, args) -> str:
    lines = [f"| site workers, image cache ({args.sites} sites × {args.images_per_site} CR, {args.rounds} rounds) | "
             "wall s | rounds s | overhead s | slowest load s | round 1 / later | launch | sites up | train | export | "
             "shutdown |", "|---|" + "---:|" * 10]  # fmt: skip
    for name, s in summary.items():
        lines.append(f"| {name} | {s['wall']:.1f} | {s['rounds']:.1f} | {s['overhead']:.1f} | {s['load']:.2f} | "
                     f"{s['round1_ratio']:.2f} | " + " | ".join(f"{s[p]:.1f}" for p in PHASES) + " |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
