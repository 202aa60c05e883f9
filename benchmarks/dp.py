"""What differential privacy costs a prototype job: FedProto accuracy at ε ∈ {1, 4, 8, ∞}.

The heterogeneous CXR hospitals of :mod:`benchmarks.htfl` (three backbone families) run
FedProto under privacy mode ``dp``. Each round a site trains its model with DP-SGD (Poisson sampling at
q = B/N, per-image gradients clipped to ``grad_clip``, noise σ_sgd·``grad_clip``) and then releases
record-level DP per-class sums of its clipped features (:func:`medsilo.secure.dp.gaussian_sum`); the
round costs both events (``fedproto.Client.dp_events``). For each target ε (at δ = 1e-5, over the whole
job) one σ for both mechanisms comes from :func:`medsilo.secure.dp.dpsgd_noise_for_epsilon`, calibrated on
the site with the fewest training images (the most expensive one at a given σ); every site's own
accountant then reports the ε it actually spent (``privacy_spent``), which must not exceed the target.
Two references: ``ε = ∞`` (privacy mode ``none``: ordinary training, train-mode BatchNorm, unclipped
features) and ``clip only`` (σ so small that only the changes of the private path remain: gradient
clipping, Poisson batches, BatchNorm in eval mode on its initial statistics, clipped features), which
separates the cost of those changes from the cost of the noise.

Run::

    python -m benchmarks.dp                     # ~6 min on 2 cores
    python -m benchmarks.dp --epsilons 4 --rounds 5

It prints a Markdown table and writes ``benchmarks/results/dp_fedproto_seed<SEED>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.htfl import backbones
from benchmarks.runner import WORK, add_hospital_args, base_spec, hospitals, run_variants, save
from medsilo.config import read_manifest
from medsilo.config.site import load_sites_file
from medsilo.secure.dp import PrivacyAccountant, dpsgd_noise_for_epsilon, dpsgd_round_events

DELTA = 1e-5
CLIP_ONLY_SIGMA = 1e-4
"""σ of the ``clip only`` reference (release and DP-SGD): ε astronomically large."""


def train_sizes(sites_yml: Path) -> dict[str, int]:
    """Training images per site, from each site's manifest (its ``train`` split)."""
    sites = load_sites_file(sites_yml).sites
    return {site: len(read_manifest(entry.manifest).split("train")) for site, entry in sorted(sites.items())}


def planned_epsilon(sigma: float, n: int, args: argparse.Namespace) -> float:
    """ε at δ of ``args.rounds`` rounds of FedProto's DP events at a site with ``n`` training images."""
    events = dpsgd_round_events(sigma, sigma, n=n, batch_size=args.batch_size, epochs=args.local_epochs)
    return PrivacyAccountant(delta=DELTA).cost(*events * args.rounds)[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 4.0, 8.0])
    parser.add_argument("--clip", type=float, default=1.0, help="L2 bound of each feature vector")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="L2 bound of each image's gradient")
    add_hospital_args(parser, rounds=10)
    args = parser.parse_args(argv)

    req, sites_yml = hospitals(args, "htfl")  # the HtFL benchmark's hospitals (cached, shared)
    models = backbones(args.sites)
    sizes = train_sizes(sites_yml)
    smallest = min(sizes.values())
    base = base_spec(args, req, model=models, algorithm={"name": "fedproto"})

    def dp(sigma: float) -> dict:
        return {"privacy": {"mode": "dp", "dp": {"noise_multiplier": sigma, "clip": args.clip, "delta": DELTA,
                                                 "grad_clip": args.grad_clip}}}  # fmt: skip

    sigmas = {eps: dpsgd_noise_for_epsilon(eps, args.rounds, DELTA, n=smallest, batch_size=args.batch_size,
                                           epochs=args.local_epochs) for eps in sorted(args.epsilons)}  # fmt: skip
    variants = {"eps inf (none)": {}, "clip only": dp(CLIP_ONLY_SIGMA)}
    variants |= {f"eps {eps:g}": dp(sigma) for eps, sigma in sorted(sigmas.items(), reverse=True)}
    runs = run_variants(variants, base, sites_yml, WORK / "dp_runs")
    settings = {k: v for k, v in vars(args).items() if k != "out"} | {
        "models": models, "delta": DELTA, "train_sizes": sizes,
        "sigmas": {f"{e:g}": s for e, s in sigmas.items()}}  # fmt: skip
    result = save(f"dp_fedproto_seed{args.seed}", settings, req.to_json(), runs, out=args.out,
                  title="FedProto under differential privacy")  # fmt: skip
    for row, run in zip(result["rows"], runs):  # what each site's own accountant reported, the worst one
        dp_spec = variants[run["label"]].get("privacy", {}).get("dp")
        row["noise_multiplier"] = dp_spec["noise_multiplier"] if dp_spec else None
        spent = [s["epsilon"] for s in (run.get("privacy_spent") or {}).values()] if dp_spec else []
        row["epsilon_spent"] = max(spent) if spent else None
        row["epsilon_planned"] = (max(planned_epsilon(dp_spec["noise_multiplier"], n, args) for n in sizes.values())
                                  if dp_spec else None)  # fmt: skip
    (args.out / f"dp_fedproto_seed{args.seed}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return result


def table(result: dict) -> str:
    """The ε / accuracy table as Markdown."""
    lines = ["| privacy | σ = σ_sgd | ε planned (max site) | ε spent (max site) | mean acc | worst site | "
             "mean AUROC | round (of) | job s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["rows"]:
        sigma = "—" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3g}"
        label = r["label"].replace("eps inf", "ε = ∞").replace("eps ", "ε = ")
        planned = "∞" if r["epsilon_planned"] is None else f"{r['epsilon_planned']:.3g}"
        eps = "∞" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.3g}"
        lines.append(f"| {label} | {sigma} | {planned} | {eps} | {r['mean_acc']:.3f} | {r['worst_acc']:.3f} | "
                     f"{r['mean_auroc']:.3f} | {r['selected_round']} ({r['rounds']}) | {r['wall_seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
