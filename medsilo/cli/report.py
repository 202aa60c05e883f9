"""``medsilo report``: an HTML report from one or more run folders."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="HTML report from run folders",
        description="Tables and accuracy curves from one or more results.json (run folders or files) on the same sites.",
    )
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR", help="run folders (or results.json files)")
    p.add_argument("--out", type=Path, required=True, metavar="report.html")
    p.add_argument("--title", default="medsilo report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medsilo.report import load_results, write_report

    print(f"wrote {write_report([load_results(r) for r in args.runs], args.out, args.title)}")
    return 0
