"""Hostile chest X-ray DICOM files: headers that lie about size, bytes hidden where pydicom parses them, modality and
intent spoofing, and header values that must not leave the site.

The threat: whoever can put a file into a site's chest X-ray export (a PACS export folder, a USB stick, a shared
drive) writes a small DICOM file that makes the site allocate gigabytes or spin for minutes, that a chest X-ray job
trains on although it is a CT slice or raw detector data, or whose header text (Modality, PatientName) ends up in
``medsilo data check`` output or in what the site tells the server. Every file here is real DICOM written with
pydicom; sizes are lies in headers or sparse files, never real big data.
"""

from __future__ import annotations

import io
import os
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from medsilo.config import read_manifest
from medsilo.config.site import DataPolicy
from medsilo.errors import DataError
from medsilo.medical.data import load_site_data
from medsilo.medical.data.check import render_report, scan_dataset
from medsilo.medical.data.readers import (
    CXR_MAX_FILE_BYTES,
    MISSING,
    NOT_AN_IMAGE,
    TOO_LARGE,
    WRONG_MODALITY,
    LoadCXR,
    UnreadableImage,
)
from tests.helpers import write_dicom


@pytest.fixture(scope="module")
def reader() -> LoadCXR:
    return LoadCXR()


def _cr(path: Path, **tags) -> Path:
    return write_dicom(path, np.arange(64, dtype=np.uint16).reshape(8, 8), **tags)


