"""MONAI transforms for both modalities: resize, normalise, augment, and H&E stain augmentation.

Images enter as ``(C, H, W)`` float32 in [0, 1] (see :mod:`.readers`). Deterministic preprocessing
(:func:`preprocess`) runs once per image when a dataset is loaded; random augmentation
(:func:`augmentation`) runs per sample during training, still in [0, 1]; :func:`normalize` then maps
[0, 1] to roughly zero mean, unit spread, the same way at every site (a fixed map, not per-image
statistics, so a hospital's contrast differences remain visible to the model, as they are in reality).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from monai.transforms import RandomizableTransform

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


def augmentation(
    modality: str, seed: int | None = None, image_size: int | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Training-time random augmentation for ``modality`` (``cxr`` or ``pathology``), on [0, 1] images.

    * ``cxr``: small rotation/scale/shift, gamma and Gaussian noise (no flips: the heart's side is
      anatomy, and the laterality marker would lie).
    * ``pathology``: flips, 90° rotations (tissue has no orientation) and H&E stain jitter.

    Args:
        modality: which recipe.
        seed: seeds the transforms' own generators (the global RNG is never touched).
        image_size: square input side, when known: lets the affine transform reuse its sampling grid.
    """
    from monai.transforms import (
        Compose,
        RandAdjustContrast,
        RandAffine,
        RandFlip,
        RandGaussianNoise,
        RandRotate90,
    )

    recipes: dict[str, Callable[[], list]] = {
        "cxr": lambda: [
            RandAffine(prob=0.5, rotate_range=(0.09,), scale_range=(0.06, 0.06), translate_range=(2, 2),
                       padding_mode="zeros", cache_grid=image_size is not None,
                       spatial_size=(image_size, image_size) if image_size else None),
            RandAdjustContrast(prob=0.3, gamma=(0.8, 1.25)),
            RandGaussianNoise(prob=0.2, std=0.02),
        ],
        "pathology": lambda: [
            RandFlip(prob=0.5, spatial_axis=0),
            RandFlip(prob=0.5, spatial_axis=1),
            RandRotate90(prob=0.5),
            RandHEDJitter(prob=0.8),
        ],
    }  # fmt: skip
    if modality not in recipes:
        raise ValueError(f"modality: must be one of {sorted(recipes)}, got {modality!r}")
    compose = Compose(recipes[modality]())
    compose.set_random_state(seed=seed)
    return compose
