"""``medsilo data check``: read a dataset the way a job would, before any kit or job exists.

For hospital IT and data scientists preparing an export: it reads every image a manifest names with the reader a
job uses (the same code as ``medsilo site check``: :mod:`medsilo.medical.data.check`), prints readable images per
split and class (and per view for chest X-rays), names every unusable file with its manifest line and reason,
grouped by kind (missing file, not an image, codec missing, unsupported image, wrong modality, identifying, too
large), and exits 1 when a job would refuse the data: more unreadable files than ``data.max_unreadable_fraction``
allows, a split without a readable image, or DICOM files with identifying attributes filled in.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="check a dataset's files before a job reads them",
                       description="Commands on a site's image data.")  # fmt: skip
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    check = verbs.add_parser(
        "check",
        help="read every file of a manifest as a job would; counts, and each unusable file with its reason",
        description=(
            "Read every image MANIFEST names the way a job would: readable images per split and class (and per "
            "view for chest X-rays), every unusable file with its manifest line and reason, grouped by kind. The "
            "data policy (data.max_unreadable_fraction, allow_identifiable_dicom, allow_paths_outside_manifest) "
            "comes from --site-config, else the defaults. Exit 1 when a job would refuse the data (too many "
            "unreadable files, an empty split, identifying DICOM files), 2 for a missing or malformed manifest "
            "or site config."
        ),
    )
    check.add_argument("manifest", type=Path, metavar="MANIFEST", help="the CSV: path,label[,patient_id,split]")
    check.add_argument("--modality", choices=["cxr", "pathology", "image"], required=True,
                       help="cxr: DICOM chest X-rays (CR/DX); pathology: RGB patches; image: PNG/JPEG/TIFF")  # fmt: skip
    check.add_argument("--site-config", type=Path, default=None, metavar="FILE",
                       help="a site config (local/medsilo_site.yml) whose 'data' policy applies; default: the "
                            "default policy (5%% unreadable, no identifiable DICOM, images inside the manifest's "
                            "folder)")  # fmt: skip
    check.add_argument("--quiet", action="store_true", help="no progress bar while reading images")
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    # the data layer imports MONAI and torch: imported here, not when the parser is built (see medsilo.cli)
    from medsilo.config import load_site_config, read_manifest
    from medsilo.config.manifest import multilabel_columns
    from medsilo.config.site import DataPolicy
    from medsilo.medical.data.check import render_report, scan_dataset, verdicts

    policy = load_site_config(args.site_config).data if args.site_config is not None else DataPolicy()
    manifest = read_manifest(args.manifest, allow_outside=policy.allow_paths_outside_manifest,
                             labels=multilabel_columns(args.manifest))  # fmt: skip
    report = scan_dataset(manifest, args.modality, policy, progress=not args.quiet)
    print(render_report(report))
    source = f"the data policy of {args.site_config}" if args.site_config is not None else "the default data policy"
    failed = [row for row, status, _ in verdicts(report) if status == "fail"]
    if failed:
        print(f"{len(failed)} check(s) failed ({', '.join(failed)}) under {source}: a job would refuse this data")
        return 1
    print(f"a job would read this data (under {source})")
    return 0
