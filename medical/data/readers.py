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

Before a pixel is decoded, :class:`LoadCXR` reads the header alone and refuses what a chest X-ray dataset must
not take: a (0008,0060) *Modality* other than ``CR`` or ``DX`` (CT, MR, US … are named in the reason), and a
(0008,0068) *Presentation Intent Type* of ``FOR PROCESSING`` (raw detector data; only ``FOR PRESENTATION``
images are read). It records the view (:func:`view_of`): PA, AP, LATERAL or LL from (0018,5101) *View
Position*, else from (0018,1030) *Protocol Name*, (0008,103E) *Series Description* and (0018,0015) *Body
Part Examined* when they name exactly one view, else ``UNKNOWN``. :meth:`LoadCXR.read` returns it with the
pixels (:class:`ImageRecord`), so a job can keep only some views.

Every transfer syntax a PACS exports for CR/DX decodes through pydicom's pixel decoders: uncompressed (Implicit
and Explicit VR Little Endian, Explicit VR Big Endian), Deflated, RLE Lossless (pydicom itself, or
``pylibjpeg-rle``), JPEG Baseline and Extended, JPEG Lossless (Process 14 and its Selection Value 1),
JPEG-LS lossless and near-lossless (``pylibjpeg-libjpeg``), JPEG 2000 reversible and irreversible and
HTJ2K (``pylibjpeg-openjpeg``). When a file's transfer syntax has no installed decoder, the file is refused
with one line naming the syntax and the packages to install (:func:`check_decoder`), before decoding.

Generic images (:class:`LoadImageFile`, modality ``image``) and pathology patches (:class:`LoadPatch`, always
RGB) read PNG/TIFF/JPEG with MONAI's ``PILReader`` (``reverse_indexing=False`` so rows stay rows) and scale
8-bit files by 255, 16-bit grayscale by 65535.

Every reader first reads the file's header alone and refuses an image that declares more pixels than its
modality's limit (:data:`CXR_MAX_PIXELS`, :data:`PATCH_MAX_PIXELS`, :data:`IMAGE_MAX_PIXELS`), so a small hostile or damaged file
(a 15 KB PNG can declare 11000×11000 pixels) never makes a site allocate gigabytes. For DICOM, before pydicom
parses the file: a file (or deflated data set, inflated in a stream) over :data:`CXR_MAX_FILE_BYTES` is refused;
then, from the header read, more than :data:`CXR_MAX_TRAILING_BYTES` after the *Pixel Data* element (pydicom would
parse them as elements for minutes) and a compressed frame whose JPEG/JPEG-LS/JPEG 2000 codestream declares more rows or
columns than the header (decoders size their output by the codestream). A *SOP Class UID* outside
:data:`CXR_SOP_CLASSES` and any *Presentation Intent Type* but empty or ``FOR PRESENTATION`` are refused too.
"""

from __future__ import annotations

import contextlib
import logging
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import uid as dicom_uid
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.pixels import get_decoder

from medsilo.config.job import UNKNOWN_VIEW
from medsilo.errors import DataError
from medsilo.medical.data.deid import identifying_in_json_meta

MISSING = "missing file"
NOT_AN_IMAGE = "not an image"
CODEC_MISSING = "codec missing"
UNSUPPORTED = "unsupported image"
WRONG_MODALITY = "wrong modality"
IDENTIFYING = "identifying"
TOO_LARGE = "too large"
PROBLEM_KINDS: tuple[str, ...] = (MISSING, NOT_AN_IMAGE, CODEC_MISSING, UNSUPPORTED, WRONG_MODALITY, IDENTIFYING,
                                  TOO_LARGE)  # fmt: skip
"""Why a file cannot be used, by kind (:attr:`UnreadableImage.kind`), in the order ``medsilo data check`` lists
them: the manifest names no file there; not DICOM / not an image / damaged; its transfer syntax has no installed
decoder; an image the pipeline does not take (colour chest X-ray, several frames, float pixels, a malformed VOI
LUT, an encoding with no decoder at all); not a chest X-ray (modality, *for processing*); identifying DICOM
attributes filled in; more pixels than the modality's limit."""


class UnreadableImage(DataError):
    """One image that cannot be used; ``reason`` is short and never contains patient data.

    Args:
        path: the file.
        reason: why, with what to do where the site can act.
        kind: one of :data:`PROBLEM_KINDS`, what ``medsilo data check`` groups by.
    """

    def __init__(self, path: str | Path, reason: str, kind: str = NOT_AN_IMAGE):
        self.path = str(path)
        self.reason = reason
        self.kind = kind
        super().__init__(f"{path}: {reason}")


