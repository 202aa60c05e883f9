"""Key custody in a real deployment: kits made the distributed way, one encrypted job, and a scan proving that
neither the server nor the coordinator holds a site's private key or the CKKS secret key.

``medsilo poc up --custody sites`` runs every party's request/approve/assemble on this machine, each in its own
folder; hospital-1 (the key holder) makes the CKKS secret and wraps it for hospital-2, the server gets only the
public context.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from medsilo.cli import main
from medsilo.config import JobSpec
from medsilo.medical.synth import SynthRequest, synthesize
from medsilo.provisioning import poc
from medsilo.secure import pki
from medsilo.secure.ckks import CKKSError, load_context
from medsilo.secure.custody import read_custody
from medsilo.secure.ledger import LEDGER_FILE, entries

SITES = ["hospital-1", "hospital-2"]


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    root = tmp_path_factory.mktemp("custody")
    sites_yml = synthesize(root / "hospitals", SynthRequest("cxr", sites=2, images_per_site=16, seed=5),
                           workers=1, progress=False)  # fmt: skip
    workspace = root / "w"
    state = poc.up(sites_yml, workspace, progress=False, custody="sites")
    yield workspace, state
    poc.down(workspace)


def _secrets_in(folder: Path, site_keys: set[str]) -> list[str]:
    """Files under ``folder`` that load as a site's private key or as a CKKS context holding a secret key."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        try:
            key = pki.load_private_key(path)
        except pki.PKIError:
            pass
        else:
            if pki.key_id(key.public_key()) in site_keys:
                found.append(f"{path}: a site's private key")
        if path.stat().st_size > 64 * 1024 * 1024:
            continue
        try:
            ctx = load_context(path)
        except CKKSError:
            continue
        if ctx.is_private():
            found.append(f"{path}: a CKKS context with its secret key")
    return found


def test_ckks_job_on_site_held_keys_and_no_secret_outside_the_sites(system):
    workspace, state = system
    kits = Path(state["kits"])
    assert state["custody"] == "sites"
    # every party made its own key; hospital-1 made the CKKS secret, hospital-2 received it wrapped
    custody = {p: read_custody(kits / p) for p in [*SITES, "server", poc.ADMIN, poc.AUDITOR]}
    assert {p: c.private_key for p, c in custody.items()} == dict.fromkeys(custody, "made-here")
    assert (custody["hospital-1"].ckks_source, custody["hospital-2"].ckks_source) == ("made-here", "wrapped")
    assert custody["hospital-2"].ckks_from == "hospital-1" and custody["server"].ckks_source == "none"

    spec = JobSpec(name="custody-ckks", modality="cxr", classes=["normal", "pneumonia"], dataset="cxr", image_size=16,
                   model="cnn", feature_dim=8, algorithm={"name": "fedproto"},
                   training={"rounds": 2, "local_epochs": 1, "batch_size": 8, "lr": 0.01},
                   privacy={"mode": "ckks", "min_contributors": 2})  # fmt: skip
    path = workspace.parent / "custody.yml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True)))
    assert main(["poc", "submit", str(path), "--workspace", str(workspace), "--quiet"]) == 0
    results = json.loads((workspace / "runs" / spec.name / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2] and results["privacy"]["mode"] == "ckks"
    job = results["job_id"]
    for site in SITES:  # encrypted under key version 1, as each ledger records
        uploads = [e["what"] for e in entries(kits / site / LEDGER_FILE)
                   if e["event"] == "release" and e["job"] == job and e["what"]["kind"] == "upload"]  # fmt: skip
        assert len(uploads) == 2, uploads
        assert all(w["encrypted"] and w["scheme"]["key_version"] == 1 for w in uploads), uploads

    ledgers = [kits / p / LEDGER_FILE for p in [*SITES, "server"]]
    assert main(["audit", "verify", *map(str, ledgers), "--root-ca", state["root_ca"]]) == 0

    site_keys = {pki.key_id(pki.load_public_key(kits / s / "startup" / "client.crt")) for s in SITES}
    assert _secrets_in(kits / "server", site_keys) == []
    assert _secrets_in(workspace / "coordinator", site_keys) == []
    # the scan does find them where they belong
    assert len(_secrets_in(kits / "hospital-2", site_keys)) == 2
