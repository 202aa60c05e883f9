"""The two halves every privacy mode shares: what a site does to an upload before it leaves, and what the
server does with what arrives. A mode (one module beside this one) changes only how a body is sealed, opened
and combined, whether releases are noised and charged, and whether an aggregate can be released.

**Site half** (:class:`SitePipeline`), one object per site and job, driven by the site executor:

* :meth:`~SitePipeline.start` — once, at the job's first task: checks the site's ledger against the server's
  record of it (the *anchor*: the statement this site last signed that the server recorded) — a ledger that is
  shorter than, or differs from, what the server saw is refused — and writes ``policy_loaded`` (with the site's
  key custody, :func:`custody_record`);
* :meth:`~SitePipeline.admit` / :meth:`~SitePipeline.noise` — early budget checks (DP modes);
* :meth:`~SitePipeline.protect` — the only way an upload leaves: under the ledger lock it reads the verified
  ledger, refuses a second upload of the same (job, round), charges the DP events (DP modes), seals the body
  (pack or encrypt), signs a statement (job, round, participant set, own ``min_contributors``, body digest, the
  ledger head) and appends the ``release`` entry with the SHA-256 of the exact bytes that leave — all before
  returning them;
* :meth:`~SitePipeline.peers` / :meth:`~ServerPipeline.peers` — the sites whose signatures count: the party's
  peer certificates less those the root CA's revocation list revokes (:func:`trusted_peers`);
* :meth:`~SitePipeline.open` — what the server sent (decrypting an encrypted aggregate, with a ``decrypt``
  entry); :meth:`~SitePipeline.release` — an aggregate release where the mode has one.

**Server half** (:class:`ServerPipeline`), one per job, driven by the round controller: :meth:`announce` (the
round's participant set and the anchors), :meth:`accept` (every reply must be a wire signed by its sender for
this job, round, mode and participant set; each is recorded in the server's ledger as ``received`` — the anchor
— before it is used) and :meth:`combine` (the next payload).

Neither half imports NVFlare or the algorithms: the algorithm's server half is passed in and used through
``update``, ``update_from_sites``, ``form`` and ``needs_plaintext_aggregate``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from medsilo.errors import MedsiloError
from medsilo.secure import pki, revocation
from medsilo.secure.budget import BudgetBook
from medsilo.secure.custody import CUSTODY_FILE, Custody, read_custody
from medsilo.secure.dp import DPRelease, Event, fresh_generator
from medsilo.secure.keys import LEDGER_DIR_ENV, Party
from medsilo.secure.ledger import Ledger, entry_hash
from medsilo.secure.revocation import Peers, find_crl, load_crl, peer_certificates
from medsilo.secure.upload import (
    WIRE_PARAM,
    Statement,
    Wire,
    WireError,
    open_wire,
    pack_arrays,
    seal,
    unpack_arrays,
)

Arrays = dict[str, np.ndarray]
AskRelease = Callable[[str, Arrays], Arrays]
"""``ask_release(site, request) -> reply``: the controller's way to send one site a ``release`` task."""


class PipelineRefusal(MedsiloError):
    """A site or the server refuses to send, accept or release something; the message says why."""


class RoundSkipped(PipelineRefusal):
    """The round gives no new payload (e.g. its aggregate cannot be released); the server keeps the current one."""


@dataclass(frozen=True)
class JobTerms:
    """What a pipeline needs to know about the job it protects.

    Attributes:
        job: the job's id (NVFlare's; ``medsilo sim``: the run id) — what signatures and ledgers bind to.
        mode: the privacy mode.
        rounds: training rounds.
        min_contributors: the job's ``privacy.min_contributors``.
        dp: the job's :class:`~medsilo.config.job.DPSpec` (DP modes), else ``None``.
        poly_modulus_degree: CKKS ring size.
        releases: the algorithm's server learns from a plaintext aggregate (``needs_plaintext_aggregate``):
            only then does a site honour a ``release`` task.
        spec_digest: the SHA-256 of the spec as it arrived (a resume must match it).
        min_sites: the job's ``reliability.min_sites``: ``None`` (every participant must answer every round)
            or the fewest participants a round may complete with — and so the fewest contributors an
            aggregate a site decrypts may have.
    """

    job: str
    mode: str
    rounds: int
    min_contributors: int
    dp: Any = None
    poly_modulus_degree: int = 8192
    releases: bool = False
    spec_digest: str = ""
    min_sites: int | None = None

    @classmethod
    def of(cls, job_id: str, spec, *, releases: bool, digest: str = "") -> JobTerms:
        """The terms of a validated :class:`~medsilo.config.job.JobSpec` run as ``job_id`` (``digest``: the
        :func:`~medsilo.config.job.spec_digest` of the spec as it arrived, which a resume must match)."""
        p = spec.privacy
        return cls(job=job_id, mode=p.mode, rounds=spec.training.rounds, min_contributors=p.min_contributors,
                   dp=p.dp, poly_modulus_degree=p.poly_modulus_degree, releases=releases, spec_digest=digest,
                   min_sites=spec.reliability.min_sites)  # fmt: skip


