"""Image readers: chest X-ray DICOM, pathology patches and generic images, through MONAI's ``LoadImage``.

Every reader returns one image as ``(C, H, W)`` float32 in [0, 1] (``C`` = 1 for chest X-ray, 3 for
pathology, 1 or 3 for generic images) and raises :class:`UnreadableImage` with a short reason for a file that cannot be used; the
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

Generic images (:class:`LoadImageFile`, modality ``image``) and pathology patches (:class:`LoadPatch`, always
RGB) read PNG/TIFF/JPEG with MONAI's ``PILReader`` (``reverse_indexing=False`` so rows stay rows) and scale
8-bit files by 255, 16-bit grayscale by 65535.

Every reader first reads the file's header alone and refuses an image that declares more pixels than its
modality's limit (:data:`CXR_MAX_PIXELS`, :data:`PATCH_MAX_PIXELS`, :data:`IMAGE_MAX_PIXELS`), so a small hostile or damaged file
(a 15 KB PNG can declare 11000×11000 pixels) never makes a site allocate gigabytes.
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


CXR_MAX_PIXELS = 64 * 2**20
"""Largest Rows × Columns × frames a chest X-ray may declare (64 megapixels; real CR/DX detectors are
≤ ~18). Decoded as float32, that is at most 256 MiB."""

PATCH_MAX_PIXELS = 16 * 2**20
"""Largest width × height a pathology patch may declare (16 megapixels, e.g. 4096×4096; patches are
typically 224–2048 pixels a side, whole-slide images must be tiled first). Decoded as RGB float32
(12 bytes a pixel), that is at most 192 MiB."""


def _check_declared_size(path: Path, rows: int, columns: int, limit: int, what: str, frames: int = 1) -> None:
    """Refuse an image whose header declares more than ``limit`` pixels, before any pixel is decoded.

    Args:
        path: the file, for the message.
        rows, columns: the image height and width its header declares.
        limit: the most pixels (rows × columns × frames) accepted.
        what: the kind of image, for the message (``chest X-rays``).
        frames: frames the header declares (multi-frame DICOM).

    Raises:
        UnreadableImage: the declared size is over ``limit``; the reason gives it and the limit.
    """
    if rows * columns * frames > limit:
        shape = f"{rows}×{columns} pixels" if frames == 1 else f"{frames} frames of {rows}×{columns} pixels"
        raise UnreadableImage(path, f"declares {shape}, more than the {limit // 2**20}-megapixel limit "
                                    f"for {what}")  # fmt: skip


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
        _check_declared_size(path, rows, cols, CXR_MAX_PIXELS, "chest X-rays", frames)

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


IMAGE_MAX_PIXELS = 16 * 2**20
"""Largest width × height a generic image (modality ``image``) may declare: 16 megapixels, as for patches."""

_GRAY_16 = ("I;16", "I;16B", "I;16L", "I")
"""Pillow modes of 16-bit (and 32-bit integer) grayscale files, scaled by 65535."""
_GRAY_8 = ("1", "L", "LA")


class LoadImageFile:
    """Load one PNG, JPEG or TIFF as ``(C, H, W)`` float32 in [0, 1], through MONAI's ``PILReader``.

    8-bit files are divided by 255, 16-bit grayscale by 65535 (values of 32-bit integer files above that
    are clipped). Alpha is dropped; palette and other colour modes become RGB.

    Args:
        channels: ``1`` (colour converted to luminance, ITU-R 601), ``3`` (grayscale replicated), or
            ``None``: as the file is (grayscale → 1, colour → 3).
        max_pixels: the most pixels a file's header may declare; larger files are refused before decoding.
        what: what the files are, for messages (``pathology patches``).

    Raises (from ``__call__``):
        UnreadableImage: missing, truncated or not an image, floating-point pixels, or a header declaring
            more than ``max_pixels`` pixels.
    """

    def __init__(self, channels: int | None = None, *, max_pixels: int = IMAGE_MAX_PIXELS, what: str = "images"):
        from monai.transforms import LoadImage

        if channels not in (None, 1, 3):
            raise ValueError(f"channels: must be 1, 3 or None, got {channels!r}")
        self.channels, self.max_pixels, self.what = channels, max_pixels, what
        with _quiet_loader_setup():
            self._load = LoadImage(image_only=True, dtype=np.float32, ensure_channel_first=True)

    def _mode(self, path: Path) -> str:
        """Read the header only (Pillow opens lazily): refuse a file over ``max_pixels``; return its mode."""
        from PIL import Image

        try:
            with warnings.catch_warnings():
                # Pillow warns above its own global limit; medsilo refuses on max_pixels below instead
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    width, height = im.size
                    mode = im.mode
        except Image.DecompressionBombError as exc:  # over twice Pillow's limit: it refuses to open at all
            limit = self.max_pixels // 2**20
            raise UnreadableImage(path, f"declares more pixels than Pillow opens ({_short(exc)}); {self.what} "
                                        f"may have {limit} megapixels at most") from None  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - an unparsable header makes this one file unreadable
            raise UnreadableImage(path, f"not a readable image ({_short(exc)})") from None
        _check_declared_size(path, height, width, self.max_pixels, self.what)
        if mode == "F":
            raise UnreadableImage(path, "floating-point pixels (Pillow mode F); export 8- or 16-bit images")
        return mode

    def __call__(self, path: str | Path) -> np.ndarray:
        from monai.data import PILReader

        path = Path(path)
        if not path.is_file():
            raise UnreadableImage(path, "file not found")
        mode = self._mode(path)
        gray = mode in _GRAY_16 or mode in _GRAY_8
        if gray and mode in _GRAY_16:
            target, scale = mode, 65535.0  # kept at 16 bits; Pillow's convert("L") would clip it
        elif gray or self.channels == 1:
            target, scale = "L", 255.0
        else:
            target, scale = "RGB", 255.0
        reader = PILReader(reverse_indexing=False, converter=lambda im: im if im.mode == target else im.convert(target))
        try:
            image = self._load(path, reader=reader)
        except Exception as exc:  # noqa: BLE001 - any decoder failure makes this one file unreadable
            raise UnreadableImage(path, f"not a readable image ({_short(exc)})") from None
        x = np.asarray(image, dtype=np.float32)
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or x.shape[0] not in (1, 3):
            raise UnreadableImage(path, f"expected a grayscale or RGB image, got array of shape {tuple(x.shape)}")
        x = np.clip(x / scale, 0.0, 1.0)
        if self.channels == 3 and x.shape[0] == 1:
            x = np.repeat(x, 3, axis=0)
        elif self.channels == 1 and x.shape[0] == 3:
            x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None].astype(np.float32)
        return x


class LoadPatch(LoadImageFile):
    """Load one pathology patch (PNG, TIFF, JPEG) as ``(3, H, W)`` float32 in [0, 1] (RGB; grayscale
    files replicated), refusing a header over :data:`PATCH_MAX_PIXELS` before decoding."""

    def __init__(self) -> None:
        super().__init__(3, max_pixels=PATCH_MAX_PIXELS, what="pathology patches")
