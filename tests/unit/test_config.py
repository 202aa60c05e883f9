"""Job spec, site config and sites.yml: valid files load; bad ones name file, field, value and fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medsilo.components.algorithms import ALGORITHMS, HTFL_ALGORITHMS
from medsilo.config import ConfigError, load_job_spec, load_site_config, load_sites_file
from medsilo.config.job import JobSpec
from medsilo.config.loading import validate
from medsilo.medical.models import BACKBONES

JOBS = Path(__file__).resolve().parents[2] / "jobs"

MINIMAL_JOB = {
    "name": "t",
    "modality": "cxr",
    "classes": ["normal", "pneumonia"],
    "dataset": "cxr",
    "algorithm": {"name": "fedavg"},
}


def _yaml(tmp_path: Path, data, name: str = "f.yml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("spec", sorted(JOBS.glob("*.yml")), ids=lambda p: p.name)
def test_ready_made_job_specs_are_valid(spec):
    job = load_job_spec(spec)
    assert job.algorithm.name in ALGORITHMS
    backbones = set(job.model.values()) if job.heterogeneous else {job.model}
    assert backbones <= set(BACKBONES)
    if job.heterogeneous:
        assert len(backbones) >= 3 and job.algorithm.name in HTFL_ALGORITHMS  # really heterogeneous


def test_defaults_and_normalisation():
    job = validate({**MINIMAL_JOB, "algorithm": {"name": "FedAvg"}}, JobSpec, "j.yml")
    assert job.algorithm.name == "fedavg"
    assert job.training.rounds == 10 and job.privacy.mode == "none" and job.image_size == 64
    assert not job.heterogeneous and job.backbone_for("any-site") == "cnn"


def test_heterogeneous_model_map():
    data = {**MINIMAL_JOB, "model": {"hospital-1": "cnn", "hospital-2": "resnet18"}, "algorithm": {"name": "local"}}
    job = validate(data, JobSpec, "j.yml")
    assert job.heterogeneous
    assert job.backbone_for("hospital-2") == "resnet18"
    with pytest.raises(KeyError, match="no backbone given for site 'hospital-9'"):
        job.backbone_for("hospital-9")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"training": {"rounds": -3}}, r"training\.rounds: must be greater than or equal to 1, got -3"),
        ({"training": {"rounds": 10**7}}, r"training\.rounds: must be less than or equal to 10000, got 10000000"),
        ({"algorithm": {"name": "fedavgg"}}, r"algorithm\.name: unknown algorithm; did you mean 'fedavg'\?"),
        ({"modality": "ct"}, r"modality: must be 'cxr', 'pathology' or 'image', got 'ct'"),
        ({"privacy": {"mode": "ckk"}}, r"privacy\.mode: must be 'none', 'dp', 'ckks' or 'ckks\+dp', got 'ckk'"),
        ({"privacy": {"mode": "dp"}}, r"privacy: mode 'dp' needs a 'dp' section"),
        ({"privacy": {"mode": "dp", "dp": {"noise_multiplier": 1.0, "clip": 0}}},
         r"privacy\.dp\.clip: must be greater than 0, got 0"),
        ({"classes": ["normal"]}, r"classes: list should have at least 2 items"),
        ({"classes": ["a", "b", "a"]}, r"classes: class names must be unique; repeated: a"),
        ({"model": "resnet-18"}, r"model: unknown backbone; did you mean 'resnet18'\?"),
        ({"model": {"hospital-1": "vit"}}, r"model: site 'hospital-1': unknown backbone"),
        ({"trainning": {}}, r"trainning: unknown field; did you mean 'training'\? \(allowed: name, modality"),
        ({"training": {"epochs": 2}}, r"training\.epochs: unknown field; .*allowed: rounds, local_epochs"),
        ({"augmentation": {"pcevolve": {"sites": [], "epsilon": 1}}}, r"augmentation\.pcevolve\.sites: list should have at least 1 item"),
        ({"training": {"augmentation": "defualt"}}, r"training\.augmentation: must be 'default' or 'none', got 'defualt'$"),
        ({"training": {"augmentation": [{"transform": "RandFlp"}]}},
         r"training\.augmentation\.0: unknown transform 'RandFlp'; did you mean 'RandFlip'\? choose from RandAffine, "),
        ({"training": {"augmentation": [{"transform": "RandFlip"}, {"transform": "RandAffine", "rotate": 1}]}},
         r"training\.augmentation\.1\.rotate: unknown field; did you mean 'rotate_range'\? \(allowed: prob, transform"),
        ({"training": {"augmentation": [{"transform": "RandFlip", "prob": 1.5}]}},
         r"training\.augmentation\.0\.prob: must be less than or equal to 1, got 1\.5$"),
        ({"training": {"augmentation": [{"transform": "RandHEDJitter"}]}},
         r"training\.augmentation: RandHEDJitter needs RGB images, but this job's images have 1 channel"),
        ({"training": {"augmentation": ["RandFlip"]}}, r"training\.augmentation\.0: must be a mapping such as"),
        ({"classes": [0.5, 1.5]}, r"classes: class names are text; quote 0\.5 in the YAML"),
        ({"channels": 3}, r"channels: cxr images have 1 channel\(s\)"),
    ],
)  # fmt: skip
def test_bad_job_specs_name_the_field(tmp_path, change, match):
    path = _yaml(tmp_path, {**MINIMAL_JOB, **change}, "job.yml")
    with pytest.raises(ConfigError, match=match) as info:
        load_job_spec(path)
    assert str(info.value).startswith(f"{path}: ")


def test_missing_required_field(tmp_path):
    data = {k: v for k, v in MINIMAL_JOB.items() if k != "dataset"}
    with pytest.raises(ConfigError, match=r"dataset: required field is missing"):
        load_job_spec(_yaml(tmp_path, data))


@pytest.mark.parametrize(
    "text, match",
    [
        ("name: [unclosed\n", r"line 2, column 1: not valid YAML"),
        ("- a\n- b\n", r"expected a mapping of fields at the top level, got list"),
        ("", r"expected a mapping of fields at the top level, got NoneType"),
    ],
)
def test_malformed_yaml(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_job_spec(_yaml(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yml: file not found"):
        load_job_spec(tmp_path / "nope.yml")


def test_site_config_resolves_relative_manifest_and_defaults(tmp_path):
    path = _yaml(tmp_path, {"site": "hospital-1", "datasets": {"cxr": {"manifest": "data/m.csv", "modality": "cxr"}}})
    cfg = load_site_config(path)
    assert cfg.datasets["cxr"].manifest == tmp_path / "data" / "m.csv"
    assert cfg.privacy.required_mode == "none" and cfg.privacy.min_contributors == 2
    assert cfg.data.max_unreadable_fraction == 0.05 and not cfg.data.allow_identifiable_dicom


@pytest.mark.parametrize(
    "change, match",
    [
        ({"site": "hospital 1"}, r"site: string should match pattern"),
        ({"datasets": {}}, r"datasets: dictionary should have at least 1 item"),
        ({"datasets": {"cxr": {"manifst": "m.csv", "modality": "cxr"}}},
         r"datasets\.cxr\.manifst: unknown field; did you mean 'manifest'\? \(allowed: manifest, modality, slides, pacs\)"),
        ({"privacy": {"budget": {"epsilon": 0, "delta": 1e-5}}}, r"privacy\.budget\.epsilon: must be greater than 0, got 0"),
        ({"privacy": {"budget": {"epsilon": 1, "delta": 1.5}}}, r"privacy\.budget\.delta: must be less than 1, got 1\.5"),
        ({"privacy": {"min_contributors": 0}}, r"privacy\.min_contributors: must be greater than or equal to 1, got 0"),
        ({"data": {"max_unreadable_fraction": 1}}, r"data\.max_unreadable_fraction: must be less than 1, got 1"),
        ({"compute": {"device": "tpu"}}, r"compute\.device: must be 'cpu' or 'cuda', got 'tpu'"),
    ],
)  # fmt: skip
def test_bad_site_configs(tmp_path, change, match):
    base = {"site": "hospital-1", "datasets": {"cxr": {"manifest": "m.csv", "modality": "cxr"}}}
    with pytest.raises(ConfigError, match=match):
        load_site_config(_yaml(tmp_path, {**base, **change}))


def test_sites_file(tmp_path):
    path = _yaml(tmp_path, {"sites": {"h1": {"dataset": "cxr", "manifest": "h1/m.csv", "modality": "cxr"}}})
    sites = load_sites_file(path)
    assert sites.sites["h1"].manifest == tmp_path / "h1" / "m.csv"
    cfg = sites.site_configs()["h1"]
    assert cfg.site == "h1" and cfg.datasets["cxr"].modality == "cxr"


def test_sites_file_rejects_mixed_modalities(tmp_path):
    data = {"sites": {"a": {"dataset": "x", "manifest": "a.csv", "modality": "cxr"},
                      "b": {"dataset": "x", "manifest": "b.csv", "modality": "pathology"}}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"all sites must share one modality"):
        load_sites_file(_yaml(tmp_path, data))


def test_algorithm_params_are_checked_against_the_algorithm_config(tmp_path):
    data = {**MINIMAL_JOB, "algorithm": {"name": "local", "params": {"mu": 0.1}}}
    with pytest.raises(ConfigError, match=r"job\.yml: algorithm\.params\.mu: unknown field; this section takes no fields"):
        load_job_spec(_yaml(tmp_path, data, "job.yml"))


def test_weight_sharing_algorithm_refuses_mixed_backbones():
    data = {**MINIMAL_JOB, "model": {"hospital-1": "cnn", "hospital-2": "resnet18"}, "algorithm": {"name": "fedavg"}}
    with pytest.raises(ConfigError, match=r"j\.yml: .*sites run different backbones, but 'fedavg' shares backbone"):
        validate(data, JobSpec, "j.yml")
    same = validate({**data, "model": {"hospital-1": "cnn", "hospital-2": "cnn"}}, JobSpec, "j.yml")
    assert same.backbone_for("hospital-2") == "cnn"


def test_per_site_server_form_needs_privacy_mode_none():
    data = {**MINIMAL_JOB, "algorithm": {"name": "fedtgp", "params": {"form": "published"}},
            "privacy": {"mode": "ckks"}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"j\.yml: .*'fedtgp' .*form 'per-site'.*privacy mode 'ckks' forbids"):
        validate(data, JobSpec, "j.yml")
    ok = validate({**data, "algorithm": {"name": "fedtgp", "params": {"form": "aggregate"}}}, JobSpec, "j.yml")
    assert ok.privacy.mode == "ckks"


def test_dp_sgd_settings_default_to_the_release_noise_and_a_unit_gradient_bound():
    privacy = {"mode": "dp", "dp": {"noise_multiplier": 2.5, "clip": 0.5}}
    job = {**MINIMAL_JOB, "algorithm": {"name": "fedproto"}, "privacy": privacy}
    dp = validate(job, JobSpec, "j.yml").privacy.dp
    assert (dp.grad_clip, dp.sgd_noise_multiplier, dp.noise_multiplier) == (1.0, 2.5, 2.5)
    privacy["dp"] |= {"grad_clip": 0.2, "sgd_noise_multiplier": 1.1}
    dp = validate(job, JobSpec, "j.yml").privacy.dp
    assert (dp.grad_clip, dp.sgd_noise_multiplier, dp.noise_multiplier) == (0.2, 1.1, 2.5)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("grad_clip", 0, r"privacy\.dp\.grad_clip: must be greater than 0, got 0"),
        ("grad_clip", -1.5, r"privacy\.dp\.grad_clip: must be greater than 0, got -1\.5"),
        ("sgd_noise_multiplier", 0.0, r"privacy\.dp\.sgd_noise_multiplier: must be greater than 0, got 0\.0"),
        ("sgd_noise_multiplier", "x", r"privacy\.dp\.sgd_noise_multiplier: must be a valid number, .*got 'x'"),
    ],
)  # fmt: skip
def test_bad_dp_sgd_settings_name_the_field(field, value, match):
    privacy = {"mode": "dp", "dp": {"noise_multiplier": 1.0, "clip": 1.0, field: value}}
    with pytest.raises(ConfigError, match=match):
        validate({**MINIMAL_JOB, "algorithm": {"name": "fedproto"}, "privacy": privacy}, JobSpec, "j.yml")


def test_dp_modes_need_an_algorithm_with_a_private_form():
    dp = {"mode": "dp", "dp": {"noise_multiplier": 1.0, "clip": 1.0}}
    with pytest.raises(ConfigError, match=r"'fedrep' has no differentially private form.*with one: .*fedavg.*fedproto"):
        validate({**MINIMAL_JOB, "algorithm": {"name": "fedrep"}, "privacy": dp}, JobSpec, "j.yml")
    assert validate({**MINIMAL_JOB, "algorithm": {"name": "fedproto"}, "privacy": dp}, JobSpec, "j.yml").privacy.dp


def test_fedavg_dp_form_is_checked_and_dp_sgd_refuses_a_multilabel_job():
    dp = {"mode": "dp", "dp": {"noise_multiplier": 1.0, "clip": 1.0}}
    job = {**MINIMAL_JOB, "algorithm": {"name": "fedavg", "params": {"dp_form": "dp-sgd"}}, "privacy": dp}
    assert validate(job, JobSpec, "j.yml").algorithm.config().dp_form == "dp-sgd"
    with pytest.raises(ConfigError, match=r"j\.yml: algorithm\.params\.dp_form: .*'update' or 'dp-sgd'.*got 'sgd'"):
        validate({**job, "algorithm": {"name": "fedavg", "params": {"dp_form": "sgd"}}}, JobSpec, "j.yml")
    multilabel = {**job, "task": "multilabel", "labels": ["effusion", "nodule"]}
    multilabel.pop("classes")
    with pytest.raises(ConfigError, match=r"'fedavg' .*trains with DP-SGD.*single-label jobs only.*dp_form: update"):
        validate(multilabel, JobSpec, "j.yml")
    update = {**multilabel, "algorithm": {"name": "fedavg", "params": {"dp_form": "update"}}}
    assert validate(update, JobSpec, "j.yml").multilabel


def test_numeric_class_names_and_an_explicit_augmentation_list_are_accepted(tmp_path):
    change = {"modality": "image", "classes": [0, 1, 2], "channels": 1,
              "training": {"augmentation": [{"transform": "RandAffine", "rotate_range": 0.1},
                                            {"transform": "RandGaussianNoise", "std": 0.05}]}}  # fmt: skip
    job = load_job_spec(_yaml(tmp_path, {**MINIMAL_JOB, **change}, "job.yml"))
    assert job.classes == ["0", "1", "2"] and job.input_channels == 1
    assert [s.transform for s in job.augmentation_steps] == ["RandAffine", "RandGaussianNoise"]
    assert job.augmentation_steps[0].rotate_range == 0.1 and job.augmentation_steps[0].prob == 0.5


def test_default_augmentation_resolves_per_modality(tmp_path):
    cxr = load_job_spec(_yaml(tmp_path, MINIMAL_JOB, "job.yml"))
    assert [s.transform for s in cxr.augmentation_steps] == ["RandAffine", "RandAdjustContrast", "RandGaussianNoise"]
    image = load_job_spec(_yaml(tmp_path, {**MINIMAL_JOB, "modality": "image"}, "job.yml"))
    assert image.augmentation_steps == () and image.input_channels is None