def describe_arrays(arrays: Mapping[str, Any]) -> dict[str, Any]:
    """Names, shapes, dtypes, bytes and the SHA-256 of the exact bytes (name order, C order) — never values."""
    digest = hashlib.sha256()
    tensors, total = [], 0
    for name in sorted(arrays):
        arr = np.ascontiguousarray(np.asarray(arrays[name]))
        digest.update(name.encode() + b"\0" + arr.tobytes())
        tensors.append({"name": name, "shape": list(arr.shape), "dtype": str(arr.dtype)})
        total += arr.nbytes
    return {"tensors": tensors, "bytes": total, "sha256": digest.hexdigest()}


def signed_record(wire: Wire) -> dict[str, Any]:
    """A wire's statement and signature as JSON (what the server's ledger records and echoes as an anchor)."""
    return {"statement": wire.statement.to_json(), "signature": wire.signature.hex()}


def record_signed_by(record: object, public_key: pki.PublicKey) -> Statement:
    """The statement of a ``{"statement", "signature"}`` record, after checking the signature.

    Raises:
        PipelineRefusal: a malformed record or a signature that does not verify with ``public_key``.
    """
    try:
        statement = Statement.from_json(record["statement"])  # type: ignore[index]
        signature = bytes.fromhex(record["signature"])  # type: ignore[index]
    except (WireError, KeyError, TypeError, ValueError) as e:
        raise PipelineRefusal(f"a signed record is malformed ({e})") from e
    if not pki.verify_signature(public_key, signature, statement.message()):
        raise PipelineRefusal(f"a record presented as signed by {statement.site} does not verify with its key")
    return statement


