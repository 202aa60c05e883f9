"""Against the anchor: medsilo's FedAvg beside NVFlare 2.9's own FedAvg recipe and a single-process loop.

    python -m benchmarks.anchor                     # 4 sites × 60 CR, 32 px, 10 rounds, 2 repeats; ~12 min

The same synthetic hospitals, the same ``cnn`` (medsilo's model zoo), the same local work per round (score the
received model on the validation and test splits, one epoch of SGD at batch 16, lr 0.01, momentum 0.9), run
these ways:

* **medsilo, fork workers** — ``medsilo sim``'s FedAvg as shipped (sites forked from one pre-imported process);
* **medsilo, fresh workers** — the same job, every site a new interpreter (NVFlare's own way of starting them);
* **NVFlare FedAvgRecipe** — ``nvflare.app_opt.pt.recipes.fedavg.FedAvgRecipe`` with the Client API site script
  :mod:`benchmarks.anchor_train`, run by NVFlare's ``SimEnv`` (in-process Client API executor), as shipped, and
  again with the server telling sites to poll every 0.2 s (``task_request_interval``, NVFlare's default is 2 s;
  medsilo's jobs set 0.2 s, ``jobs/builder.py``);
* **POC** — medsilo's job submitted to its POC network (``medsilo.provisioning.poc``: real server and site
  processes, TLS, the admin API) and NVFlare's recipe under NVFlare's ``PocEnv`` (which provisions and starts
  its own POC network), both ways of polling;
* **one process, sequential** — a PFLlib-style loop written here: every site in this process, one after the
  other, weights averaged by steps (:func:`toy_fedavg`); what a toy simulation costs with no engine at all.

Per engine: **round s** (median of rounds ≥ 2; medsilo from ``results.json``, NVFlare from the gaps between its
"Round N started" log lines, the loop by its own clock), **round 1 s**, **job wall s** (in the simulator the
whole call, start-up and shutdown included; in POC from submitting the job to its result, the network already
running) and the last round's mean validation accuracy (a check that every engine learned).
Writes ``--out/anchor.json`` and a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import re
import shutil
import statistics
import time
from pathlib import Path

import torch

from benchmarks.anchor_common import CLASSES, evaluate, site_data, train_epoch
from benchmarks.runner import RESULTS, WORK
from medsilo.config import JobSpec, load_sites_file
from medsilo.jobs.builder import TASK_REQUEST_INTERVAL
from medsilo.medical.synth import SynthRequest, synthesize

REPO = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _spec(args) -> JobSpec:
    return JobSpec(name="anchor-fedavg", modality="cxr", classes=CLASSES, dataset="cxr", image_size=args.image_size,
                   model="cnn", feature_dim=32, algorithm={"name": "fedavg"}, seed=args.seed,
                   training={"rounds": args.rounds, "local_epochs": 1, "batch_size": 16, "lr": 0.01})  # fmt: skip


def _stamp(text: str) -> float:
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").astimezone().timestamp()


def run_medsilo(args, sites_yml: Path, workers: str) -> dict:
    from medsilo.jobs.simulate import run_simulation

    t0 = time.perf_counter()
    results = run_simulation(_spec(args), sites_yml, WORK / "anchor_runs" / f"medsilo_{workers}", progress=False,
                             workers=workers)  # fmt: skip
    return _medsilo_row(results, time.perf_counter() - t0)


def run_medsilo_poc(args, sites_yml: Path) -> dict:
    """medsilo's FedAvg job submitted to a POC network (real server and site processes, TLS, admin API)."""
    from medsilo.jobs.deploy import run_deployed
    from medsilo.provisioning import poc

    workspace = WORK / "anchor_runs" / "medsilo_poc"
    spec = _spec(args)
    names = list(load_sites_file(sites_yml).sites)
    state = poc.up(sites_yml, workspace, progress=False)
    try:
        t0 = time.perf_counter()
        with poc.admin_session(workspace) as sess:
            results = run_deployed(spec, sess, job_root=workspace / "jobs", run_dir=workspace / "runs" / spec.name,
                                   min_sites=len(names), server_workspace=Path(state["kits"]) / "server", progress=False)  # fmt: skip
        wall = time.perf_counter() - t0
    finally:
        left = poc.down(workspace)
    if left:
        raise RuntimeError(f"processes left after the POC: {left}")
    return _medsilo_row(results, wall)