class IdentifyingImage(UnreadableImage):
    """A DICOM file whose identifying attributes are filled in (listed by keyword only)."""

    def __init__(self, path: str | Path, keywords: list[str]):
        self.keywords = keywords
        super().__init__(
            path,
            f"identifying DICOM attributes are filled in ({', '.join(keywords)}); de-identify the file "
            "or set data.allow_identifiable_dicom: true in the site config",
            IDENTIFYING,
        )


@dataclass(frozen=True)
class ImageRecord:
    """One image as a reader returns it from ``read``.

    Attributes:
        pixels: ``(C, H, W)`` float32 in [0, 1].
        view: chest X-ray only: ``PA``, ``AP``, ``LATERAL``, ``LL`` or ``UNKNOWN`` (:func:`view_of`); ``None`` for
            other modalities.
        modality: chest X-ray only: the file's (0008,0060) *Modality*, ``CR`` or ``DX``.
    """

    pixels: np.ndarray
    view: str | None = None
    modality: str | None = None


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


CXR_MAX_FILE_BYTES = CXR_MAX_PIXELS * 2 + 16 * 2**20
"""Largest chest X-ray DICOM file, or deflated data set once inflated: a 16-bit image of
:data:`CXR_MAX_PIXELS` plus 16 MiB of header (144 MiB). Checked before pydicom parses anything."""

CXR_MAX_TRAILING_BYTES = 64 * 2**10
"""Most bytes a chest X-ray file may hold after its (7FE0,0010) *Pixel Data* (trailing padding, a signature).
pydicom parses whatever follows as data elements, about 4 s a MiB of zeros: a few MB of junk is a hang."""


def _check_file_bytes(path: Path) -> None:
    """Refuse a DICOM file, or a deflated data set once inflated, over :data:`CXR_MAX_FILE_BYTES`, before pydicom
    reads it: pydicom inflates a deflated data set whole in memory (a 1 MB file of zeros is 1 GB)."""
    size = path.stat().st_size
    limit = f"the {CXR_MAX_FILE_BYTES // 2**20} MiB limit for chest X-ray files"
    if size > CXR_MAX_FILE_BYTES:
        raise UnreadableImage(path, f"file is {size // 2**20} MiB, more than {limit}", TOO_LARGE)
    try:
        with path.open("rb") as fp:
            read_preamble(fp, False)
            ts = _read_file_meta_info(fp).get("TransferSyntaxUID", "")
            if ts != dicom_uid.DeflatedExplicitVRLittleEndian:
                return
            inflate, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
            while chunk := fp.read(2**20):
                while chunk:  # inflated 1 MiB at a time and dropped: never held whole
                    total += len(inflate.decompress(chunk, 2**20))
                    chunk = inflate.unconsumed_tail
                    if total > CXR_MAX_FILE_BYTES:
                        raise UnreadableImage(path, f"deflated data set inflates to more than {limit}",
                                              TOO_LARGE)  # fmt: skip
    except UnreadableImage:
        raise
    except Exception:  # noqa: BLE001 - not DICOM or damaged: the header read below says why
        return


def _check_trailing_bytes(path: Path, fp: Any, transfer_syntax: str) -> list[bytes]:
    """Refuse a file with more than :data:`CXR_MAX_TRAILING_BYTES` after its *Pixel Data* element.

    ``fp`` stands where a header read (``stop_before_pixels``) left it: at the *Pixel Data* tag, or at the end of
    the file. The element's extent is walked (a native value's length; an encapsulated value's items up to its
    sequence delimiter) without reading the pixels. Deflated files are bounded by :func:`_check_file_bytes`.

    Returns:
        The first 64 KiB of each fragment of an encapsulated *Pixel Data* (where its codestream header is), for
        :func:`_check_frame_sizes`; ``[]`` for native pixels.
    """
    heads: list[bytes] = []
    if transfer_syntax == dicom_uid.DeflatedExplicitVRLittleEndian:
        return heads
    size = path.stat().st_size
    start = fp.tell()
    big = transfer_syntax == dicom_uid.ExplicitVRBigEndian
    order = ">" if big else "<"
    head = fp.read(12)
    if len(head) < 8:
        return heads
    group, elem = struct.unpack(order + "HH", head[:4])
    if (group, elem) != (0x7FE0, 0x0010):
        return heads
    explicit = transfer_syntax != dicom_uid.ImplicitVRLittleEndian and head[4:6].isalpha()
    if explicit:
        length, end = struct.unpack(order + "L", head[8:12])[0], start + 12
    else:
        length, end = struct.unpack(order + "L", head[4:8])[0], start + 8
    if length != 0xFFFFFFFF:
        end += length
    else:  # encapsulated: items (FFFE,E000) up to the sequence delimiter (FFFE,E0DD)
        fp.seek(end)
        while True:
            item = fp.read(8)
            if len(item) < 8:
                break
            tag_group, tag_elem, item_length = struct.unpack("<HHL", item)
            end = fp.tell() + (item_length if (tag_group, tag_elem) == (0xFFFE, 0xE000) else 0)
            if (tag_group, tag_elem) != (0xFFFE, 0xE000) or end > size:
                break
            heads.append(fp.read(min(item_length, 2**16)))
            fp.seek(end)
    if size - end > CXR_MAX_TRAILING_BYTES:
        raise UnreadableImage(path, f"{(size - end) // 2**10} KiB follow the Pixel Data element (at most "
                                    f"{CXR_MAX_TRAILING_BYTES // 2**10} KiB expected); export the image again",
                              TOO_LARGE)  # fmt: skip
    return heads[1:]  # the first item is the Basic Offset Table


