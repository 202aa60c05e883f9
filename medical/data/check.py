"""Read a site's dataset the way a job does and say what is wrong with it, per file and in counts
(``medsilo site check``; the same readers and checks as :func:`.dataset.load_site_data`)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from tqdm import tqdm

from medsilo.config import read_manifest
from medsilo.errors import MedsiloError
from medsilo.medical.data.dataset import reader_for
from medsilo.medical.data.readers import IdentifyingImage, UnreadableImage

SHOWN = 3
"""Files named per problem in a row's detail (the rest are counted)."""


def check_dataset(name: str, ref: Any, config: Any, progress: bool = True) -> list[tuple[str, str, str]]:
    """Read dataset ``name`` of a site config the way a job reads it; returns ``(row, status, detail)`` rows
    for ``medsilo site check``: ``dataset NAME`` (counts per class and split, unreadable files against
    ``data.max_unreadable_fraction``) and, for chest X-ray, ``de-identification NAME`` (attribute keywords and
    files, never values).

    Args:
        name: the dataset's name in the site config.
        ref: its :class:`~medsilo.config.site.DatasetRef` (manifest, modality).
        config: the site's :class:`~medsilo.config.site.SiteConfig` (its data policy applies).
        progress: show a progress bar.
    """
    rows: list[tuple[str, str, str]] = []
    try:
        manifest = read_manifest(ref.manifest, allow_outside=config.data.allow_paths_outside_manifest)
    except MedsiloError as exc:
        return [(f"dataset {name}", "fail", str(exc))]
    allow = config.data.allow_identifiable_dicom
    reader = reader_for(ref.modality, allow_identifiable=allow)
    counts: Counter = Counter()
    unreadable: list[UnreadableImage] = []
    identifying: list[IdentifyingImage] = []
    for row in tqdm(manifest.rows, desc=f"check {name}", unit="img", disable=not progress, leave=False):
        try:
            reader(row.path)
        except IdentifyingImage as exc:
            identifying.append(exc)
            continue
        except UnreadableImage as exc:
            unreadable.append(exc)
            continue
        counts[(row.split, manifest.classes[row.label])] += 1
    total = len(manifest.rows)
    table = "; ".join(
        f"{split}: " + ", ".join(f"{c} {counts[(split, c)]}" for c in manifest.classes) for split in ("train", "val", "test")
    )
    limit = config.data.max_unreadable_fraction
    if unreadable and len(unreadable) / total > limit:
        rows.append((f"dataset {name}", "fail", f"{ref.manifest}: {len(unreadable)} of {total} files unreadable "
                                                     f"(limit {limit:.0%}): {_first(unreadable)}"))  # fmt: skip
    elif empty := [sp for sp in ("train", "val", "test") if not any(counts[(sp, c)] for c in manifest.classes)]:
        rows.append((f"dataset {name}", "fail", f"{ref.manifest}: no readable image in split(s) "
                                                     f"{', '.join(empty)}; every split needs images ({table})"))  # fmt: skip
    else:
        note = f", {len(unreadable)} unreadable skipped: {_first(unreadable)}" if unreadable else ""
        rows.append((f"dataset {name}", "warn" if unreadable else "ok",
                          f"{ref.manifest}: {total - len(unreadable) - len(identifying)} images ({table}){note}"))  # fmt: skip
    if ref.modality == "cxr":
        if identifying:
            keywords = sorted({k for exc in identifying for k in exc.keywords})
            rows.append((f"de-identification {name}", "fail",
                              f"{len(identifying)} DICOM file(s) with identifying attributes filled in "
                              f"({', '.join(keywords)}): {', '.join(e.path for e in identifying[:SHOWN])}"
                              f"{' …' if len(identifying) > SHOWN else ''}; de-identify them (or set "
                              "data.allow_identifiable_dicom: true if your governance allows)"))  # fmt: skip
        else:
            rows.append((f"de-identification {name}", "ok" if not allow else "warn",
                              "no identifying DICOM attributes found" if not allow
                              else "not checked: data.allow_identifiable_dicom is true"))  # fmt: skip
    return rows


def _first(failures: list) -> str:
    shown = "; ".join(f"{f.path}: {f.reason}" for f in failures[:SHOWN])
    return shown + (f"; … {len(failures) - SHOWN} more" if len(failures) > SHOWN else "")
