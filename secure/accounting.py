"""Differential-privacy accounting: what each release costs and whether it fits (no torch, no mechanisms).

The events a mechanism declares (:class:`GaussianEvent`, :class:`ExponentialEvent`), their JSON form (what the
ledger stores), the sensitivities the mechanisms are calibrated with, σ for a target ε, and the site's
:class:`PrivacyAccountant` — every ε from Google's ``dp_accounting`` (RDP or PLD) applied to the composed
events. The mechanisms themselves (torch) are in :mod:`medsilo.secure.dp`, which re-exports everything here;
``medsilo audit`` replays budgets from this module alone. The unit of privacy and the sensitivity argument of
each mechanism are in :mod:`medsilo.secure.dp`'s docstring.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import dp_accounting as dpa
import numpy as np
from dp_accounting.pld import common as pld_common, privacy_loss_distribution as pld_lib

from medsilo.errors import MedsiloError, did_you_mean

AccountantKind = Literal["rdp", "pld"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld")
"""Accountant kinds: ``rdp`` (default) and ``pld`` (module docstring)."""

PLD_DISCRETIZATION = 1e-4
"""Default PLD value-discretisation interval (``dp_accounting``'s own default)."""

class DPError(MedsiloError, ValueError):
    """A differential-privacy parameter or input that cannot be used; nothing was released."""


class BudgetExceeded(MedsiloError):
    """A release would take the site over its DP budget cap; it was refused before anything left.

    Attributes:
        site: the site's name.
        scope: the budget scope.
        cap_epsilon, cap_delta: the site's cap.
        spent: ε already spent in the scope (at ``cap_delta``).
        cost: what the refused release would add.
        total: ε the scope would reach with it.
        release: what was refused, e.g. ``gaussian σ=1.1 × 1 step``.
    """

    def __init__(
        self,
        *,
        site: str,
        scope: str,
        cap_epsilon: float,
        cap_delta: float,
        spent: float,
        cost: float,
        total: float,
        release: str = "",
    ):
        self.site, self.scope, self.release = site, scope, release
        self.cap_epsilon, self.cap_delta = cap_epsilon, cap_delta
        self.spent, self.cost, self.total = spent, cost, total
        super().__init__(
            f"site {site or '?'}: release{' (' + release + ')' if release else ''} refused, DP budget "
            f"'{scope}' would be exceeded: it would cost "
            f"ε={_fmt(cost)} on top of ε={_fmt(spent)} already spent, total ε={_fmt(total)} > cap "
            f"ε={_fmt(cap_epsilon)} (δ={cap_delta:g}); nothing was sent. Lower the job's privacy cost (larger "
            "noise_multiplier, fewer rounds, smaller PCEvolve epsilon) or, if the site's data governance "
            "allows it, raise privacy.budget.epsilon in the site config"
        )


def _fmt(eps: float) -> str:
    return "∞" if math.isinf(eps) else f"{eps:.4g}"


# ---- validation at the boundary ---------------------------------------------------------------------


def check_positive(name: str, value: Any) -> float:
    """``value`` as a finite float > 0, else :class:`DPError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise DPError(f"{name} must be a number > 0, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise DPError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def _delta(name: str, value: Any) -> float:
    value = check_positive(name, value)
    if value >= 1:
        raise DPError(f"{name} must be in (0, 1), got {value!r}")
    return value


def check_rate(name: str, value: Any) -> float:
    value = check_positive(name, value)
    if value > 1:
        raise DPError(f"{name} must be in (0, 1], got {value!r}")
    return value


def check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise DPError(f"{name} must be an integer ≥ 1, got {value!r}")
    return int(value)


def _accountant(value: Any) -> AccountantKind:
    if value not in ACCOUNTANTS:
        raise DPError(
            f"accountant {value!r} is unknown; {did_you_mean(value, ACCOUNTANTS)}valid: {', '.join(ACCOUNTANTS)}"
        )
    return value
def poisson_schedule(n: int, batch_size: int, epochs: int) -> tuple[int, float]:
    """Steps and sampling rate of ``epochs`` DP-SGD epochs over ``n`` records at expected batch ``batch_size``.

    The batch is capped at ``n`` (B = min(batch_size, n)); q = B/N, T = epochs · ⌈N/B⌉, so the expected
    number of records seen per round is that of ``epochs`` ordinary epochs.

    Args:
        n: N ≥ 1, records at the site (treated as public, as in DP-SGD practice).
        batch_size: expected batch size ≥ 1.
        epochs: local epochs ≥ 1.

    Returns:
        ``(T, q)``: steps ≥ 1 and sampling rate 0 < q ≤ 1, the ``steps``/``sampling_rate`` of the round's
        :class:`GaussianEvent`.
    """
    n, batch_size, epochs = check_count("n", n), check_count("batch_size", batch_size), check_count("epochs", epochs)
    batch = min(batch_size, n)
    return epochs * math.ceil(n / batch), batch / n
def sum_sensitivity(clip: float) -> float:
    """L2 sensitivity √2·C of :func:`gaussian_sum`'s release ``[S, C·n]`` (add/remove one record)."""
    return math.sqrt(2.0) * check_positive("clip", clip)


def update_sensitivity(clip: float) -> float:
    """L2 sensitivity 2·C of :func:`gaussian_update` (any two datasets of the site)."""
    return 2.0 * check_positive("clip", clip)
def gradient_sensitivity(grad_clip: float) -> float:
    """L2 sensitivity G of :func:`gaussian_gradient`'s clipped gradient sum (add/remove one record)."""
    return check_positive("grad_clip", grad_clip)


@dataclass(frozen=True)
class GaussianEvent:
    """``steps`` Gaussian mechanisms with noise multiplier σ, Poisson-subsampled at ``sampling_rate``.

    One :func:`gaussian_sum` or :func:`gaussian_update` release is ``GaussianEvent(σ)`` (steps 1, rate 1).
    ``sampling_rate < 1`` is only valid if each record was included independently with that probability.
    """

    noise_multiplier: float
    steps: int = 1
    sampling_rate: float = 1.0
    mechanism: ClassVar[str] = "gaussian"

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", check_positive("noise_multiplier", self.noise_multiplier))
        object.__setattr__(self, "steps", check_count("steps", self.steps))
        object.__setattr__(self, "sampling_rate", check_rate("sampling_rate", self.sampling_rate))

    def to_json(self) -> dict[str, Any]:
        """JSON-plain descriptor for the ledger, e.g. ``{"mechanism": "gaussian", "noise_multiplier": 1.1,
        "steps": 1, "sampling_rate": 1.0}``."""
        return {
            "mechanism": self.mechanism,
            "noise_multiplier": self.noise_multiplier,
            "steps": self.steps,
            "sampling_rate": self.sampling_rate,
        }

    def describe(self) -> str:
        """One line for messages, e.g. ``gaussian σ=1.1 × 1 step``."""
        rate = "" if self.sampling_rate == 1 else f", sampling rate {self.sampling_rate:g}"
        return f"gaussian σ={self.noise_multiplier:g} × {self.steps} step{'s' * (self.steps != 1)}{rate}"

    def _unit(self) -> tuple[tuple, dpa.DpEvent, int]:
        """(grouping key, one ``dp_accounting`` event, how many times it composes)."""
        unit: dpa.DpEvent = dpa.GaussianDpEvent(self.noise_multiplier)
        if self.sampling_rate < 1:
            unit = dpa.PoissonSampledDpEvent(self.sampling_rate, unit)
        return ("gaussian", self.noise_multiplier, self.sampling_rate), unit, self.steps


@dataclass(frozen=True)
class ExponentialEvent:
    """``count`` pure ε-DP selections (exponential mechanism draws) at ``epsilon`` each."""

    epsilon: float
    count: int = 1
    mechanism: ClassVar[str] = "exponential"

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", check_positive("epsilon", self.epsilon))
        object.__setattr__(self, "count", check_count("count", self.count))

    def to_json(self) -> dict[str, Any]:
        """JSON-plain descriptor for the ledger, e.g. ``{"mechanism": "exponential", "epsilon": 0.5,
        "count": 1}``."""
        return {"mechanism": self.mechanism, "epsilon": self.epsilon, "count": self.count}

    def describe(self) -> str:
        """One line for messages, e.g. ``exponential ε=0.5 × 2 draws``."""
        return f"exponential ε={self.epsilon:g} × {self.count} draw{'s' * (self.count != 1)}"

    def _unit(self) -> tuple[tuple, dpa.DpEvent, int]:
        """(grouping key, one ``dp_accounting`` event, how many times it composes)."""
        # Any ε-DP mechanism is (ε²/2)-zCDP (Bun & Steinke 2016, Prop. 3.3).
        return ("exponential", self.epsilon, 0.0), dpa.ZCDpEvent(rho=self.epsilon**2 / 2), self.count


Event = GaussianEvent | ExponentialEvent
_EVENT_TYPES: dict[str, type] = {"gaussian": GaussianEvent, "exponential": ExponentialEvent}


def event_from_json(descriptor: Mapping[str, Any]) -> Event:
    """Parse a ledger descriptor (:meth:`GaussianEvent.to_json` / :meth:`ExponentialEvent.to_json`).

    Strict, since a replayed budget must not be undercounted: unknown mechanisms or fields and bad
    values raise :class:`DPError` naming them. Optional fields take their defaults.
    """
    if isinstance(descriptor, GaussianEvent | ExponentialEvent):
        return descriptor
    if not isinstance(descriptor, Mapping) or "mechanism" not in descriptor:
        raise DPError(f"a DP event must be a dict with a 'mechanism' field, got {descriptor!r}")
    kind = descriptor["mechanism"]
    cls = _EVENT_TYPES.get(kind)
    if cls is None:
        raise DPError(
            f"DP event mechanism {kind!r} is unknown; {did_you_mean(kind, _EVENT_TYPES)}valid: {', '.join(_EVENT_TYPES)}"
        )
    fields = {k: v for k, v in descriptor.items() if k != "mechanism"}
    allowed = set(cls.__dataclass_fields__) - {"mechanism"}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise DPError(
            f"DP event {kind!r} has unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(allowed))}"
        )
    try:
        return cls(**fields)
    except TypeError as exc:
        raise DPError(f"DP event {kind!r} is missing a field ({exc}); got {dict(descriptor)!r}") from None


def _make_event(kind: str | Event | Mapping[str, Any], params: Mapping[str, Any]) -> Event:
    if isinstance(kind, GaussianEvent | ExponentialEvent | Mapping):
        if params:
            raise DPError("pass either an event or a mechanism name with its parameters, not both")
        return event_from_json(kind)
    return event_from_json({"mechanism": kind, **params})


def dpsgd_round_events(
    noise_multiplier: float, sgd_noise_multiplier: float, *, n: int, batch_size: int, epochs: int,
    release: bool = True,
) -> list[GaussianEvent]:  # fmt: skip
    """What one round of "DP-SGD training, then one Gaussian release" costs (FedProto/FedTGP under ``dp``), or
    with ``release=False`` of DP-SGD training alone (FedAvg's ``dp-sgd`` form, which uploads the trained weights).

    Args:
        noise_multiplier: σ of the release (unused when ``release`` is false).
        sgd_noise_multiplier: σ_sgd of the DP-SGD steps.
        n: N, the site's training records.
        batch_size: expected DP-SGD batch size.
        epochs: local epochs per round.
        release: whether a Gaussian release follows the training.

    Returns:
        ``[GaussianEvent(σ_sgd, steps=T, sampling_rate=q), GaussianEvent(σ)]`` with ``(T, q)`` from
        :func:`poisson_schedule`; without the second event when ``release`` is false.
    """
    steps, rate = poisson_schedule(n, batch_size, epochs)
    training = GaussianEvent(noise_multiplier=sgd_noise_multiplier, steps=steps, sampling_rate=rate)
    return [training, GaussianEvent(noise_multiplier=noise_multiplier)] if release else [training]
# ---- composition (all ε from dp_accounting) --------------------------------------------------------------


def _rdp_epsilon(events: list[Event], delta: float) -> float:
    if not events:
        return 0.0
    # Equal events are grouped (RDP adds up, so k × one event is exact): cost stays flat over rounds, and
    # a replay gives the same float as incremental spending whatever the order.
    groups: dict[tuple, tuple[dpa.DpEvent, int]] = {}
    for e in events:
        key, unit, times = e._unit()
        groups[key] = (unit, groups.get(key, (unit, 0))[1] + times)
    acc = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
    for _key, (unit, times) in sorted(groups.items(), key=lambda kv: kv[0]):
        acc.compose(unit, times)
    return float(acc.get_epsilon(delta))


def _pld_epsilon(events: list[Event], delta: float, interval: float) -> float:
    """PLD composition. Events are grouped first so the cost stays flat over many rounds: unsampled
    Gaussians compose exactly into one Gaussian (Σ steps/σ² is additive, the same identity
    ``PLDAccountant`` uses for a self-composed Gaussian); equal sampled Gaussians and equal pure draws
    are self-composed once."""
    if not events:
        return 0.0
    plain, sampled, pure = [], {}, {}
    for e in events:
        if isinstance(e, GaussianEvent) and e.sampling_rate == 1:
            plain.append(e.steps / e.noise_multiplier**2)
        elif isinstance(e, GaussianEvent):
            key = (e.noise_multiplier, e.sampling_rate)
            sampled[key] = sampled.get(key, 0) + e.steps
        else:
            pure[e.epsilon] = pure.get(e.epsilon, 0) + e.count
    relation = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
    total = pld_lib.identity(value_discretization_interval=interval)
    if plain:
        total = total.compose(
            pld_lib.from_gaussian_mechanism(
                standard_deviation=1 / math.sqrt(math.fsum(plain)),
                value_discretization_interval=interval,
                neighboring_relation=relation,
            )
        )
    for (sigma, rate), steps in sorted(sampled.items()):
        total = total.compose(
            pld_lib.from_gaussian_mechanism(
                standard_deviation=sigma,
                value_discretization_interval=interval,
                sampling_prob=rate,
                neighboring_relation=relation,
            ).self_compose(steps)
        )
    for eps, count in sorted(pure.items()):
        params = pld_common.DifferentialPrivacyParameters(epsilon=eps, delta=0)
        total = total.compose(
            pld_lib.from_privacy_parameters(params, value_discretization_interval=interval).self_compose(
                count
            )
        )
    return float(total.get_epsilon_for_delta(delta))


def _compose_epsilon(events: list[Event], delta: float, accountant: AccountantKind, interval: float) -> float:
    """ε at ``delta`` of all ``events``: ``min(ε_all, ε_gauss + Σ ε_pure)`` (module docstring)."""

    def library(evs: list[Event]) -> float:
        return _rdp_epsilon(evs, delta) if accountant == "rdp" else _pld_epsilon(evs, delta, interval)

    gauss = [e for e in events if isinstance(e, GaussianEvent)]
    pure = math.fsum(e.epsilon * e.count for e in events if isinstance(e, ExponentialEvent))
    eps_gauss = library(gauss)
    if pure == 0:
        eps = eps_gauss
    else:
        eps = min(library(events), eps_gauss + pure)
    if math.isnan(eps) or eps < 0:
        raise DPError(f"the accountant returned ε={eps!r}; refusing to release")
    return eps


def gaussian_epsilon(
    noise_multiplier: float,
    steps: int,
    delta: float,
    sampling_rate: float = 1.0,
    accountant: AccountantKind = "rdp",
    pld_discretization: float = PLD_DISCRETIZATION,
) -> float:
    """ε at ``delta`` of ``steps`` composed Gaussian mechanisms with multiplier σ (``dp_accounting``).

    Args:
        noise_multiplier: σ > 0, noise std / L2 sensitivity.
        steps: number of releases ≥ 1 (e.g. rounds).
        delta: 0 < δ < 1.
        sampling_rate: Poisson sampling probability of each record per step, 0 < q ≤ 1 (1: every record
            every step).
        accountant: ``"rdp"`` (default) or ``"pld"``.
        pld_discretization: PLD value-discretisation interval (smaller: tighter, slower).

    Returns:
        ε (record-level, add/remove one record).
    """
    event = GaussianEvent(noise_multiplier=noise_multiplier, steps=steps, sampling_rate=sampling_rate)
    return _compose_epsilon(
        [event],
        _delta("delta", delta),
        _accountant(accountant),
        check_positive("pld_discretization", pld_discretization),
    )


def noise_for_epsilon(epsilon: float, steps: int, delta: float, sampling_rate: float = 1.0) -> float:
    """The smallest σ whose ``steps`` Gaussian releases cost at most ``epsilon`` at ``delta`` (RDP).

    A planning aid for job authors ("what noise gives ε = 4 over 20 rounds?"): the search is
    ``dp_accounting.calibrate_dp_mechanism`` over the same events :func:`gaussian_epsilon` composes, so
    ``gaussian_epsilon(noise_for_epsilon(e, n, d), n, d) <= e`` (to the search tolerance, 1e-6 in σ).
    """
    target, steps = check_positive("epsilon", epsilon), check_count("steps", steps)
    delta, rate = _delta("delta", delta), check_rate("sampling_rate", sampling_rate)

    def event(sigma: float) -> dpa.DpEvent:
        return GaussianEvent(noise_multiplier=max(sigma, 1e-9), steps=steps, sampling_rate=rate)._unit()[1]

    def make(sigma: float) -> dpa.DpEvent:
        return dpa.SelfComposedDpEvent(event(sigma), steps)

    def fresh() -> dpa.PrivacyAccountant:
        return dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)

    bracket = dpa.LowerEndpointAndGuess(1e-3, 1.0)
    sigma = dpa.calibrate_dp_mechanism(fresh, make, target, delta, bracket_interval=bracket, tol=1e-6)
    return float(sigma)


