"""Assemble ``results.json`` (DESIGN §12) from what the round controller sees, round by round.

Evaluation semantics: round ``r``'s metrics score, at every site, the model that site would deploy
after round ``r``'s aggregation has been applied (for FedAvg the global model with the site's own
BatchNorm statistics; for personalized methods the personal model). Sites compute them at the start
of task ``r + 1`` (or of the final ``evaluate`` task), so they arrive one task later than the
training loss of round ``r``.

The reported round (``selected_round``) maximises the mean of the sites' *validation* accuracy —
every hospital counts the same — and only then are its test numbers read. Ties go to the earlier
round. ``pooled_acc`` is Σ correct / Σ images over the sites' test splits at that round. Every round
also carries each site's ``n_val``/``n_test`` and both means, unweighted (``mean_val_acc``,
``mean_test_acc``) and sample-weighted (``pooled_val_acc``, ``pooled_test_acc``).

Multi-label jobs (``task: multilabel``, the recorder's ``select_on`` = ``val_macro_auroc``): the round is
selected on the mean over sites of the *validation macro-AUROC* (sites whose macro-AUROC is undefined are left
out of that mean). Each site's figures then also carry ``val_macro_auroc``, ``test_macro_auroc``,
``test_auroc_per_label``, ``test_f1_per_label`` (at the thresholds the site chose on validation, ``thresholds``)
and each round the means ``mean_val_macro_auroc`` / ``mean_test_macro_auroc``; ``final`` adds ``labels``,
``mean_macro_auroc`` and ``worst_macro_auroc``. ``acc`` is exact-match accuracy there
(:func:`~medsilo.components.training.multilabel_metrics`).

Failed sites (job ``reliability.min_sites``): a site that failed the task carrying round ``r``'s
evaluation has no metrics for round ``r`` — they are left out of that round (never filled in), its
means are over the sites that did evaluate, and ``failures`` lists site, round, task and reason.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter


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
        job_id: the id of the run that reports (NVFlare's job id; ``medsilo sim``: the run id), which the
            parties' ledgers name. Not kept in checkpoints: a resumed run reports its own.
        select_on: the job's ``evaluation.select_on``: ``val_balanced_acc``, ``val_acc`` or ``val_macro_auroc``
            (multi-label jobs).
    """

    def __init__(self, job: str, algorithm: str, privacy: dict[str, Any], sites: list[str], models: dict[str, str],
                 algorithm_form: str = "sums", refused: dict[str, str] | None = None,
                 job_id: str | None = None, select_on: str = "val_acc"):  # fmt: skip
        if select_on not in SELECTION_METRICS:
            raise ValueError(f"select_on: must be one of {', '.join(SELECTION_METRICS)}, got {select_on!r}")
        self.select_on = select_on
        self.job, self.algorithm, self.privacy = job, algorithm, privacy
        self.job_id = job_id
        self.algorithm_form = algorithm_form
        self.refused = dict(refused or {})
        self.synthetic: dict[str, dict[str, float]] = {}
        """site → PCEvolve synthetic training images it added (``images``) and their selection ε."""
        self.spent: dict[str, dict[str, float]] = {}
        self.sites, self.models = list(sites), dict(models)
        self._rounds: dict[int, _Round] = {}
        self.failures: list[dict[str, Any]] = []
        self._unavailable: dict[int, set[str]] = {}

    def to_json(self) -> str:
        """Everything recorded so far as JSON text (what the server checkpoint stores).

        Dicts keep their order (means are summed in the same order after a restore); round numbers
        become string keys; NaN (an AUROC of a one-class split) is written as the literal ``NaN``, which
        :meth:`from_json` reads back as NaN. A restored recorder therefore reports exactly what the
        original would.
        """
        state = {
            "job": self.job,
            "algorithm": self.algorithm,
            "privacy": self.privacy,
            "algorithm_form": self.algorithm_form,
            "refused": self.refused,
            "synthetic": self.synthetic,
            "spent": self.spent,
            "sites": self.sites,
            "models": self.models,
            "rounds": [asdict(r) for _, r in sorted(self._rounds.items())],
            "failures": self.failures,
            "unavailable": {str(rnd): sorted(sites) for rnd, sites in sorted(self._unavailable.items())},
            "select_on": self.select_on,
        }
        return json.dumps(state)

    @classmethod
    def from_json(cls, text: str) -> RunRecorder:
        """The recorder :meth:`to_json` wrote.

        Raises:
            ValueError: ``text`` is not that JSON; the message names the first field that is wrong.
        """
        try:
            state = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"run recorder: not JSON ({exc})") from None
        _check(state, "top level", dict)
        state.setdefault("select_on", "val_acc")  # checkpoints written before multi-label jobs existed
        missing, extra = _RECORDER_KEYS - set(state), set(state) - _RECORDER_KEYS
        if missing or extra:
            raise ValueError(f"run recorder: missing fields {sorted(missing)}, unknown {sorted(extra)}")
        for key in ("job", "algorithm", "algorithm_form", "select_on"):
            _check(state[key], key, str)
        _check(state["privacy"], "privacy", dict)
        _check_map(state["refused"], "refused", str)
        _check_map(state["models"], "models", str)
        _check_list(state["sites"], "sites", str)
        for key in ("synthetic", "spent"):
            _check(state[key], key, dict)
            for site, numbers in state[key].items():
                _check_map(numbers, f"{key}.{site}", (int, float))
        _check_list(state["failures"], "failures", dict)
        for i, failure in enumerate(state["failures"]):
            fields = {"site": str, "round": int, "task": str, "reason": str}
            _check_fields(failure, f"failures[{i}]", fields)
        _check(state["unavailable"], "unavailable", dict)
        _check_list(state["rounds"], "rounds", dict)
        rec = cls(state["job"], state["algorithm"], state["privacy"], state["sites"], state["models"],
                  algorithm_form=state["algorithm_form"], refused=state["refused"],
                  select_on=state["select_on"])  # fmt: skip
        rec.synthetic, rec.spent = state["synthetic"], state["spent"]
        rec.failures = state["failures"]
        for rnd, sites in state["unavailable"].items():
            if not rnd.isdigit():
                raise ValueError(f"run recorder: unavailable: round keys must be integers, got {rnd!r}")
            _check_list(sites, f"unavailable.{rnd}", str)
            rec._unavailable[int(rnd)] = set(sites)
        for i, entry in enumerate(state["rounds"]):
            r = _round_from(entry, f"rounds[{i}]")
            rec._rounds[r.round] = r
        return rec

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

    @property
    def multilabel(self) -> bool:
        """True when the job is multi-label (rounds selected on validation macro-AUROC)."""
        return self.select_on == "val_macro_auroc"

    def mean_val_macro_auroc(self, rnd: int) -> float:
        """Mean validation macro-AUROC after round ``rnd`` over the sites that evaluated it and have one
        (NaN when none has)."""
        evals = self._rounds[rnd].evals
        values = [evals[s]["val"].get("macro_auroc", math.nan) for s in self._evaluated(rnd)]
        return _nanmean(values)

    def mean_val_balanced_acc(self, rnd: int) -> float:
        """Mean validation balanced accuracy after round ``rnd`` over the sites that evaluated it and have one
        (NaN when none has: evaluations checkpointed before balanced accuracy was measured)."""
        evals = self._rounds[rnd].evals
        return _nanmean([evals[s]["val"].get("balanced_acc", math.nan) for s in self._evaluated(rnd)])

    def selection_score(self, rnd: int) -> float:
        """What rounds are compared on (``select_on``): mean validation balanced accuracy, accuracy or
        macro-AUROC; an undefined score ranks below every defined one."""
        score = {"val_acc": self.mean_val_acc, "val_balanced_acc": self.mean_val_balanced_acc,
                 "val_macro_auroc": self.mean_val_macro_auroc}[self.select_on](rnd)  # fmt: skip
        return -math.inf if math.isnan(score) else score

    def selected_round(self) -> int:
        """The complete round with the highest :meth:`selection_score` (earliest on ties)."""
        rounds = self.complete_rounds()
        if not rounds:
            raise ValueError("no round has an evaluation from every site")
        return max(rounds, key=lambda r: (self.selection_score(r), -r))

    def progress(self, rnd: int) -> dict[str, Any]:
        """A one-line summary of round ``rnd`` for progress displays (means over the sites that reported)."""
        r = self._rounds.get(rnd, _Round(rnd))
        evals = r.evals.values()
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        out = {
            "round": rnd,
            "seconds": round(r.seconds, 3),
            "mean_train_loss": mean(list(r.train_loss.values())),
            "mean_val_acc": mean([e["val"]["acc"] for e in evals]),
            "mean_test_acc": mean([e["test"]["acc"] for e in evals]),
        }
        if self.multilabel:
            for split in ("val", "test"):
                out[f"mean_{split}_macro_auroc"] = _num(_nanmean([e[split].get("macro_auroc", math.nan)
                                                                  for e in evals]))  # fmt: skip
        return out

    def round_summary(self, rnd: int) -> dict[str, Any]:
        """Round ``rnd`` as ``results.json`` lists it: timing, bytes, each evaluating site's figures and counts,
        and the round's unweighted and sample-weighted means."""
        r = self._rounds[rnd]
        sites = self._evaluated(rnd)
        return {
            "round": rnd,
            "seconds": round(r.seconds, 3),
            "bytes_up": r.bytes_up,
            "bytes_down": r.bytes_down,
            "metrics": {
                s: {
                    "val_acc": _num(r.evals[s]["val"]["acc"]),
                    "test_acc": _num(r.evals[s]["test"]["acc"]),
                    "test_auroc": _num(r.evals[s]["test"]["auroc"]),
                    **({} if self.multilabel else _balanced_figures(r.evals[s])),
                    "train_loss": _num(r.train_loss.get(s)),
                    "n_val": int(r.evals[s]["val"]["n"]),
                    "n_test": int(r.evals[s]["test"]["n"]),
                    **(_multilabel_figures(r.evals[s], with_val=True) if self.multilabel else {}),
                }
                for s in sites
            },
            **_round_means(r.evals, sites),
            **(_macro_means(r.evals, sites) if self.multilabel else {}),
        }  # fmt: skip

    def results(self) -> dict[str, Any]:
        """``results.json`` as in DESIGN §12."""
        rounds = self.complete_rounds()
        best = self.selected_round()
        out_rounds = []
        for rnd in rounds:
            out_rounds.append(self.round_summary(rnd))
        chosen, evaluated = self._rounds[best].evals, self._evaluated(best)
        per_site = {s: {"test_acc": _num(chosen[s]["test"]["acc"]), "test_auroc": _num(chosen[s]["test"]["auroc"]),
                        **({} if self.multilabel else _balanced_figures(chosen[s], with_val=False))}
                    if s in chosen else {"test_acc": None, "test_auroc": None} for s in self.sites}  # fmt: skip
        accs = [chosen[s]["test"]["acc"] for s in evaluated]
        correct = sum(chosen[s]["test"]["correct"] for s in evaluated)
        total = sum(chosen[s]["test"]["n"] for s in evaluated)
        multilabel: dict[str, Any] = {}
        if not self.multilabel:
            balanced = [chosen[s]["test"].get("balanced_acc", math.nan) for s in evaluated]
            defined = [b for b in balanced if not math.isnan(b)]
            multilabel = {"mean_balanced_acc": _num(_nanmean(balanced)),
                          "worst_balanced_acc": _num(min(defined)) if defined else None,
                          "constant_predictors": [s for s in evaluated if per_site[s].get("constant_predictor")]}  # fmt: skip
        if self.multilabel:
            for s in evaluated:
                per_site[s].update(_multilabel_figures(chosen[s], with_val=False))
            macros = [chosen[s]["test"].get("macro_auroc", math.nan) for s in evaluated]
            defined = [m for m in macros if not math.isnan(m)]
            multilabel = {"labels": _labels(chosen[evaluated[0]]["test"]) if evaluated else [],
                          "mean_macro_auroc": _num(_nanmean(macros)),
                          "worst_macro_auroc": _num(min(defined)) if defined else None}  # fmt: skip
        return {
            "job": self.job,
            "job_id": self.job_id,
            "algorithm": self.algorithm,
            "algorithm_form": self.algorithm_form,
            "privacy": self.privacy,
            "sites": self.sites,
            "models": self.models,
            "rounds": out_rounds,
            **({"task": "multilabel"} if self.multilabel else {}),
            "selected_on": self.select_on,
            "selected_round": best,
            "selection_score": _num(self.selection_score(best)),  # the validation figure the round was chosen on
            "final": {
                "per_site": per_site,
                "pooled_acc": _num(correct / total if total else math.nan),
                "mean_acc": _num(sum(accs) / len(accs)),
                "worst_acc": _num(min(accs)),
                **multilabel,
            },
            "privacy_spent": {s: dict(self.spent.get(s, {"epsilon": 0.0, "delta": 0.0})) for s in self.sites},
            "refused": self.refused,
            "synthetic": self.synthetic,
            "failures": self.failures,
        }


