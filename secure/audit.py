"""What an audit finds in a set of privacy ledgers: which files, whether they hold, and what they record.

Pure data, no printing: ``medsilo audit`` (:mod:`medsilo.cli.audit`) prints it and
:mod:`medsilo.audit_report` renders it as HTML. Importing this module loads neither torch, TenSEAL nor
matplotlib, so an auditor's machine needs none of them.

* :func:`verify_ledgers` — each file's own check (:func:`medsilo.secure.ledger.verify_file`: chain,
  signatures, signer certificates), then the revocation list (:mod:`medsilo.secure.revocation`: an entry signed
  by a revoked certificate after its revocation time is a problem; entries before it stay valid), then the checks
  across them (:func:`medsilo.secure.anchors.cross_check`: each ledger in its party's place, no site ledger
  shorter than what the server recorded), as one :class:`Verdict` per file, with the signer's key custody;
* :func:`ledger_custody` — from a ledger's signed ``policy_loaded`` entries (:mod:`medsilo.secure.custody`):
  whether the signer's key was provisioned centrally (the coordinator could have signed the entries) or made
  at the site;
* :func:`summarize` — an overview row per ledger (verified, custody, entries, releases plaintext/encrypted,
  ε spent vs cap, refusals, last entry time), then per party and job: events by kind, what left (count,
  bytes, encrypted or not), ε spent per budget scope against the cap over time (cap = the latest ``epsilon_cap`` in the entries' ``privacy``; ε
  recomposed with the site's accountant from the recorded mechanism events, flagged when it differs from what
  the site wrote), refusals with reasons, aggregate releases, and the job's lines in an NVFlare ``audit.log``
  next to the ledger (``<folder>/audit.log`` and ``<folder>/<job>/audit.log``).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from medsilo.errors import MedsiloError
from medsilo.secure import pki
from medsilo.secure.anchors import cross_check
from medsilo.secure.custody import Custody, CustodyError
from medsilo.secure.ledger import SPENDING_EVENTS, FileCheck, Problem, verify_file
from medsilo.secure.revocation import RevocationList, find_crl, load_crl

AUDIT_SAMPLE = 10
"""NVFlare audit.log lines listed per job (all are counted)."""


@dataclass(frozen=True)
class Verdict:
    """One ledger's result in an audit.

    Attributes:
        check: the file's own verification (:func:`medsilo.secure.ledger.verify_file`).
        problem: the file's first bad line, else a problem across ledgers (place, anchors), else ``None``.
        set_aside: files beside the ledger holding torn last lines that :func:`medsilo.secure.ledger.repair`
            moved aside (``<file>.torn-<UTC time>``), oldest first.
    """

    check: FileCheck
    problem: Problem | None
    set_aside: tuple[Path, ...]
    custody: dict[str, Any] | None = None
    """:func:`ledger_custody` of the entries that verified."""

    @property
    def file(self) -> Path:
        """The ledger file."""
        return self.check.file

    @property
    def party(self) -> str | None:
        """The party of the ledger's entries (``None`` for an empty ledger)."""
        return self.check.entries[0]["party"] if self.check.entries else None


def verify_ledgers(
    files: Sequence[Path],
    root_ca: x509.Certificate | str | os.PathLike | None = None,
    party: str | None = None,
    crl: RevocationList | str | os.PathLike | None = None,
) -> list[Verdict]:
    """Verify each ledger on its own, then against the revocation list, then across them (module docstring).

    Args:
        files: the ledger files (``medsilo audit`` passes those it finds under its arguments).
        root_ca: the provisioned root CA (certificate or PEM file); ``None`` trusts each file's first signer.
        party: when given, every ledger must be this party's, wherever it lies.
        crl: the project's revocation list (a :class:`~medsilo.secure.revocation.RevocationList` or a file,
            checked against ``root_ca``); ``None`` uses none (see :func:`crl_beside` for finding it).

    Returns:
        One :class:`Verdict` per file, in order.

    Raises:
        LedgerError: a file is missing or unreadable; PKIError: the root CA cannot be loaded, or a revocation
        list is given without a root CA or was not signed by it.
    """
    ca = pki.load_certificate(root_ca) if isinstance(root_ca, str | os.PathLike) else root_ca
    if crl is not None and not isinstance(crl, RevocationList):
        if ca is None:
            raise pki.PKIError(f"{crl}: a revocation list is checked against the root CA that signed it; "
                               "pass --root-ca too")  # fmt: skip
        crl = load_crl(crl, ca)
    checks = [verify_file(file, ca) for file in files]
    if crl is not None:
        for check in checks:
            _check_revocations(check, crl)
    crossed = {p.file: p for p in cross_check(checks, party=party)}
    return [
        Verdict(
            check,
            check.problem or crossed.get(check.file),
            tuple(sorted(check.file.parent.glob(f"{check.file.name}.torn-*"))),
            ledger_custody(check.entries),
        )
        for check in checks
    ]


