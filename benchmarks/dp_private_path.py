"""Why does the private path not learn? FedAvg with DP-SGD's training step, in process, one change at a time.

A diagnostic, not a product path: the benchmark ``benchmarks.dp --algorithm fedavg`` runs the real job and finds the
private path (per-image clipping, Poisson batches, BatchNorm in eval mode, no class weights) at chance even without
noise. This script runs the same step in one process — FedAvg over the pFL hospitals of :mod:`benchmarks.pfl` (same
seed, same images), every site training one epoch a round from the global model with DP-SGD's step
(:func:`~medsilo.secure.dp.poisson_sample`, per-image gradients from
:func:`~medsilo.components.training.per_record_gradients` clipped to G, :func:`~medsilo.secure.dp.gaussian_gradient`,
the sum divided by the expected batch) — and changes one thing at a time:

* ``--batchnorm initial`` (what a ``dp`` job does: eval mode on the initial statistics, mean 0 and variance 1) or
  ``public``: before each round and after averaging, the statistics are re-estimated on *public* images — synthetic
  hospitals made by ``medsilo synth`` with another seed (:data:`PUBLIC_SEED`), which no site's records enter, so
  they cost no privacy; or ``groupnorm``: every ``BatchNorm2d`` replaced by ``GroupNorm(8, C)`` (per image, so
  DP-compatible); or ``instancenorm``: the zoo's ``cnn-in``, ``GroupNorm(C, C)`` in place of every BatchNorm, instance
  normalisation with a learned scale and shift (per image and channel, so DP-compatible, and blind to a scanner's
  gain); or ``train`` (``--step sgd`` only): train-mode batch statistics, what the non-private jobs use;
  or ``site``: eval mode on statistics each site estimates on its own training images, frozen while it trains and
  re-estimated by each site to score the global model (statistics that never leave the site, as in FedBN; the
  true ones here, so an upper bound on what statistics estimated under DP would give);
* without (what a ``dp`` job does) or with ``--post-clip-weights``: each image's *clipped* gradient is scaled by
  ``w_y = min(1, (N/K)/n_y)`` from the site's class counts ``n``, so a record still moves the sum by at most G. The
  counts here are the true ones: an upper bound on what privately estimated counts would give. With ``--step sgd``
  the same factors weight each image's loss;
* ``--logit-adjust``: each image's loss is cross-entropy on ``logits + log(n_y/N)`` with the site's class shares
  (the logit-adjusted loss of Menon et al., 2021); the model predicts with its plain logits, so a site's skew is
  trained out of the predictions without scaling any gradient down (true counts again: an upper bound);
* ``--public-pretrain E``: before round 1, E epochs of plain SGD on the *public* hospitals' labelled images
  (logit-adjusted by their own class shares; no site's record enters, so no privacy cost), scored as round 0; and
  ``--train head``: the sites then train the linear head alone (260 numbers at K = 4 instead of 60,836, so DP-SGD's
  noise, whose norm grows with the square root of what it trains, is ~15× smaller against the same signal), or
  ``--train frozen-bias``: every parameter but the head's bias, which keeps the public model's calibration between
  classes;
* ``--step dp-sgd`` (default) or ``sgd``: plain mini-batch SGD (shuffled batches of B, no clipping, no noise), the
  same model, optimiser and schedule, to separate what DP-SGD's step costs from what the normalisation costs;
* ``--pooled``: one site holding the union of the sites' training images (centralised training, still scored on
  each site's validation split), to separate what the federation costs.

With ``--sigma`` tiny (default 1e-4, the ``clip only`` reference) the noise plays no part. Each round prints the
sites' mean validation balanced accuracy, AUROC and how many sites predict one class; the history is written to
``benchmarks/results/dp_private_path_<settings>_seed<N>.json``. Validation only: no test figure is computed.

Run (seed 0's eight four-finding hospitals; measured two runs at a time on 2 cores: ~6 s a round with ``--step sgd``,
~10 s with DP-SGD's step, ~50 s at ``--images-per-site 2000``)::

    python -m benchmarks.dp_private_path --batchnorm public --post-clip-weights --rounds 25
    python -m benchmarks.dp_private_path --step sgd --batchnorm train --post-clip-weights --rounds 50  # reference
    python -m benchmarks.dp_private_path --batchnorm instancenorm --logit-adjust --grad-clip 10 --sigma 1.91 --rounds 50
    python -m benchmarks.dp_private_path --batchnorm instancenorm --public-pretrain 20 --train head --logit-adjust \
        --sigma 1.91 --rounds 50   # σ_sgd = 1.91: ε = 8 over 50 rounds at the smallest site (benchmarks.dp)
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from benchmarks.runner import WORK, add_hospital_args, hospitals
from medsilo.components.training import (
    evaluate_split,
    log_prior,
    lr_factor,
    make_optimizer,
    per_record_gradients,
    recalibrate_batchnorm,
    task_loss,
)
from medsilo.config import read_manifest
from medsilo.config.site import load_sites_file
from medsilo.fs import write_atomic
from medsilo.medical.data import load_site_data
from medsilo.medical.models.zoo import build_model
from medsilo.medical.synth import SynthRequest, synthesize
from medsilo.secure.dp import clipped_gradient_sum, gaussian_gradient, poisson_sample, poisson_schedule

PUBLIC_SEED = 777
"""Seed of the public synthetic hospitals whose images set the BatchNorm statistics (``--batchnorm public``) or
pre-train the model (``--public-pretrain``)."""
PRETRAIN_BATCH, PRETRAIN_LR = 32, 0.03
"""Batch size and learning rate of the public pre-training (fixed, so every run starts from the same public model,
whatever batch and learning rate the sites then use)."""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_hospital_args(parser, rounds=25)
    parser.set_defaults(sites=8, images_per_site=400, dirichlet_alpha=0.3, classes=["normal", "pneumonia", "effusion",
                        "nodule"], lr=0.03, lr_schedule="cosine", warmup_rounds=3, weight_decay=5e-4)  # the pFL recipe
    parser.add_argument("--batchnorm", choices=["initial", "public", "groupnorm", "instancenorm", "train", "site"],
                        default="initial")  # fmt: skip
    parser.add_argument("--post-clip-weights", action="store_true", help="scale clipped gradients by w_y ≤ 1")
    parser.add_argument("--logit-adjust", action="store_true",
                        help="train on logits + log(n_y/N), score on the logits (Menon et al., 2021)")
    parser.add_argument("--step", choices=["dp-sgd", "sgd"], default="dp-sgd", help="sgd: no clipping, no noise")
    parser.add_argument("--pooled", action="store_true", help="one site holding every site's training images")
    parser.add_argument("--sigma", type=float, default=1e-4, help="σ_sgd (default: clip only)")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="G")
    parser.add_argument("--public-pretrain", type=int, default=0, metavar="EPOCHS",
                        help="first train on the public synthetic hospitals' labelled images for EPOCHS epochs")
    parser.add_argument("--train", choices=["all", "head", "frozen-bias"], default="all",
                        help="what the sites train: every parameter, the linear head alone, or all but the head's bias")
    args = parser.parse_args(argv)
    if args.batchnorm == "train" and args.step != "sgd":
        parser.error("--batchnorm train: only with --step sgd (DP-SGD needs each image's loss to depend on it alone)")
    if args.batchnorm == "train" and args.train == "head":
        parser.error("--train head: not with --batchnorm train (training would still move the backbone's statistics)")
    torch.set_num_threads(1)
    classes = list(args.classes)
    _, sites_yml = hospitals(args, "pfl")
    sites = [load_site_data(read_manifest(entry.manifest, classes), modality="cxr", image_size=args.image_size, seed=0)
             for _, entry in sorted(load_sites_file(sites_yml).sites.items())]  # fmt: skip
    trains = [site.train for site in sites]
    if args.pooled:
        trains = [Pooled(trains)]
    public = public_images(args, classes) if args.batchnorm == "public" or args.public_pretrain else None
    backbone = "cnn-in" if args.batchnorm == "instancenorm" else "cnn"  # the zoo's instance-normalised cnn
    model = build_model(backbone, in_channels=1, num_classes=len(classes), feature_dim=64, seed=args.seed)
    if args.batchnorm == "groupnorm":
        use_groupnorm(model)
    generators = [torch.Generator().manual_seed(args.seed * 1000 + i) for i in range(len(sites))]
    history, start = [], time.time()
    if args.public_pretrain:
        pretrain(model, public.dataset, args, generator=torch.Generator().manual_seed(PUBLIC_SEED))
        history.append(evaluation(model, sites, args.batchnorm, 0, start))  # round 0: the public model alone
    if args.batchnorm == "public":
        recalibrate_batchnorm(model, public)  # then after each averaging, which is the next round's start
    for rnd in range(1, args.rounds + 1):
        lr = args.lr * lr_factor(args.lr_schedule, rnd, args.rounds, warmup=args.warmup_rounds)
        states = []
        for train, generator in zip(trains, generators):
            local = copy.deepcopy(model)
            weights = site_weights(train.labels, len(classes), args.post_clip_weights)
            adjust = label_prior(train.labels, len(classes)) if args.logit_adjust else None
            if args.batchnorm == "site":
                recalibrate_batchnorm(local, torch.utils.data.DataLoader(train, batch_size=100))
            trained = trained_parameters(local, args.train)
            optimizer = make_optimizer(trained, lr=lr, weight_decay=args.weight_decay)
            if args.step == "sgd":
                sgd_epoch(local, train, optimizer, args.batch_size, generator, weights, args.batchnorm == "train", adjust)
            else:
                dp_sgd_epoch(local, train, optimizer, args.batch_size, args.grad_clip, args.sigma, generator, weights,
                             adjust)  # fmt: skip
            states.append(local.state_dict())
        model.load_state_dict({k: (sum(s[k].double() for s in states) / len(states)).to(states[0][k].dtype)
                               for k in states[0]})  # fmt: skip
        if args.batchnorm == "public":
            recalibrate_batchnorm(model, public)
        history.append(evaluation(model, sites, args.batchnorm, rnd, start))
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    weights = ("postclip" if args.post_clip_weights else "unweighted") + ("_logitadj" if args.logit_adjust else "")
    step = "sgd" if args.step == "sgd" else f"s{args.sigma:g}" + (f"_G{args.grad_clip:g}" if args.grad_clip != 1 else "")
    data = ("_pooled" if args.pooled else "") + (f"_shift{args.shift:g}" if args.shift != 1 else "")
    data += (f"_public{args.public_pretrain}" if args.public_pretrain else "") + ("" if args.train == "all" else f"_{args.train}")
    data += f"_B{args.batch_size}" if args.batch_size != 32 else ""
    tag = f"{args.sites}x{args.images_per_site}{data}_{args.batchnorm}_{weights}_{step}_lr{args.lr:g}_r{args.rounds}"
    out = {"benchmark": f"dp_private_path_{tag}_seed{args.seed}", "settings": settings, "history": history}
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / f"{out['benchmark']}.json", json.dumps(out, indent=2, default=str) + "\n")
    return out


def trained_parameters(model: torch.nn.Module, train: str) -> list[torch.nn.Parameter]:
    """What a site trains (``--train``): ``all`` parameters, the ``head`` alone, or all but the head's bias
    (``frozen-bias``: the bias keeps the public model's calibration between classes, away from DP-SGD's noise)."""
    if train == "head":
        return list(model.head.parameters())
    return [p for p in model.parameters() if not (train == "frozen-bias" and p is model.head.bias)]


def evaluation(model: torch.nn.Module, sites: list, batchnorm: str, rnd: int, start: float) -> dict:
    """One history row: the sites' mean validation balanced accuracy and AUROC, and how many predict one class."""
    vals = [evaluate_split(lambda x, m=scored(model, site.train, batchnorm): torch.softmax(m(x), 1), site.val)
            for site in sites]  # fmt: skip
    row = {"round": rnd, "val_balanced_acc": sum(v["balanced_acc"] for v in vals) / len(vals),
           "val_auroc": sum(v["auroc"] for v in vals) / len(vals),
           "constant_sites": sum(v["predicted_classes"] == 1 for v in vals), "seconds": time.time() - start}  # fmt: skip
    print(f"round {rnd}: val balanced acc {row['val_balanced_acc']:.3f}, AUROC {row['val_auroc']:.3f}, "
          f"{row['constant_sites']} constant site(s), {row['seconds']:.0f} s", flush=True)  # fmt: skip
    return row


