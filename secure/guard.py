"""The site's privacy guard: its ledger, its DP budget, and the record of everything that leaves.

One :class:`SiteGuard` per site process and job. The executor and the CKKS filters go through it:

* :meth:`SiteGuard.admit_job` — before round 1, for ``dp`` modes: would the whole job (one Gaussian
  mechanism per round) fit in the site's remaining budget? If not, a ``refusal`` entry is written and
  :class:`~medsilo.secure.dp.BudgetExceeded` is raised: nothing of this site reaches the server and the
  job goes on without it if enough sites remain.
* :meth:`SiteGuard.dp_round` — before each DP upload: re-derive the budget from the ledger (another job
  may have spent meanwhile), refuse if this round would exceed the cap, else hand out the noise settings.
* :meth:`SiteGuard.record_upload` — after the upload is computed and before it is sent: a ``release``
  entry with what leaves (tensor names, shapes, bytes, SHA-256 of the exact plaintext bytes, encrypted
  or not, scheme) and, under DP, its privacy cost (the mechanism's event, ε of this release, cumulative ε
  in the budget scope, the cap).
  Under ``ckks`` the entry is completed and written by the encrypt filter (:func:`commit_encrypted_upload`),
  so its digest is that of the ciphertext bytes that actually leave.
* :meth:`SiteGuard.record_policy` — when a job starts: a ``policy_loaded`` entry (the site's privacy
  policy in force and its digest).
* ``decrypt`` and ``aggregate_release`` entries come from the CKKS decrypt filter and the release task.

**The budget lives in the ledger.** The running total is recomputed by the accountant
(:class:`~medsilo.secure.dp.PrivacyAccountant`, RDP via ``dp_accounting``) from the mechanism events of
the verified ledger's spending entries in the budget's scope, so it survives restarts and spans jobs; a
ledger that fails verification stops the site (fail closed).

Where the ledger and its signing key live:

* **simulation** (``MEDSILO_LEDGER_DIR``, set by ``medsilo sim`` to ``ledgers/`` beside ``sites.yml``,
  so it persists across runs the way a site's workspace does): ``<dir>/<site>/privacy_ledger.jsonl``,
  signed with ``<dir>/pki/<site>.key`` whose certificate ``<site>.crt`` is issued by the local root CA
  ``<dir>/pki/rootCA.pem`` (made once by :func:`ensure_simulation_pki`);
* **deployment**: ``<workspace>/privacy_ledger.jsonl``, signed with the startup kit's ``client.key``
  and ``client.crt`` (issued by the kit's ``rootCA.pem``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from medsilo.errors import MedsiloError
from medsilo.secure.dp import (
    BudgetExceeded,
    GaussianEvent,
    PrivacyAccountant,
    event_from_json,
    fresh_generator,
)
from medsilo.secure.ledger import LEDGER_FILE, Ledger, costs

SERVER = "server"
"""The server's party name in ledgers and in the simulation PKI."""
LEDGER_DIR_ENV = "MEDSILO_LEDGER_DIR"
"""Simulation only: folder of per-site ledgers and the local PKI (module docstring)."""
_OPEN: dict[Path, Ledger] = {}
_PENDING: dict[tuple[str, str, int], tuple[Ledger, dict[str, Any], dict[str, Any] | None]] = {}
"""Release entries of encrypted uploads, held from the executor until the encrypt filter sends them."""


def ensure_simulation_pki(folder: str | Path, sites: Iterable[str]) -> Path:
    """Create ``folder/pki`` (a local root CA, one certificate per site and one for the server) unless they
    exist; returns it."""
    from medsilo.secure import pki
    from medsilo.secure.release import load_private_key

    out = Path(folder) / "pki"
    out.mkdir(parents=True, exist_ok=True)
    if (out / "rootCA.pem").is_file():
        ca_key, ca_cert = load_private_key(out / "rootCA.key"), pki.load_certificate(out / "rootCA.pem")
    else:
        ca_key, ca_cert = pki.make_local_ca(out)
    for site in [*sites, SERVER]:
        if not (out / f"{site}.crt").is_file():
            pki.issue_certificate(ca_key, ca_cert, site, out)
    return out