def crl_beside(root_ca: str | os.PathLike) -> Path | None:
    """The revocation list an auditor's root CA file has beside it (``crl.pem``), or in the kit's ``local/``
    when the root CA is a kit's ``startup/rootCA.pem``; ``None`` when there is none."""
    root_ca = Path(root_ca)
    kit = root_ca.parent.parent if root_ca.parent.name == "startup" else None
    return find_crl(root_ca, kit)


def _check_revocations(check: FileCheck, crl: RevocationList) -> None:
    """Cut ``check`` at its first entry signed by a revoked certificate after the revocation time.

    Entries signed before the revocation stay valid: the certificate was trusted when they were signed."""
    certs: dict[str, x509.Certificate] = {}
    for number, entry in enumerate(check.entries, start=1):
        if "certificate" in entry:  # verify_file parsed it already
            certs[entry["signer"]] = pki.certificate_from_pem(entry["certificate"])
        cert = certs.get(entry["signer"])
        if cert is None:
            continue
        revoked = crl.revoked(cert, at=datetime.fromisoformat(entry["time"]))
        if revoked is not None:
            check.problem = Problem(check.file, number, (
                f"signed at {entry['time']}, after the signer's {revoked.describe()} (revocation list "
                f"{crl.path or '(in memory)'}); entries signed after a revocation are not trusted (the earlier "
                "ones stay valid)"))  # fmt: skip
            del check.entries[number - 1 :]
            return


def ledger_custody(entries: Sequence[dict]) -> dict[str, Any]:
    """Who could have signed a ledger, from its signed ``policy_loaded`` entries (:mod:`medsilo.secure.custody`).

    Returns:
        ``{"custody": "site-generated" | "central" | "unknown", "coordinator_could_sign": bool | None,
        "detail": str, "records": int}``: ``site-generated`` when every recorded custody says the private key
        was made at the site; ``central`` when any says the coordinator made it (a kit provisioned with
        ``medsilo provision --network``, the simulator, or a kit with no custody record); ``unknown`` when no
        entry records custody (a server's ledger, or one written before custody was recorded: assume central).
    """
    records = [e["what"] for e in entries if e.get("event") == "policy_loaded" and isinstance(e.get("what"), dict)
               and "custody" in e["what"]]  # fmt: skip
    if not records:
        return {"custody": "unknown", "coordinator_could_sign": None, "records": 0,
                "detail": "no signed custody record (a server's ledger, or an older one): assume central "
                          "provisioning, where the coordinator could have signed"}  # fmt: skip
    last = records[-1]
    parsed: list[Custody | None] = []
    for what in records:
        try:
            parsed.append(Custody.from_json(what["custody"]) if what["custody"] is not None else None)
        except CustodyError:
            parsed.append(None)
    central = any(c is None or c.coordinator_could_sign for c in parsed)
    latest = parsed[-1]
    detail = latest.describe() if latest is not None else "no custody record in the kit"
    if last.get("custody_note"):
        detail += f" ({last['custody_note']})"
    if central and latest is not None and not latest.coordinator_could_sign:
        detail += "; an earlier entry records central provisioning"
    return {"custody": "central" if central else "site-generated", "coordinator_could_sign": central,
            "records": len(records), "detail": detail}  # fmt: skip