def _balanced_figures(evals: dict[str, dict[str, float]], with_val: bool = True) -> dict[str, Any]:
    """A single-label site's balanced accuracies and whether its model predicted one class for every test
    image (``constant_predictor``: accuracy then only measures the class mix)."""
    out = {"test_balanced_acc": _num(evals["test"].get("balanced_acc")),
           "constant_predictor": evals["test"].get("predicted_classes") == 1}  # fmt: skip
    if with_val:
        out = {"val_balanced_acc": _num(evals["val"].get("balanced_acc")), **out}
    return out


def _round_means(evals: dict[str, dict[str, dict[str, float]]], sites: list[str]) -> dict[str, float | None]:
    """A round's means over ``sites``: unweighted (every hospital counts the same: ``mean_*``) and
    sample-weighted (every image counts the same: ``pooled_*`` = Σ correct / Σ images)."""
    out: dict[str, float | None] = {}
    for split in ("val", "test"):
        accs = [evals[s][split]["acc"] for s in sites]
        n = sum(evals[s][split]["n"] for s in sites)
        out[f"mean_{split}_acc"] = _num(sum(accs) / len(accs)) if accs else None
        out[f"pooled_{split}_acc"] = _num(sum(evals[s][split]["correct"] for s in sites) / n) if n else None
    return out


