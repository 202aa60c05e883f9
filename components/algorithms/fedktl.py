r"""FedKTL: federated knowledge-transfer loop (Zhang et al., CVPR 2024,
`arXiv:2403.07839 <https://arxiv.org/abs/2403.07839>`_), for sites with different backbones.

**Sites.** Each site keeps its own model ``h_i ∘ φ_i`` (any backbone; the head ``h_i = Linear(d, K)``)
and treats the head's K-dim output as a *projection* compared with the fixed anchors of a simplex
equiangular tight frame (ETF)

.. math::

    M = \sqrt{K / (K - 1)}\; U (I_K - \tfrac{1}{K} \mathbf{1}\mathbf{1}^\top), \qquad
    a_k = M_{:,k} / \lVert M_{:,k} \rVert

with ``U`` a random ``K×K`` orthogonal matrix (QR of a uniform random matrix) drawn from
``Config.seed``, so every site and the server build the same ``M`` without exchanging it. The anchors
are unit vectors with pairwise cosine ``−1/(K−1)``. With ``c_k = ⟨normalize(h_i(φ_i(x))), a_k⟩`` the
local objective per batch is

.. math::

    L = \underbrace{\mathrm{CE}\big(s \cdot [c_k \text{ for } k \ne y;\ \cos(\arccos c_y + m)], y\big)}_{L_A}
      + \underbrace{\mu\, \mathrm{MSE}\big(\mathrm{proj}_i(\varphi_i(\tilde x)), w\big)}_{L_M}

``L_A`` is the additive-angular-margin (ArcFace) loss on the ETF cosines; ``L_M`` is the knowledge
transfer: the site's extractor, followed by its own projection ``proj_i = Linear(d, L)``, learns to map
the server's generated images ``x̃`` to their latents ``w`` (``L``: the generator's latent dimension).
``L_M`` is used only once the server has sent image–latent pairs (from round 2 on). Each step takes
the next ``min(B, K)`` pairs (at least 2), cycling through the K pairs in order (the reference draws
them from a shuffled loader). The job's local optimiser (the shared training loop) updates ``φ_i``,
``h_i`` and ``proj_i``; gradient norms are clipped to ``max_grad_norm`` before every step, separately
for the model and for ``proj_i`` (as in the reference), by a step pre-hook on the optimiser. The
reported training loss is ``L_A`` (the loop's task loss); ``L_M`` is trained on but not reported. After training an eval-mode pass over the training split
gives the per-class prototypes in ETF space, ``P_ik = normalize(mean_{x ∈ class k} normalize(h_i(φ_i(x))))``.

Deployed model at a site: ``argmax_k c_k``; :meth:`Client.scores` returns ``softmax_k(c_k)`` (the
cosines at temperature 1, not ``s·c``): the same argmax, and the ranking AUROC needs, whereas ``s = 64``
would saturate float32 probabilities to exact 0/1 ties. These scores are not calibrated probabilities.

**Server.** A feature transformer ``F = Linear(K, K) + BatchNorm1d(K) + ReLU + Linear(K, L)`` and class
centroids ``C ∈ R^{K×L}`` persist across rounds. Each round, from the prototypes ``{(P, y)}``:

1. ``C_k ←`` mean of ``F(P)`` over the prototypes of class ``k`` (F in eval mode);
2. domain alignment, ``server_epochs`` passes in shuffled batches of ``server_batch_size`` with a fresh
   Adam (lr ``server_lr``) on ``F`` and ``C``:
   ``MMD²_RBF(F(P), W_rand) + λ·MSE(F(P), C_y)``, ``W_rand`` a fresh draw of the generator's latent
   distribution per batch, RBF kernel ``Σ_{σ∈{10,15,20,50}} exp(−‖u−v‖²/(2σ))`` (the reference's
   bandwidths, on squared distances), gradient norms clipped to ``max_grad_norm`` for ``F`` and ``C``;
3. ``C_k ←`` class means of ``F(P)`` again; the latent of class ``k`` is ``w_k = C_k``;
4. images ``x̃_k = G(w_k)`` from the generator plug-in (:mod:`medsilo.medical.models.generators`).

A class that no site has gets ``w_k = F(a_k)`` (F in eval mode): the latent its prototype would map to
if it sat exactly on its ETF anchor. The pair is still useful to the sites: ``L_M`` only asks the
extractor to recover latents from images, whatever the class.

Two forms, like FedTGP (``Config.form``):

* ``published`` (default): the server trains on every site's own prototypes (each (site, class) is one
  sample), :attr:`Server.form` is ``"per-site"``; runs in privacy mode ``none`` only.
* ``aggregate``: the server reads only the K unweighted-over-sites class means, re-normalised to unit length
  (:attr:`Server.form` ``"sums"``); it reads the plaintext aggregate, so under ``ckks`` it needs an aggregate
  release (``needs_plaintext_aggregate``). Steps 1–3 above need many points: MMD between K class means and
  K draws of ``W_rand`` is a two-sample test on K ≤ a handful of points, and ``BatchNorm1d`` over a batch of
  two maps every channel to ±1 whatever the inputs. Trained that way the form collapsed every site to a
  constant predictor (best round 1 on both benchmark seeds). This form therefore replaces steps 1–3 by a
  fixed map that needs no training (:meth:`Server.moment_latents`, medsilo's own, not the paper's):
  ``w_k = m + S·√L·Q p_k``, ``m`` and ``S`` the mean and Cholesky factor of ``W_rand``'s covariance
  (4096 seeded draws), ``Q`` a seeded ``L×K`` matrix with orthonormal columns, ``p_k`` the unit class mean.
  Each latent then has the prior's moments (the whitened norm √L of a typical draw) and the class latents
  are as far apart as the prototypes. Step 4 is unchanged.

Payload (server → sites, every round from round 1 on):
    ``images``   (K, 3, S, S) float32 in [0, 1]: one generated image per class. Each site converts it to
    its own input: the channel mean for 1-channel (chest X-ray) models, a bilinear resize to its input
    size, then medsilo's fixed input normalisation ``(x − 0.5) / 0.25``.
    ``latents``  (K, L) float32: the latent of each image.

Uploads (per site, per round), sums the server adds:
    ``proto_sum``    (K, K) float32: row k is the site's unit-norm ETF-space prototype ``P_ik`` if the
    site has training images of class k, else zeros. Reveals which classes the site has and the
    direction of its model's mean K-dim output per class: far less than a d-dim feature mean
    (FedProto/FedTGP), and K·K floats in all. Encrypted under ``ckks``.
    ``proto_count``  (K,) float32: 1 for each class the site has, else 0. Reveals the site's label set
    (not its counts); encrypted under ``ckks``.
Summed over sites, ``proto_sum[k] / proto_count[k]`` is the *unweighted* mean over the sites that have
class k, the reference's default (FedProto-style, not weighted by sample counts), so a small hospital
counts as much as a large one. Nothing else leaves the site: models, ``proj_i`` and counts stay local.

Defaults (``shared/reference/algorithms.md`` §4.3; HtFLlib / FedKTL ``run_me`` for StyleGAN-XL):
``margin`` m = 0.5, ``scale`` s = 64, ``mu`` μ = 50, ``lam`` λ = 1, ``server_lr`` 0.01 (Adam),
``server_batch_size`` 100, ``server_epochs`` 100, ``max_grad_norm`` 100. The paper's generator is
StyleGAN-XL (``L`` = 512, 64×64 images); the default here is the offline, seeded, randomly initialised
generator with ``latent_dim`` L = 64 and ``image_size`` S = 32 (``generator``: ``"offline"`` or the path
of a TorchScript file on the server). 100 server epochs stay CPU-sane: for K = 2 and 4 sites the
alignment is one batch of ≤ 8 prototypes per epoch and a server round takes well under a second.

Reference-code behaviour (HtFLlib ``clientktl.py``/``serverktl_*.py``) and what we do:

* ``arccos`` at ``c = ±1`` has an infinite derivative; the cosine is clamped to ``[−1+ε, 1−ε]``
  (ε = 1e-6) before ``arccos``.
* ``proj_fc`` is re-loaded from the server's initial copy every round and the client's updates are
  never saved, so it is re-initialised each round. Here ``proj_i`` is persistent per site: built when
  the first latents arrive (seeded by ``Config.seed``, so all sites start alike) and trained on from
  round to round; it never leaves the site.
* ``BatchNorm1d`` in ``F`` fails on a batch of one prototype; a trailing batch of one is dropped (as
  HtFLlib's guard), so with a single prototype in total no alignment step runs that round (the
  centroids and images are still produced).
* The generated images pass through ``φ_i`` in train mode, which in the reference also moves the
  BatchNorm running statistics towards those of the synthetic images. Here they are normalised with
  their own batch statistics but leave the running statistics (the site's data, used at test) alone.
* The reference's ``W_rand`` and batch order come from unseeded global RNGs; here from a generator
  seeded by (``seed``, round), so a server round is reproducible.
* Pretrained generators (StyleGAN-XL pickles, Stable Diffusion) download at run time; here the
  generator is a plug-in with an offline default.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn import functional as F

from medsilo.components.algorithms.base import (
    COSINE_RECIPE,
    AlgorithmConfig,
    Client as BaseClient,
    Server as BaseServer,
    SiteSetup,
    Tensors,
    Upload,
    class_means,
    mmd2,
)
from medsilo.medical.data.transforms import normalize
from medsilo.medical.models.generators import check_spec, load_generator

PROTO_SUM = "proto_sum"
"""Upload: (K, K) ETF-space prototypes of the classes a site has (zero rows otherwise)."""

PROTO_COUNT = "proto_count"
"""Upload: (K,) 1 for each class a site has."""

IMAGES = "images"
"""Payload: (K, 3, S, S) generated images in [0, 1]."""

LATENTS = "latents"
"""Payload: (K, L) latents of the generated images."""

ARCCOS_EPS = 1e-6
"""Cosines are clamped to [−1 + ε, 1 − ε] before ``arccos`` (finite gradients)."""

FAMILY = "htfl"
"""Heterogeneous FL: sites share only d- or K-sized tensors, so each may run its own backbone."""
MIXED_BACKBONES = True
"""Whether a job may give its sites different backbones."""
MULTILABEL = False
"""Whether a job may be multi-label (``task: multilabel``): no, its knowledge transfer is per class (prototypes and generated class images)."""
RECIPE = COSINE_RECIPE
"""The training recipe chosen on validation data (:data:`.base.COSINE_RECIPE`; ``benchmarks/recipe.py``, BENCHMARKS.md)."""


class Config(AlgorithmConfig):
    """FedKTL hyper-parameters (defaults and sources in the module docstring).

    Attributes:
        margin: additive angular margin m in [0, π/2] (default 0.5).
        scale: logit scale s > 0 (default 64).
        mu: μ ≥ 0, weight of the knowledge-transfer term L_M (default 50).
        lam: λ ≥ 0, weight of the server's centroid MSE (default 1).
        server_epochs: passes of domain alignment per round (≥ 1, default 100).
        server_lr: Adam learning rate of F and C (> 0, default 0.01).
        server_batch_size: prototypes per alignment batch (≥ 2, default 100).
        max_grad_norm: gradient-norm clip of client (model, proj) and server (F, C) steps (> 0, default 100).
        form: ``published`` (per-site prototypes) or ``aggregate`` (class means only).
        generator: ``offline`` or the path of a TorchScript generator file (``.pt``) on the server.
        latent_dim: latent dimension L of the offline generator (≥ 2, default 64).
        image_size: image side S of the offline generator (≥ 4, default 32).
        seed: seeds the ETF rotation U, the initial ``proj_i``, F, the offline generator and the
            server's sampling (≥ 0, default 0). Must be the same for every site, as it is in one job.
    """

    margin: float = Field(default=0.5, ge=0, le=math.pi / 2)
    scale: float = Field(default=64.0, gt=0)
    mu: float = Field(default=50.0, ge=0)
    lam: float = Field(default=1.0, ge=0)
    server_epochs: int = Field(default=100, ge=1)
    server_lr: float = Field(default=0.01, gt=0)
    server_batch_size: int = Field(default=100, ge=2)
    max_grad_norm: float = Field(default=100.0, gt=0)
    form: Literal["published", "aggregate"] = "published"
    generator: str = "offline"
    latent_dim: int = Field(default=64, ge=2)
    image_size: int = Field(default=32, ge=4)
    seed: int = Field(default=0, ge=0)

    _generator = field_validator("generator")(check_spec)


class Client(BaseClient):
    """FedKTL at one site: own model and projection, fixed ETF anchors, the server's image–latent pairs.

    Attributes:
        anchors: ``(K, K)`` ETF anchors ``a_k`` (rows, unit norm), the same at every site.
        proj: ``proj_i = Linear(d, L)``, built on the first payload and kept (``None`` before).
        pair_images: ``(K, C, H, W)`` the server's images as this site's normalised inputs, or ``None``.
        pair_latents: ``(K, L)`` their latents, or ``None``.
    """

    config: Config

    def __init__(self, setup: SiteSetup, config: Config):
        super().__init__(setup, config)
        k = setup.num_classes
        if self.model.head.out_features != k:
            raise ValueError(
                f"fedktl: the head must output K = {k} values, got {self.model.head.out_features}"
            )
        self.anchors = etf_anchors(k, config.seed)
        self.proj: nn.Linear | None = None
        self.pair_images: torch.Tensor | None = None
        self.pair_latents: torch.Tensor | None = None
        self._cursor = 0

    def rebuild_module(self, name: str, shapes: dict[str, tuple[int, ...]]) -> nn.Module:
        """Checkpoint hook: a fresh ``proj_i`` for a checkpoint holding one (built lazily by :meth:`receive`).

        Args:
            name: the attribute; only ``"proj"`` is built lazily.
            shapes: parameter name → shape in the checkpoint (``weight`` ``(L, d)``, ``bias`` ``(L,)``).

        Returns:
            ``Linear(d, L)`` built as :meth:`receive` builds it; ``self`` is not changed.

        Raises:
            ValueError: another attribute, or shapes that are not those of a ``Linear``.
        """
        weight = shapes.get("weight", ())
        if name != "proj" or set(shapes) != {"weight", "bias"} or len(weight) != 2:
            raise ValueError(f"fedktl: no lazily built module '{name}' with parameter shapes {shapes}")
        return projection(self.model.head.in_features, weight[0], self.config.seed)

    @property
    def input_size(self) -> tuple[int, int]:
        """``(H, W)`` of this site's model inputs."""
        return tuple(self.setup.data.train.images.shape[-2:])

    def receive(self, payload: Tensors | None, rnd: int) -> None:
        """Keep the server's image–latent pairs, converted to this site's inputs.

        Before round 1, or when the server sent nothing, the site trains on ``L_A`` alone. The first
        latents build ``proj_i`` (seeded by ``Config.seed``); later rounds keep training it.

        Raises:
            ValueError: images are not ``(K, 3, S, S)``, latents not ``(K, L)``, or ``L`` changed.
        """
        if not payload or IMAGES not in payload:
            return
        images, latents = payload[IMAGES].float(), payload[LATENTS].float()
        k = self.setup.num_classes
        if images.ndim != 4 or images.shape[:2] != (k, 3):
            raise ValueError(f"fedktl payload '{IMAGES}': expected ({k}, 3, S, S), got {tuple(images.shape)}")
        if latents.ndim != 2 or latents.shape[0] != k:
            raise ValueError(f"fedktl payload '{LATENTS}': expected ({k}, L), got {tuple(latents.shape)}")
        latent_dim = latents.shape[1]
        if self.proj is None:
            self.proj = projection(self.model.head.in_features, latent_dim, self.config.seed)
        elif self.proj.out_features != latent_dim:
            raise ValueError(
                f"fedktl payload '{LATENTS}': latent dimension changed from {self.proj.out_features} to {latent_dim}"
            )
        self.pair_images = site_inputs(images, self.model.in_channels, self.input_size)
        self.pair_latents = latents.clone()

    def train(self, rnd: int) -> Upload:
        """Train ``φ_i``, ``h_i`` (and ``proj_i`` once pairs exist) on ``L_A + L_M``; upload prototypes.

        Uploads ``proto_sum`` ((K, K) float32: unit ETF-space prototypes of the classes present, zero rows
        for the others) and ``proto_count`` ((K,) float32: 1 per class present). See the module
        docstring for what each reveals.
        """
        modules = {"model": self.model}
        groups = [{"params": list(self.model.parameters())}]
        if self.proj is not None and self.pair_images is not None:
            modules["proj"] = self.proj
            groups.append({"params": list(self.proj.parameters())})
        loss = self.fit(rnd, model=nn.ModuleDict(modules), params=groups, forward=self.forward)
        protos, present = self.prototypes()
        sums = {PROTO_SUM: protos * present.unsqueeze(1), PROTO_COUNT: present.float()}
        return Upload(sums, loss)

    @torch.no_grad()
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """``softmax_k(c_k)`` ``(B, K)``: softmax of the ETF cosines of images ``(B, C, H, W)``, eval mode."""
        self.model.eval()
        return torch.softmax(etf_cosine(self.model(x), self.anchors), dim=1)

    def optimizer(self, params, rnd: int | None = None) -> torch.optim.Optimizer:
        """The job's optimiser, clipping each parameter group's gradient norm to ``max_grad_norm``
        before every step (groups: the model, then ``proj_i``)."""
        opt = super().optimizer(params, rnd)
        limit = self.config.max_grad_norm

        def clip(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
            for group in optimizer.param_groups:
                torch.nn.utils.clip_grad_norm_(group["params"], limit)

        opt.register_step_pre_hook(clip)
        return opt

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training path for the shared loop.

        Args:
            x: images ``(B, C, H, W)``.
            y: labels ``(B,)``.

        Returns:
            margin logits ``(B, K)`` (the loop's cross-entropy on them is ``L_A``) and ``L_M`` (a scalar,
            0 before the first pairs arrive).
        """
        cosine = etf_cosine(self.model.head(self.model.features(x)), self.anchors)
        logits = margin_logits(cosine, y, self.config.margin, self.config.scale)
        return logits, self.transfer_loss()

    def transfer_loss(self) -> torch.Tensor:
        """``L_M = μ · MSE(proj_i(φ_i(x̃)), w)`` on the next ``min(B, K)`` pairs (≥ 2), or 0 without pairs.

        The images are normalised by their own batch statistics; BatchNorm running statistics are left
        unchanged.
        """
        if self.proj is None or self.pair_images is None or self.pair_latents is None:
            return torch.zeros(())
        k = len(self.pair_latents)
        size = min(max(self.setup.batch_size, 2), k)
        idx = (self._cursor + torch.arange(size)) % k
        self._cursor = (self._cursor + size) % k
        with frozen_batchnorm_stats(self.model):
            features = self.model.features(self.pair_images[idx])
        return self.config.mu * F.mse_loss(self.proj(features), self.pair_latents[idx])

    @torch.no_grad()
    def prototypes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ETF-space class prototypes from an eval-mode pass over the training split.

        Returns:
            prototypes ``(K, K)`` float32 (unit rows; zero rows for absent classes) and presence ``(K,)`` bool.
        """
        self.model.eval()
        k = self.setup.num_classes
        sums, counts = torch.zeros(k, k), torch.zeros(k)
        loader = torch.utils.data.DataLoader(
            self.setup.data.train, batch_size=self.setup.batch_size, shuffle=False
        )
        for x, y in loader:
            sums.index_add_(0, y, F.normalize(self.model(x).float(), dim=1))
            counts += torch.bincount(y, minlength=k).float()
        return class_prototypes(sums, counts), class_means(sums, counts)[1]


class Server(BaseServer):
    """FedKTL's server: domain alignment of the prototypes with the generator's latents, then K pairs.

    Attributes:
        generator: the generator plug-in (:func:`~medsilo.medical.models.generators.load_generator`).
        anchors: ``(K, K)`` the ETF anchors (the same as every site's).
        transformer: ``F``, :class:`FeatureTransformer` ``K → L`` (published form; the aggregate form maps
            with :meth:`moment_latents` and leaves ``F`` and ``C`` at their initial values).
        centroids: ``C`` ``(K, L)``.
        last_loss: mean alignment loss of the last round (NaN when no step ran, always in the aggregate form).
    """

    needs_plaintext_aggregate: ClassVar[bool] = True
    checkpoint_rebuilt: ClassVar[frozenset[str]] = frozenset({"generator"})
    """Left out of checkpoints: the generator is fixed (never trained) and rebuilt from the config."""
    config: Config

    def __init__(self, config: Config, num_classes: int, sites: list[str]):
        super().__init__(config, num_classes, sites)
        self.generator = load_generator(
            config.generator, latent_dim=config.latent_dim, image_size=config.image_size, seed=config.seed
        )
        latent_dim = self.generator.latent_dim
        self.anchors = etf_anchors(num_classes, config.seed)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(config.seed)
            self.transformer = FeatureTransformer(num_classes, latent_dim)
        self.centroids = nn.Parameter(torch.zeros(num_classes, latent_dim))
        self.last_loss = math.nan

    @classmethod
    def form_for(cls, config: Config) -> str:
        """``per-site`` for the published form, ``sums`` for the aggregate form."""
        return "per-site" if config.form == "published" else "sums"

    def update(self, aggregate: Tensors, rnd: int) -> Tensors:
        """Aggregate form: align on the K class means ``proto_sum[k] / proto_count[k]`` (re-normalised).

        Returns ``{}`` when no site uploaded a prototype.
        """
        if not aggregate:
            return {}
        sums, counts = self._checked(aggregate, "aggregate")
        means, present = class_means(sums, counts)  # under CKKS an absent class decrypts to a count of ±1e-8
        if not present.any():
            return {}
        latents = self.moment_latents(F.normalize(means, dim=1), present)
        images = self.generator(latents).float().clamp(0.0, 1.0)
        return {IMAGES: images, LATENTS: latents}

    @torch.no_grad()
    def moment_latents(self, protos: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Aggregate form: ``(K, L)`` latents from the K class means by a fixed map that matches the prior's moments.

        ``w_k = m + S · √L · Q p_k``: ``p_k`` the unit class mean (the ETF anchor ``a_k`` for a class no site
        has), ``Q`` an ``L×K`` matrix with orthonormal columns, ``m`` and ``S`` (``S Sᵀ`` = covariance) the mean
        and Cholesky factor of 4096 draws of ``W_rand``; all three seeded by ``Config.seed``. In whitened
        coordinates each ``w_k`` has the norm √L of a typical draw, and the class latents are as far apart as the
        prototypes (the ETF's pairwise cosine −1/(K−1) when the sites agree). Nothing is trained on the K points:
        a kernel two-sample objective (the published form's MMD) cannot be estimated from K ≤ a few points, and
        training ``F`` on them collapsed the sites (BENCHMARKS.md).
        """
        mean, chol, q = latent_moments(self.generator, self.num_classes, self.config.seed)
        p = torch.where(present.unsqueeze(1), protos.double(), self.anchors.double())
        return (mean + (math.sqrt(self.generator.latent_dim) * p @ q.T) @ chol.T).float()

    def update_from_sites(self, uploads: dict[str, Tensors], rnd: int) -> Tensors:
        """Published form: align on every (site, class) prototype. In the aggregate form, sums the
        uploads and calls :meth:`update`. Returns ``{}`` when no site uploaded a prototype."""
        uploads = {site: u for site, u in uploads.items() if u}
        if self.config.form == "aggregate":
            if not uploads:
                return {}
            return self.update(
                {key: sum(u[key] for u in uploads.values()) for key in (PROTO_SUM, PROTO_COUNT)}, rnd
            )
        protos, labels = [], []
        for site in sorted(uploads):
            means, present = class_means(*self._checked(uploads[site], f"site {site}"))
            protos.append(means[present])
            labels.append(torch.nonzero(present).flatten())
        if not protos:
            return {}
        return self.generate(torch.cat(protos), torch.cat(labels), rnd)

    def generate(self, protos: torch.Tensor, labels: torch.Tensor, rnd: int) -> Tensors:
        """One server round on prototypes ``(n, K)`` with labels ``(n,)``: align, set centroids, decode.

        Returns:
            ``{"images": (K, 3, S, S) float32 in [0, 1], "latents": (K, L) float32}``, or ``{}`` when
            ``n`` = 0.
        """
        if len(labels) == 0:
            return {}
        protos, labels = protos.float(), labels.long()
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + rnd)
        self.set_centroids(protos, labels)
        self.last_loss = self.align(protos, labels, g)
        self.set_centroids(protos, labels)
        latents = self.latents(labels)
        images = self.generator(latents).float().clamp(0.0, 1.0)
        return {IMAGES: images, LATENTS: latents}

    def align(self, protos: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> float:
        """``server_epochs`` passes of Adam on ``F`` and ``C`` minimising
        ``MMD²_RBF(F(P), W_rand) + λ·MSE(F(P), C_y)``; returns the mean loss (NaN if no step ran).

        A batch of one prototype is skipped (BatchNorm cannot train on it).
        """
        cfg = self.config
        params = [list(self.transformer.parameters()), [self.centroids]]
        opt = torch.optim.Adam([p for group in params for p in group], lr=cfg.server_lr)
        self.transformer.train()
        total, steps = 0.0, 0
        for _ in range(cfg.server_epochs):
            order = torch.randperm(len(labels), generator=g)
            for batch in order.split(cfg.server_batch_size):
                if len(batch) < 2:
                    continue
                q = self.transformer(protos[batch])
                w_rand = self.generator.sample_latents(len(batch), g).float()
                loss = mmd2(q, w_rand) + cfg.lam * F.mse_loss(q, self.centroids[labels[batch]])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for group in params:
                    torch.nn.utils.clip_grad_norm_(group, cfg.max_grad_norm)
                opt.step()
                total += float(loss.detach())
                steps += 1
        self.transformer.eval()
        return total / steps if steps else math.nan

    @torch.no_grad()
    def set_centroids(self, protos: torch.Tensor, labels: torch.Tensor) -> None:
        """``C_k ←`` mean of ``F(P)`` over the prototypes of class k (F in eval mode); other rows kept."""
        self.transformer.eval()
        q = self.transformer(protos)
        k = self.num_classes
        sums = torch.zeros(k, q.shape[1]).index_add_(0, labels, q)
        counts = torch.bincount(labels, minlength=k).float()
        present = counts > 0
        self.centroids[present] = sums[present] / counts[present].unsqueeze(1)

    @torch.no_grad()
    def latents(self, labels: torch.Tensor) -> torch.Tensor:
        """``(K, L)``: ``C_k`` for classes with a prototype, ``F(a_k)`` (eval mode) for the others."""
        self.transformer.eval()
        present = torch.bincount(labels, minlength=self.num_classes) > 0
        ideal = self.transformer(self.anchors)
        return torch.where(present.unsqueeze(1), self.centroids.detach(), ideal).float().clone()

    def _checked(self, upload: Tensors, who: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``proto_sum`` ``(K, K)`` and ``proto_count`` ``(K,)`` of an upload, shapes checked."""
        k = self.num_classes
        for key, shape in ((PROTO_SUM, (k, k)), (PROTO_COUNT, (k,))):
            if key not in upload:
                raise KeyError(f"fedktl {who}: upload has no '{key}'")
            if tuple(upload[key].shape) != shape:
                raise ValueError(
                    f"fedktl {who}: '{key}' must have shape {shape}, got {tuple(upload[key].shape)}"
                )
        return upload[PROTO_SUM].float(), upload[PROTO_COUNT].float()


# ---- modules and pure helpers ---------------------------------------------------------------------


class FeatureTransformer(nn.Module):
    """``F = Linear(K, K) + BatchNorm1d(K) + ReLU + Linear(K, L)``: ETF-space prototypes to latents.

    Args:
        num_classes: ``K``.
        latent_dim: ``L``.
    """

    def __init__(self, num_classes: int, latent_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(num_classes, num_classes),
            nn.BatchNorm1d(num_classes),
            nn.ReLU(),
            nn.Linear(num_classes, latent_dim),
        )

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        """Prototypes ``(n, K)`` to latents ``(n, L)`` (train mode needs ``n`` ≥ 2)."""
        return self.mlp(p)


@torch.no_grad()
def latent_moments(generator, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the aggregate form's map needs, all float64 and fixed by ``seed``.

    Returns:
        the mean ``m`` ``(L,)`` and lower Cholesky factor ``S`` ``(L, L)`` of the covariance (plus 1e-6·I) of
        4096 draws of the generator's ``W_rand``, and ``Q`` ``(L, K)`` with orthonormal columns.
    """
    latent_dim = generator.latent_dim
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7)
    draws = generator.sample_latents(4096, g).double()
    cov = torch.cov(draws.T) + 1e-6 * torch.eye(latent_dim, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(latent_dim, num_classes, generator=g, dtype=torch.float64))
    return draws.mean(0), torch.linalg.cholesky(cov), q


def etf_matrix(num_classes: int, seed: int) -> torch.Tensor:
    """The simplex ETF ``M = sqrt(K/(K−1)) · U (I − 11ᵀ/K)`` ``(K, K)`` float32.

    ``U`` is the Q factor of a ``K×K`` matrix of uniform draws from ``torch.Generator().manual_seed(seed)``
    (computed in float64), so ``M`` depends only on ``(K, seed)``.
    """
    k = num_classes
    if k < 2:
        raise ValueError(f"num_classes: an ETF needs K ≥ 2, got {k}")
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.rand(k, k, generator=g, dtype=torch.float64))
    centering = torch.eye(k, dtype=torch.float64) - torch.full((k, k), 1.0 / k, dtype=torch.float64)
    return (math.sqrt(k / (k - 1)) * u @ centering).float()


def etf_anchors(num_classes: int, seed: int) -> torch.Tensor:
    """Anchors ``a_k`` ``(K, K)``: the columns of :func:`etf_matrix` as unit rows (pairwise cosine −1/(K−1))."""
    return F.normalize(etf_matrix(num_classes, seed).T, dim=1)


def etf_cosine(projection: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """``c_bk = ⟨normalize(projection_b), a_k⟩``: ``(B, K)`` from head outputs ``(B, K)`` and anchors ``(K, K)``."""
    return F.normalize(projection, dim=1) @ anchors.T


def margin_logits(cosine: torch.Tensor, labels: torch.Tensor, margin: float, scale: float) -> torch.Tensor:
    """Additive angular margin: ``s · c_bk`` with the true class replaced by ``s · cos(arccos c_by + m)``.

    The true-class cosine is clamped to ``[−1 + ε, 1 − ε]`` before ``arccos`` so gradients stay finite
    at ``c = ±1`` (the reference has no clamp).

    Args:
        cosine: ``(B, K)`` in [−1, 1].
        labels: ``(B,)`` int64.
        margin: m ≥ 0 (radians).
        scale: s > 0.

    Returns:
        logits ``(B, K)``.
    """
    theta = torch.acos(cosine.clamp(-1 + ARCCOS_EPS, 1 - ARCCOS_EPS))
    target = torch.cos(theta + margin)
    is_true = F.one_hot(labels, cosine.shape[1]).bool()
    return scale * torch.where(is_true, target, cosine)


def class_prototypes(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``normalize(sums_k / counts_k)`` ``(K, K)`` from per-class sums ``(K, K)`` and counts ``(K,)``;
    zero rows for absent classes (no NaN; :func:`~medsilo.components.algorithms.base.class_means`)."""
    means, present = class_means(sums, counts)
    return torch.where(present.unsqueeze(1), F.normalize(means, dim=1), torch.zeros_like(means))


def projection(feature_dim: int, latent_dim: int, seed: int) -> nn.Linear:
    """``proj_i = Linear(d, L)`` initialised from ``seed`` (the same at every site of a job)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return nn.Linear(feature_dim, latent_dim)


def site_inputs(images: torch.Tensor, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """Generated images as a site's model inputs.

    Args:
        images: ``(n, 3, S, S)`` in [0, 1].
        channels: the site's ``C`` (1: channel mean; 3: unchanged).
        size: the site's ``(H, W)`` (bilinear resize, antialiased, when it differs from ``S``).

    Returns:
        ``(n, C, H, W)`` float32, normalised as every medsilo input (``(x − 0.5) / 0.25``).
    """
    x = images.float().clamp(0.0, 1.0)
    if channels == 1:
        x = x.mean(dim=1, keepdim=True)
    elif channels != 3:
        raise ValueError(f"channels: must be 1 or 3, got {channels}")
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True).clamp(
            0.0, 1.0
        )
    return normalize(x)


@contextlib.contextmanager
def frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Inside the block, BatchNorm layers in train mode still normalise by batch statistics but do not
    update their running statistics (momentum 0); the momenta are restored afterwards."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
