"""Key custody: where a party's private key and the network's CKKS secret came from, recorded in its kit.

A security officer's question is "who else has our keys?". The answer depends on how the kit was made, so
provisioning writes it down, beside the site's config, in ``<kit>/local/custody.json`` (no secret in it,
mode 0644)::

    {"format": "medsilo-custody/1",
     "provisioning": "sites" | "central",
     "private_key": "made-here" | "central",
     "ckks": {"source": "made-here" | "wrapped" | "central" | "none", "from": "<site>" | null,
              "key_version": 1}}

* ``provisioning: sites`` — distributed provisioning: this party made its own private key and sent only a
  certificate request; the coordinator approved it with the root CA and never held the key.
* ``provisioning: central`` — ``medsilo provision --network`` (demos, POC): the coordinator generated every
  party's key and the CKKS secret context, so it could sign as this party and, with the server, decrypt
  uploads (the trusting mode; ``medsilo site check`` warns about it).
* ``ckks.source`` — ``made-here``: this site generated the network's CKKS secret context; ``wrapped``: it
  received it from site ``from``, wrapped to its own certificate (:mod:`medsilo.secure.keywrap`); ``central``:
  the coordinator made it; ``none``: the party holds no secret context (the server, admins, auditors).

``medsilo site check`` reports it, and a site records it (signed) in its ledger's ``policy_loaded`` entry so
an auditor can tell, per ledger, whether the coordinator could have signed it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medsilo.errors import MedsiloError
from medsilo.fs import write_atomic

CUSTODY_FILE = Path("local") / "custody.json"
"""Where the record lives, relative to a kit (or a site workspace)."""
FORMAT = "medsilo-custody/1"
PROVISIONING = ("sites", "central")
KEY_SOURCES = ("made-here", "central")
CKKS_SOURCES = ("made-here", "wrapped", "central", "none")


class CustodyError(MedsiloError):
    """A custody record that is missing fields or holds values outside the allowed ones."""


@dataclass(frozen=True)
class Custody:
    """Where one party's secrets came from (module docstring).

    Attributes:
        provisioning: ``sites`` (distributed) or ``central`` (the coordinator made the keys).
        private_key: ``made-here`` or ``central``.
        ckks_source: ``made-here``, ``wrapped``, ``central`` or ``none``.
        ckks_from: the site the secret context came from when ``ckks_source`` is ``wrapped``.
        key_version: the CKKS key set's version (≥ 1; 0 when the party holds none).
    """

    provisioning: str
    private_key: str
    ckks_source: str = "none"
    ckks_from: str | None = None
    key_version: int = 0

    def __post_init__(self) -> None:
        for field, value, allowed in (("provisioning", self.provisioning, PROVISIONING),
                                      ("private_key", self.private_key, KEY_SOURCES),
                                      ("ckks.source", self.ckks_source, CKKS_SOURCES)):  # fmt: skip
            if value not in allowed:
                raise CustodyError(f"custody {field}: must be one of {', '.join(allowed)}, got {value!r}")
        if (self.ckks_source == "wrapped") != bool(self.ckks_from):
            raise CustodyError("custody ckks.from: names the sending site exactly when ckks.source is 'wrapped'")
        if isinstance(self.key_version, bool) or not isinstance(self.key_version, int) or self.key_version < 0:
            raise CustodyError(f"custody ckks.key_version: must be an integer ≥ 0, got {self.key_version!r}")
        if (self.ckks_source == "none") != (self.key_version == 0):
            raise CustodyError("custody ckks.key_version: 0 exactly when the party holds no CKKS secret")

    @property
    def coordinator_could_sign(self) -> bool:
        """Whether the coordinator ever held this party's private key."""
        return self.private_key == "central"

    def to_json(self) -> dict[str, Any]:
        """The JSON record (module docstring); also what a ``policy_loaded`` ledger entry carries."""
        d = asdict(self)
        return {"format": FORMAT, "provisioning": d["provisioning"], "private_key": d["private_key"],
                "ckks": {"source": d["ckks_source"], "from": d["ckks_from"], "key_version": d["key_version"]}}  # fmt: skip

    @classmethod
    def from_json(cls, data: Any, where: str = "custody") -> Custody:
        """Parse a record; :class:`CustodyError` names ``where`` and the first bad field."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CustodyError(f"{where}: not a {FORMAT} record")
        ckks = data.get("ckks")
        if set(data) != {"format", "provisioning", "private_key", "ckks"} or not isinstance(ckks, dict) or \
                set(ckks) != {"source", "from", "key_version"}:  # fmt: skip
            raise CustodyError(f"{where}: expected fields format, provisioning, private_key, ckks.source, "
                               "ckks.from, ckks.key_version")  # fmt: skip
        try:
            return cls(data["provisioning"], data["private_key"], ckks["source"], ckks["from"], ckks["key_version"])
        except CustodyError as exc:
            raise CustodyError(f"{where}: {exc}") from None

    def describe(self) -> str:
        """One line for ``site check`` and the audit."""
        key = "made here" if self.private_key == "made-here" else "made by the coordinator (central provisioning)"
        ckks = {"made-here": f"made here (key version {self.key_version})",
                "wrapped": f"received wrapped from {self.ckks_from} (key version {self.key_version})",
                "central": f"made by the coordinator (key version {self.key_version})",
                "none": "none held"}[self.ckks_source]  # fmt: skip
        return f"private key {key}; CKKS secret {ckks}"


def write_custody(kit: str | os.PathLike, custody: Custody) -> Path:
    """Write ``<kit>/local/custody.json`` (atomic, 0644: it holds no secret)."""
    path = Path(kit) / CUSTODY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, json.dumps(custody.to_json(), indent=2) + "\n", mode=0o644, what="custody record",
                        error=CustodyError)  # fmt: skip


def read_custody(kit: str | os.PathLike) -> Custody | None:
    """The kit's custody record, or ``None`` for a kit made before custody was recorded (treat as central).

    Raises:
        CustodyError: the file exists but is not a valid record (named).
    """
    path = Path(kit) / CUSTODY_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CustodyError(f"{path}: not readable JSON ({type(exc).__name__}); re-assemble the kit") from None
    return Custody.from_json(data, str(path))
