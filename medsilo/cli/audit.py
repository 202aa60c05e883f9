"""``medsilo audit``: verify privacy ledgers, and report what left each party and the privacy budget spent.

``medsilo audit verify LEDGER_OR_DIR... [--root-ca FILE]`` checks every line of every ledger (chain links,
signatures, signer certificates; :mod:`medsilo.secure.ledger`), then across them (:mod:`medsilo.secure.anchors`):
each ledger is its place's party (``hospital-1/privacy_ledger.jsonl`` holds hospital-1's entries), and no site
ledger is shorter than, or differs from, what the server's ledger recorded receiving from that site. It prints
one line per file: ``FILE: OK, N entries (party P); key custody: …`` or ``FILE:LINE: reason`` for the first problem.
Key custody comes from the ledger's signed ``policy_loaded`` entries (:func:`medsilo.secure.audit.ledger_custody`):
``site-generated`` (the key was made at the site; the coordinator never held it) or ``central`` (the coordinator
provisioned it, so it could have signed these entries). With ``--crl FILE`` — or a ``crl.pem`` found beside the
root CA (or in the kit's ``local/``) — entries signed by a revoked certificate after its revocation time are
problems; entries before it stay valid (:mod:`medsilo.secure.revocation`). Exit status 0 when every ledger
holds, 1 when any does not, 2 on bad input (a missing file, an unreadable root CA or revocation list).

``medsilo audit report LEDGER_OR_DIR... --out FILE.html|FILE.json [--root-ca FILE] [--crl FILE]
[--allow-unverified]`` opens with one table across parties (verified?, key custody, entries, releases plaintext /
encrypted, ε spent vs cap, refusals, last entry time), then summarizes, per party and job: events by kind, what left (count, bytes, encrypted or not), ε spent per
budget scope against the cap over time (cap = the latest ``epsilon_cap`` in the entries' ``privacy``; ε recomposed
with the site's accountant from the recorded mechanism events, flagged when it differs from what the site wrote),
refusals with reasons, aggregate releases, and the job's lines in an NVFlare ``audit.log`` next to the
ledger (``<folder>/audit.log`` and ``<folder>/<job>/audit.log``). It refuses (exit 1) when a ledger fails
verification, unless ``--allow-unverified`` is given; the report then says so on top, in red.

A folder argument is searched recursively for ledgers named :data:`LEDGER_GLOB` (``privacy_ledger.jsonl``,
``hospital-1.ledger.jsonl``, …); a file argument is checked whatever its name.

This module parses arguments and prints; what an audit finds is :mod:`medsilo.secure.audit` (pure data, no
torch, TenSEAL or matplotlib) and the HTML page is :mod:`medsilo.audit_report`. Both are imported inside the
``run_*`` functions, as every CLI module does (:mod:`medsilo.cli`), so ``medsilo --help`` stays cheap.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medsilo.errors import MedsiloError
from medsilo.fs import write_atomic

LEDGER_GLOB = "*ledger*.jsonl"
"""File names searched for under folder arguments (recursively)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="verify privacy ledgers; report what left each site",
        description="Check the signed, hash-chained privacy ledgers of sites and server, and report on them.",
    )
    crl_help = (
        "the project's revocation list (crl.pem, signed by the root CA; default: crl.pem beside --root-ca): "
        "entries signed by a revoked certificate after its revocation are flagged"
    )
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    paths_help = f"ledger files, or folders searched recursively for {LEDGER_GLOB}"
    ca_help = (
        "the provisioned root CA (a kit's startup/rootCA.pem): every signer certificate must chain to it"
    )
    verify = verbs.add_parser(
        "verify",
        help="check every chain link and signature",
        description=(
            "Check every line of each ledger: chain links, sequence, signatures and signer certificates. "
            "Prints 'FILE: OK, N entries' or 'FILE:LINE: reason' (first bad line) per file; exit 0 only if all hold."
        ),
    )
    verify.add_argument("ledgers", type=Path, nargs="+", metavar="LEDGER_OR_DIR", help=paths_help)
    verify.add_argument("--root-ca", type=Path, metavar="FILE", help=ca_help)
    verify.add_argument("--crl", type=Path, metavar="FILE", help=crl_help)
    verify.add_argument(
        "--party",
        metavar="NAME",
        help="the party every given ledger must belong to (e.g. the site whose ledger you audit)",
    )
    verify.set_defaults(func=run_verify)
    report = verbs.add_parser(
        "report",
        help="what left each party, ε spent vs cap, refusals",
        description=(
            "Summarize verified ledgers per party and job: releases (bytes, encrypted or not), ε spent per budget "
            "scope against the cap, refusals, aggregate releases, matching NVFlare audit.log lines."
        ),
    )
    report.add_argument("ledgers", type=Path, nargs="+", metavar="LEDGER_OR_DIR", help=paths_help)
    report.add_argument("--out", type=Path, required=True, metavar="FILE.html|FILE.json")
    report.add_argument("--root-ca", type=Path, metavar="FILE", help=ca_help)
    report.add_argument("--crl", type=Path, metavar="FILE", help=crl_help)
    report.add_argument(
        "--allow-unverified",
        action="store_true",
        help="report on ledgers that fail verification (marked loudly)",
    )
    report.add_argument("--title", default="medsilo privacy audit")
    report.set_defaults(func=run_report)