def site_ledger(site: str, workspace: str | Path, role: str = "client") -> Ledger:
    """This process's ledger of ``site`` (one object per file, so appends stay in sequence).

    ``role`` is the startup kit's key name in deployment: ``client`` for a site, ``server`` for the
    server (:func:`server_ledger`).
    """
    base = os.environ.get(LEDGER_DIR_ENV)
    if base:
        path = Path(base) / site / LEDGER_FILE
        key, cert = Path(base) / "pki" / f"{site}.key", Path(base) / "pki" / f"{site}.crt"
    else:
        path = Path(workspace) / LEDGER_FILE
        key, cert = Path(workspace) / "startup" / f"{role}.key", Path(workspace) / "startup" / f"{role}.crt"
    path = path.resolve()
    if path not in _OPEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        _OPEN[path] = Ledger(path, site, key, cert)
    return _OPEN[path]


def commit_encrypted_upload(site: str, job_id: str, rnd: int, sent: bytes, ciphertexts: int) -> None:
    """Write the held ``release`` entry of an encrypted upload (:meth:`SiteGuard.record_upload`): ``sha256``
    and ``bytes`` become those of the signed ciphertext blob that leaves, the plaintext's move to
    ``plaintext_sha256`` / ``plaintext_bytes``. Fails closed when no entry is held for this round."""
    try:
        ledger, what, privacy = _PENDING.pop((site, job_id, rnd))
    except KeyError:
        raise MedsiloError(f"no privacy-ledger entry was prepared for job {job_id} round {rnd}; refusing to "
                           f"send an upload the ledger would not show (is medsilo's SiteExecutor running "
                           f"this task?)") from None  # fmt: skip
    what = {**what, "plaintext_sha256": what["sha256"], "plaintext_bytes": what["bytes"],
            "sha256": hashlib.sha256(sent).hexdigest(), "bytes": len(sent), "ciphertexts": ciphertexts}  # fmt: skip
    ledger.append("release", job=job_id, round=rnd, what=what, privacy=privacy)


def server_ledger(workspace: str | Path) -> Ledger:
    """The server's ledger: in simulation ``<dir>/server/``, signed with the local CA's ``server``
    certificate; deployed, ``<server workspace>/privacy_ledger.jsonl`` with the kit's ``server.key``."""
    return site_ledger(SERVER, workspace, role="server")


def describe_upload(arrays: dict[str, Any], encrypted: bool, scheme: dict | None = None,
                    kind: str = "upload") -> dict[str, Any]:  # fmt: skip
    """The ledger's ``what`` for an upload: names, shapes, dtypes, bytes and the SHA-256 of the exact
    bytes (arrays in name order, C order) — never values."""
    digest = hashlib.sha256()
    tensors, total = [], 0
    for name in sorted(arrays):
        arr = np.ascontiguousarray(np.asarray(arrays[name]))
        digest.update(name.encode() + b"\0" + arr.tobytes())
        tensors.append({"name": name, "shape": list(arr.shape), "dtype": str(arr.dtype)})
        total += arr.nbytes
    return {"kind": kind, "tensors": tensors, "bytes": total, "sha256": digest.hexdigest(),
            "encrypted": encrypted, "scheme": scheme}  # fmt: skip


def budget_accountant(site: str, ledger_path: str | Path, budget, delta: float = 1e-5) -> PrivacyAccountant:
    """The site's accountant replayed from the DP events its ledger charged to the budget's scope.

    Args:
        site: the site's name.
        ledger_path: its ledger file.
        budget: its :class:`~medsilo.config.site.Budget`, or ``None`` (no cap; scope ``network``).
        delta: δ at which ε is reported when there is no budget.
    """
    scope = budget.scope if budget else "network"
    past = [event_from_json(c["event"]) for c in costs(ledger_path, scope) if c.get("event")]
    return PrivacyAccountant.from_events(past, budget.delta if budget else delta, site=site, scope=scope,
                                         cap_epsilon=budget.epsilon if budget else None)  # fmt: skip


