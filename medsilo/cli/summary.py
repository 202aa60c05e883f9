"""Plain-text tables of one or more ``results.json`` for the terminal."""

from __future__ import annotations

from typing import Any

COLUMNS = (("test_balanced_acc", "bal acc"), ("test_acc", "acc"), ("test_auroc", "auroc"))
"""Per-site figures each run shows, first the one rounds are selected on by default (balanced accuracy: under
label skew plain accuracy rewards predicting a site's majority class)."""


def _fmt(x: float | None) -> str:
    return "  n/a" if x is None else f"{x:.3f}"


def print_summary(runs: list[dict[str, Any]]) -> None:
    """Per-site test balanced accuracy, accuracy and AUROC at each run's selected round, then the mean, the worst
    site and the pooled figures, the round chosen (and on what), and the sites that predict one class."""
    sites = runs[0]["sites"]
    names = [r["algorithm"] for r in runs]
    width = max(12, *(len(s) for s in sites))
    block = 9 * len(COLUMNS) - 1
    print(f"{'':<{width}} " + " | ".join(f"{n:>{block}}" for n in names))
    print(f"{'':<{width}} " + " | ".join(" ".join(f"{label:>8}" for _, label in COLUMNS) for _ in names))
    for site in sites:
        cells = []
        for r in runs:
            m = r["final"]["per_site"].get(site, {})
            cells.append(" ".join(f"{_fmt(m.get(key)):>8}" for key, _ in COLUMNS))
        print(f"{site:<{width}} " + " | ".join(cells))
    rows = (("mean", "mean_balanced_acc", "mean_acc"), ("worst site", "worst_balanced_acc", "worst_acc"),
            ("pooled", None, "pooled_acc"))  # fmt: skip
    for label, balanced, plain in rows:
        cells = [f"{_fmt(r['final'].get(balanced)) if balanced else '':>8} {_fmt(r['final'][plain]):>8} {'':>8}"
                 for r in runs]  # fmt: skip
        print(f"{label:<{width}} " + " | ".join(cells))
    on = {"val_balanced_acc": "val bal acc", "val_acc": "val acc", "val_macro_auroc": "val auroc"}
    print(f"{'round chosen':<{width}} " + " | ".join(
        f"{r['selected_round']:>8} {'on ' + on.get(r.get('selected_on'), 'val acc'):<{block - 9}}" for r in runs))  # fmt: skip
    flagged = {r["algorithm"]: r["final"].get("constant_predictors") or [] for r in runs}
    for name, constant in flagged.items():
        if constant:
            print(f"{name}: {', '.join(constant)} predict one class for every test image (accuracy there is the "
                  "class mix)")  # fmt: skip
