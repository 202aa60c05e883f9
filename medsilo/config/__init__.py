"""Validated configuration: site config, job spec, ``sites.yml`` and dataset manifests.

Each file is parsed once, at the boundary, into a typed object; components trust those objects.
Errors name the file, the dotted field and the value (see :mod:`medsilo.config.loading`).
"""

from medsilo.config.job import JobSpec, load_job_spec
from medsilo.config.loading import ConfigError
from medsilo.config.manifest import Manifest, ManifestError, ManifestRow, read_manifest
from medsilo.config.site import SiteConfig, SitesFile, load_site_config, load_sites_file

__all__ = [
    "ConfigError",
    "JobSpec",
    "Manifest",
    "ManifestError",
    "ManifestRow",
    "SiteConfig",
    "SitesFile",
    "load_job_spec",
    "load_site_config",
    "load_sites_file",
    "read_manifest",
]
