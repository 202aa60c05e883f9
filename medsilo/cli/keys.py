"""``medsilo keys rotate``: a new CKKS key set (version n+1) made at this site and wrapped for its peers."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="CKKS key versions of a site kit (distributed provisioning)",
                       description="Manage the network's CKKS key set from a site kit.")  # fmt: skip
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    v = verbs.add_parser("rotate", help="make key version n+1 here and wrap it for every peer site",
                         description="For a new study or after a compromise: this site makes CKKS key version n+1, "
                                     "keeps its secret (the old one is retired: jobs under it are refused), writes the "
                                     "public context and one wrapped blob per peer into RELAY/v<n+1>/. Then each peer "
                                     "runs 'medsilo provision import-key' and the server 'medsilo provision "
                                     "server-context'.")  # fmt: skip
    v.add_argument("--kit", type=Path, required=True, help="this site's kit")
    v.add_argument("--network", type=Path, required=True, metavar="NETWORK.yml")
    v.add_argument("--relay", type=Path, required=True, metavar="RELAY", help="the CKKS relay folder")
    v.set_defaults(func=run_rotate)


def run_rotate(args: argparse.Namespace) -> int:
    from medsilo.provisioning.distributed import make_key_set
    from medsilo.provisioning.network import load_network

    version = make_key_set(args.kit, load_network(args.network), None, args.relay)
    print(f"{args.kit}: CKKS key version {version} made here; peers import it from {args.relay / f'v{version}'}")
    return 0
