"""The contract between the round engine and an FL algorithm, plus the helpers every algorithm shares.

An algorithm is one module in ``components/algorithms/`` holding a ``Config`` (its validated
hyper-parameters), a :class:`Client` half that runs at each site and a :class:`Server` half. Neither
half imports NVFlare: the site executor and the round controller call them.

One round, as the engine drives it (DESIGN §3)::

    site:   client.receive(payload, rnd)         # apply what the server sent (None before round 1)
            metrics = evaluate(client.scores)    # the model this site would deploy now (val, test)
            upload, loss = client.train(rnd)     # local training; upload is a dict of *sums*
    server: aggregate = Σ_sites upload           # element-wise, per name (on ciphertexts under CKKS)
            payload = server.update(aggregate, rnd)

**Uploads are sums.** Every tensor a client uploads is something the server adds across sites:
parameters × n, per-class feature sums, per-class counts, logit sums, and ``n`` itself. That one rule
lets the same algorithm run in plaintext, with DP noise or under CKKS. For *linear* algorithms the
server passes the aggregate through unchanged (``Server.update`` default) and each site finishes the
mean itself (``Σ θ·n / Σ n``), which is what makes encrypted aggregation possible without the server
ever decrypting. Algorithms that learn on the server from the aggregate set
``Server.needs_plaintext_aggregate``.

**BatchNorm.** Only ``nn.Parameter`` tensors are shared; BatchNorm running statistics never leave a
site (as in the PFLlib reference, i.e. FedBN-style normalisation). With the severe scanner shift of
chest X-rays this keeps every hospital's intensity statistics its own.

Shapes: ``n`` is a 0-d float32 tensor (training images this round); parameters keep their shapes.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import torch
from pydantic import ConfigDict
from torch import nn

from medsilo.components.training import (
    ExtraLoss,
    Forward,
    balanced_class_weights,
    local_epochs,
    log_prior,
    lr_factor,
    make_optimizer,
    private_epochs,
    probabilities,
)
from medsilo.config.common import Strict
from medsilo.config.job import DPSpec, Training
from medsilo.medical.data import SiteData
from medsilo.secure.dp import (
    DPError,
    DPRelease,
    Event,
    GaussianEvent,
    gaussian_counts,
    gaussian_update,
    poisson_schedule,
)

Tensors = dict[str, torch.Tensor]
"""Named tensors: uploads (sums) and payloads."""


class AlgorithmConfig(Strict):
    """Base of every algorithm's ``Config``: validated from the job's ``algorithm.params``, frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class SiteSetup:
    """What the site executor hands an algorithm's client half.

    Attributes:
        site: the site's name.
        model: a freshly built :class:`~medsilo.medical.models.zoo.SplitModel`. Homogeneous jobs build
            it from the job seed, so every site starts from the same weights.
        data: the site's train/val/test splits.
        num_classes: K.
        training: the job's local-training settings (epochs, batch size, optimiser …).
        seed: this site's seed (data order); differs between sites.
        batch_size: the batch size after the site's cap.
        task: the job's ``task``: ``single`` (labels are class indices, softmax outputs) or ``multilabel``
            (targets ``(K,)`` with NaN for unknown, one sigmoid per output; only algorithms whose module
            declares ``MULTILABEL = True`` are given such a site).
    """

    site: str
    model: nn.Module
    data: SiteData
    num_classes: int
    training: Training
    seed: int
    batch_size: int
    task: str = "single"

    @property
    def multilabel(self) -> bool:
        """True for a multi-label job (sigmoid outputs, masked binary cross-entropy)."""
        return self.task == "multilabel"

    @property
    def n_train(self) -> int:
        """Training images at this site."""
        return len(self.data.train)


@dataclass
class Upload:
    """What one local round produces: the sums to upload and the mean training loss."""

    sums: Tensors
    train_loss: float


