"""Load a site's dataset from its manifest into memory, skipping unusable files up to a limit.

:func:`load_site_data` reads every image of a manifest once (reader → resize/pad), keeps the
``train``, ``val`` and ``test`` splits as ``(N, C, S, S)`` tensors in [0, 1], and hands out
:class:`ImageSet` datasets that augment (train only) and normalise per sample. Images are small in
federated jobs (64² by default), so a few thousand fit in a few tens of MB.

A file that cannot be used (missing, corrupt, not DICOM, identifying tags, wrong photometric) is
logged with its path and reason and skipped. When more than ``max_unreadable_fraction`` of the
manifest's files are unusable, or a split ends up empty, loading fails with a :class:`DataError`
that summarises the reasons — the site never trains on a silently shrunken dataset.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from medsilo.config import augment
from medsilo.config.common import MODALITY_CHANNELS
from medsilo.config.manifest import SPLITS, Manifest, ManifestRow
from medsilo.errors import DataError
from medsilo.medical.data.readers import LoadCXR, LoadImageFile, LoadPatch, UnreadableImage
from medsilo.medical.data.transforms import build_augmentation, normalize, preprocess

log = logging.getLogger(__name__)

MODALITIES: tuple[str, ...] = tuple(MODALITY_CHANNELS)
"""``cxr``, ``pathology``, ``image`` (:data:`medsilo.config.common.Modality`)."""


def reader_for(modality: str, *, allow_identifiable: bool = False, channels: int | None = None) -> Callable:
    """The file reader of ``modality``: path → ``(C, H, W)`` float32 in [0, 1].

    Args:
        modality: ``cxr`` (DICOM, :class:`.readers.LoadCXR`), ``pathology`` (RGB patches) or ``image``.
        allow_identifiable: chest X-ray only: accept DICOMs with identifying attributes.
        channels: ``image`` only: 1 or 3 to convert every file, ``None`` to keep each file's own.
    """
    if modality == "cxr":
        return LoadCXR(allow_identifiable)
    if modality == "pathology":
        return LoadPatch()
    if modality == "image":
        return LoadImageFile(channels)
    raise DataError(f"modality: must be one of {', '.join(MODALITIES)}, got {modality!r}")


def channels_of(modality: str) -> int:
    """Input channels a modality fixes (1 for chest X-ray, 3 for pathology); for ``image`` the job or the
    data decide (:attr:`SiteData.channels`)."""
    channels = MODALITY_CHANNELS[modality]
    if channels is None:
        raise ValueError(f"modality '{modality}' does not fix the channel count; read it from the loaded data")
    return channels


class ImageSet(torch.utils.data.Dataset):
    """One split held in memory.

    Args:
        images: ``(N, C, S, S)`` float32 in [0, 1].
        labels: ``(N,)`` int64 class indices.
        augment: random transform applied per sample before normalisation (training only), or ``None``.

    Items are ``(x, y)`` with ``x`` ``(C, S, S)`` normalised (see :func:`.transforms.normalize`).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: Callable | None = None):
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"images (N, C, S, S) and labels (N,) disagree: {tuple(images.shape)} vs {tuple(labels.shape)}")
        self.images = images
        self.labels = labels
        self.augment = augment

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[index]
        if self.augment is not None:
            x = torch.as_tensor(self.augment(x)).as_subclass(torch.Tensor)
        return normalize(x), self.labels[index]

    def class_counts(self, num_classes: int) -> torch.Tensor:
        """Images per class, ``(K,)`` int64."""
        return torch.bincount(self.labels, minlength=num_classes)


@dataclass(frozen=True)
class LoadFailure:
    """One skipped file: path, manifest line and reason (no image content, no patient IDs)."""

    path: str
    line: int
    reason: str


@dataclass
class SiteData:
    """A site's loaded dataset.

    Attributes:
        train, val, test: the splits (train augments per sample).
        classes: class names in label order.
        modality: ``cxr``, ``pathology`` or ``image``.
        failures: files that were skipped, with reasons.
        augmentation: the training transforms in force, resolved (``()``: none).
    """

    train: ImageSet
    val: ImageSet
    test: ImageSet
    classes: tuple[str, ...]
    modality: str
    failures: list[LoadFailure] = field(default_factory=list)
    augmentation: tuple = ()

    @property
    def channels(self) -> int:
        """The images' channel count (the model's input channels)."""
        return int(self.train.images.shape[1])

    def split(self, name: str) -> ImageSet:
        """A split by name."""
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def _category(reason: str) -> str:
    return reason.split(" (")[0].split(";")[0]


