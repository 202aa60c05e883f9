"""``medsilo audit``: verify privacy ledgers, and report what left each party and the privacy budget spent.

``medsilo audit verify LEDGER_OR_DIR... [--root-ca FILE]`` checks every line of every ledger (chain links,
signatures, signer certificates; :mod:`medsilo.secure.ledger`), then across them (:mod:`medsilo.secure.anchors`):
each ledger is its place's party (``hospital-1/privacy_ledger.jsonl`` holds hospital-1's entries), and no site
ledger is shorter than, or differs from, what the server's ledger recorded receiving from that site. It prints
one line per file: ``FILE: OK, N entries (party P)`` or ``FILE:LINE: reason`` for the first problem. Exit status 0 when every ledger holds, 1
when any does not, 2 on bad input (a missing file, an unreadable root CA).

``medsilo audit report LEDGER_OR_DIR... --out FILE.html|FILE.json [--root-ca FILE] [--allow-unverified]``
summarizes, per party and job: events by kind, what left (count, bytes, encrypted or not), ε spent per
budget scope against the cap over time (cap = the latest ``epsilon_cap`` in the entries' ``privacy``; ε recomposed
with the site's accountant from the recorded mechanism events, flagged when it differs from what the site wrote),
refusals with reasons, aggregate releases, and the job's lines in an NVFlare ``audit.log`` next to the
ledger (``<folder>/audit.log`` and ``<folder>/<job>/audit.log``). It refuses (exit 1) when a ledger fails
verification, unless ``--allow-unverified`` is given; the report then says so on top, in red.

A folder argument is searched recursively for ledgers named :data:`LEDGER_GLOB` (``privacy_ledger.jsonl``,
``hospital-1.ledger.jsonl``, …); a file argument is checked whatever its name.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import re
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medsilo.errors import MedsiloError
from medsilo.fs import write_atomic

LEDGER_GLOB = "*ledger*.jsonl"
"""File names searched for under folder arguments (recursively)."""
AUDIT_SAMPLE = 10
"""NVFlare audit.log lines listed per job (all are counted)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="verify privacy ledgers; report what left each site",
        description="Check the signed, hash-chained privacy ledgers of sites and server, and report on them.",
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
    verify.add_argument("--party", metavar="NAME",
                        help="the party every given ledger must belong to (e.g. the site whose ledger you audit)")
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


def run_verify(args: argparse.Namespace) -> int:
    from medsilo.secure import ledger, pki
    from medsilo.secure.anchors import cross_check

    files = find_ledgers(args.ledgers)
    ca = pki.load_certificate(args.root_ca) if args.root_ca else None
    checks = [ledger.verify_file(file, ca) for file in files]
    crossed = {p.file: p for p in cross_check(checks, party=args.party)}
    bad = 0
    for check in checks:
        problem = check.problem or crossed.get(check.file)
        if problem:
            bad += 1
            print(problem)
        else:
            party = check.entries[0]["party"] if check.entries else "empty"
            print(f"{check.file}: OK, {len(check.entries)} entries (party {party})")
        for torn in sorted(check.file.parent.glob(f"{check.file.name}.torn-*")):
            print(f"{check.file}: note: a torn last line was moved aside by repair into {torn}")
    print(f"{len(files)} ledger(s), {bad} with problems")
    if ca is None:
        print(
            "note: signer certificates were not checked against a root CA (pass --root-ca startup/rootCA.pem)"
        )
    return 1 if bad else 0


def run_report(args: argparse.Namespace) -> int:
    import sys

    from medsilo.secure import ledger, pki

    suffix = args.out.suffix.lower()
    if suffix not in (".html", ".htm", ".json"):
        raise MedsiloError(f"--out {args.out}: must end in .html or .json")
    files = find_ledgers(args.ledgers)
    ca = pki.load_certificate(args.root_ca) if args.root_ca else None
    checks = [ledger.verify_file(f, ca) for f in files]
    problems = [c.problem for c in checks if c.problem]
    if problems and not args.allow_unverified:
        for problem in problems:
            print(problem, file=sys.stderr)
        print(
            f"medsilo: refusing to report: {len(problems)} ledger(s) fail verification "
            "(fix them, or pass --allow-unverified to report anyway, marked as unverified)",
            file=sys.stderr,
        )
        return 1
    summary = summarize(checks, root_ca=str(args.root_ca) if args.root_ca else None)
    text = json.dumps(summary, indent=2) + "\n" if suffix == ".json" else render_html(summary, args.title)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, text)
    print(
        f"wrote {args.out}"
        + (f" (UNVERIFIED: {len(problems)} ledger(s) failed verification)" if problems else "")
    )
    return 0


