"""Assemble ``results.json`` (DESIGN §12) from what the round controller sees, round by round.

Evaluation semantics: round ``r``'s metrics score, at every site, the model that site would deploy
after round ``r``'s aggregation has been applied (for FedAvg the global model with the site's own
BatchNorm statistics; for personalized methods the personal model). Sites compute them at the start
of task ``r + 1`` (or of the final ``evaluate`` task), so they arrive one task later than the
training loss of round ``r``.

The reported round (``selected_round``) maximises the mean of the sites' *validation* accuracy —
every hospital counts the same — and only then are its test numbers read. Ties go to the earlier
round. ``pooled_acc`` is Σ correct / Σ images over the sites' test splits at that round.
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
        """Rounds with training facts and an evaluation from every site."""
        return sorted(r.round for r in self._rounds.values()
                      if r.train_loss and all(s in r.evals for s in self.sites))  # fmt: skip

    def mean_val_acc(self, rnd: int) -> float:
        """Mean over sites of validation accuracy after round ``rnd``."""
        evals = self._rounds[rnd].evals
        return sum(evals[s]["val"]["acc"] for s in self.sites) / len(self.sites)

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
                    for s in self.sites
                },
            })  # fmt: skip
        chosen = self._rounds[best].evals
        per_site = {s: {"test_acc": _num(chosen[s]["test"]["acc"]), "test_auroc": _num(chosen[s]["test"]["auroc"])}
                    for s in self.sites}  # fmt: skip
        accs = [chosen[s]["test"]["acc"] for s in self.sites]
        correct = sum(chosen[s]["test"]["correct"] for s in self.sites)
        total = sum(chosen[s]["test"]["n"] for s in self.sites)
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
        }
