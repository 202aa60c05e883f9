"""Site config (``local/medsilo_site.yml`` in a site's startup kit) and ``sites.yml`` (DESIGN §7, §12).

Only sites know where their data lives: a job names a dataset (``cxr``), and each site maps that name
to a manifest on its own disk. The site config also carries the site's privacy policy, which the site
enforces whatever a job asks for.

Example ``local/medsilo_site.yml``::

    site: hospital-1
    datasets:
      cxr: {manifest: /data/cxr/manifest.csv, modality: cxr}
    privacy:
      allowed_algorithms: [fedavg, fedproto]   # omit to allow every algorithm
      required_mode: ckks                      # the least protection this site accepts
      min_contributors: 3                      # aggregate releases need this many signed sites
      budget: {epsilon: 8.0, delta: 1.0e-5, scope: network}
    data:
      max_unreadable_fraction: 0.05
      allow_identifiable_dicom: false
      allow_paths_outside_manifest: false
    compute: {threads: 2, device: cpu}

Relative manifest paths resolve against the folder of the file that names them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from medsilo.config.common import SITE_NAME_PATTERN, Modality, PrivacyMode, Strict, resolve_path
from medsilo.config.loading import load_yaml

SiteName = Annotated[str, StringConstraints(pattern=SITE_NAME_PATTERN)]
DatasetName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]


class DatasetRef(Strict):
    """Where one named dataset lives at this site.

    Attributes:
        manifest: CSV ``path,label[,patient_id,split]`` (see :mod:`medsilo.config.manifest`).
        modality: ``cxr`` or ``pathology``; a job for the other modality is refused.
    """

    manifest: Path
    modality: Modality

    _resolve = field_validator("manifest")(resolve_path)


class Budget(Strict):
    """The site's differential-privacy budget cap (DESIGN §5).

    Attributes:
        epsilon: the most ε this site releases within ``scope``, summed over jobs (> 0).
        delta: the δ of the (ε, δ) guarantee (0 < δ < 1).
        scope: the name of the budget the cap spans. Every DP release is charged, in the site's ledger, to
            the scope in force when it left; the running total sums that scope's entries only. ``network``
            (default): one budget for every job of this federation. A study name (e.g. ``pneumonia-2027``)
            gives that study its own budget; switching the scope starts a new total and leaves the old
            one in the ledger.
    """

    epsilon: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    scope: str = Field(default="network", min_length=1)


class PrivacyPolicy(Strict):
    """What this site lets out, whatever a job asks for.

    Attributes:
        allowed_algorithms: algorithm names this site runs; ``None`` allows every registered algorithm.
        required_mode: the least protection; a job asking for less is refused by the site.
        min_contributors: distinct signed sites an aggregate must contain before this site releases it.
        budget: DP budget cap; ``None`` means the site sets no cap. Required when ``required_mode``
            includes ``dp`` (a requirement of noise with no cap on ε would be met by any noise at all).
        pcevolve_generators: PCEvolve generators this site may use, as written in a job's
            ``augmentation.pcevolve.generator``: ``procedural`` (offline, default), an ``http(s)://`` endpoint
            (the site's picks — synthetic images — go to it), or ``torchscript:PATH``. A job naming another
            one is refused at this site.
    """

    allowed_algorithms: list[str] | None = None
    required_mode: PrivacyMode = "none"
    min_contributors: int = Field(default=2, ge=1)
    budget: Budget | None = None
    pcevolve_generators: list[str] = Field(default_factory=lambda: ["procedural"])

    @model_validator(mode="after")
    def _required_dp_has_a_cap(self) -> PrivacyPolicy:
        if "dp" in self.required_mode and self.budget is None:
            raise ValueError(f"required_mode '{self.required_mode}' needs a budget (privacy.budget: {{epsilon, delta}}): "
                             "without a cap any amount of noise, however small, would satisfy it")  # fmt: skip
        return self


class DataPolicy(Strict):
    """How strictly this site treats its own images.

    Attributes:
        max_unreadable_fraction: share of a split's files that may be skipped as unreadable before the
            whole load fails (0 ≤ f < 1).
        allow_identifiable_dicom: train on DICOMs whose identifying tags are filled in. Off by default:
            such files are refused before anything trains.
        allow_paths_outside_manifest: let a manifest name images outside its own folder (absolute paths,
            ``..``, symbolic links leading out). Off by default: such a row makes the manifest unusable, so
            whoever writes a manifest cannot bring other files of this machine into a job.
    """

    max_unreadable_fraction: float = Field(default=0.05, ge=0, lt=1)
    allow_identifiable_dicom: bool = False
    allow_paths_outside_manifest: bool = False


class ComputeLimits(Strict):
    """Resources a job may use at this site.

    Attributes:
        threads: torch intra-op threads (≥ 1).
        device: ``cpu`` or ``cuda``.
        max_batch_size: a job's batch size is capped to this.
    """

    threads: int = Field(default=2, ge=1)
    device: Literal["cpu", "cuda"] = "cpu"
    max_batch_size: int = Field(default=256, ge=1)


class SiteConfig(Strict):
    """One site's ``local/medsilo_site.yml``."""

    site: SiteName
    datasets: dict[DatasetName, DatasetRef] = Field(min_length=1)
    privacy: PrivacyPolicy = PrivacyPolicy()
    data: DataPolicy = DataPolicy()
    compute: ComputeLimits = ComputeLimits()


class SitesEntry(Strict):
    """One site of ``sites.yml``: the simulator's stand-in for that site's own config.

    ``privacy`` and ``data`` (optional, not written by ``medsilo synth``) give the simulated site a privacy
    policy, e.g. a DP budget cap, and a data policy, exactly as a deployed site's ``local/medsilo_site.yml``
    would.
    """

    dataset: DatasetName
    manifest: Path
    modality: Modality
    privacy: PrivacyPolicy | None = None
    data: DataPolicy | None = None

    _resolve = field_validator("manifest")(resolve_path)


class SitesFile(Strict):
    """``sites.yml`` written by ``medsilo synth`` and read by ``medsilo sim`` (DESIGN §12)."""

    sites: dict[SiteName, SitesEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_modality(self) -> SitesFile:
        modalities = {entry.modality for entry in self.sites.values()}
        if len(modalities) > 1:
            raise ValueError(f"all sites must share one modality, got {sorted(modalities)}")
        return self

    def site_configs(self) -> dict[str, SiteConfig]:
        """One default :class:`SiteConfig` per site, as the simulator runs them."""
        return {
            name: SiteConfig(
                site=name,
                datasets={e.dataset: DatasetRef(manifest=e.manifest, modality=e.modality)},
                **({"privacy": e.privacy} if e.privacy is not None else {}),
                **({"data": e.data} if e.data is not None else {}),
            )
            for name, e in self.sites.items()
        }


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate a site config file."""
    return load_yaml(path, SiteConfig)


def load_sites_file(path: str | Path) -> SitesFile:
    """Read and validate a ``sites.yml``."""
    return load_yaml(path, SitesFile)
