"""The privacy ledger: an append-only, hash-chained, signed JSON-lines record of what left a party (DESIGN §6).

One file per party (a site, or ``server``), normally ``<workspace>/privacy_ledger.jsonl``. Each line is one
signed entry that names the previous line's hash, so an edited, deleted, inserted or moved line is found, and
names what left (kind, shapes, bytes, digests, ε spent), never data values.

Which module holds what (import from here: every name below is re-exported):

* :mod:`.format` — the line format, described field by field, and what both halves share: the constants
  (:data:`LEDGER_FILE`, :data:`EVENTS`, :data:`SPENDING_EVENTS`, :data:`GENESIS`, …), :class:`LedgerError`,
  the canonical encoding (:func:`canonical`, :func:`encode_line`), the hashes (:func:`line_hash`,
  :func:`entry_hash`) and the check of one line's form (``parse_line``).
* :mod:`.write` — the writer: :class:`Ledger` (locked, fsync'd appends after checking the tail) and
  :func:`repair` (moves a torn last line aside; a person calls it).
* :mod:`.verify` — the reader and verifier: :func:`verify_file`, :func:`verify` (:class:`FileCheck`,
  :class:`Problem`: the first bad line of each file), :func:`entries` (parsed, unchecked),
  :func:`verified_entries`, and the budget totals :func:`costs` and :func:`cumulative`; its docstring also
  says what a ledger cannot show on its own and how to check one entry with ``openssl``.

Imports point one way: ``write`` → ``verify`` (``Ledger.read`` returns verified entries) → ``format``. Checks
across ledgers (a site ledger cut short against the server's record) are :mod:`medsilo.secure.anchors`'.
"""

from medsilo.secure.ledger.format import (
    EVENTS,
    GENESIS,
    LEDGER_FILE,
    MAX_NUMBERS,
    REQUIRED_FIELDS,
    SIGNER_FIELDS,
    SPENDING_EVENTS,
    LedgerError,
    canonical,
    encode_line,
    entry_hash,
    line_hash,
)
from medsilo.secure.ledger.verify import (
    FileCheck,
    Problem,
    costs,
    cumulative,
    entries,
    verified_entries,
    verify,
    verify_file,
)
from medsilo.secure.ledger.write import Ledger, repair

__all__ = [
    "EVENTS",
    "GENESIS",
    "LEDGER_FILE",
    "MAX_NUMBERS",
    "REQUIRED_FIELDS",
    "SIGNER_FIELDS",
    "SPENDING_EVENTS",
    "FileCheck",
    "Ledger",
    "LedgerError",
    "Problem",
    "canonical",
    "costs",
    "cumulative",
    "encode_line",
    "entries",
    "entry_hash",
    "line_hash",
    "repair",
    "verified_entries",
    "verify",
    "verify_file",
]
