"""A small pathology patch that declares a huge canvas is refused from its header, before any decoding.

The threat: whoever can put a file into a site's pathology dataset (a slide-scanner export, a shared
folder) writes a PNG of a few KB whose header declares 11000×11000 pixels. Decoded to RGB float32 it
needs 1.35 GiB, per file, on a hospital machine that also trains. Pillow's own guard is no help: it only
warns below twice its global ``Image.MAX_IMAGE_PIXELS`` and any library in the process may change that.
The refusal must be medsilo's, from the header, and the file must be skipped like any unusable file.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsilo.config import read_manifest
from medsilo.errors import DataError
from medsilo.medical.data import LoadPatch, UnreadableImage, load_site_data
from medsilo.medical.data.readers import PATCH_MAX_PIXELS

REFUSAL = "declares 11000×11000 pixels, more than the 16-megapixel limit for pathology patches"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(path: Path, width: int, height: int) -> Path:
    """Write a valid 1-bit grayscale PNG of ``width``×``height`` black pixels.

    The rows are deflated about 1 MB at a time, so neither the test nor the file holds the canvas:
    11000×11000 is a ~15 KB file (1376 bytes a row, compressed about 1000:1).
    """
    row = b"\x00" * (1 + (width + 7) // 8)  # filter type 0, then the row's bits
    per_block = max(1, 2**20 // len(row))
    deflate = zlib.compressobj(9)
    blocks = (deflate.compress(row * min(per_block, height - start)) for start in range(0, height, per_block))
    idat = b"".join(blocks) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    chunks = _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
    return path


class NeverDecode:
    """Stands in for the reader's MONAI loader: records any call, which would be a decode."""

    def __init__(self) -> None:
        self.calls: list[Path] = []

    def __call__(self, path, reader=None):
        self.calls.append(Path(path))
        raise AssertionError(f"{path} was handed to the decoder")


@pytest.fixture
def reader(monkeypatch) -> tuple[LoadPatch, NeverDecode]:
    load = LoadPatch()
    spy = NeverDecode()
    monkeypatch.setattr(load, "_load", spy)
    return load, spy


def test_the_bomb_is_a_valid_png_that_pillow_only_warns_about(tmp_path):
    small = png_bomb(tmp_path / "small.png", 300, 200)
    with Image.open(small) as im:
        im.load()
        assert im.size == (300, 200) and not np.asarray(im).any()  # the same writer makes decodable files
    bomb = png_bomb(tmp_path / "bomb.png", 11000, 11000)
    assert bomb.stat().st_size < 20_000  # 1.35 GiB once decoded to RGB float32
    with pytest.warns(Image.DecompressionBombWarning), Image.open(bomb) as im:
        assert im.size == (11000, 11000)


def test_a_patch_declaring_11000x11000_is_refused_without_decoding(tmp_path, reader):
    load, spy = reader
    bomb = png_bomb(tmp_path / "bomb.png", 11000, 11000)
    limit_before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(UnreadableImage) as info:
        load(bomb)
    assert info.value.path == str(bomb)
    assert info.value.reason == REFUSAL
    assert spy.calls == []
    assert Image.MAX_IMAGE_PIXELS == limit_before  # Pillow's global setting is neither relied on nor changed


@pytest.mark.parametrize(("width", "height"),
                         [(4097, 4096), (PATCH_MAX_PIXELS + 1, 1), (1, PATCH_MAX_PIXELS + 1)])  # fmt: skip
def test_one_pixel_over_the_limit_is_refused_whatever_the_shape(tmp_path, reader, width, height):
    load, spy = reader
    with pytest.raises(UnreadableImage, match=f"declares {height}×{width} pixels, more than the 16-"):
        load(png_bomb(tmp_path / "long.png", width, height))
    assert spy.calls == []


def test_a_canvas_pillow_refuses_outright_is_refused_the_same_way(tmp_path, reader):
    """Above twice Pillow's limit, ``Image.open`` raises instead of warning: still an unusable file."""
    load, spy = reader
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 1
    with pytest.raises(UnreadableImage, match="more pixels than Pillow opens .*16 megapixels at most"):
        load(png_bomb(tmp_path / "huge.png", side, side))
    assert spy.calls == []


def _pathology_site(folder: Path) -> Path:
    """Six 8×8 RGB patches (two classes in each split) and one bomb in train; returns the manifest."""
    folder.mkdir()
    rows = ["path,label,patient_id,split"]
    kinds = [(split, label) for split in ("train", "val", "test") for label in ("normal", "tumor")]
    for i, (split, label) in enumerate(kinds):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(folder / f"p{i}.png")
        rows.append(f"p{i}.png,{label},P{i},{split}")
    png_bomb(folder / "bomb.png", 11000, 11000)
    rows.append("bomb.png,tumor,P9,train")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


def test_the_site_skips_it_as_an_unusable_file_with_its_reason(tmp_path):
    manifest = read_manifest(_pathology_site(tmp_path / "site"), ["normal", "tumor"])
    data = load_site_data(manifest, modality="pathology", image_size=8, max_unreadable_fraction=0.2)
    assert [(Path(f.path).name, f.line, f.reason) for f in data.failures] == [("bomb.png", 8, REFUSAL)]
    assert (len(data.train), len(data.val), len(data.test)) == (2, 2, 2)


def test_it_counts_against_max_unreadable_fraction(tmp_path):
    manifest = read_manifest(_pathology_site(tmp_path / "site"), ["normal", "tumor"])
    counted = r"1 of 7 images \(14%\) could not be used, more than the allowed 5% "
    reason = r"\(data.max_unreadable_fraction\): 1× declares 11000×11000 pixels"
    with pytest.raises(DataError, match=counted + reason):
        load_site_data(manifest, modality="pathology", image_size=8)


def test_a_hostile_image_service_cannot_send_a_bomb_to_pcevolve(tmp_path):
    """A site's PCEvolve HTTP generator gets candidates from a service it does not control: a 4000×4000 PNG
    in the reply is refused from its header, naming the endpoint, before Pillow decodes it."""
    import base64

    from medsilo.errors import MedsiloError
    from medsilo.medical.synth.pcevolve.generators import _unpng64

    data = base64.b64encode(png_bomb(tmp_path / "reply.png", 4000, 4000).read_bytes()).decode()
    with pytest.raises(MedsiloError, match=r"http://service/random: image 0 .* declares 4000×4000 pixels"):
        _unpng64(data, 1, "http://service/random", 0)
    ordinary = tmp_path / "ok.png"
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(ordinary)
    assert _unpng64(base64.b64encode(ordinary.read_bytes()).decode(), 1, "u", 0).shape == (1, 16, 16)
