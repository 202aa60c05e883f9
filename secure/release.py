"""Aggregate release: a site decrypts a sum of encrypted uploads only for the exact, announced set of sites.

For server-side learning under ``ckks`` (FedTGP and FedKTL in their aggregate form: DESIGN §3, §5) the server
needs a *plaintext* aggregate, but it holds no secret key. It asks one site to release the round's aggregate
and sends it every contributor's signed wire (:mod:`medsilo.secure.upload`). :func:`release` is the releasing
site's check; it refuses, before anything is decrypted, unless:

1. every wire is well formed and signed by a distinct known site (certificates checked against the root CA by
   the caller), its body is a CKKS upload, and no ciphertext appears under two names;
2. every statement is for *this* job, *this* round and *this* privacy mode;
3. every statement names the **same participant set** P — the set the server announced before the round — and
   the wires come from **exactly** P: all present, nobody else;
4. the releasing site is in P and its own wire is the one its ledger says it sent (same digest);
5. ``|P|`` ≥ the largest ``min_contributors`` any contributor signed, the job's and the releaser's own.

Then it re-adds the ciphertexts itself (it never decrypts anything the server summed), decrypts the sum and
returns it with a record for its ledger (``aggregate_release``: participants, digests, aggregate digest,
layout, CKKS parameters; never values). The caller holds its ledger lock from the once-only check to the
ledger entry (:meth:`medsilo.secure.pipeline.ckks.CKKSSite.release`).

**Why the server cannot difference two releases of one round.** A site signs at most one upload per (job,
round) — its ledger refuses a second one, across restarts — and that one statement names one participant set.
A release needs every member's statement naming exactly the released set. So two releasable sets S₁ ≠ S₂ of
one round cannot share a member (it would have signed both S₁ and S₂): they are disjoint, and the difference of
their sums isolates nobody. A second release of the *same* set gives the same sum and nothing new; each site
still releases a round at most once (its ledger). Across rounds, a site signs one participant set per job (the
sites that joined it) and refuses rounds out of the job's range or order, so every release of a job covers the
same set — sums of rounds with and without a site (per-class counts, say, which do not change between rounds)
cannot be set against each other either. What remains — a server that reruns a job as a new job with fewer
participants — is stated in ``docs/threat-model.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import numpy as np
import tenseal as ts
import torch

from medsilo.secure import pki
from medsilo.secure.ckks import CKKSError, EncryptedUpload, add, decrypt, parameters
from medsilo.secure.upload import Wire, WireError, open_wire


class ReleaseRefused(CKKSError):
    """The releasing site refused to decrypt an aggregate; the message says why (and names the site)."""


def release(
    wires: Sequence[bytes | np.ndarray],
    public_keys: Mapping[str, pki.PublicKey],
    secret_ctx: ts.Context,
    *,
    job: str,
    rnd: int,
    mode: str,
    releaser: str,
    own_digest: str | None,
    min_contributors: int,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Check, re-add and decrypt an aggregate of signed encrypted uploads (the checks of the module docstring).

    Privacy: what leaves the site is the returned plaintext **sum** over the announced participant set, never a
    single site's upload; the caller ledgers ``record`` (event ``aggregate_release``) before sending it.

    Args:
        wires: every contributor's wire, as the server forwarded them.
        public_keys: site name → signature public key.
        secret_ctx: this site's secret CKKS context.
        job: this job's id; rnd: the round being released; mode: the job's privacy mode.
        releaser: this site's name (it must be a participant).
        own_digest: the body digest of the upload this site sent for the round (from its ledger), ``None`` if
            its ledger shows none (then it refuses: a site releases only rounds it took part in).
        min_contributors: ``max(job's, this site's policy)``.

    Returns:
        ``(aggregate, record)``: ``{name: tensor}`` in the upload layout, and a JSON-plain record
        ``{"participants", "digests", "contributors", "min_contributors", "aggregate_digest", "layout", "ckks",
        "time"}``.

    Raises:
        ReleaseRefused: the reason, naming the site at fault where there is one.
    """
    if isinstance(min_contributors, bool) or not isinstance(min_contributors, int) or min_contributors < 1:
        raise ReleaseRefused(f"min_contributors must be an integer ≥ 1, got {min_contributors!r}")
    opened: dict[str, Wire] = {}
    by_digest: dict[str, str] = {}
    for data in wires:
        try:
            wire = open_wire(data, public_keys)
        except WireError as e:
            raise ReleaseRefused(str(e)) from e
        s = wire.statement
        if s.site in opened:
            raise ReleaseRefused(f"site {s.site} contributes twice; each site may appear once in a release")
        if s.digest in by_digest:
            raise ReleaseRefused(f"sites {by_digest[s.digest]} and {s.site} present the same ciphertext "
                                 f"(digest {s.digest[:12]}…); a replayed upload does not count as another site")  # fmt: skip
        wrong = [(f, got, want) for f, got, want in (("kind", s.kind, "upload"), ("body", s.body, "ckks"),
                 ("job", s.job, job), ("round", s.round, rnd), ("mode", s.mode, mode)) if got != want]  # fmt: skip
        if wrong:
            field, got, want = wrong[0]
            raise ReleaseRefused(f"site {s.site}: its upload says {field} {got!r}, this release is for {want!r}")
        opened[s.site], by_digest[s.digest] = wire, s.site
    if not opened:
        raise ReleaseRefused("no contributions to release")
    announced = {w.statement.participants for w in opened.values()}
    if len(announced) > 1:
        raise ReleaseRefused("the contributions were signed for different participant sets ("
                             + " vs ".join("{" + ", ".join(p) + "}" for p in sorted(announced)) + "): the server "
                             "announced more than one set for this round")  # fmt: skip
    (participants,) = announced
    missing = sorted(set(participants) - set(opened))
    extra = sorted(set(opened) - set(participants))
    if missing or extra:
        raise ReleaseRefused(f"a release covers exactly the announced participants {{{', '.join(participants)}}}; "
                             f"missing {', '.join(missing) or 'none'}, not announced {', '.join(extra) or 'none'}")  # fmt: skip
    if releaser not in opened:
        raise ReleaseRefused(f"site {releaser} is not a participant of round {rnd}; it releases only rounds it "
                             "contributed to")  # fmt: skip
    if own_digest is None or opened[releaser].statement.digest != own_digest:
        raise ReleaseRefused(f"site {releaser}: the upload presented as its own is not the one its ledger "
                             "records for this round")  # fmt: skip
    signed = max(w.statement.min_contributors for w in opened.values())
    needed = max(min_contributors, signed)
    if len(participants) < needed:
        who = [s for s, w in opened.items() if w.statement.min_contributors == signed]
        raise ReleaseRefused(f"{len(participants)} contributors, need ≥ {needed}"
                             + (f" (signed by {', '.join(who)})" if signed >= min_contributors else ""))  # fmt: skip
    if not secret_ctx.is_private():
        raise ReleaseRefused("cannot release: this context holds no secret key (only sites release aggregates)")
    sites = sorted(opened)
    try:
        uploads = [EncryptedUpload.from_bytes(opened[s].body) for s in sites]
        total = add(secret_ctx, uploads, labels=[f"site {s}" for s in sites])
        aggregate = decrypt(secret_ctx, total)
    except CKKSError as e:
        raise ReleaseRefused(str(e)) from e
    record = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "participants": list(participants),
        "digests": {s: opened[s].statement.digest for s in sites},
        "contributors": len(sites),
        "min_contributors": needed,
        "aggregate_digest": total.digest(),
        "layout": total.layout.to_json(),
        "ckks": parameters(secret_ctx),
    }
    return aggregate, record
