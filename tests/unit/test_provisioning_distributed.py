"""Distributed provisioning: each party makes its own key, one site makes the CKKS secret and wraps it for its
peers, and key versions rotate — with the refusals that make it safe (a foreign or tampered wrapped key, a
request the network does not list, a job under a retired key)."""

from __future__ import annotations

import json
import shutil
import stat

import pytest
import yaml

from medsilo.cli import main
from medsilo.provisioning import distributed as d
from medsilo.provisioning.network import NetworkSpec
from medsilo.secure import pki
from medsilo.secure.ckks import fingerprint, load_context
from medsilo.secure.custody import read_custody
from medsilo.secure.keys import (
    CLIENT_CONTEXT,
    SERVER_CONTEXT,
    Party,
    RetiredKeyError,
    read_key_versions,
    record_key_version,
)
from medsilo.secure.revocation import CRL_FILE, load_crl

NETWORK = {
    "project": "dist-net",
    "server": {"host": "localhost", "port": 18113},
    "hospitals": {"hospital-1": {"org": "h_one", "require": "ckks"}, "hospital-2": {"org": "h_two"},
                  "hospital-3": {"org": "h_three"}},
    "admins": [{"name": "admin@coord.org", "org": "coord", "role": "project_admin"}],
    "auditors": [{"name": "auditor@coord.org", "org": "coord"}],
    "he": {"poly_modulus_degree": 4096},
    "ckks_key_holder": "hospital-2",
}  # fmt: skip


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    network = NetworkSpec.model_validate(NETWORK)
    kits = d.provision_here(network, root)
    return network, root, kits


def test_every_party_assembles_its_own_kit_with_medsilo_policy(net):
    network, root, kits = net
    for name in ["server", *network.hospitals, "admin@coord.org", "auditor@coord.org"]:
        key = root / "parties" / name / f"{name}.key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        c = read_custody(kits / name)
        assert (c.provisioning, c.private_key) == ("sites", "made-here")
        kit_key = kits / name / "startup" / ("server.key" if name == "server" else "client.key")
        assert kit_key.read_bytes() == key.read_bytes()  # the key the party made, never another
    assert (kits / "hospital-1" / "local" / "privacy.json").is_file()
    assert "required_mode: ckks" in (kits / "hospital-1" / "local" / "medsilo_site.yml").read_text()
    assert json.loads((kits / "server" / "local" / "resources.json").read_text())["class_list_enforcement_mode"] == "enforce"
    assert sorted(p.stem for p in (kits / "hospital-3" / "startup" / "peers").glob("*.crt")) == sorted(network.hospitals)
    # every certificate chains to the one root CA; the coordinator's folder holds no party's private key
    ca = pki.load_certificate(root / "coordinator" / "ca" / "rootCA.pem")
    for crt in (root / "coordinator" / "certs").glob("*.crt"):
        pki.verify_certificate(pki.load_certificate(crt), ca)
    assert [p.name for p in (root / "coordinator").rglob("*") if b"PRIVATE KEY" in (p.read_bytes() if p.is_file() else b"")] == ["rootCA.key"]


def test_the_key_holder_makes_the_ckks_secret_and_only_sites_hold_it(net):
    network, root, kits = net
    holder = read_custody(kits / "hospital-2")
    assert (holder.ckks_source, holder.key_version) == ("made-here", 1)
    prints = set()
    for site in ("hospital-1", "hospital-3"):
        c = read_custody(kits / site)
        assert (c.ckks_source, c.ckks_from, c.key_version) == ("wrapped", "hospital-2", 1)
    for site in network.hospitals:
        path = kits / site / "startup" / CLIENT_CONTEXT
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        prints.add(fingerprint(load_context(path, secret=True)))
    server = load_context(kits / "server" / "startup" / SERVER_CONTEXT, secret=False)
    assert prints == {fingerprint(server)}
    relay = root / "coordinator" / "relay" / "v1"
    assert sorted(p.name for p in relay.iterdir()) == ["hospital-1.wrapped", "hospital-3.wrapped", SERVER_CONTEXT]


def test_approve_refuses_a_request_the_network_does_not_list(net, tmp_path):
    network, root, _ = net
    other = NetworkSpec.model_validate({**NETWORK, "hospitals": {**NETWORK["hospitals"], "intruder": {"org": "x"}}})
    req = d.request(other, "intruder", tmp_path / "intruder")
    with pytest.raises(d.ProvisionError, match="'intruder' is not a participant"):
        d.approve(root / "coordinator", req.csr)
    # a request under a listed name but another organisation is refused too
    forged = NetworkSpec.model_validate({**NETWORK, "hospitals": {**NETWORK["hospitals"], "hospital-1": {"org": "evil"}}})
    req = d.request(forged, "hospital-1", tmp_path / "forged")
    with pytest.raises(d.ProvisionError, match="asks for org 'evil'.*refused"):
        d.approve(root / "coordinator", req.csr)


def test_import_refuses_a_blob_for_another_site_or_tampered(net, tmp_path):
    network, root, kits = net
    relay = tmp_path / "relay"
    shutil.copytree(root / "coordinator" / "relay", relay)
    v1 = relay / "v1"
    # hospital-1 is handed hospital-3's blob under its own name
    shutil.copy(v1 / "hospital-3.wrapped", v1 / "hospital-1.wrapped")
    with pytest.raises(d.ProvisionError, match="for 'hospital-3'.*not for hospital-1"):
        d.import_key(kits / "hospital-1", network, relay)
    # one flipped character in the ciphertext
    blob = json.loads((root / "coordinator" / "relay" / "v1" / "hospital-1.wrapped").read_bytes())
    blob["ciphertext"] = ("A" if blob["ciphertext"][5] != "A" else "B").join([blob["ciphertext"][:5], blob["ciphertext"][6:]])
    (v1 / "hospital-1.wrapped").write_text(json.dumps(blob))
    with pytest.raises(d.ProvisionError, match="signature does not verify"):
        d.import_key(kits / "hospital-1", network, relay)
    assert read_key_versions(kits / "hospital-1")["current"] == 1  # nothing changed at the site


