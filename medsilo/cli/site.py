"""``medsilo site check``: preflight of one hospital site's startup kit."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("site", help="check a hospital site's kit before starting it",
                       description="Commands for hospital IT on a site's startup kit.")  # fmt: skip
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    check = verbs.add_parser(
        "check",
        help="preflight: config, data, de-identification, HE context, ledger, budget, versions",
        description=(
            "Check one site's startup kit: NVFlare startup files and their signatures, local/medsilo_site.yml, every "
            "dataset (counts per class and split, unreadable files, read as 'medsilo data check' reads them; run that "
            "on a manifest for every file's reason), DICOM de-identification, the CKKS context, the "
            "privacy ledger's chain and signatures, the DP budget left, package versions. Prints a table; exit 1 "
            "when any check fails."
        ),
    )
    check.add_argument("--kit", type=Path, required=True, metavar="SITE_KIT_DIR", help="the site's kit folder")
    check.add_argument("--quiet", action="store_true", help="no progress bar while reading images")
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    from medsilo.medical.data.check import check_dataset
    from medsilo.provisioning.check import check_kit, render

    rows = check_kit(args.kit, datasets=check_dataset, progress=not args.quiet)
    print(render(rows))
    failed = [r.name for r in rows if r.status == "fail"]
    if failed:
        print(f"{len(failed)} check(s) failed: {', '.join(failed)}; fix them before starting the site")
        return 1
    print("all checks passed" + (" (with warnings)" if any(r.status == "warn" for r in rows) else ""))
    return 0
