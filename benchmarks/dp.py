"""What differential privacy costs: FedProto, or FedAvg's DP-SGD form, at ε ∈ {1, 4, 8, ∞}.

**FedProto** (default): the heterogeneous CXR hospitals of :mod:`benchmarks.htfl` (three backbone families) run
FedProto under privacy mode ``dp``. Each round a site trains its model with DP-SGD (Poisson sampling at
q = B/N, per-image gradients clipped to ``grad_clip``, noise σ_sgd·``grad_clip``) and then releases
record-level DP per-class sums of its clipped features (:func:`medsilo.secure.dp.gaussian_sum`); the
round costs both events (``fedproto.Client.dp_events``). For each target ε (at δ = 1e-5, over the whole
job) one σ for both mechanisms comes from :func:`medsilo.secure.dp.dpsgd_noise_for_epsilon`, calibrated on
the site with the fewest training images (the most expensive one at a given σ).

**FedAvg** (``--algorithm fedavg``): the ``cnn`` at every hospital (the hospitals of :mod:`benchmarks.pfl`), in
FedAvg's ``dp-sgd`` form: DP-SGD training, the trained weights uploaded as they are, so a round costs the DP-SGD
steps alone and σ_sgd comes from ``dpsgd_noise_for_epsilon(..., release=False)``. A ``dp`` job refuses
``class_weights: balanced`` (the weights depend on every record), so the private rows train unweighted.

Every site's own accountant then reports the ε it actually spent (``privacy_spent``), which must not exceed the
target. Two references: ``ε = ∞`` (privacy mode ``none``: ordinary training, train-mode BatchNorm, unclipped
features) and ``clip only`` (σ so small that only the changes of the private path remain: gradient
clipping, Poisson batches, BatchNorm in eval mode on its initial statistics, clipped features, no class weights),
which separates the cost of those changes from the cost of the noise.

Run::

    python -m benchmarks.dp                     # ~6 min on 2 cores
    python -m benchmarks.dp --epsilons 4 --rounds 5
    python -m benchmarks.dp --algorithm fedavg --sites 8 --images-per-site 400 --dirichlet-alpha 0.3 \
        --classes normal pneumonia effusion nodule --rounds 50 --lr 0.03 --lr-schedule cosine --warmup-rounds 3 \
        --weight-decay 0.0005 --class-weights none --epsilons 8 --references
    python -m benchmarks.dp --algorithm fedavg ...the same... --model cnn-in --loss logit-adjusted --grad-clip 3

``--model cnn-in --loss logit-adjusted`` is the private path :mod:`benchmarks.dp_private_path` found to learn: the
instance-normalised ``cnn`` and the logit-adjusted loss, whose class counts a ``dp`` job draws once under DP
(``--count-noise``, σ of the draw; its cost is composed into σ_sgd's calibration).

It prints a Markdown table and writes ``benchmarks/results/dp_fedproto_seed<SEED>.json`` (FedAvg:
``dp_fedavg_<settings>[_<rows>]_seed<SEED>.json``, naming the rows of a partial run, e.g. ``_eps8``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.htfl import backbones
from benchmarks.runner import WORK, add_hospital_args, base_spec, hospitals, run_variants, save, settings_tag
from medsilo.config import read_manifest
from medsilo.config.site import load_sites_file
from medsilo.fs import write_atomic
from medsilo.secure.dp import GaussianEvent, PrivacyAccountant, dpsgd_noise_for_epsilon, dpsgd_round_events

DELTA = 1e-5
CLIP_ONLY_SIGMA = 1e-4
"""σ of the ``clip only`` reference (release and DP-SGD): ε astronomically large."""
REFERENCES = {"none": "eps inf (none)", "clip-only": "clip only"}
"""The reference rows (``--references``) and their labels."""


def train_sizes(sites_yml: Path) -> dict[str, int]:
    """Training images per site, from each site's manifest (its ``train`` split)."""
    sites = load_sites_file(sites_yml).sites
    return {site: len(read_manifest(entry.manifest).split("train")) for site, entry in sorted(sites.items())}


def once_events(args: argparse.Namespace) -> list[GaussianEvent]:
    """What the job charges once: the class-count draw of a ``logit-adjusted`` job (its DP-SGD reads the counts)."""
    return [GaussianEvent(noise_multiplier=args.count_noise)] if args.loss == "logit-adjusted" else []


