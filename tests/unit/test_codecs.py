"""Every transfer syntax a PACS exports for CR/DX decodes through the chest X-ray reader's own pixel path
(:meth:`LoadCXR.decode`, what :meth:`LoadCXR.read` uses), on real files from pydicom's and pydicom-data's test
sets; lossless ones equal their uncompressed originals pixel for pixel; a missing codec is one clear line."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames

from medsilo.medical.data.readers import (
    CODEC_MISSING,
    UNSUPPORTED,
    LoadCXR,
    UnreadableImage,
)
from tests.helpers import write_dicom


@pytest.fixture(scope="module")
def reader():
    return LoadCXR(allow_identifiable=True)  # pydicom's test files carry (fictitious) identifying attributes


def _file(name: str, syntax: str) -> str:
    path = get_testdata_file(name)
    assert path is not None, f"{name} is not in pydicom's or pydicom-data's test files"
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    return path


# (compressed or re-encoded file, its transfer syntax, the uncompressed original it must equal exactly)
LOSSLESS = [
    ("RG1_J2KR.dcm", uid.JPEG2000Lossless, "RG1_UNCR.dcm"),  # a real CR chest radiograph
    ("MR_small_jp2klossless.dcm", uid.JPEG2000Lossless, "MR_small.dcm"),
    ("MR_small_jpeg_ls_lossless.dcm", uid.JPEGLSLossless, "MR_small.dcm"),
    ("emri_small_jpeg_ls_lossless.dcm", uid.JPEGLSLossless, "emri_small.dcm"),  # 10 frames
    ("SC_rgb_jpeg_gdcm.dcm", uid.JPEGLosslessSV1, "SC_rgb.dcm"),
    ("MR_small_RLE.dcm", uid.RLELossless, "MR_small.dcm"),
    ("emri_small_RLE.dcm", uid.RLELossless, "emri_small.dcm"),
    ("MR_small_bigendian.dcm", uid.ExplicitVRBigEndian, "MR_small.dcm"),
    ("MR_small_expb.dcm", uid.ExplicitVRBigEndian, "MR_small.dcm"),
]


@pytest.mark.parametrize(("name", "syntax", "original"), LOSSLESS, ids=[row[0] for row in LOSSLESS])
def test_lossless_syntaxes_equal_their_uncompressed_original(reader, name, syntax, original):
    x, _ = reader.decode(_file(name, syntax))
    y, _ = reader.decode(_file(original, uid.ExplicitVRLittleEndian))
    assert x.shape == y.shape and x.size > 0
    np.testing.assert_array_equal(x, y)


def test_real_cr_in_jpeg2000_reads_like_its_original(reader):
    """The whole chest X-ray path (modality, view, VOI, MONOCHROME1) on the CR radiograph as JPEG 2000."""
    reversible = reader.read(_file("RG1_J2KR.dcm", uid.JPEG2000Lossless))
    original = reader.read(_file("RG1_UNCR.dcm", uid.ExplicitVRLittleEndian))
    assert (reversible.modality, reversible.view) == ("CR", "PA")
    np.testing.assert_array_equal(reversible.pixels, original.pixels)
    irreversible = reader.read(_file("RG1_J2KI.dcm", uid.JPEG2000))
    assert irreversible.pixels.shape == original.pixels.shape == (1, 1955, 1841)
    assert 0 < np.abs(irreversible.pixels - original.pixels).mean() < 0.01  # lossy, but the same image


def test_irreversible_jpeg2000_equals_the_decode_shipped_with_it(reader):
    """pydicom-data ships RG1_UNCI.dcm: RG1_J2KI.dcm decoded by the reference decoder, stored uncompressed."""
    x, _ = reader.decode(_file("RG1_J2KI.dcm", uid.JPEG2000))
    y, _ = reader.decode(_file("RG1_UNCI.dcm", uid.ExplicitVRLittleEndian))
    np.testing.assert_array_equal(x, y)


def _jpeg_ls_near(path: str) -> int:
    """The NEAR parameter of a JPEG-LS frame's first start-of-scan segment (ITU-T T.87 C.2.3)."""
    frame = next(generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=1))
    sos = frame.index(b"\xff\xda")
    components = frame[sos + 4]
    return frame[sos + 5 + 2 * components]


@pytest.mark.parametrize("name", ["SC_rgb_jls_lossy_sample.dcm", "SC_rgb_jls_lossy_line.dcm"])
def test_near_lossless_jpeg_ls_stays_within_near_of_the_original(reader, name):
    path = _file(name, uid.JPEGLSNearLossless)
    near = _jpeg_ls_near(path)
    x, _ = reader.decode(path)
    y, _ = reader.decode(_file("SC_rgb.dcm", uid.ExplicitVRLittleEndian))
    error = np.abs(x - y)
    assert near >= 1 and 0 < error.max() <= near  # lossy, and exactly as lossy as the encoder promised


@pytest.mark.parametrize("name", ["JPEGLSNearLossless_08.dcm", "JPEGLSNearLossless_16.dcm"])
def test_grayscale_near_lossless_jpeg_ls_decodes(reader, name):
    ds = pydicom.dcmread(_file(name, uid.JPEGLSNearLossless))
    x, _ = reader.decode(get_testdata_file(name))
    assert x.shape == (ds.Rows, ds.Columns) and x.min() == 0 and x.max() == 2**ds.BitsStored - 1


