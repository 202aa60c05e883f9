"""Tables over seeds for the FL benchmarks: means with intervals, paired gains, and which sites lose.

Every function takes *runs*: one dict per (algorithm, seed) job with at least ``algorithm``, ``seed``, the
headline numbers (``mean_acc``, ``worst_acc``, ``mean_balanced_acc`` …) and ``per_site`` (site → the site's
``test_acc``, ``test_balanced_acc`` …), the shape ``results.json``'s ``final`` has. Seeds pair the runs: a
seed fixes the hospitals (or the deal of the digits) and the training's randomness for every algorithm, so
``A − B`` on one seed removes what that draw did to both. Intervals are 95 % Student-t over seeds
(:mod:`medsilo.stats`).
"""

from __future__ import annotations

from typing import Any

from medsilo.stats import Interval, mean_interval, paired_interval


def _by_seed(runs: list[dict[str, Any]], algorithm: str) -> dict[int, dict[str, Any]]:
    return {r["seed"]: r for r in runs if r["algorithm"] == algorithm}


def _site_value(run: dict[str, Any], site: str, key: str) -> float | None:
    return (run["per_site"].get(site) or {}).get(key)


def summary(runs: list[dict[str, Any]], algorithms: list[str], keys: list[str]) -> str:
    """Markdown: one row per algorithm, one column per headline ``key``: mean over seeds ± 95 % half-width."""
    head = "| algorithm | " + " | ".join(keys) + " | seeds |"
    lines = [head, "|---|" + "---:|" * (len(keys) + 1)]
    for algo in algorithms:
        seeds = _by_seed(runs, algo)
        if not seeds:
            continue
        cells = []
        for key in keys:
            values = [r[key] for r in seeds.values() if r.get(key) is not None]
            iv = mean_interval(values) if values else None
            cells.append(f"{iv.value:.3f} ± {iv.half_width:.3f}" if iv else "—")
        lines.append(f"| {algo} | " + " | ".join(cells) + f" | {len(seeds)} |")
    return "\n".join(lines)


def paired_gain(runs: list[dict[str, Any]], algorithm: str, base: str, key: str) -> Interval | None:
    """``algorithm − base`` on headline ``key``, paired over the seeds both ran (``None`` if none)."""
    a, b = _by_seed(runs, algorithm), _by_seed(runs, base)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    return paired_interval([a[s][key] for s in seeds], [b[s][key] for s in seeds])


def paired_table(runs: list[dict[str, Any]], algorithms: list[str], bases: list[str], key: str) -> str:
    """Markdown: each algorithm's paired gain on ``key`` over each of ``bases`` (mean [95 % interval])."""
    lines = ["| algorithm | " + " | ".join(f"− {b}" for b in bases) + " |", "|---|" + "---:|" * len(bases)]
    for algo in algorithms:
        cells = []
        for base in bases:
            g = None if algo == base else paired_gain(runs, algo, base, key)
            cells.append("—" if g is None else f"{g}{' *' if g.excludes_zero() else ''}")
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def site_gains(runs: list[dict[str, Any]], algorithm: str, base: str, key: str) -> dict[str, Interval]:
    """Each site's paired gain of ``algorithm`` over ``base`` on per-site ``key`` (e.g. ``test_balanced_acc``),
    over the seeds where both measured the site. Sites keep their names across seeds (``hospital-3`` is the
    same kind of hospital, newly drawn), so the interval says how that site fares across draws."""
    a, b = _by_seed(runs, algorithm), _by_seed(runs, base)
    seeds = sorted(set(a) & set(b))
    sites = sorted({s for seed in seeds for s in a[seed]["per_site"]}, key=_natural)
    out = {}
    for site in sites:
        pairs = [(_site_value(a[s], site, key), _site_value(b[s], site, key)) for s in seeds]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        if pairs:
            out[site] = paired_interval([x for x, _ in pairs], [y for _, y in pairs])
    return out


def site_table(runs: list[dict[str, Any]], algorithms: list[str], base: str, key: str) -> str:
    """Markdown: sites as rows, ``algorithms`` as columns, each cell the site's paired gain over ``base``;
    a last row counts the sites whose interval lies wholly below 0 (they lose)."""
    gains = {algo: site_gains(runs, algo, base, key) for algo in algorithms}
    sites = sorted({s for g in gains.values() for s in g}, key=_natural)
    lines = ["| site | " + " | ".join(algorithms) + " |", "|---|" + "---:|" * len(algorithms)]
    for site in sites:
        cells = [str(gains[a][site]) if site in gains[a] else "—" for a in algorithms]
        lines.append(f"| {site} | " + " | ".join(cells) + " |")
    lines.append("| sites that lose (upper end < 0) | " + " | ".join(
        str(sum(g.high < 0 for g in gains[a].values())) for a in algorithms) + " |")  # fmt: skip
    return "\n".join(lines)


def runs_of(result: dict[str, Any], seed: int, labels: list[str]) -> list[dict[str, Any]]:
    """The *runs* (module docstring) of one seed's results file, for the rows labelled in ``labels``."""
    return [{**{key: v for key, v in row.items() if key != "models"}, "algorithm": row["label"], "seed": seed,
             "per_site": result["per_site"][row["label"]]} for row in result["rows"] if row["label"] in labels]  # fmt: skip


def tables(runs: list[dict[str, Any]], algorithms: list[str], bases: list[str]) -> str:
    """The tables every multi-seed benchmark prints: headline means, paired gains in mean balanced accuracy
    over each of ``bases``, and each site's paired gain over ``bases[0]`` (Local)."""
    return "\n\n".join([
        summary(runs, algorithms, ["mean_balanced_acc", "mean_acc", "worst_acc", "mean_auroc"]),
        "Paired gain in mean balanced accuracy (mean [95 % interval] over seeds; * excludes 0):",
        paired_table(runs, algorithms, bases, "mean_balanced_acc"),
        f"Each site's paired gain in balanced accuracy over {bases[0]}:",
        site_table(runs, [a for a in algorithms if a != bases[0]], bases[0], "test_balanced_acc"),
    ])  # fmt: skip


def _natural(site: str) -> tuple[str, int]:
    """``site-2`` before ``site-10``."""
    head, _, tail = site.rpartition("-")
    return (head, int(tail)) if tail.isdigit() else (site, 0)
