"""Dataset manifests: ``path,label[,patient_id,split]`` CSV files (DESIGN §7).

One row per image. ``path`` is relative to the manifest's folder (or absolute); ``label`` is a class
name; ``patient_id`` is the site's pseudonym of the patient; ``split`` is ``train``, ``val`` or ``test``.

Every ``path`` must lead, once ``..`` and symbolic links are resolved, to a file inside the manifest's
folder (the folder of the manifest file itself, symlinks resolved), so a manifest cannot pull other files
of the machine into training. A site whose images live elsewhere says so in its config
(``data.allow_paths_outside_manifest: true``) and the caller passes ``allow_outside=True``.

Splits are by patient, never by image: a patient whose rows name two different splits is an error.
When the manifest has no ``split`` column, every patient is assigned one from a hash of its
``patient_id`` (60 / 20 / 20 by default), so the assignment is stable across runs and machines.
When it has no ``patient_id`` column, each image counts as its own patient, and a warning says so.

**Multi-label manifests** (a job with ``task: multilabel``, :func:`read_manifest` with ``labels``) have no
``label`` column but one column per label, named as the job names it (case ignored), each cell ``1`` (finding
present), ``0`` (absent) or blank (unknown; ``-1``, CheXpert's "uncertain", is read as blank too;
``1.0``/``0.0`` are accepted)::

    path,patient_id,split,pneumonia,effusion,nodule,cardiomegaly
    images/000000.dcm,H1-P00000,train,1,0,,0

What a blank means is the job's ``unknown`` policy: ``ignore`` (NaN: masked out of the loss and the metrics),
``negative`` (0) or ``positive`` (1).

Messages name the manifest, the line and the column; they never repeat patient IDs.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medsilo.errors import DataError, did_you_mean
from medsilo.fs import atomic_open

SPLITS: tuple[str, ...] = ("train", "val", "test")
COLUMNS: tuple[str, ...] = ("path", "label", "patient_id", "split", "source")
"""Known columns. ``source`` marks where an image came from (e.g. ``pcevolve`` for synthetic images)."""

UNKNOWN_POLICIES: dict[str, float] = {"ignore": math.nan, "negative": 0.0, "positive": 1.0}
"""What a blank multi-label cell becomes under each policy (NaN: unknown, masked out)."""
_CELLS: dict[str, float | None] = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "": None, "-1": None, "-1.0": None}  # fmt: skip


class ManifestError(DataError):
    """A manifest that cannot be used as it is."""


@dataclass(frozen=True)
class ManifestRow:
    """One image of a manifest.

    Attributes:
        path: absolute path of the image file, ``..`` and symbolic links resolved.
        label: index into the manifest's ``classes``.
        patient_id: the site's pseudonym of the patient (never logged).
        split: ``train``, ``val`` or ``test``.
        line: 1-based line number in the CSV, for messages.
        source: empty for the site's own images; otherwise what produced the image.
        targets: multi-label manifests: one value per label, 1.0 / 0.0, NaN for unknown (``label`` is then -1);
            empty for single-label ones.
    """

    path: Path
    label: int
    patient_id: str
    split: str
    line: int
    source: str = ""
    targets: tuple[float, ...] = ()


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest: its file, class names in label order, and rows.

    Attributes:
        labels: the label columns of a multi-label manifest (then equal to ``classes``); empty otherwise.
        unknown: the policy its blank cells were read with (multi-label only).
    """

    file: Path
    classes: tuple[str, ...]
    rows: tuple[ManifestRow, ...]
    labels: tuple[str, ...] = ()
    unknown: str = "ignore"

    @property
    def multilabel(self) -> bool:
        """True when rows carry one target per label."""
        return bool(self.labels)

    def split(self, name: str) -> list[ManifestRow]:
        """Rows of one split (``train``, ``val`` or ``test``)."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return [r for r in self.rows if r.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class: ``{split: {class: n}}`` (every class listed, zeros included); for a
        multi-label manifest, positive images per split and label."""
        if self.multilabel:
            return {s: {c: sum(1 for r in self.rows if r.split == s and r.targets[k] == 1.0)
                        for k, c in enumerate(self.labels)} for s in SPLITS}  # fmt: skip
        tally = Counter((r.split, r.label) for r in self.rows)
        return {s: {c: tally[(s, k)] for k, c in enumerate(self.classes)} for s in SPLITS}