def test_jpeg_lossless_process_14_decodes(reader, tmp_path):
    """No file in the test sets is labelled Process 14 (.57) itself; a Selection Value 1 bitstream is a valid
    Process 14 one (its predictor is one of the seven), so the real JPEG-LL.dcm relabelled .57 must decode the same."""
    sv1 = _file("JPEG-LL.dcm", uid.JPEGLosslessSV1)
    ds = pydicom.dcmread(sv1)
    ds.file_meta.TransferSyntaxUID = uid.JPEGLossless
    ds.save_as(tmp_path / "p14.dcm", enforce_file_format=True)
    x, _ = reader.decode(tmp_path / "p14.dcm")
    y, _ = reader.decode(sv1)
    assert x.shape == (1024, 256)
    np.testing.assert_array_equal(x, y)
    eight_bit, _ = reader.decode(_file("JPGLosslessP14SV1_1s_1f_8b.dcm", uid.JPEGLosslessSV1))
    assert eight_bit.shape == (768, 1024) and eight_bit.max() == 255


def test_jpeg_extended_12_bit_is_close_to_the_lossless_copy(reader):
    """JPGExtended.dcm (lossy, 12-bit) and JPEG-LL.dcm (lossless) hold the same NM image."""
    x, _ = reader.decode(_file("JPGExtended.dcm", uid.JPEGExtended12Bit))
    y, _ = reader.decode(_file("JPEG-LL.dcm", uid.JPEGLosslessSV1))
    assert x.shape == y.shape == (1024, 256)
    assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.98
    assert 0 < np.abs(x - y).mean() < 0.02 * (y.max() - y.min())


def test_jpeg_baseline_colour_is_close_to_the_original(reader):
    x, _ = reader.decode(_file("SC_rgb_jpeg_dcmtk.dcm", uid.JPEGBaseline8Bit))
    y, _ = reader.decode(_file("SC_rgb.dcm", uid.ExplicitVRLittleEndian))
    assert x.shape == y.shape and 0 < np.abs(x - y).max() <= 8


def test_grayscale_jpeg_baseline_chest_xray_reads(tmp_path):
    """An 8-bit grayscale CR compressed by a real JPEG encoder (Pillow's libjpeg) goes through the whole reader."""
    rng = np.random.default_rng(0)
    stored = np.clip(np.add.outer(np.arange(48) * 4, np.arange(64) * 2) + rng.integers(0, 4, (48, 64)), 0, 255)
    stored = stored.astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", quality=95)
    path = write_dicom(tmp_path / "baseline.dcm", stored.astype(np.uint16), bits_stored=8, ViewPosition="AP")
    ds = pydicom.dcmread(path)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
    ds.save_as(path, enforce_file_format=True)
    record = LoadCXR().read(path)
    assert record.pixels.shape == (1, 48, 64) and record.view == "AP"
    assert np.abs(record.pixels[0] - stored / 255.0).max() < 0.05


def test_deflated_files_decode(reader, tmp_path):
    x, _ = reader.decode(_file("image_dfl.dcm", uid.DeflatedExplicitVRLittleEndian))
    assert x.shape == (512, 512) and x.max() > x.min()
    ds = pydicom.dcmread(_file("MR_small.dcm", uid.ExplicitVRLittleEndian))
    ds.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    assert (tmp_path / "deflated.dcm").stat().st_size < 0.9 * len(ds.PixelData)  # really deflated
    x, _ = reader.decode(tmp_path / "deflated.dcm")
    y, _ = reader.decode(get_testdata_file("MR_small.dcm"))
    np.testing.assert_array_equal(x, y)


def test_a_transfer_syntax_without_any_image_decoder_is_refused(reader, tmp_path):
    ds = pydicom.dcmread(_file("JPEG-LL.dcm", uid.JPEGLosslessSV1))
    ds.file_meta.TransferSyntaxUID = uid.MPEG2MPML
    ds.save_as(tmp_path / "video.dcm", enforce_file_format=True)
    with pytest.raises(UnreadableImage, match=r"transfer syntax 'MPEG2 Main Profile / Main Level' has no image "
                                              r"decoder") as info:  # fmt: skip
        reader.decode(tmp_path / "video.dcm")
    assert info.value.kind == UNSUPPORTED


def test_a_missing_codec_is_one_line_naming_the_file_the_syntax_and_what_to_install(tmp_path):
    """A machine without the pylibjpeg packages (pydicom alone: the state the issue found) refuses a JPEG
    Lossless chest X-ray in one line, before decoding. Run in a fresh interpreter where the packages cannot be
    imported, because pydicom decides which plugins are available once, at import."""
    ds = pydicom.dcmread(_file("JPEG-LL.dcm", uid.JPEGLosslessSV1))
    ds.Modality = "CR"
    path = tmp_path / "lossless.dcm"
    ds.save_as(path, enforce_file_format=True)
    code = ("import sys\n"
            "for name in ('pylibjpeg', 'libjpeg', 'openjpeg', 'rle'):\n"
            "    sys.modules[name] = None  # as if not installed\n"
            "from medsilo.medical.data.readers import LoadCXR, UnreadableImage\n"
            "try:\n"
            "    LoadCXR(allow_identifiable=True).read(sys.argv[1])\n"
            "except UnreadableImage as exc:\n"
            "    print(exc.kind)\n"
            "    print(exc)\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    kind, line = done.stdout.strip().split("\n")
    assert kind == CODEC_MISSING
    assert line == (f"{path}: no decoder installed for transfer syntax 'JPEG Lossless, Non-Hierarchical, "
                    "First-Order Prediction (Process 14 [Selection Value 1])'; install it with 'pip install pylibjpeg "
                    "pylibjpeg-libjpeg' (medsilo's own install brings them)")  # fmt: skip
