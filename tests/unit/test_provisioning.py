"""``medsilo provision`` and ``medsilo site check``: real NVFlare provisioning into a temporary folder."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml

from medsilo.cli import main
from medsilo.config import ConfigError
from medsilo.config.common import SERVER_COMPONENTS, SITE_COMPONENTS
from medsilo.config.site import SiteConfig
from medsilo.medical.data.check import check_dataset
from medsilo.medical.synth import SynthRequest, synthesize
from medsilo.provisioning.check import check_kit
from medsilo.provisioning.network import load_network
from medsilo.provisioning.provision import provision
from medsilo.secure.ckks import fingerprint, load_context
from medsilo.secure.custody import CUSTODY_FILE, Custody, write_custody
from medsilo.secure.ledger import LEDGER_FILE, Ledger
from tests.helpers import write_dicom

NETWORK = {
    "project": "test-net",
    "server": {"host": "localhost", "port": 18102},
    "hospitals": {"hospital-1": {"org": "hosp_one", "require": "ckks"}, "hospital-2": {"org": "hosp_two"}},
    "admins": [{"name": "admin@coord.org", "org": "coord", "role": "project_admin"},
               {"name": "lead@hosp-one.org", "org": "hosp_one", "role": "lead"}],
    "auditors": [{"name": "auditor@coord.org", "org": "coord"}],
}  # fmt: skip


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "network.yml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    root = tmp_path_factory.mktemp("provision")
    return provision(_write(root, NETWORK), root / "out")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hospitals": {"hospital-1": {"org": "st-mary"}}}, "hospitals.hospital-1.org"),
        ({"hospitals": {"hospital.1": {"org": "a"}}}, "hospitals"),
        ({"admins": [{"name": "viewer@coord.org", "org": "coord", "role": "member"}]}, "project_admin or lead"),
        ({"auditors": [{"name": "admin@coord.org", "org": "coord"}]}, "repeated: admin@coord.org"),
        ({"min_contributors": 3}, "min_contributors: 3 is more than the 2 hospitals"),
        ({"server": {"storage": "relative/path"}}, "server.storage"),
        ({"he": {"poly_modulus_degree": 1000}}, "he.poly_modulus_degree"),
    ],
)
def test_network_errors_name_the_file_and_field(tmp_path, change, message):
    path = _write(tmp_path, {**NETWORK, **change})
    with pytest.raises(ConfigError, match=message) as info:
        load_network(path)
    assert str(path) in str(info.value)


def test_kits_carry_medsilo_policy(kits):
    prod = kits.prod_dir
    assert {p.name for p in prod.iterdir()} == {"server", "hospital-1", "hospital-2", "admin@coord.org",
                                                "lead@hosp-one.org", "auditor@coord.org"}  # fmt: skip
    for party in ("server", "hospital-1", "hospital-2"):
        authz = json.loads((prod / party / "local" / "authorization.json").read_text())["permissions"]
        assert all(rights["byoc"] == "none" for rights in authz.values())  # no custom code for any role
        assert {k: v for k, v in authz["auditor"].items() if v != "none"} == {"view": "any"}
        resources = json.loads((prod / party / "local" / "resources.json").read_text())
        allowed = SERVER_COMPONENTS if party == "server" else SITE_COMPONENTS
        assert resources["class_allow_list"] == list(allowed) and resources["class_list_enforcement_mode"] == "enforce"
        assert resources["allow_log_streaming"] is (party == "server")  # a site's job logs stay at the site
    server = json.loads((prod / "server" / "local" / "resources.json").read_text())
    jobs = next(c for c in server["components"] if c["id"] == "job_manager")["args"]["uri_root"]
    assert jobs == str(prod / "server" / "storage" / "jobs")  # not the host-wide /tmp/nvflare
    # each site's own privacy scope lets out only uploads protected at least as the network requires of it
    for site, mode in (("hospital-1", "ckks"), ("hospital-2", "none")):
        scope = json.loads((prod / site / "local" / "privacy.json").read_text())["scopes"][0]
        assert scope["task_result_filters"] == [{"path": "medsilo.secure.filters.ProtectedOnly",
                                                 "args": {"required_mode": mode}}]  # fmt: skip
    # the site config template is valid YAML for this site, only its data path to fill in
    template = SiteConfig.model_validate(yaml.safe_load((prod / "hospital-1" / "local" / "medsilo_site.yml").read_text()))
    assert template.site == "hospital-1" and template.privacy.required_mode == "ckks"
    assert (kits.network.submitter().name, kits.admin().name) == ("admin@coord.org", "admin@coord.org")
    assert yaml.safe_load((prod.parent.parent / "project.yml").read_text())["name"] == "test-net"


def test_kits_hold_one_ckks_key_set_secret_only_at_sites(kits):
    prod = kits.prod_dir
    server = load_context(prod / "server" / "startup" / "server_context.tenseal", secret=False)
    sites = [load_context(prod / s / "startup" / "client_context.tenseal", secret=True) for s in ("hospital-1", "hospital-2")]
    assert not server.is_private() and all(s.is_private() for s in sites)
    assert len({fingerprint(c) for c in [server, *sites]}) == 1
    for site in ("hospital-1", "hospital-2"):
        startup = prod / site / "startup"
        for secret in ("client.key", "client_context.tenseal"):
            assert stat.S_IMODE((startup / secret).stat().st_mode) == 0o600
        peers = sorted(p.name for p in (startup / "peers").glob("*.crt"))
        assert peers == ["hospital-1.crt", "hospital-2.crt"]
        assert (startup / "peers" / f"{site}.crt").read_bytes() == (startup / "client.crt").read_bytes()
    # the server holds every site's certificate too, to check who signed each upload it records
    assert sorted(p.name for p in (prod / "server" / "startup" / "peers").glob("*.crt")) == ["hospital-1.crt",
                                                                                              "hospital-2.crt"]  # fmt: skip


def test_reprovisioning_keeps_the_root_ca(tmp_path):
    first = provision(_write(tmp_path, NETWORK), tmp_path / "out")
    again = provision(_write(tmp_path, NETWORK), tmp_path / "out")
    assert (first.prod_dir.name, again.prod_dir.name) == ("prod_00", "prod_01")
    assert first.root_ca.read_bytes() == again.root_ca.read_bytes()


# ---- site check --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("site-data")
    synthesize(out, SynthRequest("cxr", sites=1, images_per_site=16, seed=2), workers=1, progress=False)
    return out / "hospital-1" / "manifest.csv"


@pytest.fixture()
def site_kit(kits, dataset, tmp_path):
    """A copy of hospital-1's kit whose config points at a real dataset."""
    kit = tmp_path / "hospital-1"
    shutil.copytree(kits.site("hospital-1"), kit)
    config = yaml.safe_load((kit / "local" / "medsilo_site.yml").read_text())
    config["datasets"]["cxr"]["manifest"] = str(dataset)
    (kit / "local" / "medsilo_site.yml").write_text(yaml.safe_dump(config))
    return kit


