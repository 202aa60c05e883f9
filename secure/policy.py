"""Site policy: what a site agrees to run, checked at the site before anything trains (DESIGN §3, §7).

A site's ``privacy`` section (:class:`~medsilo.config.site.PrivacyPolicy`) wins over the job: a job
whose algorithm the site does not allow, or whose privacy mode is weaker than the site requires, is
refused with a message naming the site, the job's value and the site's rule. Refusing is the
fail-closed choice: the site never quietly "upgrades" a job, because the job's other sites would then
run a different protocol than the one the data scientist submitted.
"""

from __future__ import annotations

from medsilo.config.common import PRIVACY_STRENGTH
from medsilo.config.job import JobSpec
from medsilo.config.site import SiteConfig
from medsilo.errors import MedsiloError


class PolicyRefusal(MedsiloError):
    """The site's policy does not allow this job."""


def check_job(site: SiteConfig, job: JobSpec) -> None:
    """Raise :class:`PolicyRefusal` when ``site`` must not run ``job``; return quietly otherwise.

    Checks, in order: the dataset exists at the site with the job's modality, the algorithm is
    allowed, a PCEvolve generator the job names for this site is one the site allows, and the job's
    privacy mode applies every protection the site requires.
    """
    ref = site.datasets.get(job.dataset)
    if ref is None:
        raise PolicyRefusal(
            f"site {site.site}: job '{job.name}' asks for dataset '{job.dataset}', which this site does not "
            f"define (it has: {', '.join(sorted(site.datasets))}); add it under 'datasets' in the site config"
        )
    if ref.modality != job.modality:
        raise PolicyRefusal(
            f"site {site.site}: dataset '{job.dataset}' is {ref.modality}, but job '{job.name}' is {job.modality}"
        )
    allowed = site.privacy.allowed_algorithms
    if allowed is not None and job.algorithm.name not in {a.lower() for a in allowed}:
        raise PolicyRefusal(
            f"site {site.site}: algorithm '{job.algorithm.name}' is not in this site's "
            f"privacy.allowed_algorithms ({', '.join(allowed) or 'none'})"
        )
    aug = job.augmentation.pcevolve
    if aug is not None and site.site in aug.sites and aug.generator not in site.privacy.pcevolve_generators:
        raise PolicyRefusal(
            f"site {site.site}: job '{job.name}' asks this site to run PCEvolve with generator '{aug.generator}', "
            f"which is not in privacy.pcevolve_generators ({', '.join(site.privacy.pcevolve_generators) or 'none'})"
        )
    required = PRIVACY_STRENGTH[site.privacy.required_mode]
    offered = PRIVACY_STRENGTH[job.privacy.mode]
    if not required <= offered:
        raise PolicyRefusal(
            f"site {site.site}: job '{job.name}' uses privacy mode '{job.privacy.mode}', but this site requires "
            f"'{site.privacy.required_mode}' (privacy.required_mode); resubmit the job with a mode that includes it"
        )
