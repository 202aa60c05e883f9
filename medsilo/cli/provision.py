"""``medsilo provision``: NVFlare startup kits — distributed (each party keeps its own keys) or central (trusting).

Distributed (a real network; :mod:`medsilo.provisioning.distributed`)::

    coordinator  medsilo provision init --network NETWORK.yml --out COORD
    each party   medsilo provision request --network NETWORK.yml --name NAME --out PARTY
    coordinator  medsilo provision approve --coord COORD PARTY/NAME.csr
    each party   medsilo provision assemble --network NETWORK.yml --request-dir PARTY --cert NAME.crt \\
                     --root-ca rootCA.pem --fingerprint FP [--peers COORD/certs] [--relay COORD/relay] --out KITS
    a site       medsilo provision import-key --kit KIT --network NETWORK.yml --relay RELAY
    a site       medsilo provision share-key --kit KIT --network NETWORK.yml --relay RELAY   (a site joined)
    site/server  medsilo provision peers --kit KIT --certs COORD/certs                      (a site joined)

Central (demos, POC; the coordinator makes and could use every key): ``medsilo provision --network N --out DIR``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "provision",
        help="NVFlare startup kits: distributed (init/request/approve/assemble) or central (--network --out)",
        description=(
            "Distributed provisioning (the normal mode): the coordinator inits a root CA and approves requests; each "
            "party makes its own private key, sends only a request and assembles its own kit; one hospital makes "
            "the CKKS secret and wraps it for its peers. Central provisioning (--network NETWORK.yml --out DIR, "
            "no verb) is the TRUSTING mode for demos and POC: the coordinator makes every key."
        ),
    )
    p.add_argument("--network", type=Path, metavar="NETWORK.yml", help="central mode: network description")
    p.add_argument("--out", type=Path, metavar="DIR", help="central mode: provisioning folder")
    p.set_defaults(func=run)
    verbs = p.add_subparsers(dest="verb", metavar="VERB")

    v = verbs.add_parser("init", help="coordinator: make the root CA for NETWORK.yml")
    v.add_argument("--network", type=Path, required=True, metavar="NETWORK.yml")
    v.add_argument("--out", type=Path, required=True, metavar="COORD", help="the coordinator's folder")
    v.set_defaults(func=run_init)

    v = verbs.add_parser("request", help="a party: make its own private key and a certificate request")
    v.add_argument("--network", type=Path, required=True, metavar="NETWORK.yml")
    v.add_argument("--name", required=True, help="this party's name in NETWORK.yml (site, server, admin, auditor)")
    v.add_argument("--out", type=Path, required=True, metavar="PARTY", help="folder for the key (never leaves)")
    v.set_defaults(func=run_request)

    v = verbs.add_parser("approve", help="coordinator: certify requests (.csr) with the root CA")
    v.add_argument("--coord", type=Path, required=True, metavar="COORD")
    v.add_argument("csr", type=Path, nargs="+", metavar="NAME.csr")
    v.set_defaults(func=run_approve)

    v = verbs.add_parser("revoke", help="coordinator: remove parties (their certificates on the revocation list)")
    v.add_argument("--coord", type=Path, required=True, metavar="COORD")
    v.add_argument("--reason", default="left", choices=("left", "compromised", "superseded"),
                   help="left: it left the network; compromised: its key leaked (default: left)")  # fmt: skip
    v.add_argument("name", nargs="+", help="the parties' names (their approved certificates)")
    v.set_defaults(func=run_revoke)

    v = verbs.add_parser("assemble", help="a party: assemble its own kit from its key and its certificate")
    v.add_argument("--network", type=Path, required=True, metavar="NETWORK.yml")
    v.add_argument("--request-dir", type=Path, required=True, metavar="PARTY", help="the folder 'request' wrote")
    v.add_argument("--cert", type=Path, required=True, metavar="NAME.crt", help="the certificate the coordinator sent")
    v.add_argument("--root-ca", type=Path, required=True, metavar="rootCA.pem")
    v.add_argument("--fingerprint", default=None, help="the root CA fingerprint 'init' printed (check it!)")
    v.add_argument("--peers", type=Path, default=None, metavar="CERTS", help="folder of the sites' certificates")
    v.add_argument("--relay", type=Path, default=None, metavar="RELAY", help="the CKKS relay folder")
    v.add_argument("--out", type=Path, required=True, metavar="KITS", help="the kit goes to KITS/<name>")
    v.set_defaults(func=run_assemble)

    v = verbs.add_parser("import-key", help="a site: open its wrapped CKKS secret from the relay folder")
    v.add_argument("--kit", type=Path, required=True)
    v.add_argument("--network", type=Path, required=True, metavar="NETWORK.yml")
    v.add_argument("--relay", type=Path, required=True, metavar="RELAY")
    v.add_argument("--version", type=int, default=None, help="key version (default: the newest)")
    v.set_defaults(func=run_import)

    v = verbs.add_parser("share-key", help="a site holding the key: wrap it for peers that have no copy yet")
    v.add_argument("--kit", type=Path, required=True)
    v.add_argument("--network", type=Path, required=True, metavar="NETWORK.yml")
    v.add_argument("--relay", type=Path, required=True, metavar="RELAY")
    v.set_defaults(func=run_share)

    v = verbs.add_parser("peers", help="a site or the server: refresh startup/peers from the approved certificates")
    v.add_argument("--kit", type=Path, required=True)
    v.add_argument("--certs", type=Path, required=True, metavar="CERTS")
    v.set_defaults(func=run_peers)

    v = verbs.add_parser("server-context", help="the server: install the public CKKS context from the relay")
    v.add_argument("--kit", type=Path, required=True)
    v.add_argument("--relay", type=Path, required=True, metavar="RELAY")
    v.set_defaults(func=run_server_context)


def run(args: argparse.Namespace) -> int:
    from medsilo.errors import MedsiloError
    from medsilo.provisioning.provision import provision

    if args.network is None or args.out is None:
        raise MedsiloError("provision: give a verb (init, request, approve, assemble, …) or, for the central "
                           "trusting mode, --network NETWORK.yml --out DIR")  # fmt: skip
    print("central provisioning — the TRUSTING mode: this machine makes every party's private key and the CKKS "
          "secret, so whoever holds it could sign as any site and, with the server, decrypt uploads. For a real "
          "network use 'medsilo provision init|request|approve|assemble'.")  # fmt: skip
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


def run_init(args: argparse.Namespace) -> int:
    from medsilo.provisioning.distributed import init

    fp = init(args.network, args.out)
    print(f"root CA in {args.out / 'ca'}; keep {args.out / 'ca' / 'rootCA.key'} here, it never leaves")
    print(f"send every party {args.out / 'network.yml'} and {args.out / 'ca' / 'rootCA.pem'} with its fingerprint:")
    print(f"  {fp}")
    return 0


def run_request(args: argparse.Namespace) -> int:
    from medsilo.provisioning.distributed import request

    req = request(args.network, args.name, args.out)
    print(f"private key {req.key} (0600): keep it here, it never leaves this machine")
    print(f"send {req.csr} to the coordinator")
    return 0


def run_approve(args: argparse.Namespace) -> int:
    from medsilo.provisioning.distributed import approve

    for csr in args.csr:
        print(f"certified {approve(args.coord, csr)}")
    print(f"send each party its certificate and {args.coord / 'ca' / 'rootCA.pem'}; sites and the server also "
          f"{args.coord / 'certs'} (peers) and {args.coord / 'relay'} (CKKS key relay)")
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    from medsilo.provisioning.distributed import revoke_party

    out = revoke_party(args.coord, args.name, reason=args.reason)
    print(f"revoked {', '.join(args.name)} ({args.reason}); send {out} to every party as <kit>/local/crl.pem — "
          "from then on their signatures are refused and the audit flags entries they signed after now")
    return 0


def run_assemble(args: argparse.Namespace) -> int:
    from medsilo.provisioning.distributed import assemble, custody_summary

    if args.fingerprint is None:
        print("warning: --fingerprint not given; compare the root CA fingerprint with the coordinator's by phone")
    kit = assemble(args.network, args.request_dir, args.cert, args.root_ca, args.out, peers=args.peers,
                   relay=args.relay, root_ca_fingerprint=args.fingerprint)  # fmt: skip
    print(f"assembled {kit}: {custody_summary(kit)}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from medsilo.errors import MedsiloError
    from medsilo.provisioning.distributed import import_key
    from medsilo.provisioning.network import load_network

    try:
        version = import_key(args.kit, load_network(args.network), args.relay, args.version)
    except FileNotFoundError as exc:
        raise MedsiloError(f"{exc}; ask the key holder to run 'medsilo provision share-key'") from None
    print(f"{args.kit}: CKKS key version {version} imported (startup/client_context.tenseal, 0600)")
    return 0


def run_share(args: argparse.Namespace) -> int:
    from medsilo.provisioning.distributed import share_key
    from medsilo.provisioning.network import load_network

    done = share_key(args.kit, load_network(args.network), args.kit / "startup" / "peers", args.relay)
    print(f"wrapped the CKKS key for: {', '.join(done) or 'nobody new'}")
    return 0


def run_peers(args: argparse.Namespace) -> int:
    from medsilo.provisioning.distributed import update_peers

    print(f"{args.kit}: peers {', '.join(update_peers(args.kit, args.certs))}")
    return 0


def run_server_context(args: argparse.Namespace) -> int:
    from medsilo.provisioning.distributed import install_public_context

    version = install_public_context(args.kit, args.relay)
    print(f"{args.kit}: public CKKS context of key version {version} installed")
    return 0
