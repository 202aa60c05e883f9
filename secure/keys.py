"""Where each party finds its CKKS context and signing keys, in simulation and in a deployment.

Who holds what (``docs/threat-model.md``):

* the **server**: the public CKKS context only (parameters + public key, no secret key): it can add
  ciphertexts, never decrypt them;
* every **site**: the secret CKKS context (one key set per federation, shared by all its sites, as in
  NVFlare's HE model), its own signing key, and every site's public signing key (to check who
  contributed to an aggregate before releasing it).

Two layouts, chosen by the environment:

**Simulation** (``medsilo sim`` generates fresh keys per run and sets ``MEDSILO_HE_DIR``)::

    HE_DIR/server/server_context.tenseal     public context (0644)
    HE_DIR/<site>/client_context.tenseal     secret context (0600)
    HE_DIR/<site>/signing_key.pem            the site's Ed25519 signing key (0600)
    HE_DIR/public/<site>.pem                 every site's public signing key

In the simulator every site runs as the same OS user on one machine, so these files model the
layout, not a security boundary.

**Deployment** (startup kits; ``MEDSILO_HE_DIR`` unset), relative to the party's workspace::

    startup/server_context.tenseal           server kit: public context
    startup/client_context.tenseal           site kit: secret context
    startup/client.key                       site kit: the site's NVFlare private key (RSA), used to sign
    startup/peers/<site>.crt|.pem            site kit: the other sites' certificates / public keys

The contexts must be medsilo's public-key CKKS contexts (:func:`medsilo.secure.ckks.make_context`);
NVFlare's stock HE builder writes symmetric ones, which :mod:`medsilo.secure.ckks` refuses (they carry no
public key, so a foreign key set could not be detected). ``medsilo provision`` writes the files above
(:class:`medsilo.provisioning.builders.MedsiloHEBuilder`, :class:`~medsilo.provisioning.builders.PeerCertsBuilder`),
and NVFlare signs them with the rest of ``startup/``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from medsilo.secure.ckks import CKKSError, load_context, make_context, save_context
from medsilo.secure.release import (
    generate_signing_key,
    load_private_key,
    load_public_key,
    save_private_key,
    save_public_key,
)

HE_DIR_ENV = "MEDSILO_HE_DIR"
"""Simulation only: folder of generated key material (layout in the module docstring)."""
SERVER_CONTEXT, CLIENT_CONTEXT = "server_context.tenseal", "client_context.tenseal"


def he_dir() -> Path | None:
    """The simulation key folder, or ``None`` in a deployment."""
    value = os.environ.get(HE_DIR_ENV)
    return Path(value) if value else None


def generate_simulation_keys(out: str | Path, sites: Iterable[str], poly_modulus_degree: int = 8192) -> Path:
    """Write a fresh CKKS key set and one signing key per site under ``out`` (layout above)."""
    out = Path(out)
    sites = list(sites)
    for folder in ("server", "public", *sites):
        (out / folder).mkdir(parents=True, exist_ok=True)
    ctx = make_context(poly_modulus_degree)
    save_context(ctx, out / "server" / SERVER_CONTEXT, secret=False)
    for site in sites:
        save_context(ctx, out / site / CLIENT_CONTEXT, secret=True)
        key = generate_signing_key()
        save_private_key(key, out / site / "signing_key.pem")
        save_public_key(key.public_key(), out / "public" / f"{site}.pem")
    return out


def server_context(workspace: str | Path):
    """The server's public context (refuses a file that holds the secret key)."""
    base = he_dir()
    path = base / "server" / SERVER_CONTEXT if base else Path(workspace) / "startup" / SERVER_CONTEXT
    return load_context(path, secret=False)


def site_context(site: str, workspace: str | Path):
    """The site's secret context."""
    base = he_dir()
    path = base / site / CLIENT_CONTEXT if base else Path(workspace) / "startup" / CLIENT_CONTEXT
    return load_context(path, secret=True)


def signing_key(site: str, workspace: str | Path):
    """The site's private signing key (Ed25519 in simulation, the kit's RSA key in deployment)."""
    base = he_dir()
    return load_private_key(base / site / "signing_key.pem" if base else Path(workspace) / "startup" / "client.key")


def peer_public_keys(workspace: str | Path) -> dict:
    """Every known site's public signing key, by site name (from ``public/`` or ``startup/peers/``)."""
    base = he_dir()
    folder = base / "public" if base else Path(workspace) / "startup" / "peers"
    if not folder.is_dir():
        raise CKKSError(
            f"{folder}: no folder of site public keys; the site cannot check who contributed to an aggregate "
            "(re-provision the kit, or run through 'medsilo sim')"
        )
    keys = {p.stem: load_public_key(p) for p in sorted(folder.iterdir()) if p.suffix in (".pem", ".crt")}
    if not keys:
        raise CKKSError(f"{folder}: holds no .pem or .crt public keys")
    return keys
