"""Assemble ``results.json`` (DESIGN §12) from what the round controller sees, round by round.

Evaluation semantics: round ``r``'s metrics score, at every site, the model that site would deploy
after round ``r``'s aggregation has been applied (for FedAvg the global model with the site's own
BatchNorm statistics; for personalized methods the personal model). Sites compute them at the start
of task ``r + 1`` (or of the final ``evaluate`` task), so they arrive one task later than the
training loss of round ``r``.

The reported round (``selected_round``) maximises the mean of the sites' *validation* accuracy —
every hospital counts the same — and only then are its test numbers read. Ties go to the earlier
round. ``pooled_acc`` is Σ correct / Σ images over the sites' test splits at that round.

Failed sites (job ``reliability.min_sites``): a site that failed the task carrying round ``r``'s
evaluation has no metrics for round ``r`` — they are left out of that round (never filled in), its
means are over the sites that did evaluate, and ``failures`` lists site, round, task and reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def _num(x: float | None) -> float | None:
    """JSON-safe float: NaN (e.g. AUROC of a one-class split) becomes ``None``."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return float(x)


@dataclass
class _Round:
    round: int
    seconds: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    train_loss: dict[str, float] = field(default_factory=dict)
    evals: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # site -> {"val":…, "test":…}


class RunRecorder:
    """Collects per-round facts and renders ``results.json``.

    Args:
        job: job name.
        algorithm: algorithm name.
        privacy: the ``privacy`` section to report (at least ``{"mode": ...}``).
        sites: site names in report order.
        models: site → backbone.
    """

    def __init__(self, job: str, algorithm: str, privacy: dict[str, Any], sites: list[str], models: dict[str, str],
                 algorithm_form: str = "sums", refused: dict[str, str] | None = None):  # fmt: skip
        self.job, self.algorithm, self.privacy = job, algorithm, privacy
        self.algorithm_form = algorithm_form
        self.refused = dict(refused or {})
        self.synthetic: dict[str, dict[str, float]] = {}
        """site → PCEvolve synthetic training images it added (``images``) and their selection ε."""
        self.spent: dict[str, dict[str, float]] = {}
        self.sites, self.models = list(sites), dict(models)
        self._rounds: dict[int, _Round] = {}
        self.failures: list[dict[str, Any]] = []
        self._unavailable: dict[int, set[str]] = {}

    def set_failures(self, failures: list[dict[str, Any]]) -> None:
        """Record tasks sites failed (``site``, ``round`` = the task's round, ``task``, ``reason``).

        A failed ``train`` task of round r (or the final ``evaluate``, round R + 1) would have carried the
        site's evaluation of round r − 1, which therefore does not exist.
        """
        self.failures = [dict(f) for f in failures]
        for f in self.failures:
            if f["round"] > 1:
                self._unavailable.setdefault(f["round"] - 1, set()).add(f["site"])

    def _get(self, rnd: int) -> _Round:
        return self._rounds.setdefault(rnd, _Round(rnd))

    def set_spent(self, site: str, epsilon: float, delta: float) -> None:
        """The (ε, δ) ``site`` has spent on this job so far (its own accountant's figure)."""
        self.spent[site] = {"epsilon": float(epsilon), "delta": float(delta)}

    def add_training(self, rnd: int, *, seconds: float, bytes_up: int, bytes_down: int,
                     train_loss: dict[str, float]) -> None:  # fmt: skip
        """Record round ``rnd``'s wall time, payload bytes (summed over sites) and training losses."""
        r = self._get(rnd)
        r.seconds, r.bytes_up, r.bytes_down = float(seconds), int(bytes_up), int(bytes_down)
        r.train_loss.update(train_loss)

    def add_evaluation(self, rnd: int, site: str, val: dict[str, float], test: dict[str, float]) -> None:
        """Record what ``site`` measured for the model it held after round ``rnd``."""
        self._get(rnd).evals[site] = {"val": val, "test": test}

    def complete_rounds(self) -> list[int]:
        """Rounds with training facts and an evaluation from every site that did not fail it."""
        return sorted(r.round for r in self._rounds.values()
                      if r.train_loss and r.evals
                      and all(s in r.evals for s in self.sites if s not in self._unavailable.get(r.round, ())))  # fmt: skip

    def _evaluated(self, rnd: int) -> list[str]:
        return [s for s in self.sites if s in self._rounds[rnd].evals]

    def mean_val_acc(self, rnd: int) -> float:
        """Mean validation accuracy after round ``rnd`` over the sites that evaluated it."""
        evals, sites = self._rounds[rnd].evals, self._evaluated(rnd)
        return sum(evals[s]["val"]["acc"] for s in sites) / len(sites)

    def selected_round(self) -> int:
        """The complete round with the highest mean validation accuracy (earliest on ties)."""
        rounds = self.complete_rounds()
        if not rounds:
            raise ValueError("no round has an evaluation from every site")
        return max(rounds, key=lambda r: (self.mean_val_acc(r), -r))

    def progress(self, rnd: int) -> dict[str, Any]:
        """A one-line summary of round ``rnd`` for progress displays (means over the sites that reported)."""
        r = self._rounds.get(rnd, _Round(rnd))
        evals = r.evals.values()
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        return {
            "round": rnd,
            "seconds": round(r.seconds, 3),
            "mean_train_loss": mean(list(r.train_loss.values())),
            "mean_val_acc": mean([e["val"]["acc"] for e in evals]),
            "mean_test_acc": mean([e["test"]["acc"] for e in evals]),
        }

    def results(self) -> dict[str, Any]:
        """``results.json`` as in DESIGN §12."""
        rounds = self.complete_rounds()
        best = self.selected_round()
        out_rounds = []
        for rnd in rounds:
            r = self._rounds[rnd]
            out_rounds.append({
                "round": rnd,
                "seconds": round(r.seconds, 3),
                "bytes_up": r.bytes_up,
                "bytes_down": r.bytes_down,
                "metrics": {
                    s: {
                        "val_acc": _num(r.evals[s]["val"]["acc"]),
                        "test_acc": _num(r.evals[s]["test"]["acc"]),
                        "test_auroc": _num(r.evals[s]["test"]["auroc"]),
                        "train_loss": _num(r.train_loss.get(s)),
                    }
                    for s in self._evaluated(rnd)
                },
            })  # fmt: skip
        chosen, evaluated = self._rounds[best].evals, self._evaluated(best)
        per_site = {s: {"test_acc": _num(chosen[s]["test"]["acc"]), "test_auroc": _num(chosen[s]["test"]["auroc"])}
                    if s in chosen else {"test_acc": None, "test_auroc": None} for s in self.sites}  # fmt: skip
        accs = [chosen[s]["test"]["acc"] for s in evaluated]
        correct = sum(chosen[s]["test"]["correct"] for s in evaluated)
        total = sum(chosen[s]["test"]["n"] for s in evaluated)
        return {
            "job": self.job,
            "algorithm": self.algorithm,
            "algorithm_form": self.algorithm_form,
            "privacy": self.privacy,
            "sites": self.sites,
            "models": self.models,
            "rounds": out_rounds,
            "selected_round": best,
            "final": {
                "per_site": per_site,
                "pooled_acc": _num(correct / total if total else math.nan),
                "mean_acc": _num(sum(accs) / len(accs)),
                "worst_acc": _num(min(accs)),
            },
            "privacy_spent": {s: dict(self.spent.get(s, {"epsilon": 0.0, "delta": 0.0})) for s in self.sites},
            "refused": self.refused,
            "synthetic": self.synthetic,
            "failures": self.failures,
        }
