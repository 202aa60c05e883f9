"""A small real federation for attack tests: four sites and a server with keys from a local root CA, a CKKS
key set, and fresh ledgers per test — the same files ``medsilo sim`` uses, driven without NVFlare."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from medsilo.config.site import PrivacyPolicy
from medsilo.secure.keys import (
    HE_DIR_ENV,
    LEDGER_DIR_ENV,
    SERVER,
    Party,
    ensure_simulation_pki,
    generate_simulation_contexts,
)
from medsilo.secure.ledger import LEDGER_FILE
from medsilo.secure.pipeline import pipeline_module
from medsilo.secure.pipeline.base import JobTerms

SITES = ("hospital-1", "hospital-2", "hospital-3", "hospital-4")
K, D = 3, 4


def upload(seed: int) -> dict[str, np.ndarray]:
    """A prototype-shaped upload (K×d sums, K counts) with values that differ per seed."""
    rng = np.random.default_rng(seed)
    return {"proto_sum": rng.normal(size=(K, D)).astype(np.float32), "proto_count": rng.integers(1, 9, K).astype(np.float32)}


@dataclass
class Federation:
    """Pipelines of the four sites and the server over one set of key files (see the module docstring)."""

    root: Path

    def terms(self, mode: str, job: str = "job-1", releases: bool = True, min_contributors: int = 2,
              rounds: int = 2, dp=None) -> JobTerms:  # fmt: skip
        return JobTerms(job=job, mode=mode, rounds=rounds, min_contributors=min_contributors, dp=dp, releases=releases)

    def site(self, name: str, terms: JobTerms, policy: PrivacyPolicy | None = None):
        return pipeline_module(terms.mode).Site(Party(name, self.root), terms, policy or PrivacyPolicy())

    def server(self, terms: JobTerms):
        return pipeline_module(terms.mode).Server(Party(SERVER, self.root), terms)

    def ledger(self, party: str) -> Path:
        return self.root / "ledgers" / party / LEDGER_FILE

    @property
    def root_ca(self) -> Path:
        return self.root / "ledgers" / "pki" / "rootCA.pem"


@pytest.fixture(scope="session")
def _keys(tmp_path_factory) -> Path:
    keys = tmp_path_factory.mktemp("keys")
    ensure_simulation_pki(keys / "ledgers", SITES)
    generate_simulation_contexts(keys / "he", SITES)
    return keys


@pytest.fixture
def federation(_keys, tmp_path, monkeypatch) -> Federation:
    shutil.copytree(_keys / "ledgers" / "pki", tmp_path / "ledgers" / "pki")
    monkeypatch.setenv(LEDGER_DIR_ENV, str(tmp_path / "ledgers"))
    monkeypatch.setenv(HE_DIR_ENV, str(_keys / "he"))
    return Federation(tmp_path)