def find_ledgers(paths: list[Path]) -> list[Path]:
    """Ledger files named by ``paths`` (files as given; folders searched for :data:`LEDGER_GLOB`), deduplicated.

    Raises:
        MedsiloError: a path that does not exist, or a folder without ledgers.
    """
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            files = sorted(f for f in path.rglob(LEDGER_GLOB) if f.is_file())
            if not files:
                raise MedsiloError(f"{path}: no ledgers ({LEDGER_GLOB}) in this folder or below")
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            raise MedsiloError(f"{path}: no such ledger file or folder")
    return list(dict.fromkeys(found))


def _crl(args: argparse.Namespace) -> Path | None:
    """``--crl``, else a ``crl.pem`` beside ``--root-ca`` (:func:`medsilo.secure.audit.crl_beside`)."""
    from medsilo.secure.audit import crl_beside

    if args.crl is not None:
        if not args.crl.is_file():
            raise MedsiloError(
                f"--crl {args.crl}: no such file; give the project's revocation list (crl.pem)"
            )
        return args.crl
    return crl_beside(args.root_ca) if args.root_ca is not None else None


def _custody_line(custody: dict | None) -> str:
    if custody is None or custody["custody"] == "unknown":
        return "key custody not recorded (assume central: the coordinator could have signed)"
    if custody["custody"] == "central":
        return f"key provisioned centrally: the coordinator could have signed ({custody['detail']})"
    return f"key site-generated: the coordinator never held it ({custody['detail']})"


def run_verify(args: argparse.Namespace) -> int:
    from medsilo.secure.audit import verify_ledgers

    files = find_ledgers(args.ledgers)
    crl = _crl(args)
    verdicts = verify_ledgers(files, args.root_ca, party=args.party, crl=crl)
    bad = 0
    for verdict in verdicts:
        if verdict.problem:
            bad += 1
            print(verdict.problem)
        else:
            party = verdict.party if verdict.check.entries else "empty"
            print(f"{verdict.file}: OK, {len(verdict.check.entries)} entries (party {party}); "
                  + _custody_line(verdict.custody))  # fmt: skip
        for torn in verdict.set_aside:
            print(f"{verdict.file}: note: a torn last line was moved aside by repair into {torn}")
    print(f"{len(files)} ledger(s), {bad} with problems")
    if crl is not None:
        print(f"revocation list: {crl}")
    if args.root_ca is None:
        print(
            "note: signer certificates were not checked against a root CA (pass --root-ca startup/rootCA.pem)"
        )
    return 1 if bad else 0


def run_report(args: argparse.Namespace) -> int:
    from medsilo.secure.audit import summarize, verify_ledgers

    suffix = args.out.suffix.lower()
    if suffix not in (".html", ".htm", ".json"):
        raise MedsiloError(f"--out {args.out}: must end in .html or .json")
    files = find_ledgers(args.ledgers)
    crl = _crl(args)
    verdicts = verify_ledgers(files, args.root_ca, crl=crl)
    problems = [v.problem for v in verdicts if v.problem]
    if problems and not args.allow_unverified:
        for problem in problems:
            print(problem, file=sys.stderr)
        print(
            f"medsilo: refusing to report: {len(problems)} ledger(s) fail verification "
            "(fix them, or pass --allow-unverified to report anyway, marked as unverified)",
            file=sys.stderr,
        )
        return 1
    summary = summarize(
        verdicts, root_ca=str(args.root_ca) if args.root_ca else None, crl=str(crl) if crl else None
    )
    if suffix == ".json":
        text = json.dumps(summary, indent=2) + "\n"
    else:
        from medsilo.audit_report import render_html

        text = render_html(summary, args.title)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, text)
    print(
        f"wrote {args.out}"
        + (f" (UNVERIFIED: {len(problems)} ledger(s) failed verification)" if problems else "")
    )
    return 0
