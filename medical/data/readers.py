"""Image readers: chest X-ray DICOM and pathology patches, through MONAI's ``LoadImage``.

Both readers return one image as ``(C, H, W)`` float32 in [0, 1] (``C`` = 1 for chest X-ray, 3 for
pathology) and raise :class:`UnreadableImage` with a short reason for a file that cannot be used; the
dataset loader counts those and skips them up to the site's allowed fraction.

Chest X-ray (:class:`LoadCXR`) follows the DICOM grayscale pipeline
(`PS3.3 C.11 <https://dicom.nema.org/medical/dicom/current/output/chtml/part03/sect_C.11.html>`_):

1. MONAI ``PydicomReader`` decodes the pixels with ``swap_ij=False`` (its default transposes rows and
   columns) and applies the modality LUT, i.e. (0028,1053) *Rescale Slope* and (0028,1052) *Rescale
   Intercept*.
2. The VOI transform maps modality values to [0, 1]: the (0028,3010) *VOI LUT Sequence* if present,
   else the first (0028,1050) *Window Center* / (0028,1051) *Window Width* with the (0028,1056)
   *VOI LUT Function* (``LINEAR``, ``LINEAR_EXACT``, ``SIGMOID``; C.11.2.1.2), else the full range
   that (0028,0101) *Bits Stored* allows after rescale.
3. MONOCHROME1 (high value = dark) is inverted, because the MONAI reader does not do it, so every
   site's images come out MONOCHROME2: lungs dark, mediastinum bright.
4. Before any of that is used, the de-identification check (:mod:`.deid`) refuses files with
   identifying attributes unless the site allows them.

Pathology (:class:`LoadPatch`) reads PNG/TIFF/JPEG with MONAI's ``PILReader`` (``reverse_indexing=False``
so rows stay rows), converts to RGB, and scales 0–255 to [0, 1].
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from medsilo.errors import DataError
from medsilo.medical.data.deid import identifying_in_json_meta


class UnreadableImage(DataError):
    """One image that cannot be used; ``reason`` is short and never contains patient data."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class IdentifyingImage(UnreadableImage):
    """A DICOM file whose identifying attributes are filled in (listed by keyword only)."""

    def __init__(self, path: str | Path, keywords: list[str]):
        self.keywords = keywords
        super().__init__(
            path,
            f"identifying DICOM attributes are filled in ({', '.join(keywords)}); de-identify the file "
            "or set data.allow_identifiable_dicom: true in the site config",
        )


@contextlib.contextmanager
def _quiet_loader_setup():
    """Silence MONAI's notices about the optional GPU DICOM decoder while ``LoadImage`` registers its
    default readers; medsilo always passes its own reader, so they never apply."""
    plugin_log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = plugin_log.level
    plugin_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
            yield
    finally:
        plugin_log.setLevel(level)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _values(meta: dict[str, Any], tag: str) -> list[Any]:
    element = meta.get(tag)
    if not isinstance(element, dict):
        return []
    return list(element.get("Value", []))


def _first_float(meta: dict[str, Any], tag: str) -> float | None:
    values = _values(meta, tag)
    try:
        return float(values[0]) if values else None
    except (TypeError, ValueError):
        return None


def _first_str(meta: dict[str, Any], tag: str) -> str:
    values = _values(meta, tag)
    return str(values[0]).strip().upper() if values else ""