def dpsgd_noise_for_epsilon(
    epsilon: float,
    rounds: int,
    delta: float,
    *,
    n: int,
    batch_size: int,
    epochs: int,
    sgd_noise_multiplier: float | None = None,
    release: bool = True,
    once: Sequence[Event] = (),
) -> float:
    """The smallest release σ whose ``rounds`` rounds of :func:`dpsgd_round_events` cost at most ``epsilon`` (RDP).

    The planning aid for the prototype methods under ``dp``, where each round costs DP-SGD training
    (``GaussianEvent(σ_sgd, T, q)``) *and* the class-sum release (``GaussianEvent(σ)``). With
    ``sgd_noise_multiplier=None`` one σ serves both (σ_sgd = σ, the default of a job's
    ``privacy.dp.sgd_noise_multiplier``); with a given σ_sgd only the release's σ is searched. The search
    is ``dp_accounting.calibrate_dp_mechanism`` over the events the site's accountant composes, so
    ``PrivacyAccountant(delta=δ).cost(*events * rounds)`` at the returned σ is ≤ ``epsilon`` (to the search
    tolerance, 1e-6 in σ).

    T and q depend on the site's N, so sites of one job spend different ε at the same σ; at a fixed σ and
    batch size a smaller N costs more (larger q), so calibrate with the smallest site's N.

    Args:
        epsilon: target ε > 0 for the whole job.
        rounds: rounds ≥ 1.
        delta: 0 < δ < 1.
        n: N, the site's training records.
        batch_size: expected DP-SGD batch size.
        epochs: local epochs per round.
        sgd_noise_multiplier: a fixed σ_sgd, or ``None`` for a common σ.
        release: ``False``: rounds of DP-SGD training alone (FedAvg's ``dp-sgd`` form); the σ returned is
            σ_sgd (``sgd_noise_multiplier`` must then be ``None``).
        once: events the job charges once besides its rounds (a ``logit-adjusted`` job's class-count release,
            ``GaussianEvent(privacy.dp.count_noise_multiplier)``), composed into the target.

    Returns:
        σ > 0 (the release's; also σ_sgd when ``sgd_noise_multiplier`` is ``None``).

    Raises:
        DPError: bad parameters, or a fixed σ_sgd whose training alone already costs ≥ ``epsilon``.
    """
    target, rounds, delta = check_positive("epsilon", epsilon), check_count("rounds", rounds), _delta("delta", delta)
    fixed = None if sgd_noise_multiplier is None else check_positive("sgd_noise_multiplier", sgd_noise_multiplier)
    poisson_schedule(n, batch_size, epochs)  # validates n, batch_size, epochs
    if fixed is not None and not release:
        raise DPError("sgd_noise_multiplier: without a release there is only σ_sgd to search; give None")

    def events(sigma: float) -> list[GaussianEvent]:
        sigma = max(sigma, 1e-9)
        return dpsgd_round_events(sigma, sigma if fixed is None else fixed, n=n, batch_size=batch_size,
                                  epochs=epochs, release=release)  # fmt: skip

    if once and _rdp_epsilon(list(once), delta) >= target:
        raise DPError(f"the once-charged events alone cost ε={_fmt(_rdp_epsilon(list(once), delta))} ≥ {target:g} "
                      f"(δ={delta:g}); raise their noise multiplier")  # fmt: skip
    if fixed is not None:
        training = _rdp_epsilon(events(1.0)[:1] * rounds + list(once), delta)
        if training >= target:
            raise DPError(
                f"DP-SGD at sgd_noise_multiplier={fixed:g} alone costs ε={_fmt(training)} ≥ {target:g} over "
                f"{rounds} rounds (δ={delta:g}); raise sgd_noise_multiplier or lower the rounds or epochs"
            )

    def make(sigma: float) -> dpa.DpEvent:
        round_events = [
            dpa.SelfComposedDpEvent(unit, times) for _key, unit, times in (e._unit() for e in events(sigma))
        ]
        whole = dpa.SelfComposedDpEvent(dpa.ComposedDpEvent(round_events), rounds)
        if not once:
            return whole
        extra = [dpa.SelfComposedDpEvent(unit, times) for _key, unit, times in (e._unit() for e in once)]
        return dpa.ComposedDpEvent([whole, *extra])

    def fresh() -> dpa.PrivacyAccountant:
        return dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)

    bracket = dpa.LowerEndpointAndGuess(1e-3, 1.0)
    sigma = dpa.calibrate_dp_mechanism(fresh, make, target, delta, bracket_interval=bracket, tol=1e-6)
    return float(sigma)