def _medsilo_row(results: dict, wall: float) -> dict:
    return {"rounds": [r["seconds"] for r in results["rounds"]], "wall": wall,
            "val_acc": results["rounds"][-1]["mean_val_acc"]}  # fmt: skip


def run_nvflare(args, sites_yml: Path, task_request_interval: float | None = None) -> dict:
    """NVFlare's FedAvgRecipe under its ``SimEnv``."""
    from nvflare.recipe.sim_env import SimEnv

    root = WORK / "anchor_runs" / f"nvflare_{task_request_interval or 'default'}"
    recipe, names = _recipe(args, sites_yml, root)
    t0 = time.perf_counter()
    recipe.execute(SimEnv(clients=names, num_threads=len(names), workspace_root=str(root)),
                   server_exec_params=_polling(task_request_interval))  # fmt: skip
    return _recipe_rounds(root, time.perf_counter() - t0)


def run_nvflare_poc(args, sites_yml: Path, task_request_interval: float | None = None) -> dict:
    """NVFlare's FedAvgRecipe under its ``PocEnv``: a local POC network it provisions and starts itself."""
    from nvflare.recipe.poc_env import PocEnv

    root = WORK / "anchor_runs" / f"nvflare_poc_{task_request_interval or 'default'}"
    recipe, names = _recipe(args, sites_yml, root)
    os.environ["NVFLARE_POC_WORKSPACE"] = str(root / "poc")
    run = recipe.execute(PocEnv(num_clients=len(names), clients=names),  # provisions and starts the network
                         server_exec_params=_polling(task_request_interval))  # fmt: skip
    t0 = time.perf_counter()
    run.get_result(timeout=1800, clean_up=False)  # submit → done (and NVFlare stops its POC network)
    return {**_recipe_rounds(root, time.perf_counter() - t0), "status": run.get_status()}


