"""HTML page of a privacy audit (``medsilo audit report --out FILE.html``), beside :mod:`medsilo.report`.

Renders :func:`medsilo.secure.audit.summarize`'s JSON-plain summary. It opens with one table across parties —
verified?, key custody, entries, releases plaintext/encrypted, ε spent vs cap, refusals, last entry time — with
problems marked in colour (a failed check or an exhausted budget red, central key custody amber), then per party
the key custody line, the privacy budget (ε spent
against the cap, and a plot of cumulative ε over time), what left per job and by kind, refusals, aggregate
releases and NVFlare ``audit.log`` lines; ledgers that failed verification are flagged on top, in red. The
page is self-contained (the plot embedded as PNG) and uses :mod:`medsilo.report`'s stylesheet.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime
from typing import Any

from medsilo.report import page_head


def _budget_png(budgets: dict[str, dict[str, Any]]) -> str | None:
    scopes = {s: b for s, b in budgets.items() if b["series"] or b["epsilon_cap"] is not None}
    if not scopes:
        return None
    # Lazy for cost: matplotlib takes about 0.4 s to load, and a JSON report or `medsilo audit verify` never
    # draws (as medsilo.report does for run reports).
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


OVERVIEW_STYLE = """.overview td { white-space: nowrap; }
.overview td:nth-child(2), .overview td:nth-child(3),
.overview th:nth-child(2), .overview th:nth-child(3) { text-align: center; }
.overview td.bad { background: #fde2e2; color: #900; font-weight: 600; }
.overview td.warn { background: #fff4d6; color: #7a5300; }
.overview td.good { background: #e5f5e8; color: #17622a; }"""
"""Cell colours of the opening table, added to :data:`medsilo.report.PAGE_STYLE`."""
CUSTODY_WORDS = {"site-generated": "made at the site", "central": "central: coordinator could sign",
                 "unknown": "not recorded"}  # fmt: skip


def _epsilon_cell(epsilon: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """``(text, class)`` of the ε column: ``spent / cap`` per scope; red when a scope's cap is reached."""
    if not epsilon:
        return "none spent", ""
    text = "; ".join(
        (f"{scope}: " if len(epsilon) > 1 else "")
        + f"{e['spent']:.3g} / " + ("no cap" if e["cap"] is None else f"{e['cap']:.3g}")
        for scope, e in epsilon.items()
    )  # fmt: skip
    full = any(e["cap"] is not None and e["spent"] >= e["cap"] - 1e-9 for e in epsilon.values())
    return text, "bad" if full else ""


def overview_table(summary: dict[str, Any]) -> str:
    """The opening table: one row per ledger (:func:`medsilo.secure.audit.summarize`'s ``overview``)."""
    esc = html.escape
    head = ["party", "verified", "key custody", "entries", "jobs", "releases plaintext", "releases encrypted",
            "ε spent / cap", "refusals", "last entry (UTC)"]  # fmt: skip
    rows = []
    for lg in summary["ledgers"]:
        o = lg["overview"]
        eps, eps_class = _epsilon_cell(o["epsilon"])
        last = (o["last_time"] or "")[:19].replace("T", " ")
        cells = [
            (str(lg["party"]), ""),
            ("yes" if o["verified"] else "NO", "good" if o["verified"] else "bad"),
            (
                CUSTODY_WORDS.get(o["custody"], o["custody"]),
                "good" if o["custody"] == "site-generated" else "warn",
            ),
            (str(o["entries"]), ""),
            (str(o["jobs"]), ""),
            (str(o["releases"]["plaintext"]), ""),
            (str(o["releases"]["encrypted"]), ""),
            (eps, eps_class),
            (str(o["refusals"]), "warn" if o["refusals"] else ""),
            (last or "—", ""),
        ]
        rows.append("<tr>" + "".join(f'<td class="{c}">{esc(t)}</td>' if c else f"<td>{esc(t)}</td>"
                                     for t, c in cells) + "</tr>")  # fmt: skip
    return (
        '<table class="overview"><tr>' + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>" + "".join(rows)
        + "</table>"
    )  # fmt: skip


def render_html(summary: dict[str, Any], title: str = "medsilo privacy audit") -> str:
    """The audit report page for :func:`medsilo.secure.audit.summarize`'s output (self-contained: plots
    embedded as PNG)."""
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
    crl = f" · revocation list {esc(summary['crl'])}" if summary.get("crl") else ""
    parts.append(
        f'<p class="note">{len(summary["ledgers"])} ledger(s) · {ca}{crl} · generated {esc(summary["generated"])}</p>'
    )
    parts.append("<h2>Overview</h2>" + overview_table(summary))
    parts.append(
        '<p class="note">Key custody, from each ledger\'s signed <code>policy_loaded</code> entries: '
        "<em>made at the site</em> — the coordinator never held the signing key; <em>central</em> — the "
        "coordinator provisioned it and could have signed these entries itself.</p>"
    )
    for lg in summary["ledgers"]:
        status = "verified" if lg["verified"] else "UNVERIFIED"
        parts.append(f"<h2>{esc(str(lg['party']))} <small>({status}, {lg['entries']} entries)</small></h2>")
        parts.append(f'<p class="note">{esc(lg["file"])}</p>')
        custody = lg["custody"]
        parts.append(f"<p><strong>Key custody:</strong> {esc(CUSTODY_WORDS.get(custody['custody'], ''))} — "
                     f"{esc(custody['detail'])}</p>")  # fmt: skip
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
        head = [
            "job",
            "events",
            "releases",
            "bytes encrypted",
            "bytes plaintext",
            "ε added to the budget",
            "refusals",
        ]
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
    head = page_head(title).replace("</style>", f"{OVERVIEW_STYLE}\n</style>", 1)
    return f"""{head}
{body}
</body></html>
"""
