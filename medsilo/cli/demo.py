"""``medsilo demo``: the whole thing on synthetic hospitals, in one command.

Synthesizes (once; later runs reuse it) eight chest X-ray hospitals with different scanners and label
mixes, runs the default federated job and its Local baseline in the NVFlare simulator, prints the
comparison and writes ``DIR/report.html`` and ``DIR/results.json`` (the default job's).
"""

from __future__ import annotations

import argparse
import shutil
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

DEMO_JOB = "cxr_demo.yml"
"""The default job (in ``jobs/``)."""


def demo_request():
    """The demo's hospitals: 8 chest X-ray sites of 400 images, four findings, full scanner shift, Dirichlet(0.3)
    label skew — the hospitals of ``benchmarks.pfl``'s four-finding table (seed 0), where joining pays."""
    from medsilo.medical.synth import SynthRequest

    return SynthRequest("cxr", sites=8, images_per_site=400, seed=0, dirichlet_alpha=0.3, shift=1.0,
                        classes=("normal", "pneumonia", "effusion", "nodule"))  # fmt: skip


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run a federated job and its Local baseline on synthetic hospitals, with a report",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument("--out", type=Path, default=Path("demo"), help="output folder (default: ./demo)")
    p.add_argument("--rounds", type=int, default=None, help="override the demo job's rounds")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medsilo.cli.sim import with_rounds
    from medsilo.cli.summary import print_summary
    from medsilo.config import load_job_spec, load_sites_file
    from medsilo.jobs.simulate import run_simulation
    from medsilo.medical.synth import synthesize
    from medsilo.report import write_report
    from medsilo.secure.keys import ensure_simulation_pki

    out: Path = args.out
    sites_file = synthesize(out / "hospitals", demo_request(), progress=not args.quiet)
    spec_path = resources.files("medsilo.jobs").joinpath(DEMO_JOB)
    spec = with_rounds(load_job_spec(Path(str(spec_path))), args.rounds)
    local = spec.model_copy(update={"name": f"{spec.name}-local",
                                    "algorithm": spec.algorithm.model_copy(update={"name": "local", "params": {}})})  # fmt: skip
    # The two jobs run side by side, as two jobs at the same hospitals would: on two cores each one's sites
    # spend much of a round waiting for the simulator's task polling, which the other fills. The sites'
    # ledgers take concurrent writers (a file lock); their signing keys are made once, before either starts.
    ensure_simulation_pki(sites_file.parent / "ledgers", load_sites_file(sites_file).sites)
    jobs = (spec, local)
    for job in jobs:
        print(f"running {job.name} ({job.algorithm.name}) on {sites_file.parent} ...", flush=True)
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [pool.submit(run_simulation, job, sites_file, out / "runs" / job.name, progress=not args.quiet,
                               label=job.algorithm.name, position=i) for i, job in enumerate(jobs)]  # fmt: skip
        runs = [f.result() for f in futures]
    print()
    print_summary(runs)
    report = write_report(runs, out / "report.html", title=f"medsilo demo: {spec.algorithm.name} vs local")
    shutil.copyfile(out / "runs" / spec.name / "results.json", out / "results.json")
    print(f"wrote {report} and {out / 'results.json'}")
    models = out / "runs" / spec.name / "models"
    kept = sorted(site for site, e in runs[0].get("exports", {}).items() if "round" in e)
    if kept:
        first = kept[0]
        manifest = load_sites_file(sites_file).sites[first].manifest
        print(f"each hospital's {spec.algorithm.name} model (round {runs[0]['selected_round']}, with a model card) is in "
              f"{models}/<site>/; score {first}'s test images with:")  # fmt: skip
        ledgers = sites_file.parent / "ledgers"
        print(f"  medsilo predict --model {models / first} --manifest {manifest} --split test "
              f"--out {out / f'predictions-{first}.csv'} --ledger {ledgers / first / 'privacy_ledger.jsonl'} "
              f"--root-ca {ledgers / 'pki' / 'rootCA.pem'}")  # fmt: skip
    return 0
