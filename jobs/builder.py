"""Turn a job spec into a standard NVFlare job folder (DESIGN §7): one generic builder for every algorithm.

The folder references two pre-installed medsilo classes by dotted path (the round controller and the site
executor) and holds no ``custom/`` code, so sites run only the reviewed package they installed (the job is not
BYOC); each party's class allow-list names exactly those classes (:data:`medsilo.config.common.SITE_COMPONENTS`,
:data:`~medsilo.config.common.SERVER_COMPONENTS`), so a job cannot build anything else. The privacy mode is
applied by the executor's privacy pipeline, not by filters a job could leave out. It carries no data paths: each site resolves
the job's dataset name through its own config. The same folder runs in the NVFlare simulator, in POC
mode and in production (``nvflare job submit`` / the admin console).

Layout written by :func:`export_job`::

    OUT/<job name>/meta.json
    OUT/<job name>/app/config/config_fed_server.json   # RoundController(job=<encoded spec>)
    OUT/<job name>/app/config/config_fed_client.json   # SiteExecutor(job=<encoded spec>) for join, train,
                                                        # evaluate, release

The spec travels encoded (:func:`medsilo.config.job.encode_job`: base64 of its canonical JSON), because NVFlare
expands ``{NAME}``/``{$ENV}`` references in job-config strings with the receiving party's variables;
``medsilo job show DIR`` (or :func:`~medsilo.config.job.decode_job`) prints it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from nvflare.job_config.api import FedJob
from nvflare.job_config.fed_job_config import FedJobConfig

from medsilo.components.controller import RoundController
from medsilo.components.executor import (
    TASK_EVALUATE,
    TASK_EXPORT,
    TASK_JOIN,
    TASK_RELEASE,
    TASK_TRAIN,
    SiteExecutor,
)
from medsilo.config import JobSpec
from medsilo.config.job import encode_job

TASK_REQUEST_INTERVAL = 0.2
"""Seconds a site waits before asking the server again for a task (NVFlare's default, 2 s, would add
that much idle time to every round)."""


def _preinstalled_config_class():
    """NVFlare's job config, told to leave pre-installed packages alone *before* it inspects their files.

    NVFlare 2.9 derives a source root for every component class before checking whether its package
    is pre-installed (``set_app_packages``); that derivation fails for packages installed with a
    package-dir mapping, as medsilo's editable install is (``components/x.py`` serves
    ``medsilo.components.x``). medsilo classes are never copied into a job, so the check comes first.
    """
    class PreinstalledJobConfig(FedJobConfig):
        def _get_custom_file(self, custom_dir, module, source_file, source_root=None, flat_import_roots=None):
            if self._module_parts(module)[0] in self.app_packages:
                return
            super()._get_custom_file(custom_dir, module, source_file, source_root, flat_import_roots)

    return PreinstalledJobConfig


def build_job(spec: JobSpec, *, min_sites: int = 1, resume: bool = False):
    """An ``nvflare.job_config.api.FedJob`` for ``spec``.

    Args:
        spec: the validated job spec.
        min_sites: sites that must be connected before NVFlare deploys the job.
        resume: the server continues from the last round checkpointed by an interrupted run of this job.
    """
    plain = encode_job(spec.model_dump(mode="json"))
    job = FedJob(name=spec.name, min_clients=min_sites)
    job.job.__class__ = _preinstalled_config_class()  # same state, one method changed (see its docstring)
    job.set_app_packages(["medsilo"])  # pre-installed: reference by path, copy nothing into custom/
    job.to_server(RoundController(job=plain, resume=resume), id="controller")
    job.to_server({"server": {"task_request_interval": TASK_REQUEST_INTERVAL}})
    job.to_clients(SiteExecutor(job=plain), tasks=[TASK_JOIN, TASK_TRAIN, TASK_EVALUATE, TASK_RELEASE, TASK_EXPORT])
    return job


def export_job(spec: JobSpec, out: str | Path, *, min_sites: int = 1, resume: bool = False) -> Path:
    """Write the job folder for ``spec`` under ``out``; returns ``out/<job name>``.

    An existing folder of the same name is replaced, so a re-export never mixes old and new files.
    """
    out = Path(out)
    target = out / spec.name
    if target.exists():
        shutil.rmtree(target)
    out.mkdir(parents=True, exist_ok=True)
    build_job(spec, min_sites=min_sites, resume=resume).export_job(str(out))
    custom = list(target.rglob("custom"))
    if custom:
        raise RuntimeError(f"{target}: the exported job contains custom code ({custom[0]}); medsilo jobs must not")
    return target
