"""Load a site's dataset from its manifest into memory, skipping unusable files up to a limit.

:func:`load_site_data` reads every image of a manifest once (reader → resize/pad), keeps the
``train``, ``val`` and ``test`` splits as ``(N, C, S, S)`` tensors in [0, 1], and hands out
:class:`ImageSet` datasets that augment (train only) and normalise per sample. Images are small in
federated jobs (64² by default), so a few thousand fit in a few tens of MB.

A file that cannot be used (missing, corrupt, not DICOM, no decoder for its transfer syntax, not a CR/DX
chest X-ray, identifying tags, wrong photometric) is logged with its path and reason and skipped. A job that
keeps only some chest X-ray views (``views``) drops the images of other views as they are read, and says how
many of each in the site's log and :attr:`SiteData.dropped_views`. When more than ``max_unreadable_fraction`` of the
manifest's files are unusable, or a split ends up empty, loading fails with a :class:`DataError`
that summarises the reasons — the site never trains on a silently shrunken dataset.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medsilo.config import augment
from medsilo.config.common import MODALITY_CHANNELS
from medsilo.config.manifest import SPLITS, Manifest, ManifestRow
from medsilo.config.site import DatasetRef
from medsilo.errors import DataError
from medsilo.medical.data.cache import ImageCache, stamp
from medsilo.medical.data.pacs import pull
from medsilo.medical.data.readers import (
    CODEC_MISSING,
    UNSUPPORTED,
    WRONG_MODALITY,
    LoadCXR,
    LoadImageFile,
    LoadPatch,
    UnreadableImage,
)
from medsilo.medical.data.slides import is_slide_manifest, tile_slides
from medsilo.medical.data.transforms import build_augmentation, normalize, preprocess

log = logging.getLogger(__name__)

MODALITIES: tuple[str, ...] = tuple(MODALITY_CHANNELS)
"""``cxr``, ``pathology``, ``image`` (:data:`medsilo.config.common.Modality`)."""


def reader_for(modality: str, *, allow_identifiable: bool = False, channels: int | None = None) -> Callable:
    """The file reader of ``modality``: path → ``(C, H, W)`` float32 in [0, 1]; its ``read(path)`` returns the
    pixels with what the header says (:class:`.readers.ImageRecord`: a chest X-ray's view and modality).

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
        labels: ``(N,)`` int64 class indices, or ``(N, K)`` float32 targets (1, 0, NaN = unknown) of a
            multi-label job.
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
    kind: str = "not an image"


@dataclass
class SiteData:
    """A site's loaded dataset.

    Attributes:
        train, val, test: the splits (train augments per sample).
        classes: class names in label order.
        modality: ``cxr``, ``pathology`` or ``image``.
        failures: files that were skipped, with reasons.
        augmentation: the training transforms in force, resolved (``()``: none).
        dropped_views: chest X-ray images left out because the job keeps other views: view → count.
    """

    train: ImageSet
    val: ImageSet
    test: ImageSet
    classes: tuple[str, ...]
    modality: str
    failures: list[LoadFailure] = field(default_factory=list)
    augmentation: tuple = ()
    dropped_views: dict[str, int] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        """The images' channel count (the model's input channels)."""
        return int(self.train.images.shape[1])

    def split(self, name: str) -> ImageSet:
        """A split by name."""
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def _category(failure: LoadFailure) -> str:
    """What the server may be told about one failure: the reason's first words, or only its kind where the reason
    quotes a header value (``Modality is 'X'``, a photometric or transfer syntax name), which a file can fill with
    any text."""
    if failure.kind in (WRONG_MODALITY, UNSUPPORTED, CODEC_MISSING):
        return failure.kind
    return failure.reason.split(" (")[0].split(";")[0]


def dataset_manifest(
    ref: DatasetRef, classes: Sequence[str] | None, *, allow_outside: bool = False, progress: bool = False
) -> Path:
    """The manifest file a site's dataset trains on: ``ref.manifest`` itself, or — for a whole-slide manifest (a
    ``slide`` column) — the patch manifest its slides tile into (:func:`.slides.tile_slides` with ``ref.slides``,
    cached), or — for a PACS dataset (``ref.pacs``) — the manifest of the instances pulled into the site's cache
    (:func:`.pacs.pull`). Read the result with :func:`medsilo.config.manifest.read_manifest`.

    Args:
        ref: the site config's dataset entry.
        classes: the job's class names (``None``: any label).
        allow_outside: the site config's ``data.allow_paths_outside_manifest``.
        progress: show a progress bar while slides are tiled or instances pulled.

    Raises:
        DataError: a slide manifest for another modality than ``pathology``. SlideError: a bad slide manifest
            or slide (see :mod:`.slides`). PacsError: a PACS dataset that cannot be pulled (see :mod:`.pacs`).
    """
    if ref.pacs is not None:
        return pull(ref.pacs, progress=progress).manifest
    if not is_slide_manifest(ref.manifest):
        return ref.manifest
    if ref.modality != "pathology":
        raise DataError(f"{ref.manifest}: a whole-slide manifest (column 'slide') needs modality 'pathology', not "
                        f"'{ref.modality}'")  # fmt: skip
    tiled = tile_slides(ref.manifest, ref.slides, classes=classes, allow_outside=allow_outside, progress=progress)
    return tiled.manifest


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
    views: Sequence[str] | None = None,
    cache: Path | None = None,
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
        views: chest X-ray only: the job's ``views`` (e.g. ``("PA", "AP")``); images whose view
            (:func:`.readers.view_of`) is not listed are dropped and counted. ``None``: every view.
        cache: a folder for the site's preprocessed-image cache (:mod:`.cache`): unchanged files are not
            decoded again. ``None``: read everything.

    Returns:
        The site's splits.

    Raises:
        DataError: too many unusable files, a split without a usable image, or ``views`` for a modality
            that has none; the message counts the reasons and names the first few files.
    """
    if views is not None and modality != "cxr":
        raise DataError(f"{manifest.file}: the job keeps only views {', '.join(views)}, but {modality} images have "
                        f"no view; only chest X-ray (cxr) jobs may set views")  # fmt: skip
    reader = reader_for(modality, allow_identifiable=allow_identifiable, channels=channels)
    resize = preprocess(image_size)

    from tqdm import tqdm

    loaded: dict[str, tuple[list[np.ndarray], list[int]]] = {s: ([], []) for s in SPLITS}
    failures: list[LoadFailure] = []
    dropped: Counter = Counter()
    rows: list[ManifestRow] = list(manifest.rows)
    store = None
    if cache is not None:
        store = ImageCache(cache, {"manifest": str(Path(manifest.file).resolve()), "modality": modality,
                                   "image_size": image_size, "channels": MODALITY_CHANNELS[modality] or channels,
                                   "identifiable": allow_identifiable})  # fmt: skip
    for row in tqdm(rows, desc=f"load {manifest.file.parent.name or modality}", unit="img",
                    disable=not progress, leave=False):  # fmt: skip
        hit = store.get(row.path) if store is not None else None
        if hit is not None:
            image, view = hit
        else:
            before = stamp(row.path) if store is not None else None
            try:
                record = reader.read(row.path)
            except UnreadableImage as exc:
                failures.append(LoadFailure(str(row.path), row.line, exc.reason, exc.kind))
                log.warning("skipping %s (manifest line %d): %s", row.path, row.line, exc.reason)
                continue
            image, view = np.asarray(resize(record.pixels), dtype=np.float32), record.view
            if store is not None:
                store.put(row.path, before, image, view)
        if views is not None and view not in views:
            dropped[view] += 1
            continue
        loaded[row.split][0].append(image)
        loaded[row.split][1].append(row.targets if manifest.multilabel else row.label)

    if store is not None:
        store.save()
        log.info("%s: %d image(s) from the preprocessed cache, %d newly cached", manifest.file, store.hits, store.added)
    total = len(rows)
    kept = f" (the job keeps views {', '.join(views)}; dropped {_view_counts(dropped)})" if dropped else ""
    if dropped:
        log.warning("%s: dropped %d image(s) of views the job does not keep (%s): %s", manifest.file,
                    sum(dropped.values()), ", ".join(views), _view_counts(dropped))  # fmt: skip
    if failures and len(failures) / total > max_unreadable_fraction:
        raise DataError(_failure_summary(manifest, failures, total, max_unreadable_fraction),
                        public=_failure_counts(failures, total, max_unreadable_fraction))  # fmt: skip
    empty = [s for s in SPLITS if not loaded[s][0]]
    if empty:
        detail = f"; {_failure_summary(manifest, failures, total, max_unreadable_fraction)}" if failures else ""
        raise DataError(
            f"{manifest.file}: no usable image in split(s) {', '.join(empty)}; every split needs images{kept}{detail}"
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
        dtype = torch.float32 if manifest.multilabel else torch.int64  # multi-label: (N, K) targets, NaN unknown
        sets[split] = ImageSet(x, torch.tensor(labels, dtype=dtype), transform)
    return SiteData(
        train=sets["train"], val=sets["val"], test=sets["test"],
        classes=manifest.classes, modality=modality, failures=failures, augmentation=steps,
        dropped_views=dict(dropped),
    )  # fmt: skip


def _view_counts(dropped: Counter) -> str:
    return ", ".join(f"{view} {n}" for view, n in sorted(dropped.items()))


def _failure_summary(manifest: Manifest, failures: list[LoadFailure], total: int, limit: float) -> str:
    examples = "; ".join(f"line {f.line} {f.path}: {f.reason}" for f in failures[:3])
    return f"{manifest.file}: {_failure_counts(failures, total, limit)}. First: {examples}"


def _failure_counts(failures: list[LoadFailure], total: int, limit: float) -> str:
    """How many images could not be used and why, by kind — no file names (what a site may tell the server)."""
    counts = Counter(_category(f) for f in failures)
    kinds = ", ".join(f"{n}× {kind}" for kind, n in counts.most_common())
    return (f"{len(failures)} of {total} images ({len(failures) / total:.0%}) could not be used, more than the "
            f"allowed {limit:.0%} (data.max_unreadable_fraction): {kinds}")  # fmt: skip