def summarize(
    verdicts: Sequence[Verdict], root_ca: str | None = None, crl: str | None = None
) -> dict[str, Any]:
    """The report's content from :func:`verify_ledgers` (JSON-plain): the same checks as ``audit verify``,
    each ledger's own and those across ledgers, so a ledger cut short against the server's record is never
    reported as verified.

    A ledger that failed verification is summarized from every line that still parses, marked unverified.

    Args:
        verdicts: one :class:`Verdict` per ledger.
        root_ca: the root CA file the ledgers were checked against, as the report should name it, or ``None``.
        crl: the revocation list they were checked against, likewise.

    Returns:
        ``{"generated", "root_ca", "crl", "verified", "ledgers": [...]}``: per ledger its file, party, entries,
        verification result, signers, ``custody`` (:func:`ledger_custody`), ``overview`` (the opening table's
        row: verified, custody, entries, releases plaintext/encrypted, ε spent and cap per scope, refusals,
        jobs, last entry time), ``budgets`` (per scope: ε and δ spent, caps, the ε series, how it was
        accounted) and ``jobs`` (per job: events by kind, what left, ε added, refusals, aggregate releases,
        matching NVFlare ``audit.log`` lines).
    """
    ledgers = []
    for verdict in verdicts:
        check, ok = verdict.check, verdict.problem is None
        items = check.entries if check.ok else _lenient_entries(check.file)
        by_job: dict[str | None, list[dict]] = {}
        for e in items:
            by_job.setdefault(e.get("job"), []).append(e)
        budgets = _budgets(items, SPENDING_EVENTS)
        jobs = [_job_summary(check.file, job, es, SPENDING_EVENTS) for job, es in by_job.items()]
        custody = verdict.custody or ledger_custody(check.entries)
        ledgers.append(
            {
                "file": str(check.file),
                "party": items[0].get("party") if items else None,
                "entries": len(items),
                "verified": ok,
                "problem": str(verdict.problem) if verdict.problem else None,
                "signers": sorted({str(e.get("signer")) for e in items}),
                "custody": custody,
                "budgets": budgets,
                "jobs": jobs,
                "overview": _overview(items, budgets, jobs, ok, custody),
            }
        )
    return {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "root_ca": root_ca,
        "crl": crl,
        "verified": all(v.problem is None for v in verdicts),
        "ledgers": ledgers,
    }


def _overview(items: list[dict], budgets: dict, jobs: list[dict], ok: bool, custody: dict) -> dict[str, Any]:
    """One row of the report's opening table: the ledger at a glance."""
    releases = {"plaintext": 0, "encrypted": 0}
    for e in items:
        if e.get("event") in SPENDING_EVENTS:
            what = e.get("what") if isinstance(e.get("what"), dict) else {}
            releases["encrypted" if what.get("encrypted") is True else "plaintext"] += 1
    return {
        "verified": ok,
        "custody": custody["custody"],
        "entries": len(items),
        "releases": releases,
        "epsilon": {
            scope: {"spent": b["epsilon"], "cap": b["epsilon_cap"]} for scope, b in sorted(budgets.items())
        },
        "refusals": sum(len(j["refusals"]) for j in jobs),
        "jobs": len([j for j in jobs if j["job"] is not None]),
        "last_time": items[-1].get("time") if items else None,
    }


