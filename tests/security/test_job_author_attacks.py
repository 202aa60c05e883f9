"""A job author with submit rights tries to run code of their choosing at every site and at the server.

The job's config goes through NVFlare's own component builder and authorizer, exactly as a site or server
process builds a submitted job, against the ``resources.json`` allow-list of a kit ``medsilo provision`` made.
The harness is live: with a package-prefix allow-list (what kits carried before) the same config runs the
attacker's function.
"""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest
import yaml
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.apis.workspace import Workspace
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.private.fed.client.client_json_config import ClientJsonConfigurator
from nvflare.private.fed.server.server_json_config import ServerJsonConfigurator
from nvflare.private.fed.utils.fed_utils import authorize_build_component

from medsilo.config import JobSpec
from medsilo.config.common import SERVER_COMPONENTS, SITE_COMPONENTS
from medsilo.jobs.builder import export_job
from medsilo.provisioning.provision import provision

NETWORK = {
    "project": "attack-net",
    "server": {"host": "localhost", "port": 18131},
    "hospitals": {"hospital-1": {"org": "hosp_one", "require": "ckks"}, "hospital-2": {"org": "hosp_two"}},
    "admins": [{"name": "admin@coord.org", "org": "coord", "role": "project_admin"}],
}


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kits")
    (root / "network.yml").write_text(yaml.safe_dump(NETWORK))
    return provision(root / "network.yml", root / "out").prod_dir


def _evil(marker: Path) -> dict:
    """A component that writes files where the attacker says (any function under the old ``medsilo.`` prefix)."""
    return {"path": "medsilo.secure.keys.ensure_simulation_pki", "args": {"folder": str(marker), "parties": ["x"]}}


def _build(kit: Path, party: str, app: Path, allow: list[str] | None = None):
    """Configure ``app`` the way an NVFlare site (or the server) does for a submitted job."""
    if allow is not None:
        resources = json.loads((kit / "local" / "resources.json").read_text())
        (kit / "local" / "resources.json").write_text(json.dumps({**resources, "class_allow_list": allow}))
    workspace = Workspace(str(kit), party, "config")
    ctx = FLContext()
    ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, workspace, private=True)
    ctx.set_prop(FLContextKey.CURRENT_JOB_ID, "job-x", private=False, sticky=True)
    ctx.set_prop(FLContextKey.JOB_META, {}, private=True, sticky=False)  # no BYOC: the kits refuse it anyway
    args = Namespace(sp_scheme="grpc", sp_target="localhost:18131", client_name=party, job_id="job-x",
                           workspace=str(kit), set=[])  # fmt: skip
    if party == "server":
        conf = ServerJsonConfigurator(workspace_obj=workspace, config_file_name=str(app / "config_fed_server.json"),
                                      args=args, app_root=str(app.parent), kv_list=[])  # fmt: skip
    else:
        conf = ClientJsonConfigurator(workspace_obj=workspace, config_file_name=str(app / "config_fed_client.json"),
                                      args=args, app_root=str(app.parent), kv_list=[])  # fmt: skip
    conf.set_component_build_authorizer(authorize_build_component, fl_ctx=ctx, event_handlers=[])
    conf.configure()
    return conf


def _client_app(tmp_path: Path, executor: dict) -> Path:
    app = tmp_path / "app" / "config"
    app.mkdir(parents=True)
    config = {"format_version": 2, "executors": [{"tasks": ["train"], "executor": executor}], "components": [],
              "task_data_filters": [], "task_result_filters": []}  # fmt: skip
    (app / "config_fed_client.json").write_text(json.dumps(config))
    return app


