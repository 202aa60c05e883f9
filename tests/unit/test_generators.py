"""Generator plug-in: the offline generator is fixed and seeded; TorchScript files load or fail by name."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from medsilo.medical.models.generators import (
    Generator,
    GeneratorError,
    OfflineGenerator,
    TorchScriptGenerator,
    load_generator,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")
"""Tests write TorchScript files the way a user would; torch 2.13 warns that TorchScript is deprecated."""


class TinyGenerator(nn.Module):
    """A scriptable generator: latents (n, 8) → images (n, 3, 6, 6), with an exported mapping."""

    def __init__(self, image_side: int = 6):
        super().__init__()
        self.latent_dim = 8
        self.image_size = 6
        self.z_dim = 5
        self.side = image_side
        self.decode = nn.Linear(8, 3 * image_side * image_side)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode(w)).view(-1, 3, self.side, self.side)

    @torch.jit.export
    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([z, z[:, :3]], dim=1) * 0 + 3.0  # (n, 5) -> (n, 8), all 3: easy to recognise


def test_offline_generator_is_a_pure_function_of_its_seed():
    before = torch.random.get_rng_state()
    a, b, other = (
        OfflineGenerator(8, 12, seed=3),
        OfflineGenerator(8, 12, seed=3),
        OfflineGenerator(8, 12, seed=4),
    )
    torch.testing.assert_close(torch.random.get_rng_state(), before)  # nothing global was seeded
    w = a.sample_latents(4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(w, b.sample_latents(4, torch.Generator().manual_seed(0)), rtol=0, atol=0)
    torch.testing.assert_close(a(w), b(w), rtol=0, atol=0)
    assert not torch.allclose(a(w), other(w))
    assert not torch.allclose(w, other.sample_latents(4, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("side", [4, 8, 20])
def test_offline_images_have_the_declared_shape_range_and_depend_on_the_latent(side):
    g = OfflineGenerator(latent_dim=6, image_size=side, seed=0)
    assert isinstance(g, Generator)
    w = g.sample_latents(3, torch.Generator().manual_seed(1))
    x = g(w)
    assert w.shape == (3, 6) and x.shape == (3, 3, side, side) and x.dtype == torch.float32
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert (x[0] - x[1]).abs().mean() > 0.02  # different latents, visibly different images
    torch.testing.assert_close(g(w[:1]), x[:1])  # an image depends on its own latent only


def test_offline_latents_have_roughly_unit_spread():
    w = OfflineGenerator(latent_dim=32, seed=0).sample_latents(2000, torch.Generator().manual_seed(0))
    assert 0.5 < float(w.std(0).mean()) < 2.0


def test_offline_generator_refuses_latents_of_the_wrong_width_and_bad_sizes():
    with pytest.raises(ValueError, match=r"expected latents \(n, 6\), got \(2, 5\)"):
        OfflineGenerator(latent_dim=6)(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="image_size"):
        OfflineGenerator(image_size=2)


def test_torchscript_round_trip(tmp_path):
    module = TinyGenerator()
    path = tmp_path / "tiny.pt"
    torch.jit.script(module).save(str(path))

    g = load_generator(str(path))

    assert isinstance(g, TorchScriptGenerator) and isinstance(g, Generator)
    assert (g.latent_dim, g.image_size, g.z_dim) == (8, 6, 5)
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(g(w), module(w))
    latents = g.sample_latents(4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents, torch.full((4, 8), 3.0))  # the exported mapping was used


def test_traced_file_takes_its_sizes_from_the_sidecar(tmp_path):
    path = tmp_path / "traced.pt"
    plain = nn.Sequential(
        nn.Linear(8, 3 * 6 * 6), nn.Sigmoid(), nn.Unflatten(1, (3, 6, 6))
    )  # no size attributes
    torch.jit.trace(plain, torch.zeros(1, 8)).save(str(path))
    with pytest.raises(GeneratorError, match=r"traced\.pt: declares no 'latent_dim'.*traced\.json"):
        TorchScriptGenerator(path)
    (tmp_path / "traced.json").write_text(json.dumps({"latent_dim": 8, "image_size": 6}))
    g = TorchScriptGenerator(path)
    assert (g.latent_dim, g.image_size, g.has_mapping) == (8, 6, False)
    assert g.sample_latents(2).shape == (2, 8)  # no mapping: standard Gaussian latents


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nowhere.pt"
    with pytest.raises(GeneratorError, match=r"nowhere\.pt: not found"):
        load_generator(str(path))


@pytest.mark.parametrize("content", ["garbage", "state_dict"])
def test_corrupt_or_non_torchscript_file_is_named(tmp_path, content):
    path = tmp_path / "broken.pt"
    if content == "garbage":
        path.write_bytes(b"not a zip archive")
    else:
        torch.save(TinyGenerator().state_dict(), path)  # torch.save, not TorchScript
    with pytest.raises(GeneratorError, match=r"broken\.pt: not a TorchScript module"):
        load_generator(str(path))


def test_wrong_output_shape_is_refused_with_expected_shape(tmp_path):
    path = tmp_path / "wrong.pt"
    torch.jit.script(TinyGenerator(image_side=5)).save(str(path))  # declares 6×6, makes 5×5
    with pytest.raises(GeneratorError, match=r"wrong\.pt: .*\(2, 3, 5, 5\), expected \(2, 3, 6, 6\)"):
        load_generator(str(path))


def test_unknown_generator_name_suggests_offline():
    with pytest.raises(GeneratorError, match="did you mean 'offline'"):
        load_generator("ofline")
    with pytest.raises(GeneratorError, match=r"'offline' or a path .*'\.pt'"):
        load_generator("stylegan-xl")
