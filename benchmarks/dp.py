"""What differential privacy costs a prototype job: FedProto accuracy at ε ∈ {1, 4, 8, ∞}.

The heterogeneous CXR hospitals of :mod:`medsilo.benchmarks.htfl` (three backbone families) run
FedProto under privacy mode ``dp``: each round a site releases record-level DP per-class sums of its
clipped features (:func:`medsilo.secure.dp.gaussian_sum`). For each target ε (at δ = 1e-5, over the whole
job) the noise multiplier σ comes from :func:`medsilo.secure.dp.noise_for_epsilon`; every site's own
accountant then reports the ε it actually spent (``privacy_spent``), which must not exceed the target.
Two references: ``ε = ∞`` (privacy mode ``none``) and ``clip only`` (σ so small that only the clipping
and the switch to eval-mode features remain), which separates the cost of clipping from the cost of noise.

Run::

    python -m medsilo.benchmarks.dp                     # ~12 min on 2 cores
    python -m medsilo.benchmarks.dp --epsilons 4 --rounds 5

It prints a Markdown table and writes ``benchmarks/results/dp_fedproto_seed<SEED>.json``.
"""

from __future__ import annotations

import argparse
import json

from medsilo.benchmarks.htfl import backbones
from medsilo.benchmarks.runner import WORK, add_hospital_args, base_spec, hospitals, run_variants, save
from medsilo.secure.dp import noise_for_epsilon

DELTA = 1e-5
CLIP_ONLY_SIGMA = 1e-4
"""σ of the ``clip only`` reference: noise ~1e-4·√2·C per class sum, ε astronomically large."""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 4.0, 8.0])
    parser.add_argument("--clip", type=float, default=1.0, help="L2 bound of each feature vector")
    add_hospital_args(parser, rounds=10)
    args = parser.parse_args(argv)

    req, sites_yml = hospitals(args, "htfl")  # the HtFL benchmark's hospitals (cached, shared)
    models = backbones(args.sites)
    base = base_spec(args, req, model=models, algorithm={"name": "fedproto"})

    def dp(sigma: float) -> dict:
        return {"privacy": {"mode": "dp", "dp": {"noise_multiplier": sigma, "clip": args.clip, "delta": DELTA}}}

    sigmas = {eps: noise_for_epsilon(eps, args.rounds, DELTA) for eps in sorted(args.epsilons)}
    variants = {"eps inf (none)": {}, "clip only": dp(CLIP_ONLY_SIGMA)}
    variants |= {f"eps {eps:g}": dp(sigma) for eps, sigma in sorted(sigmas.items(), reverse=True)}
    runs = run_variants(variants, base, sites_yml, WORK / "dp_runs")
    settings = {k: v for k, v in vars(args).items() if k != "out"} | {"models": models, "delta": DELTA,
                                                                     "sigmas": {f"{e:g}": s for e, s in sigmas.items()}}  # fmt: skip
    result = save(f"dp_fedproto_seed{args.seed}", settings, req.to_json(), runs, out=args.out,
                  title="FedProto under differential privacy")  # fmt: skip
    for row, run in zip(result["rows"], runs):  # what each site's own accountant reported, the worst one
        dp_spec = variants[run["label"]].get("privacy", {}).get("dp")
        row["noise_multiplier"] = dp_spec["noise_multiplier"] if dp_spec else None
        spent = [s["epsilon"] for s in (run.get("privacy_spent") or {}).values()] if dp_spec else []
        row["epsilon_spent"] = max(spent) if spent else None
    (args.out / f"dp_fedproto_seed{args.seed}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return result


def table(result: dict) -> str:
    """The ε / accuracy table as Markdown."""
    lines = ["| privacy | σ | ε spent (max site) | mean acc | worst site | mean AUROC | round (of) |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["rows"]:
        sigma = "—" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3g}"
        label = r["label"].replace("eps inf", "ε = ∞").replace("eps ", "ε = ")
        eps = "∞" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.3g}"
        lines.append(f"| {label} | {sigma} | {eps} | {r['mean_acc']:.3f} | {r['worst_acc']:.3f} | "
                     f"{r['mean_auroc']:.3f} | {r['selected_round']} ({r['rounds']}) |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
