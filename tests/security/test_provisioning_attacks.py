"""Attacks on distributed provisioning and CKKS key sharing (issue 18), played for real on tmp folders.

* a malicious **requester** sends the coordinator a crafted certificate request;
* a malicious **coordinator or server** relays wrapped CKKS keys, public contexts and peer certificates;
* leftovers: secrets must be 0600, only in the party's own folder, and a failed step leaves nothing that looks
  complete.
"""

from __future__ import annotations

import os
import shutil
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from medsilo.provisioning import distributed as d
from medsilo.provisioning.network import NetworkSpec
from medsilo.secure import keywrap, pki
from medsilo.secure.ckks import CKKSError, load_context, make_context, save_context
from medsilo.secure.keys import CLIENT_CONTEXT, SERVER_CONTEXT, KeyMaterialError, read_key_versions
from tests.unit.test_provisioning_distributed import NETWORK


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks")
    network = NetworkSpec.model_validate(NETWORK)
    d.provision_here(network, root)
    return network, root


@pytest.fixture
def net(built, tmp_path):
    """A private copy of the provisioned network (attacks mutate it)."""
    network, root = built
    shutil.copytree(root, tmp_path / "n", symlinks=True)
    return network, tmp_path / "n"


def _csr(
    name: str, org: str | None = None, role: str | None = None, key=None, extra_cn: str | None = None
) -> bytes:
    key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
    if extra_cn:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, extra_cn))
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    if role:
        attrs.append(x509.NameAttribute(NameOID.UNSTRUCTURED_NAME, role))
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs)).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def _files(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


# ---- 1. a malicious requester ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "refusal"),
    [
        (("hospital-2", "h_two"), "certified already"),  # another site's name
        (("server", "coordinator"), "certified already"),  # the server's name
        (("../../etc/evil", "h_two"), "not a participant"),  # path separators
        (("..", "h_two"), "not a participant"),
        (("hospital-9", "h_nine"), "not a participant"),
        (("hospital-1", "h_one", "project_admin"), "role"),  # a role it is not entitled to
        (("auditor@coord.org", "coord", "project_admin"), "role"),
        (("hospital-1", "coord"), "org"),  # an org that is not its own
    ],
)
def test_approve_refuses_a_crafted_request_and_writes_nothing(net, tmp_path, subject, refusal):
    network, root = net
    coord = root / "coordinator"
    if subject[0] == "hospital-1":  # make hospital-1 not yet certified so only the crafted field is wrong
        (coord / "certs" / "hospital-1.crt").unlink()
    before = _files(root)
    bad = tmp_path / "bad.csr"
    bad.write_bytes(_csr(*subject))
    with pytest.raises(d.ProvisionError, match=refusal) as err:
        d.approve(coord, bad)
    assert "\n" not in str(err.value)
    assert _files(root) == before


def test_approve_issues_only_the_network_subject_even_with_extra_names(net, tmp_path):
    network, root = net
    coord = root / "coordinator"
    (coord / "certs" / "hospital-1.crt").unlink()
    bad = tmp_path / "two-names.csr"
    bad.write_bytes(_csr("hospital-1", "h_one", extra_cn="server"))
    cert = pki.load_certificate(d.approve(coord, bad))
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == ["hospital-1"]


def test_approve_refuses_a_request_carrying_someone_elses_public_key(net, tmp_path):
    """A CSR with the victim's public key but signed by the attacker's key: no proof of possession."""
    network, root = net
    coord = root / "coordinator"
    (coord / "certs" / "hospital-1.crt").unlink()
    victim = pki.load_private_key(root / "parties" / "hospital-3" / "hospital-3.key").public_key()
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = x509.load_pem_x509_csr(_csr("hospital-1", "h_one", key=attacker)).public_bytes(
        serialization.Encoding.DER
    )
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    swapped = der.replace(attacker.public_key().public_bytes(*spki), victim.public_bytes(*spki))
    assert swapped != der
    bad = tmp_path / "swapped.csr"
    bad.write_bytes(swapped)
    with pytest.raises(d.ProvisionError, match="does not verify|not a readable"):
        d.approve(coord, bad)
    assert not (coord / "certs" / "hospital-1.crt").exists()


def test_approve_refuses_a_huge_request_without_reading_it(net, tmp_path):
    network, root = net
    bad = tmp_path / "bomb.csr"
    with open(bad, "wb") as fh:
        fh.truncate(4 * 1024**3)  # sparse: 4 GiB that would be read whole into memory
    with pytest.raises(d.ProvisionError, match="too large"):
        d.approve(root / "coordinator", bad)


def test_approve_refuses_a_request_that_is_not_a_file(net, tmp_path):
    network, root = net
    fifo = tmp_path / "fifo.csr"
    os.mkfifo(fifo)  # reading it would block the coordinator forever
    with pytest.raises(d.ProvisionError, match="not a regular file"):
        d.approve(root / "coordinator", fifo)