class SitePipeline:
    """Site half of a privacy mode (module docstring). Subclasses set the class attributes and :meth:`seal`.

    Args:
        party: the site's key material and ledger location.
        terms: the job's :class:`JobTerms`.
        policy: the site's :class:`~medsilo.config.site.PrivacyPolicy` (budget, ``min_contributors``).
    """

    mode: ClassVar[str] = ""
    noised: ClassVar[bool] = False
    """Uploads carry DP noise: every upload's mechanism events are charged to the site's budget."""
    encrypted: ClassVar[bool] = False
    """Bodies are CKKS ciphertexts; the site decrypts what the server sums."""

    def __init__(self, party: Party, terms: JobTerms, policy):
        self.party, self.site, self.terms, self.policy = party, party.name, terms, policy
        self.ledger: Ledger = party.ledger()
        delta = terms.dp.delta if terms.dp is not None else 1e-5
        self.book = BudgetBook(self.site, self.ledger, policy.budget, default_delta=delta, root_ca=party.root_ca)
        self.min_contributors = max(terms.min_contributors, policy.min_contributors)
        self.resumed: dict[str, Any] | None = None
        """The interrupted job this one resumes: ``{"job", "round", "participants"}`` (set by :meth:`start`)."""
        self._key: pki.PrivateKey | None = None

    # ---- once per job ---------------------------------------------------------------------------

    def start(self, anchor: Mapping[str, Any] | None, resumed_from: Mapping[str, Any] | None = None) -> None:
        """Join: check this site's ledger against the server's record (``anchor``) and the job against what the
        ledger says (a job is joined once; a resume names an interrupted job of the same spec that was never
        resumed before, and the round it completed), then write ``policy_loaded`` (the rules in force, the spec
        digest, and for a resume the interrupted job, its round and participant set, which this job inherits).

        Raises:
            PipelineRefusal: the anchor is not this site's signature or the ledger does not hold what it says
                (cut short, or replaced); the job was joined before; a resume this site cannot vouch for.
                Ledgered as ``refusal``.
        """
        with self.ledger.locked():
            entries = self.ledger.read(self.party.root_ca)
            try:
                if anchor:
                    self._check_anchor(anchor, entries)
                for e in entries:
                    if e["event"] == "policy_loaded" and e["job"] == self.terms.job:
                        raise PipelineRefusal(f"site {self.site}: job {self.terms.job} was joined before "
                                              f"({self.ledger.path}:{e['seq'] + 1}); a site joins a job once")  # fmt: skip
                inherited = self._resume_check(entries, resumed_from) if resumed_from else None
            except PipelineRefusal as exc:
                self.book.refuse(self.terms.job, 0, exc, {"kind": "job"})
                raise
            text = json.dumps(self.policy.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
            self.ledger.append("policy_loaded", job=self.terms.job, round=0, privacy=None,
                               what={"kind": "policy", "policy": json.loads(text),
                                     "sha256": hashlib.sha256(text.encode()).hexdigest(),
                                     "privacy_mode": self.mode, "spec_sha256": self.terms.spec_digest,
                                     "resumed_from": inherited,
                                     **custody_record(self.party, self.encrypted)})  # fmt: skip
            self.resumed = inherited

    def _resume_check(self, entries: Sequence[dict], resumed_from: Mapping[str, Any]) -> dict[str, Any]:
        """What a resume inherits, after checking this site's ledger vouches for it (see :meth:`start`)."""
        old, k = resumed_from.get("job"), resumed_from.get("round")
        where = f"site {self.site}: cannot resume job {old} after round {k}"
        joins = [e for e in entries if e["event"] == "policy_loaded" and e["job"] == old]
        if not joins or joins[0]["what"].get("spec_sha256") != self.terms.spec_digest or not self.terms.spec_digest:
            raise PipelineRefusal(f"{where}: this site's ledger holds no join of that job with this job's spec")
        for e in entries:
            what = e["what"]
            if e["event"] == "release" and e["job"] == old and what.get("kind") == "metrics" and \
                    what.get("task") == "evaluate":  # fmt: skip
                raise PipelineRefusal(f"{where}: that job completed ({self.ledger.path}:{e['seq'] + 1}); only an "
                                      "interrupted job is resumed")  # fmt: skip
            if e["event"] == "policy_loaded" and (what.get("resumed_from") or {}).get("job") == old:
                raise PipelineRefusal(f"{where}: it was resumed before, as job {e['job']}")
        uploads = [e for e in entries if e["event"] == "release" and e["job"] == old and e["what"].get("kind") == "upload"]
        rounds = [e["round"] for e in uploads]
        if not isinstance(k, int) or k not in rounds or max(rounds) not in (k, k + 1):
            raise PipelineRefusal(f"{where}: this site's last upload of that job was round "
                                  f"{max(rounds) if rounds else 'none'}")  # fmt: skip
        return {"job": old, "round": k, "participants": uploads[0]["what"].get("participants")}

    def close_round(self, rnd: int, exc: Exception) -> None:
        """Ledger that round ``rnd`` failed after training began: nothing left, and the round cannot be asked
        again (a failure is itself a data-dependent answer)."""
        self.book.refuse(self.terms.job, rnd, exc, {"kind": "upload", "closed": True})

    def _check_anchor(self, anchor: Mapping[str, Any], entries: Sequence[dict]) -> None:
        own_key = self.party.public_key()
        statement = record_signed_by(anchor, own_key)
        if statement.site != self.site:
            raise PipelineRefusal(f"site {self.site}: the server's record names site {statement.site}")
        seq, where = statement.ledger_seq, self.ledger.path
        if len(entries) < seq + 2:
            raise PipelineRefusal(f"site {self.site}: {where} has {len(entries)} entries, but the server holds this "
                                  f"site's signed upload that followed entry {seq + 1} (job {statement.job}, round "
                                  f"{statement.round}): the ledger was cut short or replaced; restore it from "
                                  "backup before running jobs (the privacy budget depends on it)")  # fmt: skip
        at = entries[seq + 1]
        if (seq >= 0 and entry_hash(entries[seq]) != statement.ledger_hash) or at["what"].get("body_sha256") != \
                statement.digest:  # fmt: skip
            raise PipelineRefusal(f"site {self.site}: {where} differs from what the server recorded at entry "
                                  f"{seq + 2} (job {statement.job}, round {statement.round}): the ledger was "
                                  "rewritten or replaced; restore it before running jobs")  # fmt: skip

    def admit(self, events_per_round: Sequence[Event], once: Sequence[Event] = ()) -> None:
        """Refuse the whole job now (``refusal`` entry, :class:`~medsilo.secure.dp.BudgetExceeded`) when its
        rounds' DP events and those it charges ``once`` (a class-count draw) cannot all fit the site's budget;
        nothing to do in modes without noise."""
        if self.noised:
            planned = list(events_per_round) * self.terms.rounds + list(once)
            self.book.check(planned, job=self.terms.job, rnd=1, what={"kind": "upload"})

    # ---- each round -----------------------------------------------------------------------------

    def precheck(self, rnd: int, participants: Sequence[str]) -> None:
        """Refuse round ``rnd`` *before* training when its upload could not leave (ledgered ``refusal``):
        the same checks :meth:`protect` repeats under the lock (round bounds and order, the job's participant
        set, the site's ``min_contributors``, a second upload of the round).

        Raises:
            PipelineRefusal: the reason.
        """
        with self.ledger.locked():
            self._check_upload(self.ledger.read(self.party.root_ca), rnd, participants)

    def noise(self, rnd: int, events: Sequence[Event]) -> DPRelease | None:
        """The noise settings of round ``rnd``'s upload after an early budget check (``None``: no noise)."""
        if not self.noised:
            return None
        self.book.check(list(events), job=self.terms.job, rnd=rnd, what={"kind": "upload"})
        return DPRelease.from_spec(self.terms.dp, fresh_generator())

    def protect(self, rnd: int, participants: Sequence[str], arrays: Arrays,
                events: Sequence[Event] = ()) -> tuple[np.ndarray, dict[str, float] | None]:  # fmt: skip
        """Charge, seal, sign and ledger one upload; returns the wire (uint8) and this job's (ε, δ) so far.

        Args:
            rnd: the round.
            participants: the round's participant set as the server announced it.
            arrays: the upload sums ``{name: float32 array}`` (noised already in DP modes).
            events: the DP mechanism events that produced ``arrays`` (DP modes; charged here).

        Raises:
            PipelineRefusal: any reason of :meth:`precheck` (checked again here, under the lock);
                BudgetExceeded: the events do not fit. A refusal is ledgered and nothing leaves.
        """
        terms = self.terms
        with self.ledger.locked():
            entries = self.ledger.read(self.party.root_ca)
            self._check_upload(entries, rnd, participants)
            people = list(participants)
            privacy = None
            if self.noised:
                privacy = self.book.charge(entries, list(events), job=terms.job, rnd=rnd, what={"kind": "upload"})
            seq, head = self.ledger.head()
            body, sealed = self.seal(arrays)
            wire = seal({"kind": "upload", "site": self.site, "job": terms.job, "round": rnd, "mode": self.mode,
                         "participants": people, "min_contributors": self.min_contributors,
                         "body": "ckks" if self.encrypted else "arrays", "ledger_seq": seq, "ledger_hash": head},
                        body, self.signing_key())  # fmt: skip
            blob = wire.to_bytes()
            plain = describe_arrays(arrays)
            what = {"kind": "upload", "tensors": plain["tensors"], "bytes": len(blob),
                    "sha256": hashlib.sha256(blob).hexdigest(), "body_sha256": wire.statement.digest,
                    "plaintext_bytes": plain["bytes"], "plaintext_sha256": plain["sha256"],
                    "encrypted": self.encrypted, "scheme": sealed, "participants": people,
                    "min_contributors": self.min_contributors, "ledger_head": {"seq": seq, "hash": head}}  # fmt: skip
            if privacy is not None:
                privacy["job_epsilon"] = self.book.job_epsilon(entries, terms.job, extra=events)
            self.ledger.append("release", job=terms.job, round=rnd, what=what, privacy=privacy)
        spent = {"epsilon": privacy["job_epsilon"], "delta": privacy["delta"]} if privacy else None
        return np.frombuffer(blob, dtype=np.uint8), spent

    def _check_upload(self, entries: Sequence[dict], rnd: Any, participants: Any) -> None:
        """Ledger a ``refusal`` and raise :class:`PipelineRefusal` when :meth:`_upload_refusal` names a reason."""
        reason = self._upload_refusal(entries, rnd, participants)
        if reason:
            at = rnd if isinstance(rnd, int) and not isinstance(rnd, bool) and rnd >= 0 else 0
            self.book.refuse(self.terms.job, at, PipelineRefusal(reason), {"kind": "upload"})
            raise PipelineRefusal(f"site {self.site}: {reason}")

    def _upload_refusal(self, entries: Sequence[dict], rnd: Any, participants: Any) -> str | None:
        """Why round ``rnd``'s upload must not leave (``None``: it may). Messages never echo what the server
        sent beyond a count, so a refusal cannot bloat the ledger."""
        job = self.terms.job
        if isinstance(rnd, bool) or not isinstance(rnd, int) or not 1 <= rnd <= self.terms.rounds:
            return f"the server asked for an upload of a round outside 1…{self.terms.rounds}"
        if not isinstance(participants, list | tuple) or not all(isinstance(p, str) for p in participants):
            return "the round's participant set is not a list of site names"
        people = list(participants)
        if people != sorted(set(people)) or self.site not in people:
            return (f"round {rnd}'s participant set ({len(people)} names) does not list this site once, in order; "
                    "the server must announce the sorted set of sites it asks")  # fmt: skip
        unknown = [p for p in people if p != self.site and p not in self.party.peers()]
        if unknown:
            return (f"round {rnd}'s participant set names {len(unknown)} site(s) this site holds no certificate for; "
                    "only provisioned sites count as participants")  # fmt: skip
        if self.encrypted and len(people) < self.min_contributors:
            return (f"round {rnd} has {len(people)} participants, fewer than this site's min_contributors "
                    f"{self.min_contributors}: an aggregate of so few could reveal its upload")  # fmt: skip
        superseded = self.superseded(entries)
        if superseded:
            return f"{superseded}; it takes no more uploads"
        for e in entries:
            what = e["what"]
            if e["event"] == "refusal" and e["job"] == job and e["round"] == rnd and what.get("closed"):
                return f"round {rnd} of job {job} was closed when its training failed ({self.ledger.path}:{e['seq'] + 1})"
        inherited = next((e["what"].get("resumed_from") for e in entries
                          if e["event"] == "policy_loaded" and e["job"] == job), None)  # fmt: skip
        if inherited:
            if rnd <= inherited["round"]:
                return f"this job resumes job {inherited['job']} after round {inherited['round']}; round {rnd} is done"
            if people != inherited["participants"]:
                return (f"round {rnd}'s participant set differs from the one this site signed in job "
                        f"{inherited['job']}, which this job resumes")  # fmt: skip
        mine = [e for e in entries if e["event"] == "release" and e["job"] == job and e["what"].get("kind") == "upload"]
        for e in mine:
            if e["round"] == rnd:
                return (f"round {rnd} of job {job} was uploaded before ({self.ledger.path}:{e['seq'] + 1}); a second "
                        "upload of one round could be set against the first")  # fmt: skip
            if e["round"] > rnd:
                return (f"round {rnd} comes after round {e['round']} of job {job} ({self.ledger.path}:{e['seq'] + 1}); "
                        "rounds only move forward")  # fmt: skip
        if mine and mine[0]["what"].get("participants") != people:
            return (f"round {rnd}'s participant set differs from the one this site signed in round "
                    f"{mine[0]['round']} of job {job}; a job keeps one set of participants (two sets could be set "
                    "against each other)")  # fmt: skip
        return None

    def superseded(self, entries: Sequence[dict]) -> str | None:
        """Why this job answers no more tasks that use or reveal its state: it was resumed as another job
        (the resuming job holds its rounds from then on); ``None`` otherwise."""
        for e in entries:
            if e["event"] == "policy_loaded" and (e["what"].get("resumed_from") or {}).get("job") == self.terms.job:
                return f"job {self.terms.job} was resumed as job {e['job']} ({self.ledger.path}:{e['seq'] + 1})"
        return None

    def peers(self) -> Peers:
        """The sites whose signatures this site accepts on aggregates (:func:`trusted_peers`)."""
        return trusted_peers(self.party)

    def signing_key(self) -> pki.PrivateKey:
        if self._key is None:
            self._key = self.party.signing_key()
        return self._key

    def seal(self, arrays: Arrays) -> tuple[bytes, dict | None]:
        """The body bytes of an upload and the scheme for the ledger (``None``: plaintext)."""
        return pack_arrays(arrays), None

    def record_metrics(self, rnd: int, task: str, metrics: Mapping[str, Any]) -> None:
        """A ``release`` entry (kind ``metrics``) for figures about to go to the server: which splits and
        figures (evaluation on val/test, the training loss), and the SHA-256 of their canonical JSON — not the
        values. They are aggregate figures of the site's data and are not covered by DP, so DP modes send no
        training loss (``docs/threat-model.md``).

        Raises:
            PipelineRefusal: the job was resumed as another one (:meth:`superseded`): nothing more of it leaves.
        """
        text = json.dumps(metrics, sort_keys=True, separators=(",", ":"), default=float)
        figures = sorted({k for split in metrics.values() if isinstance(split, Mapping) for k in split})
        with self.ledger.locked():
            superseded = self.superseded(self.ledger.read(self.party.root_ca))
            if superseded:
                exc = PipelineRefusal(f"site {self.site}: {superseded}; its figures are not sent")
                self.book.refuse(self.terms.job, rnd, exc, {"kind": "metrics"})
                raise exc
            self.ledger.append("release", job=self.terms.job, round=rnd, privacy=None,
                               what={"kind": "metrics", "task": task, "splits": sorted(metrics), "figures": figures,
                                     "sha256": hashlib.sha256(text.encode()).hexdigest(), "bytes": len(text),
                                     "encrypted": False})  # fmt: skip

    def lineage(self, entries: Sequence[dict]) -> list[str]:
        """This job and every job it resumes, oldest first: whose rounds trained the model it holds."""
        chain, job = [self.terms.job], self.terms.job
        joins = {e["job"]: (e["what"].get("resumed_from") or {}).get("job")
                 for e in entries if e["event"] == "policy_loaded"}  # fmt: skip
        while joins.get(job) and joins[job] not in chain:
            job = joins[job]
            chain.insert(0, job)
        return chain

    def model_privacy(self) -> dict[str, Any]:
        """What the model this site holds has cost: ``{"jobs": lineage, "epsilon", "delta"}`` — the ε of every
        DP release of this job and of the jobs it resumes, composed (``None`` outside the DP modes)."""
        entries = self.ledger.read(self.party.root_ca)
        jobs = self.lineage(entries)
        if not self.noised:
            return {"jobs": jobs, "epsilon": None, "delta": None}
        return {"jobs": jobs, "epsilon": self.book.job_epsilon(entries, jobs), "delta": self.book.delta}

    def record_export(self, rnd: int, what: Mapping[str, Any]) -> str:
        """A ``model_export`` entry for the model this site keeps from the job (``what``: digests, round —
        nothing leaves the site); returns the entry's hash, which the model card cites.

        Raises:
            PipelineRefusal: the job was resumed as another one (:meth:`superseded`).
        """
        with self.ledger.locked():
            superseded = self.superseded(self.ledger.read(self.party.root_ca))
            if superseded:
                raise PipelineRefusal(f"site {self.site}: {superseded}; its model is not exported")
            entry = self.ledger.append("model_export", job=self.terms.job, round=rnd, privacy=None, what=dict(what))
        return entry_hash(entry)

    def open(self, rnd: int, payload: Arrays, meta: Mapping[str, Any]) -> Arrays:
        """The plaintext payload of a task (plaintext modes: the arrays as sent; encrypted ones refused).

        In DP modes a round after the first needs a payload: a DP round starts from the server's model or
        prototypes, never from the site's own non-private state.

        Raises:
            PipelineRefusal: the payload is not plaintext arrays, or a DP round after the first has none.
        """
        if self.noised and not payload and rnd > 1:
            raise PipelineRefusal(f"site {self.site}: the server sent no payload for round {rnd}; a private round "
                                  "starts from what the server sent")  # fmt: skip
        for name, value in payload.items():
            if name.startswith("__") or np.asarray(value).dtype == np.uint8:
                raise PipelineRefusal(f"site {self.site}: payload entry '{name}' is not a plaintext tensor; "
                                      f"privacy mode {self.mode} sends plaintext")  # fmt: skip
        return payload

    def release(self, rnd: int, request: Arrays) -> np.ndarray:
        """An aggregate release (modes that have one override this)."""
        raise PipelineRefusal(f"site {self.site}: privacy mode {self.mode} has no aggregate release; a release "
                              "request is refused")  # fmt: skip

    def own_upload(self, entries: Sequence[dict], rnd: int, job: str | None = None) -> dict | None:
        """This site's ``release`` entry of its round-``rnd`` upload in ``job`` (default: this job), if any."""
        job = self.terms.job if job is None else job
        for e in entries:
            if e["event"] == "release" and e["job"] == job and e["round"] == rnd and e["what"].get("kind") == "upload":
                return e
        return None


class ServerPipeline:
    """Server half of a privacy mode (module docstring). Subclasses override :meth:`combine_wires`.

    Args:
        party: the server's key material and ledger location.
        terms: the job's :class:`JobTerms`.
    """

    mode: ClassVar[str] = ""

    def __init__(self, party: Party, terms: JobTerms):
        self.party, self.terms = party, terms
        self.ledger: Ledger = party.ledger()
        self.release_bytes = 0
        """Bytes of the last round's release round trip (request + reply), counted as traffic."""

    def peers(self) -> Peers:
        """The sites whose signatures the server accepts (:func:`trusted_peers`)."""
        return trusted_peers(self.party)

    def announce(self, rnd: int, sites: Sequence[str], first: bool) -> dict[str, Any]:
        """Task meta for round ``rnd``: the participant set, and on the job's first task every site's anchor."""
        meta: dict[str, Any] = {"participants": sorted(sites)}
        if first:
            meta["anchors"] = self.anchors(sites)
        return meta

    def anchors(self, sites: Sequence[str]) -> dict[str, dict]:
        """The last statement the server recorded from each site (any job, upload or released aggregate), as
        signed by that site: the site checks its ledger still holds what the statement says followed it."""
        found: dict[str, dict] = {}
        with self.ledger.locked():
            for e in self.ledger.read(self.party.root_ca):
                if e["event"] == "received" and e["what"].get("site") in sites:
                    found[e["what"]["site"]] = {"statement": e["what"]["statement"],
                                                "signature": e["what"]["signature"]}  # fmt: skip
        return found

    def accept(self, rnd: int, participants: Sequence[str], replies: Mapping[str, Arrays],
               kind: str = "upload") -> dict[str, Wire]:  # fmt: skip
        """Open each reply's wire and record it in the server's ledger (``received``) before it is used.

        Raises:
            PipelineRefusal: a reply that is not exactly one wire, a wire not signed by its sender, or a
                statement for another job, round, mode, kind or participant set.
        """
        signed, wires, problems = self._open_all(rnd, participants, replies, kind)
        self._record(rnd, signed, kind)
        if problems:
            raise PipelineRefusal("; ".join(problems))
        return wires

    def record(self, rnd: int, participants: Sequence[str], replies: Mapping[str, Arrays]) -> None:
        """Record (``received``) every valid upload among ``replies`` — also when the round cannot go on (another
        site failed): what the server holds from a site is anchored in its ledger either way."""
        signed, _, _ = self._open_all(rnd, participants, {s: p for s, p in replies.items() if p}, "upload")
        self._record(rnd, signed, "upload")

    def _open_all(self, rnd: int, participants: Sequence[str], replies: Mapping[str, Arrays],
                  kind: str) -> tuple[dict[str, Wire], dict[str, Wire], list[str]]:  # fmt: skip
        """``(validly signed wires, those that are also for this round as announced, problems)``."""
        people = sorted(participants)
        signed: dict[str, Wire] = {}
        wires: dict[str, Wire] = {}
        problems: list[str] = []
        for site, params in replies.items():
            if set(params) != {WIRE_PARAM}:
                problems.append(f"site {site}: its reply is not one protected upload ({len(params)} entries); "
                                "nothing unprotected is accepted")  # fmt: skip
                continue
            try:
                wire = open_wire(params[WIRE_PARAM], self.peers(), sender=site)
            except WireError as e:
                problems.append(f"site {site}: {e}")
                continue
            signed[site] = wire
            s = wire.statement
            expected = (("kind", s.kind, kind), ("job", s.job, self.terms.job), ("round", s.round, rnd),
                        ("mode", s.mode, self.mode), ("participants", list(s.participants), people))  # fmt: skip
            wrong = [f"its {kind} says {name} {got!r}, expected {want!r}" for name, got, want in expected if got != want]
            if wrong:
                problems.append(f"site {site}: {wrong[0]}")
            else:
                wires[site] = wire
        return signed, wires, problems

    def _record(self, rnd: int, wires: Mapping[str, Wire], kind: str) -> None:
        with self.ledger.locked():
            for site, wire in wires.items():
                raw = wire.to_bytes()
                self.ledger.append("received", job=self.terms.job, round=rnd, privacy=None,
                                   what={"kind": kind, "site": site, "bytes": len(raw),
                                         "sha256": hashlib.sha256(raw).hexdigest(), **signed_record(wire)})  # fmt: skip

    def combine(self, rnd: int, participants: Sequence[str], replies: Mapping[str, Arrays], algorithm,
                ask_release: AskRelease) -> Arrays | None:  # fmt: skip
        """The payload for round ``rnd + 1`` from the round's replies (``None``: keep the current payload).

        Args:
            rnd: the round.
            participants: the announced participant set.
            replies: site → reply params, for the sites that answered.
            algorithm: the algorithm's server half.
            ask_release: sends one site a ``release`` task (modes with an aggregate release).
        """
        self.release_bytes = 0
        wires = self.accept(rnd, participants, replies)
        return self.combine_wires(rnd, participants, wires, algorithm, ask_release)

    def combine_wires(self, rnd: int, participants: Sequence[str], wires: Mapping[str, Wire], algorithm,
                      ask_release: AskRelease) -> Arrays | None:  # fmt: skip
        """Plaintext modes: the algorithm reads each site's arrays (``per-site``) or their sum."""
        uploads = {site: unpack_arrays(w.body) for site, w in wires.items()}
        if algorithm.form == "per-site":
            return to_numpy(algorithm.update_from_sites({s: to_torch(u) for s, u in uploads.items()}, rnd))
        aggregate = sum_uploads(uploads) if uploads else {}
        return to_numpy(algorithm.update(to_torch(aggregate), rnd))

    def record_send(self, task: str, payload: Arrays, rnd: int, sites: Sequence[str]) -> None:
        """The server's ``release`` entry for a payload about to go to ``sites`` (written before it is sent)."""
        kind = "release_request" if task == "release" else "payload"
        encrypted = any(name.startswith("__") for name in payload)
        self.ledger.append("release", job=self.terms.job, round=rnd, privacy=None,
                           what={"kind": kind, **describe_arrays(payload), "encrypted": encrypted,
                                 "task": task, "to": list(sites)})  # fmt: skip


# ---- plaintext tensor helpers --------------------------------------------------------------------


def trusted_peers(party: Party) -> Peers:
    """``party.peers()`` less every site the project's revocation list revokes (:mod:`medsilo.secure.revocation`).

    The list is read fresh on every call (beside the root CA, or in the kit's ``local/``), so a revocation applies
    from the next wire on; a list the root CA did not sign is refused (:class:`~medsilo.secure.revocation.
    RevocationError`) rather than ignored.
    """
    keys = party.peers()
    path = find_crl(party.root_ca, party.workspace)
    if path is None:
        return Peers(keys)
    crl = load_crl(path, pki.load_certificate(party.root_ca))
    # a kit keeps peers' certificates in startup/peers/; a simulation keeps them beside its root CA
    kit_peers = party.root_ca.parent / "peers"
    certs = peer_certificates(kit_peers if kit_peers.is_dir() else party.root_ca.parent, list(keys))
    return revocation.trusted_peers(keys, certs, crl)


def custody_record(party: Party, encrypted: bool) -> dict[str, Any]:
    """What a site's ``policy_loaded`` entry says about who else could hold its keys (:mod:`medsilo.secure.custody`).

    ``{"custody": Custody.to_json(), "custody_note": str | None}``: a deployed site records its kit's
    ``local/custody.json``; a kit without one records ``custody: null`` with a note (made before custody was
    recorded: treat as central). The simulator has no kits: ``medsilo sim`` made every party's key with its
    local CA and the CKKS key set on one machine, so it records ``provisioning: central`` honestly, with a note.
    """
    if os.environ.get(LEDGER_DIR_ENV):
        ckks = ("central", 1) if encrypted else ("none", 0)
        return {"custody": Custody("central", "central", ckks[0], None, ckks[1]).to_json(),
                "custody_note": "simulation: medsilo sim made every key with its local CA on one machine"}  # fmt: skip
    custody = read_custody(party.workspace)
    if custody is None:
        return {"custody": None, "custody_note": f"{party.workspace / CUSTODY_FILE}: none (a kit made before custody "
                                                  "was recorded): treat as central provisioning"}  # fmt: skip
    return {"custody": custody.to_json(), "custody_note": None}


def sum_uploads(uploads: Mapping[str, Arrays]) -> Arrays:
    """Element-wise sum per name over sites' uploads (float64 accumulation, float32 result).

    Raises:
        PipelineRefusal: sites disagree on names or shapes (fail closed: never aggregate a partial set).
    """
    names = {site: set(u) for site, u in uploads.items()}
    reference_site, reference = next(iter(names.items()))
    for site, keys in names.items():
        if keys != reference:
            diff = sorted(keys ^ reference)[:5]
            raise PipelineRefusal(f"sites {reference_site} and {site} uploaded different tensors (e.g. {diff})")
    total: dict[str, np.ndarray] = {}
    for site, upload in uploads.items():
        for name, value in upload.items():
            arr = np.asarray(value, dtype=np.float64)
            if name in total and total[name].shape != arr.shape:
                raise PipelineRefusal(f"site {site} uploaded '{name}' with shape {arr.shape}, others "
                                      f"{total[name].shape}")  # fmt: skip
            total[name] = total[name] + arr if name in total else arr.copy()
    return {k: v.astype(np.float32) for k, v in total.items()}


def to_numpy(tensors: Mapping[str, Any]) -> Arrays:
    """Torch tensors → float32 numpy arrays (what travels in a task)."""
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=False) for k, v in tensors.items()}


def to_torch(arrays: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
    """Numpy arrays → torch tensors (shares memory where possible)."""
    return {k: torch.as_tensor(np.asarray(v)) for k, v in (arrays or {}).items()}