def load_site_data(
    manifest: Manifest,
    *,
    modality: str,
    image_size: int,
    max_unreadable_fraction: float = 0.05,
    allow_identifiable: bool = False,
    seed: int | None = None,
    progress: bool = False,
    augmentation: augment.AugmentationChoice | tuple = "default",
    channels: int | None = None,
) -> SiteData:
    """Read, check and preprocess every image of ``manifest``.

    Args:
        manifest: the parsed manifest (classes in the job's order).
        modality: ``cxr``, ``pathology`` or ``image``.
        image_size: square side S of the model input.
        max_unreadable_fraction: share of files that may be skipped before loading fails.
        allow_identifiable: accept DICOMs with identifying attributes (site policy).
        seed: seeds the training augmentation.
        progress: show a progress bar.
        augmentation: the job's ``training.augmentation`` (validated): ``default`` (the modality's recipe),
            ``none``, or transform entries (:mod:`medsilo.config.augment`).
        channels: ``image`` only: 1 or 3 to convert every file; ``None``: 3 if any file is in colour (the
            grayscale ones are replicated), else 1.

    Returns:
        The site's splits.

    Raises:
        DataError: too many unusable files, or a split without a usable image; the message counts
            the reasons and names the first few files.
    """
    reader = reader_for(modality, allow_identifiable=allow_identifiable, channels=channels)
    resize = preprocess(image_size)

    from tqdm import tqdm

    loaded: dict[str, tuple[list[np.ndarray], list[int]]] = {s: ([], []) for s in SPLITS}
    failures: list[LoadFailure] = []
    rows: list[ManifestRow] = list(manifest.rows)
    for row in tqdm(rows, desc=f"load {manifest.file.parent.name or modality}", unit="img",
                    disable=not progress, leave=False):  # fmt: skip
        try:
            image = np.asarray(resize(reader(row.path)), dtype=np.float32)
        except UnreadableImage as exc:
            failures.append(LoadFailure(str(row.path), row.line, exc.reason))
            log.warning("skipping %s (manifest line %d): %s", row.path, row.line, exc.reason)
            continue
        loaded[row.split][0].append(image)
        loaded[row.split][1].append(row.label)

    total = len(rows)
    if failures and len(failures) / total > max_unreadable_fraction:
        raise DataError(_failure_summary(manifest, failures, total, max_unreadable_fraction),
                        public=_failure_counts(failures, total, max_unreadable_fraction))  # fmt: skip
    empty = [s for s in SPLITS if not loaded[s][0]]
    if empty:
        detail = f"; {_failure_summary(manifest, failures, total, max_unreadable_fraction)}" if failures else ""
        raise DataError(
            f"{manifest.file}: no usable image in split(s) {', '.join(empty)}; every split needs images{detail}"
        )

    fixed = MODALITY_CHANNELS[modality] or channels
    present = {image.shape[0] for split in SPLITS for image in loaded[split][0]}
    want = fixed or max(present)
    if present - {want, 1} or (fixed and present != {want}):
        raise DataError(f"{manifest.file}: {modality} images should have {want} channel(s), got "
                        f"{', '.join(map(str, sorted(present)))}")  # fmt: skip
    steps = augment.resolve(augmentation, modality)
    sets = {}
    for split in SPLITS:
        images, labels = loaded[split]
        x = torch.from_numpy(np.stack(images)) if {i.shape[0] for i in images} == {want} else \
            torch.from_numpy(np.stack([np.broadcast_to(i, (want, *i.shape[1:])) for i in images]))  # fmt: skip
        train = split == "train"
        transform = build_augmentation(steps, channels=want, seed=seed, image_size=image_size) if train else None
        sets[split] = ImageSet(x, torch.tensor(labels, dtype=torch.int64), transform)
    return SiteData(
        train=sets["train"], val=sets["val"], test=sets["test"],
        classes=manifest.classes, modality=modality, failures=failures, augmentation=steps,
    )  # fmt: skip


def _failure_summary(manifest: Manifest, failures: list[LoadFailure], total: int, limit: float) -> str:
    examples = "; ".join(f"line {f.line} {f.path}: {f.reason}" for f in failures[:3])
    return f"{manifest.file}: {_failure_counts(failures, total, limit)}. First: {examples}"


def _failure_counts(failures: list[LoadFailure], total: int, limit: float) -> str:
    """How many images could not be used and why, by kind — no file names (what a site may tell the server)."""
    counts = Counter(_category(f.reason) for f in failures)
    kinds = ", ".join(f"{n}× {kind}" for kind, n in counts.most_common())
    return (f"{len(failures)} of {total} images ({len(failures) / total:.0%}) could not be used, more than the "
            f"allowed {limit:.0%} (data.max_unreadable_fraction): {kinds}")  # fmt: skip
