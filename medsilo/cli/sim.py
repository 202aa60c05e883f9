"""``medsilo sim``: run a job spec in the NVFlare simulator on synthetic or local hospitals."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sim",
        help="run a job in the NVFlare simulator",
        description=(
            "Build the job folder for SPEC and run it in the NVFlare simulator, one simulated site per "
            "entry of --data (a sites.yml as written by 'medsilo synth'). Shows progress per round, "
            "prints a summary table and writes RUN_DIR/results.json."
        ),
    )
    p.add_argument("spec", type=Path, help="job spec YAML")
    p.add_argument("--data", type=Path, required=True, metavar="SITES.yml", help="sites.yml mapping sites to manifests")
    p.add_argument("--out", type=Path, required=True, metavar="RUN_DIR", help="run folder (results.json, logs)")
    p.add_argument("--rounds", type=int, default=None, help="override the spec's training.rounds")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in RUN_DIR from its last completed round (same spec and data)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medsilo.cli.summary import print_summary
    from medsilo.config import load_job_spec
    from medsilo.jobs.simulate import run_simulation

    spec = with_rounds(load_job_spec(args.spec), args.rounds)
    results = run_simulation(spec, args.data, args.out, progress=not args.quiet, resume=args.resume)
    print_summary([results])
    print(f"wrote {args.out / 'results.json'}")
    return 0


def with_rounds(spec, rounds: int | None):
    """``spec`` with ``training.rounds`` replaced (validated like the file: ≥ 1). A warm-up longer than the new
    rounds allow is shortened to leave one round after it (a quick ``--rounds 1`` check of a job with warm-up)."""
    from medsilo.errors import MedsiloError

    if rounds is None:
        return spec
    if rounds < 1:
        raise MedsiloError(f"--rounds: must be ≥ 1, got {rounds}")
    warmup = min(spec.training.warmup_rounds, rounds - 1)
    training = spec.training.model_copy(update={"rounds": rounds, "warmup_rounds": warmup})
    return spec.model_copy(update={"training": training})