def test_kits_allow_exactly_the_classes_a_medsilo_job_uses(kits):
    for party, allowed in (("server", SERVER_COMPONENTS), ("hospital-1", SITE_COMPONENTS), ("hospital-2", SITE_COMPONENTS)):
        resources = json.loads((kits / party / "local" / "resources.json").read_text())
        assert resources["class_allow_list"] == list(allowed)
        assert resources["class_list_enforcement_mode"] == "enforce"
        assert not any(entry.endswith(".") for entry in resources["class_allow_list"])  # no package prefixes
    for path in (*SITE_COMPONENTS, *SERVER_COMPONENTS):
        module, name = path.rsplit(".", 1)
        assert isinstance(getattr(__import__(module, fromlist=[name]), name), type)


def test_a_job_cannot_build_an_arbitrary_function_at_a_site(kits, tmp_path):
    kit = kits / "hospital-1"
    marker = tmp_path / "owned"
    app = _client_app(tmp_path, _evil(marker))
    with pytest.raises(Exception, match=r"'medsilo.secure.keys.ensure_simulation_pki' at config path .* is not in "
                                        r"allow_list"):  # fmt: skip
        _build(kit, "hospital-1", app)
    assert not marker.exists()
    # the same job under the old allow-list ("medsilo." as a prefix) runs the attacker's function
    with pytest.raises(Exception, match="must be an Executor"):
        _build(kit, "hospital-1", app, allow=["medsilo."])
    assert (marker / "pki" / "rootCA.key").is_file()


def test_the_chain_through_an_allowed_executor_is_refused_too(kits, tmp_path):
    # the attacker nests the component inside the allowed executor's arguments (NVFlare builds nested configs)
    # and tries a path that extends an exact allow-list entry
    marker = tmp_path / "owned"
    nested = {"path": "medsilo.components.executor.SiteExecutor", "args": {"job": _evil(marker)}}
    with pytest.raises(Exception, match="ensure_simulation_pki' at config path .* is not in allow_list"):
        _build(kits / "hospital-2", "hospital-2", _client_app(tmp_path / "a", nested))
    longer = {"path": "medsilo.components.executor.SiteExecutor.execute", "args": {}}
    with pytest.raises(Exception, match="Can't load class"):
        _build(kits / "hospital-2", "hospital-2", _client_app(tmp_path / "b", longer))
    # the original chain: write a pickle with PCEvolve's writer, then load it as a checkpoint
    chain = {"path": "medsilo.components.checkpoint.load_site",
             "args": {"folder": {"path": "medsilo.medical.synth.pcevolve.store.write_synthetic",
                                 "args": {"folder": str(marker), "extra": {"round-1.pkl": "c__builtin__\nexec\n"}}}}}  # fmt: skip
    with pytest.raises(Exception, match="is not in allow_list"):
        _build(kits / "hospital-2", "hospital-2", _client_app(tmp_path / "c", chain))
    assert not marker.exists()


def test_a_medsilo_job_still_builds_at_sites_and_server(kits, tmp_path):
    spec = JobSpec(name="ok", modality="cxr", classes=["a", "b"], dataset="cxr", model="cnn",
                   algorithm={"name": "fedproto"}, privacy={"mode": "ckks"})  # fmt: skip
    job = export_job(spec, tmp_path)
    _build(kits / "hospital-1", "hospital-1", job / "app" / "config")
    _build(kits / "server", "server", job / "app" / "config")