class Client:
    """Client half: runs at one site, holds that site's personal state between rounds.

    Subclasses override :meth:`receive`, :meth:`train` and, when the deployed model is not
    ``self.model``, :meth:`scores`. Their ``train`` docstring lists every uploaded tensor with its shape,
    dtype and what it reveals (house style).
    """

    dp_form: ClassVar[str | None] = None
    """How :meth:`train_private` makes the upload differentially private: ``"class_sums"`` (record-level:
    DP-SGD training, then per-record clipped per-class sums and counts of the trained model's features),
    ``"update"`` (clipped, noised weight update; FedAvg's default, which its ``Config.dp_form`` can switch to
    record-level DP-SGD training) or ``None`` (no DP form: jobs in a ``dp`` mode are refused at validation).
    What a round costs is :meth:`dp_events`."""

    def __init__(self, setup: SiteSetup, config: AlgorithmConfig):
        self.setup = setup
        self.config = config
        self.model = setup.model
        # (K,) float64 class counts drawn under DP (logit_shift), once per job; in the checkpoint, so a resumed
        # job reads the same counts and is not charged for them again
        self.released_counts: torch.Tensor | None = None

    def receive(self, payload: Tensors | None, rnd: int) -> None:
        """Apply the server's payload before round ``rnd`` (``payload`` is ``None`` before round 1)."""

    def train(self, rnd: int) -> Upload:
        """Run local training for round ``rnd`` (1-based) and return the sums to upload."""
        raise NotImplementedError

    def train_private(self, rnd: int, dp: DPRelease) -> Upload:
        """Like :meth:`train`, with the upload made differentially private: exactly the mechanisms
        :meth:`dp_events` declares, which the site charges to its budget before this runs."""
        raise NotImplementedError(f"{type(self).__module__} has no differentially private form")

    @classmethod
    def trains_with_dp_sgd(cls, config: AlgorithmConfig) -> bool:
        """Whether a private round under ``config`` trains with DP-SGD, whose per-image loss is cross-entropy (so a
        multi-label job cannot run it; spec validation asks). Default: the ``"class_sums"`` form does. A class
        method, so validating a spec builds no client."""
        return cls.dp_form == "class_sums"

    def dp_events(self, dp: DPSpec) -> list[Event]:
        """The DP events one :meth:`train_private` round costs under the job's ``privacy.dp`` settings.

        The site checks them against its budget *before* training and charges them with the release.
        Default: one Gaussian mechanism of multiplier ``dp.noise_multiplier`` (the release of an update
        form, e.g. FedAvg's ``gaussian_update``); algorithms that also train privately override it.

        Args:
            dp: the job's validated DP settings.

        Returns:
            the events, in the order the mechanisms run.
        """
        return [GaussianEvent(noise_multiplier=dp.noise_multiplier)]

    def once_dp_events(self, dp: DPSpec) -> list[Event]:
        """DP events the *next* private round costs besides :meth:`dp_events`, charged once in the job.

        A ``loss: logit-adjusted`` job whose private rounds train with DP-SGD draws its class counts under DP
        (:meth:`logit_shift`) at the first of them: ``[GaussianEvent(dp.count_noise_multiplier)]`` until the
        counts are drawn (:attr:`released_counts`), ``[]`` after, and ``[]`` in every other job. The site asks
        before each round and charges these with that round's upload; a round that is not uploaded restores
        the client as it was, counts included, so they are drawn and charged again with the next one."""
        if self.released_counts is not None or not self._counts_under_dp():
            return []
        return [GaussianEvent(noise_multiplier=dp.count_noise_multiplier)]

    def _counts_under_dp(self) -> bool:
        return self.setup.training.loss == "logit-adjusted" and type(self).trains_with_dp_sgd(self.config)

    @torch.no_grad()
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, K)`` of the model this site deploys, for a batch ``(B, C, H, W)`` (one
        sigmoid per label in a multi-label job: :func:`~medsilo.components.training.probabilities`)."""
        self.model.eval()
        return probabilities(self.model(x), self.setup.multilabel)

    # ---- helpers shared by algorithms -------------------------------------------------------------

    def train_loader(self, rnd: int) -> torch.utils.data.DataLoader:
        """Shuffled training batches, ordered by (site seed, round): reproducible, different per round.

        The augmentation's generator is re-seeded from (site seed, round) too, so a round's batches do not
        depend on earlier rounds and a resumed job draws what the uninterrupted one drew. A final batch of
        exactly one image is dropped (BatchNorm cannot train on it); nothing else is.
        """
        data = self.setup.data.train
        batch = min(self.setup.batch_size, len(data))
        seed = self.seed_augmentation(rnd)
        g = torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(
            data, batch_size=batch, shuffle=True, generator=g, drop_last=len(data) % batch == 1
        )

    def seed_augmentation(self, rnd: int) -> int:
        """Re-seed the training split's augmentation from (site seed, round); returns that seed."""
        data = self.setup.data.train
        seed = self.setup.seed * 100_003 + rnd
        if hasattr(getattr(data, "augment", None), "set_random_state"):
            data.augment.set_random_state(seed=seed % 2**32)
        return seed

    def dp_schedule(self) -> tuple[int, float]:
        """``(T, q)``: DP-SGD steps per round and Poisson sampling rate at this site
        (:func:`~medsilo.secure.dp.poisson_schedule` of N training images, the batch size, local epochs)."""
        return poisson_schedule(self.setup.n_train, self.setup.batch_size, self.setup.training.local_epochs)

    def optimizer(self, params, rnd: int | None = None) -> torch.optim.Optimizer:
        """A fresh local optimiser over ``params`` with the job's settings: its learning rate at round ``rnd``
        (the job's ``lr_schedule`` and ``warmup_rounds``, :func:`~medsilo.components.training.lr_factor`;
        ``None``: the job's ``lr``), and every step's gradient norm clipped to ``grad_clip_norm`` when set."""
        t = self.setup.training
        lr = t.lr if rnd is None else t.lr * lr_factor(t.lr_schedule, rnd, t.rounds, warmup=t.warmup_rounds,
                                                       step_rounds=t.lr_step_rounds, step_gamma=t.lr_step_gamma)  # fmt: skip
        opt = make_optimizer(params, name=t.optimizer, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay)
        if t.grad_clip_norm is not None:
            limit = t.grad_clip_norm

            def clip(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], limit)

            opt.register_step_pre_hook(clip)
        return opt

    def class_weight(self) -> torch.Tensor | None:
        """The loss's per-class weights: ``None``, or with ``class_weights: balanced`` N / (K·n_c) from this
        site's training split (:func:`~medsilo.components.training.balanced_class_weights`)."""
        if self.setup.training.class_weights != "balanced":
            return None
        return balanced_class_weights(self.setup.data.train.class_counts(self.setup.num_classes))

    def logit_shift(self, dp: DPRelease | None = None) -> torch.Tensor | None:
        """What the loss adds to the logits: ``None``, or with ``loss: logit-adjusted`` the log class prior
        (:func:`~medsilo.components.training.log_prior`) of this site's training split.

        Ordinary training (``dp`` ``None``; also FedAvg's ``update`` form, whose release covers the whole dataset)
        reads the true counts. DP-SGD training (``dp`` given) must not: the first call draws them once with
        :func:`~medsilo.secure.dp.gaussian_counts` (σ = ``dp.count_noise_multiplier``, noise from ``dp.generator``),
        keeps them in :attr:`released_counts` and every later call reads those. Privacy effect: nothing leaves;
        the draw is the ``GaussianEvent`` that :meth:`once_dp_events` declared for this round.

        Raises:
            medsilo.secure.dp.DPError: a DP-SGD round with no ``count_noise_multiplier`` (nothing is drawn).
        """
        if self.setup.training.loss != "logit-adjusted":
            return None
        if dp is None:
            return log_prior(self.setup.data.train.class_counts(self.setup.num_classes))
        if not self._counts_under_dp():  # a draw once_dp_events did not declare would go uncharged
            raise DPError(f"{type(self).__module__}: trains with DP-SGD but does not declare it (trains_with_dp_sgd); "
                          "refusing to draw class counts that no event charges")  # fmt: skip
        if self.released_counts is None:
            if dp.count_noise_multiplier is None:
                raise DPError("a logit-adjusted DP-SGD round needs count_noise_multiplier (DPRelease.from_spec); "
                              "refusing to read the true class counts")  # fmt: skip
            self.released_counts = gaussian_counts(self.setup.data.train.labels, self.setup.num_classes,
                                                   dp.count_noise_multiplier, dp.generator)  # fmt: skip
        counts = self.released_counts
        if counts.shape != (self.setup.num_classes,) or counts.dtype != torch.float64 or not bool(counts.isfinite().all()):
            raise DPError(f"the class counts this job drew are malformed ({tuple(counts.shape)}, {counts.dtype}; "
                          "a damaged checkpoint?); refusing to train on them")  # fmt: skip
        return log_prior(counts)

    def fit(
        self,
        rnd: int,
        *,
        model: nn.Module | None = None,
        params=None,
        epochs: int | None = None,
        extra_loss: ExtraLoss | None = None,
        forward: Forward | None = None,
    ) -> float:
        """Train with the shared loop (:func:`~medsilo.components.training.local_epochs`); returns the
        mean task loss.

        Args:
            rnd: the round (seeds the data order).
            model: the module put in train mode (default ``self.model``; pass a container when
                ``forward`` uses extra modules).
            params: parameters the optimiser updates (default: all of ``model``'s).
            epochs: passes over the data (default: the job's ``local_epochs``).
            extra_loss: the algorithm's extra loss term on the default path.
            forward: the algorithm's own prediction path ``(x, y) -> (logits, extra)``.
        """
        model = self.model if model is None else model
        opt = self.optimizer(model.parameters() if params is None else params, rnd)
        epochs = self.setup.training.local_epochs if epochs is None else epochs
        return local_epochs(model, self.train_loader(rnd), opt, epochs=epochs, extra_loss=extra_loss, forward=forward,
                            class_weight=self.class_weight(), logit_shift=self.logit_shift())  # fmt: skip

    def fit_private(self, rnd: int, dp: DPRelease, *, extra_loss: ExtraLoss | None = None) -> float:
        """Train all of ``self.model`` with DP-SGD (:func:`~medsilo.components.training.private_epochs`):
        the job's local epochs, batch size, optimiser and learning rate, :meth:`dp_schedule`'s steps and
        sampling rate, ``dp.sgd()``'s bound and multiplier, noise and batches from ``dp.generator``.

        Privacy effect: nothing leaves; the model becomes the output of
        ``GaussianEvent(σ_sgd, steps=T, sampling_rate=q)``, which :meth:`dp_events` must declare (and, in a
        ``logit-adjusted`` job's first private round, of the class-count draw :meth:`once_dp_events` declares).
        Returns the mean task loss (a non-private statistic).

        Raises:
            medsilo.secure.dp.DPError: ``dp`` carries no DP-SGD settings (nothing is trained).
        """
        grad_clip, sigma = dp.sgd()
        self.seed_augmentation(rnd)
        return private_epochs(self.model, self.setup.data.train, self.optimizer(self.model.parameters(), rnd),
                              epochs=self.setup.training.local_epochs, batch_size=self.setup.batch_size,
                              grad_clip=grad_clip, noise_multiplier=sigma, generator=dp.generator,
                              extra_loss=extra_loss, logit_shift=self.logit_shift(dp))  # fmt: skip