def _frame_size(head: bytes) -> tuple[int, int] | None:
    """``(rows, columns)`` a JPEG, JPEG-LS or JPEG 2000 codestream's header declares; ``None`` for anything else."""
    if head[:4] == b"\xff\x4f\xff\x51" and len(head) >= 24:  # J2K SOC + SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz
        xsiz, ysiz, xo, yo = struct.unpack(">LLLL", head[8:24])
        return ysiz - yo, xsiz - xo
    if head[:2] == b"\xff\xd8":
        offset = 2
        while offset + 4 <= len(head) and head[offset] == 0xFF:
            marker = head[offset + 1]
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7):
                if offset + 9 > len(head):
                    return None
                rows, cols = struct.unpack(">HH", head[offset + 5 : offset + 9])  # SOFn: Lf P Y X
                return rows, cols
            offset += 2 + struct.unpack(">H", head[offset + 2 : offset + 4])[0]
    return None


def _check_frame_sizes(path: Path, heads: list[bytes], rows: int, columns: int) -> None:
    """Refuse an encapsulated frame whose codestream declares more rows or columns than the header: decoders size
    their output by the codestream, so a 64×64 header over a 65000×65000 JPEG of zeros (~50 MB) would allocate 4 GB
    before pydicom compares shapes."""
    for head in heads:
        size = _frame_size(head)
        if size is not None and (size[0] > rows or size[1] > columns):
            raise UnreadableImage(path, f"a compressed frame declares {size[0]}×{size[1]} pixels but Rows×Columns "
                                        f"say {rows}×{columns}; export the image again", TOO_LARGE)  # fmt: skip


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
                                    f"for {what}", TOO_LARGE)  # fmt: skip


_CODEC_PACKAGES: dict[str, str] = {
    **dict.fromkeys((dicom_uid.JPEGBaseline8Bit, dicom_uid.JPEGExtended12Bit, dicom_uid.JPEGLossless,
                     dicom_uid.JPEGLosslessSV1, dicom_uid.JPEGLSLossless, dicom_uid.JPEGLSNearLossless),
                    "pylibjpeg pylibjpeg-libjpeg"),
    **dict.fromkeys((dicom_uid.JPEG2000Lossless, dicom_uid.JPEG2000, dicom_uid.HTJ2KLossless,
                     dicom_uid.HTJ2KLosslessRPCL, dicom_uid.HTJ2K), "pylibjpeg pylibjpeg-openjpeg"),
    dicom_uid.RLELossless: "pylibjpeg pylibjpeg-rle",
}  # fmt: skip
"""The registry packages whose pydicom plugin decodes each compressed transfer syntax (all medsilo dependencies)."""


def check_decoder(path: str | Path, transfer_syntax: str) -> None:
    """Refuse a file whose transfer syntax no installed pydicom pixel decoder handles, before decoding it.

    Args:
        path: the file, for the message.
        transfer_syntax: its (0002,0010) *Transfer Syntax UID*.

    Raises:
        UnreadableImage: kind :data:`CODEC_MISSING` (the syntax by name and the packages to install) when the
            decoder's plugins are missing; :data:`UNSUPPORTED` when pydicom has no decoder for it at all
            (video, or an unknown UID).
    """
    ts = dicom_uid.UID(transfer_syntax)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise UnreadableImage(path, f"transfer syntax '{ts.name}' has no image decoder (video or an unknown "
                                    "encoding); export the image uncompressed or in a lossless image transfer "
                                    "syntax", UNSUPPORTED) from None  # fmt: skip
    if not decoder.is_available:
        packages = _CODEC_PACKAGES.get(ts, "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle")
        raise UnreadableImage(path, f"no decoder installed for transfer syntax '{ts.name}'; install it with "
                                    f"'pip install {packages}' (medsilo's own install brings them)",
                              CODEC_MISSING)  # fmt: skip


