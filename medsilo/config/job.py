"""Job spec (``jobs/*.yml``): what a data scientist asks the federation to train (DESIGN §7).

A job names a dataset, never a path; each site resolves the name through its own config. Example::

    name: cxr-fedavg
    modality: cxr
    classes: [normal, pneumonia]   # or task: multilabel with labels: [...] (see JobSpec)
    dataset: cxr
    image_size: 64
    model: cnn                     # or a map site -> backbone for heterogeneous jobs
    feature_dim: 64
    algorithm: {name: fedavg, params: {}}
    training: {rounds: 10, local_epochs: 1, batch_size: 32, lr: 0.01}
    privacy: {mode: none}
    seed: 0

Algorithm hyper-parameters (``algorithm.params``) are checked against the algorithm's own ``Config``
(its names, types and ranges) as part of validating the spec.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, ValidationInfo, field_validator, model_validator

from medsilo.config import augment, registry
from medsilo.config.augment import AugmentationChoice
from medsilo.config.common import (
    MODALITY_CHANNELS,
    PRIVACY_STRENGTH,
    SITE_NAME_PATTERN,
    Modality,
    PrivacyMode,
    Strict,
)
from medsilo.config.loading import load_yaml, validate
from medsilo.config.manifest import COLUMNS as MANIFEST_COLUMNS
from medsilo.errors import MedsiloError, did_you_mean

ClassName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_ .-]{0,62}$")]
ClassList = Annotated[list[ClassName], Field(min_length=2)]
Task = Literal["single", "multilabel"]
"""``single``: one class per image (softmax, cross-entropy); ``multilabel``: any subset of the labels per image
(one sigmoid per label, binary cross-entropy)."""
UnknownPolicy = Literal["ignore", "negative", "positive"]
"""What a blank (unknown) label cell of a multi-label manifest means: left out of the loss (``ignore``), or read
as 0 (``negative``) or 1 (``positive``) — CheXpert's U-Ignore, U-Zeros and U-Ones."""
Scalar = bool | int | float | str

UNKNOWN_VIEW = "UNKNOWN"
CXR_VIEWS: tuple[str, ...] = ("PA", "AP", "LATERAL", "LL", UNKNOWN_VIEW)
"""Chest X-ray views a job may keep (``views``): posteroanterior, anteroposterior, a lateral other than left
(right lateral, or one only called lateral), left lateral, and ``UNKNOWN`` for images whose header names none
(:func:`medsilo.medical.data.readers.view_of`)."""


def check_algorithm(name: str) -> str:
    """Lower-case ``name`` and check it is a registered algorithm (with a "did you mean" otherwise)."""
    known = registry.algorithms().ALGORITHMS
    key = str(name).lower()
    if key not in known:
        raise ValueError(f"unknown algorithm; {did_you_mean(key, known)}choose from {', '.join(known)}")
    return key


def check_backbone(name: str) -> str:
    """Check ``name`` is a model-zoo backbone (with a "did you mean" otherwise)."""
    known = registry.backbones()
    if name not in known:
        raise ValueError(f"unknown backbone; {did_you_mean(name, known)}choose from {', '.join(known)}")
    return name


class AlgorithmSpec(Strict):
    """Which algorithm runs and its hyper-parameters (names as in the algorithm's ``Config``)."""

    name: str
    params: dict[str, Scalar | list[Scalar]] = {}

    _name = field_validator("name")(check_algorithm)

    def config(self, file: str | Path = "<job spec>"):
        """The algorithm's validated ``Config`` (defaults filled in).

        Raises:
            ConfigError: a parameter the algorithm does not have, or a bad value, named as
                ``algorithm.params.<name>``.
        """
        module = registry.algorithms().algorithm_module(self.name)
        return validate(dict(self.params), module.Config, file, field_prefix="algorithm.params")


MAX_ROUNDS = 10_000
"""Most rounds a job may ask for (a site plans a DP job's whole cost at join)."""


