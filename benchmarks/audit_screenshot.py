"""Look at ``medsilo audit report``'s page in a real browser: example ledgers, the HTML report, a Chromium screenshot.

Not a test CI runs (it needs Chromium: ``apt-get install chromium`` on Debian); a documented check that the opening
table reads at a glance::

    python -m benchmarks.audit_screenshot --out benchmarks/work/audit      # writes audit.html and audit.png

It writes three sites' ledgers with a real local root CA (:mod:`medsilo.secure.pki`): hospital-1 provisioned with
site-held keys, hospital-2 centrally (the coordinator could sign), hospital-3 with its budget spent and a
refusal, and a revocation list that revokes hospital-3 before its last entry (so the audit flags that entry and
the page shows hospital-3 unverified). Then it runs ``medsilo audit report --allow-unverified`` and ``chromium
--headless --screenshot``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from medsilo.cli import main as medsilo
from medsilo.secure import pki
from medsilo.secure.custody import Custody
from medsilo.secure.ledger import Ledger
from medsilo.secure.revocation import CRL_FILE, revoke

CUSTODY = {
    "hospital-1": Custody("sites", "made-here", "made-here", None, 1),
    "hospital-2": Custody("central", "central", "central", None, 1),
    "hospital-3": Custody("sites", "made-here", "wrapped", "hospital-1", 1),
}


def write_ledgers(out: Path) -> Path:
    """Example ledgers under ``out/ledgers`` and the root CA (with its revocation list) under ``out/pki``."""
    ca_key, ca_cert = pki.make_local_ca(out / "pki")
    certs = {}
    for n, (site, custody) in enumerate(CUSTODY.items()):
        folder = out / "ledgers" / site
        folder.mkdir(parents=True, exist_ok=True)
        key, certs[site] = pki.issue_certificate(ca_key, ca_cert, site, None)
        ledger = Ledger(folder / "privacy_ledger.jsonl", site, key, certs[site])
        cap, rounds = 4.0, 2 + n
        for job, mode in (("job-cxr-fedavg", "dp"), ("job-cxr-fedtgp", "ckks")):
            ledger.append("policy_loaded", job=job, round=0, privacy=None,
                          what={"kind": "policy", "privacy_mode": mode, "custody": custody.to_json(),
                                "custody_note": None})  # fmt: skip
            for rnd in range(1, rounds + 1):
                dp = mode == "dp"
                privacy = {"mechanism": "gaussian", "epsilon": 1.0, "delta": 1e-5,
                           "scope": "site", "epsilon_cap": cap} if dp else None  # fmt: skip
                ledger.append("release", job=job, round=rnd, privacy=privacy,
                              what={"kind": "weights", "bytes": 48_000, "encrypted": not dp})  # fmt: skip
        if site == "hospital-3":
            # the coordinator revokes hospital-3 (a CRL holds whole seconds: revoke in the next one), after which
            # the site still signs an entry: the audit flags it
            time.sleep(1.05 - time.time() % 1)
            revoke(ca_key, ca_cert, [certs[site]], out / "pki" / CRL_FILE, reason="left")
            ledger.append("refusal", job="job-cxr-fedavg", round=rounds + 1, privacy=None, what={"kind": "weights"},
                          reason="ε budget: 5.0 of 4.0 would be spent")  # fmt: skip
    return out / "pki" / pki.ROOT_CA_CERT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/work/audit"))
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)
    root_ca = write_ledgers(args.out)
    page = args.out / "audit.html"
    report = ["audit", "report", str(args.out / "ledgers"), "--root-ca", str(root_ca), "--out", str(page)]
    if medsilo([*report, "--allow-unverified"]) != 0:
        return 1
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("no chromium on PATH (Debian: apt-get install chromium); the page is", page, file=sys.stderr)
        return 1
    png = args.out / "audit.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={args.width},1100", f"--screenshot={png.resolve()}", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
