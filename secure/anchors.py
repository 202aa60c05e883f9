"""Checks across ledgers: each ledger in its party's place, and no site ledger shorter than the server saw.

A ledger file alone proves what its key holder wrote, in order; it cannot show that lines were cut off its end
or that a whole file was copied into another site's folder (:mod:`medsilo.secure.ledger.verify`, *Limits*). Two
cross-checks close those gaps for an auditor holding several parties' ledgers:

* **Place** (:func:`expected_party`): a ledger at ``<party>/privacy_ledger.jsonl`` (a site's workspace, or a
  simulation's ``ledgers/<party>/``) or named ``<party>.ledger.jsonl`` must be that party's — whenever the
  place names a party the audit knows of (one whose ledger is checked, one the server received from, or the
  ``party`` the auditor names); a folder named otherwise (an auditor's own copy) says nothing.
* **Anchors** (:func:`cross_check`): every upload a site signs names its ledger head — the sequence number and
  hash of its last entry before the upload's own ``release`` entry (:mod:`medsilo.secure.upload`). The server
  records each statement it accepts, with the site's signature, as a ``received`` entry in its own ledger. For
  each such record the site's ledger must hold that entry with that hash and, right after it, the entry of that
  very upload (same body digest). A site ledger that ends before it was cut short (resetting its spent ε, say);
  a different entry there means the ledger was rewritten. The record's signature is checked against the
  certificate embedded in the site's own ledger, so a server cannot frame a site with a statement it never
  signed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medsilo.secure import pki
from medsilo.secure.keys import SERVER
from medsilo.secure.ledger import LEDGER_FILE, FileCheck, Problem, entry_hash
from medsilo.secure.upload import Statement, WireError

NAMED_SUFFIX = ".ledger.jsonl"


def expected_party(path: str | Path) -> str | None:
    """The party a ledger's place names: the folder of a ``privacy_ledger.jsonl``, the prefix of a
    ``<party>.ledger.jsonl``; ``None`` when the name says nothing."""
    path = Path(path)
    if path.name == LEDGER_FILE:
        return path.parent.name or None
    if path.name.endswith(NAMED_SUFFIX) and len(path.name) > len(NAMED_SUFFIX):
        return path.name[: -len(NAMED_SUFFIX)]
    return None


def cross_check(checks: Sequence[FileCheck], party: str | None = None) -> list[Problem]:
    """Place and anchor problems among verified ledgers (module docstring); one problem per file at most.

    Args:
        checks: :func:`~medsilo.secure.ledger.verify_file` results; only ledgers that verified on their own are
            compared. An empty ledger belongs to the party its place (or ``party``) names. With the server's
            ledger and at least one site's among them, a site the server received from whose ledger is missing
            is a problem of the server's file (deleted?); the server's ledger alone, or one site's, is checked
            on its own.
        party: when given, every ledger must be this party's, wherever it lies.
    """
    problems: dict[Path, Problem] = {}
    good = [c for c in checks if c.ok and c.entries]
    known = {c.entries[0]["party"] for c in good} | ({party} if party else set())
    known |= {e["what"].get("site") for c in good for e in c.entries if e["event"] == "received"}
    empty = {c.file: party or expected_party(c.file) for c in checks if c.ok and not c.entries}
    for c in good:
        owner, want = c.entries[0]["party"], party or expected_party(c.file)
        if want in known and want != owner:
            problems[c.file] = Problem(c.file, 1, f"ledger of party {owner!r} in the place of {want!r} (copied in "
                                                  "from another party's folder?)")  # fmt: skip
    sites: dict[str, list[FileCheck]] = {}
    for c in good:
        if c.entries[0]["party"] != SERVER and c.file not in problems:
            sites.setdefault(c.entries[0]["party"], []).append(c)
    for c in checks:
        if c.file in empty and empty[c.file] not in (None, SERVER):
            sites.setdefault(empty[c.file], []).append(c)
    servers = [c for c in good if c.entries[0]["party"] == SERVER]
    for server in servers:
        received = [r for r in server.entries if r["event"] == "received"]
        missing = sorted({r["what"].get("site") for r in received} - set(sites) - {None})
        if missing and sites:
            first = next(r for r in received if r["what"].get("site") == missing[0])
            problems.setdefault(server.file, Problem(server.file, first["seq"] + 1, (
                f"the server received uploads from {', '.join(missing)}, whose ledger is not among those checked "
                "(deleted?); give it, or check the server's ledger on its own")))  # fmt: skip
        for record in received:
            what = record["what"]
            if what.get("site") not in sites:
                continue
            for site_check in sites[what["site"]]:
                if site_check.file in problems:
                    continue
                reason = _anchor_problem(site_check, what, server.file, record["seq"] + 1)
                if reason:
                    line = min(len(site_check.entries) + 1, reason[0])
                    problems[site_check.file] = Problem(site_check.file, line, reason[1])
    return list(problems.values())


def _anchor_problem(site: FileCheck, what: dict, server_file: Path, server_line: int) -> tuple[int, str] | None:
    """``(line, reason)`` when ``site``'s ledger does not hold what the server's record says followed its head."""
    try:
        statement = Statement.from_json(what.get("statement"))
        signature = bytes.fromhex(what.get("signature", ""))
    except (WireError, ValueError, TypeError) as e:
        return 1, f"the server's record ({server_file}:{server_line}) is malformed ({e})"
    seq, entries = statement.ledger_seq, site.entries
    if not entries:
        return 1, (f"ledger is empty, but the server received this site's signed {statement.kind} that followed "
                   f"entry {seq + 1} ({server_file}:{server_line}): the ledger was emptied or replaced")  # fmt: skip
    key = _signer_key(entries, min(seq + 1, len(entries) - 1))
    if key is None or not pki.verify_signature(key, signature, statement.message()):
        return 1, (f"the server's record {server_file}:{server_line} holds a statement this site's key did not sign; "
                   "the server's ledger is not to be trusted on it")  # fmt: skip
    where = f"{server_file}:{server_line} (job {statement.job}, round {statement.round})"
    if len(entries) < seq + 2:
        return len(entries) + 1, (f"ledger ends after {len(entries)} entries, but the server received this site's "
                                  f"signed {statement.kind} that followed entry {seq + 1} ({where}): the ledger "
                                  "was cut short")  # fmt: skip
    if seq >= 0 and entry_hash(entries[seq]) != statement.ledger_hash:
        return seq + 1, f"entry {seq + 1} is not the one this site's signed {statement.kind} followed ({where})"
    if entries[seq + 1]["what"].get("body_sha256") != statement.digest:
        return seq + 2, f"entry {seq + 2} does not record the {statement.kind} the server received ({where})"
    return None


def _signer_key(entries: Sequence[dict], at: int) -> pki.PublicKey | None:
    """The public key that signed entry ``at``: the certificate (or key) embedded where its signer appeared."""
    signer = entries[at]["signer"]
    for e in reversed(entries[: at + 1]):
        if e["signer"] != signer:
            continue
        try:
            if "certificate" in e:
                return pki.certificate_public_key(pki.certificate_from_pem(e["certificate"]))
            if "public_key" in e:
                return pki.public_key_from_pem(e["public_key"])
        except pki.PKIError:
            return None
    return None
