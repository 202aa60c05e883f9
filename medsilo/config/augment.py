"""Training augmentation as a job chooses it: ``training.augmentation`` (the vocabulary, no code).

A job names its augmentation with one of::

    augmentation: default        # the modality's recipe below (chest X-ray, pathology; none for `image`)
    augmentation: none           # the exact preprocessed pixels, every epoch
    augmentation:                # a list of transforms from the allow-list, applied in order
      - {transform: RandAffine, prob: 0.5, rotate_range: 0.1, translate_range: 2}
      - {transform: RandGaussianNoise, prob: 0.2, std: 0.02}

Each list entry names a transform of :data:`STEPS` by its MONAI class name (``RandHEDJitter`` is medsilo's
H&E stain jitter) and sets some of its parameters; anything else — another transform, an unknown or
out-of-range parameter — is refused when the spec is validated, with the usual one-line error naming
``training.augmentation.<index>``. The names map to transforms installed at every site
(:func:`medsilo.medical.data.transforms.build_augmentation`): no code travels with a job.

Transforms run on one training image ``(C, S, S)`` in [0, 1] after resizing, before the fixed
normalisation, with a generator re-seeded per (site, round), so runs repeat exactly. Validation and
test images are never augmented. :func:`resolve` turns a choice into the explicit list that ran; it is
written into ``results.json``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, ConfigDict, Discriminator, Field, Tag, model_validator

from medsilo.config.common import Strict
from medsilo.errors import did_you_mean

Prob = Annotated[float, Field(ge=0, le=1)]
Gamma = Annotated[float, Field(gt=0, le=5)]
Sigma = Annotated[float, Field(gt=0, le=8)]
MAX_STEPS = 16
"""Most transforms a recipe may list."""


class _Step(Strict):
    """One transform; ``prob`` is the chance it is applied to a given image. Every parameter is finite and
    bounded: a job's recipe runs at every site, on every training image, so it must not be able to make one
    image cost seconds or gigabytes (a Gaussian blur's kernel grows with σ, a shift with its range)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    prob: Prob = 0.5


def _ordered(pair: tuple[float, float], name: str) -> None:
    """Refuse a ``[low, high]`` pair with low > high."""
    if pair[0] > pair[1]:
        raise ValueError(f"{name}: [low, high] needs low ≤ high, got [{pair[0]}, {pair[1]}]")


class RandAffine(_Step):
    """Random rotation, scaling, shift and shear in one resampling (zeros outside the image by default).

    Attributes:
        rotate_range: rotation angle drawn from [−r, r], radians (≤ π).
        scale_range: each axis scaled by 1 + U(−s, s) (s < 1).
        translate_range: shift per axis drawn from [−t, t], pixels.
        shear_range: shear factor per axis from [−h, h] (h < 1).
        padding_mode: ``zeros``, ``border`` or ``reflection``.
    """

    transform: Literal["RandAffine"] = "RandAffine"
    rotate_range: float = Field(default=0.0, ge=0, le=math.pi)
    scale_range: float = Field(default=0.0, ge=0, lt=1)
    translate_range: float = Field(default=0.0, ge=0, le=512)
    shear_range: float = Field(default=0.0, ge=0, lt=1)
    padding_mode: Literal["zeros", "border", "reflection"] = "zeros"


class RandFlip(_Step):
    """Mirror the image along ``spatial_axis`` (0: rows, upside down; 1: columns, left–right)."""

    transform: Literal["RandFlip"] = "RandFlip"
    spatial_axis: Literal[0, 1] = 0


class RandRotate90(_Step):
    """Rotate by k·90° with k drawn from 1 … ``max_k``."""

    transform: Literal["RandRotate90"] = "RandRotate90"
    max_k: int = Field(default=3, ge=1, le=3)


class RandZoom(_Step):
    """Zoom by a factor from [``min_zoom``, ``max_zoom``], keeping the image size."""

    transform: Literal["RandZoom"] = "RandZoom"
    min_zoom: float = Field(default=0.9, gt=0, le=1)
    max_zoom: float = Field(default=1.1, ge=1, le=4)


class RandAdjustContrast(_Step):
    """Gamma: intensity ``x`` becomes ``x**γ`` (rescaled to its range), γ from ``gamma`` = [low, high]."""

    transform: Literal["RandAdjustContrast"] = "RandAdjustContrast"
    gamma: tuple[Gamma, Gamma] = (0.8, 1.25)

    @model_validator(mode="after")
    def _low_high(self) -> RandAdjustContrast:
        _ordered(self.gamma, "gamma")
        return self


class RandGaussianNoise(_Step):
    """Add Gaussian noise whose standard deviation is drawn from [0, ``std``]."""

    transform: Literal["RandGaussianNoise"] = "RandGaussianNoise"
    std: float = Field(default=0.02, ge=0, le=1)


class RandScaleIntensity(_Step):
    """Multiply intensities by 1 + U(−f, f), f = ``factors`` (contrast-like brightness scaling)."""

    transform: Literal["RandScaleIntensity"] = "RandScaleIntensity"
    factors: float = Field(default=0.1, ge=0, lt=1)


class RandShiftIntensity(_Step):
    """Add U(−o, o), o = ``offsets``, to every intensity (brightness)."""

    transform: Literal["RandShiftIntensity"] = "RandShiftIntensity"
    offsets: float = Field(default=0.05, ge=0, le=1)


class RandGaussianSmooth(_Step):
    """Blur with a Gaussian whose σ (pixels) is drawn from ``sigma`` = [low, high]."""

    transform: Literal["RandGaussianSmooth"] = "RandGaussianSmooth"
    sigma: tuple[Sigma, Sigma] = (0.25, 1.0)

    @model_validator(mode="after")
    def _low_high(self) -> RandGaussianSmooth:
        _ordered(self.sigma, "sigma")
        return self


class RandHEDJitter(_Step):
    """H&E stain jitter (RGB only): each stain's optical density scaled by U(1 ± ``sigma``), shifted by
    U(± ``bias``) — lab-to-lab stain variation (:class:`medsilo.medical.data.transforms.RandHEDJitter`)."""

    transform: Literal["RandHEDJitter"] = "RandHEDJitter"
    prob: Prob = 0.8
    sigma: float = Field(default=0.05, ge=0, lt=1)
    bias: float = Field(default=0.02, ge=0, le=1)


STEPS: dict[str, type[_Step]] = {
    cls.__name__: cls
    for cls in (RandAffine, RandFlip, RandRotate90, RandZoom, RandAdjustContrast, RandGaussianNoise,
                RandScaleIntensity, RandShiftIntensity, RandGaussianSmooth, RandHEDJitter)
}  # fmt: skip
"""The allow-list: transform name → its parameters. Nothing outside it can be named in a job."""

RGB_ONLY = frozenset({"RandHEDJitter"})
"""Transforms that need three (RGB) channels."""



def _known_transform(value: Any) -> Any:
    """Refuse, with the allow-list in the message, an entry that names no transform or an unknown one."""
    if not isinstance(value, dict):
        raise ValueError("must be a mapping such as {transform: RandFlip, prob: 0.5}")
    name = value.get("transform")
    if name is not None and not isinstance(name, str):
        raise ValueError(f"transform: must be a transform name, got {type(name).__name__}")
    if name is None:
        raise ValueError(f"needs 'transform:', one of {', '.join(STEPS)}")
    if name not in STEPS:
        raise ValueError(f"unknown transform {name!r}; {did_you_mean(str(name), STEPS)}choose from {', '.join(STEPS)}")
    return value


# Tags start with "choice:", which config error messages leave out of field names (medsilo.config.loading).
Step = Annotated[
    Union[tuple(Annotated[cls, Tag(f"choice:{name}")] for name, cls in STEPS.items())],  # noqa: UP007
    Discriminator(lambda value: f"choice:{value['transform']}" if isinstance(value, dict) else None),
    BeforeValidator(_known_transform),
]


def _choice_tag(value: Any) -> str:
    return "choice:name" if isinstance(value, str) else "choice:steps"


AugmentationChoice = Annotated[
    Union[Annotated[Literal["default", "none"], Tag("choice:name")],  # noqa: UP007
          Annotated[list[Step], Field(max_length=MAX_STEPS), Tag("choice:steps")]],
    Discriminator(_choice_tag),
]
"""``default``, ``none`` or a list of :data:`STEPS` entries. Only the branch the value's type selects is
validated, so a wrong entry gives one error, not one per alternative."""

DEFAULTS: dict[str, tuple[_Step, ...]] = {
    # a small rotation/scale/shift, gamma and noise; no flips: the heart's side is anatomy, and the
    # laterality marker would lie
    "cxr": (
        RandAffine(prob=0.5, rotate_range=0.09, scale_range=0.06, translate_range=2),
        RandAdjustContrast(prob=0.3, gamma=(0.8, 1.25)),
        RandGaussianNoise(prob=0.2, std=0.02),
    ),
    # tissue has no orientation: flips and 90° rotations, and the stain varies from lab to lab
    "pathology": (
        RandFlip(prob=0.5, spatial_axis=0),
        RandFlip(prob=0.5, spatial_axis=1),
        RandRotate90(prob=0.5),
        RandHEDJitter(prob=0.8),
    ),
    # generic images: nothing is known about what a transform would change, so nothing by default
    "image": (),
}
"""``augmentation: default`` per modality."""


def resolve(choice: str | list | tuple, modality: str) -> tuple[_Step, ...]:
    """The transforms ``choice`` means for ``modality``, in order (``()`` for ``none``)."""
    if choice == "default":
        return DEFAULTS[modality]
    if choice == "none":
        return ()
    return tuple(choice)


def describe(steps: tuple[_Step, ...]) -> list[dict[str, Any]]:
    """JSON form of resolved steps (every parameter written out), as ``results.json`` records them."""
    return [step.model_dump(mode="json") for step in steps]