def pretrain(model: torch.nn.Module, public: torch.utils.data.Dataset, args: argparse.Namespace, generator) -> None:
    """``--public-pretrain``: plain SGD on the public hospitals' labelled images (no site's record enters, so no
    privacy cost), ``args.public_pretrain`` epochs in batches of :data:`PRETRAIN_BATCH`, at :data:`PRETRAIN_LR` on a
    cosine schedule, each image's loss logit-adjusted by the public class prior; BatchNorm (if any) in train mode."""
    labels = torch.cat([torch.as_tensor(part.labels) for part in public.datasets])
    adjust = label_prior(labels, model.num_classes)
    ones = torch.ones(model.num_classes, dtype=torch.float64)
    for epoch in range(1, args.public_pretrain + 1):
        lr = PRETRAIN_LR * lr_factor("cosine", epoch, args.public_pretrain)
        optimizer = make_optimizer(model.parameters(), lr=lr, weight_decay=args.weight_decay)
        sgd_epoch(model, public, optimizer, PRETRAIN_BATCH, generator, ones, True, adjust)


def public_images(args: argparse.Namespace, classes: list[str]) -> torch.utils.data.DataLoader:
    """The public synthetic images (every split of 4 hospitals × 100, labelled): ``--batchnorm public`` estimates
    BatchNorm statistics on them, ``--public-pretrain`` trains on them."""
    req = SynthRequest("cxr", 4, 100, seed=PUBLIC_SEED, dirichlet_alpha=1.0, shift=1.0, classes=tuple(classes))
    folder = synthesize(WORK / f"dp_public_cxr_k{len(classes)}_seed{PUBLIC_SEED}", req, progress=False).parent
    data = [load_site_data(read_manifest(folder / f"hospital-{i}" / "manifest.csv", classes), modality="cxr",
                           image_size=args.image_size, seed=0) for i in range(1, 5)]  # fmt: skip
    images = torch.utils.data.ConcatDataset([d.split(s) for d in data for s in ("train", "val", "test")])
    return torch.utils.data.DataLoader(images, batch_size=100, shuffle=False)


