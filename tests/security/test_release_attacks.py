"""A malicious server tries to obtain one site's exact upload under ``ckks`` through aggregate releases.

Every attack plays the server operator: it holds the public context, every wire the sites sent, and decides
what to ask whom. Each must be refused before anything is decrypted, with the refusal in the site's ledger.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsilo.config.site import PrivacyPolicy
from medsilo.secure.keys import Party
from medsilo.secure.ledger import entries
from medsilo.secure.pipeline.base import PipelineRefusal
from medsilo.secure.release import ReleaseRefused
from medsilo.secure.upload import WIRE_PARAM, Wire, seal

from .conftest import SITES, upload


def _round(federation, terms, rnd: int = 1, participants=SITES, policies=None):
    """Every participant uploads round ``rnd``; returns their site pipelines and wires (uint8 arrays)."""
    policies = policies or {}
    sites = {s: federation.site(s, terms, policies.get(s)) for s in participants}
    wires = {s: sites[s].protect(rnd, list(participants), upload(i))[0] for i, s in enumerate(participants)}
    return sites, wires


def _events(federation, site: str, event: str) -> list[dict]:
    return [e for e in entries(federation.ledger(site)) if e["event"] == event]


def test_two_overlapping_releases_of_one_round_cannot_isolate_a_site(federation):
    terms = federation.terms("ckks")
    sites, wires = _round(federation, terms)
    # the honest request: hospital-1 releases the sum of all four
    everyone = {s: wires[s] for s in SITES}
    full = sites["hospital-1"].release(1, everyone)
    assert full.dtype == np.uint8 and len(_events(federation, "hospital-1", "aggregate_release")) == 1
    # the attack: hospital-2 is asked for the sum without hospital-1; the difference would be hospital-1's upload
    without_one = {s: wires[s] for s in SITES[1:]}
    with pytest.raises(ReleaseRefused, match=r"exactly the announced participants .*missing hospital-1"):
        sites["hospital-2"].release(1, without_one)
    assert _events(federation, "hospital-2", "aggregate_release") == []
    refusal = _events(federation, "hospital-2", "refusal")[-1]
    assert refusal["round"] == 1 and refusal["what"]["sent"] is False and "missing hospital-1" in refusal["reason"]


def test_a_site_signs_one_upload_per_round_so_the_server_cannot_get_a_smaller_set_signed(federation):
    terms = federation.terms("ckks")
    sites, _ = _round(federation, terms)
    # the server re-asks three sites for round 1 with a participant set that leaves hospital-1 out
    for site in SITES[1:]:
        with pytest.raises(PipelineRefusal, match=r"round 1 of job job-1 was uploaded before"):
            sites[site].protect(1, list(SITES[1:]), upload(7))
    # ... across a restart too: a new process of hospital-2 reads the same ledger
    again = federation.site("hospital-2", terms)
    with pytest.raises(PipelineRefusal, match="uploaded before"):
        again.protect(1, list(SITES[1:]), upload(7))
    assert [e["round"] for e in _events(federation, "hospital-2", "release")] == [1]


def test_a_site_releases_a_round_once_even_after_a_restart(federation):
    terms = federation.terms("ckks")
    sites, wires = _round(federation, terms)
    sites["hospital-1"].release(1, dict(wires))
    restarted = federation.site("hospital-1", terms)
    with pytest.raises(ReleaseRefused, match=r"round 1 of job job-1 was released before \(.*:\d+\)"):
        restarted.release(1, dict(wires))
    assert len(_events(federation, "hospital-1", "aggregate_release")) == 1


def test_a_contributors_own_min_contributors_is_bound_into_what_it_signed(federation):
    terms = federation.terms("ckks", min_contributors=2)
    # hospital-3 demands five contributors in any aggregate of its upload; the job asks for two
    sites, wires = _round(federation, terms, policies={"hospital-3": PrivacyPolicy(min_contributors=4)})
    assert sites["hospital-1"].release(1, dict(wires)) is not None  # four: enough for everyone
    terms = federation.terms("ckks", job="job-2")
    people = SITES[:3]
    with pytest.raises(PipelineRefusal, match="fewer than this site's min_contributors 4"):
        federation.site("hospital-3", terms, PrivacyPolicy(min_contributors=4)).protect(1, list(people), upload(1))
    # a site that signed min_contributors 4 into a 3-site round (e.g. an old policy) still stops the release
    sites = {s: federation.site(s, terms) for s in people}
    wires = {s: sites[s].protect(1, list(people), upload(i))[0] for i, s in enumerate(people)}
    forged = Wire.from_bytes(wires["hospital-3"])
    assert forged.statement.min_contributors == 2
    third = federation.site("hospital-3", terms)
    statement = {**forged.statement.to_json(), "min_contributors": 4}
    statement.pop("digest")
    wires["hospital-3"] = seal(statement, forged.body, third.signing_key()).to_array()
    with pytest.raises(ReleaseRefused, match=r"3 contributors, need ≥ 4 \(signed by hospital-3\)"):
        sites["hospital-1"].release(1, wires)


def test_the_server_cannot_pass_its_own_ciphertext_off_as_a_site(federation):
    terms = federation.terms("ckks")
    sites, wires = _round(federation, terms, participants=SITES[:3])
    server = federation.server(terms)
    # the server encrypts values of its choosing and signs them with its own key, claiming to be hospital-4
    forged = Wire.from_bytes(wires["hospital-3"])
    statement = {**forged.statement.to_json(), "site": "hospital-4", "participants": list(SITES)}
    statement.pop("digest")
    from medsilo.secure.keys import Party

    fake = seal(statement, forged.body, Party("server", federation.root).signing_key()).to_array()
    with pytest.raises(ReleaseRefused, match="hospital-4: signature does not verify"):
        sites["hospital-1"].release(1, {**wires, "hospital-4": fake})
    # and a wire altered after signing (another ciphertext under hospital-2's statement)
    altered = Wire.from_bytes(wires["hospital-2"])
    other = Wire.from_bytes(wires["hospital-3"])
    tampered = Wire(altered.statement, altered.signature, other.body).to_array()
    with pytest.raises(ReleaseRefused, match="hospital-2: the body does not match the digest it signed"):
        sites["hospital-1"].release(1, {**wires, "hospital-2": tampered})
    assert server is not None and _events(federation, "hospital-1", "aggregate_release") == []


def test_release_tasks_are_refused_for_algorithms_that_learn_nothing_on_the_server(federation):
    terms = federation.terms("ckks", releases=False)  # e.g. FedProto or FedAvg: the server only adds
    sites, wires = _round(federation, terms)
    with pytest.raises(ReleaseRefused, match="no aggregate of it is ever released"):
        sites["hospital-1"].release(1, dict(wires))
    # and a plaintext-mode site has no release at all
    plain = federation.site("hospital-1", federation.terms("none", job="job-9"))
    with pytest.raises(PipelineRefusal, match="privacy mode none has no aggregate release"):
        plain.release(1, dict(wires))


def test_uploads_of_another_job_or_round_do_not_count(federation):
    terms = federation.terms("ckks")
    sites, wires = _round(federation, terms)
    with pytest.raises(ReleaseRefused, match="says round 1, this release is for 2"):
        sites["hospital-1"].release(2, dict(wires))
    other = federation.terms("ckks", job="job-2")
    with pytest.raises(ReleaseRefused, match="says job 'job-1', this release is for 'job-2'"):
        federation.site("hospital-1", other).release(1, dict(wires))


def test_the_server_records_every_upload_and_the_sites_add_the_contributions_themselves(federation):
    from medsilo.components.algorithms import fedproto
    from medsilo.secure.ckks import encrypt
    from medsilo.secure.keys import Party
    from medsilo.secure.pipeline.ckks import CONTRIBUTIONS
    from medsilo.secure.upload import pack_wires, unpack_wires

    terms = federation.terms("ckks", releases=False, rounds=3)
    sites, wires = _round(federation, terms)
    server = federation.server(terms)
    replies = {s: {WIRE_PARAM: w} for s, w in wires.items()}
    payload = server.combine(1, list(SITES), replies, fedproto.Server(fedproto.Config(), 3, list(SITES)), None)
    received = [e for e in entries(federation.ledger("server")) if e["event"] == "received"]
    assert sorted(e["what"]["site"] for e in received) == list(SITES)
    forwarded = unpack_wires(payload[CONTRIBUTIONS])

    def sent(items):
        return {CONTRIBUTIONS: np.frombuffer(pack_wires(items), dtype=np.uint8)}

    # the server drops contributions to pass off a smaller sum …
    with pytest.raises(PipelineRefusal, match="holds 1 of the 4 announced participants; this job .* only with all"):
        sites["hospital-3"].open(2, sent(forwarded[1:2]), {})
    # … replaces hospital-3's own upload by another of hospital-3's (another job) …
    other = federation.site("hospital-3", federation.terms("ckks", job="job-2", releases=False))
    mine = other.protect(1, list(SITES), upload(5))[0].tobytes()
    with pytest.raises(PipelineRefusal, match="signed an upload for job job-2"):
        sites["hospital-3"].open(2, sent([*forwarded[:2], mine, forwarded[3]]), {})
    # … or encrypts a model of its choosing (it holds the public key) under a site's statement: the site adds
    # the contributions itself, so a ciphertext the server made cannot pass for one a site signed
    chosen = encrypt(Party("server", federation.root).he_context(),
                     {"proto_sum": torch.zeros(3, 4), "proto_count": torch.ones(3)}).to_bytes()  # fmt: skip
    genuine = Wire.from_bytes(forwarded[0])
    with pytest.raises(PipelineRefusal, match="hospital-1: the body does not match the digest it signed"):
        sites["hospital-3"].open(2, sent([Wire(genuine.statement, genuine.signature, chosen).to_bytes(),
                                          *forwarded[1:]]), {})  # fmt: skip
    # the genuine contributions: the site's own sum, decrypted once
    plain = sites["hospital-2"].open(2, payload, {})
    assert np.allclose(plain["proto_sum"], sum(upload(i)["proto_sum"] for i in range(4)), atol=1e-4)
    with pytest.raises(PipelineRefusal, match="the aggregate of round 1 of job job-1 was decrypted before"):
        sites["hospital-2"].open(2, payload, {})


def test_a_second_participant_set_within_a_job_is_refused_so_rounds_cannot_be_differenced(federation):
    # the server releases round 1 of {A, B, C, D} and would release round 2 of {B, C, D}: per-class counts do
    # not change between rounds, so the difference would be hospital-1's label histogram
    terms = federation.terms("ckks", rounds=3)
    sites, wires = _round(federation, terms)
    sites["hospital-1"].release(1, dict(wires))
    for site in SITES[1:]:
        with pytest.raises(PipelineRefusal, match="differs from the one this site signed in round 1"):
            sites[site].protect(2, list(SITES[1:]), upload(1))


def test_a_participant_set_with_invented_or_countless_names_is_refused_briefly(federation):
    terms = federation.terms("ckks")
    site = federation.site("hospital-1", terms)
    with pytest.raises(PipelineRefusal, match="names 2 site\\(s\\) this site holds no certificate for"):
        site.protect(1, ["ghost-1", "ghost-2", "hospital-1"], upload(0))  # padding its own min_contributors
    crowd = sorted([f"x{i:07d}" for i in range(50_000)] + ["hospital-1"])
    with pytest.raises(PipelineRefusal):
        site.protect(1, crowd, upload(0))
    assert max(len(line) for line in federation.ledger("hospital-1").read_bytes().splitlines()) < 4096


def test_under_ckks_a_site_takes_no_plaintext_model_for_an_algorithm_the_server_only_adds(federation):
    # a plaintext payload would let the server probe the site's evaluation with models of its choosing
    site = federation.site("hospital-1", federation.terms("ckks", releases=False))
    with pytest.raises(PipelineRefusal, match="never holds a plaintext payload"):
        site.open(2, {"w.head.weight": np.zeros((2, 8), np.float32)}, {})
    # with server-side learning the payload is the server's plaintext output: accepted
    releasing = federation.site("hospital-1", federation.terms("ckks", job="job-2", releases=True))
    assert set(releasing.open(2, {"global_protos": np.zeros((3, 4), np.float32)}, {})) == {"global_protos"}


def test_the_server_records_the_good_uploads_of_a_round_it_refuses(federation):
    from medsilo.components.algorithms import fedproto

    terms = federation.terms("none", releases=False)
    sites, wires = _round(federation, terms)
    server = federation.server(terms)
    replies = {s: {WIRE_PARAM: w} for s, w in wires.items()}
    replies["hospital-4"] = {"proto_sum": np.zeros((3, 4), np.float32)}  # one site's reply is unprotected
    with pytest.raises(PipelineRefusal, match="hospital-4: its reply is not one protected upload"):
        server.combine(1, list(SITES), replies, fedproto.Server(fedproto.Config(), 3, list(SITES)), None)
    received = [e["what"]["site"] for e in entries(federation.ledger("server")) if e["event"] == "received"]
    assert received == list(SITES[:3])  # the others' uploads, which the server holds, are anchored


def test_a_release_request_cannot_bloat_the_ledger_with_names_of_its_choosing(federation):
    from medsilo.secure.upload import Statement

    terms = federation.terms("ckks")
    sites, wires = _round(federation, terms)
    forged = Wire.from_bytes(wires["hospital-2"])
    huge = Statement(**{**forged.statement.to_json(), "site": "x" * 100_000,
                        "participants": tuple(forged.statement.participants)})  # fmt: skip
    key = Party("hospital-2", federation.root).signing_key()
    bad = Wire(huge, key.sign(huge.message()), forged.body).to_bytes()
    with pytest.raises(ReleaseRefused, match="site and job must be plain names"):
        sites["hospital-1"].release(1, {**wires, "hospital-2": bad})
    assert max(len(line) for line in federation.ledger("hospital-1").read_bytes().splitlines()) < 4096



def _sent(wires) -> dict[str, np.ndarray]:
    from medsilo.secure.pipeline.ckks import CONTRIBUTIONS
    from medsilo.secure.upload import pack_wires

    return {CONTRIBUTIONS: np.frombuffer(pack_wires([bytes(w) for w in wires]), dtype=np.uint8)}


def test_two_sites_cannot_be_handed_two_subsets_of_one_round_unless_the_job_allows_failures(federation):
    """Site 1 opens the whole round, site 2 the round without hospital-4: the two sums differ by exactly
    hospital-4's upload. Without ``reliability.min_sites`` a round completes only with every participant."""
    from dataclasses import replace

    terms = federation.terms("ckks", releases=False, rounds=3)
    sites, wires = _round(federation, terms)
    sites["hospital-1"].open(2, _sent(wires.values()), {})
    with pytest.raises(PipelineRefusal, match="holds 3 of the 4 announced participants"):
        sites["hospital-2"].open(2, _sent([wires[s] for s in SITES[:3]]), {})
    # a job that tolerates failures says how many may be missing, and a site holds the server to it
    tolerant = replace(terms, job="job-2", min_sites=3)
    sites, wires = _round(federation, tolerant)
    assert sorted(sites["hospital-2"].open(2, _sent([wires[s] for s in SITES[:3]]), {})) == ["proto_count", "proto_sum"]
    with pytest.raises(PipelineRefusal, match="holds 2 contributors, need ≥ 3"):
        sites["hospital-3"].open(2, _sent([wires[s] for s in SITES[:2]]), {})