CXR_MODALITIES: tuple[str, ...] = ("CR", "DX")
"""(0008,0060) *Modality* values a chest X-ray dataset takes: computed and digital radiography."""

_MODALITY_NAMES: dict[str, str] = {
    "CT": "computed tomography", "MR": "magnetic resonance", "US": "ultrasound", "NM": "nuclear medicine",
    "PT": "PET", "MG": "mammography", "XA": "X-ray angiography", "RF": "fluoroscopy", "IO": "intra-oral X-ray",
    "PX": "panoramic X-ray", "OT": "other", "SC": "secondary capture", "SEG": "segmentation", "SM": "slide microscopy",
    "XC": "photograph", "ES": "endoscopy", "OP": "ophthalmic photograph", "RTDOSE": "radiotherapy dose",
}  # fmt: skip

_FOR_PROCESSING_CLASSES: frozenset[str] = frozenset({
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral X-Ray Image Storage - For Processing
})  # fmt: skip

CXR_SOP_CLASSES: frozenset[str] = frozenset({
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage (public CXR sets, e.g. RSNA, use it with CR)
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture Image Storage
})  # fmt: skip
"""(0008,0016) *SOP Class UID* values a chest X-ray may have; any other class (a CT slice relabelled CR) is refused."""

_VIEW_POSITION_WORDS: dict[str, str] = {
    "PA": "PA", "POSTEROANTERIOR": "PA", "AP": "AP", "ANTEROPOSTERIOR": "AP",
    "LL": "LL", "RL": "LATERAL", "LATERAL": "LATERAL", "LAT": "LATERAL",
}  # fmt: skip
"""Words of (0018,5101) *View Position* (DICOM defined terms AP, PA, LL, RL; MIMIC-CXR also writes LATERAL)."""
_TEXT_WORDS: dict[str, str] = {k: v for k, v in _VIEW_POSITION_WORDS.items() if k not in ("LL", "RL")}
"""Words that name a view in free text; ``LL``/``RL`` are left out there (also "left/right lung", "lower lobe")."""


def _views_in(text: str, words: dict[str, str]) -> set[str]:
    return {words[w] for w in re.findall(r"[A-Z]+", text.upper()) if w in words}


def view_of(view_position: str = "", *texts: str) -> str:
    """The view of a chest X-ray from its header text.

    (0018,5101) *View Position* decides when it names exactly one view (``PA``, ``AP``, ``LL``; ``RL``,
    ``LATERAL`` and ``LAT`` give ``LATERAL``); otherwise the free ``texts`` — (0018,1030) *Protocol Name*,
    (0008,103E) *Series Description*, (0018,0015) *Body Part Examined* — when together they name exactly one
    (``CHEST PA`` → ``PA``; ``CHEST PA AND LAT`` names two → ``UNKNOWN``).

    Returns:
        One of :data:`medsilo.config.job.CXR_VIEWS`: ``PA``, ``AP``, ``LATERAL``, ``LL`` or ``UNKNOWN``.
    """
    by_position = _views_in(view_position, _VIEW_POSITION_WORDS)
    by_text = set().union(*(_views_in(t, _TEXT_WORDS) for t in texts))
    for found in (by_position, by_text):
        if len(found) == 1:
            return found.pop()
    return UNKNOWN_VIEW


@dataclass(frozen=True)
class DicomHeader:
    """What a DICOM file's header (read without its pixels) tells the chest X-ray reader.

    Attributes:
        rows, columns, frames: the declared image size.
        transfer_syntax: (0002,0010) UID, ``""`` when the file has no file meta.
        modality: (0008,0060), upper case, ``""`` when empty.
        presentation_intent: (0008,0068) *Presentation Intent Type*, upper case.
        sop_class: (0008,0016) *SOP Class UID*.
        view: :func:`view_of` the header's view text.
    """

    rows: int
    columns: int
    frames: int
    transfer_syntax: str
    modality: str
    presentation_intent: str
    sop_class: str
    view: str