class Server:
    """Server half: turns the sum of the sites' uploads into the next payload.

    The default is the linear case: the payload *is* the aggregate, and sites finish the mean.
    """

    needs_plaintext_aggregate: ClassVar[bool] = False
    """True when :meth:`update` must read the aggregate (server-side learning), i.e. it cannot run on
    ciphertexts; under CKKS such algorithms need an aggregate release (DESIGN §5)."""

    def __init__(self, config: AlgorithmConfig, num_classes: int, sites: list[str]):
        self.config = config
        self.num_classes = num_classes
        self.sites = sites

    @classmethod
    def form_for(cls, config: AlgorithmConfig) -> str:
        """What the server half reads under ``config``: ``"sums"`` (the aggregate only; the default) or
        ``"per-site"`` (each site's upload separately, for a published method that learns from per-site
        tensors, e.g. FedTGP's prototype training). Recorded in ``results.json`` as ``algorithm_form``;
        ``per-site`` runs only in privacy mode ``none`` (DESIGN §5). A class method, so validating a spec
        never builds a server (which may load files the job names)."""
        return "sums"

    @property
    def form(self) -> str:
        """:meth:`form_for` of this server's config."""
        return self.form_for(self.config)

    def update(self, aggregate: Tensors, rnd: int) -> Tensors:
        """Payload for round ``rnd + 1`` from ``aggregate`` = Σ of round ``rnd``'s uploads."""
        return aggregate

    def update_from_sites(self, uploads: dict[str, Tensors], rnd: int) -> Tensors:
        """Payload for round ``rnd + 1`` from each site's own upload; called instead of :meth:`update`
        when :attr:`form` is ``"per-site"``."""
        raise NotImplementedError(f"{type(self).__module__}: form 'per-site' needs update_from_sites")


