"""The CKKS NVFlare filters on real FedProto uploads: encrypt at the sites, add blind, decrypt at the sites."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from medsilo.components.algorithms import fedproto
from medsilo.config import JobSpec
from medsilo.config.site import PrivacyPolicy
from medsilo.secure import keys
from medsilo.secure.ckks import CKKSError, add, decrypt
from medsilo.secure.filters import CKKS_PARAM, FILTER_ERROR, CKKSDecryptor, CKKSEncryptor
from medsilo.secure.guard import LEDGER_DIR_ENV, SiteGuard, ensure_simulation_pki
from medsilo.secure.ledger import entries, verify
from medsilo.secure.release import Contribution, verify_contribution
from medsilo.tests.helpers import aggregate, tiny_setup

SITES = ("hospital-1", "hospital-2")


@pytest.fixture
def he_dir(tmp_path, monkeypatch):
    out = keys.generate_simulation_keys(tmp_path / "he_keys", SITES)
    monkeypatch.setenv(keys.HE_DIR_ENV, str(out))
    ensure_simulation_pki(tmp_path / "ledgers", SITES)
    monkeypatch.setenv(LEDGER_DIR_ENV, str(tmp_path / "ledgers"))
    return out


def _ctx(site: str) -> FLContext:
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    ctx.set_prop(ReservedKey.RUN_NUM, "job-1", private=False, sticky=False)
    return ctx


def _shareable(params: dict, meta: dict):
    return FLModelUtils.to_shareable(FLModel(params=params, params_type=ParamsType.FULL, meta=meta))


def _params(shareable) -> dict:
    return FLModelUtils.from_shareable(shareable).params


def _prepared(site: str, rnd: int, params: dict) -> dict:
    """What the executor does before the filter runs: hold the upload's ledger entry."""
    spec = JobSpec(name="t", modality="cxr", classes=["a", "b", "c"], dataset="cxr", image_size=16, model="cnn",
                   algorithm={"name": "fedproto"}, training={"rounds": 3}, privacy={"mode": "ckks"})  # fmt: skip
    SiteGuard(site, ".", "job-1", spec, PrivacyPolicy()).record_upload(rnd, params)
    return params


def _uploads():
    clients = [fedproto.Client(tiny_setup(s, n=12, seed=i, num_classes=3, labels=[0, 2] if i else None),
                               fedproto.Config()) for i, s in enumerate(SITES)]  # fmt: skip
    return clients, {s: c.train(1).sums for s, c in zip(SITES, clients)}


def test_encrypted_round_matches_plaintext_and_the_server_cannot_decrypt(he_dir):
    # Prepare: two FedProto sites (one never saw class 1) after a local round
    clients, sums = _uploads()
    # Execute: site result filters, blind server sum, site task-data filter
    sent = {}
    for site in SITES:
        params = _prepared(site, 1, {k: v.numpy() for k, v in sums[site].items()})
        out = CKKSEncryptor().process(_shareable(params, {"round": 1, "n_train": 12, "train_loss": 0.5}), _ctx(site))
        model = FLModelUtils.from_shareable(out)
        assert set(model.params) == {CKKS_PARAM} and model.params[CKKS_PARAM].dtype == np.uint8
        assert model.meta["ckks"] is True and "n_train" not in model.meta and model.meta["train_loss"] == 0.5
        sent[site] = Contribution.from_bytes(model.params[CKKS_PARAM])
    server_ctx = keys.server_context(".")
    total = add(server_ctx, [c.upload for c in sent.values()], labels=list(sent))
    with pytest.raises(CKKSError, match="holds no secret key"):
        decrypt(server_ctx, total)
    received = CKKSDecryptor().process(_shareable({CKKS_PARAM: total.to_array()}, {"round": 2}), _ctx(SITES[0]))
    # Assert: the decrypted aggregate is the plaintext sum, and the sites deploy the same model either way
    plain = aggregate(list(sums.values()))
    got = _params(received)
    for name in plain:
        np.testing.assert_allclose(got[name], plain[name].numpy(), atol=1e-6)
    x = clients[0].setup.data.test.images
    clients[0].receive(plain, 2)
    expected = clients[0].scores(x)
    clients[0].receive({k: torch.as_tensor(v) for k, v in got.items()}, 2)
    torch.testing.assert_close(clients[0].scores(x), expected, atol=1e-6, rtol=0)
    # the site's ledger records the upload (digest of the exact bytes sent) and the decryption (the
    # aggregate's digest), never values
    ledger = he_dir.parent / "ledgers" / SITES[0] / "privacy_ledger.jsonl"
    release, entry = entries(ledger)
    assert release["event"] == "release" and release["what"]["encrypted"] and release["round"] == 1
    assert release["what"]["sha256"] == hashlib.sha256(sent[SITES[0]].to_bytes()).hexdigest()
    assert release["what"]["plaintext_bytes"] < release["what"]["bytes"]
    assert entry["event"] == "decrypt" and entry["what"]["digest"] == total.digest() and entry["job"] == "job-1"
    assert verify([ledger], root_ca=he_dir.parent / "ledgers" / "pki" / "rootCA.pem") == []


