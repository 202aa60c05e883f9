"""``medsilo provision``: NVFlare startup kits for a network described in NETWORK.yml."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "provision",
        help="NVFlare startup kits for server, hospitals, admins and auditors",
        description=(
            "Write OUT/project.yml from NETWORK.yml and run NVFlare provisioning with medsilo's builders: CKKS key set, "
            "authorization with an auditor role and no custom code, class allow-list, storage in the workspace, "
            "privacy.json scopes, a site config template per hospital. Kits land in OUT/<project>/prod_NN/."
        ),
    )
    p.add_argument("--network", type=Path, required=True, metavar="NETWORK.yml", help="network description")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="provisioning folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medsilo.provisioning.provision import provision

    kits = provision(args.network, args.out)
    net = kits.network
    print(f"wrote startup kits to {kits.prod_dir}")
    print(f"  server      {kits.server}   (host {net.server.host}, port {net.server.port})")
    for name, h in net.hospitals.items():
        print(f"  {'hospital':<13} {kits.site(name)}   (requires {h.require})")
    for a in net.admins:
        print(f"  {a.role:<13} {kits.admin(a.name)}")
    for a in net.auditors:
        print(f"  {'auditor':<13} {kits.admin(a.name)}")
    print(f"keep {kits.prod_dir.parent / 'state'} (root CA private key) with the coordinator; send each party "
          "only its own kit")
    return 0