class Training(Strict):
    """The shared local-training loop's settings.

    Attributes:
        rounds: federated rounds (≥ 1).
        local_epochs: passes over the local train split per round (≥ 1).
        batch_size: mini-batch size (≥ 1; a site may cap it).
        lr: learning rate of the local optimizer (> 0).
        optimizer: ``sgd`` (momentum below) or ``adam``.
        momentum: SGD momentum in [0, 1).
        weight_decay: L2 penalty (≥ 0).
        lr_schedule: how the learning rate moves over rounds (:func:`lr_factor`): ``constant`` (default),
            ``cosine`` (from ``lr`` down a half cosine over the rounds after warm-up, never to 0) or ``step``
            (× ``lr_step_gamma`` every ``lr_step_rounds`` rounds after warm-up).
        warmup_rounds: rounds at the start whose learning rate rises linearly to ``lr`` (round r of W uses
            r/W·lr; 0 = none).
        lr_step_rounds, lr_step_gamma: the ``step`` schedule's period (≥ 1) and factor (0 < γ ≤ 1).
        grad_clip_norm: the largest gradient norm a local step takes (the whole update of a step, after any DP
            noise); ``None`` (default) leaves gradients as they are. Not DP's per-image clip (``privacy.dp``).
        class_weights: ``none`` (default) or ``balanced``: each class's loss weighted by N / (K·n_c) from the
            site's own training split, so a skewed site is not trained into its majority class. Single-label
            jobs without DP only (the weights depend on every record, which DP-SGD's analysis does not allow).
        loss: ``cross-entropy`` (default) or ``logit-adjusted`` (Menon et al., 2021): each image's loss is the
            cross-entropy of ``logits + log π``, with π the site's class shares in its training split (a class
            with no image counts as one), while the model predicts with its plain logits. The frequent findings
            of a skewed site then stop drowning the rare ones, without reweighting any image, so it suits DP-SGD:
            in a job whose private rounds train with DP-SGD, π comes from class counts released under DP
            (``privacy.dp.count_noise_multiplier``), charged once. Single-label jobs; not with ``class_weights:
            balanced`` (the two corrections would count the skew twice).
        augmentation: what random transforms each training image goes through: ``default`` (the
            modality's recipe), ``none`` (the exact preprocessed pixels) or a list of allow-listed MONAI
            transforms with their parameters (:mod:`medsilo.config.augment`).
    """

    rounds: int = Field(default=10, ge=1, le=MAX_ROUNDS)
    local_epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=0.01, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    lr_schedule: Literal["constant", "cosine", "step"] = "constant"
    warmup_rounds: int = Field(default=0, ge=0)
    lr_step_rounds: int = Field(default=10, ge=1)
    lr_step_gamma: float = Field(default=0.5, gt=0, le=1)
    grad_clip_norm: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    class_weights: Literal["none", "balanced"] = "none"
    loss: Literal["cross-entropy", "logit-adjusted"] = "cross-entropy"
    augmentation: AugmentationChoice = "default"

    @model_validator(mode="after")
    def _options_fit(self) -> Training:
        if self.warmup_rounds >= self.rounds and self.warmup_rounds > 0:
            raise ValueError(f"warmup_rounds: {self.warmup_rounds} leaves no round after warm-up (rounds: "
                             f"{self.rounds}); use fewer")  # fmt: skip
        if self.loss == "logit-adjusted" and self.class_weights == "balanced":
            raise ValueError("loss: 'logit-adjusted' already corrects for a site's class skew; with class_weights "
                             "'balanced' the skew would count twice (set class_weights: none)")  # fmt: skip
        return self


class Reliability(Strict):
    """What the job does when sites fail or straggle.

    Attributes:
        min_sites: the fewest sites that must answer a task for the round to count. ``None`` (default):
            every site must answer, and any failure stops the job. With a number, a site that errors,
            dies or times out is recorded as failed for that round (``results.json`` ``failures``) and
            the round completes with the others, as long as at least ``min_sites`` answered.
        task_timeout: seconds the server waits for each site's answer to a task (0: no limit); a site
            that has not answered by then counts as failed for that round.
    """

    min_sites: int | None = Field(default=None, ge=1)
    task_timeout: int = Field(default=0, ge=0)


