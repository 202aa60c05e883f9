"""``medsilo job``: work with job specs (``check`` now; ``build`` arrives with the round engine)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("job", help="check job specs", description="Work with job spec files (jobs/*.yml).")
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    check = verbs.add_parser(
        "check",
        help="validate a job spec",
        description="Validate a job spec; prints a summary, or names the file, field and fix and exits 2.",
    )
    check.add_argument("spec", type=Path, help="job spec YAML")
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    from medsilo.config import load_job_spec

    spec = load_job_spec(args.spec)
    model = spec.model if isinstance(spec.model, str) else ", ".join(f"{s}: {b}" for s, b in spec.model.items())
    print(f"{args.spec}: ok")
    print(f"  job {spec.name}: {spec.modality}, classes {', '.join(spec.classes)}, dataset '{spec.dataset}'")
    print(f"  algorithm {spec.algorithm.name}, model {model} (d={spec.feature_dim}), {spec.image_size}² input")
    print(f"  {spec.training.rounds} rounds × {spec.training.local_epochs} local epoch(s), privacy {spec.privacy.mode}")
    return 0
