"""Privacy mode ``ckks``: uploads encrypted under CKKS; the server forwards ciphertexts and never decrypts.

**Site.** Every tensor of the upload — parameters × n, prototype sums, per-class counts, ``n`` — is packed into
CKKS ciphertexts (:func:`medsilo.secure.ckks.encrypt`) with the federation's key set; only the layout (names,
shapes) stays readable. The signed statement names the participant set and the site's own
``min_contributors``; a round with fewer participants than that is refused before anything leaves.

**Server, linear algorithms** (FedAvg family, FedProto, FedDistill, LG-FedAvg …): the payload for the next
round is every contributor's signed wire (:data:`CONTRIBUTIONS`), once the server has checked them (signed,
for this round, at least the largest ``min_contributors`` any contributor signed, adding up under one key set
and layout). Each site adds them itself and decrypts that sum (:meth:`Site.open`) — never a ciphertext the
server made: holding the public key, the server could otherwise encrypt a model of its choosing, or an affine
function of another site's ciphertext, and watch what the site does with it. The site checks the wires:
signed by distinct known sites, for this job and the previous round, one participant set, enough
contributors, and — if it contributed — its own upload as its ledger records it; it decrypts a round once
(its ledger's ``decrypt`` entries) and writes the ``decrypt`` entry before using the sum. The price is
bandwidth: each site downloads every contributor's ciphertexts (N × an upload) instead of one sum.

**Key versions** (distributed provisioning): a site encrypts under its current CKKS key version (recorded in
the ledger entry's scheme as ``key_version``) and refuses contributions made under a retired one
(:meth:`medsilo.secure.keys.Party.check_key_version`), naming both versions.

**Server, server-side learning** (FedTGP/FedKTL aggregate form): an aggregate release (:mod:`medsilo.secure.release`)
by one participant, rotating round by round, of exactly the announced participant set — so a round where not
every participant answered is not released and the server keeps its payload. The releasing site checks,
decrypts and ledgers under its ledger lock, once per (job, round), and sends the plaintext sum back as a
signed wire of kind ``aggregate``, which the server records before learning from it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from medsilo.secure.ckks import CKKSError, EncryptedUpload, add, decrypt, encrypt, parameters
from medsilo.secure.keys import RetiredKeyError
from medsilo.secure.pipeline.base import (
    Arrays,
    AskRelease,
    PipelineRefusal,
    RoundSkipped,
    ServerPipeline,
    SitePipeline,
    to_numpy,
    to_torch,
)
from medsilo.secure.release import ReleaseRefused, release
from medsilo.secure.upload import (
    WIRE_PARAM,
    Wire,
    WireError,
    open_wire,
    pack_arrays,
    pack_wires,
    seal,
    unpack_arrays,
    unpack_wires,
)

CONTRIBUTIONS = "__contributions__"
"""The payload entry of a linear algorithm's encrypted round: every contributor's signed wire
(:func:`medsilo.secure.upload.pack_wires`), which each site adds itself before decrypting."""


class Site(SitePipeline):
    """Site half: encrypt and sign uploads, check and decrypt aggregates, release exact sets."""

    mode = "ckks"
    encrypted = True

    def __init__(self, party, terms, policy):
        super().__init__(party, terms, policy)
        self._ctx = None

    def context(self):
        """The site's secret CKKS context (loaded once, refused if it is not secret)."""
        if self._ctx is None:
            self._ctx = self.party.he_context()
        return self._ctx

    def seal(self, arrays: Arrays) -> tuple[bytes, dict | None]:
        enc = encrypt(self.context(), {k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()})
        record = self.party.key_versions()
        version = {"key_version": record["current"]} if record else {}
        return enc.to_bytes(), {**parameters(self.context()), **version, "ciphertexts": len(enc.ciphertexts)}

    def open(self, rnd: int, payload: Arrays, meta: Mapping[str, Any]) -> Arrays:
        """Sum and decrypt the previous round's encrypted uploads itself (linear algorithms), once per round;
        plaintext payloads (computed by the server from a released aggregate) pass through.

        The site never decrypts a ciphertext the server made: it re-adds the contributors' own signed wires
        (the server, holding the public key, could otherwise encrypt a model of its choosing, or an affine
        function of another site's ciphertext, and watch what the site does with it).

        Raises:
            PipelineRefusal: a plaintext payload for an algorithm the server only adds; contributions that are
                malformed, not signed by distinct known sites, for another job, round or mode, from more than one
                participant set or outside it, too few, or presenting this site's own upload other than as its
                ledger records it; a round whose aggregate this site decrypted before. CKKSError: ciphertexts
                that cannot be added or decrypted.
        """
        if CONTRIBUTIONS not in payload:
            if payload and not self.terms.releases:
                raise PipelineRefusal(f"site {self.site}: under {self.mode} the server never holds a plaintext payload "
                                      "of this job's algorithm (it only forwards ciphertexts); a plaintext one is refused")  # fmt: skip
            return super().open(rnd, payload, meta)
        if set(payload) != {CONTRIBUTIONS} or not isinstance(rnd, int) or rnd < 2:
            raise PipelineRefusal(f"site {self.site}: an encrypted payload holds exactly the previous round's "
                                  "contributions")  # fmt: skip
        of_round = rnd - 1
        of_job = self.resumed["job"] if self.resumed and of_round == self.resumed["round"] else self.terms.job
        try:
            wires = [open_wire(w, self.peers()) for w in unpack_wires(payload[CONTRIBUTIONS])]
        except WireError as e:
            raise PipelineRefusal(f"site {self.site}: the round's contributions are refused: {e}") from e
        found = self._contributors(wires, of_job, of_round)
        sites = sorted(found)
        uploads = [EncryptedUpload.from_bytes(found[s].body) for s in sites]
        try:  # a job whose ciphertexts are under a retired key version is refused by name, before any add
            self.party.check_key_version(u.fingerprint for u in uploads)
        except RetiredKeyError as e:
            raise PipelineRefusal(f"site {self.site}: {e}") from e
        total = add(self.context(), uploads, labels=[f"site {s}" for s in sites])
        with self.ledger.locked():
            entries = self.ledger.read(self.party.root_ca)
            superseded = self.superseded(entries)
            if superseded:
                raise PipelineRefusal(f"site {self.site}: {superseded}; it decrypts nothing more")
            for e in entries:
                what = e["what"]
                if e["event"] != "decrypt" or what.get("of_job") != of_job or what.get("of_round") != of_round:
                    continue
                # a resumed job may open the round its predecessor opened last, but only the very same sum: two
                # different sums of one round could be set against each other
                same = (what.get("contributors"), what.get("digest")) == (sites, total.digest())
                if e["job"] == self.terms.job or not same:
                    raise PipelineRefusal(f"site {self.site}: the aggregate of round {of_round} of job {of_job} was "
                                          f"decrypted before ({self.ledger.path}:{e['seq'] + 1}); a site decrypts "
                                          "a round once")  # fmt: skip
            plain = decrypt(self.context(), total)
            self.ledger.append("decrypt", job=self.terms.job, round=rnd, privacy=None,
                               what={"kind": "aggregate", "digest": total.digest(), "values": total.layout.num_values,
                                     "ciphertexts": len(total.ciphertexts), "encrypted": True, "of_job": of_job,
                                     "of_round": of_round, "contributors": sites})  # fmt: skip
        return {k: v.detach().cpu().numpy().astype(np.float32, copy=False) for k, v in plain.items()}

    def _contributors(self, wires: list[Wire], job: str, of_round: int) -> dict[str, Wire]:
        found: dict[str, Wire] = {}
        digests: set[str] = set()
        for wire in wires:
            s = wire.statement
            if s.site in found or s.digest in digests:
                raise PipelineRefusal(f"site {self.site}: the contributions hold site {s.site} or one ciphertext twice")
            if (s.kind, s.job, s.round, s.mode, s.body) != ("upload", job, of_round, self.mode, "ckks"):
                raise PipelineRefusal(f"site {self.site}: contributor {s.site} signed an upload for job {s.job} round "
                                      f"{s.round} ({s.mode}); this aggregate is of job {job} round {of_round}")  # fmt: skip
            found[s.site], _ = wire, digests.add(s.digest)
        if not found:
            raise PipelineRefusal(f"site {self.site}: the aggregate names no contributors")
        sets = {w.statement.participants for w in found.values()}
        if len(sets) != 1 or not set(found) <= set(next(iter(sets))):
            raise PipelineRefusal(f"site {self.site}: the aggregate's contributors were not all announced in one "
                                  "participant set")  # fmt: skip
        announced = next(iter(sets))
        if self.terms.min_sites is None and set(found) != set(announced):
            raise PipelineRefusal(f"site {self.site}: the aggregate holds {len(found)} of the {len(announced)} "
                                  "announced participants; this job (no reliability.min_sites) completes a round "
                                  "only with all of them")  # fmt: skip
        needed = max(self.min_contributors, self.terms.min_sites or 0,
                     *(w.statement.min_contributors for w in found.values()))
        if len(found) < needed:
            raise PipelineRefusal(f"site {self.site}: the aggregate holds {len(found)} contributors, need ≥ {needed}; "
                                  "it is not decrypted")  # fmt: skip
        if self.site in found:
            own = self.own_upload(self.ledger.read(self.party.root_ca), of_round, job)
            if own is None or own["what"].get("body_sha256") != found[self.site].statement.digest:
                raise PipelineRefusal(f"site {self.site}: the aggregate claims an upload of this site for round "
                                      f"{of_round} that its ledger does not record")  # fmt: skip
        return found

    def release(self, rnd: int, request: Arrays) -> np.ndarray:
        """Release the plaintext sum of round ``rnd``'s exact participant set, once (module docstring).

        Raises:
            PipelineRefusal / ReleaseRefused: the algorithm needs no release, this site released the round
                before, or a check of :func:`medsilo.secure.release.release` failed — ledgered as ``refusal``.
        """
        terms = self.terms
        with self.ledger.locked():
            entries = self.ledger.read(self.party.root_ca)
            try:
                if isinstance(rnd, bool) or not isinstance(rnd, int) or not 1 <= rnd <= terms.rounds:
                    raise ReleaseRefused(f"site {self.site}: a release of a round outside 1…{terms.rounds} is refused")
                superseded = self.superseded(entries)
                if superseded:
                    raise ReleaseRefused(f"site {self.site}: {superseded}; it releases nothing more")
                if not terms.releases:
                    raise ReleaseRefused(f"site {self.site}: this job's algorithm learns nothing on the server, so "
                                         "no aggregate of it is ever released")  # fmt: skip
                for number, e in enumerate(entries, start=1):
                    if e["event"] == "aggregate_release" and e["job"] == terms.job and e["round"] == rnd:
                        raise ReleaseRefused(f"site {self.site}: round {rnd} of job {terms.job} was released before "
                                             f"({self.ledger.path}:{number}); a second release could be set "
                                             "against the first")  # fmt: skip
                own = self.own_upload(entries, rnd)
                aggregate, record = release(list(request.values()), self.peers(), self.context(), job=terms.job,
                                            rnd=rnd, mode=self.mode, releaser=self.site,
                                            own_digest=own["what"].get("body_sha256") if own else None,
                                            min_contributors=self.min_contributors)  # fmt: skip
            except (ReleaseRefused, CKKSError) as exc:
                self.book.refuse(terms.job, rnd if isinstance(rnd, int) and rnd >= 0 else 0, exc, {"kind": "aggregate"})
                raise
            seq, head = self.ledger.head()
            wire = seal({"kind": "aggregate", "site": self.site, "job": terms.job, "round": rnd, "mode": self.mode,
                         "participants": record["participants"], "min_contributors": record["min_contributors"],
                         "body": "arrays", "ledger_seq": seq, "ledger_hash": head},
                        pack_arrays(to_numpy(aggregate)), self.signing_key())  # fmt: skip
            blob = wire.to_bytes()
            self.ledger.append("aggregate_release", job=terms.job, round=rnd, privacy=None,
                               what={"kind": "aggregate", **record, "bytes": len(blob),
                                     "sha256": hashlib.sha256(blob).hexdigest(), "body_sha256": wire.statement.digest,
                                     "ledger_head": {"seq": seq, "hash": head}})  # fmt: skip
        return np.frombuffer(blob, dtype=np.uint8)