def apply_window(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM VOI windowing (PS3.3 C.11.2.1.2) of modality values to [0, 1].

    Args:
        x: modality values (after rescale), any shape.
        center, width: (0028,1050) and (0028,1051).
        function: (0028,1056) ``LINEAR`` (width ≥ 1), ``LINEAR_EXACT`` (width > 0) or ``SIGMOID``.

    Returns:
        float32 array of ``x``'s shape in [0, 1].
    """
    if function == "SIGMOID":
        y = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif function == "LINEAR_EXACT":
        y = (x - center) / width + 0.5
    else:
        y = (x - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5
    return np.clip(y, 0.0, 1.0).astype(np.float32)


MAX_PIXELS = 64 * 1024 * 1024
"""Largest Rows × Columns a chest X-ray may declare (64 megapixels; real CR/DX detectors are ≤ ~18).
Checked on the header before any pixel is decoded, so a damaged or hostile file cannot make a site
allocate gigabytes."""


class LoadCXR:
    """Load one chest X-ray DICOM as ``(1, H, W)`` float32 in [0, 1], MONOCHROME2.

    Args:
        allow_identifiable: accept files whose identifying attributes are filled in.

    Raises (from ``__call__``):
        IdentifyingImage: identifying attributes present and not allowed.
        UnreadableImage: not DICOM, no pixel data, not a single-channel grayscale image, bad VOI.
    """

    def __init__(self, allow_identifiable: bool = False):
        from monai.data import PydicomReader
        from monai.transforms import LoadImage

        self.allow_identifiable = allow_identifiable
        with _quiet_loader_setup():
            self._load = LoadImage(image_only=False, dtype=np.float32)
        self._reader = PydicomReader(swap_ij=False, prune_metadata=False)

    @staticmethod
    def _check_size(path: Path) -> None:
        import pydicom

        try:
            head = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns", "NumberOfFrames"])
            rows, cols = int(head.get("Rows", 0) or 0), int(head.get("Columns", 0) or 0)
            frames = int(head.get("NumberOfFrames", 1) or 1)
        except Exception as exc:  # noqa: BLE001 - an unparsable header makes this one file unreadable
            raise UnreadableImage(path, f"not a readable DICOM image ({_short(exc)})") from None
        if rows * cols * frames > MAX_PIXELS:
            raise UnreadableImage(path, f"declares {frames} frame(s) of {rows}×{cols} pixels, more than the "
                                        f"{MAX_PIXELS // 2**20}-megapixel limit")  # fmt: skip

    def __call__(self, path: str | Path) -> np.ndarray:
        path = Path(path)
        if not path.is_file():
            raise UnreadableImage(path, "file not found")
        self._check_size(path)
        try:
            with warnings.catch_warnings():
                # CR has no ImageOrientation/Position, so MONAI warns about the affine on every file
                warnings.simplefilter("ignore", UserWarning)
                image, meta = self._load(path, reader=self._reader)
        except Exception as exc:  # noqa: BLE001 - any decoder failure makes this one file unreadable
            raise UnreadableImage(path, f"not a readable DICOM image ({_short(exc)})") from None

        if not self.allow_identifiable:
            found = identifying_in_json_meta(meta)
            if found:
                raise IdentifyingImage(path, found)
        photometric = _first_str(meta, "00280004")
        if photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise UnreadableImage(path, f"PhotometricInterpretation is '{photometric}', expected MONOCHROME1/2")
        x = np.asarray(image, dtype=np.float32)
        if x.ndim == 3 and x.shape[-1] == 1:
            x = x[..., 0]
        if x.ndim != 2:
            raise UnreadableImage(path, f"expected one 2-D frame, got pixel array of shape {tuple(x.shape)}")
        y = self._voi(x, meta, path)
        if photometric == "MONOCHROME1":
            y = 1.0 - y
        return y[None]

    @staticmethod
    def _voi(x: np.ndarray, meta: dict[str, Any], path: Path) -> np.ndarray:
        voi_lut = _values(meta, "00283010")
        if voi_lut:
            from pydicom import Dataset
            from pydicom.pixels import apply_voi

            try:
                ds = Dataset.from_json({"00283010": meta["00283010"]})
                lut = np.asarray(apply_voi(x, ds), dtype=np.float32)
                bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            except Exception as exc:  # noqa: BLE001 - a malformed LUT makes this file unusable
                raise UnreadableImage(path, f"VOI LUT Sequence cannot be applied ({_short(exc)})") from None
            return np.clip(lut / float(2**bits - 1), 0, 1).astype(np.float32)

        center, width = _first_float(meta, "00281050"), _first_float(meta, "00281051")
        if center is not None and width is not None and width > 0:
            return apply_window(x, center, width, _first_str(meta, "00281056") or "LINEAR")

        bits = _first_float(meta, "00280101") or 16
        slope = _first_float(meta, "00281053") or 1.0
        intercept = _first_float(meta, "00281052") or 0.0
        signed = (_first_float(meta, "00280103") or 0) == 1
        low = -(2 ** (bits - 1)) if signed else 0
        high = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        lo, hi = sorted((low * slope + intercept, high * slope + intercept))
        return np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)


class LoadPatch:
    """Load one pathology patch (PNG, TIFF, JPEG) as ``(3, H, W)`` float32 in [0, 1] (RGB).

    Raises (from ``__call__``):
        UnreadableImage: missing, truncated or not an image.
    """

    def __init__(self) -> None:
        from monai.data import PILReader
        from monai.transforms import LoadImage

        with _quiet_loader_setup():
            self._load = LoadImage(image_only=True, dtype=np.float32, ensure_channel_first=True)
        self._reader = PILReader(reverse_indexing=False, converter=lambda im: im.convert("RGB"))

    def __call__(self, path: str | Path) -> np.ndarray:
        path = Path(path)
        if not path.is_file():
            raise UnreadableImage(path, "file not found")
        try:
            image = self._load(path, reader=self._reader)
        except Exception as exc:  # noqa: BLE001 - any decoder failure makes this one file unreadable
            raise UnreadableImage(path, f"not a readable image ({_short(exc)})") from None
        x = np.asarray(image, dtype=np.float32)
        if x.ndim != 3 or x.shape[0] != 3:
            raise UnreadableImage(path, f"expected an RGB image, got array of shape {tuple(x.shape)}")
        return x / 255.0