def exponential_epsilon(
    epsilon: float,
    count: int = 1,
    delta: float | None = None,
    accountant: AccountantKind = "rdp",
    pld_discretization: float = PLD_DISCRETIZATION,
) -> float:
    """ε of ``count`` exponential-mechanism draws at ``epsilon`` each.

    With ``delta=None`` the pure guarantee ``count·ε`` (δ = 0, basic composition). With ``delta`` the
    (ε, δ) guarantee ``min(count·ε, ε_accountant)``, where the accountant composes the draws as generic
    ε-DP mechanisms (RDP: (ε²/2)-zCDP; PLD: the ε-DP dominating pair); better than ``count·ε`` once the
    draws are many and small.
    """
    event = ExponentialEvent(epsilon=epsilon, count=count)
    if delta is None:
        return event.epsilon * event.count
    return _compose_epsilon(
        [event],
        _delta("delta", delta),
        _accountant(accountant),
        check_positive("pld_discretization", pld_discretization),
    )


# ---- the site's accountant --------------------------------------------------------------------------------


class PrivacyAccountant:
    """The DP events of one site within one budget scope, and the ε they add up to.

    The total is recomputed by ``dp_accounting`` from all events (module docstring), so a ledger replay
    (:meth:`from_events`) gives exactly the total that incremental spending gave.

    Args:
        site: the site's name (for messages).
        scope: the budget scope (``Budget.scope``; e.g. ``network``).
        delta: δ at which ε is reported, fixed for the scope (the cap's δ), 0 < δ < 1.
        cap_epsilon: the site's cap; when given, :meth:`spend` refuses a release that would exceed it.
        accountant: ``"rdp"`` (default) or ``"pld"``; fixed for a scope.
        events: past events (objects or JSON descriptors), e.g. from the ledger.
        pld_discretization: PLD value-discretisation interval.
    """

    def __init__(
        self,
        *,
        site: str = "",
        scope: str = "network",
        delta: float,
        cap_epsilon: float | None = None,
        accountant: AccountantKind = "rdp",
        events: Iterable[Event | Mapping[str, Any]] = (),
        pld_discretization: float = PLD_DISCRETIZATION,
    ):
        self.site = site
        self.scope = scope
        self.delta = _delta("delta", delta)
        self.cap_epsilon = None if cap_epsilon is None else check_positive("cap_epsilon", cap_epsilon)
        self.accountant = _accountant(accountant)
        self.pld_discretization = check_positive("pld_discretization", pld_discretization)
        self._events: list[Event] = [event_from_json(e) for e in events]
        self._total = self._epsilon(self._events, self.delta)

    @classmethod
    def from_events(
        cls, events: Iterable[Event | Mapping[str, Any]], delta: float, **kwargs: Any
    ) -> PrivacyAccountant:
        """Rebuild an accountant from past event descriptors (e.g. the ``privacy`` entries of a ledger).

        ``events`` are JSON-plain dicts such as ``{"mechanism": "gaussian", "noise_multiplier": 1.1,
        "steps": 1, "sampling_rate": 1.0}`` or ``{"mechanism": "exponential", "epsilon": 0.5}``; a malformed
        one raises :class:`DPError` (fail closed). ``kwargs`` as in the constructor.
        """
        return cls(delta=delta, events=list(events), **kwargs)

    @classmethod
    def for_budget(cls, site: str, budget: Any, **kwargs: Any) -> PrivacyAccountant:
        """An accountant enforcing a site's :class:`~medsilo.config.site.Budget` (ε cap, δ, scope)."""
        return cls(site=site, scope=budget.scope, delta=budget.delta, cap_epsilon=budget.epsilon, **kwargs)

    # -- reading

    @property
    def events(self) -> tuple[Event, ...]:
        """The recorded events, oldest first."""
        return tuple(self._events)

    @property
    def epsilon(self) -> float:
        """ε spent so far in this scope, at :attr:`delta`."""
        return self._total

    def events_json(self) -> list[dict[str, Any]]:
        """The recorded events as JSON-plain descriptors, oldest first."""
        return [e.to_json() for e in self._events]

    def _epsilon(self, events: list[Event], delta: float) -> float:
        return _compose_epsilon(events, delta, self.accountant, self.pld_discretization)

    # -- planning

    def cost(self, *planned: Event | Mapping[str, Any]) -> tuple[float, float]:
        """``(ε_this, ε_total)``: what ``planned`` would add and the total with it, at :attr:`delta`.

        ``ε_this`` is the increase of the composed total (it can be less than the events' ε alone,
        since composition is sub-additive). Records nothing.
        """
        planned_events = [event_from_json(e) for e in planned]
        total = self._epsilon(self._events + planned_events, self.delta)
        return max(total - self._total, 0.0), total

    def would_exceed(
        self, cap_epsilon: float, cap_delta: float, planned: Iterable[Event | Mapping[str, Any]]
    ) -> bool:
        """True when the recorded events plus ``planned`` exceed ε = ``cap_epsilon`` at δ = ``cap_delta``."""
        cap_epsilon = check_positive("cap_epsilon", cap_epsilon)
        cap_delta = _delta("cap_delta", cap_delta)
        planned_events = [event_from_json(e) for e in planned]
        return self._epsilon(self._events + planned_events, cap_delta) > cap_epsilon

    def check(self, *planned: Event | Mapping[str, Any]) -> tuple[float, float]:
        """Raise :class:`BudgetExceeded` if ``planned`` would exceed the cap; else return :meth:`cost`.

        Records nothing; without a cap it only returns the cost.
        """
        eps_this, total = self.cost(*planned)
        if self.cap_epsilon is not None and total > self.cap_epsilon:
            raise BudgetExceeded(
                site=self.site,
                scope=self.scope,
                cap_epsilon=self.cap_epsilon,
                cap_delta=self.delta,
                spent=self._total,
                cost=eps_this,
                total=total,
                release="; ".join(event_from_json(e).describe() for e in planned),
            )
        return eps_this, total

    # -- spending

    def spend(self, event_kind: str | Event | Mapping[str, Any], **params: Any) -> tuple[float, float]:
        """Record one release and return ``(ε_this, ε_total)`` at :attr:`delta`.

        Call it *before* the upload leaves the site: over the cap it raises :class:`BudgetExceeded` and
        records nothing. Examples: ``spend("gaussian", noise_multiplier=1.1)``,
        ``spend("exponential", epsilon=0.5)``, ``spend(selection.event)``.

        Args:
            event_kind: ``"gaussian"`` / ``"exponential"`` with the event's fields as ``params``, or an
                event object or descriptor dict.
            params: the event's fields (:class:`GaussianEvent`, :class:`ExponentialEvent`).
        """
        event = _make_event(event_kind, params)
        eps_this, total = self.check(event)
        self._events.append(event)
        self._total = total
        return eps_this, total

    def __repr__(self) -> str:
        cap = "none" if self.cap_epsilon is None else _fmt(self.cap_epsilon)
        return (
            f"PrivacyAccountant(site={self.site!r}, scope={self.scope!r}, accountant={self.accountant!r}, "
            f"δ={self.delta:g}, ε={_fmt(self._total)}, cap={cap}, events={len(self._events)})"
        )
