"""MONAI preprocessing and augmentation, and the H&E stain jitter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsilo.config.augment import RGB_ONLY, STEPS, RandFlip, RandGaussianNoise, resolve
from medsilo.errors import DataError
from medsilo.medical.data.transforms import RandHEDJitter, build_augmentation, normalize, preprocess


def test_preprocess_keeps_aspect_and_pads_to_a_square():
    img = np.zeros((1, 40, 80), dtype=np.float32)
    img[:, :20, :] = 1.0  # top half bright
    out = np.asarray(preprocess(16)(img))
    assert out.shape == (1, 16, 16)
    # 40x80 -> 8x16, padded with 4 rows of zeros above and below
    assert np.allclose(out[0, :4], 0) and np.allclose(out[0, -4:], 0)
    assert np.allclose(out[0, 4:8], 1) and np.allclose(out[0, 8:12], 0)


def test_normalize_is_a_fixed_affine_map():
    x = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(normalize(x), torch.tensor([-2.0, 0.0, 2.0]))


def test_hed_jitter_without_change_is_identity_and_stays_in_range():
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.uniform(0.05, 1.0, (3, 8, 8)).astype(np.float32))
    same = RandHEDJitter(prob=1.0, sigma=0.0, bias=0.0)(img)
    torch.testing.assert_close(same, img, atol=1e-4, rtol=1e-4)  # unmix then mix back
    jitter = RandHEDJitter(prob=1.0, sigma=0.3, bias=0.1)
    jitter.set_random_state(1)
    out = jitter(img)
    assert out.shape == img.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert not torch.allclose(out, img, atol=1e-3)


def test_hed_jitter_changes_haematoxylin_only_when_eosin_fixed():
    from medsilo.medical.synth.pathology import E_VECTOR, H_VECTOR

    # a pure-haematoxylin pixel: OD = 0.8 * h; scaling the H channel by a scales its OD by a
    od = 0.8 * H_VECTOR
    img = torch.from_numpy(np.exp(-od).astype(np.float32)).reshape(3, 1, 1)
    t = RandHEDJitter(prob=1.0, sigma=0.2, bias=0.0).set_random_state(3)
    out = t(img)
    od_out = -np.log(out.reshape(3).numpy())
    scale = od_out / od
    assert np.allclose(scale, scale[0], atol=1e-3)  # same factor on R, G, B: only the H amount changed
    assert 0.8 <= scale[0] <= 1.2 and not np.isclose(scale[0], 1.0)
    assert E_VECTOR.shape == (3,)


def test_augmentation_is_reproducible_per_seed():
    img = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    steps = resolve("default", "pathology")
    a = build_augmentation(steps, channels=3, seed=4)(img)
    b = build_augmentation(steps, channels=3, seed=4)(img)
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b))


def test_none_and_the_image_default_build_no_transform():
    assert build_augmentation(resolve("none", "cxr"), channels=1) is None
    assert build_augmentation(resolve("default", "image"), channels=3) is None


def test_a_listed_transform_is_applied_exactly():
    img = torch.arange(16.0).reshape(1, 4, 4) / 16
    flip = build_augmentation([RandFlip(prob=1.0, spatial_axis=1)], channels=1, seed=0)
    torch.testing.assert_close(torch.as_tensor(flip(img)).as_subclass(torch.Tensor), img.flip(-1))
    never = build_augmentation([RandFlip(prob=0.0), RandGaussianNoise(prob=0.0, std=0.5)], channels=1, seed=0)
    torch.testing.assert_close(torch.as_tensor(never(img)).as_subclass(torch.Tensor), img)


@pytest.mark.parametrize("name", sorted(STEPS))
def test_every_allow_listed_transform_builds_and_keeps_the_shape(name):
    channels = 3 if name in RGB_ONLY else 1
    img = torch.rand(channels, 12, 12, generator=torch.Generator().manual_seed(2))
    transform = build_augmentation([STEPS[name](prob=1.0)], channels=channels, seed=1, image_size=12)
    out = torch.as_tensor(transform(img))
    assert out.shape == img.shape and torch.isfinite(out).all()


def test_an_rgb_only_transform_on_grayscale_images_is_refused():
    with pytest.raises(DataError, match="RandHEDJitter needs RGB images, but this site's images have 1 channel"):
        build_augmentation([STEPS["RandHEDJitter"]()], channels=1)