# ---- 2. a malicious coordinator or server relaying wrapped keys ----------------------------------


def test_a_blob_swapped_between_sites_is_refused(net):
    network, root = net
    relay, kits = root / "coordinator" / "relay", root / "kits"
    shutil.copy(relay / "v1" / "hospital-1.wrapped", relay / "v1" / "hospital-3.wrapped")
    with pytest.raises(d.ProvisionError, match="is for 'hospital-1'"):
        d.import_key(kits / "hospital-3", network, relay)


def test_a_retired_blob_replayed_after_rotation_is_refused(net):
    network, root = net
    relay, kits = root / "coordinator" / "relay", root / "kits"
    assert d.make_key_set(kits / "hospital-2", network, root / "coordinator" / "certs", relay) == 2
    d.import_key(kits / "hospital-3", network, relay)
    with pytest.raises(KeyMaterialError, match="retired"):  # v2 hidden, v1 replayed
        d.import_key(kits / "hospital-3", network, relay, version=1)
    os.rename(relay / "v1", relay / "v3")  # the old blob under a new version number
    with pytest.raises(d.ProvisionError, match="key_version 1"):
        d.import_key(kits / "hospital-3", network, relay)
    assert read_key_versions(kits / "hospital-3")["current"] == 2
    assert not list((kits / "hospital-3" / "startup").glob(".*"))


def test_a_substituted_public_context_is_refused(net):
    network, root = net
    relay, kits = root / "coordinator" / "relay", root / "kits"
    save_context(
        make_context(4096), relay / "v1" / SERVER_CONTEXT, secret=False
    )  # the server keeps its secret
    before = (kits / "hospital-3" / "startup" / CLIENT_CONTEXT).read_bytes()
    with pytest.raises(d.ProvisionError, match="does not belong to"):
        d.import_key(kits / "hospital-3", network, relay)
    assert (kits / "hospital-3" / "startup" / CLIENT_CONTEXT).read_bytes() == before
    assert not list((kits / "hospital-3" / "startup").glob(".*"))


@pytest.mark.parametrize("sender", ["server", "auditor@coord.org"])
def test_a_secret_made_by_the_server_or_an_admin_is_refused(net, sender):
    network, root = net
    relay, kits = root / "coordinator" / "relay", root / "kits"
    role = "server" if sender == "server" else "client"
    ctx = make_context(4096)
    (relay / "v2").mkdir()
    save_context(ctx, relay / "v2" / SERVER_CONTEXT, secret=False)
    blob = keywrap.wrap(ctx.serialize(save_secret_key=True), project=network.project, key_version=2,
                        purpose=d.PURPOSE, sender=sender,
                        sender_key=pki.load_private_key(kits / sender / "startup" / f"{role}.key"),
                        sender_certificate=pki.load_certificate(kits / sender / "startup" / f"{role}.crt"),
                        recipient_certificate=pki.load_certificate(kits / "hospital-3" / "startup" / "client.crt"))  # fmt: skip
    (relay / "v2" / "hospital-3.wrapped").write_bytes(blob)
    with pytest.raises(d.ProvisionError, match="not a hospital"):
        d.import_key(kits / "hospital-3", network, relay)
    assert read_key_versions(kits / "hospital-3")["current"] == 1


def _impersonate(root, network, name: str):
    """The coordinator drops ``name``'s certificate and certifies a key of its own under the same name."""
    coord = root / "coordinator"
    (coord / "certs" / f"{name}.crt").unlink()
    req = d.request(network, name, root / "evil" / name)
    return pki.load_private_key(req.key), pki.load_certificate(d.approve(coord, req.csr))


def test_a_coordinator_made_secret_wrapped_under_a_reissued_certificate_is_refused(net):
    """The coordinator holds the root CA key: it can certify its own key as 'hospital-2' and wrap a CKKS
    secret it keeps. A site must accept a wrapped key only from the certificate it pinned for that peer."""
    network, root = net
    relay, kits = root / "coordinator" / "relay", root / "kits"
    key, cert = _impersonate(root, network, "hospital-2")
    ctx = make_context(4096)  # the coordinator's: it would decrypt every upload with the server
    (relay / "v2").mkdir()
    save_context(ctx, relay / "v2" / SERVER_CONTEXT, secret=False)
    blob = keywrap.wrap(ctx.serialize(save_secret_key=True), project=network.project, key_version=2, purpose=d.PURPOSE,
                        sender="hospital-2", sender_key=key, sender_certificate=cert,
                        recipient_certificate=pki.load_certificate(kits / "hospital-3" / "startup" / "client.crt"))  # fmt: skip
    (relay / "v2" / "hospital-3.wrapped").write_bytes(blob)
    with pytest.raises(d.ProvisionError, match="not the certificate .* pinned"):
        d.import_key(kits / "hospital-3", network, relay)
    assert read_key_versions(kits / "hospital-3")["current"] == 1


