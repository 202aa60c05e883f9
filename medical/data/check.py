"""Read a site's dataset the way a job does and say what is wrong with it, per file and in counts.

One scan (:func:`scan_dataset`: the same readers and checks as :func:`.dataset.load_site_data`) serves both
commands that look at data before a job does: ``medsilo site check`` (:func:`check_dataset`, a few table rows
per dataset of a site's kit) and ``medsilo data check`` (:func:`render_report`, every unusable file named and
grouped by kind, for hospital IT and data scientists without a kit). Both judge the scan with
:func:`verdicts`, so they agree on what passes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from medsilo.config import read_manifest
from medsilo.config.manifest import SPLITS, Manifest, multilabel_columns
from medsilo.config.site import DataPolicy
from medsilo.errors import MedsiloError
from medsilo.medical.data.dataset import dataset_manifest, reader_for
from medsilo.medical.data.readers import IDENTIFYING, PROBLEM_KINDS, IdentifyingImage, UnreadableImage

SHOWN = 3
"""Files named per problem in a ``medsilo site check`` row's detail (the rest are counted)."""


@dataclass(frozen=True)
class Problem:
    """One manifest row whose image cannot be used.

    Attributes:
        line: its line in the manifest.
        path: the image file.
        kind: one of :data:`.readers.PROBLEM_KINDS`.
        reason: why, and what to do (attribute keywords, never values or patient IDs).
        keywords: identifying files only: the identifying attributes that are filled in.
    """

    line: int
    path: str
    kind: str
    reason: str
    keywords: tuple[str, ...] = ()