# ---- the swept training recipe ------------------------------------------------------------------------


PLAIN_RECIPE: Mapping[str, object] = MappingProxyType({"lr": 0.01, "lr_schedule": "constant", "warmup_rounds": 0,
                                                       "weight_decay": 0.0, "class_weights": "none"})  # fmt: skip
"""The job defaults of those ``training`` options (lr 0.01, constant, no weight decay, unweighted loss): the
baseline ``benchmarks/recipe.py`` sweeps against. It won on validation for FedTGP only (within noise: 0.587 vs 0.571,
3 seeds; BENCHMARKS.md), which declares it as its ``RECIPE``."""


COSINE_RECIPE: Mapping[str, object] = MappingProxyType({"lr": 0.03, "lr_schedule": "cosine", "warmup_rounds": 3,
                                                        "weight_decay": 5e-4, "class_weights": "balanced"})  # fmt: skip
"""``training`` options (:class:`~medsilo.config.job.Training`) that ``benchmarks/recipe.py`` compares with the
plain default (lr 0.01, constant, no weight decay, unweighted loss). A larger early learning rate that a cosine
schedule brings down after 3 warm-up rounds, light weight decay, and class-balanced loss weights. On validation
data it won for every algorithm swept so far: Local, FedAvg, FedPer, FedProx, Ditto, FedRep, FedALA, FedDBE, GPFL,
FedCP, FedProto, FedDistill, LG-FedAvg and FedKTL — all but FedTGP (3 seeds of the four-hospital two-finding CXR
setting, every site on the ``cnn``; for Local, FedAvg and FedPer also seed 0 of the eight-hospital four-finding one;
BENCHMARKS.md), so those modules declare it as their ``RECIPE``. A ``dp`` job cannot use its class weights (they
depend on every record) and trains unweighted. A job still sets its recipe itself (the recipe belongs to the job);
``RECIPE`` records what the sweep chose. Read-only: the modules share it."""


