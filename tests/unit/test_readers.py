"""Chest X-ray DICOM and pathology patch readers: orientation, polarity, modality/VOI LUT, bad files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medsilo.medical.data.readers import (
    MISSING,
    NOT_AN_IMAGE,
    WRONG_MODALITY,
    IdentifyingImage,
    LoadCXR,
    LoadImageFile,
    LoadPatch,
    UnreadableImage,
    apply_window,
    view_of,
)
from tests.helpers import write_dicom


def _ramp(rows: int = 6, cols: int = 10, top: int = 4095) -> np.ndarray:
    """Stored values increasing along columns, with a bright marker in the top-left pixel row."""
    x = np.tile(np.linspace(0, top, cols), (rows, 1))
    x[0, :3] = top
    return np.rint(x).astype(np.uint16)


def test_orientation_is_rows_by_columns(tmp_path):
    # Prepare: a non-square image whose top-left corner is bright
    stored = _ramp()
    path = write_dicom(tmp_path / "a.dcm", stored)
    # Execute
    img = LoadCXR()(path)
    # Assert: (1, Rows, Columns), not transposed; no window and 12 bits -> stored / 4095
    assert img.shape == (1, 6, 10)
    assert img.dtype == np.float32
    np.testing.assert_allclose(img[0], stored / 4095.0, atol=1e-6)


def test_monochrome1_is_inverted_to_monochrome2(tmp_path):
    stored = _ramp()
    mono2 = LoadCXR()(write_dicom(tmp_path / "m2.dcm", stored, photometric="MONOCHROME2"))
    mono1 = LoadCXR()(write_dicom(tmp_path / "m1.dcm", 4095 - stored, photometric="MONOCHROME1"))
    np.testing.assert_allclose(mono1, mono2, atol=1e-6)


def test_rescale_slope_intercept_and_window_in_modality_units(tmp_path):
    # stored s -> modality v = 2 s - 1024; a window centred at v = 0, width 1024 spans s in [256, 768]
    stored = np.array([[0, 256, 512, 768, 1023]], dtype=np.uint16)
    path = write_dicom(tmp_path / "r.dcm", stored, bits_stored=10, slope=2, intercept=-1024, window=(0, 1024))
    img = LoadCXR()(path)[0, 0]
    modality = 2.0 * stored[0] - 1024
    expected = np.clip((modality - (0 - 0.5)) / (1024 - 1) + 0.5, 0, 1)  # PS3.3 C.11.2.1.2.1
    np.testing.assert_allclose(img, expected, atol=1e-5)
    assert img[0] == 0.0 and img[-1] == 1.0 and 0.4 < img[2] < 0.6


def test_rescale_without_window_uses_bits_stored_range(tmp_path):
    stored = np.array([[0, 511, 1023]], dtype=np.uint16)
    img = LoadCXR()(write_dicom(tmp_path / "r.dcm", stored, bits_stored=10, slope=2, intercept=-1024))[0, 0]
    np.testing.assert_allclose(img, stored[0] / 1023.0, atol=1e-6)


@pytest.mark.parametrize(
    "function, expected",
    [
        ("LINEAR_EXACT", lambda v, c, w: np.clip((v - c) / w + 0.5, 0, 1)),
        ("SIGMOID", lambda v, c, w: 1 / (1 + np.exp(-4 * (v - c) / w))),
    ],
)
def test_voi_lut_functions(tmp_path, function, expected):
    stored = np.array([[100, 400, 500, 600, 900]], dtype=np.uint16)
    path = write_dicom(tmp_path / "v.dcm", stored, window=(500, 400), voi_function=function)
    img = LoadCXR()(path)[0, 0]
    np.testing.assert_allclose(img, expected(stored[0].astype(float), 500, 400), atol=1e-5)


def test_apply_window_linear_endpoints():
    y = apply_window(np.array([-1000.0, 39.5, 1000.0]), center=40, width=400)
    np.testing.assert_allclose(y, [0.0, 0.5, 1.0], atol=1e-6)


def test_real_monochrome1_radiograph_lungs_darker_than_mediastinum():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCI.dcm")  # real PA chest, MONOCHROME1, 15-bit, identifiable test tags
    img = LoadCXR(allow_identifiable=True)(path)[0]
    assert img.shape == (1955, 1841)  # Rows x Columns: not transposed
    h, w = img.shape
    band = slice(int(0.3 * h), int(0.55 * h))
    right_lung = img[band, int(0.2 * w) : int(0.35 * w)].mean()
    left_lung = img[band, int(0.65 * w) : int(0.8 * w)].mean()
    mediastinum = img[band, int(0.45 * w) : int(0.55 * w)].mean()
    assert right_lung < mediastinum - 0.15
    assert left_lung < mediastinum - 0.15


def test_identifying_file_is_refused_naming_tags_not_values(tmp_path):
    stored = _ramp()
    path = write_dicom(tmp_path / "phi.dcm", stored, PatientBirthDate="19400305", PatientAddress="1 Main St")
    with pytest.raises(IdentifyingImage, match="PatientBirthDate, PatientAddress") as info:
        LoadCXR()(path)
    assert "19400305" not in str(info.value) and "Main St" not in str(info.value)
    assert "allow_identifiable_dicom" in str(info.value)
    # the site may accept it explicitly
    assert LoadCXR(allow_identifiable=True)(path).shape == (1, 6, 10)


def test_names_need_patient_identity_removed(tmp_path):
    stored = _ramp()
    named = write_dicom(tmp_path / "named.dcm", stored, deidentified=False, PatientName="Doe^Jane", PatientID="123")
    with pytest.raises(IdentifyingImage, match="PatientName, PatientID"):
        LoadCXR()(named)
    pseudonymised = write_dicom(tmp_path / "pseudo.dcm", stored)  # pseudonym + PatientIdentityRemoved=YES
    assert LoadCXR()(pseudonymised).shape == (1, 6, 10)


def test_burned_in_annotation_is_refused(tmp_path):
    path = write_dicom(tmp_path / "b.dcm", _ramp(), BurnedInAnnotation="YES")
    with pytest.raises(IdentifyingImage, match="BurnedInAnnotation"):
        LoadCXR()(path)


def test_corrupt_files_give_a_reason(tmp_path):
    good = write_dicom(tmp_path / "good.dcm", _ramp(60, 60))
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[:1500])
    not_dicom = tmp_path / "notes.dcm"
    not_dicom.write_text("this is not an image")
    for path, reason in [
        (truncated, "not a readable DICOM image"),
        (not_dicom, "not a readable DICOM image"),
        (tmp_path / "missing.dcm", "file not found"),
    ]:
        with pytest.raises(UnreadableImage, match=reason) as info:
            LoadCXR()(path)
        assert info.value.path == str(path)


def test_colour_dicom_is_refused(tmp_path):
    import pydicom

    path = write_dicom(tmp_path / "c.dcm", _ramp())
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.save_as(path)
    with pytest.raises(UnreadableImage, match="PhotometricInterpretation is 'PALETTE COLOR'"):
        LoadCXR()(path)


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_patch_reader_keeps_rows_and_rgb(tmp_path, suffix):
    rgb = np.zeros((12, 20, 3), dtype=np.uint8)
    rgb[:4, :, 0] = 255  # red top rows
    rgb[:, -5:, 2] = 128  # blue right columns
    path = tmp_path / f"p.{suffix}"
    Image.fromarray(rgb).save(path)
    img = LoadPatch()(path)
    assert img.shape == (3, 12, 20)
    np.testing.assert_allclose(img, rgb.transpose(2, 0, 1) / 255.0, atol=1e-6)


def test_patch_reader_converts_grayscale_and_rejects_garbage(tmp_path):
    gray = tmp_path / "g.png"
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint8)).save(gray)
    img = LoadPatch()(gray)
    assert img.shape == (3, 8, 8)
    np.testing.assert_allclose(img, 200 / 255.0, atol=1e-6)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n-truncated")
    with pytest.raises(UnreadableImage, match="not a readable image"):
        LoadPatch()(bad)


def test_generic_reader_keeps_grayscale_and_16_bit_depth(tmp_path):
    gray16 = np.arange(0, 65536, 256, dtype=np.uint16).reshape(16, 16)
    path = tmp_path / "g16.png"
    Image.fromarray(gray16).save(path)
    img = LoadImageFile()(path)
    assert img.shape == (1, 16, 16)
    np.testing.assert_allclose(img[0], gray16 / 65535.0, atol=1e-6)  # not clipped to 8 bits
    assert LoadImageFile(3)(path).shape == (3, 16, 16)


@pytest.mark.parametrize(("mode", "suffix"), [("RGB", "jpg"), ("RGBA", "png"), ("P", "png"), ("RGB", "tif")])
def test_generic_reader_makes_colour_files_rgb_or_luminance(tmp_path, mode, suffix):
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    path = tmp_path / f"c.{suffix}"
    Image.fromarray(rgb).convert(mode).save(path, quality=100) if suffix == "jpg" else Image.fromarray(rgb).convert(mode).save(path)
    img = LoadImageFile()(path)
    assert img.shape == (3, 8, 8)
    assert abs(float(img[0].mean()) - 200 / 255) < 0.02 and float(img[1:].max()) < 0.05
    lum = LoadImageFile(1)(path)
    assert lum.shape == (1, 8, 8) and abs(float(lum.mean()) - 0.299 * 200 / 255) < 0.02


def test_generic_reader_refuses_float_pixels_and_missing_files(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.ones((4, 4), dtype=np.float32)).save(path)
    with pytest.raises(UnreadableImage, match="floating-point pixels"):
        LoadImageFile()(path)
    with pytest.raises(UnreadableImage, match="file not found"):
        LoadImageFile()(tmp_path / "none.png")


# ---- right images only: modality, presentation intent, view -----------------------------------------------


@pytest.mark.parametrize(("name", "modality"), [("CT_small.dcm", "CT"), ("MR_small.dcm", "MR"), ("US1_UNCR.dcm", "US")])
def test_other_modalities_are_refused_naming_the_modality(name, modality):
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)  # real CT, MR and ultrasound files
    with pytest.raises(UnreadableImage, match=rf"Modality is '{modality}' \(.+\), not a chest X-ray; chest X-ray "
                                              r"datasets take CR and DX images only") as info:  # fmt: skip
        LoadCXR(allow_identifiable=True).read(path)
    assert info.value.kind == WRONG_MODALITY and info.value.path == str(path)


def test_a_file_without_modality_is_refused(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", _ramp(), Modality="")
    with pytest.raises(UnreadableImage, match=r"Modality \(0008,0060\) is empty"):
        LoadCXR()(path)


def test_dx_for_presentation_is_read_and_for_processing_refused(tmp_path):
    from pydicom.uid import DigitalXRayImageStorageForPresentation, DigitalXRayImageStorageForProcessing

    shown = write_dicom(tmp_path / "p.dcm", _ramp(), Modality="DX", PresentationIntentType="FOR PRESENTATION",
                        SOPClassUID=DigitalXRayImageStorageForPresentation, ViewPosition="LL")  # fmt: skip
    record = LoadCXR().read(shown)
    assert (record.modality, record.view, record.pixels.shape) == ("DX", "LL", (1, 6, 10))
    raw = write_dicom(tmp_path / "raw.dcm", _ramp(), Modality="DX", PresentationIntentType="FOR PROCESSING",
                      SOPClassUID=DigitalXRayImageStorageForProcessing)  # fmt: skip
    untagged = write_dicom(tmp_path / "raw2.dcm", _ramp(), Modality="DX", SOPClassUID=DigitalXRayImageStorageForProcessing)
    for path in (raw, untagged):  # the intent, or the For Processing SOP class alone
        with pytest.raises(UnreadableImage, match=r"PresentationIntentType is 'FOR PROCESSING' \(raw detector data, "
                                                  r"not meant for viewing\); export the FOR PRESENTATION") as info:  # fmt: skip
            LoadCXR().read(path)
        assert info.value.kind == WRONG_MODALITY


@pytest.mark.parametrize(
    ("view_position", "texts", "expected"),
    [
        ("PA", (), "PA"),
        ("ap", (), "AP"),
        ("LL", (), "LL"),
        ("RL", (), "LATERAL"),
        ("LATERAL", (), "LATERAL"),
        ("AP AXIAL", (), "AP"),
        ("", ("CHEST PA", "", "CHEST"), "PA"),
        ("", ("", "Thorax lat.", ""), "LATERAL"),
        ("", ("CHEST PORTABLE AP",), "AP"),
        ("", ("CHEST PA AND LAT",), "UNKNOWN"),  # names two views
        ("", ("CHEST LL",), "UNKNOWN"),  # LL in free text may be "left lung" or "lower lobe"
        ("", ("CHEST", "PAEDIATRIC"), "UNKNOWN"),  # PA only as a whole word
        ("LAO", ("CHEST PA",), "PA"),  # View Position names none of the views: the protocol decides
        ("", (), "UNKNOWN"),
    ],
)
def test_view_from_view_position_else_protocol_text(view_position, texts, expected):
    assert view_of(view_position, *texts) == expected


def test_view_is_read_from_the_header(tmp_path):
    from pydicom.data import get_testdata_file

    assert LoadCXR(allow_identifiable=True).read(get_testdata_file("RG1_UNCR.dcm")).view == "PA"  # real CR, PA
    by_protocol = write_dicom(tmp_path / "a.dcm", _ramp(), ProtocolName="Chest AP supine")
    assert LoadCXR().read(by_protocol).view == "AP"
    assert LoadCXR().read(write_dicom(tmp_path / "b.dcm", _ramp())).view == "UNKNOWN"


def test_problem_kinds(tmp_path):
    with pytest.raises(UnreadableImage) as info:
        LoadCXR()(tmp_path / "nowhere.dcm")
    assert info.value.kind == MISSING
    (tmp_path / "notes.dcm").write_text("not an image")
    with pytest.raises(UnreadableImage, match=r"not a readable DICOM image \(not DICOM: InvalidDicomError") as info:
        LoadCXR()(tmp_path / "notes.dcm")
    assert info.value.kind == NOT_AN_IMAGE


def test_synthetic_hospitals_write_cr_and_dx_with_their_view(tmp_path):
    from dataclasses import replace

    from medsilo.medical.synth.cxr import CXR_SCANNERS, make_scanner, write_cxr_dicom

    assert [s.view for s in CXR_SCANNERS] == ["PA", "PA", "PA", "AP"]  # hospital 4 is the bedside portable
    assert make_scanner(4, np.random.default_rng(0)).modality == "DX"
    assert make_scanner(5, np.random.default_rng(0)).modality == "CR"
    dx = replace(CXR_SCANNERS[3], modality="DX")
    path = tmp_path / "dx.dcm"
    write_cxr_dicom(path, np.full((16, 16), 900, np.uint16), dx, patient_pseudonym="P-1", uid_seed="t/1",
                    study_date="20240101", institution="Synthetic")  # fmt: skip
    record = LoadCXR().read(path)
    assert (record.modality, record.view, record.pixels.shape) == ("DX", "AP", (1, 16, 16))
