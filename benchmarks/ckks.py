"""What CKKS secure aggregation costs: per-round time and bytes, ``ckks`` vs ``none``.

Two parts:

1. **Jobs in the NVFlare simulator.** FedProto, FedDistill, LG-FedAvg and FedAvg on four synthetic CXR
   hospitals with the zoo's small CNN, each run with privacy mode ``none`` and ``ckks``: mean round
   seconds (sites train and encrypt, the server forwards, sites add and decrypt), the ratio ckks / none, bytes up per
   site per round, and the test accuracy (which must not change).
2. **Micro-benchmark of one upload** of each algorithm, from a real local round: values, ciphertexts,
   bytes, and encrypt / add (4 sites) / decrypt milliseconds with medsilo's packing (one vector set per
   upload, context sent once per job). For comparison, **full-weight encryption the way NVFlare's HE
   filters do it** (``nvflare.app_opt.he``), for the same cnn and for ``resnet10-lite``: one CKKS vector
   per weight tensor, NVFlare's context
   parameters (N = 8192, [60, 40, 40], 2^40), and — as NVFlare 2.9's ``CKKSVectorDecomposer`` ships it —
   the serialized context attached to every vector.

Run::

    python -m benchmarks.ckks                 # ~8 min on 2 cores
    python -m benchmarks.ckks --rounds 3 --images-per-site 120

It prints Markdown tables and writes ``benchmarks/results/ckks.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.runner import RESULTS, WORK, run_variants
from medsilo.medical.synth import SynthRequest, synthesize

ALGORITHMS = ("fedproto", "feddistill", "lgfedavg", "fedavg")


def micro(algorithm: str, feature_dim: int, image_size: int, repeats: int = 5) -> dict:
    """Encrypt / add / decrypt cost of one real upload of ``algorithm`` (a cnn site, 2 classes)."""
    from medsilo.components.algorithms import algorithm_module
    from medsilo.components.toy import tiny_setup
    from medsilo.secure.ckks import add, decrypt, encrypt, make_context, public_copy

    module = algorithm_module(algorithm)
    setup = tiny_setup(n=16, num_classes=2, feature_dim=feature_dim)
    sums = module.Client(setup, module.Config()).train(1).sums
    ctx = make_context(8192)
    import tenseal as ts

    server = ts.context_from(public_copy(ctx))
    values = sum(t.numel() for t in sums.values())
    enc_s, add_s, dec_s = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        enc = encrypt(ctx, sums)
        enc_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        total = add(server, [enc] * 4)
        add_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        decrypt(ctx, total)
        dec_s.append(time.perf_counter() - t0)
    return {"algorithm": algorithm, "values": values, "plain_bytes": 4 * values, "ciphertexts": len(enc.ciphertexts),
            "ckks_bytes": len(enc.to_bytes()), "encrypt_ms": 1e3 * statistics.median(enc_s),
            "add4_ms": 1e3 * statistics.median(add_s), "decrypt_ms": 1e3 * statistics.median(dec_s)}  # fmt: skip


def nvflare_style_full_weights(backbone: str, feature_dim: int, repeats: int = 3) -> dict:
    """Encrypt every weight tensor of ``backbone`` as its own CKKS vector, as ``nvflare.app_opt.he`` does."""
    import tenseal as ts

    from medsilo.medical.models import build_model

    model = build_model(backbone, in_channels=1, num_classes=2, feature_dim=feature_dim, seed=0)
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40],
                     encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)  # fmt: skip  (HEBuilder's parameters)
    ctx.global_scale = 2**40
    ctx.generate_relin_keys()
    context_bytes = len(ctx.serialize(save_secret_key=False))
    tensors = [v.detach().flatten().tolist() for v in model.state_dict().values() if v.is_floating_point()]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        blobs = [ts.ckks_vector(ctx, t).serialize() for t in tensors]
        times.append(time.perf_counter() - t0)
    values = sum(len(t) for t in tensors)
    cipher = sum(len(b) for b in blobs)
    return {"backbone": backbone, "tensors": len(tensors), "values": values, "ciphertext_bytes": cipher,
            "with_context_per_vector_bytes": cipher + len(tensors) * context_bytes, "context_bytes": context_bytes,
            "encrypt_ms": 1e3 * statistics.median(times)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--images-per-site", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--feature-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    micro_rows = [micro(a, args.feature_dim, args.image_size) for a in args.algorithms]
    full = [nvflare_style_full_weights(b, args.feature_dim) for b in ("cnn", "resnet10-lite")]

    req = SynthRequest("cxr", args.sites, args.images_per_site, seed=args.seed)
    sites_yml = synthesize(WORK / f"ckks_cxr_{args.sites}x{args.images_per_site}_seed{args.seed}", req)
    base = dict(modality="cxr", classes=list(req.class_names()), dataset="cxr", image_size=args.image_size,
                model="cnn", feature_dim=args.feature_dim, seed=args.seed,
                training={"rounds": args.rounds, "local_epochs": 1, "batch_size": 32, "lr": 0.01,
                          "optimizer": "sgd", "momentum": 0.9})  # fmt: skip
    variants = {f"{a} {mode}": {"algorithm": {"name": a}, "privacy": {"mode": mode}}
                for a in args.algorithms for mode in ("none", "ckks")}  # fmt: skip
    runs = run_variants(variants, base, sites_yml, WORK / "ckks_runs")
    by_label = {r["label"]: r for r in runs}
    job_rows = []
    for a in args.algorithms:
        none, ckks = by_label[f"{a} none"], by_label[f"{a} ckks"]
        # round 1 carries process start-up and torch's first-use imports: leave it out of the mean
        sec = [statistics.mean(r["seconds"] for r in run["rounds"][1:] or run["rounds"]) for run in (none, ckks)]
        up = [statistics.mean(r["bytes_up"] for r in run["rounds"]) / args.sites for run in (none, ckks)]
        job_rows.append({"algorithm": a, "round_s_none": sec[0], "round_s_ckks": sec[1], "ratio": sec[1] / sec[0],
                         "up_bytes_none": up[0], "up_bytes_ckks": up[1],
                         "mean_acc_none": none["final"]["mean_acc"], "mean_acc_ckks": ckks["final"]["mean_acc"]})  # fmt: skip
    result = {"benchmark": "ckks", "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "jobs": job_rows, "micro": micro_rows, "nvflare_style_full_weights": full}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ckks.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    """The three tables as Markdown."""
    lines = ["| algorithm | round s (none) | round s (ckks) | ckks / none | KiB up/site/round (none) | (ckks) | "
             "mean acc none / ckks |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["jobs"]:
        lines.append(f"| {r['algorithm']} | {r['round_s_none']:.2f} | {r['round_s_ckks']:.2f} | {r['ratio']:.2f} | "
                     f"{r['up_bytes_none'] / 1024:.1f} | {r['up_bytes_ckks'] / 1024:.1f} | "
                     f"{r['mean_acc_none']:.3f} / {r['mean_acc_ckks']:.3f} |")  # fmt: skip
    lines += ["", "| upload | values | ciphertexts | KiB encrypted | encrypt ms | add ×4 ms | decrypt ms |",
              "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["micro"]:
        lines.append(f"| {r['algorithm']} | {r['values']} | {r['ciphertexts']} | {r['ckks_bytes'] / 1024:.0f} | "
                     f"{r['encrypt_ms']:.1f} | {r['add4_ms']:.1f} | {r['decrypt_ms']:.1f} |")  # fmt: skip
    for f in result["nvflare_style_full_weights"]:
        lines.append(f"| {f['backbone']} weights, one vector per tensor (NVFlare style) | {f['values']} | "
                     f"{f['tensors']} | {f['ciphertext_bytes'] / 1024:.0f} (+ context per vector: "
                     f"{f['with_context_per_vector_bytes'] / 1024:.0f}) | {f['encrypt_ms']:.1f} | | |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