class Server(ServerPipeline):
    """Server half: add ciphertexts (linear algorithms) or obtain an aggregate release (server-side learning)."""

    mode = "ckks"

    def __init__(self, party, terms):
        super().__init__(party, terms)
        self._ctx = None

    def combine_wires(self, rnd: int, participants: Sequence[str], wires: Mapping[str, Wire], algorithm,
                      ask_release: AskRelease) -> Arrays | None:  # fmt: skip
        if algorithm.form == "per-site":
            raise PipelineRefusal(f"privacy mode {self.mode}: the algorithm reads per-site uploads, which an "
                                  "encrypted mode never gives the server")  # fmt: skip
        if not wires:
            raise PipelineRefusal(f"round {rnd}: no site's upload arrived")
        if algorithm.needs_plaintext_aggregate:
            return self._released(rnd, participants, wires, algorithm, ask_release)
        signed = max(w.statement.min_contributors for w in wires.values())
        needed = max(self.terms.min_contributors, signed)
        if len(wires) < needed:
            raise PipelineRefusal(f"round {rnd}: {len(wires)} encrypted uploads arrived, but a contributor requires "
                                  f"≥ {needed} in any aggregate")  # fmt: skip
        if self._ctx is None:
            self._ctx = self.party.he_context()
        sites = sorted(wires)
        try:  # the server's own check that the uploads add up (one key set, one layout); the sites add them again
            add(self._ctx, [EncryptedUpload.from_bytes(wires[s].body) for s in sites], labels=[f"site {s}" for s in sites])
        except CKKSError as e:
            raise PipelineRefusal(f"round {rnd}: encrypted uploads refused: {e}") from e
        packed = pack_wires([wires[s].to_bytes() for s in sites])
        return {CONTRIBUTIONS: np.frombuffer(packed, dtype=np.uint8)}

    def _released(self, rnd: int, participants: Sequence[str], wires: Mapping[str, Wire], algorithm,
                  ask_release: AskRelease) -> Arrays:  # fmt: skip
        people = sorted(participants)
        if sorted(wires) != people:
            raise RoundSkipped(f"round {rnd}: {', '.join(sorted(set(people) - set(wires)))} did not answer; a "
                                   "release covers exactly the announced participants, so this round's aggregate "
                                   "is not released and the server keeps its payload")  # fmt: skip
        releaser = people[(rnd - 1) % len(people)]  # rotate, so no single site releases every round
        request = {s: wires[s].to_array() for s in people}
        reply = ask_release(releaser, request)
        accepted = self.accept(rnd, participants, {releaser: reply}, kind="aggregate")
        self.release_bytes = sum(int(a.nbytes) for a in request.values()) + int(reply[WIRE_PARAM].nbytes)
        aggregate = unpack_arrays(accepted[releaser].body)
        return to_numpy(algorithm.update(to_torch(aggregate), rnd))
