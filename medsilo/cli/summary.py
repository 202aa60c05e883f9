"""Plain-text tables of one or more ``results.json`` for the terminal."""

from __future__ import annotations

from typing import Any


def _fmt(x: float | None) -> str:
    return "  n/a" if x is None else f"{x:.3f}"


def print_summary(runs: list[dict[str, Any]]) -> None:
    """Per-site test accuracy/AUROC at each run's selected round, then mean, worst and pooled accuracy."""
    sites = runs[0]["sites"]
    names = [r["algorithm"] for r in runs]
    width = max(12, *(len(s) for s in sites))
    header = f"{'':<{width}} " + " ".join(f"{n:>17}" for n in names)
    print(header)
    print(f"{'':<{width}} " + " ".join(f"{'acc':>8} {'auroc':>8}" for _ in names))
    for site in sites:
        cells = []
        for r in runs:
            m = r["final"]["per_site"].get(site, {})
            cells.append(f"{_fmt(m.get('test_acc')):>8} {_fmt(m.get('test_auroc')):>8}")
        print(f"{site:<{width}} " + " ".join(cells))
    for key, label in (("mean_acc", "mean"), ("worst_acc", "worst site"), ("pooled_acc", "pooled")):
        print(f"{label:<{width}} " + " ".join(f"{_fmt(r['final'][key]):>8} {'':>8}" for r in runs))
    print(f"{'round chosen':<{width}} " + " ".join(f"{r['selected_round']:>8} {'(val)':>8}" for r in runs))