def assign_split(patient_id: str, fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> str:
    """Deterministic split of a patient from a hash of its ID (same answer on every machine)."""
    digest = hashlib.sha256(patient_id.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for name, frac in zip(SPLITS, fractions):
        edge += frac
        if u < edge:
            return name
    return SPLITS[-1]


def image_path(cell: str, base: Path, allow_outside: bool, where: str) -> Path:
    """The resolved file a manifest row's ``path`` names, refused when it leaves ``base``.

    Args:
        cell: the row's ``path`` as written (relative to ``base``, or absolute).
        base: the manifest's folder, already resolved.
        allow_outside: the site config's ``data.allow_paths_outside_manifest``.
        where: ``"<manifest>: line N"`` for messages.

    Raises:
        ManifestError: the path cannot be resolved, or it leads outside ``base`` and that is not allowed.
    """
    try:
        joined = base / Path(cell).expanduser()  # an absolute cell replaces base
        resolved = joined.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # unknown ~user, a symlink loop, a NUL byte
        raise ManifestError(f"{where}: path: {cell!r} cannot be resolved ({exc})") from None
    if allow_outside or resolved.is_relative_to(base):
        return resolved
    if Path(os.path.normpath(joined)).is_relative_to(base):
        how = f"leads through a symbolic link to {resolved}, outside"
    elif cell == str(resolved):
        how = "is outside"
    else:
        how = f"leads to {resolved}, outside"
    raise ManifestError(
        f"{where}: path: {cell!r} {how} the manifest's folder {base}; keep the site's images under that "
        "folder, or set data.allow_paths_outside_manifest: true in the site config"
    )


def multilabel_columns(path: str | Path) -> tuple[str, ...] | None:
    """The label columns of a multi-label manifest, read from its header alone: every column besides
    :data:`COLUMNS` when there is no ``label`` column; ``None`` for a single-label manifest (or a header that
    cannot be read, which :func:`read_manifest` then reports). For checks that have no job to name the labels
    (``medsilo site check``, ``medsilo data check``)."""
    try:
        with Path(path).open("r", encoding="utf-8-sig", newline="") as fh:
            header = [h.strip() for h in next(csv.reader(fh), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    if not header or "label" in (h.lower() for h in header):
        return None
    extra = tuple(h for h in header if h and h.lower() not in COLUMNS)
    return extra if len(extra) >= 2 else None


def read_manifest(
    path: str | Path,
    classes: Sequence[str] | None = None,
    *,
    split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    allow_outside: bool = False,
    labels: Sequence[str] | None = None,
    unknown: str = "ignore",
) -> Manifest:
    """Parse and check a manifest.

    Args:
        path: the CSV file.
        classes: class names in label order (from the job). ``None`` takes the sorted labels found. Ignored
            when ``labels`` is given.
        split_fractions: train/val/test shares used only when the manifest has no ``split`` column.
        allow_outside: accept image paths that lead outside the manifest's folder; pass the site config's
            ``data.allow_paths_outside_manifest``. Off by default: such a row is an error.
        labels: a multi-label job's labels: the manifest then has one column per label (1, 0 or blank) and no
            ``label`` column; each row's ``targets`` holds them in this order.
        unknown: a multi-label job's policy for blank cells (:data:`UNKNOWN_POLICIES`).

    Returns:
        The manifest with absolute, resolved image paths and integer labels.

    Raises:
        ManifestError: missing file, missing or unknown column, empty file, unknown label or split,
            duplicate path, a path outside the manifest's folder, a patient in two splits, a label cell that
            is not 1, 0 or blank — each naming the file, line and column.
    """
    path = Path(path)
    if unknown not in UNKNOWN_POLICIES:
        raise ValueError(f"unknown: must be one of {', '.join(UNKNOWN_POLICIES)}, got {unknown!r}")
    label_columns = {name.lower(): name for name in labels or ()}
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found; check the dataset's 'manifest' path in the site config")
    try:
        with path.open("r", encoding="utf-8-sig", newline="") as fh:
            raw = list(csv.reader(fh))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"{path}: not a readable UTF-8 CSV file ({exc})") from None
    if not raw or not any(cell.strip() for cell in raw[0]):
        raise ManifestError(f"{path}: empty manifest; expected a header line 'path,label[,patient_id,split]'")

    header = [h.strip().lower() for h in raw[0]]
    known = (*(c for c in COLUMNS if c != "label"), *label_columns) if label_columns else COLUMNS
    for name in header:
        if name == "label" and label_columns:
            raise ManifestError(f"{path}: line 1: column 'label': a multi-label job reads one column per label "
                                f"({', '.join(labels)}), not a label column; remove it")  # fmt: skip
        if name not in known:
            raise ManifestError(
                f"{path}: line 1: unknown column '{name}'; {did_you_mean(name, known)}"
                f"allowed columns: {', '.join(known)}"
            )
    for required in ("path", *(labels or ("label",))):
        if required.lower() not in header:
            raise ManifestError(f"{path}: line 1: missing required column '{required}' (header: {','.join(header)})")
    if len(set(header)) != len(header):
        raise ManifestError(f"{path}: line 1: repeated column name in header {','.join(header)}")

    records: list[tuple[int, dict[str, str]]] = []
    for lineno, cells in enumerate(raw[1:], start=2):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise ManifestError(f"{path}: line {lineno}: expected {len(header)} values, got {len(cells)}")
        records.append((lineno, {h: c.strip() for h, c in zip(header, cells)}))
    if not records:
        raise ManifestError(f"{path}: manifest has a header but no rows")

    if label_columns:
        classes = tuple(labels)
    elif classes is None:
        classes = sorted({rec["label"] for _, rec in records if rec["label"]})
    classes = tuple(classes)
    has_patient = "patient_id" in header
    has_split = "split" in header and any(rec["split"] for _, rec in records)
    if not has_patient:
        warnings.warn(
            f"{path}: no patient_id column; each image is treated as its own patient, "
            "so splits cannot keep a patient's images together",
            stacklevel=2,
        )

    base = path.resolve().parent
    rows: list[ManifestRow] = []
    seen_paths: dict[Path, int] = {}
    patient_split: dict[str, tuple[str, int]] = {}
    for lineno, rec in records:
        where = f"{path}: line {lineno}"
        if not rec["path"]:
            raise ManifestError(f"{where}: path: empty")
        img = image_path(rec["path"], base, allow_outside, where)
        if img in seen_paths:
            raise ManifestError(f"{where}: path: same image as line {seen_paths[img]}; list each image once")
        seen_paths[img] = lineno

        targets: tuple[float, ...] = ()
        if label_columns:
            targets = tuple(_target(rec[key], UNKNOWN_POLICIES[unknown], where, name)
                            for key, name in label_columns.items())  # fmt: skip
            label = ""
        else:
            label = rec["label"]
            if label not in classes:
                raise ManifestError(
                    f"{where}: label: '{label}' is not a class of this job; "
                    f"{did_you_mean(label, classes)}classes: {', '.join(classes)}"
                )
        patient = rec.get("patient_id", "") if has_patient else ""
        if has_patient and not patient:
            raise ManifestError(f"{where}: patient_id: empty; give every row the patient's pseudonym")
        patient = patient or f"image:{rec['path']}"

        if has_split:
            split = rec["split"].lower()
            if split not in SPLITS:
                raise ManifestError(
                    f"{where}: split: '{rec['split']}' is not a split; {did_you_mean(split, SPLITS)}"
                    f"use one of {', '.join(SPLITS)}"
                )
        else:
            split = assign_split(patient, split_fractions)
        if patient in patient_split and patient_split[patient][0] != split:
            other_split, other_line = patient_split[patient]
            raise ManifestError(
                f"{where}: split: this patient is in '{other_split}' on line {other_line} and in '{split}' here; "
                "splits must be by patient"
            )
        patient_split.setdefault(patient, (split, lineno))
        rows.append(
            ManifestRow(
                path=img,
                label=classes.index(label) if label else -1,
                patient_id=patient,
                split=split,
                line=lineno,
                source=rec.get("source", ""),
                targets=targets,
            )
        )
    return Manifest(file=path, classes=classes, rows=tuple(rows), labels=tuple(labels or ()),
                    unknown=unknown)  # fmt: skip


def _target(cell: str, blank: float, where: str, column: str) -> float:
    """One multi-label cell as 1.0, 0.0, or the policy's value for a blank (``-1``: uncertain, read as blank)."""
    if cell not in _CELLS:
        raise ManifestError(f"{where}: column '{column}': {cell!r} is not a label value; write 1 (present), "
                            f"0 (absent) or leave it blank (unknown)")  # fmt: skip
    value = _CELLS[cell]
    return blank if value is None else value


def write_manifest(path: str | Path, rows: Sequence[dict[str, str]], labels: Sequence[str] = ()) -> None:
    """Write a manifest from dicts with the keys of :data:`COLUMNS` (``source`` optional).

    With ``labels`` (a multi-label manifest) the rows carry one key per label (``"1"``, ``"0"`` or ``""``) and
    no ``label``. Paths should already be relative to ``path``'s folder. Written to a temporary file first and
    renamed, so a reader never sees half a manifest.
    """
    path = Path(path)
    columns = [c for c in COLUMNS if c != "source" or any(r.get("source") for r in rows)]
    if labels:
        columns = [c for c in columns if c != "label"]
        columns[columns.index("split") + 1 : columns.index("split") + 1] = list(labels)
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="raise", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
