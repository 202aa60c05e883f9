"""MONAI transforms: resize, normalise, the job's training augmentation, and H&E stain augmentation.

Images enter as ``(C, H, W)`` float32 in [0, 1] (see :mod:`.readers`). Deterministic preprocessing
(:func:`preprocess`) runs once per image when a dataset is loaded; the job's random augmentation
(:func:`build_augmentation` of ``training.augmentation``, names from the allow-list in
:mod:`medsilo.config.augment`) runs per sample during training; :func:`normalize` then maps
[0, 1] to roughly zero mean, unit spread, the same way at every site (a fixed map, not per-image
statistics, so a hospital's contrast differences remain visible to the model, as they are in reality).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.transforms import RandomizableTransform

from medsilo.config.augment import RGB_ONLY
from medsilo.errors import DataError
from medsilo.medical.synth.pathology import E_VECTOR, H_VECTOR

NORM_CENTER, NORM_SCALE = 0.5, 0.25


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Map [0, 1] intensities to ``(x − 0.5) / 0.25`` (any shape)."""
    return (x - NORM_CENTER) / NORM_SCALE


def preprocess(image_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """Resize so the longer side is ``image_size`` (area averaging) and zero-pad to a square.

    Returns:
        A MONAI ``Compose`` mapping ``(C, H, W)`` to ``(C, image_size, image_size)``.
    """
    from monai.transforms import Compose, Resize, SpatialPad

    return Compose(
        [
            Resize(spatial_size=image_size, size_mode="longest", mode="area"),
            SpatialPad(spatial_size=(image_size, image_size), mode="constant"),
        ]
    )


class RandHEDJitter(RandomizableTransform):
    """Random H&E stain augmentation in optical-density space (Tellez et al., 2018,
    `arXiv:1808.05896 <https://arxiv.org/abs/1808.05896>`_).

    The RGB patch is unmixed into haematoxylin, eosin and a residual channel with the
    Ruifrok–Johnston vectors; each channel's density is scaled by U(1−σ, 1+σ) and shifted by
    U(−b, b); the patch is mixed back. It mimics lab-to-lab stain variation.

    Args:
        prob: probability of applying the jitter to a sample.
        sigma: scale range half-width.
        bias: shift range half-width (optical-density units).
    """

    def __init__(self, prob: float = 0.8, sigma: float = 0.05, bias: float = 0.02):
        if not 0 <= prob <= 1:
            raise ValueError(f"prob: must be in [0, 1], got {prob}")
        if sigma < 0 or bias < 0:
            raise ValueError(f"sigma and bias must be ≥ 0, got sigma={sigma}, bias={bias}")
        RandomizableTransform.__init__(self, prob)
        self.sigma, self.bias = sigma, bias
        residual = np.cross(H_VECTOR, E_VECTOR)
        mix = np.stack([H_VECTOR, E_VECTOR, residual / np.linalg.norm(residual)]).astype(np.float32)
        self._mix = torch.from_numpy(mix)  # (3 stains, 3 RGB)
        self._unmix = torch.from_numpy(np.linalg.inv(mix).astype(np.float32))
        self._alpha = torch.ones(3)
        self._beta = torch.zeros(3)

    def randomize(self, data: object = None) -> None:
        """Draw whether to apply, and the per-stain scale and shift."""
        super().randomize(None)
        if self._do_transform:
            self._alpha = torch.from_numpy(self.R.uniform(1 - self.sigma, 1 + self.sigma, 3).astype(np.float32))
            self._beta = torch.from_numpy(self.R.uniform(-self.bias, self.bias, 3).astype(np.float32))

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        """``img``: ``(3, H, W)`` RGB in [0, 1]; returns the same shape and range."""
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        x = torch.as_tensor(img, dtype=torch.float32)
        od = -torch.log(x.clamp_min(1e-3)).reshape(3, -1)  # (3 RGB, HW)
        stains = self._unmix.T @ od  # (3 stains, HW)
        stains = stains * self._alpha[:, None] + self._beta[:, None]
        return torch.exp(-(self._mix.T @ stains)).reshape(x.shape).clamp(0, 1)


def _affine(step, image_size: int | None):
    from monai.transforms import RandAffine

    # the sampling grid is cached when the image size is known (the same images every call)
    return RandAffine(prob=step.prob, rotate_range=(step.rotate_range,), scale_range=(step.scale_range,) * 2,
                      translate_range=(step.translate_range,) * 2, shear_range=(step.shear_range,) * 2
                      if step.shear_range else None, padding_mode=step.padding_mode,
                      cache_grid=image_size is not None,
                      spatial_size=(image_size, image_size) if image_size else None)  # fmt: skip


def _builders() -> dict[str, Callable]:
    """Transform name (:data:`medsilo.config.augment.STEPS`) → ``(step, image_size) -> transform``."""
    from monai import transforms as mt

    return {
        "RandAffine": _affine,
        "RandFlip": lambda s, _: mt.RandFlip(prob=s.prob, spatial_axis=s.spatial_axis),
        "RandRotate90": lambda s, _: mt.RandRotate90(prob=s.prob, max_k=s.max_k),
        "RandZoom": lambda s, _: mt.RandZoom(prob=s.prob, min_zoom=s.min_zoom, max_zoom=s.max_zoom, keep_size=True),
        "RandAdjustContrast": lambda s, _: mt.RandAdjustContrast(prob=s.prob, gamma=tuple(s.gamma)),
        "RandGaussianNoise": lambda s, _: mt.RandGaussianNoise(prob=s.prob, std=s.std),
        "RandScaleIntensity": lambda s, _: mt.RandScaleIntensity(factors=s.factors, prob=s.prob),
        "RandShiftIntensity": lambda s, _: mt.RandShiftIntensity(offsets=s.offsets, prob=s.prob),
        "RandGaussianSmooth": lambda s, _: mt.RandGaussianSmooth(sigma_x=tuple(s.sigma), sigma_y=tuple(s.sigma),
                                                                 prob=s.prob),
        "RandHEDJitter": lambda s, _: RandHEDJitter(prob=s.prob, sigma=s.sigma, bias=s.bias),
    }  # fmt: skip


def build_augmentation(
    steps: Sequence, *, channels: int, seed: int | None = None, image_size: int | None = None
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The training-time transform for resolved ``steps`` (:func:`medsilo.config.augment.resolve`), on
    ``(C, S, S)`` images in [0, 1]; ``None`` when there are no steps (the exact preprocessed pixels).

    Args:
        steps: validated transform entries, applied in order.
        channels: the images' channel count (RGB-only transforms need 3).
        seed: seeds the transforms' own generators (the global RNG is never touched).
        image_size: square input side, when known: lets the affine transform reuse its sampling grid.

    Raises:
        DataError: an RGB-only transform (H&E jitter) for images with one channel.
    """
    from monai.transforms import Compose

    if not steps:
        return None
    rgb_only = sorted({s.transform for s in steps} & RGB_ONLY)
    if rgb_only and channels != 3:
        raise DataError(f"training.augmentation: {', '.join(rgb_only)} needs RGB images, but this site's images "
                        f"have {channels} channel(s)")  # fmt: skip
    builders = _builders()
    compose = Compose([builders[s.transform](s, image_size) for s in steps])
    compose.set_random_state(seed=seed)
    return compose