def test_a_resume_cannot_reopen_a_round_with_another_set_of_contributors(federation):
    """Job A decrypts round 1 over four contributors and uploads round 2; the server then resumes A as B 'after
    round 1' and has B open A's round 1 again without hospital-4 — the difference would be hospital-4's
    upload. The site opens A's round 1 again only as the very same sum, and job A, once resumed, nothing."""
    from dataclasses import replace

    # min_sites 3: a job that tolerates one failure, where a 3-site sum of a round is a valid sum in itself
    a = replace(federation.terms("ckks", job="job-A", releases=False, rounds=3), spec_digest="d" * 64, min_sites=3)
    b = replace(a, job="job-B")
    sites = {s: federation.site(s, a) for s in SITES}
    for site in sites.values():
        site.start(None)
    round1 = {s: sites[s].protect(1, list(SITES), upload(i))[0] for i, s in enumerate(SITES)}
    round2 = {s: sites[s].protect(2, list(SITES), upload(10 + i))[0] for i, s in enumerate(SITES)}
    target = sites["hospital-1"]
    full = target.open(2, _sent(round1.values()), {})
    resumed = federation.site("hospital-1", b)
    resumed.start(None, {"job": "job-A", "round": 1})
    before = len(_events(federation, "hospital-1", "decrypt"))
    with pytest.raises(PipelineRefusal, match="the aggregate of round 1 of job job-A was decrypted before"):
        resumed.open(2, _sent([round1[s] for s in SITES[:3]]), {})
    again = resumed.open(2, _sent(round1.values()), {})  # the same sum as job A opened: nothing new
    assert all(np.array_equal(again[k], full[k]) for k in full)
    # job A is superseded: its own site half neither decrypts nor reports figures any more
    with pytest.raises(PipelineRefusal, match="job job-A was resumed as job job-B .*; it decrypts nothing more"):
        target.open(3, _sent(round2.values()), {})
    with pytest.raises(PipelineRefusal, match="job job-A was resumed as job job-B .*; its figures are not sent"):
        target.record_metrics(3, "evaluate", {"test": {"acc": 0.5}})
    assert len(_events(federation, "hospital-1", "decrypt")) == before + 1  # only the identical re-open
