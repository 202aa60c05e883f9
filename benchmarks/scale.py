"""Scale on one machine: many simulated sites, and real processes, against the sites' pure training time.

    python -m benchmarks.scale                      # 5/10/20 simulated sites, 3/6 real processes
    python -m benchmarks.scale --sim 5 --poc 3      # a quick subset
    python -m benchmarks.scale --sim 20 --poc --workers fork fresh   # forked vs fresh site workers, side by side
    python -m benchmarks.scale --sim 50 --poc --no-pure-local --rounds 3 --name scale50   # memory at 50 sites

Each configuration runs FedAvg on a small CNN (32×32 chest X-rays, ``--images-per-site`` per hospital) and
reports, per configuration:

* **round s** — median wall time of a round after the first (round 1 also starts the site processes),
  from the server's ``results.json``;
* **site task s** — median over rounds ≥ 2 of the slowest site's task time (receive + evaluate + train,
  from each site's log), i.e. the critical path of the sites' own work;
* **pure local s** — the same per-site work (evaluate + one local epoch) of *every* site run back to
  back in one plain Python process with no NVFlare, torch using all cores: what the computation costs
  without any platform;
* **ratio** — round s / pure local s (target ≤ 1.3 with small models);
* **workers** — ``fork``: simulated sites forked from one pre-imported process (the default,
  :mod:`medsilo.jobs.simworkers`); ``fresh``: each site a new interpreter, as NVFlare starts them;
* **peak memory** — the largest sum of proportional set size (PSS) over every process of the run, sampled
  every 0.5 s; the RSS sum, which counts torch's shared libraries once per process, is shown too.

Results go to ``--out/scale.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.runner import RESULTS, WORK
from medsilo.config import JobSpec, load_sites_file, read_manifest
from medsilo.medical.synth import SynthRequest, synthesize

TASK_LINE = re.compile(r"(hospital-\d+): train round (\d+) done in ([0-9.]+) s")


def _spec(rounds: int, seed: int) -> JobSpec:
    return JobSpec(name="scale-fedavg", modality="cxr", classes=["normal", "pneumonia"], dataset="cxr", image_size=32,
                   model="cnn", feature_dim=32, algorithm={"name": "fedavg"}, seed=seed,
                   training={"rounds": rounds, "local_epochs": 1, "batch_size": 16, "lr": 0.01})  # fmt: skip


class MemorySampler:
    """Memory of the processes whose command line or environment mentions ``marker``; keeps the peaks.

    Two sums: RSS (counts shared library pages once per process, so it overstates what N processes that
    all import torch cost) and PSS (shared pages split between the processes sharing them: what the
    machine actually spends).
    """

    def __init__(self, marker: str):
        self.marker = marker.encode()
        self.peak = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> tuple[int, int]:
        rss = pss = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if self.marker not in (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes():
                    continue
                for line in (entry / "smaps_rollup").read_text().splitlines():
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
            except OSError:
                continue
        return rss, pss

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss = self._sample()
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            self._stop.wait(0.5)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _site_task_seconds(logs: list[Path]) -> dict[int, float]:
    """Round → the slowest site's train-task seconds, from the sites' logs."""
    per_round: dict[int, float] = {}
    for log in logs:
        for _site, rnd, secs in TASK_LINE.findall(log.read_text(errors="replace") if log.is_file() else ""):
            per_round[int(rnd)] = max(per_round.get(int(rnd), 0.0), float(secs))
    return per_round


def pure_local_seconds(spec: JobSpec, sites_yml: Path, repeats: int = 2) -> float:
    """Every site's evaluate + one local epoch, back to back in this process without NVFlare (median of repeats)."""
    import torch

    from medsilo.components.algorithms import algorithm_module
    from medsilo.components.algorithms.base import SiteSetup
    from medsilo.components.executor import site_seed
    from medsilo.components.training import evaluate_split
    from medsilo.medical.data import channels_of, load_site_data
    from medsilo.medical.models import build_model

    torch.set_num_threads(os.cpu_count() or 1)
    clients = []
    for site, entry in load_sites_file(sites_yml).sites.items():
        data = load_site_data(read_manifest(entry.manifest, spec.classes), modality="cxr", image_size=spec.image_size,
                              seed=site_seed(spec.seed, site))  # fmt: skip
        model = build_model("cnn", in_channels=channels_of("cxr"), num_classes=2, feature_dim=spec.feature_dim,
                            seed=spec.seed)  # fmt: skip
        setup = SiteSetup(site=site, model=model, data=data, num_classes=2, training=spec.training,
                          seed=site_seed(spec.seed, site), batch_size=spec.training.batch_size)  # fmt: skip
        clients.append((algorithm_module("fedavg").Client(setup, spec.algorithm.config()), data))
    times = []
    for rnd in range(1, repeats + 2):
        t0 = time.perf_counter()
        for client, data in clients:
            for split in (data.val, data.test):  # what the executor does before training
                evaluate_split(client.scores, split)
            client.train(rnd)
        if rnd > 1:  # the first pass warms up allocators and kernels, as round 1 does in the federation
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_sim(n: int, args: argparse.Namespace, workers: str = "fork") -> dict[str, Any]:
    from medsilo.jobs.simulate import run_simulation

    sites_yml = synthesize(WORK / f"scale_{n}x{args.images_per_site}", SynthRequest(
        "cxr", n, args.images_per_site, seed=args.seed), progress=False)  # fmt: skip
    spec = _spec(args.rounds, args.seed)
    run_dir = WORK / "scale_runs" / f"sim{n}_{workers}"
    with MemorySampler(str(run_dir)) as mem:
        t0 = time.perf_counter()
        results = run_simulation(spec, sites_yml, run_dir, progress=False, workers=workers)
        wall = time.perf_counter() - t0
    logs = [run_dir / "workspace" / s / "log.txt" for s in results["sites"]]
    pure = pure_local_seconds(spec, sites_yml) if args.pure_local else None
    return _row(f"simulator, {n} sites, {workers} workers", results, logs, mem, wall, pure)


