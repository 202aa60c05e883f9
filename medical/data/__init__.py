"""Site data: manifests → readers (DICOM chest X-ray, pathology patches) → MONAI transforms → in-memory
splits. See :mod:`.readers`, :mod:`.transforms`, :mod:`.dataset` and :mod:`.deid`."""

from medsilo.medical.data.dataset import ImageSet, LoadFailure, SiteData, channels_of, load_site_data
from medsilo.medical.data.readers import IdentifyingImage, LoadCXR, LoadPatch, UnreadableImage

__all__ = [
    "IdentifyingImage",
    "ImageSet",
    "LoadCXR",
    "LoadFailure",
    "LoadPatch",
    "SiteData",
    "UnreadableImage",
    "channels_of",
    "load_site_data",
]
