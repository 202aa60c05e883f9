"""HTML report of one or more runs (``results.json``): comparison table, per-site table, accuracy curves.

The page is self-contained (plots embedded as PNG), so it can be mailed to a hospital's committee or
attached to a ticket. Numbers are read at each run's ``selected_round`` — chosen on validation
accuracy (validation macro-AUROC for multi-label runs), never on test. A multi-label run also gets its
macro-AUROC in the comparison and a per-label AUROC table (mean over sites, at the selected round).
When one of the runs is Local (every site training alone), a table gives each other run's gain over it at
every site, with an interval (:func:`gains_vs_local`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medsilo.errors import MedsiloError
from medsilo.fs import write_atomic
from medsilo.stats import Interval, accuracy_gain, mean_interval


def load_results(path: str | Path) -> dict[str, Any]:
    """Read ``results.json`` from a run folder or a file path, checking the fields the report uses.

    Raises:
        MedsiloError: missing file, not JSON, or a required field absent (named).
    """
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise MedsiloError(f"{file}: no results.json here; pass a run folder written by 'medsilo sim' or 'medsilo demo'")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise MedsiloError(f"{file}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    for key in ("job", "algorithm", "sites", "rounds", "selected_round", "final"):
        if key not in data:
            raise MedsiloError(f"{file}: field '{key}' is missing; is this a medsilo results.json?")
    return data


PAGE_STYLE = """body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; max-width: 1100px; }
table { border-collapse: collapse; margin: 0.8rem 0 1.6rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f5f7; }
.note { color: #555; font-size: 0.9rem; }
.alarm { background: #fde2e2; border: 3px solid #c00; color: #900; padding: 0.8rem 1rem; }
code { font-size: 0.8rem; }
td.good { background: #e3f4e1; }
td.bad, p.bad { background: #fde2e2; }"""
"""The stylesheet of medsilo's self-contained HTML pages (run reports and audit reports)."""


def page_head(title: str) -> str:
    """``<!doctype html>`` up to and including the ``<h1>`` of a medsilo HTML page."""
    esc = html.escape(title)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc}</title>\n'
            f"<style>\n{PAGE_STYLE}\n</style></head><body>\n<h1>{esc}</h1>")  # fmt: skip


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def _kib(x: float) -> str:
    return f"{x / 1024:,.1f}"


_SELECTED_ON = {"val_acc": "accuracy", "val_balanced_acc": "balanced accuracy", "val_macro_auroc": "macro-AUROC"}


def summary_row(run: dict[str, Any]) -> dict[str, Any]:
    """One run's headline numbers (at its selected round)."""
    final = run["final"]
    n_sites = len(run["sites"])
    rounds = run["rounds"]
    return {
        "label": run.get("label") or run["algorithm"],
        "algorithm": run["algorithm"],
        "mean_acc": final["mean_acc"],
        "worst_acc": final["worst_acc"],
        "pooled_acc": final["pooled_acc"],
        "mean_balanced_acc": final.get("mean_balanced_acc"),
        "mean_auroc": _mean([m.get("test_auroc") for m in final["per_site"].values()]),
        "task": run.get("task", "single"),
        "mean_macro_auroc": final.get("mean_macro_auroc"),
        "worst_macro_auroc": final.get("worst_macro_auroc"),
        "selected_round": run["selected_round"],
        "selection_score": run.get("selection_score"),  # validation: what a sweep may choose settings on
        "rounds": len(rounds),
        "seconds": sum(r["seconds"] for r in rounds),
        "up_per_site_round": _mean([r["bytes_up"] / n_sites for r in rounds]) or 0.0,
        "down_per_site_round": _mean([r["bytes_down"] / n_sites for r in rounds]) or 0.0,
    }


def _curves_png(runs: list[dict[str, Any]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cols = min(3, len(runs))
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False, sharey=True)
    for ax, run in zip(axes.flat, runs):
        rounds = [r["round"] for r in run["rounds"]]
        for site in run["sites"]:
            acc = [r["metrics"].get(site, {}).get("test_acc") for r in run["rounds"]]  # None: the site failed that round
            ax.plot(rounds, [math.nan if a is None else a for a in acc], marker=".", lw=1.2, label=site)
        mean_val = [_mean([m["val_acc"] for m in r["metrics"].values()]) for r in run["rounds"]]
        ax.plot(rounds, mean_val, color="black", ls="--", lw=1.2, label="mean val")
        ax.axvline(run["selected_round"], color="grey", ls=":", lw=1)
        ax.set_title(run.get("label") or run["algorithm"])
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("test accuracy per site")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def render_html(runs: list[dict[str, Any]], title: str = "medsilo report") -> str:
    """The report page for ``runs`` (all on the same sites)."""
    esc = html.escape
    rows = [summary_row(r) for r in runs]
    sites = runs[0]["sites"]
    head = ("<tr><th>run</th><th>mean acc</th><th>worst site</th><th>pooled acc</th><th>mean balanced acc</th>"
            "<th>mean AUROC</th>"
            "<th>round (of)</th><th>seconds</th><th>KiB up / site / round</th><th>KiB down / site / round</th></tr>")  # fmt: skip
    body = "".join(
        f"<tr><td>{esc(r['label'])}</td><td>{_fmt(r['mean_acc'])}</td><td>{_fmt(r['worst_acc'])}</td>"
        f"<td>{_fmt(r['pooled_acc'])}</td><td>{_fmt(r['mean_balanced_acc'])}</td><td>{_fmt(r['mean_auroc'])}</td>"
        f"<td>{r['selected_round']} ({r['rounds']})</td><td>{r['seconds']:.0f}</td>"
        f"<td>{_kib(r['up_per_site_round'])}</td><td>{_kib(r['down_per_site_round'])}</td></tr>"
        for r in rows
    )
    site_head = "<tr><th>site</th>" + "".join(f"<th>{esc(r['label'])}<br>acc / AUROC</th>" for r in rows) + "</tr>"
    site_body = "".join(
        f"<tr><td>{esc(s)}</td>"
        + "".join(f"<td>{_fmt(run['final']['per_site'][s]['test_acc'])} / {_fmt(run['final']['per_site'][s]['test_auroc'])}</td>"
                  for run in runs)  # fmt: skip
        + "</tr>"
        for s in sites
    )
    models = ", ".join(f"{esc(s)}: {esc(b)}" for s, b in runs[0].get("models", {}).items())
    privacy = ", ".join(sorted({esc(str(r.get("privacy", {}).get("mode", "?"))) for r in runs}))
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    synthetic = [f"{esc(r.get('label', r['job']))} · {esc(s)}: {int(v['images'])} synthetic training images "
                 f"(PCEvolve, selection ε = {float(v['epsilon']):g})"
                 for r in runs for s, v in sorted((r.get("synthetic") or {}).items())]  # fmt: skip
    refused = [f"{esc(r.get('label', r['job']))}: {esc(reason)}" for r in runs for reason in (r.get("refused") or {}).values()]
    failed = [f"{esc(r.get('label', r['job']))}: round {f['round']} ({esc(f['task'])}) continued without "
              f"{esc(f['site'])}: {esc(f['reason'])}" for r in runs for f in (r.get("failures") or [])]  # fmt: skip
    constant = [f"{esc(r.get('label', r['job']))} · {esc(s)}: predicts one class for every test image at the "
                f"selected round; its accuracy only measures its class mix (see balanced accuracy)"
                for r in runs for s in (r["final"].get("constant_predictors") or [])]  # fmt: skip
    notes = "".join(f'<p class="note">{line}</p>' for line in synthetic + refused + failed + constant)
    return f"""{page_head(title)}
<p class="note">Job {esc(runs[0]['job'])} · sites: {len(sites)} · models: {models} · privacy: {privacy} · generated {stamp}</p>
{notes}
<h2>Comparison</h2>
<table>{head}{body}</table>
<p class="note">Test metrics at each run's selected round, which is chosen on the sites' mean <em>validation</em>
{esc(", ".join(sorted({_SELECTED_ON.get(r.get("selected_on", "val_acc"), "accuracy") for r in runs})))} (never on test).
Balanced accuracy is the mean recall over a site's classes (a majority-class predictor scores 1/K). Mean = average over sites; worst = lowest site; pooled = all sites' test images together.
Bytes are the task payloads as sent.</p>
<h2>Per site</h2>
<table>{site_head}{site_body}</table>
{_gains_section(runs)}
{_labels_section(runs)}
<h2>Accuracy per round</h2>
<p class="note">Each site's test accuracy for the model it would deploy after that round; dashed: mean validation
accuracy; dotted line: selected round.</p>
<img alt="accuracy curves" src="data:image/png;base64,{_curves_png(runs)}">
{_models_section(runs)}
</body></html>
"""


def label_aurocs(run: dict[str, Any]) -> dict[str, float | None]:
    """A multi-label run's test AUROC per label at its selected round, averaged over the sites that define it."""
    per_site = [m.get("test_auroc_per_label") or {} for m in run["final"]["per_site"].values()]
    return {label: _mean([p.get(label) for p in per_site]) for label in run["final"].get("labels", [])}


def _labels_section(runs: list[dict[str, Any]]) -> str:
    """Multi-label runs: macro-AUROC per run and AUROC per label (mean over sites); empty for single-label runs."""
    esc = html.escape
    multi = [r for r in runs if r.get("task") == "multilabel"]
    if not multi:
        return ""
    labels = list(dict.fromkeys(label for r in multi for label in r["final"].get("labels", [])))
    table = {id(r): label_aurocs(r) for r in multi}
    head = "<tr><th>label</th>" + "".join(f"<th>{esc(r.get('label') or r['algorithm'])}</th>" for r in multi) + "</tr>"
    body = "".join(f"<tr><td>{esc(label)}</td>" + "".join(f"<td>{_fmt(table[id(r)].get(label))}</td>" for r in multi)
                   + "</tr>" for label in labels)  # fmt: skip
    macro = "<tr><th>macro-AUROC (mean / worst site)</th>" + "".join(
        f"<td>{_fmt(r['final'].get('mean_macro_auroc'))} / {_fmt(r['final'].get('worst_macro_auroc'))}</td>"
        for r in multi) + "</tr>"  # fmt: skip
    return f"""<h2>Multi-label: AUROC per label</h2>
<table>{head}{body}{macro}</table>
<p class="note">Test AUROC of each label (its known entries only), averaged over sites, at the round selected on
the sites' mean validation macro-AUROC. Accuracy above is exact match (every known label right) at per-label
thresholds each site chose on its validation split (maximising that label's F1).</p>"""


def _n_test(run: dict[str, Any], site: str) -> int | None:
    """Test images ``site`` scored at ``run``'s selected round (``None`` when the round did not record it)."""
    for rnd in run["rounds"]:
        if rnd["round"] == run["selected_round"]:
            n = (rnd["metrics"].get(site) or {}).get("n_test")
            return int(n) if n else None
    return None


def gains_vs_local(run: dict[str, Any], local: dict[str, Any]) -> dict[str, Any]:
    """``run``'s test-accuracy gain over ``local`` at each site, and over the sites, at each run's selected round.

    Returns:
        ``{"per_site": {site: Interval | None}, "balanced": {site: float | None}, "mean": Interval | None,
        "loses": [sites]}``. A site's interval is Newcombe's for two independent accuracies
        (:func:`medsilo.stats.accuracy_gain`) on the test images each run scored; it errs wide, as both runs
        scored the same images. ``mean`` is the t-interval of the per-site gains (the sites as the sample).
        A site *loses* when its interval lies wholly below 0. ``None`` where a site failed or its count is
        unknown.
    """
    per_site: dict[str, Interval | None] = {}
    balanced: dict[str, float | None] = {}
    for site in run["sites"]:
        a, b = run["final"]["per_site"].get(site) or {}, local["final"]["per_site"].get(site) or {}
        n_a, n_b = _n_test(run, site), _n_test(local, site)
        ok = a.get("test_acc") is not None and b.get("test_acc") is not None and n_a and n_b
        per_site[site] = accuracy_gain(a["test_acc"], n_a, b["test_acc"], n_b) if ok else None
        ba, bb = a.get("test_balanced_acc"), b.get("test_balanced_acc")
        balanced[site] = ba - bb if ba is not None and bb is not None else None
    gains = [g.value for g in per_site.values() if g is not None]
    return {"per_site": per_site, "balanced": balanced, "mean": mean_interval(gains) if gains else None,
            "loses": [s for s, g in per_site.items() if g is not None and g.high < 0]}  # fmt: skip


def _gains_section(runs: list[dict[str, Any]]) -> str:
    """Gain over Local per site with intervals, when exactly one single-label run is Local; else empty."""
    esc = html.escape
    locals_ = [r for r in runs if r["algorithm"] == "local" and r.get("task", "single") == "single"]
    others = [r for r in runs if r["algorithm"] != "local" and r.get("task", "single") == "single"]
    if len(locals_) != 1 or not others:
        return ""
    table = [(r, gains_vs_local(r, locals_[0])) for r in others]

    def cell(g: Interval | None, balanced: float | None) -> str:
        if g is None:
            return "<td>—</td>"
        tone = ' class="good"' if g.low > 0 else ' class="bad"' if g.high < 0 else ""
        return f"<td{tone}>{g}<br><small>balanced {_signed(balanced)}</small></td>"

    head = "<tr><th>site</th>" + "".join(f"<th>{esc(r.get('label') or r['algorithm'])}</th>" for r, _ in table) + "</tr>"
    body = "".join(f"<tr><td>{esc(s)}</td>" + "".join(cell(g["per_site"][s], g["balanced"][s]) for _, g in table)
                   + "</tr>" for s in runs[0]["sites"])  # fmt: skip
    mean = "<tr><th>mean over sites</th>" + "".join(f"<td>{g['mean'] if g['mean'] else '—'}</td>" for _, g in table) + "</tr>"
    loses = [f"{esc(r.get('label') or r['algorithm'])} · {esc(s)}" for r, g in table for s in g["loses"]]
    warn = (f'<p class="note bad">Loses to Local (interval wholly below 0): {", ".join(loses)}. A hospital there '
            "is better served by its own model.</p>") if loses else ""  # fmt: skip
    return f"""<h2>Gain over training alone (Local)</h2>
<table>{head}{body}{mean}</table>
{warn}<p class="note">Test-accuracy gain of each run over Local at the same site, each at its own selected round, with
a 95 % interval: Newcombe's interval for two accuracies on that site's test images, which treats them as
independent and so errs wide. Green: the interval lies above 0; red: below. Beneath, the gain in balanced
accuracy. The last row is the mean gain over sites with a t-interval over the sites. One run per method
measures one draw of training; benchmarks repeat over seeds for paired intervals (BENCHMARKS.md).</p>"""


def _signed(x: float | None) -> str:
    return "—" if x is None else f"{x:+.3f}"


def _models_section(runs: list[dict[str, Any]]) -> str:
    """Where each site's exported model is, its round and digest, and the command that runs it."""
    esc = html.escape
    rows = []
    for run in runs:
        for site, export in (run.get("exports") or {}).items():
            label = esc(run.get("label") or run["job"])
            if "error" in export:
                rows.append(f"<tr><td>{label}</td><td>{esc(site)}</td><td colspan=3>no model: {esc(export['error'])}</td></tr>")
            else:
                rows.append(f"<tr><td>{label}</td><td>{esc(site)}</td><td>{int(export['round'])}</td>"
                            f"<td><code>{esc(export['sha256'][:16])}…</code></td>"
                            f"<td>{_fmt(run['final']['per_site'][site]['test_acc'])}</td></tr>")  # fmt: skip
    if not rows:
        return ""
    return f"""<h2>Models kept at the sites</h2>
<table><tr><th>run</th><th>site</th><th>round</th><th>model.ts SHA-256</th><th>test acc</th></tr>{"".join(rows)}</table>
<p class="note">Each site keeps the model it deploys at the selected round in its own workspace (it never leaves
the site): <code>RUN_DIR/models/&lt;site&gt;/</code> in simulation, <code>&lt;site workspace&gt;/models/&lt;job id&gt;/</code>
when deployed — a MONAI bundle (TorchScript <code>models/model.ts</code>, state dict, <code>configs/metadata.json</code>) with a
model card (<code>docs/README.md</code>: data counts, metrics with 95 % bootstrap intervals, privacy, ledger entry).
Run it on new images with <code>medsilo predict --model MODEL_DIR --manifest MANIFEST.csv --out predictions.csv</code>;
on the site's test split (<code>--split test</code>) it reproduces the test accuracy above.</p>"""


def write_report(runs: list[dict[str, Any]], out: str | Path, title: str = "medsilo report") -> Path:
    """Write the report for ``runs`` to ``out`` (written whole, then renamed into place)."""
    if not runs:
        raise MedsiloError("no runs to report")
    sites = [tuple(r["sites"]) for r in runs]
    if len(set(sites)) != 1:
        raise MedsiloError("runs in one report must share their sites; got " + "; ".join(", ".join(s) for s in set(sites)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, render_html(runs, title))
    return out
