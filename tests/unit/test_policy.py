"""Site policy: a site refuses jobs it does not allow, naming its rule."""

from __future__ import annotations

import pytest

from medsilo.config import JobSpec, SiteConfig
from medsilo.secure.policy import PolicyRefusal, check_job

JOB = {"name": "j", "modality": "cxr", "classes": ["a", "b"], "dataset": "cxr", "algorithm": {"name": "fedavg"}}


def _site(**privacy) -> SiteConfig:
    return SiteConfig(site="h1", datasets={"cxr": {"manifest": "m.csv", "modality": "cxr"}}, privacy=privacy)


def test_allowed_job_passes():
    check_job(_site(allowed_algorithms=["FedAvg", "ditto"]), JobSpec(**JOB))


@pytest.mark.parametrize(
    "site, job, match",
    [
        (_site(), {**JOB, "dataset": "chest"}, r"site h1: job 'j' asks for dataset 'chest', which this site does not define \(it has: cxr\)"),
        (_site(), {**JOB, "modality": "pathology"}, r"dataset 'cxr' is cxr, but job 'j' is pathology"),
        (_site(allowed_algorithms=["ditto"]), JOB, r"algorithm 'fedavg' is not in this site's privacy.allowed_algorithms \(ditto\)"),
        (_site(required_mode="ckks"), JOB, r"uses privacy mode 'none', but this site requires 'ckks'"),
        (_site(required_mode="ckks+dp", budget={"epsilon": 8, "delta": 1e-5}), {**JOB, "privacy": {"mode": "ckks"}},
         r"requires 'ckks\+dp'"),
    ],
)  # fmt: skip
def test_refusals_name_the_rule(site, job, match):
    with pytest.raises(PolicyRefusal, match=match):
        check_job(site, JobSpec(**job))


def test_stronger_mode_than_required_is_accepted():
    check_job(_site(required_mode="none"), JobSpec(**{**JOB, "privacy": {"mode": "ckks"}}))


def test_stronger_dp_mode_than_required_is_accepted():
    dp = {"mode": "ckks+dp", "dp": {"noise_multiplier": 1.0, "clip": 1.0}}
    check_job(_site(required_mode="dp", budget={"epsilon": 8, "delta": 1e-5}), JobSpec(**{**JOB, "privacy": dp}))


@pytest.mark.parametrize("mode", ["dp", "ckks+dp"])
def test_a_site_requiring_dp_must_cap_its_budget(mode):
    """Without a cap, a job with noise_multiplier 1e-6 (ε ≈ 5e11 a round) would meet 'required_mode: dp'."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=f"required_mode '{mode.replace('+', '.')}' needs a budget"):
        _site(required_mode=mode)


def test_pcevolve_generator_must_be_allowed_by_the_site():
    remote = {**JOB, "augmentation": {"pcevolve": {"sites": ["h1"], "epsilon": 4, "generator": "https://gen.example"}}}
    with pytest.raises(PolicyRefusal, match=r"generator 'https://gen.example', which is not in privacy.pcevolve_generators \(procedural\)"):  # noqa: E501
        check_job(_site(), JobSpec(**remote))
    check_job(_site(pcevolve_generators=["procedural", "https://gen.example"]), JobSpec(**remote))
    other_site = {**remote, "augmentation": {"pcevolve": {**remote["augmentation"]["pcevolve"], "sites": ["h2"]}}}
    check_job(_site(), JobSpec(**other_site))  # h1 does not run PCEvolve in that job