def test_rotation_retires_the_old_key_and_a_job_under_it_is_refused(net, tmp_path):
    network, root, kits = net
    relay = tmp_path / "relay"
    shutil.copytree(root / "coordinator" / "relay", relay)
    for site in network.hospitals:
        shutil.copytree(kits / site, tmp_path / site)
    old = fingerprint(load_context(tmp_path / "hospital-1" / "startup" / CLIENT_CONTEXT))
    stale = (tmp_path / "hospital-1" / "startup" / CLIENT_CONTEXT).read_bytes()
    network_file = tmp_path / "network.yml"
    network_file.write_text(yaml.safe_dump(NETWORK))
    assert main(["keys", "rotate", "--kit", str(tmp_path / "hospital-2"), "--network", str(network_file),
                 "--relay", str(relay)]) == 0  # fmt: skip
    assert main(["provision", "import-key", "--kit", str(tmp_path / "hospital-1"), "--network", str(network_file),
                 "--relay", str(relay)]) == 0  # fmt: skip
    c = read_custody(tmp_path / "hospital-1")
    assert (c.ckks_source, c.ckks_from, c.key_version) == ("wrapped", "hospital-2", 2)
    party = Party("hospital-1", tmp_path / "hospital-1")
    new = fingerprint(party.he_context())
    assert new != old and read_key_versions(tmp_path / "hospital-1")["current"] == 2
    # ciphertexts under version 1 (a job started before the rotation) are refused by name; version 2 passes
    with pytest.raises(RetiredKeyError, match="retired CKKS key version 1.*current key version is 2"):
        party.check_key_version([new, old])
    party.check_key_version([new])
    # putting the old secret context back does not make the site use it
    (tmp_path / "hospital-1" / "startup" / CLIENT_CONTEXT).write_bytes(stale)
    with pytest.raises(RetiredKeyError, match="retired key version 1"):
        Party("hospital-1", tmp_path / "hospital-1").he_context()
    # and the record never goes back to a retired version
    with pytest.raises(RetiredKeyError, match="retired"):
        record_key_version(tmp_path / "hospital-1", 1, old)


def test_cli_walks_the_distributed_flow(tmp_path, capsys):
    network_file = tmp_path / "network.yml"
    network_file.write_text(yaml.safe_dump({**NETWORK, "hospitals": {"hospital-1": {"org": "h_one"}},
                                            "min_contributors": 1, "ckks_key_holder": None}))  # fmt: skip
    coord = tmp_path / "coord"
    assert main(["provision", "init", "--network", str(network_file), "--out", str(coord)]) == 0
    fp = capsys.readouterr().out.strip().splitlines()[-1].strip()
    assert main(["provision", "request", "--network", str(network_file), "--name", "hospital-1",
                 "--out", str(tmp_path / "h1")]) == 0  # fmt: skip
    assert main(["provision", "approve", "--coord", str(coord), str(tmp_path / "h1" / "hospital-1.csr")]) == 0
    args = ["provision", "assemble", "--network", str(network_file), "--request-dir", str(tmp_path / "h1"),
            "--cert", str(coord / "certs" / "hospital-1.crt"), "--root-ca", str(coord / "ca" / "rootCA.pem"),
            "--peers", str(coord / "certs"), "--relay", str(coord / "relay"), "--out", str(tmp_path / "kits")]  # fmt: skip
    assert main([*args, "--fingerprint", "00" * 32]) == 2
    assert "is not the one the coordinator announced" in capsys.readouterr().err
    assert main([*args, "--fingerprint", fp]) == 0
    assert "CKKS secret made here (key version 1)" in capsys.readouterr().out


def test_the_coordinator_revokes_a_party_and_keeps_earlier_entries(net, tmp_path, capsys):
    network, root, kits = net
    coord = tmp_path / "coordinator"
    shutil.copytree(root / "coordinator", coord)
    ca = pki.load_certificate(coord / "ca" / pki.ROOT_CA_CERT)
    serial = {n: pki.load_certificate(coord / "certs" / f"{n}.crt").serial_number for n in ("hospital-1", "hospital-2")}
    assert main(["provision", "revoke", "--coord", str(coord), "hospital-2", "--reason", "compromised"]) == 0
    assert "as <kit>/local/crl.pem" in capsys.readouterr().out
    first = load_crl(coord / CRL_FILE, ca)
    assert [e.serial for e in first.entries] == [serial["hospital-2"]]
    assert main(["provision", "revoke", "--coord", str(coord), "hospital-1"]) == 0
    assert {e.serial for e in load_crl(coord / CRL_FILE, ca).entries} == set(serial.values())  # hospital-2 kept
    # a name never certified here: one line, nothing written
    before = (coord / CRL_FILE).read_bytes()
    assert main(["provision", "revoke", "--coord", str(coord), "hospital-9"]) == 2
    assert "no certificate for 'hospital-9' was approved here" in capsys.readouterr().err
    assert (coord / CRL_FILE).read_bytes() == before
