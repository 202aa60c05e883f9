"""The privacy pipeline of each mode on real FedProto uploads: what leaves a site, what the server accepts and
records, what a site decrypts — and the site-scope filter that lets nothing else out."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from medsilo.components.algorithms import fedproto
from medsilo.config.common import PRIVACY_STRENGTH
from medsilo.config.job import DPSpec
from medsilo.config.site import Budget, PrivacyPolicy
from medsilo.secure.ckks import CKKSError, EncryptedUpload, decrypt
from medsilo.secure.dp import BudgetExceeded, GaussianEvent, gaussian_epsilon
from medsilo.secure.filters import ProtectedOnly
from medsilo.secure.keys import (
    CLIENT_CONTEXT,
    HE_DIR_ENV,
    LEDGER_DIR_ENV,
    SERVER,
    Party,
    ensure_simulation_pki,
    generate_simulation_contexts,
)
from medsilo.secure.ledger import LEDGER_FILE, entries, verify
from medsilo.secure.pipeline import pipeline_module
from medsilo.secure.pipeline.base import JobTerms, PipelineRefusal
from medsilo.secure.pipeline.ckks import CONTRIBUTIONS
from medsilo.secure.upload import WIRE_PARAM, Wire, pack_wires, seal, unpack_arrays, unpack_wires
from tests.helpers import aggregate, tiny_setup

SITES = ("hospital-1", "hospital-2")
EVENT = GaussianEvent(noise_multiplier=2.0)
DP = DPSpec(noise_multiplier=2.0, clip=1.0)


@pytest.fixture
def root(tmp_path, monkeypatch):
    ensure_simulation_pki(tmp_path / "ledgers", SITES)
    generate_simulation_contexts(tmp_path / "he", SITES)
    monkeypatch.setenv(LEDGER_DIR_ENV, str(tmp_path / "ledgers"))
    monkeypatch.setenv(HE_DIR_ENV, str(tmp_path / "he"))
    return tmp_path


def _terms(mode: str, job: str = "job-1", rounds: int = 2) -> JobTerms:
    return JobTerms(job=job, mode=mode, rounds=rounds, min_contributors=2, dp=DP if "dp" in PRIVACY_STRENGTH[mode] else None)


def _site(root, name: str, terms: JobTerms, policy: PrivacyPolicy | None = None):
    return pipeline_module(terms.mode).Site(Party(name, root), terms, policy or PrivacyPolicy())


def _uploads():
    clients = [fedproto.Client(tiny_setup(s, n=12, seed=i, num_classes=3, labels=[0, 2] if i else None),
                               fedproto.Config()) for i, s in enumerate(SITES)]  # fmt: skip
    return clients, {s: {k: v.numpy() for k, v in c.train(1).sums.items()} for s, c in zip(SITES, clients)}


def _ledger(root, party: str):
    return root / "ledgers" / party / LEDGER_FILE


def test_an_encrypted_round_matches_plaintext_and_the_server_cannot_decrypt(root):
    # Prepare: two FedProto sites (one never saw class 1) after a local round
    clients, sums = _uploads()
    terms = _terms("ckks")
    sites = {s: _site(root, s, terms) for s in SITES}
    server = pipeline_module("ckks").Server(Party(SERVER, root), terms)
    # Execute: each site protects its upload; the server adds blind; a site opens the sum
    wires = {s: sites[s].protect(1, list(SITES), sums[s])[0] for s in SITES}
    for s, wire in wires.items():
        statement = Wire.from_bytes(wire).statement
        assert (statement.site, statement.round, statement.body, statement.participants) == (s, 1, "ckks", SITES)
    payload = server.combine(1, list(SITES), {s: {WIRE_PARAM: w} for s, w in wires.items()},
                             fedproto.Server(fedproto.Config(), 3, list(SITES)), None)  # fmt: skip
    forwarded = [Wire.from_bytes(w) for w in unpack_wires(payload[CONTRIBUTIONS])]
    assert [w.statement.site for w in forwarded] == list(SITES)  # every contributor's own signed wire
    with pytest.raises(CKKSError, match="holds no secret key"):
        decrypt(Party(SERVER, root).he_context(), EncryptedUpload.from_bytes(forwarded[0].body))
    got = sites[SITES[0]].open(2, payload, {})
    # Assert: the decrypted aggregate is the plaintext sum; the sites deploy the same model either way
    plain = aggregate([{k: torch.as_tensor(v) for k, v in u.items()} for u in sums.values()])
    for name in plain:
        np.testing.assert_allclose(got[name], plain[name].numpy(), atol=1e-6)
    x = clients[0].setup.data.test.images
    clients[0].receive(plain, 2)
    expected = clients[0].scores(x)
    clients[0].receive({k: torch.as_tensor(v) for k, v in got.items()}, 2)
    torch.testing.assert_close(clients[0].scores(x), expected, atol=1e-6, rtol=0)
    # the site's ledger: the upload (digest of the exact bytes sent, of the plaintext too) and the decryption
    ledger = _ledger(root, SITES[0])
    release, decrypted = entries(ledger)
    assert release["event"] == "release" and release["what"]["encrypted"] and release["round"] == 1
    assert release["what"]["sha256"] == hashlib.sha256(wires[SITES[0]].tobytes()).hexdigest()
    assert release["what"]["plaintext_bytes"] < release["what"]["bytes"]
    assert release["what"]["ledger_head"] == {"seq": -1, "hash": "0" * 64}
    assert decrypted["event"] == "decrypt" and decrypted["what"]["contributors"] == list(SITES)
    # the server's ledger: every upload it received, with the site's signed statement
    received = [e for e in entries(_ledger(root, SERVER)) if e["event"] == "received"]
    assert [e["what"]["site"] for e in received] == list(SITES)
    assert received[0]["what"]["statement"]["digest"] == release["what"]["body_sha256"]
    assert verify([ledger, _ledger(root, SERVER)], root_ca=root / "ledgers" / "pki" / "rootCA.pem") == []


def test_plaintext_uploads_are_signed_and_ledgered_without_privacy_cost(root):
    _, sums = _uploads()
    site = _site(root, SITES[0], _terms("none"))
    site.admit([])  # no DP: nothing to charge, nothing refused
    assert site.noise(1, []) is None
    wire, spent = site.protect(1, list(SITES), sums[SITES[0]])
    assert spent is None
    body = unpack_arrays(Wire.from_bytes(wire).body)
    assert all(np.array_equal(body[k], v) for k, v in sums[SITES[0]].items())
    (entry,) = entries(_ledger(root, SITES[0]))
    assert entry["privacy"] is None and entry["what"]["encrypted"] is False
    assert [t["name"] for t in entry["what"]["tensors"]] == ["proto_count", "proto_sum"]


def test_dp_uploads_are_charged_and_the_next_job_that_does_not_fit_is_refused(root):
    policy = PrivacyPolicy(budget=Budget(epsilon=4.0, delta=1e-5))
    site = _site(root, SITES[0], _terms("dp"), policy)
    site.start(None)
    site.admit([EVENT])
    spent = [site.protect(rnd, list(SITES), {"s": np.ones(3, np.float32)}, [EVENT])[1] for rnd in (1, 2)]
    # the site reports the job's ε so far, as dp_accounting composes σ = 2 over 1 and 2 rounds
    assert [s["epsilon"] for s in spent] == [pytest.approx(gaussian_epsilon(2.0, n, 1e-5)) for n in (1, 2)]
    policy_entry, *releases = entries(_ledger(root, SITES[0]))
    assert policy_entry["event"] == "policy_loaded" and policy_entry["what"]["policy"]["budget"]["epsilon"] == 4.0
    assert [r["privacy"]["cumulative_epsilon"] for r in releases] == [s["epsilon"] for s in spent]
    assert releases[0]["privacy"]["events"] == [EVENT.to_json()]
    # a new process (another job) re-derives the total from the ledger: 4 rounds of σ = 2 exceed ε = 4
    later = _site(root, SITES[0], _terms("dp", job="job-2"), policy)
    with pytest.raises(BudgetExceeded, match="ε"):
        later.admit([EVENT])
    refusal = entries(_ledger(root, SITES[0]))[-1]
    assert refusal["event"] == "refusal" and refusal["job"] == "job-2" and refusal["what"]["sent"] is False
    # the same job under another budget scope starts from zero
    _site(root, SITES[0], _terms("dp", job="job-3"), PrivacyPolicy(budget=Budget(epsilon=4.0, delta=1e-5,
                                                                                  scope="study-b"))).admit([EVENT])  # fmt: skip


def test_the_binding_charge_happens_when_the_upload_leaves(root):
    # cap ε = 4.5: σ = 2 costs ε ≈ 3.19, 4.01, 4.73 after 2, 3, 4 releases. Both jobs pass the early check
    # for their round, then the first one's releases leave first: the second's upload is refused at protect
    policy = PrivacyPolicy(budget=Budget(epsilon=4.5, delta=1e-5))
    first, second = (_site(root, SITES[0], _terms("dp", job=f"job-{i}", rounds=3), policy) for i in (1, 2))
    assert second.noise(1, [EVENT]) is not None and first.noise(1, [EVENT]) is not None
    for rnd in (1, 2, 3):
        first.protect(rnd, list(SITES), {"s": np.ones(3, np.float32)}, [EVENT])
    with pytest.raises(BudgetExceeded):
        second.protect(1, list(SITES), {"s": np.ones(3, np.float32)}, [EVENT])
    last = entries(_ledger(root, SITES[0]))[-1]
    assert last["event"] == "refusal" and last["job"] == "job-2"


def test_the_server_accepts_only_signed_uploads_for_this_round_and_participant_set(root):
    _, sums = _uploads()
    terms = _terms("none")
    server = pipeline_module("none").Server(Party(SERVER, root), terms)
    wire = _site(root, SITES[0], terms).protect(1, list(SITES), sums[SITES[0]])[0]
    algorithm = fedproto.Server(fedproto.Config(), 3, list(SITES))
    cases = [
        ({SITES[0]: {"proto_sum": sums[SITES[0]]["proto_sum"]}}, list(SITES), 1, "not one protected upload"),
        ({SITES[1]: {WIRE_PARAM: wire}}, list(SITES), 1, "is signed as 'hospital-1'"),
        ({SITES[0]: {WIRE_PARAM: wire}}, list(SITES), 2, "says round 1, expected 2"),
        ({SITES[0]: {WIRE_PARAM: wire}}, [SITES[0]], 1, "says participants"),
    ]
    for replies, participants, rnd, message in cases:
        with pytest.raises(PipelineRefusal, match=message):
            server.combine(rnd, participants, replies, algorithm, None)
    # a wire its sender validly signed is recorded (it anchors the site's ledger) even when it is not used;
    # the unsigned tensors and the wire presented as another site's are not
    received = [e for e in entries(_ledger(root, SERVER)) if e["event"] == "received"]
    assert [(e["round"], e["what"]["site"]) for e in received] == [(2, SITES[0]), (1, SITES[0])]


def test_a_missing_site_key_fails_closed_naming_the_file(root):
    (root / "he" / SITES[0] / CLIENT_CONTEXT).unlink()
    site = _site(root, SITES[0], _terms("ckks"))
    with pytest.raises(CKKSError, match=CLIENT_CONTEXT):
        site.protect(1, list(SITES), {"s": np.ones(3, np.float32)})
    assert entries(_ledger(root, SITES[0])) == []  # nothing left, nothing recorded as sent


def test_an_aggregate_under_a_foreign_key_set_is_refused(root):
    from medsilo.secure.ckks import encrypt, make_context

    _, sums = _uploads()
    terms = _terms("ckks")
    sites = {s: _site(root, s, terms) for s in SITES}
    wires = {s: sites[s].protect(1, list(SITES), sums[s])[0] for s in SITES}
    # hospital-2 signed a ciphertext under another key set: hospital-1 refuses to add it, naming the site
    foreign = encrypt(make_context(), {k: torch.as_tensor(v) for k, v in sums[SITES[1]].items()})
    theirs = Wire.from_bytes(wires[SITES[1]]).statement.to_json()
    theirs.pop("digest")
    bad = seal(theirs, foreign.to_bytes(), sites[SITES[1]].signing_key()).to_bytes()
    swapped = {CONTRIBUTIONS: np.frombuffer(pack_wires([wires[SITES[0]].tobytes(), bad]), np.uint8)}
    with pytest.raises(CKKSError, match="site hospital-2 was encrypted under a different key set"):
        sites[SITES[0]].open(2, swapped, {})


def _ctx(site: str) -> FLContext:
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    return ctx


def _result(params: dict, meta: dict | None = None):
    return FLModelUtils.to_shareable(FLModel(params=params, params_type=ParamsType.FULL, meta=meta or {"round": 1}))


def test_the_site_scope_filter_lets_out_only_uploads_protected_as_the_site_requires(root):
    _, sums = _uploads()
    encrypted = _site(root, SITES[0], _terms("ckks")).protect(1, list(SITES), sums[SITES[0]])[0]
    plain = _site(root, SITES[0], _terms("none", job="job-2")).protect(1, list(SITES), sums[SITES[0]])[0]
    require_ckks = ProtectedOnly(required_mode="ckks")
    passed = FLModelUtils.from_shareable(require_ckks.process(_result({WIRE_PARAM: encrypted}), _ctx(SITES[0])))
    assert set(passed.params) == {WIRE_PARAM}
    for params, message in (({WIRE_PARAM: plain}, "protected under privacy mode 'none'; this site requires 'ckks'"),
                            (sums[SITES[0]], "not one protected upload"),
                            ({WIRE_PARAM: np.zeros(8, np.uint8)}, "not a medsilo wire")):  # fmt: skip
        out = FLModelUtils.from_shareable(require_ckks.process(_result(params), _ctx(SITES[0])))
        assert out.params == {} and message in out.meta["error"]
    # signed by another site: stopped too; replies without tensors (evaluation, errors) pass
    other = FLModelUtils.from_shareable(ProtectedOnly().process(_result({WIRE_PARAM: plain}), _ctx(SITES[1])))
    assert other.params == {} and "signed as 'hospital-1'" in other.meta["error"]
    evaluation = FLModelUtils.from_shareable(ProtectedOnly().process(_result({}, {"eval": {}}), _ctx(SITES[1])))
    assert "error" not in evaluation.meta and evaluation.meta["eval"] == {}
    with pytest.raises(ValueError, match="required_mode"):
        ProtectedOnly(required_mode="ckks+")


def test_the_site_scope_filter_checks_every_kind_and_return_code(root):
    from nvflare.apis.dxo import DXO, DataKind
    from nvflare.apis.shareable import ReturnCode

    tensors = {"w": np.ones(3, np.float32)}
    for kind, message in ((DataKind.WEIGHT_DIFF, "not one protected upload"),
                          (DataKind.METRICS, "not one protected upload"), (DataKind.COLLECTION, "collection")):  # fmt: skip
        out = ProtectedOnly().process(DXO(kind, data=tensors).to_shareable(), _ctx(SITES[0]))
        assert message in FLModelUtils.from_shareable(out).meta["error"], kind
    failing = DXO(DataKind.WEIGHTS, data=tensors).to_shareable()
    failing.set_return_code(ReturnCode.EXECUTION_EXCEPTION)
    out = ProtectedOnly().process(failing, _ctx(SITES[0]))
    assert "an error reply carries tensors" in FLModelUtils.from_shareable(out).meta["error"]