def run_poc(n: int, args: argparse.Namespace) -> dict[str, Any]:
    from medsilo.jobs.deploy import run_deployed
    from medsilo.provisioning import poc

    sites_yml = synthesize(WORK / f"scale_{n}x{args.images_per_site}", SynthRequest(
        "cxr", n, args.images_per_site, seed=args.seed), progress=False)  # fmt: skip
    spec = _spec(args.rounds, args.seed)
    workspace = WORK / "scale_runs" / f"poc{n}"
    with MemorySampler(str(workspace.resolve())) as mem:
        state = poc.up(sites_yml, workspace, progress=False)
        try:
            t0 = time.perf_counter()
            with poc.admin_session(workspace) as sess:
                results = run_deployed(spec, sess, job_root=workspace / "jobs", run_dir=workspace / "runs" / spec.name,
                                       min_sites=n, server_workspace=Path(state["kits"]) / "server",
                                       progress=False)  # fmt: skip
            wall = time.perf_counter() - t0
        finally:
            left = poc.down(workspace)
    if left:
        raise RuntimeError(f"processes left after the POC: {left}")
    logs = [Path(state["kits"]) / s / results["job_id"] / "log.txt" for s in results["sites"]]
    return _row(f"real processes, {n} sites", results, logs, mem, wall, pure_local_seconds(spec, sites_yml))


def _row(label: str, results: dict, logs: list[Path], mem: MemorySampler, wall: float, pure: float | None) -> dict[str, Any]:
    rounds = [r["seconds"] for r in results["rounds"][1:]]
    tasks = _site_task_seconds(logs)
    task = statistics.median(tasks[r] for r in range(2, len(results["rounds"]) + 1) if r in tasks) if tasks else None
    round_s = statistics.median(rounds)
    return {"label": label, "sites": len(results["sites"]), "round_s": round_s, "first_round_s": results["rounds"][0]["seconds"],
            "site_task_s": task, "pure_local_s": pure, "ratio": round_s / pure if pure else None, "peak_rss_gib": mem.peak / 2**30, "peak_pss_gib": mem.peak_pss / 2**30,
            "job_wall_s": wall, "mean_acc": results["final"]["mean_acc"]}  # fmt: skip


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| configuration | round s (median, r ≥ 2) | round 1 s | slowest site task s | pure local s | ratio | "
             "peak memory GiB (PSS) | peak RSS sum GiB | job wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        task, pure, ratio = (f"{r[k]:.2f}" if r[k] is not None else "n/a" for k in ("site_task_s", "pure_local_s", "ratio"))
        lines.append(f"| {r['label']} | {r['round_s']:.2f} | {r['first_round_s']:.1f} | {task} | {pure} | "
                     f"{ratio} | {r['peak_pss_gib']:.2f} | {r['peak_rss_gib']:.2f} | {r['job_wall_s']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sim", type=int, nargs="*", default=[5, 10, 20], help="simulated site counts")
    parser.add_argument("--poc", type=int, nargs="*", default=[3, 6], help="real-process site counts")
    parser.add_argument("--images-per-site", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", nargs="+", choices=("fork", "fresh"), default=["fork"],
                        help="how simulated sites start (medsilo.jobs.simworkers); both → one row each, side by side")
    parser.add_argument("--no-pure-local", dest="pure_local", action="store_false",
                        help="skip the pure-local reference (ratio n/a); for memory-only runs at many sites")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="scale", help="results file name (default: scale → scale.json)")
    args = parser.parse_args(argv)
    rows = [run_sim(n, args, w) for n in args.sim for w in args.workers] + [run_poc(n, args) for n in args.poc]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
