"""``medsilo site check --kit SITE_KIT``: everything a hospital's IT checks before starting its site.

Each check gives one row (``ok``, ``warn`` or ``fail``) with a short detail; the command prints the table
and exits non-zero when any row fails. Checks, in order:

* **kit** — the NVFlare startup files are there, the site certificate is issued by the kit's root CA,
  and the files NVFlare signed at provisioning (``startup/signature.json``) are unchanged: a changed
  startup file makes NVFlare refuse to start the site, so it is caught here first.
* **key custody** — where the site's private key and the CKKS secret came from (``local/custody.json``,
  :mod:`medsilo.secure.custody`): ``ok`` when the site made its own key (distributed provisioning), ``warn`` in
  the trusting central mode (the coordinator made the keys, so it could sign as this site) or when the kit has
  no record (made before custody was recorded: treat as central), ``fail`` for an unreadable record.
* **site config** — ``local/medsilo_site.yml`` is valid and names this kit's site.
* **dataset NAME** — per dataset: the manifest parses, its image paths stay inside its folder (unless
  ``data.allow_paths_outside_manifest``), every image is read the way a job reads it (counts per class and
  split), and unreadable files stay under ``data.max_unreadable_fraction``.
* **de-identification NAME** — chest X-ray datasets: no DICOM still has identifying attributes filled
  in (listed by attribute keyword and file, never by value) unless the site allows it.
* **HE context** — ``startup/client_context.tenseal`` is a medsilo CKKS context with the secret key
  that encrypts and decrypts, and ``startup/peers/`` holds this site's own certificate. A missing
  context fails when the site requires ``ckks``, and warns otherwise (``ckks`` jobs would be refused).
* **ledger** — the workspace is writable and ``privacy_ledger.jsonl`` (if any) verifies against the
  root CA: every chain link and signature.
* **budget** — ε spent in the site's budget scope, from the verified ledger, against its cap.
* **software** — medsilo, NVFlare and TenSEAL versions; NVFlare must satisfy medsilo's requirement.

Nothing is written except a temporary file probing that the workspace is writable.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path
from typing import Any, Literal

import torch
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from nvflare.lighter.utils import verify_folder_signature
from packaging.requirements import Requirement

from medsilo.config import load_site_config
from medsilo.config.common import PRIVACY_STRENGTH
from medsilo.errors import MedsiloError
from medsilo.secure.budget import budget_accountant
from medsilo.secure.ckks import CKKSError, decrypt, encrypt, fingerprint, load_context, parameters
from medsilo.secure.custody import CUSTODY_FILE, CustodyError, read_custody
from medsilo.secure.keys import CLIENT_CONTEXT, Party
from medsilo.secure.ledger import LEDGER_FILE, verify_file
from medsilo.secure.pki import PKIError

Status = Literal["ok", "warn", "fail"]
STARTUP_FILES = ("fed_client.json", "client.crt", "client.key", "rootCA.pem")


@dataclass(frozen=True)
class Check:
    """One row of the preflight table."""

    name: str
    status: Status
    detail: str


DatasetChecker = Callable[[str, Any, Any, bool], list[tuple[str, Status, str]]]
"""``(name, dataset ref, site config, progress) -> [(row name, status, detail), …]``: reads a dataset the way a
job does — :func:`medsilo.medical.data.check.check_dataset`, which the caller passes in (provisioning sits
beside the data layer, not above it; the CLI composes the two)."""


def check_kit(kit: str | Path, *, datasets: DatasetChecker, progress: bool = True) -> list[Check]:
    """Run every check on the site kit folder ``kit`` (module docstring); returns the rows in order.

    Args:
        kit: the site kit folder.
        datasets: reads each dataset of the site config (:data:`DatasetChecker`).
        progress: show a progress bar while reading images.

    Raises:
        MedsiloError: ``kit`` is not a folder.
    """
    kit = Path(kit).resolve()
    if not kit.is_dir():
        raise MedsiloError(f"{kit}: not a folder; pass a site's startup kit (the folder holding startup/ and local/)")
    rows: list[Check] = []
    site = _check_kit_files(kit, rows)
    _check_custody(kit, rows)
    config = _check_config(kit, site, rows)
    if config is not None:
        for name, ref in config.datasets.items():
            rows.extend(Check(*row) for row in datasets(name, ref, config, progress))
    _check_he(kit, site, config, rows)
    _check_ledger(kit, site, config, rows)
    _check_software(rows)
    return rows


def _check_kit_files(kit: Path, rows: list[Check]) -> str | None:
    startup = kit / "startup"
    missing = [f for f in STARTUP_FILES if not (startup / f).is_file()]
    if missing:
        rows.append(Check("kit", "fail", f"{startup}: missing {', '.join(missing)}; this is not a site startup kit "
                                         "(re-extract the kit the coordinator sent)"))  # fmt: skip
        return None
    cert = x509.load_pem_x509_certificate((startup / "client.crt").read_bytes())
    root = x509.load_pem_x509_certificate((startup / "rootCA.pem").read_bytes())
    site = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    try:
        cert.verify_directly_issued_by(root)
    except (InvalidSignature, ValueError, TypeError) as exc:  # InvalidSignature has no message of its own
        rows.append(Check("kit", "fail", f"{startup / 'client.crt'}: not issued by {startup / 'rootCA.pem'} "
                                         f"({type(exc).__name__}); the kit mixes two provisioning runs"))  # fmt: skip
        return site
    signed = (startup / "signature.json").is_file()
    if signed and not verify_folder_signature(str(startup), str(startup / "rootCA.pem"), single_signer=True,
                                              signature_file="signature.json"):
        rows.append(Check("kit", "fail", f"{startup}: a startup file differs from what was provisioned "
                                         "(signature.json); NVFlare will refuse to start — restore the original kit"))
        return site
    rows.append(Check("kit", "ok", f"site {site}, certificate issued by the kit's root CA, startup files unchanged"))
    return site


def _check_custody(kit: Path, rows: list[Check]) -> None:
    try:
        custody = read_custody(kit)
    except CustodyError as exc:
        rows.append(Check("key custody", "fail", f"{exc}"))
        return
    if custody is None:
        rows.append(Check("key custody", "warn", f"{kit / CUSTODY_FILE}: no record (a kit made before custody was "
                                                 "recorded): treat it as central provisioning, where the coordinator "
                                                 "made this site's keys; re-provision with site-held keys"))  # fmt: skip
        return
    if custody.coordinator_could_sign or custody.provisioning == "central":
        rows.append(Check("key custody", "warn", f"{custody.describe()}: the trusting central mode — the coordinator "
                                                 "could sign as this site and, with the server, decrypt its uploads; "
                                                 "fine for demos, re-provision with site-held keys for real data"))  # fmt: skip
        return
    rows.append(Check("key custody", "ok", f"{custody.describe()}; nobody else holds this site's private key"))


def _check_config(kit: Path, site: str | None, rows: list[Check]):
    path = kit / "local" / "medsilo_site.yml"
    try:
        config = load_site_config(path)
    except MedsiloError as exc:
        rows.append(Check("site config", "fail", str(exc)))
        return None
    if site is not None and config.site != site:
        rows.append(Check("site config", "fail", f"{path}: site: '{config.site}' but this kit belongs to '{site}'"))
        return None
    rows.append(Check("site config", "ok", f"{path}: {len(config.datasets)} dataset(s), privacy mode ≥ "
                                           f"{config.privacy.required_mode}"))  # fmt: skip
    return config


def _check_he(kit: Path, site: str | None, config, rows: list[Check]) -> None:
    path = kit / "startup" / CLIENT_CONTEXT
    required = config is not None and "ckks" in PRIVACY_STRENGTH[config.privacy.required_mode]
    if not path.is_file():
        rows.append(Check("HE context", "fail" if required else "warn",
                          f"{path}: missing; " + ("this site requires ckks, so it can run no job — re-provision "
                                                  "the kit" if required else "ckks jobs will be refused here")))  # fmt: skip
        return
    try:
        ctx = load_context(path, secret=True)
        probe = {"probe": torch.arange(4, dtype=torch.float32)}
        back = decrypt(ctx, encrypt(ctx, probe))["probe"]
        if not torch.allclose(back, probe["probe"], atol=1e-3):
            raise CKKSError(f"{path}: encrypt→decrypt does not give the values back; the context is damaged")
    except CKKSError as exc:
        rows.append(Check("HE context", "fail", str(exc)))
        return
    peers = kit / "startup" / "peers"
    own = peers / f"{site}.crt"
    try:
        n_peers = len(Party(site or "?", kit).peers())  # each issued by the kit's root CA for the name it is filed under
    except PKIError as exc:
        rows.append(Check("HE context", "fail", f"{exc}; aggregate releases cannot check contributors"))
        return
    if not own.is_file() or own.read_bytes() != (kit / "startup" / "client.crt").read_bytes():
        rows.append(Check("HE context", "fail", f"{peers}: does not hold this site's certificate; aggregate releases "
                                                "cannot check contributors — re-provision the kit"))  # fmt: skip
        return
    rows.append(Check("HE context", "ok", f"CKKS N={parameters(ctx)['poly_modulus_degree']}, key set "
                                          f"{fingerprint(ctx)[:12]}, secret key present, encrypt→decrypt round trip "
                                          f"exact; {n_peers} peer certificates"))


def _check_ledger(kit: Path, site: str | None, config, rows: list[Check]) -> None:
    try:
        with tempfile.NamedTemporaryFile(dir=kit, prefix=".medsilo-write-probe-"):
            pass
    except OSError as exc:
        rows.append(Check("ledger", "fail", f"{kit}: not writable ({exc.strerror}); the site must write its ledger here"))
        return
    path = kit / LEDGER_FILE
    root = kit / "startup" / "rootCA.pem"
    if not path.is_file():
        rows.append(Check("ledger", "ok", f"{path}: none yet (created at the first job); workspace writable"))
        ledger_ok = True
    else:
        try:
            result = verify_file(path, root if root.is_file() else None)
        except MedsiloError as exc:
            rows.append(Check("ledger", "fail", str(exc)))
            return
        ledger_ok = result.ok
        if result.ok:
            rows.append(Check("ledger", "ok", f"{path}: {len(result.entries)} entries, chain and signatures valid"))
        else:
            p = result.problem
            rows.append(Check("ledger", "fail", f"{p.file}:{p.line}: {p.reason}; the site refuses every job until "
                                                "the original ledger is restored (keep this copy for the auditor)"))
    if config is None or site is None:
        return
    budget = config.privacy.budget
    if budget is None:
        rows.append(Check("budget", "ok", "no differential-privacy cap set (privacy.budget)"))
        return
    if not ledger_ok:
        rows.append(Check("budget", "fail", "cannot be derived: the ledger does not verify"))
        return
    spent = budget_accountant(site, path, budget).epsilon if path.is_file() else 0.0
    left = budget.epsilon - spent
    rows.append(Check("budget", "ok" if left > 0 else "fail",
                      f"ε {spent:.2f} spent of {budget.epsilon:g} (scope {budget.scope}, δ {budget.delta:g}); "
                      + (f"{left:.2f} left" if left > 0 else "exhausted: DP jobs will be refused")))  # fmt: skip


def _check_software(rows: list[Check]) -> None:
    try:
        found = {p: version(p) for p in ("medsilo", "nvflare", "tenseal", "torch")}
    except PackageNotFoundError as exc:
        rows.append(Check("software", "fail", f"package {exc} is not installed; install medsilo with its dependencies"))
        return
    need = next((Requirement(r) for r in requires("medsilo") or [] if Requirement(r).name == "nvflare"), None)
    detail = ", ".join(f"{p} {v}" for p, v in found.items())
    if need is not None and not need.specifier.contains(found["nvflare"], prereleases=True):
        rows.append(Check("software", "fail", f"{detail}; medsilo needs {need}: every party must run the same NVFlare"))
        return
    rows.append(Check("software", "ok", detail))


def render(rows: list[Check]) -> str:
    """The table printed by ``medsilo site check``."""
    width = max(len(r.name) for r in rows)
    return "\n".join(f"{r.name:<{width}}  {r.status.upper():<4}  {r.detail}" for r in rows)
