"""Types shared by the site config, the job spec and ``sites.yml``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationInfo

Modality = Literal["cxr", "pathology", "image"]
"""``cxr``: chest X-ray DICOM (1 channel); ``pathology``: RGB H&E patches (3 channels); ``image``: PNG, JPEG
or TIFF of any specialty, grayscale or RGB, with no domain-specific augmentation by default."""

MODALITY_CHANNELS: dict[str, int | None] = {"cxr": 1, "pathology": 3, "image": None}
"""Input channels each modality fixes (``None``: the job's ``channels``, or the data, decide)."""

PrivacyMode = Literal["none", "dp", "ckks", "ckks+dp"]
"""What the server may see of a site's upload (DESIGN §5)."""

PRIVACY_STRENGTH: dict[str, set[str]] = {
    "none": set(),
    "dp": {"dp"},
    "ckks": {"ckks"},
    "ckks+dp": {"ckks", "dp"},
}
"""The protections each mode applies; mode A is at least as strong as B when it applies all of B's."""

SITE_COMPONENTS: tuple[str, ...] = (
    "medsilo.components.executor.SiteExecutor",
    "medsilo.secure.filters.ProtectedOnly",
)
"""The only classes a site lets a job (or its own privacy scope) build: its ``class_allow_list``, exact paths."""
SERVER_COMPONENTS: tuple[str, ...] = ("medsilo.components.controller.RoundController",)
"""The only class the server lets a job build."""

SITE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
"""Site names become NVFlare client names and folder names: letters, digits, ``_ . -``."""


class Strict(BaseModel):
    """Base for config models: unknown fields are errors (typos must not pass silently), objects are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Resolve a relative path against the folder of the file it was written in."""
    base = (info.context or {}).get("base_dir")
    value = Path(value).expanduser()
    if not value.is_absolute() and base is not None:
        value = Path(base) / value
    return value
