"""Image generators for FedKTL's server: fixed maps from latent vectors to images, offline by default.

FedKTL (``components/algorithms/fedktl.py``) needs from its generator only a *fixed* pairing of latent
vectors and images: the server aligns the sites' prototypes with the generator's latent distribution,
decodes one latent per class into an image and sends the image–latent pairs to the sites, whose
feature extractors learn to map each image back to its latent. Whether the images look like the
sites' classes is irrelevant by design (``shared/reference/algorithms.md`` §4.3), so a randomly
initialised, seeded decoder serves when no pretrained generator can be downloaded.

The protocol (:class:`Generator`), with ``n`` latents, latent dimension ``L`` and image side ``S``:

* ``latent_dim`` (``L``) and ``image_size`` (``S``): plain ints.
* ``sample_latents(n, generator) -> (n, L)`` float32: draws from the latent distribution
  ``W_rand`` that the server's MMD term aligns to (StyleGAN: the mapping network applied to Gaussian
  ``z``). ``generator`` is a ``torch.Generator`` (or ``None`` for torch's global one).
* ``__call__(w) -> (n, 3, S, S)`` float32 in [0, 1]: decodes latents ``w`` ``(n, L)``.

Backends, chosen by :func:`load_generator` from FedKTL's ``generator`` setting:

* ``"offline"`` → :class:`OfflineGenerator`: a seeded random mapping MLP and a small
  transposed-convolution decoder, never trained, nothing downloaded. Same seed, same images, on
  every machine.
* a path ending in ``.pt`` → :class:`TorchScriptGenerator`: a user-supplied TorchScript file.

Plugging in a real pretrained generator (StyleGAN2/3, StyleGAN-XL, a VAE decoder …): wrap it in a
module with the signature below, script it on a machine that has the weights, and give the job the
path of the saved file (it must exist on the *server*; sites never load it)::

    class Exported(torch.nn.Module):
        def __init__(self, G):                      # G: the pretrained StyleGAN generator
            super().__init__()
            self.G = G
            self.latent_dim = G.w_dim               # int attribute: L
            self.image_size = G.img_resolution      # int attribute: S
            self.z_dim = G.z_dim                    # int attribute, optional (default L)

        def forward(self, w: torch.Tensor) -> torch.Tensor:   # (n, L) -> (n, 3, S, S) in [0, 1]
            ws = w.unsqueeze(1).repeat(1, self.G.num_ws, 1)   # the same w at every style layer
            return (self.G.synthesis(ws) + 1) / 2

        @torch.jit.export
        def mapping(self, z: torch.Tensor) -> torch.Tensor:   # optional: (n, z_dim) -> (n, L)
            return self.G.mapping(z, None)[:, 0]

    torch.jit.script(Exported(G)).save("stylegan.pt")   # or torch.jit.trace(...) for forward only

Without an exported ``mapping`` method, ``W_rand`` is the standard Gaussian in ``L`` dimensions (the
right choice for diffusion-style initial-noise latents). Without the int attributes (say, a traced
plain ``nn.Sequential``), a sidecar JSON next to the file, ``stylegan.json`` for ``stylegan.pt``, gives
``{"latent_dim": L, "image_size": S}`` (and optionally ``"z_dim"``). The file is checked when it
loads: a probe batch must come out as ``(2, 3, S, S)``; outputs are clamped to [0, 1].

TorchScript is deprecated in favour of ``torch.export`` (``torch.jit.load`` warns so in the pinned
torch 2.13) but still loads; the loader silences that deprecation warning. A ``torch.export`` backend would be
one more class with this protocol.

Loading a TorchScript file runs code from that file on the server: use only files you produced or
trust (TorchScript is restricted to tensor programs, but is not a sandbox).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn import functional as F

from medsilo.errors import MedsiloError, did_you_mean

OFFLINE = "offline"
"""Name of the built-in, download-free generator."""

TORCHSCRIPT_SUFFIX = ".pt"
"""File suffix that selects :class:`TorchScriptGenerator`."""

PROBE_BATCH = 2
"""Latents pushed through a loaded TorchScript generator to check its output shape."""


class GeneratorError(MedsiloError):
    """A generator that cannot be used: unknown name, missing or corrupt file, wrong shapes."""


@runtime_checkable
class Generator(Protocol):
    """What FedKTL's server needs from a generator (shapes in the module docstring)."""

    latent_dim: int
    image_size: int

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws ``(n, latent_dim)`` from the latent distribution ``W_rand``."""
        ...

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        """Images ``(n, 3, image_size, image_size)`` in [0, 1] for latents ``w`` ``(n, latent_dim)``."""
        ...


def check_spec(spec: str) -> str:
    """Validate a generator setting: ``"offline"`` or a path ending in ``.pt``; returns it unchanged.

    Raises:
        ValueError: anything else (with a suggestion when the name is close to ``offline``).
    """
    if spec == OFFLINE or str(spec).endswith(TORCHSCRIPT_SUFFIX):
        return spec
    raise ValueError(
        f"generator: must be '{OFFLINE}' or a path to a TorchScript file ending in '{TORCHSCRIPT_SUFFIX}', "
        f"got {spec!r}; {did_you_mean(spec, [OFFLINE])}".rstrip("; ")
    )


def load_generator(spec: str, *, latent_dim: int = 64, image_size: int = 32, seed: int = 0) -> Generator:
    """The generator a setting names.

    Args:
        spec: ``"offline"`` or the path of a TorchScript file ending in ``.pt``.
        latent_dim: ``L`` of the offline generator (a TorchScript file declares its own).
        image_size: ``S`` of the offline generator (a TorchScript file declares its own).
        seed: weights of the offline generator.

    Returns:
        an :class:`OfflineGenerator` or a :class:`TorchScriptGenerator`.

    Raises:
        GeneratorError: an unknown name, or a TorchScript file that is missing, corrupt or of the wrong
            shape (the message names the file).
    """
    try:
        check_spec(spec)
    except ValueError as exc:
        raise GeneratorError(str(exc)) from None
    if spec == OFFLINE:
        return OfflineGenerator(latent_dim=latent_dim, image_size=image_size, seed=seed)
    return TorchScriptGenerator(spec)


class OfflineGenerator:
    """A fixed, seeded, randomly initialised generator: no training, no download.

    ``W_rand`` is ``mapping(z)`` with ``z ~ N(0, I_L)`` and ``mapping`` three ``Linear(L, L)`` layers
    with LeakyReLU(0.2) between them, He-initialised so that ``w`` has roughly unit variance per entry
    (the MMD bandwidths of FedKTL, 10–50 on squared distances, then see distances of order ``2L``).
    The decoder is ``Linear(L, 64·4·4)``, then transposed convolutions (kernel 4, stride 2) doubling
    the side from 4 until it reaches ``S`` (channels 64, 32, 16, 16 …), a 3×3 convolution to RGB, a
    bilinear resize when ``S`` is not 4·2^k, and a per-image standardisation followed by a sigmoid,
    so every image spreads over [0, 1] whatever the random weights. Decoder weights are He-normal and
    its biases zero (random biases would paint one pattern common to every latent), so different
    latents give visibly different images. No BatchNorm: an image depends on its own latent only.

    Args:
        latent_dim: ``L`` ≥ 2.
        image_size: ``S`` ≥ 4.
        seed: all weights depend only on it; the caller's global torch RNG state is left unchanged.

    Raises:
        ValueError: ``latent_dim`` or ``image_size`` out of range.
    """

    def __init__(self, latent_dim: int = 64, image_size: int = 32, seed: int = 0):
        if not isinstance(latent_dim, int) or latent_dim < 2:
            raise ValueError(f"latent_dim: must be an integer ≥ 2, got {latent_dim!r}")
        if not isinstance(image_size, int) or image_size < 4:
            raise ValueError(f"image_size: must be an integer ≥ 4, got {image_size!r}")
        self.latent_dim = latent_dim
        self.image_size = image_size
        self.seed = seed
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            self.mapping = _mapping(latent_dim)
            self.decoder = _Decoder(latent_dim, image_size)
        for module in (self.mapping, self.decoder):
            module.eval().requires_grad_(False)

    @torch.no_grad()
    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` latents ``(n, L)`` float32 from ``W_rand`` (``generator`` draws ``z``)."""
        return self.mapping(torch.randn(n, self.latent_dim, generator=generator))

    @torch.no_grad()
    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        """Images ``(n, 3, S, S)`` float32 in [0, 1] for latents ``w`` ``(n, L)``.

        Raises:
            ValueError: ``w`` is not ``(n, L)``.
        """
        _check_latents(w, self.latent_dim, "offline generator")
        return self.decoder(w.float())

    def __repr__(self) -> str:
        return (
            f"OfflineGenerator(latent_dim={self.latent_dim}, image_size={self.image_size}, seed={self.seed})"
        )


