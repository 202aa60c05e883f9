"""Shared by the FL benchmarks: run job variants in the NVFlare simulator and tabulate them."""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medsilo.config import JobSpec
from medsilo.config.job import decode_job
from medsilo.errors import MedsiloError
from medsilo.fs import write_atomic
from medsilo.jobs.simulate import run_simulation
from medsilo.medical.synth import SynthRequest, synthesize
from medsilo.report import summary_row, write_report

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(__file__).resolve().parent / "work"


def add_hospital_args(parser: argparse.ArgumentParser, *, rounds: int = 20) -> None:
    """The options every simulator benchmark on synthetic hospitals shares (data, training, output)."""
    parser.add_argument("--modality", choices=["cxr", "pathology"], default="cxr",
                        help="chest X-ray hospitals (default) or pathology labs")  # fmt: skip
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--images-per-site", type=int, default=600)
    parser.add_argument("--dirichlet-alpha", type=float, default=1.0)
    parser.add_argument("--shift", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--lr-schedule", choices=["constant", "cosine", "step"], default="constant")
    parser.add_argument("--warmup-rounds", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--class-weights", choices=["none", "balanced"], default="none")
    parser.add_argument("--loss", choices=["cross-entropy", "logit-adjusted"], default="cross-entropy",
                        help="the job's training.loss")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", nargs="+", default=None,
                        help="classes in label order (default normal pneumonia / normal tumor); e.g. normal pneumonia "
                             "effusion nodule, or the pathology grades normal low-grade high-grade")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS)


ADDED_LATER = {"modality": "cxr", "params": []}
"""Options added after results files were written, with the value those files ran with (what :func:`same_settings`
assumes when a file does not record one)."""


def same_settings(result: dict[str, Any], args: argparse.Namespace, ignore: tuple[str, ...]) -> bool:
    """Whether the results file ``result`` was written with ``args``'s settings (but those in ``ignore`` and
    ``out``): the test a resumed benchmark uses to keep a finished seed."""
    settings = {k: v for k, v in vars(args).items() if k not in (*ignore, "out")}
    recorded = {**ADDED_LATER, **result["settings"]}
    return {k: recorded.get(k) for k in settings} == settings


def kept_seed(args: argparse.Namespace, name: str, labels: set[str], ignore: tuple[str, ...],
              say: bool = True) -> dict[str, Any] | None:  # fmt: skip
    """``<args.out>/<name>.json`` when an earlier run wrote it with ``args``'s settings (but ``ignore``) and rows for
    every label in ``labels``, so a stopped multi-seed benchmark resumes from its finished seeds; else ``None``."""
    path = args.out / f"{name}.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if not same_settings(result, args, ignore) or not labels <= {row["label"] for row in result["rows"]}:
        return None
    if say:
        print(f"seed {args.seed}: kept {path.name}", flush=True)
    return result


