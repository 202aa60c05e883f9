"""Site config (``local/medsilo_site.yml`` in a site's startup kit) and ``sites.yml`` (DESIGN §7, §12).

Only sites know where their data lives: a job names a dataset (``cxr``), and each site maps that name
to a manifest on its own disk. The site config also carries the site's privacy policy, which the site
enforces whatever a job asks for.

Example ``local/medsilo_site.yml``::

    site: hospital-1
    datasets:
      cxr: {manifest: /data/cxr/manifest.csv, modality: cxr}
      slides: {manifest: /data/wsi/slides.csv, modality: pathology, slides: {mpp: 0.5, patch_size: 224}}
      pacs-cxr:                                # pulled from the research PACS (medsilo.medical.data.pacs)
        modality: cxr
        pacs: {url: https://pacs.example.org/dicom-web, labels: /data/cxr/pacs_labels.csv,
               username: medsilo, password_env: MEDSILO_PACS_PASSWORD, max_cache_mb: 20000}
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

Relative manifest paths resolve against the folder of the file that names them (so do a PACS dataset's
``labels``, ``password_file`` and ``cache``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, StringConstraints, ValidationInfo, field_validator, model_validator

from medsilo.config.common import SITE_NAME_PATTERN, Modality, PrivacyMode, Strict, resolve_path
from medsilo.config.loading import load_yaml

SiteName = Annotated[str, StringConstraints(pattern=SITE_NAME_PATTERN)]
DatasetName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]


def _resolve_optional(value: Path | None, info: ValidationInfo) -> Path | None:
    return None if value is None else resolve_path(value, info)


class PacsSource(Strict):
    """A DICOMweb endpoint (the hospital's research PACS) and the label CSV that picks its instances
    (:mod:`medsilo.medical.data.pacs` pulls them into the site's cache and reads them like files).

    Credentials come from this site's own config or environment, never from a job: ``username`` plus the
    *name* of an environment variable (``password_env``) or a file readable only by the site's user
    (``password_file``, mode 0600) holding the password. The password itself is never written here.

    Attributes:
        url: the DICOMweb root, ``http(s)://host[:port]/path`` (QIDO-RS and WADO-RS below it); no user or
            password inside the URL.
        labels: label CSV ``study_uid[,series_uid][,sop_uid],label[,patient_id,split]``: one row per instance,
            or per series / study when ``sop_uid`` (and ``series_uid``) are blank; every other column is a
            manifest column, passed through (see :mod:`medsilo.medical.data.pacs`).
        username: HTTP basic-auth user; omit it (and the password) for a PACS that asks for none.
        password_env: name of the environment variable holding the password.
        password_file: file holding the password (its first line), readable by its owner only.
        cache: folder of the pulled instances, default ``data_cache`` beside this config file (a kit's
            ``local/data_cache``); each dataset uses ``<cache>/<site>/<dataset>/``.
        max_cache_mb: the most the dataset's cache may hold, in MB (10⁶ bytes); a pull past it stops with
            an error (default 51200).
        timeout_s: seconds to wait for the PACS to connect or answer (default 30).
    """

    url: str = Field(pattern=r"^https?://[^\s/?#@]+(/[^\s?#]*)?$")  # http(s)://host[:port][/path]
    labels: Path
    username: str | None = Field(default=None, min_length=1)
    password_env: EnvName | None = None
    password_file: Path | None = None
    cache: Path = Field(default=Path("data_cache"), validate_default=True)
    max_cache_mb: float = Field(default=51200, gt=0)
    timeout_s: float = Field(default=30, gt=0)

    _resolve = field_validator("labels", "cache")(resolve_path)
    _resolve_file = field_validator("password_file")(_resolve_optional)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_password(cls, data: object) -> object:
        if isinstance(data, dict) and "password" in data:
            raise ValueError("password: never write the password in the config; put it in an environment variable "
                             "named by password_env, or in a file readable only by the site user named by password_file")  # fmt: skip
        if isinstance(data, dict) and "@" in urlsplit(str(data.get("url", ""))).netloc:
            # checked before the field, whose error would repeat the value (and the password in it)
            raise ValueError("url: holds a user or password (user:password@host); write the URL without them and "
                             "use username with password_env or password_file")  # fmt: skip
        return data

    @model_validator(mode="after")
    def _one_password_source(self) -> PacsSource:
        if self.password_env is not None and self.password_file is not None:
            raise ValueError("give password_env or password_file, not both")
        if self.username is not None and self.password_env is None and self.password_file is None:
            raise ValueError("username is set but no password: name password_env or password_file")
        if self.username is None and (self.password_env is not None or self.password_file is not None):
            raise ValueError("a password needs a username: set username")
        return self


class SlideTiling(Strict):
    """How this site cuts whole-slide images into patches (:mod:`medsilo.medical.data.slides`).

    A site's settings, not a job's: the magnification, patch size, bound and seed fix which patches a slide
    yields, and the tiles are cached under those settings.

    Attributes:
        patch_size: side of a patch in pixels, at the target magnification (8–4096, default 224).
        mpp: target resolution in microns per pixel (default 0.5, about 20×). Give ``mpp`` or
            ``magnification``, not both.
        magnification: target objective power (e.g. 20 for 20×), instead of ``mpp``.
        slide_mpp: level-0 microns per pixel of slides that lack the ``openslide.mpp-x`` property; slides
            that have it keep their own.
        slide_magnification: objective power of slides that lack ``openslide.objective-power``.
        max_patches: the most patches one manifest row (a whole slide, or one listed region) yields (≥ 1).
        min_tissue: share of a patch the tissue mask must cover for it to be kept (0 < f ≤ 1).
        seed: seeds which patches are picked when a slide has more than ``max_patches``.
        cache: folder of the tile cache; default ``.medsilo-tiles/`` beside the slide manifest.
    """

    patch_size: int = Field(default=224, ge=8, le=4096)
    mpp: float | None = Field(default=None, gt=0)
    magnification: float | None = Field(default=None, gt=0)
    slide_mpp: float | None = Field(default=None, gt=0)
    slide_magnification: float | None = Field(default=None, gt=0)
    max_patches: int = Field(default=64, ge=1)
    min_tissue: float = Field(default=0.5, gt=0, le=1)
    seed: int = 0
    cache: Path | None = None

    _resolve = field_validator("cache")(_resolve_optional)

    @model_validator(mode="after")
    def _one_target(self) -> SlideTiling:
        if self.mpp is not None and self.magnification is not None:
            raise ValueError("give mpp or magnification, not both")
        return self


def _check_source(manifest: Path | None, pacs: PacsSource | None, modality: str) -> None:
    """A dataset comes from a manifest or from a PACS, and a PACS holds DICOM (chest X-ray) only."""
    if (manifest is None) == (pacs is None):
        raise ValueError("give manifest (a CSV of files) or pacs (a DICOMweb endpoint), exactly one")
    if pacs is not None and modality != "cxr":
        raise ValueError(f"pacs: a PACS dataset holds DICOM chest X-rays (modality 'cxr'), not '{modality}'")


class DatasetRef(Strict):
    """Where one named dataset lives at this site.

    Attributes:
        manifest: CSV ``path,label[,patient_id,split]`` (see :mod:`medsilo.config.manifest`), or a whole-slide
            manifest ``slide,label[,patient_id,split,x,y,w,h]`` (see :mod:`medsilo.medical.data.slides`).
        modality: ``cxr`` or ``pathology``; a job for the other modality is refused.
        slides: how whole slides are tiled (pathology only); defaults apply when a slide manifest has none.
        pacs: instead of ``manifest``: a DICOMweb endpoint and a label CSV (chest X-ray only).
    """

    manifest: Path | None = None
    modality: Modality
    slides: SlideTiling | None = None
    pacs: PacsSource | None = None

    _resolve = field_validator("manifest")(_resolve_optional)

    @model_validator(mode="after")
    def _one_source(self) -> DatasetRef:
        _check_source(self.manifest, self.pacs, self.modality)
        return self

    @model_validator(mode="after")
    def _slides_are_pathology(self) -> DatasetRef:
        if self.slides is not None and self.modality != "pathology":
            raise ValueError(f"slides: whole-slide tiling is for modality 'pathology', not '{self.modality}'")
        return self


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
        cache_images: keep preprocessed images in the site's workspace (``cache/images``; simulation:
            ``cache/<site>`` beside ``sites.yml``) so the next job does not decode unchanged files again
            (:mod:`medsilo.medical.data.cache`). Off: every job reads every file.
    """

    max_unreadable_fraction: float = Field(default=0.05, ge=0, lt=1)
    allow_identifiable_dicom: bool = False
    allow_paths_outside_manifest: bool = False
    cache_images: bool = True


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
    manifest: Path | None = None
    modality: Modality
    slides: SlideTiling | None = None
    pacs: PacsSource | None = None
    privacy: PrivacyPolicy | None = None
    data: DataPolicy | None = None

    _resolve = field_validator("manifest")(_resolve_optional)

    @model_validator(mode="after")
    def _one_source(self) -> SitesEntry:
        _check_source(self.manifest, self.pacs, self.modality)
        return self


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
                datasets={
                    e.dataset: DatasetRef(
                        manifest=e.manifest, modality=e.modality, slides=e.slides, pacs=e.pacs
                    )
                },
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
