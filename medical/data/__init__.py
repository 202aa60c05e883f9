"""Site data: manifests → readers (DICOM chest X-ray, pathology patches, generic images) → MONAI transforms → in-memory
splits. See :mod:`.readers`, :mod:`.transforms`, :mod:`.dataset` and :mod:`.deid`."""

from medsilo.medical.data.dataset import (
    ImageSet,
    LoadFailure,
    SiteData,
    channels_of,
    load_site_data,
    reader_for,
)
from medsilo.medical.data.readers import IdentifyingImage, LoadCXR, LoadImageFile, LoadPatch, UnreadableImage

__all__ = [
    "IdentifyingImage",
    "ImageSet",
    "LoadCXR",
    "LoadFailure",
    "LoadImageFile",
    "LoadPatch",
    "SiteData",
    "UnreadableImage",
    "channels_of",
    "load_site_data",
    "reader_for",
]