def seed_result(args: argparse.Namespace, name: str, labels: set[str], ignore: tuple[str, ...],
                run: Callable[[str, set[str]], dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """One seed of a multi-seed benchmark: ``<args.out>/<name>.json`` when :func:`kept_seed` keeps it, else
    ``run(name, labels)`` (which runs those labels on the seed's hospitals and writes ``<out>/<name>.json``).

    A file of these settings that lacks some of ``labels`` is added to, not replaced: only the missing labels run
    (written as ``<name>_adding.json`` until they finish), and their rows join the file's, so a sweep extended to
    more algorithms keeps the runs it has. The added runs must have seen the same hospitals (``synthetic_data``);
    else the benchmark stops and leaves both files.
    """
    kept = kept_seed(args, name, labels, ignore)
    if kept is not None:
        return kept
    earlier = kept_seed(args, name, set(), ignore, say=False)
    if earlier is None:
        return run(name, labels)
    have = {row["label"] for row in earlier["rows"]}
    missing = labels - have
    print(f"seed {args.seed}: adding {', '.join(sorted(missing))} to {name}.json", flush=True)
    added = run(f"{name}_adding", missing)
    if added["synthetic_data"] != earlier["synthetic_data"]:
        raise SystemExit(f"{args.out / name}_adding.json ran on other hospitals than {name}.json (its "
                         "synthetic_data differs); rerun both with one version of the generator")  # fmt: skip
    merged = {**earlier, "rows": [*earlier["rows"], *added["rows"]],
              "per_site": {**earlier["per_site"], **added["per_site"]},
              "added": [*earlier.get("added", []), {"labels": sorted(missing), "settings": added["settings"]}]}  # fmt: skip
    write_atomic(args.out / f"{name}.json", json.dumps(merged, indent=2) + "\n")
    (args.out / f"{name}_adding.json").unlink()
    return merged


def settings_tag(args: argparse.Namespace) -> str:
    """What names a multi-seed benchmark's files: hospitals, classes, rounds and (when not the plain one) the recipe,
    e.g. ``8x400_a0.3_k4_r50_lr0.03_cosine3_wd0.0005_balanced``."""
    k = len(args.classes) if args.classes else 2
    tag = f"{args.sites}x{args.images_per_site}_a{args.dirichlet_alpha:g}_k{k}_r{args.rounds}"
    if (args.lr_schedule, args.warmup_rounds, args.weight_decay, args.class_weights) != ("constant", 0, 0.0, "none"):
        tag += (f"_lr{args.lr:g}_{args.lr_schedule}{args.warmup_rounds}_wd{args.weight_decay:g}"
                f"{'_balanced' if args.class_weights == 'balanced' else ''}")  # fmt: skip
    if args.loss != "cross-entropy":
        tag += "_logitadj"
    return tag


def hospitals(args: argparse.Namespace, prefix: str, *, force: bool = False) -> tuple[SynthRequest, Path]:
    """Synthesize (or reuse, cached under ``WORK/<prefix>_<modality>_<settings>``) the hospitals ``args`` describe."""
    classes = tuple(args.classes) if getattr(args, "classes", None) else None
    modality = getattr(args, "modality", "cxr")
    req = SynthRequest(modality, args.sites, args.images_per_site, seed=args.seed, dirichlet_alpha=args.dirichlet_alpha,
                       shift=args.shift, classes=classes)  # fmt: skip
    tag = f"{args.sites}x{args.images_per_site}_a{args.dirichlet_alpha:g}_s{args.shift:g}_seed{args.seed}"
    tag += f"_k{len(classes)}" if classes else ""
    return req, synthesize(WORK / f"{prefix}_{modality}_{tag}", req, force=force)


def base_spec(args: argparse.Namespace, req: SynthRequest, model: Any = "cnn", **fields: Any) -> dict[str, Any]:
    """Job-spec fields shared by every variant: data, model, SGD (momentum 0.9) training from ``args``."""
    return dict(modality=req.modality, classes=list(req.class_names()), dataset=req.modality, image_size=args.image_size,
                model=model, feature_dim=64, seed=args.seed, training=recipe(args), **fields)  # fmt: skip


def recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The job's ``training`` block from :func:`add_hospital_args`'s options (SGD, momentum 0.9)."""
    return {"rounds": args.rounds, "local_epochs": args.local_epochs, "batch_size": args.batch_size, "lr": args.lr,
            "optimizer": "sgd", "momentum": 0.9, "lr_schedule": args.lr_schedule,
            "warmup_rounds": args.warmup_rounds, "weight_decay": args.weight_decay,
            "class_weights": args.class_weights, "loss": args.loss}  # fmt: skip


def run_variants(variants: dict[str, dict[str, Any]], base: dict[str, Any], sites_yml: Path,
                 runs_dir: Path) -> list[dict[str, Any]]:  # fmt: skip
    """Run one simulator job per variant; returns their ``results.json`` dicts with a ``label``.

    Args:
        variants: label → job-spec fields that differ from ``base`` (e.g. ``{"algorithm": {...}}``).
        base: the job-spec fields every variant shares.
        sites_yml: the hospitals.
        runs_dir: one run folder per label is made under it.
    """
    runs = []
    for label, change in variants.items():
        slug = re.sub(r"[^A-Za-z0-9_.]+", "-", label).strip("-")  # job names and folders: ASCII only
        spec = JobSpec(**{**base, **change, "name": f"bench-{slug}"})
        result = finished_run(spec, sites_yml, runs_dir / slug)
        if result is None:
            t0 = time.perf_counter()
            result = run_simulation(spec, sites_yml, runs_dir / slug, label=label)
            result["wall_seconds"] = round(time.perf_counter() - t0, 1)
        else:
            print(f"{label}: kept the finished run in {runs_dir / slug}", flush=True)
        result["label"] = label
        runs.append(result)
        row = summary_row(result)
        print(f"{label}: mean {row['mean_acc']:.3f} worst {row['worst_acc']:.3f} ({result['wall_seconds']} s)",
              flush=True)  # fmt: skip
    return runs


def finished_run(spec: JobSpec, sites_yml: Path, run_dir: Path) -> dict[str, Any] | None:
    """The ``results.json`` of a run that finished in ``run_dir`` with exactly ``spec`` on ``sites_yml`` (so a
    benchmark stopped part-way keeps its finished jobs), else ``None``. The spec is the one the job folder carries
    (:func:`~medsilo.config.job.decode_job` of the server's config); ``wall_seconds`` is taken from the run folder's
    file times."""
    results, marker = run_dir / "results.json", run_dir / "medsilo-run.json"
    config = run_dir / "job" / spec.name / "app" / "config" / "config_fed_server.json"
    if not (results.is_file() and marker.is_file() and config.is_file()):
        return None
    if json.loads(marker.read_text()).get("sites_file") != str(sites_yml):
        return None
    workflows = json.loads(config.read_text()).get("workflows", [])
    try:
        ran = decode_job(workflows[0]["args"]["job"])
    except (MedsiloError, LookupError, TypeError):
        return None
    if ran != spec.model_dump(mode="json"):
        return None
    result = json.loads(results.read_text())
    result["wall_seconds"] = round(results.stat().st_mtime - marker.stat().st_mtime, 1)
    return result


def save(name: str, settings: dict[str, Any], synthetic: dict[str, Any], runs: list[dict[str, Any]], *,
         out: Path, title: str) -> dict[str, Any]:  # fmt: skip
    """Write ``out/<name>.json`` (rows + per-site results) and an HTML report under ``WORK``."""
    rows = [{**summary_row(r), "wall_seconds": r["wall_seconds"], "models": r["models"],
             "algorithm_form": r.get("algorithm_form", "sums")} for r in runs]  # fmt: skip
    result = {
        "benchmark": name,
        "settings": settings,
        "synthetic_data": synthetic,
        "rows": rows,
        "per_site": {r["label"]: r["final"]["per_site"] for r in runs},
    }
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"{name}.json", json.dumps(result, indent=2) + "\n")
    write_report(runs, WORK / f"{name}.html", title=title)
    return result


def markdown(result: dict[str, Any], *, down: bool = False) -> str:
    """The comparison table as Markdown (``down`` adds the download column and gives traffic in bytes,
    for algorithms whose uploads are far below a KiB)."""
    unit, scale = ("bytes", 1) if down else ("KiB", 1024)
    head = ("| algorithm | mean acc | worst site | pooled acc | mean AUROC | round (of) | job s | rounds s | "
            f"{unit} up / site / round |")  # fmt: skip
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if down:
        head, rule = head + f" {unit} down / site / round |", rule + "---:|"
    lines = [head, rule]
    for r in result["rows"]:
        line = (
            f"| {r['label']} | {r['mean_acc']:.3f} | {r['worst_acc']:.3f} | {r['pooled_acc']:.3f} | "
            f"{r['mean_auroc']:.3f} | {r['selected_round']} ({r['rounds']}) | {r['wall_seconds']:.0f} | "
            f"{r['seconds']:.0f} | {r['up_per_site_round'] / scale:.{0 if down else 1}f} |"
        )
        if down:
            line += f" {r['down_per_site_round'] / scale:.0f} |"
        lines.append(line)
    return "\n".join(lines)
