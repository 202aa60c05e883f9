"""A site's differential-privacy budget, derived from its own ledger, and charges made atomically.

The running total of a budget scope is never stored anywhere but in the ledger: it is recomposed by the
site's accountant (:class:`~medsilo.secure.dp.PrivacyAccountant`, RDP via ``dp_accounting``) from the mechanism
events of the verified ledger's spending entries in that scope, so it survives restarts and spans jobs and
PCEvolve runs. A ledger that fails verification — or holds another party's entries — stops the site.

**One lock for read → check → append.** :meth:`BudgetBook.charge` is called with the entries read *inside* the
caller's :meth:`~medsilo.secure.ledger.Ledger.locked` block, and the caller appends its spending entry in the same
block. Two jobs (two processes) at one site therefore cannot both read the same total and both spend it: the
second waits for the lock and reads the first one's entry. :meth:`BudgetBook.check` is the early, advisory
check before training (it writes a ``refusal`` when the plan cannot fit); the charge is the binding one.

A spending entry's ``privacy`` holds ``scope``, ``events`` (the mechanism descriptors, all composed), ``epsilon``
(what this entry added), ``cumulative_epsilon`` (the scope's total after it), ``delta`` and ``epsilon_cap``.
Entries written before ``events`` existed carry one ``event``; both are read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from medsilo.secure.accounting import BudgetExceeded, Event, PrivacyAccountant, event_from_json
from medsilo.secure.ledger import SPENDING_EVENTS, Ledger, costs

MAX_REASON = 600
"""Longest refusal reason a ledger entry keeps."""


def spent_events(entries: Iterable[dict], scope: str) -> list[Event]:
    """The mechanism events of every spending entry of ``scope``, oldest first (old and new entry forms)."""
    found: list[Event] = []
    for e in entries:
        privacy = e.get("privacy")
        if e.get("event") not in SPENDING_EVENTS or not privacy or privacy.get("scope") != scope:
            continue
        described = privacy.get("events") or ([privacy["event"]] if privacy.get("event") else [])
        found.extend(event_from_json(d) for d in described)
    return found


def budget_accountant(site: str, ledger_path: str | Path, budget, delta: float = 1e-5,
                      root_ca: str | Path | None = None) -> PrivacyAccountant:  # fmt: skip
    """The site's accountant replayed from the DP events its (verified) ledger charged to the budget's scope.

    Args:
        site: the site's name.
        ledger_path: its ledger file.
        budget: its :class:`~medsilo.config.site.Budget`, or ``None`` (no cap; scope ``network``).
        delta: δ at which ε is reported when there is no budget.
        root_ca: check every signer certificate against it.
    """
    scope = budget.scope if budget else "network"
    privacy = costs(ledger_path, scope, root_ca)
    events = spent_events(({"event": "release", "privacy": p} for p in privacy), scope)
    return PrivacyAccountant.from_events(events, budget.delta if budget else delta, site=site, scope=scope,
                                         cap_epsilon=budget.epsilon if budget else None)  # fmt: skip


class BudgetBook:
    """One site's budget scope: accountants from ledger entries, early checks, and charges.

    Args:
        site: the site's name.
        ledger: its ledger.
        budget: its :class:`~medsilo.config.site.Budget`, or ``None`` (no cap: spending is still recorded, in
            scope ``network``).
        default_delta: δ to report at when there is no budget (the job's δ).
        root_ca: the root CA the ledger's signer certificates must chain to.
    """

    def __init__(self, site: str, ledger: Ledger, budget, default_delta: float = 1e-5, root_ca=None):
        self.site, self.ledger, self.budget, self.root_ca = site, ledger, budget, root_ca
        self.scope = budget.scope if budget else "network"
        self.delta = budget.delta if budget else default_delta
        self.cap = budget.epsilon if budget else None

    def accountant(self, entries: Iterable[dict]) -> PrivacyAccountant:
        """The scope's accountant replayed from ``entries`` (a verified read of the ledger)."""
        return PrivacyAccountant.from_events(spent_events(entries, self.scope), self.delta, site=self.site,
                                             scope=self.scope, cap_epsilon=self.cap)  # fmt: skip

    def refuse(self, job: str, rnd: int, exc: Exception, what: dict[str, Any]) -> None:
        """Write a ``refusal`` entry: nothing was sent (``what.sent = false``), with the reason (at most
        :data:`MAX_REASON` characters, so no request can bloat the ledger)."""
        reason = str(exc)
        reason = reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 1] + "…"
        self.ledger.append("refusal", job=job, round=rnd, what={**what, "sent": False},
                           privacy={"scope": self.scope, "epsilon_cap": self.cap}, reason=reason)  # fmt: skip

    def check(self, planned: Sequence[Event], *, job: str, rnd: int, what: dict[str, Any]) -> None:
        """Refuse now (``refusal`` entry, :class:`BudgetExceeded`) when ``planned`` cannot fit the cap.

        Advisory: the binding check is :meth:`charge`, under the lock, when the release is about to leave.
        """
        with self.ledger.locked():
            try:
                self.accountant(self.ledger.read(self.root_ca)).check(*planned)
            except BudgetExceeded as exc:
                self.refuse(job, rnd, exc, what)
                raise

    def charge(self, entries: Sequence[dict], events: Sequence[Event], *, job: str, rnd: int,
               what: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
        """The ``privacy`` of a spending entry for ``events``, or a ``refusal`` and :class:`BudgetExceeded`.

        Must be called inside ``ledger.locked()`` with ``entries`` read there; the caller appends the spending
        entry in the same block.
        """
        accountant = self.accountant(entries)
        try:
            eps_this, eps_total = accountant.check(*events)
        except BudgetExceeded as exc:
            self.refuse(job, rnd, exc, what)
            raise
        return {"scope": self.scope, "events": [e.to_json() for e in events], "epsilon": eps_this,
                "delta": self.delta, "cumulative_epsilon": eps_total, "epsilon_cap": self.cap}  # fmt: skip

    def job_epsilon(self, entries: Iterable[dict], job: str | Sequence[str], extra: Sequence[Event] = ()) -> float:
        """ε of one job's own spending in this scope (its entries plus ``extra``), at the scope's δ; a list of
        jobs composes them (a resumed job and the interrupted one whose rounds it continues)."""
        jobs = {job} if isinstance(job, str) else set(job)
        events = spent_events((e for e in entries if e.get("job") in jobs), self.scope) + list(extra)
        return PrivacyAccountant.from_events(events, self.delta, site=self.site, scope=self.scope).epsilon


class SelectionCharge:
    """Charges a PCEvolve run's selections to a site's budget (``synthetic_release`` entries).

    Each iteration's draws are charged *before* they are drawn (:meth:`__call__` is the ``charge`` of
    :func:`medsilo.medical.synth.pcevolve.evolve.evolve`), in one locked read → check → append;
    :meth:`admit` refuses a run whose planned selections cannot all fit. Costs go to the same budget scope as
    the site's federated jobs.

    Args:
        book: the site's :class:`BudgetBook`.
        run_id: names the run in the ledger's ``job`` field.
        what: JSON-plain description of the run for every entry (generator, encoder, N, T — no data).
    """

    def __init__(self, book: BudgetBook, run_id: str, what: dict[str, Any]):
        self.book, self.run_id, self.what = book, run_id, what

    def admit(self, planned: Sequence[Event]) -> None:
        """Refuse the run now (``refusal`` entry, :class:`BudgetExceeded`) if ``planned`` cannot fit."""
        self.book.check(list(planned), job=self.run_id, rnd=0, what=self.what)

    def __call__(self, event: Event, iteration: int) -> None:
        """Charge one iteration's selections and write its ``synthetic_release`` entry, or refuse."""
        ledger = self.book.ledger
        with ledger.locked():
            entries = ledger.read(self.book.root_ca)
            privacy = self.book.charge(entries, [event], job=self.run_id, rnd=iteration, what=self.what)
            privacy["pure_epsilon"] = event.epsilon * event.count
            ledger.append("synthetic_release", job=self.run_id, round=iteration, privacy=privacy,
                          what={**self.what, "kind": self.what.get("kind", "selection"), "selections": event.count})  # fmt: skip