class TorchScriptGenerator:
    """A generator loaded from a user-supplied TorchScript file (signature in the module docstring).

    Args:
        path: the ``.pt`` file written by ``torch.jit.script(module).save(path)`` (or ``trace``).

    Attributes:
        path: the file.
        latent_dim, image_size: from the module's int attributes, else from the sidecar JSON.
        z_dim: input size of the exported ``mapping`` method (default ``latent_dim``).

    Raises:
        GeneratorError: the file is missing, is not TorchScript, declares no sizes, or maps a probe
            batch ``(2, L)`` to anything but ``(2, 3, S, S)``; every message names the file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise GeneratorError(
                f"generator file {self.path}: not found; FedKTL's 'generator' must be '{OFFLINE}' or the path "
                "of a TorchScript file on the server"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore", DeprecationWarning
                )  # TorchScript is deprecated, still supported
                self.module = torch.jit.load(str(self.path), map_location="cpu")
        except (RuntimeError, ValueError, OSError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GeneratorError(
                f"generator file {self.path}: not a TorchScript module ({first_line}); save it with "
                "torch.jit.script(module).save(path), not torch.save"
            ) from None
        self.module.eval()
        sizes = self._sizes()
        self.latent_dim, self.image_size = sizes["latent_dim"], sizes["image_size"]
        self.z_dim = sizes.get("z_dim", self.latent_dim)
        self.has_mapping = hasattr(self.module, "mapping")
        self._probe()

    def _sizes(self) -> dict[str, int]:
        """``latent_dim``, ``image_size`` (and ``z_dim`` if given) from attributes or the sidecar."""
        sizes = {
            k: getattr(self.module, k)
            for k in ("latent_dim", "image_size", "z_dim")
            if hasattr(self.module, k)
        }
        sidecar = self.path.with_suffix(".json")
        if not {"latent_dim", "image_size"} <= set(sizes) and sidecar.is_file():
            try:
                declared = json.loads(sidecar.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise GeneratorError(f"generator sidecar {sidecar}: unreadable JSON ({exc})") from None
            if not isinstance(declared, dict):
                raise GeneratorError(f"generator sidecar {sidecar}: must be a JSON object")
            sizes = {**declared, **sizes}
        for key in ("latent_dim", "image_size"):
            if key not in sizes:
                raise GeneratorError(
                    f"generator file {self.path}: declares no '{key}'; give the module an int attribute "
                    f'\'{key}\' or write {sidecar.name} with {{"latent_dim": L, "image_size": S}}'
                )
        for key, value in sizes.items():
            minimum = 4 if key == "image_size" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise GeneratorError(
                    f"generator file {self.path}: {key} must be an integer ≥ {minimum}, got {value!r}"
                )
        return sizes

    def _probe(self) -> None:
        """Check the output shape on a fixed probe batch ``(2, L)``."""
        w = torch.randn(PROBE_BATCH, self.latent_dim, generator=torch.Generator().manual_seed(0))
        expected = (PROBE_BATCH, 3, self.image_size, self.image_size)
        try:
            out = self._forward(w)
        except RuntimeError as exc:
            raise GeneratorError(
                f"generator file {self.path}: failed on latents of shape {tuple(w.shape)} ({exc})"
            ) from None
        if tuple(out.shape) != expected:
            raise GeneratorError(
                f"generator file {self.path}: latents {tuple(w.shape)} gave images of shape {tuple(out.shape)}, "
                f"expected {expected} (latent_dim={self.latent_dim}, image_size={self.image_size})"
            )
        if self.has_mapping:
            z = torch.randn(PROBE_BATCH, self.z_dim, generator=torch.Generator().manual_seed(0))
            try:
                mapped = self.module.mapping(z)
            except RuntimeError as exc:
                raise GeneratorError(
                    f"generator file {self.path}: mapping failed on z of shape {tuple(z.shape)} ({exc})"
                ) from None
            if not isinstance(mapped, torch.Tensor) or tuple(mapped.shape) != (PROBE_BATCH, self.latent_dim):
                shape = tuple(mapped.shape) if isinstance(mapped, torch.Tensor) else type(mapped).__name__
                raise GeneratorError(
                    f"generator file {self.path}: mapping of z {tuple(z.shape)} gave {shape}, "
                    f"expected ({PROBE_BATCH}, {self.latent_dim})"
                )

    @torch.no_grad()
    def _forward(self, w: torch.Tensor) -> torch.Tensor:
        out = self.module(w)
        if not isinstance(out, torch.Tensor):
            raise GeneratorError(
                f"generator file {self.path}: forward returned {type(out).__name__}, not a tensor"
            )
        return out.float()

    @torch.no_grad()
    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` latents ``(n, L)``: the exported ``mapping`` of ``z ~ N(0, I)``, else ``z`` itself."""
        z = torch.randn(n, self.z_dim if self.has_mapping else self.latent_dim, generator=generator)
        return self.module.mapping(z).float() if self.has_mapping else z

    @torch.no_grad()
    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        """Images ``(n, 3, S, S)`` float32, clamped to [0, 1], for latents ``w`` ``(n, L)``.

        Raises:
            ValueError: ``w`` is not ``(n, L)``.
        """
        _check_latents(w, self.latent_dim, f"generator file {self.path}")
        return self._forward(w.float()).clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return f"TorchScriptGenerator({str(self.path)!r}, latent_dim={self.latent_dim}, image_size={self.image_size})"


