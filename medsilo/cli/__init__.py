"""The ``medsilo`` command: one entry point, one sub-command module each (``add_parser`` + ``run``).

Every command has ``--help``. Anything the user can fix (a bad option, file or field) ends the command
with a one-line ``medsilo: error: ...`` on stderr and exit status 2, never a traceback.

The CLI is the one layer whose modules import the layers below inside their ``run`` functions: every
sub-command module is imported to build the parser, so ``medsilo --help`` and a light command (``audit
verify``, ``synth``) would otherwise load torch, MONAI, TenSEAL and NVFlare for all of them. Everywhere else
imports sit at the top of the module; the few exceptions say why in a comment (MONAI, explained in
:mod:`medsilo.medical`; TenSEAL in :mod:`medsilo.secure.keys`, dp_accounting in :mod:`medsilo.secure.audit` and
matplotlib in the HTML renderers, each kept off ``medsilo audit verify``'s path).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from medsilo import __version__
from medsilo.errors import MedsiloError

COMMANDS: tuple[str, ...] = ("demo", "synth", "job", "sim", "predict", "report", "audit", "pcevolve", "provision", "site",
                             "data", "poc", "keys")
"""Sub-command modules under ``medsilo.cli``, in ``--help`` order."""


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (sub-command modules are imported here, each cheap to import)."""
    parser = argparse.ArgumentParser(
        prog="medsilo",
        description="Cross-silo federated learning for hospitals on NVIDIA FLARE.",
    )
    parser.add_argument("--version", action="version", version=f"medsilo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"medsilo.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MedsiloError as exc:
        print(f"medsilo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medsilo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