def summarize(checks: list, root_ca: str | None = None) -> dict[str, Any]:
    """The report's content from :func:`medsilo.secure.ledger.verify_file` results (JSON-plain).

    A ledger that failed verification is summarized from every line that still parses, marked unverified.
    """
    from medsilo.secure.ledger import SPENDING_EVENTS

    ledgers = []
    for check in checks:
        items = check.entries if check.ok else _lenient_entries(check.file)
        by_job: dict[str | None, list[dict]] = {}
        for e in items:
            by_job.setdefault(e.get("job"), []).append(e)
        budgets = _budgets(items, SPENDING_EVENTS)
        ledgers.append(
            {
                "file": str(check.file),
                "party": items[0].get("party") if items else None,
                "entries": len(items),
                "verified": check.ok,
                "problem": str(check.problem) if check.problem else None,
                "signers": sorted({str(e.get("signer")) for e in items}),
                "budgets": budgets,
                "jobs": [_job_summary(check.file, job, es, SPENDING_EVENTS) for job, es in by_job.items()],
            }
        )
    return {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "root_ca": root_ca,
        "verified": all(c.ok for c in checks),
        "ledgers": ledgers,
    }


def _budgets(items: list[dict], spending: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """ε spent per budget scope, and its series over time.

    Entries that carry their mechanism ``events`` (what medsilo's sites write) are composed by the same
    accountant the site uses (:class:`medsilo.secure.dp.PrivacyAccountant`, RDP at the scope's δ), so the
    total is the site's own; ``epsilon_recorded`` is the last cumulative ε the site wrote, and
    ``mismatch`` is true when the two disagree (a site that under-reports its spending). Entries without
    an event fall back to basic composition (Σ ε, Σ δ), a valid upper bound.
    """
    from medsilo.secure.accounting import PrivacyAccountant

    budgets: dict[str, dict[str, Any]] = {}
    for e in items:
        privacy = e.get("privacy") if isinstance(e.get("privacy"), dict) else None
        if privacy is None or not isinstance(privacy.get("scope"), str):
            continue
        b = budgets.setdefault(privacy["scope"], {"epsilon": 0.0, "delta": 0.0, "epsilon_cap": None, "delta_cap": None,
                                                  "series": [], "_events": [], "_deltas": set()})  # fmt: skip
        for cap in ("epsilon_cap", "delta_cap"):
            if _number(privacy.get(cap)) is not None:
                b[cap] = _number(privacy[cap])
        if e.get("event") not in spending:
            continue
        eps = _number(privacy.get("epsilon")) or 0.0
        b["epsilon"] += eps
        b["delta"] += _number(privacy.get("delta")) or 0.0
        b["_events"].extend(privacy.get("events") or [privacy.get("event")])
        b["_deltas"].add(_number(privacy.get("delta")))
        recorded = _number(privacy.get("cumulative_epsilon"))
        b["series"].append({"time": e.get("time"), "seq": e.get("seq"), "job": e.get("job"), "round": e.get("round"),
                            "epsilon": eps, "cumulative_epsilon": recorded if recorded is not None else b["epsilon"]})  # fmt: skip
    for b in budgets.values():
        events, deltas = b.pop("_events"), b.pop("_deltas")
        b["accounting"] = "basic composition (Σ ε, Σ δ)"
        if events and all(isinstance(ev, dict) for ev in events) and len(deltas) == 1 and None not in deltas:
            delta = deltas.pop()
            try:
                total = PrivacyAccountant.from_events(events, delta).epsilon
            except MedsiloError:
                continue  # a malformed event: keep the additive bound
            b["epsilon_recorded"] = b["series"][-1]["cumulative_epsilon"]
            b["mismatch"] = abs(total - b["epsilon_recorded"]) > 1e-6 * max(1.0, total)
            b["epsilon"], b["delta"] = total, delta
            b["accounting"] = "RDP (dp-accounting), as the site's accountant"
    return budgets


def _job_summary(file: Path, job: str | None, items: list[dict], spending: tuple[str, ...]) -> dict[str, Any]:
    kinds: dict[str, dict[str, int]] = {}
    released = {"count": 0, "bytes": 0, "encrypted_bytes": 0, "plaintext_bytes": 0}
    epsilon: dict[str, float] = {}
    for e in items:
        if e.get("event") not in spending:
            continue
        what = e.get("what") if isinstance(e.get("what"), dict) else {}
        nbytes = int(_number(what.get("bytes")) or 0)
        encrypted = what.get("encrypted") is True
        k = kinds.setdefault(str(what.get("kind", "?")), {"count": 0, "bytes": 0, "encrypted": 0})
        k["count"] += 1
        k["bytes"] += nbytes
        k["encrypted"] += encrypted
        released["count"] += 1
        released["bytes"] += nbytes
        released["encrypted_bytes" if encrypted else "plaintext_bytes"] += nbytes
        privacy = e.get("privacy") if isinstance(e.get("privacy"), dict) else {}
        if isinstance(privacy.get("scope"), str):
            epsilon[privacy["scope"]] = epsilon.get(privacy["scope"], 0.0) + (
                _number(privacy.get("epsilon")) or 0.0
            )
    rounds = [e["round"] for e in items if isinstance(e.get("round"), int)]
    return {
        "job": job,
        "first_time": items[0].get("time"),
        "last_time": items[-1].get("time"),
        "rounds": [min(rounds), max(rounds)] if rounds else None,
        "events": dict(Counter(str(e.get("event")) for e in items)),
        "released": {**released, "kinds": kinds},
        "epsilon": epsilon,
        "refusals": [
            {"seq": e.get("seq"), "time": e.get("time"), "round": e.get("round"), "reason": e.get("reason")}
            for e in items
            if e.get("event") == "refusal"
        ],
        "aggregate_releases": [
            {"seq": e.get("seq"), "time": e.get("time"), "round": e.get("round"), "what": e.get("what")}
            for e in items
            if e.get("event") == "aggregate_release"
        ],
        "nvflare_audit": _audit_lines(file, job) if job else None,
    }


def _audit_lines(ledger_file: Path, job: str) -> dict[str, Any] | None:
    """NVFlare ``audit.log`` lines naming ``job`` (as a whole word) next to the ledger: site folder and job folder."""
    folder = ledger_file.parent
    found = [f for f in (folder / "audit.log", folder / job / "audit.log") if f.is_file()]
    if not found:
        return None
    mentions = re.compile(rf"(?<![\w.-]){re.escape(job)}(?![\w.-])")
    lines = []
    for f in found:
        with open(f, encoding="utf-8", errors="replace") as fh:
            lines.extend(line.rstrip("\n")[:300] for line in fh if mentions.search(line))
    return {"files": [str(f) for f in found], "lines": len(lines), "sample": lines[:AUDIT_SAMPLE]}


def _lenient_entries(file: Path) -> list[dict]:
    """Every line of ``file`` that parses as a JSON object (for an *unverified* report only)."""
    items = []
    for line in file.read_bytes().split(b"\n"):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            items.append(value)
    return items


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# ---- HTML ---------------------------------------------------------------------------------------------


def _budget_png(budgets: dict[str, dict[str, Any]]) -> str | None:
    scopes = {s: b for s, b in budgets.items() if b["series"] or b["epsilon_cap"] is not None}
    if not scopes:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    for i, (scope, b) in enumerate(sorted(scopes.items())):
        color = f"C{i}"
        times = [datetime.fromisoformat(p["time"]) for p in b["series"]]
        if times:
            ax.step(times, [p["cumulative_epsilon"] for p in b["series"]], where="post", marker=".", color=color,
                    label=f"ε spent ({scope})")  # fmt: skip
        if b["epsilon_cap"] is not None:
            ax.axhline(b["epsilon_cap"], color=color, ls="--", lw=1, label=f"cap ({scope})")
    ax.set_ylabel("cumulative ε")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.autofmt_xdate()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _table(head: list[str], rows: list[list[object]]) -> str:
    esc = html.escape
    if not rows:
        return '<p class="note">none</p>'
    return (
        "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        + "</table>"
    )  # fmt: skip


def render_html(summary: dict[str, Any], title: str = "medsilo privacy audit") -> str:
    """The audit report page for :func:`summarize`'s output (self-contained: plots embedded as PNG)."""
    esc = html.escape
    parts = []
    if not summary["verified"]:
        bad = "".join(f"<li>{esc(lg['problem'])}</li>" for lg in summary["ledgers"] if lg["problem"])
        parts.append(
            '<div class="alarm"><strong>UNVERIFIED: these ledgers failed verification; the numbers below may have '
            f"been altered and must not be relied on.</strong><ul>{bad}</ul></div>"
        )
    ca = (
        f"root CA {esc(summary['root_ca'])}"
        if summary["root_ca"]
        else "no root CA given (signers trusted on first use)"
    )
    parts.append(
        f'<p class="note">{len(summary["ledgers"])} ledger(s) · {ca} · generated {esc(summary["generated"])}</p>'
    )
    for lg in summary["ledgers"]:
        status = "verified" if lg["verified"] else "UNVERIFIED"
        parts.append(f"<h2>{esc(str(lg['party']))} <small>({status}, {lg['entries']} entries)</small></h2>")
        parts.append(f'<p class="note">{esc(lg["file"])}</p>')
        budgets = [
            [scope, f"{b['epsilon']:.4g}", f"{b['delta']:.3g}",
             "n/a" if b["epsilon_cap"] is None else f"{b['epsilon_cap']:.4g}", len(b["series"]), b["accounting"]]
            for scope, b in sorted(lg["budgets"].items())
        ]  # fmt: skip
        parts.append("<h3>Privacy budget</h3>" + _table(["scope", "ε spent", "δ", "ε cap", "releases", "accounting"],
                                                         budgets))  # fmt: skip
        for scope, b in sorted(lg["budgets"].items()):
            if b.get("mismatch"):
                parts.append(f'<p class="alarm">Scope {esc(scope)}: the ledger records cumulative ε = '
                             f'{b["epsilon_recorded"]:.4g}, but its mechanism events compose to ε = {b["epsilon"]:.4g}.'
                             "</p>")  # fmt: skip
        png = _budget_png(lg["budgets"])
        if png:
            parts.append(
                f'<img alt="cumulative epsilon for {esc(str(lg["party"]))}" src="data:image/png;base64,{png}">'
            )
        rows = []
        for j in lg["jobs"]:
            r = j["released"]
            events = ", ".join(f"{k}: {v}" for k, v in sorted(j["events"].items()))
            eps = ", ".join(f"{s}: {v:.4g}" for s, v in sorted(j["epsilon"].items())) or "0"
            rows.append([j["job"] or "(no job)", events, r["count"], r["encrypted_bytes"], r["plaintext_bytes"], eps,
                         len(j["refusals"])])  # fmt: skip
        head = ["job", "events", "releases", "bytes encrypted", "bytes plaintext", "ε added to the budget", "refusals"]
        parts.append("<h3>What left, per job</h3>" + _table(head, rows))
        kinds = [
            [j["job"] or "(no job)", kind, k["count"], k["bytes"], f"{k['encrypted']} of {k['count']}"]
            for j in lg["jobs"] for kind, k in sorted(j["released"]["kinds"].items())
        ]  # fmt: skip
        parts.append(
            "<h3>Releases by kind</h3>" + _table(["job", "kind", "count", "bytes", "encrypted"], kinds)
        )
        refusals = [
            [j["job"] or "", x["seq"], x["time"], x["round"], x["reason"]]
            for j in lg["jobs"]
            for x in j["refusals"]
        ]
        parts.append("<h3>Refusals</h3>" + _table(["job", "seq", "time", "round", "reason"], refusals))
        aggregates = [
            [j["job"] or "", x["seq"], x["time"], x["round"],
             (x["what"] or {}).get("contributors", "?") if isinstance(x["what"], dict) else "?"]
            for j in lg["jobs"] for x in j["aggregate_releases"]
        ]  # fmt: skip
        parts.append(
            "<h3>Aggregate releases</h3>"
            + _table(["job", "seq", "time", "round", "contributors"], aggregates)
        )
        for j in lg["jobs"]:
            a = j["nvflare_audit"]
            if a:
                sample = "".join(f"<li><code>{esc(line)}</code></li>" for line in a["sample"])
                parts.append(
                    f'<h3>NVFlare audit.log, job {esc(str(j["job"]))}</h3><p class="note">{a["lines"]} line(s) in '
                    f"{esc(', '.join(a['files']))}; first {len(a['sample'])}:</p><ul>{sample}</ul>"
                )
    body = "\n".join(parts)
    from medsilo.report import page_head

    return f"""{page_head(title)}
{body}
</body></html>
"""