# ---- offline generator parts ----------------------------------------------------------------------


def _mapping(latent_dim: int) -> nn.Sequential:
    """``z → w``: three ``Linear(L, L)``, LeakyReLU(0.2) between, He-initialised (unit-variance output)."""
    layers = [nn.Linear(latent_dim, latent_dim) for _ in range(3)]
    for i, layer in enumerate(layers):
        gain = math.sqrt(2 / (1 + 0.2**2)) if i < 2 else 1.0
        nn.init.normal_(layer.weight, std=gain / math.sqrt(latent_dim))
        nn.init.zeros_(layer.bias)
    return nn.Sequential(layers[0], nn.LeakyReLU(0.2), layers[1], nn.LeakyReLU(0.2), layers[2])


class _Decoder(nn.Module):
    """``w (n, L) → (n, 3, S, S)`` in [0, 1]; see :class:`OfflineGenerator`."""

    def __init__(self, latent_dim: int, image_size: int, width: int = 64):
        super().__init__()
        self.image_size = image_size
        self.width = width
        self.stem = nn.Linear(latent_dim, width * 4 * 4)
        blocks: list[nn.Module] = []
        side, channels = 4, width
        while side < image_size:
            out = max(channels // 2, 16)
            blocks += [
                nn.ConvTranspose2d(channels, out, kernel_size=4, stride=2, padding=1),
                nn.LeakyReLU(0.2),
            ]
            side, channels = side * 2, out
        self.blocks = nn.Sequential(*blocks)
        self.to_rgb = nn.Conv2d(channels, 3, kernel_size=3, padding=1)
        for layer in self.modules():
            if isinstance(layer, nn.Linear | nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_normal_(layer.weight, a=0.2, nonlinearity="leaky_relu")
                nn.init.zeros_(layer.bias)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.stem(w), 0.2).view(-1, self.width, 4, 4)
        x = self.to_rgb(self.blocks(x))
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)  # fmt: skip
        flat = x.flatten(1)
        z = (flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-6)
        return torch.sigmoid(z).view_as(x)


def _check_latents(w: torch.Tensor, latent_dim: int, who: str) -> None:
    if not isinstance(w, torch.Tensor) or w.ndim != 2 or w.shape[1] != latent_dim:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{who}: expected latents (n, {latent_dim}), got {shape}")


__all__ = [
    "OFFLINE",
    "Generator",
    "GeneratorError",
    "OfflineGenerator",
    "TorchScriptGenerator",
    "check_spec",
    "load_generator",
]