def test_a_reissued_peer_certificate_is_not_taken_silently(net):
    """'medsilo provision peers' must not swap a pinned site's key for the coordinator's new one."""
    network, root = net
    kits = root / "kits"
    pinned = (kits / "hospital-3" / "startup" / "peers" / "hospital-2.crt").read_bytes()
    _impersonate(root, network, "hospital-2")
    with pytest.raises(d.ProvisionError, match="hospital-2.*another key"):
        d.update_peers(kits / "hospital-3", root / "coordinator" / "certs")
    assert (kits / "hospital-3" / "startup" / "peers" / "hospital-2.crt").read_bytes() == pinned


def test_a_site_refuses_a_retired_context_at_job_time(net):
    from medsilo.secure.keys import Party, RetiredKeyError

    network, root = net
    relay, kits = root / "coordinator" / "relay", root / "kits"
    old = (kits / "hospital-3" / "startup" / CLIENT_CONTEXT).read_bytes()
    d.make_key_set(kits / "hospital-2", network, root / "coordinator" / "certs", relay)
    d.import_key(kits / "hospital-3", network, relay)
    (kits / "hospital-3" / "startup" / CLIENT_CONTEXT).write_bytes(old)  # someone puts the old secret back
    with pytest.raises(RetiredKeyError, match="retired key version 1"):
        Party("hospital-3", kits / "hospital-3").he_context()


# ---- 4. permissions and leftovers -------------------------------------------------------------------


def _secrets_in(folder):
    """Files under ``folder`` that load as a private key or a CKKS secret context."""
    found = []
    for p in folder.rglob("*"):
        if not p.is_file() or p.is_symlink():
            continue
        try:
            pki.load_private_key(p)
            found.append(p)
            continue
        except Exception:  # noqa: BLE001 - a scan: anything that does not load is not a key
            pass
        try:
            load_context(p, secret=True)
            found.append(p)
        except CKKSError:
            pass
    return found


def test_secrets_are_0600_and_only_in_their_own_folders_after_request_assemble_rotate(net):
    network, root = net
    coord, kits = root / "coordinator", root / "kits"
    d.make_key_set(kits / "hospital-2", network, coord / "certs", coord / "relay")
    for site in ("hospital-1", "hospital-3"):
        d.import_key(kits / site, network, coord / "relay")
    assert _secrets_in(coord) == [coord / "ca" / "rootCA.key"]
    assert stat.S_IMODE((coord / "ca" / "rootCA.key").stat().st_mode) == 0o600
    for party in ("server", "admin@coord.org", "auditor@coord.org"):
        assert not [p for p in _secrets_in(kits / party) if p.suffix != ".key"]
    for secret in _secrets_in(root / "kits") + _secrets_in(root / "parties"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    leftovers = [p for p in root.rglob(".*")]
    assert leftovers == [], leftovers


def test_a_failed_import_leaves_no_staged_secret(net):
    """A hospital wraps bytes that are no CKKS context: refused, and nothing is left in the kit."""
    network, root = net
    relay, kits = root / "coordinator" / "relay", root / "kits"
    (relay / "v2").mkdir()
    save_context(make_context(4096), relay / "v2" / SERVER_CONTEXT, secret=False)
    blob = keywrap.wrap(b"not a context", project=network.project, key_version=2, purpose=d.PURPOSE,
                        sender="hospital-2", sender_key=pki.load_private_key(kits / "hospital-2" / "startup" / "client.key"),
                        sender_certificate=pki.load_certificate(kits / "hospital-2" / "startup" / "client.crt"),
                        recipient_certificate=pki.load_certificate(kits / "hospital-3" / "startup" / "client.crt"))  # fmt: skip
    (relay / "v2" / "hospital-3.wrapped").write_bytes(blob)
    with pytest.raises(d.ProvisionError, match="not a usable CKKS context"):
        d.import_key(kits / "hospital-3", network, relay)
    assert not list((kits / "hospital-3" / "startup").glob(".*"))


def test_a_failed_assemble_leaves_no_kit_that_looks_complete(net):
    """hospital-3 assembles against a relay whose blob was tampered with: refused, and no kit is left."""
    network, root = net
    coord, kits = root / "coordinator", root / "kits"
    shutil.rmtree(kits / "hospital-3")
    blob = coord / "relay" / "v1" / "hospital-3.wrapped"
    blob.write_bytes(blob.read_bytes().replace(b'"ciphertext":"', b'"ciphertext":"AAAA'))
    with pytest.raises(d.ProvisionError):
        d.assemble(network, root / "parties" / "hospital-3", coord / "certs" / "hospital-3.crt",
                   coord / "ca" / "rootCA.pem", kits, peers=coord / "certs", relay=coord / "relay")  # fmt: skip
    assert not (kits / "hospital-3").exists()
    assert not [p for p in kits.iterdir() if p.name.startswith(".")]