def planned_epsilon(sigma: float, n: int, args: argparse.Namespace) -> float:
    """ε at δ of ``args.rounds`` rounds of the algorithm's DP events at a site with ``n`` training images, and the
    events charged once."""
    events = dpsgd_round_events(sigma, sigma, n=n, batch_size=args.batch_size, epochs=args.local_epochs,
                                release=args.algorithm == "fedproto")  # fmt: skip
    return PrivacyAccountant(delta=DELTA).cost(*events * args.rounds, *once_events(args))[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithm", choices=["fedproto", "fedavg"], default="fedproto",
                        help="FedProto (DP-SGD, then a class-sum release) or FedAvg's dp-sgd form")  # fmt: skip
    parser.add_argument("--epsilons", nargs="*", type=float, default=[1.0, 4.0, 8.0], help="target ε of the whole job")
    parser.add_argument("--clip", type=float, default=1.0, help="L2 bound of each feature vector")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="L2 bound of each image's gradient")
    parser.add_argument("--model", default=None,
                        help="one backbone at every hospital (e.g. cnn-in); default: FedAvg the cnn, FedProto the "
                             "HtFL benchmark's three families")  # fmt: skip
    parser.add_argument("--count-noise", type=float, default=5.0,
                        help="privacy.dp.count_noise_multiplier (with --loss logit-adjusted: the class counts' σ)")  # fmt: skip
    parser.add_argument("--references", nargs="*", choices=list(REFERENCES), default=list(REFERENCES),
                        help="the reference rows to run (default both; none named: only the ε rows, to compare with "
                             "ε = ∞ from another benchmark of the same hospitals, e.g. benchmarks.pfl's FedAvg)")  # fmt: skip
    add_hospital_args(parser, rounds=10)
    args = parser.parse_args(argv)

    release = args.algorithm == "fedproto"
    ran = [*(f"eps{e:g}" for e in sorted(args.epsilons)), *args.references]  # a partial run names its rows
    full = args.references == parser.get_default("references") and args.epsilons == parser.get_default("epsilons")
    rows = "" if full else "_" + "_".join(ran)
    clip = "" if args.grad_clip == parser.get_default("grad_clip") else f"_G{args.grad_clip:g}"
    if release:
        req, sites_yml = hospitals(args, "htfl")  # the HtFL benchmark's hospitals (cached, shared)
        models = backbones(args.sites) if args.model is None else args.model
        base = base_spec(args, req, model=models, algorithm={"name": "fedproto"})
        # the original table's file keeps its name; a run with one backbone everywhere names its settings
        name = f"dp_fedproto_seed{args.seed}" if args.model is None else \
            f"dp_fedproto_{settings_tag(args)}_{args.model}{clip}{rows}_seed{args.seed}"  # fmt: skip
    else:
        req, sites_yml = hospitals(args, "pfl")  # the pFL benchmark's hospitals
        models = args.model or "cnn"
        base = base_spec(args, req, model=models, algorithm={"name": "fedavg", "params": {"dp_form": "dp-sgd"}})
        model = "" if models == "cnn" else f"_{models}"
        name = f"dp_fedavg_{settings_tag(args)}{model}{clip}{rows}_seed{args.seed}"
    sizes = train_sizes(sites_yml)
    smallest = min(sizes.values())

    def dp(sigma: float) -> dict:
        return {"privacy": {"mode": "dp", "dp": {"noise_multiplier": sigma, "clip": args.clip, "delta": DELTA,
                                                 "grad_clip": args.grad_clip,
                                                 "count_noise_multiplier": args.count_noise}}}  # fmt: skip

    sigmas = {eps: dpsgd_noise_for_epsilon(eps, args.rounds, DELTA, n=smallest, batch_size=args.batch_size,
                                           epochs=args.local_epochs, release=release, once=once_events(args))
              for eps in sorted(args.epsilons)}  # fmt: skip
    variants = {REFERENCES[ref]: {} if ref == "none" else dp(CLIP_ONLY_SIGMA) for ref in args.references}
    variants |= {f"eps {eps:g}": dp(sigma) for eps, sigma in sorted(sigmas.items(), reverse=True)}
    runs = run_variants(variants, base, sites_yml, WORK / "dp_runs" / name)  # a folder per settings: never shared
    settings = {k: v for k, v in vars(args).items() if k != "out"} | {
        "models": models, "delta": DELTA, "train_sizes": sizes,
        "sigmas": {f"{e:g}": s for e, s in sigmas.items()}}  # fmt: skip
    result = save(name, settings, req.to_json(), runs, out=args.out,
                  title=f"{'FedProto' if release else 'FedAvg (dp-sgd)'} under differential privacy")  # fmt: skip
    for row, run in zip(result["rows"], runs):  # what each site's own accountant reported, the worst one
        dp_spec = variants[run["label"]].get("privacy", {}).get("dp")
        row["noise_multiplier"] = dp_spec["noise_multiplier"] if dp_spec else None
        spent = [s["epsilon"] for s in (run.get("privacy_spent") or {}).values()] if dp_spec else []
        row["epsilon_spent"] = max(spent) if spent else None
        row["epsilon_planned"] = (max(planned_epsilon(dp_spec["noise_multiplier"], n, args) for n in sizes.values())
                                  if dp_spec else None)  # fmt: skip
    write_atomic(args.out / f"{name}.json", json.dumps(result, indent=2) + "\n")
    print(table(result))
    return result


def table(result: dict) -> str:
    """The ε / accuracy table as Markdown."""
    lines = ["| privacy | σ = σ_sgd | ε planned (max site) | ε spent (max site) | mean balanced acc | mean acc | "
             "worst site | mean AUROC | round (of) | job s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["rows"]:
        sigma = "—" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3g}"
        label = r["label"].replace("eps inf", "ε = ∞").replace("eps ", "ε = ")
        planned = "∞" if r["epsilon_planned"] is None else f"{r['epsilon_planned']:.3g}"
        eps = "∞" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.3g}"
        lines.append(f"| {label} | {sigma} | {planned} | {eps} | {r['mean_balanced_acc']:.3f} | {r['mean_acc']:.3f} | "
                     f"{r['worst_acc']:.3f} | {r['mean_auroc']:.3f} | {r['selected_round']} ({r['rounds']}) | "
                     f"{r['wall_seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