def scored(model: torch.nn.Module, train: torch.utils.data.Dataset, batchnorm: str) -> torch.nn.Module:
    """The model a site scores, in eval mode: the global one, or (``--batchnorm site``) a copy with BatchNorm
    statistics re-estimated on the site's ``train`` images."""
    if batchnorm == "site":
        model = copy.deepcopy(model)
        recalibrate_batchnorm(model, torch.utils.data.DataLoader(train, batch_size=100))
    return model.eval()


class Pooled(torch.utils.data.ConcatDataset):
    """The union of the sites' training sets, with ``labels`` like one site's (``--pooled``)."""

    def __init__(self, parts: list[torch.utils.data.Dataset]):
        super().__init__(parts)
        self.labels = torch.cat([part.labels for part in parts])


def use_groupnorm(model: torch.nn.Module) -> None:
    """Replace every ``BatchNorm2d`` of ``model`` in place by ``GroupNorm(8, C)`` (``--batchnorm groupnorm``).
    ``--batchnorm instancenorm`` builds the zoo's ``cnn-in`` instead (``GroupNorm(C, C)``, same initial weights)."""
    for name, child in model.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            setattr(model, name, torch.nn.GroupNorm(8, child.num_features))
        else:
            use_groupnorm(child)


def site_weights(labels: torch.Tensor, k: int, post_clip: bool) -> torch.Tensor:
    """``(K,)`` per-class factors on clipped gradients: ones, or ``min(1, (N/K)/n_y)`` (≤ 1 keeps G the bound)."""
    if not post_clip:
        return torch.ones(k, dtype=torch.float64)
    counts = torch.bincount(labels, minlength=k).double().clamp_min(1)
    return (counts.sum() / k / counts).clamp(max=1.0)