class DPSpec(Strict):
    """Gaussian-mechanism parameters for ``dp`` and ``ckks+dp`` (DESIGN §5; :mod:`medsilo.secure.dp`).

    Every guarantee is record-level: neighbouring datasets of a site differ by one training image added
    or removed (a patient with several images is covered through group privacy only). What a round
    costs depends on the algorithm's DP form (its ``Client.dp_events``):

    * ``update`` (FedAvg's default): one release of the clipped, noised weight update, ``GaussianEvent(σ)``,
      with sensitivity 2·clip between *any* two datasets of the site. ``grad_clip`` and
      ``sgd_noise_multiplier`` are not used.
    * ``dp-sgd`` (FedAvg with ``algorithm.params.dp_form: dp-sgd``): the local model is trained with DP-SGD
      as below and its weights are uploaded as they are (post-processing), ``GaussianEvent(σ_sgd, T, q)``
      alone; ``clip`` and ``noise_multiplier`` are not used.
    * ``class_sums`` (FedProto, FedTGP): the local model is trained with DP-SGD (Poisson sampling at rate
      q = B/N, T = local_epochs·⌈N/B⌉ steps, per-image gradients clipped to ``grad_clip``, noise std
      ``sgd_noise_multiplier``·``grad_clip``), ``GaussianEvent(σ_sgd, T, q)``; then the per-class sums of
      the trained model's clipped features (each image once) are released with sensitivity √2·clip for
      that fixed model, ``GaussianEvent(σ)``. The site is charged the composition of both (adaptive
      composition: the model is the output of a DP mechanism and is never released itself).

    :func:`medsilo.secure.dp.dpsgd_noise_for_epsilon` (class sums) and
    :func:`medsilo.secure.dp.noise_for_epsilon` (updates) give σ for a target ε.

    Attributes:
        noise_multiplier: σ of the release, noise std / L2 sensitivity (> 0): √2·clip for per-class sums,
            2·clip for weight updates.
        clip: L2 clipping bound C of each record's feature vector (class sums) or of the whole update (> 0).
        delta: δ the site's accountant reports ε at (0 < δ < 1).
        grad_clip: DP-SGD's bound G on each image's gradient norm, jointly over all trained parameters
            (> 0; default 1.0). Only the ``class_sums`` and ``dp-sgd`` forms use it.
        sgd_noise_multiplier: DP-SGD's σ_sgd, gradient-noise std / ``grad_clip`` (> 0); omitted (or
            ``null``): the same as ``noise_multiplier``. Only the ``class_sums`` and ``dp-sgd`` forms use it.
        count_noise_multiplier: σ_n of the site's class counts (> 0; default 5.0), which a job with
            ``training.loss: logit-adjusted`` needs and DP-SGD may not read as they are (they depend on every
            record). The site draws its K counts plus ``N(0, σ_n²)`` each (L2 sensitivity 1: adding or removing one
            image changes one count by 1) once, at its first private round, keeps them for the rest of the job
            (they are in its checkpoint) and charges ``GaussianEvent(σ_n)`` with that round's upload. At 5.0 this
            adds little: ε = 8 over 50 rounds at 238 images needs σ_sgd 1.919 instead of 1.906. Only DP-SGD
            forms with that loss use it; the counts never leave the site.
    """

    noise_multiplier: float = Field(gt=0)
    clip: float = Field(gt=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    grad_clip: float = Field(default=1.0, gt=0)
    sgd_noise_multiplier: float | None = Field(default=None, gt=0)
    count_noise_multiplier: float = Field(default=5.0, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _sgd_noise_defaults_to_the_release(self) -> DPSpec:
        if self.sgd_noise_multiplier is None:
            object.__setattr__(self, "sgd_noise_multiplier", self.noise_multiplier)  # frozen: set once, here
        return self


class PrivacySpec(Strict):
    """What the job asks sites to protect; a site may demand more (its own policy wins).

    Attributes:
        mode: ``none``, ``dp``, ``ckks`` or ``ckks+dp``.
        dp: required for the ``dp`` modes.
        min_contributors: distinct sites an encrypted aggregate needs before anyone decrypts it (≥ 1).
        poly_modulus_degree: CKKS ring size N (slots = N/2).
    """

    mode: PrivacyMode = "none"
    dp: DPSpec | None = None
    min_contributors: int = Field(default=2, ge=1)
    poly_modulus_degree: Literal[4096, 8192, 16384] = 8192

    @model_validator(mode="after")
    def _dp_given_when_needed(self) -> PrivacySpec:
        if "dp" in PRIVACY_STRENGTH[self.mode] and self.dp is None:
            raise ValueError(f"mode '{self.mode}' needs a 'dp' section (noise_multiplier, clip, delta)")
        return self


class PCEvolveSpec(Strict):
    """PCEvolve at named scarce sites before federated training (DESIGN §9; the method and its privacy
    argument: :mod:`medsilo.medical.synth.pcevolve.evolve`, whose ``PCEvolveConfig`` these fields fill).

    Attributes:
        sites: sites that synthesize data for themselves.
        epsilon: total ε each of those sites spends on selection (> 0).
        images_per_class: synthetic images kept per class.
        iterations: evolution iterations (≥ 1; ≥ 2 with ``keep: val``).
        candidates: candidates per class and iteration the site chooses among.
        picks: candidates picked per class and iteration (≤ ``candidates``); the kept images are varied
            from all of them.
        utility: ``vote`` (each private image votes for its nearest candidate; default) or ``paper``.
        keep: ``last`` (the last iteration's images) or ``val`` (the iteration chosen, privately, on the
            site's validation split at ``keep_epsilon``, part of ``epsilon``).
        keep_epsilon: see ``keep``.
        encoder: ``pretrained`` (ImageNet EfficientNet-Lite0 from a pinned wheel), ``random-cnn`` or ``pixels``
            (an encoder fitted on the site's own images would void the selection's ε: none is offered).
        generator: generator plug-in name (``procedural`` needs no download).
    """

    sites: list[Annotated[str, StringConstraints(pattern=SITE_NAME_PATTERN)]] = Field(min_length=1)
    epsilon: float = Field(gt=0, allow_inf_nan=False)
    images_per_class: int = Field(default=50, ge=1, le=2000)
    iterations: int = Field(default=2, ge=1, le=50)
    candidates: int = Field(default=16, ge=2, le=512)
    picks: int = Field(default=8, ge=1)
    utility: Literal["vote", "paper"] = "vote"
    keep: Literal["last", "val"] = "last"
    keep_epsilon: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    encoder: Literal["pretrained", "random-cnn", "pixels"] = "pretrained"
    generator: str = "procedural"

    @model_validator(mode="after")
    def _consistent(self) -> PCEvolveSpec:
        if self.picks > self.candidates:
            raise ValueError(f"picks: {self.picks} exceeds candidates ({self.candidates})")
        if self.keep == "val" and (self.iterations < 2 or self.keep_epsilon >= self.epsilon):
            raise ValueError("keep: val needs iterations ≥ 2 and keep_epsilon below epsilon (it is part of it)")
        return self


class Augmentation(Strict):
    """Data a job adds to a site's training split before training (the per-image random transforms are
    ``training.augmentation``)."""

    pcevolve: PCEvolveSpec | None = None


class Evaluation(Strict):
    """How rounds are scored: the reported round is chosen on ``select_on``, never on test.

    Attributes:
        select_on: single-label jobs: ``val_balanced_acc`` (default: the mean over sites of the validation
            balanced accuracy, so a site's majority-class predictor does not look good) or ``val_acc`` (mean
            validation accuracy); multi-label jobs: ``val_macro_auroc`` (mean over sites of the validation
            macro-AUROC). Left out: the task's default.
    """

    select_on: Literal["val_balanced_acc", "val_acc", "val_macro_auroc"] | None = None


class JobSpec(Strict):
    """A job spec file, validated.

    Attributes:
        name: job name (letters, digits, ``_ . -``).
        modality: ``cxr`` (DICOM chest X-ray), ``pathology`` (RGB H&E patches) or ``image`` (PNG/JPEG/TIFF
            of any specialty, grayscale or RGB).
        classes: class names in label order (≥ 2, unique; numbers are read as names: ``[0, 1]`` is
            ``["0", "1"]``). Required for ``task: single``. For ``task: multilabel`` it names the model's
            outputs, which are the labels: leave it out (it is filled in as ``labels``) or repeat ``labels``.
        task: ``single`` (default: one class per image, softmax) or ``multilabel`` (any subset of ``labels``
            per image: one sigmoid output per label, masked binary cross-entropy, per-label AUROC, macro-AUROC
            and per-label F1 at a threshold chosen on validation; rounds are selected on validation
            macro-AUROC). Only algorithms that declare ``MULTILABEL`` can run a multi-label job.
        labels: ``task: multilabel`` only: the findings, in output order (≥ 2, unique ignoring case; each is
            a manifest column of that name holding 1, 0 or blank). A label may not be called like a manifest
            column (``path``, ``label``, ``patient_id``, ``split``, ``source``).
        unknown: ``task: multilabel`` only: what a blank label cell means (:data:`UnknownPolicy`; default
            ``ignore``: masked out of the loss and of the metrics).
        channels: the model's input channels: ``1`` (grayscale images are used as they are, RGB converted
            to luminance) or ``3`` (grayscale replicated); ``null`` (default) for ``image`` reads it from each
            site's files (3 if any is in colour); chest X-ray is always 1, pathology 3.
        views: chest X-ray only: the views each site keeps (:data:`CXR_VIEWS`, case ignored, e.g. ``[PA, AP]``);
            images of other views are dropped when a site loads its data, and counted in its log. ``null``
            (default): every view, ``UNKNOWN`` included.
        dataset: the dataset name each site resolves through its own config.
        image_size: square input side in pixels (8–512).
        model: one backbone for every site, or a map site → backbone (heterogeneous FL).
        feature_dim: the shared feature dimension d every backbone emits (≥ 2).
        algorithm, training, privacy, augmentation, evaluation, reliability: see their classes.
        seed: seeds model initialisation, data order and augmentation.
    """

    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
    modality: Modality
    classes: ClassList | None = None
    task: Task = "single"
    labels: ClassList | None = None
    unknown: UnknownPolicy | None = None
    channels: Literal[1, 3] | None = None
    views: list[str] | None = None
    dataset: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
    image_size: int = Field(default=64, ge=8, le=512)
    model: Any = "cnn"
    feature_dim: int = Field(default=64, ge=2)
    algorithm: AlgorithmSpec
    training: Training = Training()
    privacy: PrivacySpec = PrivacySpec()
    augmentation: Augmentation = Augmentation()
    evaluation: Evaluation = Evaluation()
    reliability: Reliability = Reliability()
    seed: int = Field(default=0, ge=0)

    @field_validator("classes", "labels", mode="before")
    @classmethod
    def _numbers_as_names(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        out = []
        for item in value:
            if isinstance(item, int) and not isinstance(item, bool):
                out.append(str(item))  # YAML reads [0, 1, 2] as numbers; the manifest's labels are text
            elif not isinstance(item, str):
                raise ValueError(f"class names are text; quote {item!r} in the YAML (e.g. classes: ['0.5', '1.5']) "
                                 f"so it matches the manifest's label column")
            else:
                out.append(item)
        return out

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, value: list[str] | None) -> list[str] | None:
        dupes = sorted({c for c in value or () if value.count(c) > 1})
        if dupes:
            raise ValueError(f"class names must be unique; repeated: {', '.join(dupes)}")
        return value

    @field_validator("labels")
    @classmethod
    def _label_columns(cls, value: list[str] | None) -> list[str] | None:
        folded = [v.lower() for v in value or ()]  # manifest headers are read ignoring case
        dupes = sorted({v for v in value or () if folded.count(v.lower()) > 1})
        if dupes:
            raise ValueError(f"label names must be unique ignoring case (each is a manifest column); "
                             f"repeated: {', '.join(dupes)}")  # fmt: skip
        reserved = [v for v in value or () if v.lower() in MANIFEST_COLUMNS]
        if reserved:
            raise ValueError(f"label {reserved[0]!r} is a manifest column name ({', '.join(MANIFEST_COLUMNS)}); "
                             f"rename the finding")  # fmt: skip
        return value

    @model_validator(mode="after")
    def _task_fields(self) -> JobSpec:
        select_on = self.evaluation.select_on
        if self.task == "single":
            for name in ("labels", "unknown"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: only a multi-label job has {name}; add 'task: multilabel' or "
                                     f"list the classes under 'classes'")  # fmt: skip
            if self.classes is None:
                raise ValueError("classes: required: the class names in label order (at least 2)")
            if select_on == "val_macro_auroc":
                raise ValueError("evaluation.select_on: 'val_macro_auroc' is for multi-label jobs; use "
                                 "val_balanced_acc or val_acc")  # fmt: skip
            if self.training.class_weights == "balanced" and self.privacy.mode in ("dp", "ckks+dp"):
                raise ValueError(f"training.class_weights: 'balanced' weights depend on every training record, "
                                 f"which DP-SGD's accounting does not allow; use 'none' with privacy mode "
                                 f"{self.privacy.mode}")  # fmt: skip
            object.__setattr__(self, "evaluation", Evaluation(select_on=select_on or "val_balanced_acc"))
            return self
        if self.training.class_weights != "none":
            raise ValueError("training.class_weights: for single-label jobs (a multi-label job's labels are not "
                             "exclusive classes)")  # fmt: skip
        if self.training.loss != "cross-entropy":
            raise ValueError(f"training.loss: '{self.training.loss}' is for single-label jobs (a multi-label job's "
                             "loss is per-label binary cross-entropy)")  # fmt: skip
        if self.labels is None:
            raise ValueError("labels: a multi-label job lists its findings (at least 2), one manifest column "
                             "each")  # fmt: skip
        if self.classes is not None and list(self.classes) != list(self.labels):
            raise ValueError("classes: a multi-label model's outputs are its labels; leave classes out (or repeat "
                             "labels exactly)")  # fmt: skip
        if select_on not in (None, "val_macro_auroc"):
            raise ValueError(f"evaluation.select_on: a multi-label job selects rounds on val_macro_auroc, not "
                             f"'{select_on}'")  # fmt: skip
        if self.augmentation.pcevolve is not None:
            raise ValueError("augmentation.pcevolve: PCEvolve synthesizes images per class; a multi-label job "
                             "cannot use it")  # fmt: skip
        algos = registry.algorithms()
        if not getattr(algos.algorithm_module(self.algorithm.name), "MULTILABEL", False):
            capable = [a for a in algos.ALGORITHMS if algos.algorithm_module(a).MULTILABEL]
            raise ValueError(f"algorithm '{self.algorithm.name}' cannot train a multi-label model (task: "
                             f"multilabel); algorithms that can: {', '.join(capable)}")  # fmt: skip
        object.__setattr__(self, "classes", list(self.labels))  # frozen: set once, here
        object.__setattr__(self, "unknown", self.unknown or "ignore")
        object.__setattr__(self, "evaluation", Evaluation(select_on="val_macro_auroc"))
        return self

    @field_validator("model")
    @classmethod
    def _model(cls, value: Any) -> str | dict[str, str]:
        if isinstance(value, str):
            return check_backbone(value)
        if isinstance(value, dict) and value:
            out = {}
            for site, backbone in value.items():
                if not isinstance(site, str) or not isinstance(backbone, str):
                    raise ValueError("must map site names to backbone names")
                try:
                    out[site] = check_backbone(backbone)
                except ValueError as exc:
                    raise ValueError(f"site '{site}': {exc}") from None
            return out
        raise ValueError("must be a backbone name or a non-empty map site -> backbone name")

    @model_validator(mode="after")
    def _channels_fit(self) -> JobSpec:
        fixed = MODALITY_CHANNELS[self.modality]
        if fixed is not None and self.channels not in (None, fixed):
            raise ValueError(f"channels: {self.modality} images have {fixed} channel(s); leave channels out "
                             f"or use modality 'image'")  # fmt: skip
        channels = self.input_channels
        steps = augment.resolve(self.training.augmentation, self.modality)
        rgb_only = sorted({s.transform for s in steps} & augment.RGB_ONLY)
        if rgb_only and channels == 1:
            raise ValueError(f"training.augmentation: {', '.join(rgb_only)} needs RGB images, but this job's "
                             f"images have 1 channel")  # fmt: skip
        return self

    @field_validator("views", mode="before")
    @classmethod
    def _known_views(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        if not value:
            raise ValueError(f"list at least one view ({', '.join(CXR_VIEWS)}), or leave views out to keep all")
        out = []
        for item in value:
            view = str(item).strip().upper()
            if view not in CXR_VIEWS:
                raise ValueError(f"unknown view {item!r}; {did_you_mean(view, CXR_VIEWS)}choose from "
                                 f"{', '.join(CXR_VIEWS)}")  # fmt: skip
            if view in out:
                raise ValueError(f"view {view} is listed twice")
            out.append(view)
        return out

    @model_validator(mode="after")
    def _views_are_for_chest_xrays(self) -> JobSpec:
        if self.views is not None and self.modality != "cxr":
            raise ValueError(f"views: only chest X-rays (modality cxr) have a view; a {self.modality} job cannot "
                             f"restrict views, remove 'views'")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _pcevolve_modality(self) -> JobSpec:
        if self.augmentation.pcevolve is not None and self.modality not in ("cxr", "pathology"):
            raise ValueError(f"augmentation.pcevolve: PCEvolve's generators make chest X-ray and pathology "
                             f"images, not '{self.modality}'")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _algorithm_params(self, info: ValidationInfo) -> JobSpec:
        # raises ConfigError (not a ValueError), which pydantic lets through with its own field names
        self.algorithm.config((info.context or {}).get("file", "<job spec>"))
        return self

    @model_validator(mode="after")
    def _server_form_fits_privacy(self) -> JobSpec:
        if self.privacy.mode == "none":
            return self
        algos = registry.algorithms()
        module = algos.algorithm_module(self.algorithm.name)
        if "dp" in PRIVACY_STRENGTH[self.privacy.mode] and module.Client.dp_form is None:
            with_dp = [a for a in algos.ALGORITHMS if algos.algorithm_module(a).Client.dp_form is not None]
            raise ValueError(
                f"algorithm '{self.algorithm.name}' has no differentially private form, so privacy mode "
                f"'{self.privacy.mode}' cannot run it; algorithms with one: {', '.join(with_dp)}"
            )

        config = self.algorithm.config()
        if "dp" in PRIVACY_STRENGTH[self.privacy.mode] and self.multilabel and module.Client.trains_with_dp_sgd(config):
            raise ValueError(
                f"algorithm '{self.algorithm.name}' in this configuration trains with DP-SGD under privacy mode "
                f"'{self.privacy.mode}', which runs single-label jobs only (its per-image loss is cross-entropy); "
                f"for FedAvg use algorithm.params.dp_form: update in a multi-label job"
            )
        form = module.Server.form_for(config)
        if form != "sums":
            raise ValueError(
                f"algorithm '{self.algorithm.name}' in this configuration reads each site's upload on the server "
                f"(form '{form}'), which privacy mode '{self.privacy.mode}' forbids: the server may only "
                f"see sums; choose the algorithm's aggregate form (algorithm.params.form: aggregate)"
            )
        return self

    @model_validator(mode="after")
    def _backbones_fit_algorithm(self) -> JobSpec:
        algos = registry.algorithms()
        if self.heterogeneous and len(set(self.model.values())) > 1 and \
                not algos.algorithm_module(self.algorithm.name).MIXED_BACKBONES:  # fmt: skip
            raise ValueError(
                f"model: sites run different backbones, but '{self.algorithm.name}' shares backbone weights; "
                f"use one backbone for every site, or a heterogeneous-FL algorithm ({', '.join(algos.HTFL_ALGORITHMS)})"
            )
        return self

    @property
    def multilabel(self) -> bool:
        """True for ``task: multilabel``."""
        return self.task == "multilabel"

    @property
    def input_channels(self) -> int | None:
        """The model's input channels: fixed by the modality, else ``channels`` (``None``: from the data)."""
        return MODALITY_CHANNELS[self.modality] or self.channels

    @property
    def augmentation_steps(self) -> tuple:
        """``training.augmentation`` resolved for this modality (:func:`medsilo.config.augment.resolve`)."""
        return augment.resolve(self.training.augmentation, self.modality)

    @property
    def heterogeneous(self) -> bool:
        """True when sites may run different backbones."""
        return isinstance(self.model, dict)

    def backbone_for(self, site: str) -> str:
        """The backbone ``site`` trains; raises ``KeyError`` naming the site if the map lacks it."""
        if isinstance(self.model, str):
            return self.model
        if site not in self.model:
            raise KeyError(f"job '{self.name}': model: no backbone given for site '{site}'")
        return self.model[site]


def load_job_spec(path: str | Path) -> JobSpec:
    """Read and validate a job spec file."""
    return load_yaml(path, JobSpec)


JOB_ENCODING = "medsilo-job-v1:"
"""Prefix of a job spec as the controller and executor receive it: :func:`encode_job`."""
_ENCODED = re.compile(r"medsilo-job-v1:([A-Za-z0-9_-]+={0,2})\.([0-9a-f]{64})")


def spec_digest(spec: dict) -> str:
    """SHA-256 (hex) of a spec's canonical JSON: what checkpoints, ledgers and resumes bind a job's spec by."""
    return hashlib.sha256(_canonical(spec)).hexdigest()


def encode_job(spec: dict) -> str:
    """A validated spec (JSON-plain) as the one string argument NVFlare passes to medsilo's components:
    :data:`JOB_ENCODING` + base64url of its canonical JSON + ``.`` + its :func:`spec_digest`.

    Why: NVFlare expands ``{NAME}`` and ``{$ENV_VAR}`` references in every string of a job config with the
    receiving party's variables and environment, anywhere in the string, before anything is built. Base64
    has no braces of its own, and the digest tag makes anything NVFlare put into the string fail
    :func:`decode_job` — a job author cannot know the digest of a site's secret.
    """
    text = _canonical(spec)
    return f"{JOB_ENCODING}{base64.urlsafe_b64encode(text).decode('ascii')}.{hashlib.sha256(text).hexdigest()}"


def decode_job(value: object) -> dict:
    """The spec dict of an :func:`encode_job` string, checked exactly (validate it with :class:`JobSpec` next).

    Raises:
        MedsiloError: ``value`` is not such a string, does not decode strictly (ASCII base64, UTF-8 JSON), fails
            its digest or is not in canonical form; the message never repeats the value (it may hold a party's
            secrets NVFlare expanded into it).
    """
    fix = "build the job with 'medsilo job build' and submit that folder unchanged"
    match = _ENCODED.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise MedsiloError(f"job: not a medsilo job encoding ({type(value).__name__}); {fix}")
    try:
        text = base64.b64decode(match[1].encode("ascii"), altchars=b"-_", validate=True)
        spec = json.loads(text.decode("utf-8"))
    except (ValueError, UnicodeError, RecursionError):
        raise MedsiloError(f"job: the encoded spec does not decode; {fix}") from None
    if hashlib.sha256(text).hexdigest() != match[2] or not isinstance(spec, dict) or _canonical(spec) != text:
        raise MedsiloError(f"job: the encoded spec does not match its digest (changed after it was built); {fix}")
    return spec


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