SELECTION_METRICS: tuple[str, ...] = ("val_acc", "val_balanced_acc", "val_macro_auroc")
"""What a recorder may select rounds on (the job's ``evaluation.select_on``)."""


def _nanmean(values: list[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


def _labels(figures: dict[str, float]) -> list[str]:
    """The label names of a multi-label evaluation (its ``auroc/<label>`` keys, in order)."""
    return [k.split("/", 1)[1] for k in figures if k.startswith("auroc/")]


def _multilabel_figures(evals: dict[str, dict[str, float]], *, with_val: bool) -> dict[str, Any]:
    """One site's multi-label figures as ``results.json`` shows them (per-label maps, thresholds from val)."""
    test = evals["test"]
    names = _labels(test)
    out: dict[str, Any] = {"val_macro_auroc": _num(evals["val"].get("macro_auroc"))} if with_val else {}
    return {**out,
            "test_macro_auroc": _num(test.get("macro_auroc")),
            "test_macro_f1": _num(test.get("macro_f1")),
            "test_auroc_per_label": {n: _num(test[f"auroc/{n}"]) for n in names},
            "test_f1_per_label": {n: _num(test[f"f1/{n}"]) for n in names},
            "thresholds": {n: _num(test[f"threshold/{n}"]) for n in names}}  # fmt: skip


def _macro_means(evals: dict[str, dict[str, dict[str, float]]], sites: list[str]) -> dict[str, float | None]:
    """A multi-label round's mean macro-AUROC over ``sites`` (undefined ones left out)."""
    return {f"mean_{split}_macro_auroc": _num(_nanmean([evals[s][split].get("macro_auroc", math.nan)
                                                        for s in sites])) for split in ("val", "test")}  # fmt: skip


class TensorBoardLog:
    """Each completed round's figures as TensorBoard scalars (``tensorboard --logdir FOLDER``), step = round:
    ``<site>/val_acc``, ``<site>/test_acc``, ``<site>/test_auroc``, ``<site>/train_loss``, ``mean/…`` and
    ``pooled/…`` accuracies, ``round/seconds``, ``round/bytes_up``, ``round/bytes_down``. Missing figures (a
    failed site, a DP round's loss, a one-class AUROC) are left out, never written as zeros.

    Args:
        folder: the event files' folder (created).
    """

    def __init__(self, folder: str | Path):
        self.writer = SummaryWriter(log_dir=str(folder))

    def add_round(self, summary: dict[str, Any]) -> None:
        """Write one :meth:`RunRecorder.round_summary`."""
        step = summary["round"]
        scalars = {f"round/{k}": summary[k] for k in ("seconds", "bytes_up", "bytes_down")}
        scalars |= {f"{kind}/{split}_acc": summary[f"{kind}_{split}_acc"] for kind in ("mean", "pooled")
                    for split in ("val", "test")}  # fmt: skip
        scalars |= {f"mean/{split}_macro_auroc": summary[f"mean_{split}_macro_auroc"] for split in ("val", "test")
                    if f"mean_{split}_macro_auroc" in summary}  # fmt: skip
        for site, figures in summary["metrics"].items():
            scalars |= {f"{site}/{k}": figures[k] for k in ("val_acc", "test_acc", "test_auroc", "train_loss")}
        for tag, value in scalars.items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


# ---- JSON form of a recorder (server checkpoints) ----------------------------------------------------

_RECORDER_KEYS = frozenset({"job", "algorithm", "privacy", "algorithm_form", "refused", "synthetic",
                            "spent", "sites", "models", "rounds", "failures", "unavailable", "select_on"})  # fmt: skip
_NUMBER = (int, float)


def _check(value: Any, name: str, kind: type | tuple[type, ...]) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a ``kind`` (a bool is never a number)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        wanted = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"run recorder: {name}: must be {wanted}, got {type(value).__name__}")


def _check_map(value: Any, name: str, kind: type | tuple[type, ...]) -> None:
    """``value`` must be a dict of ``kind`` values."""
    _check(value, name, dict)
    for key, item in value.items():
        _check(item, f"{name}.{key}", kind)


def _check_list(value: Any, name: str, kind: type | tuple[type, ...]) -> None:
    """``value`` must be a list of ``kind`` items."""
    _check(value, name, list)
    for i, item in enumerate(value):
        _check(item, f"{name}[{i}]", kind)


def _check_fields(value: Any, name: str, fields: dict[str, type | tuple[type, ...]]) -> None:
    """``value`` must be a dict with exactly ``fields``, each of its type."""
    _check(value, name, dict)
    if set(value) != set(fields):
        raise ValueError(f"run recorder: {name}: must have the fields {sorted(fields)}, has {sorted(value)}")
    for key, kind in fields.items():
        _check(value[key], f"{name}.{key}", kind)


def _round_from(entry: Any, name: str) -> _Round:
    """A :class:`_Round` from its ``to_json`` form, every field checked."""
    _check_fields(entry, name, {"round": int, "seconds": _NUMBER, "bytes_up": int, "bytes_down": int,
                                "train_loss": dict, "evals": dict})  # fmt: skip
    _check_map(entry["train_loss"], f"{name}.train_loss", _NUMBER)
    for site, splits in entry["evals"].items():
        _check_fields(splits, f"{name}.evals.{site}", {"val": dict, "test": dict})
        for split in ("val", "test"):
            _check_map(splits[split], f"{name}.evals.{site}.{split}", _NUMBER)
    return _Round(**entry)
