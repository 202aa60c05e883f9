"""``medsilo job``: check a job spec, build it into a standard NVFlare job folder, or show the spec a built
folder carries (encoded there, :func:`medsilo.config.job.encode_job`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("job", help="check or build job specs", description="Work with job spec files (jobs/*.yml).")
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    check = verbs.add_parser(
        "check",
        help="validate a job spec",
        description="Validate a job spec; prints a summary, or names the file, field and fix and exits 2.",
    )
    check.add_argument("spec", type=Path, help="job spec YAML")
    check.set_defaults(func=run_check)
    build = verbs.add_parser(
        "build",
        help="export a job spec as an NVFlare job folder",
        description=(
            "Write a standard NVFlare job folder that references the pre-installed medsilo components (no "
            "custom code, no data paths). Submit it with 'nvflare job submit' or the admin console."
        ),
    )
    build.add_argument("spec", type=Path, help="job spec YAML")
    build.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write <job name>/ into")
    build.add_argument("--min-sites", type=int, default=1, help="sites that must be connected to deploy (default 1)")
    build.set_defaults(func=run_build)
    show = verbs.add_parser(
        "show",
        help="print the spec a built job folder carries",
        description="Decode the job spec inside a built NVFlare job folder and print it as YAML, checked.",
    )
    show.add_argument("folder", type=Path, metavar="JOB_DIR", help="a folder written by 'medsilo job build'")
    show.set_defaults(func=run_show)


def run_check(args: argparse.Namespace) -> int:
    from medsilo.config import load_job_spec

    spec = load_job_spec(args.spec)
    model = spec.model if isinstance(spec.model, str) else ", ".join(f"{s}: {b}" for s, b in spec.model.items())
    print(f"{args.spec}: ok")
    print(f"  job {spec.name}: {spec.modality}, classes {', '.join(spec.classes)}, dataset '{spec.dataset}'")
    print(f"  algorithm {spec.algorithm.name}, model {model} (d={spec.feature_dim}), {spec.image_size}² input")
    print(f"  {spec.training.rounds} rounds × {spec.training.local_epochs} local epoch(s), privacy {spec.privacy.mode}")
    return 0


def run_build(args: argparse.Namespace) -> int:
    from medsilo.config import load_job_spec
    from medsilo.errors import MedsiloError
    from medsilo.jobs.builder import export_job

    if args.min_sites < 1:
        raise MedsiloError(f"--min-sites: must be ≥ 1, got {args.min_sites}")
    target = export_job(load_job_spec(args.spec), args.out, min_sites=args.min_sites)
    print(f"wrote {target}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    import json

    import yaml

    from medsilo.config import JobSpec
    from medsilo.config.job import decode_job
    from medsilo.config.loading import validate
    from medsilo.errors import MedsiloError

    config = args.folder / "app" / "config" / "config_fed_client.json"
    try:
        executor = json.loads(config.read_text())["executors"][0]["executor"]
        encoded = executor["args"]["job"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise MedsiloError(f"{config}: not a medsilo job folder ({type(exc).__name__}); give the folder "
                           "'medsilo job build' wrote") from None  # fmt: skip
    spec = validate(decode_job(encoded), JobSpec, str(config))
    print(f"# {args.folder}: the spec its components receive")
    print(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), end="")
    return 0