def _recipe(args, sites_yml: Path, root: Path):
    """NVFlare's FedAvgRecipe for the anchor job, a fresh ``root`` for its run, and the site names.

    The site script imports ``benchmarks.*`` and medsilo from this checkout, uses one torch thread per site (as
    medsilo's sites do) and appends its accuracies to ``root/metrics.jsonl``.
    """
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe

    from benchmarks.anchor_train import AnchorCNN

    names = list(load_sites_file(sites_yml).sites)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    os.environ.update({"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), *(p for p in paths if p != str(REPO))])),
                       "ANCHOR_THREADS": str(max(1, (os.cpu_count() or 1) // len(names))),
                       "ANCHOR_METRICS": str(root / "metrics.jsonl")})  # fmt: skip
    recipe = FedAvgRecipe(name="anchor-fedavg", model=AnchorCNN(feature_dim=32, seed=args.seed), min_clients=len(names),
                          num_rounds=args.rounds, train_script=str(Path(__file__).with_name("anchor_train.py")),
                          train_args=f"--sites-file {sites_yml} --image-size {args.image_size} --seed {args.seed}")  # fmt: skip
    return recipe, names


def _polling(task_request_interval: float | None) -> dict | None:
    """Server config telling sites how often to ask for a task (None: NVFlare's default, 2 s)."""
    return {"server": {"task_request_interval": task_request_interval}} if task_request_interval else None


def _recipe_rounds(root: Path, wall: float) -> dict:
    """Round times (from the server log's "Round N started" lines) and the sites' last validation accuracy."""
    log = next(p for p in root.rglob("log.txt") if "Round 1 started" in p.read_text(errors="replace"))
    starts, last = [], None  # NVFlare prints "Round N started." / "Finished FedAvg." centred under a stamped line
    for line in log.read_text(errors="replace").splitlines():
        if m := STAMP.match(line):
            last = _stamp(m.group(1))
        elif re.search(r"Round \d+ started\.|Finished FedAvg\.", line):
            starts.append(last)
    metrics = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    final = [m["val_acc"] for m in metrics if m["round"] == max(m["round"] for m in metrics)]
    return {"rounds": [b - a for a, b in zip(starts, starts[1:])], "wall": wall, "val_acc": statistics.mean(final)}


def toy_fedavg(args, sites_yml: Path) -> dict:
    """All sites in this process, one after the other, as a PFLlib-style simulation runs them."""
    from benchmarks.anchor_train import AnchorCNN

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    sites = {site: site_data(sites_yml, site, args.image_size, args.seed) for site in load_sites_file(sites_yml).sites}
    global_model = AnchorCNN(feature_dim=32, seed=args.seed)
    rounds, val = [], []
    for rnd in range(1, args.rounds + 1):
        t = time.perf_counter()
        states, weights, val = [], [], []
        for data in sites.values():
            local = copy.deepcopy(global_model)
            val.append(evaluate(local, data.val))
            evaluate(local, data.test)
            weights.append(train_epoch(local, data.train, batch_size=16, lr=0.01, seed=args.seed + rnd))
            states.append(local.state_dict())
        total = sum(weights)
        averaged = {k: sum(s[k].double() * w for s, w in zip(states, weights)) / total for k in states[0]}
        global_model.load_state_dict({k: v.to(states[0][k].dtype) for k, v in averaged.items()})
        rounds.append(time.perf_counter() - t)
    return {"rounds": rounds, "wall": time.perf_counter() - t0, "val_acc": statistics.mean(val)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--images-per-site", type=int, default=60)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    sites_yml = synthesize(WORK / f"anchor_{args.sites}x{args.images_per_site}",
                           SynthRequest("cxr", args.sites, args.images_per_site, seed=args.seed), progress=False)  # fmt: skip
    engines = {"medsilo FedAvg, simulator, fork workers": lambda: run_medsilo(args, sites_yml, "fork"),
               "medsilo FedAvg, simulator, fresh workers": lambda: run_medsilo(args, sites_yml, "fresh"),
               "NVFlare 2.9 FedAvgRecipe (Client API), SimEnv": lambda: run_nvflare(args, sites_yml),
               "NVFlare 2.9 FedAvgRecipe, SimEnv, sites poll every 0.2 s (as medsilo's jobs)":
                   lambda: run_nvflare(args, sites_yml, TASK_REQUEST_INTERVAL),
               "medsilo FedAvg, POC (real processes)": lambda: run_medsilo_poc(args, sites_yml),
               "NVFlare 2.9 FedAvgRecipe (Client API), PocEnv": lambda: run_nvflare_poc(args, sites_yml),
               "NVFlare 2.9 FedAvgRecipe, PocEnv, sites poll every 0.2 s":
                   lambda: run_nvflare_poc(args, sites_yml, TASK_REQUEST_INTERVAL),
               "one process, sites in sequence (PFLlib-style loop)": lambda: toy_fedavg(args, sites_yml)}  # fmt: skip
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    for i in range(args.repeats):
        for name, run in engines.items():  # interleaved, so drift on a shared machine hits every engine
            r = run()
            runs[name].append(r)
            print(f"{name} {i + 1}: round {statistics.median(r['rounds'][1:]):.2f} s, round 1 {r['rounds'][0]:.2f} s, "
                  f"wall {r['wall']:.1f} s, val acc {r['val_acc']}", flush=True)  # fmt: skip
    summary = {name: {"round_s": statistics.median(statistics.median(r["rounds"][1:]) for r in rs),
                      "round1_s": statistics.median(r["rounds"][0] for r in rs),
                      "wall_s": statistics.median(r["wall"] for r in rs),
                      "val_acc": statistics.median(r["val_acc"] for r in rs if r["val_acc"] is not None)}
               for name, rs in runs.items()}  # fmt: skip
    result = {"benchmark": "anchor", "settings": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
              "summary": summary}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "anchor.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(summary, args))
    return result


def table(summary: dict, args) -> str:
    lines = [f"| engine ({args.sites} sites × {args.images_per_site} CR, {args.image_size} px, {args.rounds} rounds) | "
             "round s (median, r ≥ 2) | round 1 s | job wall s | last-round mean val acc |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for name, s in summary.items():
        lines.append(f"| {name} | {s['round_s']:.2f} | {s['round1_s']:.2f} | {s['wall_s']:.1f} | {s['val_acc']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
