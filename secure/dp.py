r"""Differential privacy at the site: the Gaussian and exponential mechanisms, and the accountant that
keeps each site's (ε, δ) under its budget cap (DESIGN §5, §9). The accounting half (events, ε, the
accountant; no torch) lives in :mod:`medsilo.secure.accounting` and is re-exported here.

Everything here runs *at the site*, before an upload leaves it. The mechanisms are pure functions of
their inputs and of an explicit random generator (``torch.Generator`` or ``numpy.random.Generator``);
nothing reads the global RNG. The accountant never computes ε itself: every ε comes from Google's
``dp_accounting`` (RDP or PLD) applied to the composed events.

**The unit of privacy (adjacency).** A site's budget is a *record-level* guarantee: two datasets of a
site are neighbours when one is the other with **one record (one image of one patient) added or
removed** (``NeighboringRelation.ADD_OR_REMOVE_ONE`` in ``dp_accounting``). Every mechanism below is
calibrated against this relation, so all events of a site compose into the one budget. A patient with
m images is covered only through group privacy (for a Gaussian release: sensitivity × m); per-patient
clipping (one contribution per ``patient_id``) is not done here.

**noise_multiplier.** σ means the same thing everywhere, as in ``dp_accounting``: the standard
deviation of the added noise divided by the L2 sensitivity Δ₂ of what is released. The ε of a release
therefore depends only on (σ, steps, sampling rate), whatever the mechanism; the noise *std* is σ·Δ₂,
and Δ₂ is stated per mechanism:

* :func:`gaussian_sum` releases per-class sums ``(K, d)`` and counts ``(K,)``: Δ₂ = √2·C; noise std
  √2·σ·C on the sums, √2·σ on the counts.
* :func:`gaussian_update` releases a weight update (all tensors together): Δ₂ = 2·C; noise std 2·σ·C.
* :func:`gaussian_gradient` (one DP-SGD step) noises the sum of per-record clipped gradients: Δ₂ = G
  (``grad_clip``); noise std σ_sgd·G per coordinate.
* :func:`gaussian_counts` draws a site's K class counts: Δ₂ = 1; noise std σ. Nothing leaves with them: a
  ``logit-adjusted`` job's DP-SGD reads them in place of the true counts, charged once.
* :func:`exponential_mechanism` releases k indices among n candidates: pure ε, with the score
  sensitivity Δ given by the caller.

*Per-class sums* (FedProto/FedTGP prototypes ``proto_sum``/``proto_count`` under ``dp``; **record-level**
protection). Each record i contributes its clipped vector ``x̃_i = x_i · min(1, C/‖x_i‖)`` (‖x̃_i‖ ≤ C)
to row y_i of the sums and 1 to ``counts[y_i]``. The released vector is the concatenation ``[S, C·n]``;
adding or removing one record changes one row of S by ``x̃_i`` and one entry of ``C·n`` by C, so

.. math::  \Delta_2 = \sqrt{\lVert\tilde x_i\rVert^2 + C^2} \le \sqrt{2}\,C .

Noise ``N(0, (σ·√2·C)²)`` on every entry of ``[S, C·n]`` is the Gaussian mechanism with noise
multiplier σ; dividing the count part by C gives noise ``N(0, 2σ²)`` on the counts. This holds only if
**each record appears at most once** among the rows passed in (a record seen in E local epochs must be
passed once, e.g. from one extra pass, or the sensitivity is E·√2·C), and only if **the map from a
record to its row is fixed**, i.e. does not depend on the other records: ``x_i = φ(image_i)`` with φ
the same for D and D′, evaluated image by image (BatchNorm in eval mode). A φ *trained on the same
records* breaks this: removing one record changes φ and so every row, and √2·C bounds nothing. The
prototype methods therefore train φ with DP-SGD (below) and charge both mechanisms: by **adaptive
composition** the sum release is, for every fixed φ, a Gaussian mechanism of sensitivity √2·C, and φ is
the output of an earlier DP mechanism on the same data (kept at the site, never released itself), so
the pair costs the composition of the DP-SGD event and the release event (RDP composition holds for
adaptively chosen mechanisms). Classes without records get noise like all others, so zero rows do not
reveal the label set.

*DP-SGD* (training φ of the prototype methods under ``dp``; **record-level**; Abadi et al. 2016,
`arXiv:1607.00133 <https://arxiv.org/abs/1607.00133>`_). Each step samples a batch by **Poisson
sampling** (:func:`poisson_sample`: every record independently with probability q = B/N, from the
site's OS-seeded generator, so the server cannot know which records were used), computes each sampled
record's gradient of its own loss, clips it to joint L2 norm ≤ G over all trained parameters
(:func:`clipped_gradient_sum`) and adds ``N(0, (σ_sgd·G)²)`` per coordinate to the sum
(:func:`gaussian_gradient`). Adding or removing one record adds or removes one clipped term, so
Δ₂ = G: each step is the Poisson-subsampled Gaussian mechanism, and a round of T = E·⌈N/B⌉ steps
(:func:`poisson_schedule`) is ``GaussianEvent(σ_sgd, steps=T, sampling_rate=q)``. It holds only when a
record's loss depends on no other record (no BatchNorm batch statistics, so BatchNorm runs in eval mode
on statistics that are not computed from the data) and every other input is public or the output of an
already-charged mechanism (e.g. the global prototypes). q is computed from the site's N, which is
treated as public, as is usual for DP-SGD.

*Weight updates* (FedAvg-family ``w.<param>``; **site-level** protection). The update
``Δθ = θ_local − θ_global`` of all shared tensors is clipped to global L2 norm ≤ C. Training is not
record-level private (no DP-SGD), so one record may change the update arbitrarily *within the C-ball*:
for **any** two datasets D, D′ of the site, ``‖Δθ̃(D) − Δθ̃(D′)‖ ≤ 2C``. Noise ``N(0, (2σC)²)`` per entry
is therefore the Gaussian mechanism with noise multiplier σ both for the record relation of the budget
and for the strongest site-level relation ("the site's whole dataset replaced by any other"): the
server learns about the site's dataset as a whole no more than (ε, δ) allows. (The zero-out relation of
DP-FedAvg — site present vs absent — would need only C; we charge the 2C a site-local release needs.)
Anything released next to the update must be noised or public too: an exact ``n`` (training images)
is a count with record sensitivity 1 and is **not** covered by this mechanism.

*Exponential mechanism* (PCEvolve selection, DESIGN §9; record-level). Candidate i is chosen with
probability ∝ ``exp(ε·s_i/(2Δ))`` where Δ bounds how much any one score can change between neighbouring
datasets (PCEvolve: scores in [0, 1], Δ = 1). One draw is ε-DP (pure, δ = 0). ``k`` draws are ``k``
sequential draws without replacement at ε/k each (ε-DP in total by basic composition), sampled in one
shot with the Gumbel-top-k trick, which has exactly that distribution.

**Accounting.** :class:`PrivacyAccountant` keeps one site's events for one budget scope, with δ fixed
for the scope, and reports ε by composing them with ``dp_accounting``:

* ``"rdp"`` (default): Rényi DP (``RdpAccountant``, ADD_OR_REMOVE_ONE). The standard in DP training
  (Opacus, TF Privacy), so reported ε are comparable with the literature; closed-form per order, fast
  and exactly reproducible when the ledger is replayed; always a valid upper bound. A Gaussian event is
  ``GaussianDpEvent(σ)`` (Poisson-subsampled when ``sampling_rate < 1``) self-composed ``steps`` times.
  An exponential-mechanism draw is treated as a generic ε-DP mechanism, which is (ε²/2)-zCDP (Bun &
  Steinke 2016, Prop. 3.3): ``ZCDpEvent(rho=ε²/2)``.
* ``"pld"``: privacy-loss distributions (``dp_accounting.pld``), numerically tight (typically 5–15 %
  lower ε than RDP for the same events) but slower, with a discretisation interval (pessimistic
  rounding, so still an upper bound). Gaussian events as ``PLDAccountant`` builds them; an ε-DP draw as
  ``from_privacy_parameters(ε, 0)``, the dominating pair of *every* ε-DP mechanism.

Whatever the accountant, the reported total is ``min(ε_all, ε_gauss + Σ ε_pure)``: ``ε_all`` composes
every event; the second is basic composition of the Gaussian events' (ε, δ) with the pure-ε draws,
whose ε simply add. Both are valid (ε, δ) guarantees, so their minimum is; it keeps a handful of
exponential draws at their exact ε (zCDP alone overstates few pure events) while many draws profit from
RDP/PLD composition. A scope must keep one accountant kind: the ledger's cumulative ε is computed
with it.

**Fail closed.** Parameters are checked at the boundary (σ > 0, C > 0, 0 < δ < 1, 0 < rate ≤ 1, …) and
NaN/inf inputs raise :class:`DPError` before any noise is drawn: nothing is released from a bad input.
A release that would take the site over its cap raises :class:`BudgetExceeded` from
:meth:`PrivacyAccountant.spend`/:meth:`~PrivacyAccountant.check`, which the caller runs *before* the
upload leaves; a spend is recorded even if sending later fails (the conservative side).

**Randomness.** The noise must be unpredictable to the server: seed the site's generator from the OS
(:func:`fresh_generator`), never from the job seed the server knows. Fixed seeds are for tests only.
Known limitation: samples come from torch/numpy floating-point samplers (Mersenne Twister / PCG64),
not a discrete or secure-rounding Gaussian; the floating-point attacks on textbook DP implementations
(Mironov 2012; Jin et al. 2022) are not mitigated here.

Mechanisms write nothing to the ledger; the caller records the event's :meth:`~GaussianEvent.to_json`
descriptor and the ε returned by :meth:`PrivacyAccountant.spend` in the site's ledger, from which
:meth:`PrivacyAccountant.from_events` rebuilds the running total after a restart.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from medsilo.secure.accounting import (  # the accounting half, re-exported: one import for mechanisms + costs
    ACCOUNTANTS,
    PLD_DISCRETIZATION,
    BudgetExceeded,
    DPError,
    Event,
    ExponentialEvent,
    GaussianEvent,
    PrivacyAccountant,
    check_count,
    check_positive,
    check_rate,
    dpsgd_noise_for_epsilon,
    dpsgd_round_events,
    event_from_json,
    exponential_epsilon,
    gaussian_epsilon,
    gradient_sensitivity,
    noise_for_epsilon,
    poisson_schedule,
    sum_sensitivity,
    update_sensitivity,
)

__all__ = [
    "ACCOUNTANTS",
    "PLD_DISCRETIZATION",
    "BudgetExceeded",
    "DPError",
    "DPRelease",
    "Event",
    "ExponentialEvent",
    "GaussianEvent",
    "PrivacyAccountant",
    "Selection",
    "clip_rows",
    "clip_update",
    "clipped_gradient_sum",
    "dpsgd_noise_for_epsilon",
    "dpsgd_round_events",
    "event_from_json",
    "exponential_epsilon",
    "exponential_mechanism",
    "exponential_probabilities",
    "fresh_generator",
    "gaussian_counts",
    "gaussian_epsilon",
    "gaussian_gradient",
    "gaussian_sum",
    "gaussian_update",
    "gradient_sensitivity",
    "noise_for_epsilon",
    "poisson_sample",
    "poisson_schedule",
    "sum_sensitivity",
    "update_sensitivity",
]

Generator = torch.Generator | np.random.Generator




def _finite_float_tensor(name: str, x: Any, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise DPError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise DPError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise DPError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise DPError(f"{name} contains NaN or inf; refusing to release anything derived from it")
    return x.detach()


# ---- randomness ---------------------------------------------------------------------------------------


def fresh_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded from the OS's cryptographic randomness, for a site's DP noise.

    Use this in production: the server must not be able to predict (and subtract) the noise, so the seed
    must never derive from the job seed. Tests pass their own seeded generator instead.
    """
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def _check_generator(generator: Any) -> Generator:
    if not isinstance(generator, torch.Generator | np.random.Generator):
        raise DPError(
            "generator must be a torch.Generator or numpy.random.Generator passed in explicitly "
            f"(e.g. medsilo.secure.dp.fresh_generator()), got {type(generator).__name__}; the global RNG is never used"
        )
    return generator


def _standard_normal(shape: tuple[int, ...], generator: Generator) -> torch.Tensor:
    """``N(0, 1)`` samples of ``shape``, float64 on the CPU or the generator's device."""
    if isinstance(generator, np.random.Generator):
        return torch.from_numpy(generator.standard_normal(shape))
    return torch.randn(shape, generator=generator, dtype=torch.float64, device=generator.device)


def _standard_gumbel(n: int, generator: Generator) -> torch.Tensor:
    """``Gumbel(0, 1)`` samples ``(n,)`` float64: ``−log E`` with ``E ~ Exp(1)``."""
    if isinstance(generator, np.random.Generator):
        return torch.from_numpy(generator.gumbel(size=n))
    e = torch.empty(n, dtype=torch.float64, device=generator.device).exponential_(generator=generator)
    return -torch.log(e.clamp_min(torch.finfo(torch.float64).tiny))


# ---- Poisson sampling (DP-SGD) ----------------------------------------------------------------------------




def poisson_sample(n: int, sampling_rate: float, generator: torch.Generator) -> torch.Tensor:
    """One Poisson-sampled batch: each of the ``n`` records is included independently with probability q.

    This is the sampling ``GaussianEvent(sampling_rate=q)`` assumes (a shuffled fixed-size batch is not).
    The batch may be empty or larger than q·N. Draws one ``(n,)`` uniform float64 sample from
    ``generator``, which must be the site's secret generator (the amplification by sampling needs the
    server not to know which records were used).

    Args:
        n: N ≥ 1.
        sampling_rate: 0 < q ≤ 1.
        generator: an explicit ``torch.Generator``.

    Returns:
        the sampled record indices ``(M,)`` int64, increasing, 0 ≤ M ≤ N.
    """
    n, rate = check_count("n", n), check_rate("sampling_rate", sampling_rate)
    if not isinstance(generator, torch.Generator):
        raise DPError(
            f"generator must be a torch.Generator passed in explicitly, got {type(generator).__name__}"
        )
    draws = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device)
    return torch.nonzero(draws < rate).flatten().cpu()


# ---- clipping -------------------------------------------------------------------------------------------


def clip_rows(x: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-sample L2 clipping: row i becomes ``x_i · min(1, C/‖x_i‖₂)``.

    Args:
        x: ``(B, d)`` floating point, finite.
        clip: C > 0.

    Returns:
        ``(B, d)``, same dtype and device; every row norm ≤ C (rounding included), rows already within C
        are returned unchanged (bit for bit).
    """
    clip = check_positive("clip", clip)
    x = _finite_float_tensor("x", x, ndim=2)
    x64 = x.double()
    norms = x64.norm(dim=1, keepdim=True)
    factor = torch.where(
        norms > clip, clip / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(norms)
    )
    y = torch.where(norms > clip, (x64 * factor).to(x.dtype), x)
    step = 1.0 - 4 * torch.finfo(x.dtype).eps
    for _ in range(16):
        over = y.double().norm(dim=1, keepdim=True) > clip
        if not bool(over.any()):
            return y
        y = torch.where(over, y * step, y)
    raise DPError(f"could not clip rows to norm ≤ {clip!r}; refusing to release")


def clip_update(delta: Mapping[str, torch.Tensor], clip: float) -> tuple[dict[str, torch.Tensor], float]:
    """Global L2 clipping of a weight update across all its tensors.

    ``Δθ̃ = Δθ · min(1, C/‖Δθ‖₂)`` with ``‖Δθ‖₂ = sqrt(Σ_tensors Σ_entries Δθ²)``.

    Args:
        delta: name → update tensor (any shapes), floating point, finite; at least one tensor.
        clip: C > 0.

    Returns:
        the clipped update (same names, shapes, dtypes; global norm ≤ C, rounding included; unchanged
        when already within C) and the global norm *before* clipping. That norm is data-dependent and not
        DP: keep it at the site (it may go to local logs, never into an upload or the ledger).
    """
    clip = check_positive("clip", clip)
    if not isinstance(delta, Mapping) or not delta:
        raise DPError("delta must be a non-empty dict of name → tensor")
    delta = {name: _finite_float_tensor(f"delta[{name!r}]", t) for name, t in delta.items()}

    def global_norm(d: Mapping[str, torch.Tensor]) -> float:
        return math.sqrt(math.fsum(float(t.double().pow(2).sum()) for t in d.values()))

    norm = global_norm(delta)
    if not math.isfinite(norm):
        raise DPError("the update's norm overflows; refusing to release")
    if norm <= clip:
        return dict(delta), norm
    factor = clip / norm
    clipped = {name: (t.double() * factor).to(t.dtype) for name, t in delta.items()}
    step = 1.0 - 4 * max(torch.finfo(t.dtype).eps for t in clipped.values())
    for _ in range(16):
        if global_norm(clipped) <= clip:
            return clipped, norm
        clipped = {name: t * step for name, t in clipped.items()}
    raise DPError(f"could not clip the update to norm ≤ {clip!r}; refusing to release")


def clipped_gradient_sum(per_sample: Mapping[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
    """Per-record clipping of gradients (jointly over all tensors), summed over the records: DP-SGD's sum.

    ``Σ_b g_b · min(1, G/‖g_b‖₂)`` with ``‖g_b‖₂ = sqrt(Σ_tensors Σ_entries g_b²)``, computed in float64.
    Adding or removing one record changes the result by its clipped term, of norm ≤ G (float64 rounding
    aside): the L2 sensitivity of :func:`gaussian_gradient`.

    Args:
        per_sample: name → per-record gradients ``(B, *shape)`` (the same B ≥ 0 for every tensor),
            floating point, finite; at least one tensor.
        clip: G > 0, the bound on each record's joint gradient norm.

    Returns:
        name → ``(*shape)`` float64 sums (zeros when B = 0), on the input's device.
    """
    clip = check_positive("clip", clip)
    if not isinstance(per_sample, Mapping) or not per_sample:
        raise DPError("per_sample must be a non-empty dict of name → (B, ...) gradient tensor")
    grads = {name: _finite_float_tensor(f"per_sample[{name!r}]", t) for name, t in per_sample.items()}
    sizes = {t.shape[0] if t.dim() else None for t in grads.values()}
    if len(sizes) != 1 or None in sizes:
        raise DPError(
            f"per_sample tensors must share their first (record) dimension, got {sorted(map(str, sizes))}"
        )
    squared = sum(t.flatten(1).double().pow(2).sum(1) for t in grads.values())
    norms = squared.sqrt()
    if not bool(torch.isfinite(norms).all()):
        raise DPError("a per-record gradient norm overflows; refusing to release")
    factor = torch.where(
        norms > clip, clip / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(norms)
    )
    return {name: torch.tensordot(factor, t.double(), dims=1) for name, t in grads.items()}


# ---- Gaussian mechanism ---------------------------------------------------------------------------------




def gaussian_sum(
    values: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    clip: float,
    noise_multiplier: float,
    generator: Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Record-level DP per-class sums and counts (Gaussian mechanism, noise multiplier σ).

    Clips every record's vector to L2 norm ≤ C (:func:`clip_rows`), sums per class, and adds
    ``N(0, (√2·σ·C)²)`` to every entry of the sums and ``N(0, 2σ²)`` to every count: the Gaussian
    mechanism with multiplier σ on ``[S, C·n]``, whose sensitivity is √2·C (module docstring). Each
    record must appear **at most once** in ``values``.

    Privacy effect: what leaves the site is the noisy ``(K, d)`` sums and ``(K,)`` counts (all K rows,
    noised alike). Cost: one ``GaussianEvent(noise_multiplier=σ)``, record-level; the caller charges it to
    the :class:`PrivacyAccountant` (before sending) and writes the ledger entry.

    Args:
        values: ``(B, d)`` floating point, one row per record (e.g. features ``(B, d)`` or logits ``(B, K)``).
        labels: ``(B,)`` integer class ids in ``[0, K)``.
        num_classes: K ≥ 1.
        clip: C > 0, per-record L2 bound.
        noise_multiplier: σ > 0 (noise std / sensitivity).
        generator: explicit ``torch.Generator`` or ``numpy.random.Generator``. Draw order: the ``(K, d)``
            sum noise (row-major), then the ``(K,)`` count noise, both standard normal in float64.

    Returns:
        ``sums`` ``(K, d)`` and ``counts`` ``(K,)``, in ``values``' dtype and device. Counts are real
        numbers and may be negative.
    """
    num_classes = check_count("num_classes", num_classes)
    clip = check_positive("clip", clip)
    sigma = check_positive("noise_multiplier", noise_multiplier)
    generator = _check_generator(generator)
    values = _finite_float_tensor("values", values, ndim=2)
    if (
        not isinstance(labels, torch.Tensor)
        or labels.dim() != 1
        or labels.is_floating_point()
        or labels.is_complex()
    ):
        raise DPError(
            f"labels must be a 1-D integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}"
        )
    if labels.shape[0] != values.shape[0]:
        raise DPError(f"labels has {labels.shape[0]} entries but values has {values.shape[0]} rows")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DPError(
            f"labels must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]"
        )

    clipped = clip_rows(values, clip).double()
    labels = labels.to(device=values.device, dtype=torch.long)
    sums = torch.zeros(num_classes, values.shape[1], dtype=torch.float64, device=values.device)
    sums.index_add_(0, labels, clipped)
    counts = torch.bincount(labels, minlength=num_classes).double()

    std = sigma * sum_sensitivity(clip)
    sum_noise = _standard_normal(tuple(sums.shape), generator).to(values.device)
    count_noise = _standard_normal((num_classes,), generator).to(values.device)
    noisy_sums = sums + std * sum_noise
    noisy_counts = counts + (std / clip) * count_noise
    return noisy_sums.to(values.dtype), noisy_counts.to(values.dtype)


def gaussian_update(
    delta: Mapping[str, torch.Tensor], clip: float, noise_multiplier: float, generator: Generator
) -> dict[str, torch.Tensor]:
    """Site-level DP weight update: global L2 clip to C, then ``N(0, (2·σ·C)²)`` on every entry.

    The sensitivity is 2·C between *any* two datasets of the site (module docstring), so this is the
    Gaussian mechanism with noise multiplier σ for the budget's record relation and for replacing the
    site's whole dataset alike.

    Privacy effect: what leaves the site is the noisy update (same names and shapes). Cost: one
    ``GaussianEvent(noise_multiplier=σ)``; the caller charges it before sending and writes the ledger
    entry. Anything sent with it (e.g. the number of training images) must be noised or public.

    Args:
        delta: name → update ``θ_local − θ_global`` (any shapes), floating point, finite.
        clip: C > 0, bound on the update's global L2 norm.
        noise_multiplier: σ > 0 (noise std / sensitivity).
        generator: explicit ``torch.Generator`` or ``numpy.random.Generator``; noise is drawn tensor by
            tensor in ``delta``'s order, each row-major, standard normal in float64.

    Returns:
        name → noisy update, each with its input's shape, dtype and device.
    """
    sigma = check_positive("noise_multiplier", noise_multiplier)
    clip = check_positive("clip", clip)
    generator = _check_generator(generator)
    clipped, _ = clip_update(delta, clip)
    std = sigma * update_sensitivity(clip)
    out = {}
    for name, t in clipped.items():
        noise = _standard_normal(tuple(t.shape), generator).to(t.device)
        out[name] = (t.double() + std * noise).to(t.dtype)
    return out


def gaussian_counts(labels: torch.Tensor, num_classes: int, noise_multiplier: float,
                    generator: Generator) -> torch.Tensor:  # fmt: skip
    """A site's class counts ``(K,)`` with ``N(0, σ²)`` added to each: the Gaussian mechanism on a histogram.

    Adding or removing one record changes one count by 1, so Δ₂ = 1 and the noise std is σ itself. The result
    is what a ``logit-adjusted`` job's DP-SGD training may read instead of the true counts (its log prior,
    :func:`medsilo.components.training.log_prior`); it is post-processed at the site and never sent.

    Privacy effect: cost one ``GaussianEvent(noise_multiplier=σ)``, record-level, which the caller charges with
    the first release the counts can influence (the round's upload) and declares before drawing.

    Args:
        labels: int64 class indices ``(N,)`` of the site's training records, each in ``[0, K)``.
        num_classes: K ≥ 1.
        noise_multiplier: σ > 0 (noise std; the sensitivity is 1).
        generator: explicit ``torch.Generator`` or ``numpy.random.Generator``; K standard normals in float64.

    Returns:
        float64 ``(K,)``: counts plus noise (may be negative or fractional).
    """
    sigma = check_positive("noise_multiplier", noise_multiplier)
    generator = _check_generator(generator)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point():
        raise DPError("labels must be a 1-d integer tensor of class indices")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise DPError(f"num_classes must be an integer ≥ 1, got {num_classes!r}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DPError(f"labels must lie in [0, {num_classes}); got {int(labels.min())}…{int(labels.max())}")
    counts = torch.bincount(labels.cpu(), minlength=num_classes).double()
    return counts + sigma * _standard_normal((num_classes,), generator)


def gaussian_gradient(
    grad_sum: Mapping[str, torch.Tensor], grad_clip: float, noise_multiplier: float, generator: Generator
) -> dict[str, torch.Tensor]:
    """One DP-SGD step's noisy gradient sum: ``N(0, (σ·G)²)`` added to every coordinate of the clipped sum.

    ``grad_sum`` must be :func:`clipped_gradient_sum` of a batch drawn by :func:`poisson_sample`; then the
    step is the Poisson-subsampled Gaussian mechanism with multiplier σ (sensitivity G, module docstring).

    Privacy effect: the result stays at the site (it only moves the local model); the model it trains is
    what later mechanisms see. Cost: T steps at rate q are one ``GaussianEvent(σ, steps=T,
    sampling_rate=q)``, which the caller charges *before* training, with whatever the round releases.

    Args:
        grad_sum: name → clipped gradient sum (any shapes), floating point, finite.
        grad_clip: G > 0, the per-record clipping bound used for ``grad_sum``.
        noise_multiplier: σ > 0 (noise std / sensitivity).
        generator: explicit ``torch.Generator`` or ``numpy.random.Generator``; noise is drawn tensor by
            tensor in ``grad_sum``'s order, each row-major, standard normal in float64.

    Returns:
        name → noisy sum, float64, each with its input's shape and device.
    """
    sigma = check_positive("noise_multiplier", noise_multiplier)
    std = sigma * gradient_sensitivity(grad_clip)
    generator = _check_generator(generator)
    if not isinstance(grad_sum, Mapping) or not grad_sum:
        raise DPError("grad_sum must be a non-empty dict of name → tensor")
    out = {}
    for name, t in grad_sum.items():
        t = _finite_float_tensor(f"grad_sum[{name!r}]", t)
        noise = _standard_normal(tuple(t.shape), generator).to(t.device)
        out[name] = t.double() + std * noise
    return out


# ---- exponential mechanism ------------------------------------------------------------------------------


def _scores(scores: Any) -> torch.Tensor:
    s = torch.as_tensor(scores)
    if not s.is_floating_point():
        s = s.double()
    return _finite_float_tensor("scores", s.double(), ndim=1)


def exponential_probabilities(scores: Any, epsilon: float, sensitivity: float) -> torch.Tensor:
    """The exponential mechanism's selection probabilities ``softmax(ε·s/(2Δ))`` ``(n,)`` float64.

    Computed stably (max subtracted). For inspection and tests; releases nothing.
    """
    epsilon = check_positive("epsilon", epsilon)
    sensitivity = check_positive("sensitivity", sensitivity)
    s = _scores(scores)
    if s.numel() == 0:
        raise DPError("scores is empty: there is nothing to select from")
    return torch.softmax(epsilon * s / (2 * sensitivity), dim=0)


class Selection(NamedTuple):
    """What :func:`exponential_mechanism` returns.

    Attributes:
        indices: ``(k,)`` int64, the selected candidates in draw order (distinct).
        epsilon: the pure ε of the whole call (δ = 0).
        count: k, the number of draws, each at ε/k.
    """

    indices: torch.Tensor
    epsilon: float
    count: int

    @property
    def event(self) -> ExponentialEvent:
        """The accountant event of this call: ``ExponentialEvent(epsilon=ε/k, count=k)``."""
        return ExponentialEvent(epsilon=self.epsilon / self.count, count=self.count)


def exponential_mechanism(
    scores: Any, epsilon: float, sensitivity: float, generator: Generator, k: int = 1
) -> Selection:
    r"""Select ``k`` candidates with the exponential mechanism (McSherry & Talwar 2007); ε-DP in total.

    ``k = 1``: index i with probability :math:`\propto \exp(\varepsilon s_i / (2\Delta))`.
    ``k > 1``: k sequential draws without replacement, each an exponential mechanism at ε/k over the
    remaining candidates, so ε-DP in total by basic composition (each draw is ε/k-DP whatever the earlier
    draws were). Sampled in one shot as the top-k of ``(ε/k)·s/(2Δ) + Gumbel(0, 1)`` noise, which has
    exactly the distribution of those sequential draws (Gumbel-top-k; Durfee & Rogers 2019).

    Privacy effect: releases the k indices only. Cost: ``Selection.event`` =
    ``ExponentialEvent(ε/k, count=k)``, record-level, pure ε; the caller charges it and writes the ledger.

    Args:
        scores: ``(n,)`` utilities (tensor, array or sequence), finite.
        epsilon: total ε > 0 of the call.
        sensitivity: Δ > 0, the most any one score can change between neighbouring datasets
            (PCEvolve: scores in [0, 1] ⇒ Δ = 1).
        generator: explicit ``torch.Generator`` or ``numpy.random.Generator``; one ``(n,)`` Gumbel draw.
        k: number of distinct candidates, 1 ≤ k ≤ n.

    Returns:
        :class:`Selection` ``(indices (k,) int64, epsilon, count=k)``.
    """
    epsilon = check_positive("epsilon", epsilon)
    sensitivity = check_positive("sensitivity", sensitivity)
    k = check_count("k", k)
    generator = _check_generator(generator)
    s = _scores(scores)
    if k > s.numel():
        raise DPError(f"k={k} exceeds the number of candidates ({s.numel()})")
    logits = (epsilon / k) * s / (2 * sensitivity)
    perturbed = logits + _standard_gumbel(s.numel(), generator).to(logits.device)
    indices = torch.topk(perturbed, k).indices.cpu().to(torch.int64)
    return Selection(indices=indices, epsilon=epsilon, count=k)


# ---- events -------------------------------------------------------------------------------------------


# ---- what a private round is given ------------------------------------------------------------------------


@dataclass(frozen=True)
class DPRelease:
    """What a differentially private local round needs (privacy modes ``dp`` and ``ckks+dp``).

    The site builds one per round (:meth:`from_spec`) after its budget check of the round's events.

    Attributes:
        clip: L2 clipping bound C of the release (per record for class sums, of the whole update for
            weights).
        noise_multiplier: σ of the release, noise std / L2 sensitivity (module docstring).
        generator: the site's noise source, seeded from the OS (:func:`fresh_generator`; never from the job
            seed: the server must not be able to regenerate and subtract the noise). DP-SGD draws its
            Poisson batches and gradient noise from it too.
        grad_clip: G, the per-record gradient bound of DP-SGD, or ``None`` when the round is given no
            DP-SGD settings (then an algorithm that trains with DP-SGD refuses, see :meth:`sgd`).
        sgd_noise_multiplier: σ_sgd of the DP-SGD steps, or ``None`` (with ``grad_clip``).
        count_noise_multiplier: σ_n of a class-count release (:func:`gaussian_counts`; a ``logit-adjusted`` job),
            or ``None``.

    Raises:
        DPError: a bound or multiplier that is not a finite number > 0, a generator that is not a
            ``torch.Generator``, or only one of ``grad_clip``/``sgd_noise_multiplier``.
    """

    clip: float
    noise_multiplier: float
    generator: torch.Generator
    grad_clip: float | None = None
    sgd_noise_multiplier: float | None = None
    count_noise_multiplier: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "clip", check_positive("clip", self.clip))
        object.__setattr__(self, "noise_multiplier", check_positive("noise_multiplier", self.noise_multiplier))
        if not isinstance(self.generator, torch.Generator):
            raise DPError(
                f"generator must be a torch.Generator (e.g. medsilo.secure.dp.fresh_generator()), "
                f"got {type(self.generator).__name__}"
            )
        if (self.grad_clip is None) != (self.sgd_noise_multiplier is None):
            raise DPError(
                "grad_clip and sgd_noise_multiplier go together: give both (DP-SGD) or neither, got "
                f"grad_clip={self.grad_clip!r}, sgd_noise_multiplier={self.sgd_noise_multiplier!r}"
            )
        if self.grad_clip is not None:
            object.__setattr__(self, "grad_clip", check_positive("grad_clip", self.grad_clip))
            object.__setattr__(
                self, "sgd_noise_multiplier", check_positive("sgd_noise_multiplier", self.sgd_noise_multiplier)
            )
        if self.count_noise_multiplier is not None:
            object.__setattr__(self, "count_noise_multiplier",
                               check_positive("count_noise_multiplier", self.count_noise_multiplier))  # fmt: skip

    @classmethod
    def from_spec(cls, spec: Any, generator: torch.Generator) -> DPRelease:
        """The settings of a job's validated ``privacy.dp`` section (a :class:`medsilo.config.job.DPSpec`:
        ``clip``, ``noise_multiplier``, ``grad_clip``, ``sgd_noise_multiplier``, ``count_noise_multiplier``) with
        the site's generator."""
        return cls(clip=spec.clip, noise_multiplier=spec.noise_multiplier, generator=generator,
                   grad_clip=spec.grad_clip, sgd_noise_multiplier=spec.sgd_noise_multiplier,
                   count_noise_multiplier=spec.count_noise_multiplier)  # fmt: skip

    def sgd(self) -> tuple[float, float]:
        """``(G, σ_sgd)`` for DP-SGD training.

        Raises:
            DPError: this release carries no DP-SGD settings; training without them would not be what the
                round's DP events charge (fail closed).
        """
        if self.grad_clip is None or self.sgd_noise_multiplier is None:
            raise DPError(
                "this private round trains with DP-SGD, but its DP settings carry no grad_clip / "
                "sgd_noise_multiplier (build them with DPRelease.from_spec); refusing to train or release"
            )
        return self.grad_clip, self.sgd_noise_multiplier