def _refused(reader: LoadCXR, path: Path, kind: str, seconds: float = 5.0, mib: float = 32.0) -> str:
    """Read ``path``: it must be refused with ``kind`` within ``seconds`` and ``mib`` of Python allocations."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(UnreadableImage) as info:
            reader.read(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.kind == kind, info.value.reason
    assert time.perf_counter() - t0 < seconds
    assert peak < mib * 2**20
    assert "\n" not in info.value.reason
    return info.value.reason


def test_header_declaring_a_huge_image_or_many_frames_is_refused_before_decoding(tmp_path, reader):
    big = pydicom.dcmread(_cr(tmp_path / "big.dcm"))
    big.Rows = big.Columns = 60000
    big.save_as(tmp_path / "big.dcm")
    assert "60000×60000" in _refused(reader, tmp_path / "big.dcm", TOO_LARGE)
    frames = pydicom.dcmread(_cr(tmp_path / "frames.dcm"))
    frames.Rows = frames.Columns = 1024
    frames.NumberOfFrames = 1000
    frames.save_as(tmp_path / "frames.dcm")
    assert "1000 frames" in _refused(reader, tmp_path / "frames.dcm", TOO_LARGE)


def test_megabytes_after_the_pixel_data_are_refused_not_parsed(tmp_path, reader):
    # before the fix: pydicom parsed 2 MiB of trailing zeros as data elements for ~9 s and the image was read
    path = _cr(tmp_path / "trail.dcm")
    with path.open("r+b") as fh:
        fh.truncate(path.stat().st_size + 2 * 2**20)
    assert "follow the Pixel Data element" in _refused(reader, path, TOO_LARGE)


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path, reader):
    # a sparse file: GBs on paper, nothing on disk; before the fix this hung (pydicom parsing zeros)
    path = _cr(tmp_path / "huge.dcm")
    with path.open("r+b") as fh:
        fh.truncate(3 * 2**30)
    assert f"{CXR_MAX_FILE_BYTES // 2**20} MiB limit" in _refused(reader, path, TOO_LARGE)


def test_a_deflate_bomb_is_refused_without_inflating_it_whole(tmp_path, reader):
    # a deflated data set of an 8×8 image followed by 200 MiB of zeros: a ~200 KB file pydicom inflated whole
    plain = _cr(tmp_path / "plain.dcm")
    ds = pydicom.dcmread(plain)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    raw = (tmp_path / "deflated.dcm").read_bytes()
    with (tmp_path / "deflated.dcm").open("rb") as fh:
        read_preamble(fh, False)
        _read_file_meta_info(fh)
        start = fh.tell()
    dataset = zlib.decompress(raw[start:], -zlib.MAX_WBITS)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = [deflate.compress(bytes(2**20)) for _ in range(200)]
    body = [deflate.compress(dataset), *zeros, deflate.flush()]
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(raw[:start] + b"".join(body))
    assert bomb.stat().st_size < 2**20
    assert "inflates to more than" in _refused(reader, bomb, TOO_LARGE, seconds=10)
    reader.read(tmp_path / "deflated.dcm")  # an honest deflated file still reads


def _jpeg_dicom(path: Path, side: int) -> Path:
    """A 64×64 8-bit CR whose one JPEG Baseline frame is ``side``×``side`` pixels of zeros."""
    ds = pydicom.dcmread(write_dicom(path, np.zeros((64, 64), np.uint16), bits_stored=8))
    buf = io.BytesIO()
    Image.fromarray(np.zeros((side, side), np.uint8)).save(buf, "JPEG", quality=50)
    ds.BitsAllocated, ds.HighBit = 8, 7
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.save_as(path)
    return path


def test_a_jpeg_frame_larger_than_the_header_is_refused_before_decoding(tmp_path, reader):
    # before the fix the 4096×4096 frame (197 KB) was decoded, 16 MiB, and only then refused on its shape; at the
    # JPEG limit of 65535×65535 a ~50 MB file would allocate 4 GiB
    reason = _refused(reader, _jpeg_dicom(tmp_path / "lie.dcm", 4096), TOO_LARGE, mib=4)
    assert "declares 4096×4096 pixels but Rows×Columns say 64×64" in reason
    assert reader.read(_jpeg_dicom(tmp_path / "honest.dcm", 64)).pixels.shape == (1, 64, 64)


def test_a_malformed_rle_frame_is_one_unreadable_file_not_a_crash(tmp_path, reader):
    # before the fix pylibjpeg-rle's Rust panic (pyo3 PanicException, a BaseException) went through every
    # `except Exception` and ended `medsilo data check` and the site's task with a traceback
    ds = pydicom.dcmread(_cr(tmp_path / "rle.dcm"))
    segment = b"\x81\x00" * 2000  # runs of 128 zeros: far more than an 8×8 segment holds
    header = struct.pack("<16L", 2, 64, 64 + len(segment), *[0] * 13)
    ds.PixelData = encapsulate([header + segment + segment])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.save_as(tmp_path / "rle.dcm")
    assert "not a readable DICOM image" in _refused(reader, tmp_path / "rle.dcm", NOT_AN_IMAGE)


def test_fifo_and_device_are_refused_without_blocking(tmp_path, reader):
    fifo = tmp_path / "fifo.dcm"
    os.mkfifo(fifo)
    _refused(reader, fifo, MISSING, seconds=2)
    _refused(reader, Path("/dev/zero"), MISSING, seconds=2)


INTENTS = ["FOR PRESENTATION\\FOR PROCESSING", "for processing", "FOR  PROCESSING", "RAW"]


@pytest.mark.parametrize("intent", INTENTS)
def test_presentation_intent_other_than_for_presentation_is_refused(tmp_path, reader, intent):
    # before the fix only the exact value 'FOR PROCESSING' was refused: multi-valued or misspelt ones read
    path = _cr(tmp_path / "x.dcm", PresentationIntentType=intent)
    assert "FOR PROCESSING" in _refused(reader, path, WRONG_MODALITY)


def test_a_ct_sop_class_labelled_cr_is_refused_secondary_capture_is_read(tmp_path, reader):
    # before the fix a CT slice whose Modality said CR was read as a chest X-ray
    ct = _cr(tmp_path / "ct.dcm", SOPClassUID=CTImageStorage)
    assert "CT Image Storage" in _refused(reader, ct, WRONG_MODALITY)
    assert reader.read(_cr(tmp_path / "sc.dcm", SOPClassUID=SecondaryCaptureImageStorage)).modality == "CR"


@pytest.mark.parametrize(("modality", "read"), [("cr", True), (" DX ", True), ("CR\\CT", False), ("", False)])
def test_modality_spelling(tmp_path, reader, modality, read):
    path = _cr(tmp_path / "m.dcm", Modality=modality)
    if read:
        assert reader.read(path).modality in ("CR", "DX")
    else:
        _refused(reader, path, WRONG_MODALITY)


def _site(tmp_path: Path, n: int, **tags) -> Path:
    lines = ["path,label,patient_id,split"]
    for i in range(n):
        _cr(tmp_path / f"{i}.dcm", **tags)
        lines.append(f"{i}.dcm,{'ab'[i % 2]},p{i},{('train', 'val', 'test')[i % 3]}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "m.csv"


def test_header_values_never_reach_the_server_summary(tmp_path):
    # before the fix the server was told "6× Modality is 'JANE ROE'"
    manifest = read_manifest(_site(tmp_path, 6, Modality="JANE ROE"))
    with pytest.raises(DataError) as info:
        load_site_data(manifest, modality="cxr", image_size=8)
    assert "JANE" not in info.value.public and f"6× {WRONG_MODALITY}" in info.value.public


def test_data_check_names_keywords_never_values(tmp_path):
    manifest = read_manifest(_site(tmp_path, 6, deidentified=False, PatientName="Roe^Jane", PatientID="MRN-777",
                                   SeriesDescription="CHEST PA Roe^Jane"))  # fmt: skip
    text = render_report(scan_dataset(manifest, "cxr", DataPolicy(), progress=False))
    assert "PatientName" in text and "PatientID" in text
    assert "Roe" not in text and "MRN-777" not in text