class _Budget:
    """A site's ledger and DP budget cap: the running total comes from the verified ledger every time."""

    def __init__(self, site: str, workspace: str | Path, job_id: str, policy, default_delta: float = 1e-5):
        self.site, self.job_id = site, job_id
        self.ledger = site_ledger(site, workspace)
        self.budget = policy.budget
        self.scope = self.budget.scope if self.budget else "network"
        self.delta = self.budget.delta if self.budget else default_delta

    @property
    def cap(self) -> float | None:
        return self.budget.epsilon if self.budget else None

    def _accountant(self) -> PrivacyAccountant:
        return budget_accountant(self.site, self.ledger.path, self.budget, self.delta)

    def _refuse(self, rnd: int, exc: BudgetExceeded, what: dict[str, Any]) -> None:
        self.ledger.append("refusal", job=self.job_id, round=rnd, what={**what, "sent": False},
                           privacy={"scope": self.scope, "epsilon_cap": self.cap}, reason=str(exc))  # fmt: skip


class SiteGuard(_Budget):
    """Budget checks and ledger entries of one site for one job (module docstring).

    Args:
        site: the site's name.
        workspace: its workspace root (deployment ledger location).
        job_id: NVFlare job id (ledger ``job``).
        spec: the validated job spec.
        policy: the site's :class:`~medsilo.config.site.PrivacyPolicy` (its budget cap, if any).
    """

    def __init__(self, site: str, workspace: str | Path, job_id: str, spec, policy):
        dp = spec.privacy.dp
        super().__init__(site, workspace, job_id, policy, default_delta=dp.delta if dp else 1e-5)
        self.spec = spec
        self.job_events: list = []

    @property
    def dp(self) -> bool:
        return "dp" in self.spec.privacy.mode

    def _event(self) -> GaussianEvent:
        return GaussianEvent(noise_multiplier=self.spec.privacy.dp.noise_multiplier)

    def admit_job(self) -> None:
        """Refuse the job now (ledger ``refusal``, :class:`BudgetExceeded`) if all its rounds cannot fit."""
        if not self.dp:
            return
        planned = [self._event()] * self.spec.training.rounds
        try:
            self._accountant().check(*planned)
        except BudgetExceeded as exc:
            self._refuse(1, exc, {"kind": "upload"})
            raise

    def dp_round(self, rnd: int):
        """The noise settings for round ``rnd``'s upload, after checking this release fits the budget."""
        from medsilo.components.algorithms.base import DPRelease

        try:
            self._accountant().check(self._event())
        except BudgetExceeded as exc:
            self._refuse(rnd, exc, {"kind": "upload"})
            raise
        dp = self.spec.privacy.dp
        return DPRelease(clip=dp.clip, noise_multiplier=dp.noise_multiplier, generator=fresh_generator())

    def record_upload(self, rnd: int, arrays: dict[str, Any]) -> dict[str, float] | None:
        """Account for an upload about to leave and write its ``release`` entry; returns this job's (ε, δ)
        so far under DP (``None`` otherwise).

        Plaintext jobs: the entry is written now, with the SHA-256 of the exact arrays sent. Encrypted jobs:
        what leaves is the ciphertext the CKKS encrypt filter makes next, so the entry is held and
        :func:`commit_encrypted_upload` writes it there, with the digest of the signed ciphertext bytes
        (and of the plaintext it encrypts). If encryption fails nothing leaves and no entry is written.
        """
        encrypted = "ckks" in self.spec.privacy.mode
        scheme = {"name": "ckks", "poly_modulus_degree": self.spec.privacy.poly_modulus_degree} if encrypted else None
        privacy = None
        if self.dp:
            accountant = self._accountant()
            event = self._event()
            eps_this, eps_total = accountant.spend(event)
            self.job_events.append(event)
            job = PrivacyAccountant.from_events(self.job_events, self.delta, site=self.site, scope=self.scope)
            privacy = {"scope": self.scope, "mechanism": "gaussian", "event": event.to_json(),
                       "clip": self.spec.privacy.dp.clip, "epsilon": eps_this, "delta": self.delta,
                       "cumulative_epsilon": eps_total, "job_epsilon": job.epsilon,
                       "epsilon_cap": self.cap}  # fmt: skip
        what = describe_upload(arrays, encrypted, scheme)
        if encrypted:
            _PENDING[(self.site, self.job_id, rnd)] = (self.ledger, what, privacy)
        else:
            self.ledger.append("release", job=self.job_id, round=rnd, what=what, privacy=privacy)
        return {"epsilon": privacy["job_epsilon"], "delta": self.delta} if privacy else None

    def record_policy(self, policy) -> None:
        """A ``policy_loaded`` entry when the site starts a job: the privacy policy in force (its budget
        cap and required mode) and its SHA-256, so an auditor sees which rules each job ran under."""
        text = json.dumps(policy.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        self.ledger.append("policy_loaded", job=self.job_id, round=0, privacy=None,
                           what={"kind": "policy", "policy": json.loads(text),
                                 "sha256": hashlib.sha256(text.encode()).hexdigest(),
                                 "privacy_mode": self.spec.privacy.mode})  # fmt: skip

    def record(self, event: str, rnd: int, what: dict[str, Any], reason: str | None = None) -> None:
        """Any other entry (``decrypt``, ``aggregate_release``), with no privacy cost."""
        self.ledger.append(event, job=self.job_id, round=rnd, what=what, privacy=None, reason=reason)


def charged_evolve(site: str, workspace: str | Path, run_id: str, policy, generator_name: str, modality: str,
                   classes, image_size: int, images, labels, config, progress=None):  # fmt: skip
    """Run PCEvolve at ``site`` with every selection charged to its budget and ledger.

    The generator is resolved by name (:func:`~medsilo.medical.synth.pcevolve.generators.make_generator`;
    callers check the site allows it), the whole run is admitted first (refused, with a ``refusal``
    entry and :class:`BudgetExceeded`, when its T·C picks cannot fit), then each iteration is charged
    before its draws. Returns the :class:`~medsilo.medical.synth.pcevolve.evolve.PCEvolveResult`.
    """
    from medsilo.medical.synth.pcevolve.evolve import evolve
    from medsilo.medical.synth.pcevolve.generators import make_generator
    from medsilo.secure.dp import ExponentialEvent

    generator = make_generator(generator_name, modality, classes, image_size)
    what = {"kind": "selection", "generator": generator_name, "encoder": config.encoder,
            "iterations": config.iterations, "per_class": config.per_class, "classes": len(classes)}  # fmt: skip
    guard = SyntheticGuard(site, workspace, run_id, policy, what)
    eps = config.epsilon_per_pick(len(classes))
    guard.admit([ExponentialEvent(epsilon=eps, count=len(classes))] * config.iterations)
    return evolve(images, labels, classes, generator, config, charge=guard, progress=progress)


class SyntheticGuard(_Budget):
    """Budget checks and ledger entries of a PCEvolve run at one site (``synthetic_release`` entries).

    Each iteration's selections are charged *before* they are drawn (:meth:`__call__`, the ``charge``
    of :func:`medsilo.medical.synth.pcevolve.evolve.evolve`); :meth:`admit` refuses a run whose
    planned selections cannot all fit. Costs go to the same budget scope as the site's federated jobs.

    Args:
        site: the site's name.
        workspace: its workspace (deployment ledger location; simulation uses ``MEDSILO_LEDGER_DIR``).
        run_id: names the run in the ledger's ``job`` field.
        policy: the site's :class:`~medsilo.config.site.PrivacyPolicy` (its budget cap, if any).
        what: JSON-plain description of the run for every entry (generator, encoder, N, T — no data).
    """

    def __init__(self, site: str, workspace: str | Path, run_id: str, policy, what: dict[str, Any]):
        super().__init__(site, workspace, run_id, policy)
        self.what = what

    def admit(self, planned: list) -> None:
        """Refuse the run now (``refusal`` entry, :class:`BudgetExceeded`) if ``planned`` events cannot fit."""
        try:
            self._accountant().check(*planned)
        except BudgetExceeded as exc:
            self._refuse(0, exc, self.what)
            raise

    def __call__(self, event, iteration: int) -> None:
        """Charge one iteration's selections and write its ``synthetic_release`` entry, or refuse."""
        accountant = self._accountant()
        try:
            eps_this, eps_total = accountant.spend(event)
        except BudgetExceeded as exc:
            self._refuse(iteration, exc, self.what)
            raise
        privacy = {"scope": self.scope, "mechanism": event.mechanism, "event": event.to_json(), "epsilon": eps_this,
                   "delta": self.delta, "cumulative_epsilon": eps_total,
                   "pure_epsilon": event.epsilon * event.count,
                   "epsilon_cap": self.cap}  # fmt: skip
        self.ledger.append("synthetic_release", job=self.job_id, round=iteration, privacy=privacy,
                           what={**self.what, "kind": "selection", "selections": event.count})  # fmt: skip