@dataclass
class DataReport:
    """What reading every image of a manifest found.

    Attributes:
        manifest: the manifest read.
        modality: ``cxr``, ``pathology`` or ``image``.
        policy: the data policy it was judged by (``max_unreadable_fraction``, identifiable DICOM).
        counts: readable images per ``(split, class)``; a multi-label image counts once per positive label.
        views: chest X-ray only: readable images per ``(split, view)``.
        readable: readable images per split (a multi-label image with no positive label counts here only).
        problems: the unusable rows, in manifest order.
    """

    manifest: Manifest
    modality: str
    policy: DataPolicy
    counts: Counter = field(default_factory=Counter)
    views: Counter = field(default_factory=Counter)
    readable: Counter = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Rows of the manifest."""
        return len(self.manifest.rows)

    @property
    def unreadable(self) -> list[Problem]:
        """Problems other than identifying attributes (those have their own check)."""
        return [p for p in self.problems if p.kind != IDENTIFYING]

    @property
    def identifying(self) -> list[Problem]:
        """Files refused for identifying attributes."""
        return [p for p in self.problems if p.kind == IDENTIFYING]

    def by_kind(self) -> dict[str, list[Problem]]:
        """Problems grouped by kind, in :data:`.readers.PROBLEM_KINDS` order (kinds with none left out)."""
        order = {kind: i for i, kind in enumerate(PROBLEM_KINDS)}
        groups: dict[str, list[Problem]] = {}
        for problem in sorted(self.problems, key=lambda p: (order.get(p.kind, len(order)), p.line)):
            groups.setdefault(problem.kind, []).append(problem)
        return groups

    def table(self) -> str:
        """``train: normal 4, pneumonia 3; val: …`` — readable images per split and class."""
        return "; ".join(f"{split}: " + ", ".join(f"{c} {self.counts[(split, c)]}" for c in self.manifest.classes)
                         for split in SPLITS)  # fmt: skip


def scan_dataset(manifest: Manifest, modality: str, policy: DataPolicy, progress: bool = True) -> DataReport:
    """Read every image of ``manifest`` with the reader a job uses for ``modality`` and record what it finds.

    Args:
        manifest: the parsed manifest.
        modality: ``cxr``, ``pathology`` or ``image``.
        policy: the site's data policy (``allow_identifiable_dicom`` applies while reading).
        progress: show a progress bar.

    Returns:
        Counts per split and class (and view), and every unusable file with its kind and reason.
    """
    reader = reader_for(modality, allow_identifiable=policy.allow_identifiable_dicom)
    report = DataReport(manifest, modality, policy)
    name = manifest.file.parent.name or modality
    for row in tqdm(manifest.rows, desc=f"check {name}", unit="img", disable=not progress, leave=False):
        try:
            record = reader.read(row.path)
        except UnreadableImage as exc:
            keywords = tuple(exc.keywords) if isinstance(exc, IdentifyingImage) else ()
            report.problems.append(Problem(row.line, str(row.path), exc.kind, exc.reason, keywords))
            continue
        if manifest.multilabel:
            names = [label for label, t in zip(manifest.labels, row.targets, strict=True) if t == 1.0]
        else:
            names = [manifest.classes[row.label]]
        for c in names:
            report.counts[(row.split, c)] += 1
        report.readable[row.split] += 1
        if record.view is not None:
            report.views[(row.split, record.view)] += 1
    return report


def verdicts(report: DataReport, name: str = "", *, examples: bool = True) -> list[tuple[str, str, str]]:
    """Judge a scan: ``(row, status, detail)`` rows, status ``ok``, ``warn`` or ``fail``; with ``examples``, a
    detail names the first few problem files (``medsilo site check``; ``medsilo data check`` lists them all above).

    ``dataset NAME`` fails when more than ``max_unreadable_fraction`` of the files are unreadable (identifying
    files aside) or a split has no readable image, and warns when some files are skipped; for chest X-ray,
    ``de-identification NAME`` fails when any file has identifying attributes filled in (keywords and files
    are named, never values) and warns when the policy lets them through unchecked.
    """
    suffix = f" {name}" if name else ""
    file, total, unreadable, limit = report.manifest.file, report.total, report.unreadable, report.policy.max_unreadable_fraction
    table = report.table()
    rows: list[tuple[str, str, str]] = []
    if unreadable and len(unreadable) / total > limit:
        rows.append((f"dataset{suffix}", "fail", f"{file}: {len(unreadable)} of {total} files unreadable "
                                                 f"(limit {limit:.0%}){_examples(unreadable, examples)}"))  # fmt: skip
    elif empty := [sp for sp in SPLITS if not report.readable[sp]]:
        rows.append((f"dataset{suffix}", "fail", f"{file}: no readable image in split(s) "
                                                 f"{', '.join(empty)}; every split needs images ({table})"))  # fmt: skip
    else:
        note = f", {len(unreadable)} unreadable skipped{_examples(unreadable, examples)}" if unreadable else ""
        usable = total - len(report.problems)
        rows.append((f"dataset{suffix}", "warn" if unreadable else "ok", f"{file}: {usable} images ({table}){note}"))
    if report.modality == "cxr":
        identifying, allow = report.identifying, report.policy.allow_identifiable_dicom
        if identifying:
            keywords = sorted({k for p in identifying for k in p.keywords})
            rows.append((f"de-identification{suffix}", "fail",
                         f"{len(identifying)} DICOM file(s) with identifying attributes filled in "
                         f"({', '.join(keywords)})"
                         + (f": {', '.join(p.path for p in identifying[:SHOWN])}{' …' if len(identifying) > SHOWN else ''}"
                            if examples else "")
                         + "; de-identify them (or set "
                         "data.allow_identifiable_dicom: true if your governance allows)"))  # fmt: skip
        else:
            rows.append((f"de-identification{suffix}", "ok" if not allow else "warn",
                         "no identifying DICOM attributes found" if not allow
                         else "not checked: data.allow_identifiable_dicom is true"))  # fmt: skip
    return rows


def check_dataset(name: str, ref: Any, config: Any, progress: bool = True) -> list[tuple[str, str, str]]:
    """Read dataset ``name`` of a site config the way a job reads it; returns ``(row, status, detail)`` rows
    for ``medsilo site check`` (:func:`verdicts`; a manifest that cannot be read is one failing row).

    Args:
        name: the dataset's name in the site config.
        ref: its :class:`~medsilo.config.site.DatasetRef` (manifest, modality).
        config: the site's :class:`~medsilo.config.site.SiteConfig` (its data policy applies).
        progress: show a progress bar.
    """
    try:
        # a PACS dataset is pulled into the site's cache and whole slides are tiled first (a job then reuses
        # either), and checked as the manifest a job would read
        outside = config.data.allow_paths_outside_manifest
        file = dataset_manifest(ref, None, allow_outside=outside, progress=progress)
        manifest = read_manifest(file, allow_outside=outside, labels=multilabel_columns(file))
    except MedsiloError as exc:
        return [(f"dataset {name}", "fail", str(exc))]
    return verdicts(scan_dataset(manifest, ref.modality, config.data, progress), name)


def render_report(report: DataReport) -> str:
    """The full text ``medsilo data check`` prints: counts per split and class, views, every unusable file
    grouped by kind with its manifest line and reason, and the verdict rows."""
    m = report.manifest
    out = [f"{m.file}: {report.total} image(s) listed, modality {report.modality}"]
    width = max(len(c) for c in (*m.classes, "split")) + 2
    out += ["", "readable images per split and class:", "  " + "split".ljust(8) + "".join(c.rjust(width) for c in m.classes)]
    out += ["  " + split.ljust(8) + "".join(str(report.counts[(split, c)]).rjust(width) for c in m.classes)
            for split in SPLITS]  # fmt: skip
    if report.modality == "cxr":
        views = sorted({v for _, v in report.views})
        out += ["", "views (a job may keep some with 'views: [PA, AP]'):"]
        out += [f"  {split}: " + (", ".join(f"{v} {report.views[(split, v)]}" for v in views) or "none")
                for split in SPLITS]  # fmt: skip
    groups = report.by_kind()
    if groups:
        share = len(report.problems) / report.total
        out += ["", f"{len(report.problems)} of {report.total} file(s) unusable ({share:.0%}):"]
        for kind, problems in groups.items():
            out.append(f"  {kind} ({len(problems)}):")
            out += [f"    line {p.line}: {p.path}: {p.reason}" for p in problems]
    else:
        out += ["", "every file is usable"]
    out.append("")
    out += [f"{status:<5} {row}: {detail}" for row, status, detail in verdicts(report, examples=False)]
    return "\n".join(out)


def _examples(problems: list[Problem], shown: bool) -> str:
    return f": {_first(problems)}" if shown else ""


def _first(problems: list[Problem]) -> str:
    shown = "; ".join(f"{p.path}: {p.reason}" for p in problems[:SHOWN])
    return shown + (f"; … {len(problems) - SHOWN} more" if len(problems) > SHOWN else "")