def label_prior(labels: torch.Tensor, k: int) -> torch.Tensor:
    """``(K,)`` ``log(n_y / N)`` of a site's labels, for ``--logit-adjust``: the jobs' own
    :func:`~medsilo.components.training.log_prior` of their counts (a class with no image counts as one)."""
    return log_prior(torch.bincount(labels, minlength=k))


def dp_sgd_epoch(model, data, optimizer, batch_size: int, clip: float, sigma: float, generator, weights,
                 adjust: torch.Tensor | None = None) -> None:  # fmt: skip
    """One epoch of DP-SGD's step (:func:`~medsilo.secure.dp.poisson_schedule`), each class's clipped gradient sum
    (:func:`~medsilo.secure.dp.clipped_gradient_sum`) scaled by ``weights[class]``, each record's loss the
    logit-adjusted one when ``adjust`` (a ``(K,)`` log prior) is given; with unit weights and no ``adjust`` it is
    :func:`~medsilo.components.training.private_epochs`' step."""
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trained = {name: p for name, p in model.named_parameters() if id(p) in stepped}
    n = len(data)
    steps, rate = poisson_schedule(n, batch_size, 1)
    for _ in range(steps):
        batch = poisson_sample(n, rate, generator)
        total = {name: torch.zeros(p.shape, dtype=torch.float64) for name, p in trained.items()}
        if len(batch):
            x, y = torch.utils.data.default_collate([data[int(i)] for i in batch])
            grads, _ = per_record_gradients(model, x, y, params=trained.values(), logit_shift=adjust)
            for c in torch.unique(y):
                for name, g in clipped_gradient_sum({k: v[y == c] for k, v in grads.items()}, clip).items():
                    total[name] += float(weights[c]) * g
        noisy = gaussian_gradient(total, clip, sigma, generator)
        optimizer.zero_grad(set_to_none=True)
        for name, p in trained.items():
            p.grad = (noisy[name] / (rate * n)).to(p.dtype)
        optimizer.step()


def sgd_epoch(model, data, optimizer, batch_size: int, generator, weights, train_mode: bool,
              adjust: torch.Tensor | None = None) -> None:  # fmt: skip
    """One epoch of plain mini-batch SGD (``--step sgd``): shuffled batches of ``batch_size``, each image's loss
    weighted by ``weights[class]`` (and logit-adjusted by ``adjust`` when given); BatchNorm in train mode (batch
    statistics) only when ``train_mode``. Not :func:`~medsilo.components.training.local_epochs`, which always
    trains in train mode."""
    model.train(train_mode)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)
    for x, y in loader:
        loss = task_loss(model(x), y, weights.float(), adjust)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


if __name__ == "__main__":
    main()