def _rows(kit: Path) -> dict[str, tuple[str, str]]:
    return {r.name: (r.status, r.detail) for r in check_kit(kit, datasets=check_dataset, progress=False)}


def test_check_passes_a_good_kit(site_kit, capsys):
    rows = _rows(site_kit)
    assert [name for name in rows] == ["kit", "key custody", "site config", "dataset cxr", "de-identification cxr",
                                       "HE context", "ledger", "budget", "software"]  # fmt: skip
    # a kit from `medsilo provision --network` is the trusting central mode: a warning, not a failure
    assert rows.pop("key custody")[0] == "warn"
    assert all(status == "ok" for status, _ in rows.values()), rows
    assert "train: normal" in rows["dataset cxr"][1]
    assert main(["site", "check", "--kit", str(site_kit), "--quiet"]) == 0
    assert "all checks passed (with warnings)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("record", "status", "words"),
    [
        (None, "warn", "no record"),
        (Custody("central", "central", "central", None, 1), "warn", "trusting central mode"),
        (Custody("sites", "made-here", "wrapped", "hospital-2", 3), "ok", "received wrapped from hospital-2"),
        ("not json", "fail", "not readable JSON"),
    ],
)
def test_check_reports_key_custody(site_kit, record, status, words):
    path = site_kit / CUSTODY_FILE
    path.unlink(missing_ok=True)
    if isinstance(record, Custody):
        write_custody(site_kit, record)
    elif record is not None:
        path.write_text(record)
    got, detail = _rows(site_kit)["key custody"]
    assert (got, words in detail) == (status, True), detail


def test_check_catches_a_wrong_data_path(site_kit, capsys):
    path = site_kit / "local" / "medsilo_site.yml"
    path.write_text(path.read_text().replace("manifest.csv", "manifest-missing.csv"))
    status, detail = _rows(site_kit)["dataset cxr"]
    assert status == "fail" and "manifest-missing.csv: manifest not found" in detail
    assert main(["site", "check", "--kit", str(site_kit), "--quiet"]) == 1
    assert "check(s) failed: dataset cxr" in capsys.readouterr().out