def test_contributions_are_signed_by_their_site_for_this_round(he_dir):
    _, sums = _uploads()
    params = _prepared(SITES[1], 3, {k: v.numpy() for k, v in sums[SITES[1]].items()})
    out = CKKSEncryptor().process(_shareable(params, {"round": 3}), _ctx(SITES[1]))
    contribution = Contribution.from_bytes(_params(out)[CKKS_PARAM])
    assert contribution.site == SITES[1] and contribution.tag == "job-1/round-3"
    public = keys.peer_public_keys(".")
    verify_contribution(contribution, public[SITES[1]])
    with pytest.raises(CKKSError):
        verify_contribution(contribution, public[SITES[0]])  # another site's key does not verify it


def test_error_replies_and_plaintext_payloads_pass_through(he_dir):
    failed = _shareable({}, {"error": "site hospital-1: no dataset"})
    assert FLModelUtils.from_shareable(CKKSEncryptor().process(failed, _ctx(SITES[0]))).meta["error"]
    released = {"global_protos": np.ones((3, 4), np.float32)}
    out = CKKSDecryptor().process(_shareable(released, {"round": 2}), _ctx(SITES[0]))
    np.testing.assert_array_equal(_params(out)["global_protos"], released["global_protos"])


def test_aggregate_under_a_foreign_key_set_is_reported_not_used(he_dir, tmp_path):
    _, sums = _uploads()
    from medsilo.secure.ckks import encrypt, make_context

    foreign = encrypt(make_context(), sums[SITES[0]])
    out = CKKSDecryptor().process(_shareable({CKKS_PARAM: foreign.to_array()}, {"round": 2}), _ctx(SITES[0]))
    model = FLModelUtils.from_shareable(out)
    assert model.params == {}
    assert "different key set" in model.meta[FILTER_ERROR] and model.meta[FILTER_ERROR].startswith("site hospital-1")


def test_missing_site_key_fails_closed_naming_the_file(he_dir):
    (he_dir / SITES[0] / keys.CLIENT_CONTEXT).unlink()
    params = {"proto_sum": np.ones((3, 4), np.float32)}
    out = FLModelUtils.from_shareable(CKKSEncryptor().process(_shareable(params, {"round": 1}), _ctx(SITES[0])))
    assert out.params == {}  # nothing of the upload leaves in plaintext
    assert "cannot encrypt" in out.meta["error"] and keys.CLIENT_CONTEXT in out.meta["error"]


def test_an_upload_the_ledger_would_not_show_is_not_sent(he_dir):
    params = {"proto_sum": np.ones((3, 4), np.float32)}
    out = FLModelUtils.from_shareable(CKKSEncryptor().process(_shareable(params, {"round": 2}), _ctx(SITES[0])))
    assert out.params == {} and "no privacy-ledger entry was prepared for job job-1 round 2" in out.meta["error"]


def test_site_scope_filters_act_only_on_their_tasks(he_dir):
    # a site's privacy.json scope applies its filters to every task: limited to train, the encryptor
    # leaves the evaluate reply and the plaintext aggregate a release returns as they are
    params = {"sum": np.ones((2, 3), np.float32)}
    for task, encrypted in (("evaluate", False), ("release", False), ("train", True)):
        ctx = _ctx("hospital-1")
        ctx.set_prop(FLContextKey.TASK_NAME, task, private=True, sticky=False)
        if encrypted:
            _prepared("hospital-1", 1, params)
        out = _params(CKKSEncryptor(tasks=["train"]).process(_shareable(params, {"round": 1}), ctx))
        assert (CKKS_PARAM in out) is encrypted
    ctx = _ctx("hospital-1")
    ctx.set_prop(FLContextKey.TASK_NAME, "release", private=True, sticky=False)
    request = {CKKS_PARAM: np.zeros(4, np.uint8)}  # would fail to parse if the decryptor touched it
    assert CKKS_PARAM in _params(CKKSDecryptor(tasks=["train", "evaluate"]).process(_shareable(request, {}), ctx))