def _budgets(items: list[dict], spending: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """ε spent per budget scope, and its series over time.

    Entries that carry their mechanism ``events`` (what medsilo's sites write) are composed by the same
    accountant the site uses (:class:`medsilo.secure.dp.PrivacyAccountant`, RDP at the scope's δ), so the
    total is the site's own; ``epsilon_recorded`` is the last cumulative ε the site wrote, and
    ``mismatch`` is true when the two disagree (a site that under-reports its spending). Entries without
    an event fall back to basic composition (Σ ε, Σ δ), a valid upper bound.
    """
    # Lazy for cost: dp_accounting loads scipy (about 0.6 s), which `medsilo audit verify` never needs.
    from medsilo.secure.accounting import PrivacyAccountant

    budgets: dict[str, dict[str, Any]] = {}
    for e in items:
        privacy = e.get("privacy") if isinstance(e.get("privacy"), dict) else None
        if privacy is None or not isinstance(privacy.get("scope"), str):
            continue
        b = budgets.setdefault(privacy["scope"], {"epsilon": 0.0, "delta": 0.0, "epsilon_cap": None, "delta_cap": None,
                                                  "series": [], "_events": [], "_deltas": set()})  # fmt: skip
        for cap in ("epsilon_cap", "delta_cap"):
            if _number(privacy.get(cap)) is not None:
                b[cap] = _number(privacy[cap])
        if e.get("event") not in spending:
            continue
        eps = _number(privacy.get("epsilon")) or 0.0
        b["epsilon"] += eps
        b["delta"] += _number(privacy.get("delta")) or 0.0
        b["_events"].extend(privacy.get("events") or [privacy.get("event")])
        b["_deltas"].add(_number(privacy.get("delta")))
        recorded = _number(privacy.get("cumulative_epsilon"))
        b["series"].append({"time": e.get("time"), "seq": e.get("seq"), "job": e.get("job"), "round": e.get("round"),
                            "epsilon": eps, "cumulative_epsilon": recorded if recorded is not None else b["epsilon"]})  # fmt: skip
    for b in budgets.values():
        events, deltas = b.pop("_events"), b.pop("_deltas")
        b["accounting"] = "basic composition (Σ ε, Σ δ)"
        if events and all(isinstance(ev, dict) for ev in events) and len(deltas) == 1 and None not in deltas:
            delta = deltas.pop()
            try:
                total = PrivacyAccountant.from_events(events, delta).epsilon
            except MedsiloError:
                continue  # a malformed event: keep the additive bound
            b["epsilon_recorded"] = b["series"][-1]["cumulative_epsilon"]
            b["mismatch"] = abs(total - b["epsilon_recorded"]) > 1e-6 * max(1.0, total)
            b["epsilon"], b["delta"] = total, delta
            b["accounting"] = "RDP (dp-accounting), as the site's accountant"
    return budgets


def _job_summary(file: Path, job: str | None, items: list[dict], spending: tuple[str, ...]) -> dict[str, Any]:
    kinds: dict[str, dict[str, int]] = {}
    released = {"count": 0, "bytes": 0, "encrypted_bytes": 0, "plaintext_bytes": 0}
    epsilon: dict[str, float] = {}
    for e in items:
        if e.get("event") not in spending:
            continue
        what = e.get("what") if isinstance(e.get("what"), dict) else {}
        nbytes = int(_number(what.get("bytes")) or 0)
        encrypted = what.get("encrypted") is True
        k = kinds.setdefault(str(what.get("kind", "?")), {"count": 0, "bytes": 0, "encrypted": 0})
        k["count"] += 1
        k["bytes"] += nbytes
        k["encrypted"] += encrypted
        released["count"] += 1
        released["bytes"] += nbytes
        released["encrypted_bytes" if encrypted else "plaintext_bytes"] += nbytes
        privacy = e.get("privacy") if isinstance(e.get("privacy"), dict) else {}
        if isinstance(privacy.get("scope"), str):
            epsilon[privacy["scope"]] = epsilon.get(privacy["scope"], 0.0) + (
                _number(privacy.get("epsilon")) or 0.0
            )
    rounds = [e["round"] for e in items if isinstance(e.get("round"), int)]
    return {
        "job": job,
        "first_time": items[0].get("time"),
        "last_time": items[-1].get("time"),
        "rounds": [min(rounds), max(rounds)] if rounds else None,
        "events": dict(Counter(str(e.get("event")) for e in items)),
        "released": {**released, "kinds": kinds},
        "epsilon": epsilon,
        "refusals": [
            {"seq": e.get("seq"), "time": e.get("time"), "round": e.get("round"), "reason": e.get("reason")}
            for e in items
            if e.get("event") == "refusal"
        ],
        "aggregate_releases": [
            {"seq": e.get("seq"), "time": e.get("time"), "round": e.get("round"), "what": e.get("what")}
            for e in items
            if e.get("event") == "aggregate_release"
        ],
        "nvflare_audit": _audit_lines(file, job) if job else None,
    }


def _audit_lines(ledger_file: Path, job: str) -> dict[str, Any] | None:
    """NVFlare ``audit.log`` lines naming ``job`` (as a whole word) next to the ledger: site folder and job folder."""
    folder = ledger_file.parent
    found = [f for f in (folder / "audit.log", folder / job / "audit.log") if f.is_file()]
    if not found:
        return None
    mentions = re.compile(rf"(?<![\w.-]){re.escape(job)}(?![\w.-])")
    lines = []
    for f in found:
        with open(f, encoding="utf-8", errors="replace") as fh:
            lines.extend(line.rstrip("\n")[:300] for line in fh if mentions.search(line))
    return {"files": [str(f) for f in found], "lines": len(lines), "sample": lines[:AUDIT_SAMPLE]}


def _lenient_entries(file: Path) -> list[dict]:
    """Every line of ``file`` that parses as a JSON object (for an *unverified* report only)."""
    items = []
    for line in file.read_bytes().split(b"\n"):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            items.append(value)
    return items


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