def test_a_job_cannot_build_another_workflow_at_the_server(kits, tmp_path):
    marker = tmp_path / "owned"
    app = tmp_path / "app" / "config"
    app.mkdir(parents=True)
    config = {"format_version": 2, "workflows": [{"id": "w", **_evil(marker)}], "components": [],
              "task_data_filters": [], "task_result_filters": []}  # fmt: skip
    (app / "config_fed_server.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="is not in allow_list"):
        _build(kits / "server", "server", app)
    assert not marker.exists()


def test_a_job_cannot_read_a_sites_environment_through_nvflare_variables(kits, tmp_path, monkeypatch):
    """NVFlare expands ``{$NAME}`` in every job-config string with the receiving party's environment before
    building anything. medsilo's components take the spec as one encoded string (no braces to expand), and
    refuse anything else at the first task with a message that does not repeat it (an error at build time
    would be repeated, expanded argument and all, by NVFlare's own message)."""
    from medsilo.config.job import decode_job

    monkeypatch.setenv("HOSPITAL_PACS_PASSWORD", "pacs-Adm1n!2025")
    monkeypatch.setenv("HOSPITAL_DB_TOKEN", "Tr0ub4dor3xyzPACSadm1n")  # base64 letters only: survives decoding
    spec = JobSpec(name="ok", modality="cxr", classes=["a", "b"], dataset="cxr", model="cnn",
                   algorithm={"name": "fedproto"})  # fmt: skip
    job = export_job(spec, tmp_path / "plain")
    config = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    encoded = config["executors"][0]["executor"]["args"]["job"]
    assert decode_job(encoded)["name"] == "ok" and "{" not in encoded
    attempts = {
        "spec as plain JSON": {**decode_job(encoded), "seed": "{$HOSPITAL_PACS_PASSWORD}"},
        "the whole argument": "{$HOSPITAL_PACS_PASSWORD}",
        # NVFlare expands references anywhere in a string, so the author splices one into the base64 itself
        "inside the encoding": encoded[:40] + "{$HOSPITAL_DB_TOKEN}" + encoded[40:],
    }
    for name, job_arg in attempts.items():
        executor = {"path": "medsilo.components.executor.SiteExecutor", "args": {"job": job_arg}}
        conf = _build(kits / "hospital-1", "hospital-1", _client_app(tmp_path / name.replace(" ", "-"), executor))
        built = conf.runner_config.task_router.task_table["train"]
        ctx = FLContext()
        ctx.set_prop(ReservedKey.IDENTITY_NAME, "hospital-1", private=False, sticky=False)
        reply = FLModelUtils.from_shareable(built.execute("join", FLModelUtils.to_shareable(FLModel(params={})),
                                                          ctx, Signal()))  # fmt: skip
        assert "site hospital-1: job: " in reply.meta["error"] and "'medsilo job build'" in reply.meta["error"], name
        assert "pacs-Adm1n" not in json.dumps(reply.meta) and "Tr0ub4dor" not in json.dumps(reply.meta), name
    # the server's other arguments are type-checked the same way, and the job stops without repeating them
    app = tmp_path / "server-app" / "config"
    app.mkdir(parents=True)
    workflow = {"id": "controller", "path": "medsilo.components.controller.RoundController",
                "args": {"job": encoded, "task_timeout": "{$HOSPITAL_PACS_PASSWORD}"}}  # fmt: skip
    (app / "config_fed_server.json").write_text(json.dumps({"format_version": 2, "workflows": [workflow],
                                                            "components": []}))  # fmt: skip
    controller = _build(kits / "server", "server", app).runner_config.workflows[0].controller
    assert controller._job_error == "task_timeout: must be an integer ≥ 0 (got a str)"


def test_validating_a_job_at_a_site_never_opens_a_file_the_job_names(tmp_path, monkeypatch):
    """FedKTL's ``generator`` names a TorchScript file the *server* loads. Validating the spec (which every site
    does at join) once built the server half and so tried to load it at the site: the join reply then told
    the server whether a path exists there ('not found' vs 'not a TorchScript module')."""
    from medsilo.components.algorithms import fedktl

    opened: list[str] = []
    monkeypatch.setattr(fedktl, "load_generator", lambda spec, **_: opened.append(spec))
    probe = tmp_path / "smith_john_1961.pt"
    probe.write_bytes(b"a site's file")
    for path in (probe, tmp_path / "absent.pt"):
        spec = JobSpec(name="probe", modality="cxr", classes=["a", "b"], dataset="cxr",
                       algorithm={"name": "fedktl", "params": {"form": "aggregate", "generator": str(path)}},
                       privacy={"mode": "ckks"})  # fmt: skip
        assert spec.algorithm.config().generator == str(path)
    assert opened == []