def test_check_catches_identifying_dicom_without_printing_it(site_kit, dataset, tmp_path):
    phi = write_dicom(tmp_path / "phi.dcm", np.full((32, 32), 900, np.uint16), deidentified=False,
                      PatientName="Doe^Jane", PatientBirthDate="19700101")  # fmt: skip
    manifest = tmp_path / "manifest.csv"
    rows = dataset.read_text().replace("images/", f"{dataset.parent}/images/")
    manifest.write_text(rows + f"{phi},pneumonia,p-phi,train\n")
    path = site_kit / "local" / "medsilo_site.yml"
    config = yaml.safe_load(path.read_text())
    config["datasets"]["cxr"]["manifest"] = str(manifest)
    config.setdefault("data", {})["allow_paths_outside_manifest"] = True  # its rows name the dataset's images
    path.write_text(yaml.safe_dump(config))
    checks = _rows(site_kit)
    assert checks["dataset cxr"][0] == "ok" and "16 images" in checks["dataset cxr"][1]
    status, detail = checks["de-identification cxr"]
    assert status == "fail" and "1 DICOM file(s)" in detail and "PatientBirthDate" in detail and str(phi) in detail
    assert "Doe" not in detail and "19700101" not in detail  # keywords only, never values


def test_check_catches_a_missing_he_context(site_kit):
    (site_kit / "startup" / "client_context.tenseal").unlink()
    status, detail = _rows(site_kit)["HE context"]
    assert status == "fail" and "requires ckks" in detail  # hospital-1's network entry requires ckks
    path = site_kit / "local" / "medsilo_site.yml"
    path.write_text(path.read_text().replace("required_mode: ckks", "required_mode: none"))
    assert _rows(site_kit)["HE context"][0] == "warn"


def test_check_catches_a_tampered_ledger(site_kit):
    startup = site_kit / "startup"
    ledger = Ledger(site_kit / LEDGER_FILE, "hospital-1", startup / "client.key", startup / "client.crt")
    for rnd in (1, 2, 3):
        ledger.append("release", job="j1", round=rnd, what={"kind": "upload", "bytes": 10 * rnd}, privacy=None)
    assert _rows(site_kit)["ledger"][0] == "ok"
    lines = (site_kit / LEDGER_FILE).read_text().splitlines()
    lines[1] = lines[1].replace('"bytes":20', '"bytes":2')
    (site_kit / LEDGER_FILE).write_text("\n".join(lines) + "\n")
    status, detail = _rows(site_kit)["ledger"]
    assert status == "fail" and f"{LEDGER_FILE}:2:" in detail


def test_check_catches_a_changed_startup_file(site_kit):
    fed = site_kit / "startup" / "fed_client.json"
    fed.write_text(fed.read_text().replace("localhost", "evil.example.org"))
    status, detail = _rows(site_kit)["kit"]
    assert status == "fail" and "differs from what was provisioned" in detail


def test_check_refuses_a_folder_that_is_no_kit(tmp_path):
    status, detail = _rows(tmp_path)["kit"]
    assert status == "fail" and "missing fed_client.json" in detail


def test_poc_commands_name_the_missing_poc(tmp_path, capsys):
    spec = Path(__file__).parents[2] / "jobs" / "cxr_fedavg.yml"
    assert main(["poc", "submit", str(spec), "--workspace", str(tmp_path)]) == 2
    assert f"{tmp_path / 'poc.json'}: no running POC here" in capsys.readouterr().err
    assert main(["poc", "down", "--workspace", str(tmp_path)]) == 0  # nothing to stop is not an error
    assert "no process of" in capsys.readouterr().out


def test_the_shipped_example_network_is_valid():
    network = load_network(Path(__file__).parents[2] / "provisioning" / "network.example.yml")
    assert network.hospitals["hospital-1"].require == "ckks" and network.auditors


def test_check_catches_a_kit_mixed_from_two_provisioning_runs(site_kit, tmp_path):
    other = provision(_write(tmp_path, {**NETWORK, "project": "other-net"}), tmp_path / "other")
    shutil.copyfile(other.root_ca, site_kit / "startup" / "rootCA.pem")
    status, detail = _rows(site_kit)["kit"]
    assert status == "fail" and "not issued by" in detail and "mixes two provisioning runs" in detail