_HEADER_TAGS = ["Rows", "Columns", "NumberOfFrames", "Modality", "PresentationIntentType", "SOPClassUID", "ViewPosition",
                "ProtocolName", "SeriesDescription", "BodyPartExamined"]  # fmt: skip


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword, "")
    if isinstance(value, pydicom.multival.MultiValue):
        value = " ".join(str(v) for v in value)
    return str(value or "").strip().upper()


def read_dicom_header(path: str | Path) -> DicomHeader:
    """Read a DICOM file's header, not its pixels, and refuse a size over :data:`CXR_MAX_PIXELS`.

    Raises:
        UnreadableImage: not DICOM or damaged (:data:`NOT_AN_IMAGE`); too many pixels (:data:`TOO_LARGE`).
    """
    path = Path(path)
    _check_file_bytes(path)
    try:
        with path.open("rb") as fp:
            head = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            meta = getattr(head, "file_meta", None)
            syntax = str(meta.get("TransferSyntaxUID", "") if meta is not None else "")
            heads = _check_trailing_bytes(path, fp, syntax)
        rows, cols = int(head.get("Rows", 0) or 0), int(head.get("Columns", 0) or 0)
        frames = int(head.get("NumberOfFrames", 1) or 1)
        header = DicomHeader(
            rows=rows, columns=cols, frames=frames,
            transfer_syntax=str(meta.get("TransferSyntaxUID", "") if meta is not None else ""),
            modality=_text(head, "Modality"), presentation_intent=_text(head, "PresentationIntentType"),
            sop_class=str(head.get("SOPClassUID", "")),
            view=view_of(_text(head, "ViewPosition"), _text(head, "ProtocolName"), _text(head, "SeriesDescription"),
                         _text(head, "BodyPartExamined")),
        )  # fmt: skip
    except UnreadableImage:
        raise
    except InvalidDicomError as exc:
        raise UnreadableImage(path, f"not a readable DICOM image (not DICOM: {_short(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - an unparsable header makes this one file unreadable
        raise UnreadableImage(path, f"not a readable DICOM image ({_short(exc)})") from None
    _check_declared_size(path, rows, cols, CXR_MAX_PIXELS, "chest X-rays", frames)
    _check_frame_sizes(path, heads, rows, cols)
    return header


def check_chest_xray(path: str | Path, header: DicomHeader) -> None:
    """Refuse a file that is not a chest X-ray image for presentation.

    Raises:
        UnreadableImage: kind :data:`WRONG_MODALITY`: *Modality* not CR or DX (named), or the image is *for
            processing* ((0008,0068) *Presentation Intent Type* anything but empty or ``FOR PRESENTATION``, or a
            *For Processing* SOP class), or a (0008,0016) *SOP Class UID* not in :data:`CXR_SOP_CLASSES`.
    """
    intent_ok = header.presentation_intent in ("", "FOR PRESENTATION")
    if not intent_ok or header.sop_class in _FOR_PROCESSING_CLASSES:
        raise UnreadableImage(path, "PresentationIntentType is 'FOR PROCESSING' (raw detector data, not meant for "
                                    "viewing); export the FOR PRESENTATION image instead", WRONG_MODALITY)  # fmt: skip
    if header.modality not in CXR_MODALITIES:
        if not header.modality:
            what = "Modality (0008,0060) is empty"
        else:
            name = _MODALITY_NAMES.get(header.modality)
            what = f"Modality is '{header.modality}'" + (f" ({name})" if name else "")
        raise UnreadableImage(path, f"{what}, not a chest X-ray; chest X-ray datasets take CR and DX images only",
                              WRONG_MODALITY)  # fmt: skip
    if header.sop_class not in CXR_SOP_CLASSES:
        raise UnreadableImage(path, f"SOPClassUID is '{dicom_uid.UID(header.sop_class).name or 'empty'}', not a "
                                    "CR, DX (for presentation) or secondary capture image; chest X-ray datasets "
                                    "take those only", WRONG_MODALITY)  # fmt: skip


class LoadCXR:
    """Load one chest X-ray DICOM as ``(1, H, W)`` float32 in [0, 1], MONOCHROME2.

    :meth:`read` also returns the image's view and modality (:class:`ImageRecord`); calling the reader returns
    the pixels alone.

    Args:
        allow_identifiable: accept files whose identifying attributes are filled in.

    Raises (from ``read`` and ``__call__``):
        IdentifyingImage: identifying attributes present and not allowed.
        UnreadableImage: missing, not DICOM, too large, not CR/DX or *for processing*, no decoder installed for
            its transfer syntax, no pixel data, not a single-frame grayscale image, bad VOI; ``kind`` says which
            (:data:`PROBLEM_KINDS`).
    """

    def __init__(self, allow_identifiable: bool = False):
        from monai.data import PydicomReader
        from monai.transforms import LoadImage

        self.allow_identifiable = allow_identifiable
        with _quiet_loader_setup():
            self._load = LoadImage(image_only=False, dtype=np.float32)
        self._reader = PydicomReader(swap_ij=False, prune_metadata=False)

    def __call__(self, path: str | Path) -> np.ndarray:
        return self.read(path).pixels

    def read(self, path: str | Path) -> ImageRecord:
        """Check the header, decode, check de-identification, apply the VOI transform; see the class."""
        path = Path(path)
        if not path.is_file():
            raise UnreadableImage(path, "file not found", MISSING)
        header = read_dicom_header(path)
        check_chest_xray(path, header)
        x, meta = self._decode(path, header)
        if not self.allow_identifiable:
            found = identifying_in_json_meta(meta)
            if found:
                raise IdentifyingImage(path, found)
        photometric = _first_str(meta, "00280004")
        if photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise UnreadableImage(path, f"PhotometricInterpretation is '{photometric}', expected MONOCHROME1/2",
                                  UNSUPPORTED)  # fmt: skip
        if x.ndim == 3 and x.shape[-1] == 1:
            x = x[..., 0]
        if x.ndim != 2:
            raise UnreadableImage(path, f"expected one 2-D frame, got pixel array of shape {tuple(x.shape)}",
                                  UNSUPPORTED)  # fmt: skip
        y = self._voi(x, meta, path)
        if photometric == "MONOCHROME1":
            y = 1.0 - y
        return ImageRecord(y[None], view=header.view, modality=header.modality)

    def decode(self, path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
        """Decode a DICOM file's pixels exactly as :meth:`read` does, without the chest X-ray checks.

        The size and decoder checks apply; modality, de-identification, photometric and VOI do not. Codec tests
        use it on DICOM files of any modality.

        Returns:
            Modality values (the stored pixels after (0028,1053) *Rescale Slope* and (0028,1052) *Rescale
            Intercept*) as float32 — ``(Rows, Columns)`` for one grayscale frame, MONAI's layout otherwise — and
            the header as MONAI's JSON-style metadata.
        """
        path = Path(path)
        if not path.is_file():
            raise UnreadableImage(path, "file not found", MISSING)
        return self._decode(path, read_dicom_header(path))

    def _decode(self, path: Path, header: DicomHeader) -> tuple[np.ndarray, dict[str, Any]]:
        if header.transfer_syntax:
            check_decoder(path, header.transfer_syntax)
        try:
            with warnings.catch_warnings():
                # CR has no ImageOrientation/Position, so MONAI warns about the affine on every file
                warnings.simplefilter("ignore", UserWarning)
                image, meta = self._load(path, reader=self._reader)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - any decoder failure makes this one file unreadable; Rust
            # decoders (pylibjpeg-rle) raise pyo3's PanicException, a BaseException, on a malformed frame
            raise UnreadableImage(path, f"not a readable DICOM image ({_short(exc)})") from None
        return np.asarray(image, dtype=np.float32), meta

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
                raise UnreadableImage(path, f"VOI LUT Sequence cannot be applied ({_short(exc)})", UNSUPPORTED) from None
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
                                        f"may have {limit} megapixels at most", TOO_LARGE) from None  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - an unparsable header makes this one file unreadable
            raise UnreadableImage(path, f"not a readable image ({_short(exc)})") from None
        _check_declared_size(path, height, width, self.max_pixels, self.what)
        if mode == "F":
            raise UnreadableImage(path, "floating-point pixels (Pillow mode F); export 8- or 16-bit images", UNSUPPORTED)
        return mode

    def read(self, path: str | Path) -> ImageRecord:
        """The pixels as an :class:`ImageRecord` (no view: only chest X-rays have one)."""
        return ImageRecord(self(path))

    def __call__(self, path: str | Path) -> np.ndarray:
        from monai.data import PILReader

        path = Path(path)
        if not path.is_file():
            raise UnreadableImage(path, "file not found", MISSING)
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
            raise UnreadableImage(path, f"expected a grayscale or RGB image, got array of shape {tuple(x.shape)}",
                                  UNSUPPORTED)  # fmt: skip
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