# ---- pure helpers ---------------------------------------------------------------------------------


PRESENT = 0.5
"""A class is present when its (summed) count is at least this. Counts are whole numbers (images, or 0/1 site
indicators), so the margin changes nothing in plaintext and absorbs CKKS approximation error around 0: a class
no site has can decrypt to ±1e-8, which ``count > 0`` would take for a class (and divide noise by it)."""


def class_means(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class means from per-class sums and counts — the one presence rule of every algorithm.

    Args:
        sums: ``(K, …)`` per-class sums (features, logits, prototypes).
        counts: ``(K,)`` per-class counts.

    Returns:
        ``(means, present)``: ``sums[k] / counts[k]`` float32 where ``counts[k] ≥`` :data:`PRESENT`, zero rows
        elsewhere (never NaN), and the ``(K,)`` bool mask.
    """
    sums, counts = sums.detach().float(), counts.detach().float()
    present = counts >= PRESENT
    shape = (-1,) + (1,) * (sums.dim() - 1)
    safe = torch.where(present, counts, torch.ones_like(counts)).view(shape)
    return torch.where(present.view(shape), sums / safe, torch.zeros_like(sums)), present


MMD_BANDWIDTHS: tuple[float, ...] = (10.0, 15.0, 20.0, 50.0)
"""σ of the RBF kernel sum ``k(a, b) = Σ_σ exp(−‖a − b‖² / (2σ))`` of the MMD terms (FedCP's and FedKTL's
reference values)."""


def rbf_kernel(a: torch.Tensor, b: torch.Tensor, bandwidths: tuple[float, ...] = MMD_BANDWIDTHS) -> torch.Tensor:
    """Kernel matrix ``(M, N)``: ``k(a_i, b_j) = Σ_σ exp(−‖a_i − b_j‖² / (2σ))`` (σ scales the squared
    distance, as the references do). Squared distances come from the expanded formula, clamped at 0: no square
    root, so no NaN gradient for coincident points.

    Args:
        a: rows ``(M, d)``.
        b: rows ``(N, d)``.
        bandwidths: the σ values.
    """
    squared = (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1) - 2 * a @ b.T).clamp_min(0)
    return sum(torch.exp(-squared / (2 * sigma)) for sigma in bandwidths)


def mmd2(a: torch.Tensor, b: torch.Tensor, bandwidths: tuple[float, ...] = MMD_BANDWIDTHS) -> torch.Tensor:
    """Biased (V-statistic) squared MMD between the rows of ``a`` ``(M, d)`` and ``b`` ``(N, d)``.

    ``mean k(a, a) + mean k(b, b) − 2 mean k(a, b)`` over all pairs, diagonals included: a scalar ≥ 0,
    exactly 0 when ``a`` and ``b`` hold the same rows.
    """
    within_a, within_b = rbf_kernel(a, a, bandwidths).mean(), rbf_kernel(b, b, bandwidths).mean()
    return within_a + within_b - 2 * rbf_kernel(a, b, bandwidths).mean()


def weighted_params(module: nn.Module, n: int, prefix: str) -> Tensors:
    """``{prefix + name: θ · n}`` for every parameter of ``module`` (BatchNorm statistics excluded)."""
    return {f"{prefix}{name}": p.detach().float() * float(n) for name, p in module.named_parameters()}


def count(n: int) -> Tensors:
    """``{"n": n}`` as a 0-d float32 tensor (summed into the total training-image count)."""
    return {"n": torch.tensor(float(n))}


@torch.no_grad()
def load_mean(module: nn.Module, payload: Tensors, prefix: str) -> None:
    """Set every parameter of ``module`` to ``payload[prefix + name] / payload["n"]`` (the weighted mean).

    Raises:
        KeyError: the payload lacks a parameter of ``module`` (names the parameter).
        ValueError: ``n`` is not positive.
    """
    total = float(payload["n"])
    if total <= 0:
        raise ValueError(f"aggregate count n must be > 0, got {total}")
    for name, p in module.named_parameters():
        key = f"{prefix}{name}"
        if key not in payload:
            raise KeyError(f"payload has no '{key}'; sites and server disagree on the model")
        p.copy_(payload[key] / total)


def frozen_copy(params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
    """Detached clones of ``params`` (same shapes), the fixed anchor ``w_g`` of a proximal term."""
    return [p.detach().clone() for p in params]


def proximal_term(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], mu: float) -> torch.Tensor:
    """The proximal term ``(μ/2) Σ_j ‖params_j − anchor_j‖²``.

    Its gradient w.r.t. ``params_j`` is ``μ (params_j − anchor_j)``.

    Args:
        params: the tensors being trained (any shapes).
        anchor: frozen tensors of the same shapes (no gradient flows into them).
        mu: proximal weight μ.

    Returns:
        0-d tensor.
    """
    if len(params) != len(anchor):
        raise ValueError(f"proximal term: {len(params)} parameters but {len(anchor)} anchor tensors")
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))


def proximal_loss(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], mu: float) -> ExtraLoss:
    """:func:`proximal_term` as an ``extra_loss(features, logits, labels)`` for the shared training loop."""

    def extra(features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return proximal_term(params, anchor, mu)

    return extra


def private_weights(module: nn.Module, before: Tensors, dp: DPRelease, prefix: str) -> Tensors:
    """``{prefix + name: θ_before + noisy clipped (θ − θ_before)}`` for every parameter of ``module``.

    The update Δ = θ − θ_before is clipped to global L2 norm ``dp.clip`` and noised by
    :func:`medsilo.secure.dp.gaussian_update` (site-level: the whole local dataset is the unit). The
    result is *not* weighted by n: the site's dataset size would leak unnoised, so under DP sites are
    averaged with equal weight (upload ``n`` = 1).
    """
    delta = {name: p.detach().float() - before[name] for name, p in module.named_parameters()}
    noisy = gaussian_update(delta, dp.clip, dp.noise_multiplier, dp.generator)
    return {f"{prefix}{name}": before[name] + noisy[name] for name in delta}


@contextlib.contextmanager
def shared_init(model: nn.Module) -> Iterator[None]:
    """Build extra shared modules (CPN, CoV, GCE …) identically at every site.

    Inside the block torch's CPU generator is seeded from a CRC-32 of ``model``'s initial head weights,
    which every site of a homogeneous job shares (the model is built from the job seed); the caller's
    generator state is restored afterwards, so nothing global is seeded.
    """
    seed = zlib.crc32(model.head.weight.detach().cpu().numpy().tobytes())
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield
