"""The PCEvolve loop: evolve synthetic images toward a site's few private images, with ε-DP selection.

Inputs: the site's private training images (a handful per class), a :class:`~.generators.Generator`
that never sees them, and a total budget ε*. Each of T iterations, per class c:

1. embed the class's N candidates with a frozen encoder that needs no download (:func:`encoder`);
2. utility of candidate r (:func:`utilities`): distances ℓ_k = ‖E(x_r) − p̄_k‖ to every class centre
   p̄_k = mean of E over the private images of class k (computed once, never released);
   *contrastive filter* g_r = 1 iff the own centre is the nearest; *similarity calibration* among the
   passing candidates h_r = exp(−τ (ℓ_c − ℓ_min) / (ℓ_max − ℓ_min)) (h = 1 for all passing ones when
   ℓ_max = ℓ_min), u_r = h_r g_r ∈ [0, 1] — so one private image changes any u by at most Δu = 1;
3. pick **one** candidate with the exponential mechanism at ε = ε* / (T·C)
   (:func:`medsilo.secure.dp.exponential_mechanism`, Pr ∝ exp(ε u / 2Δu)); when no candidate passes
   g every u is 0 and the draw is uniform;
4. the generator makes the next N candidates as variations of the pick, at strength
   s_t = max(floor, s_0 − step · t) (0.8 − 0.02 t, floored at 0.6, as the reference).

Privacy: only the T·C picks depend on the private images; each is pure ε-DP (record-level), so the
run is ε*-DP by basic composition, and the site's accountant charges each iteration's C draws as
``ExponentialEvent(ε, count=C)`` *before* drawing (``charge``; a budget that cannot take them stops
the run there, nothing is picked). The released synthetic set is the last iteration's variations of the
last picks. It is not chosen by accuracy on private data (that choice would not be covered by ε).

Selectivity: the best and worst candidates' probabilities differ by at most e^{ε/2}; with ε* = 8, T = 10
and C = 2, ε = 0.4 per pick gives a factor 1.22 — nearly uniform. PCEvolve is only selective with a
large ε per pick: few iterations, or a large ε*. :func:`selectivity` reports the factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from medsilo.config.common import Strict
from medsilo.errors import MedsiloError
from medsilo.medical.models import build_model
from medsilo.medical.synth.pcevolve.generators import Candidate, Generator, make_generator
from medsilo.secure.budget import BudgetBook, SelectionCharge
from medsilo.secure.dp import ExponentialEvent, exponential_mechanism, fresh_generator

SENSITIVITY = 1.0
"""Δu: utilities lie in [0, 1] whatever the private data."""


class PCEvolveConfig(Strict):
    """PCEvolve settings (validated at the boundary: job spec or ``medsilo pcevolve``).

    Attributes:
        epsilon: ε*, total pure ε of the run (> 0). ``inf`` is the non-private reference (the best
            candidate is taken, nothing is charged): benchmarks only, ``medsilo pcevolve`` refuses it.
        iterations: T ≥ 1.
        per_class: N candidates per class and iteration (≥ 2).
        tau: calibration sharpness τ > 0.
        strength, strength_step, strength_floor: variation strength schedule s_t.
        encoder: ``random-cnn`` (the zoo's cnn, seeded, untrained, frozen) or ``pixels`` (8×8 area
            thumbnail per channel plus a 16-bin intensity histogram). Neither downloads anything; the
            selection is only as good as the encoder's notion of distance.
        seed: seeds the generator's draws and the encoder; the DP draws always use OS randomness.
    """

    epsilon: float = Field(gt=0)
    iterations: int = Field(default=5, ge=1)
    per_class: int = Field(default=16, ge=2)
    tau: float = Field(default=10.0, gt=0)
    strength: float = Field(default=0.8, gt=0, le=1)
    strength_step: float = Field(default=0.02, ge=0)
    strength_floor: float = Field(default=0.6, ge=0, le=1)
    encoder: Literal["random-cnn", "pixels"] = "random-cnn"
    seed: int = 0

    def epsilon_per_pick(self, num_classes: int) -> float:
        """ε of one selection: ε* / (T · C)."""
        return self.epsilon / (self.iterations * num_classes)

    def strength_at(self, iteration: int) -> float:
        """s_t for the variations made after iteration ``iteration`` (1-based)."""
        return max(self.strength_floor, self.strength - self.strength_step * iteration)


def selectivity(epsilon_per_pick: float) -> float:
    """The most the best candidate can be favoured over the worst: e^{ε/(2Δu)}."""
    return math.exp(epsilon_per_pick / (2 * SENSITIVITY))


# ---- the DP selection -------------------------------------------------------------------------------


def utilities(features: torch.Tensor, centres: torch.Tensor, label: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Utilities ``u (n,)`` in [0, 1] and the filter ``g (n,)`` bool of n candidates of class ``label``.

    Args:
        features: ``(n, d)`` candidate embeddings.
        centres: ``(K, d)`` private class centres.
        label: the candidates' class c.
        tau: calibration sharpness τ.
    """
    dist = torch.cdist(features.double(), centres.double())  # (n, K)
    own = dist[:, label]
    passing = dist.argmin(dim=1) == label
    u = torch.zeros_like(own)
    if bool(passing.any()):
        lo, hi = own[passing].min(), own[passing].max()
        span = hi - lo
        h = torch.ones_like(own) if float(span) == 0 else torch.exp(-tau * (own - lo) / span)
        u = torch.where(passing, h, u)
    return u.clamp(0, 1), passing


# ---- the encoder -------------------------------------------------------------------------------------


def encoder(kind: str, channels: int, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A frozen embedding ``(B, C, S, S)`` [0, 1] → ``(B, d)`` (see :class:`PCEvolveConfig`).

    Each image is first standardised on its own (zero mean, unit variance per channel): a generator's
    images and a site's scanner differ most in global brightness and contrast, which would otherwise
    decide every distance and leave the class-relevant structure (opacities, nuclei) unseen.
    """

    def standardise(x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        mean, std = flat.mean(dim=2, keepdim=True), flat.std(dim=2, keepdim=True).clamp_min(1e-3)
        return ((flat - mean) / std).view_as(x)

    if kind == "pixels":

        def pixels(x: torch.Tensor) -> torch.Tensor:
            z = standardise(x)
            thumb = torch.nn.functional.adaptive_avg_pool2d(z, 8).flatten(1)
            hist = torch.stack([torch.histc(img.clamp(-3, 3), bins=16, min=-3, max=3) / img.numel() for img in z])
            return torch.cat([thumb, hist], dim=1)

        return pixels

    model = build_model("cnn", in_channels=channels, num_classes=2, feature_dim=64, seed=seed).eval()

    @torch.no_grad()
    def random_cnn(x: torch.Tensor) -> torch.Tensor:
        return model.features(standardise(x))

    return random_cnn


# ---- the loop ----------------------------------------------------------------------------------------


@dataclass
class PCEvolveResult:
    """What a run produced.

    Attributes:
        synthetic: the released set: the last iteration's N variations per class.
        picks: per iteration, the candidate id picked for each class (released to the generator).
        epsilon_per_pick: ε of each selection.
        passing: per iteration and class, how many candidates passed the contrastive filter (a
            statistic of private data: stays at the site, in logs only as counts).
    """

    synthetic: list[Candidate]
    picks: list[dict[str, str]] = field(default_factory=list)
    epsilon_per_pick: float = 0.0
    passing: list[dict[str, int]] = field(default_factory=list)


def evolve(
    private_images: torch.Tensor,
    private_labels: torch.Tensor,
    classes: list[str] | tuple[str, ...],
    generator: Generator,
    config: PCEvolveConfig,
    charge: Callable[[ExponentialEvent, int], None],
    progress: Callable[[int, int], None] | None = None,
) -> PCEvolveResult:
    """Run PCEvolve (module docstring).

    Args:
        private_images: ``(M, C, S, S)`` float32 in [0, 1], the site's private training images.
        private_labels: ``(M,)`` int64.
        classes: class names in label order.
        generator: candidate source; it never receives the private images.
        config: the run's settings.
        charge: called as ``charge(event, iteration)`` before each iteration's draws; it must write the
            cost to the site's ledger and raise (e.g. :class:`~medsilo.secure.dp.BudgetExceeded`) when the
            budget cannot take it.
        progress: called as ``progress(iteration, iterations)`` after each iteration.

    Raises:
        MedsiloError: a class without any private image (nothing to aim at).
    """
    k = len(classes)
    counts = torch.bincount(private_labels, minlength=k)
    missing = [classes[c] for c in range(k) if int(counts[c]) == 0]
    if missing:
        raise MedsiloError(f"PCEvolve: no private training image of class {', '.join(missing)}; it needs at least "
                           "one per class to aim at")  # fmt: skip
    embed = encoder(config.encoder, private_images.shape[1], config.seed)
    feats = embed(private_images)
    centres = torch.stack([feats[private_labels == c].mean(dim=0) for c in range(k)])
    rng = np.random.default_rng(config.seed)
    noise = fresh_generator()
    eps = config.epsilon_per_pick(k)
    population = {c: _named(generator.random(c, config.per_class, rng), c, 0) for c in range(k)}
    result = PCEvolveResult(synthetic=[], epsilon_per_pick=eps)
    private = math.isfinite(eps)
    for it in range(1, config.iterations + 1):
        if private:
            charge(ExponentialEvent(epsilon=eps, count=k), it)
        picks, passing = {}, {}
        for c in range(k):
            cands = population[c]
            u, g = utilities(embed(torch.as_tensor(np.stack([x.image for x in cands]))), centres, c, config.tau)
            pick = exponential_mechanism(u, eps, SENSITIVITY, noise).indices[0] if private else u.argmax()
            chosen = cands[int(pick)]
            picks[classes[c]], passing[classes[c]] = chosen.id, int(g.sum())
            population[c] = _named(generator.variation(chosen, config.strength_at(it), config.per_class, rng), c, it)
        result.picks.append(picks)
        result.passing.append(passing)
        if progress:
            progress(it, config.iterations)
    result.synthetic = [x for c in range(k) for x in population[c]]
    return result


def charged_evolve(party, run_id: str, policy, generator_name: str, modality: str, classes, image_size: int,
                   images, labels, config: PCEvolveConfig, progress=None) -> PCEvolveResult:  # fmt: skip
    """Run PCEvolve at a site with every selection charged to its budget and ledger.

    The generator is resolved by name (:func:`~medsilo.medical.synth.pcevolve.generators.make_generator`;
    callers check the site allows it), the whole run is admitted first (refused, with a ``refusal`` entry and
    :class:`~medsilo.secure.dp.BudgetExceeded`, when its T·C picks cannot fit), then each iteration is charged
    before its draws (:class:`medsilo.secure.budget.SelectionCharge`).

    Args:
        party: the site's :class:`medsilo.secure.keys.Party` (its ledger and root CA).
        run_id: names the run in the ledger.
        policy: the site's :class:`~medsilo.config.site.PrivacyPolicy` (its budget cap, if any).
        generator_name, modality, classes, image_size: what to generate.
        images: the site's private training images ``(N, C, H, W)``; labels: ``(N,)``.
        config: the run's settings.
        progress: ``progress(iteration, iterations)`` after each iteration.
    """
    generator = make_generator(generator_name, modality, classes, image_size)
    what = {"kind": "selection", "generator": generator_name, "encoder": config.encoder,
            "iterations": config.iterations, "per_class": config.per_class, "classes": len(classes)}  # fmt: skip
    book = BudgetBook(party.name, party.ledger(), policy.budget, root_ca=party.root_ca)
    charge = SelectionCharge(book, run_id, what)
    eps = config.epsilon_per_pick(len(classes))
    charge.admit([ExponentialEvent(epsilon=eps, count=len(classes))] * config.iterations)
    return evolve(images, labels, classes, generator, config, charge=charge, progress=progress)


def _named(cands: list[Candidate], label: int, iteration: int) -> list[Candidate]:
    for i, x in enumerate(cands):
        if x.label != label:
            raise MedsiloError(f"PCEvolve: the generator returned a class-{x.label} image when asked for class {label}")
        x.id = f"c{label}-i{iteration}-{i}"
    return cands
