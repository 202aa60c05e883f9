"""Checkpoints that let an interrupted job resume from its last completed round: state dicts, no pickles.

Who writes what:

* the **server** (:class:`~medsilo.components.controller.RoundController`), after each completed round:
  ``server.pt`` — the round, the payload for the next round, the algorithm's server half, the run recorder
  (as JSON, :meth:`~medsilo.components.results.RunRecorder.to_json`), the sites and the failures so far;
* each **site** (:class:`~medsilo.components.executor.SiteExecutor`), after each ``train`` task:
  ``<site>/round-<r>.pt`` — the algorithm's client half: models, tensors, counters and flags, never its
  images (the executor re-reads the data set from the site's disk and rebuilds the client half exactly as
  at job start; the checkpoint is then restored into it). The last two rounds are kept (a site can be one
  round ahead of the server's last completed round).

**Format.** A file is a :func:`torch.save` zip archive of one dict: a header (``format``, ``version``,
``kind`` = site or server, ``party`` = site name or ``"server"``, ``round``, ``job_id`` = the NVFlare job
that wrote it, ``spec_digest`` = :func:`spec_digest` of the job spec, ``half`` = the algorithm class) and
the state. An algorithm half's state is one tagged entry per instance attribute, found by one generic walk
for every algorithm: an ``nn.Module`` is stored as its ``state_dict``, a tensor as a tensor, ``None``,
``bool``, ``int``, ``float`` and ``str`` as themselves, lists, tuples and str-keyed dicts of those
recursively. Left out are the attributes the constructor rebuilds: ``setup`` and ``config`` of a client
half (the model's weights are stored through ``model``, the images never), ``config``, ``num_classes``
and ``sites`` of a server half, and any an algorithm lists in its ``checkpoint_rebuilt`` class attribute
(FedKTL's fixed generator). A module an algorithm builds lazily (``None`` in a fresh object) is rebuilt
by the algorithm's ``rebuild_module(name, shapes)`` hook (FedKTL's ``proj_i``, FedTGP's server network).
Numpy payload arrays are stored as tensors and come back as numpy arrays of the same dtype. No algorithm
keeps an optimiser across rounds (each local or server round builds a fresh one): there is no optimiser
state to store.

**Why no pickle.** Unpickling runs whatever code the file names, so a file another party could plant
where a checkpoint is expected (a job's component writing into the site's workspace, say) would run as
the site's user. Files are read only with ``torch.load(..., weights_only=True)``, which rebuilds tensors
and plain containers and refuses everything else, and only when they are intact zip archives (the
legacy, pickle-only torch format is refused before torch reads it, and every member's CRC-32 is checked,
which torch itself does not do). Pickle checkpoints of earlier medsilo versions (``*.pkl``) are refused
with a message, never opened.

**Job binding and what a resume checks.** Before anything is restored the header must match: the format
and version this code writes, the kind, the party, the round asked for, the spec digest of the running
job and, for a site, the job id the server names in ``resume_from`` (a resumed deployment is a new
NVFlare job: :func:`load_server` checks only the spec digest and returns the id of the job that wrote
the checkpoint, and the sites load their checkpoints of that job). Then the stored attributes must be
exactly the object's, each module's state dict must have the same names, shapes and dtypes, and each
tensor the shape and dtype of the tensor it replaces. Any mismatch, a truncated or corrupt file, or a
file that is not a checkpoint raises :class:`CheckpointError` naming the file and the reason; restoring
happens only after every check passed, so a refused checkpoint leaves the object as it was.

Determinism: data order and augmentation are seeded by (site, round), so a seeded job resumed this way
gives the results of the uninterrupted run (DP noise excepted: it comes from the OS on purpose).

Where: simulation (``MEDSILO_CHECKPOINT_DIR``, set by ``medsilo sim`` to ``RUN_DIR/checkpoints``), or
``<workspace>/checkpoints/<job name>/`` of each party in a deployment.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn

from medsilo.components.results import RunRecorder
from medsilo.errors import MedsiloError

CHECKPOINT_DIR_ENV = "MEDSILO_CHECKPOINT_DIR"
SERVER_FILE = "server.pt"
SERVER_PARTY = "server"
KEEP_ROUNDS = 2
FORMAT = "medsilo-checkpoint"
FORMAT_VERSION = 1
LEGACY_SUFFIX = ".pkl"
"""Suffix of the pickle checkpoints of earlier versions: refused, never opened."""

CLIENT_REBUILT = frozenset({"setup", "config"})
"""Client-half attributes the executor rebuilds (the site setup with data set and model object; config)."""

SERVER_REBUILT = frozenset({"config", "num_classes", "sites"})
"""Server-half attributes the controller passes to the constructor."""

_HEADER = ("format", "version", "kind", "party", "round", "job_id", "spec_digest", "half")
_SITE_KEYS = frozenset({*_HEADER, "state"})
_SERVER_KEYS = frozenset({*_HEADER, "state", "payload", "sites", "failures", "recorder"})
_ENTRY = {"module": "state", "tensor": "value", "plain": "value", "list": "items", "tuple": "items",
          "dict": "items"}  # fmt: skip
_PLAIN = (type(None), bool, int, float, str)
_SITE_FILE = re.compile(r"round-(\d+)\.pt")
_AFRESH = "remove it and start the job afresh"

Action = Callable[[], None]


class CheckpointError(MedsiloError):
    """A checkpoint that cannot be written, or that is missing, unreadable or of another job."""


def checkpoint_dir(workspace: str | Path, job_name: str, digest: str) -> Path:
    """The checkpoint folder of this party for the job ``job_name`` whose spec has :func:`spec_digest`
    ``digest``: ``<workspace>/checkpoints/<name>-<digest[:16]>`` (simulation: the env folder of the run), so
    another spec under the same name never touches these files."""
    base = os.environ.get(CHECKPOINT_DIR_ENV)
    return Path(base) if base else Path(workspace) / "checkpoints" / f"{job_name}-{digest[:16]}"


def site_file(folder: str | Path, site: str, rnd: int) -> Path:
    """Where ``site`` keeps its checkpoint of round ``rnd``.

    Raises:
        CheckpointError: ``site`` is not a plain folder name (empty, ``.``/``..``, or holds a separator).
    """
    if not site or site in (".", "..") or any(c in site for c in "/\\\0"):
        raise CheckpointError(f"site name {site!r}: cannot be a checkpoint folder (not a plain folder name)")
    return Path(folder) / site / f"round-{rnd}.pt"


# ---- sites -------------------------------------------------------------------------------------------


def save_site(folder: str | Path, site: str, rnd: int, client: Any, *, job_id: str, spec_digest: str) -> None:
    """Write ``site``'s client half after its ``train`` task of round ``rnd`` (atomic; never the images).

    Checkpoints older than the last :data:`KEEP_ROUNDS` rounds are removed.

    Raises:
        CheckpointError: the file cannot be written, the binding is invalid, or an attribute of ``client``
            has a type a checkpoint cannot hold (the message names it).
    """
    path = site_file(folder, site, rnd)
    header = _header("site", site, rnd, job_id, spec_digest, client)
    _write(path, {**header, "state": _half_state(client, CLIENT_REBUILT, path)})
    for old in path.parent.glob("round-*.pt"):
        match = _SITE_FILE.fullmatch(old.name)
        if match and int(match[1]) <= rnd - KEEP_ROUNDS:
            old.unlink(missing_ok=True)


def load_site(folder: str | Path, site: str, rnd: int, client: Any, *, job_id: str, spec_digest: str) -> None:
    """Restore ``client`` to ``site``'s state after round ``rnd`` of job ``job_id``.

    Args:
        folder: the checkpoint folder (:func:`checkpoint_dir`).
        site: this site's name.
        rnd: the round to restore (the round in the server's ``resume_from``).
        client: a freshly built client half of the same algorithm, spec and data; restored in place.
        job_id: the NVFlare job that wrote the checkpoint (the job in the server's ``resume_from``).
        spec_digest: :func:`spec_digest` of the running job's spec.

    Raises:
        CheckpointError: no checkpoint of that round, or one that is unreadable, of another job, spec,
            party, round or format, or does not fit ``client``; ``client`` is then unchanged.
    """
    path = site_file(folder, site, rnd)
    if not path.is_file():
        _refuse_legacy(path.with_suffix(LEGACY_SUFFIX))
        raise CheckpointError(
            f"site {site}: cannot resume from round {rnd}: {path} is missing "
            "(the site's checkpoints were removed or it never finished that round)"
        )
    record = _read(path, _SITE_KEYS)
    _check_header(path, record, kind="site", party=site, rnd=rnd, job_id=job_id, spec=spec_digest,
                  half=client)  # fmt: skip
    for action in _restore_plan(path, client, record["state"], CLIENT_REBUILT):
        action()


def snapshot(client: Any) -> dict[str, dict[str, Any]]:
    """An in-memory copy of a client half's state (what :func:`save_site` stores), to undo a round with."""
    return _half_state(client, CLIENT_REBUILT, Path("<memory>"))


def restore_snapshot(client: Any, state: dict[str, dict[str, Any]]) -> None:
    """Put ``client`` back to a :func:`snapshot` (e.g. a round whose upload the site refused after training).

    Raises:
        CheckpointError: the snapshot does not fit ``client`` (then ``client`` is unchanged).
    """
    for action in _restore_plan(Path("<memory>"), client, state, CLIENT_REBUILT):
        action()


# ---- server ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerCheckpoint:
    """The server's last checkpoint, checked against the running job's spec digest.

    Attributes:
        path: the file it was read from.
        round: the last completed round; a resumed job starts at ``round + 1``.
        job_id: the NVFlare job that wrote it (the sites' checkpoints carry the same id).
        payload: the payload for round ``round + 1``: name → numpy array (float32 in plaintext jobs).
        sites: the sites taking part (the server half is built for them).
        failures: tasks sites failed so far (``site``, ``round``, ``task``, ``reason``).
        recorder: the run recorder as it was after ``round``.
        half: the server-half class that wrote it (``module.Class``).
        state: the server half's saved state (restored by :meth:`restore_server`).
    """

    path: Path
    round: int
    job_id: str
    payload: dict[str, np.ndarray]
    sites: list[str]
    failures: list[dict[str, Any]]
    recorder: RunRecorder
    half: str
    state: dict[str, Any] = field(repr=False)

    def restore_server(self, server: Any) -> None:
        """Restore ``server``, built as ``algo.Server(config, K, self.sites)``, in place.

        Raises:
            CheckpointError: ``server`` is of another algorithm or the saved state does not fit it (the
                message names the attribute); ``server`` is then unchanged.
        """
        if _class_name(server) != self.half:
            raise CheckpointError(f"{self.path}: holds the server half {self.half}, this job runs "
                                  f"{_class_name(server)}; {_AFRESH}")  # fmt: skip
        for action in _restore_plan(self.path, server, self.state, SERVER_REBUILT):
            action()


def save_server(folder: str | Path, *, round: int, job_id: str, spec_digest: str,
                payload: dict[str, np.ndarray], server: Any, recorder: RunRecorder, sites: list[str],
                failures: list[dict[str, Any]]) -> None:  # fmt: skip
    """Write the server's state after its completed round ``round`` (atomic).

    Args:
        folder: the checkpoint folder (:func:`checkpoint_dir`).
        round: the round just completed.
        job_id: the running NVFlare job.
        spec_digest: :func:`spec_digest` of its spec.
        payload: the payload for round ``round + 1`` (numpy arrays, any dtype torch holds).
        server: the algorithm's server half.
        recorder: the run recorder (stored as :meth:`~RunRecorder.to_json`).
        sites: the sites taking part.
        failures: tasks sites failed so far (JSON-plain dicts).

    Raises:
        CheckpointError: the file cannot be written, the binding is invalid, or a value has a type a
            checkpoint cannot hold (the message names it).
    """
    path = Path(folder) / SERVER_FILE
    header = _header("server", SERVER_PARTY, round, job_id, spec_digest, server)
    tensors = {}
    for name, value in payload.items():
        if not isinstance(value, np.ndarray):
            raise CheckpointError(f"{path}: payload '{name}': not a numpy array but a {type(value).__name__}")
        try:
            tensors[name] = torch.from_numpy(np.array(value, copy=True))
        except TypeError:
            raise CheckpointError(f"{path}: payload '{name}': dtype {value.dtype} cannot be stored") from None
    if not all(type(s) is str for s in sites):
        raise CheckpointError(f"{path}: sites: must be a list of names, got {sites!r}")
    try:
        failures_json = json.dumps(list(failures))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: failures: not JSON-plain ({exc})") from None
    state = _half_state(server, SERVER_REBUILT, path)
    _write(path, {**header, "state": state, "payload": tensors, "sites": list(sites),
                  "failures": failures_json, "recorder": recorder.to_json()})  # fmt: skip


def load_server(folder: str | Path, *, spec_digest: str) -> ServerCheckpoint | None:
    """The server's last checkpoint in ``folder``, or ``None`` when there is none.

    Only the spec digest binds it to the running job: a resumed job is a new NVFlare job, and the
    result's ``job_id`` names the one that wrote it (the sites restore that job's checkpoints).

    Raises:
        CheckpointError: a pickle checkpoint of an earlier version, or a file that is unreadable, of
            another spec, party or format, or malformed (the message names the file and field).
    """
    path = Path(folder) / SERVER_FILE
    if not path.is_file():
        _refuse_legacy(path.with_suffix(LEGACY_SUFFIX))
        return None
    record = _read(path, _SERVER_KEYS)
    _check_header(path, record, kind="server", party=SERVER_PARTY, rnd=None, job_id=None, spec=spec_digest,
                  half=None)  # fmt: skip
    payload, sites = record["payload"], record["sites"]
    if not _tensor_dict(payload):
        raise CheckpointError(f"{path}: payload: must map names to tensors; {_AFRESH}")
    if type(sites) is not list or not sites or not all(type(s) is str for s in sites):
        raise CheckpointError(f"{path}: sites: must be a non-empty list of names, got {sites!r}; {_AFRESH}")
    try:
        failures = json.loads(record["failures"])
        recorder = RunRecorder.from_json(record["recorder"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: failures or recorder: {exc}; {_AFRESH}") from None
    if type(failures) is not list or not all(type(f) is dict for f in failures):
        raise CheckpointError(f"{path}: failures: must be a list of objects; {_AFRESH}")
    _check_state_tree(path, record["state"])
    arrays = {k: v.numpy() for k, v in payload.items()}
    return ServerCheckpoint(path=path, round=record["round"], job_id=record["job_id"], payload=arrays,
                            sites=sites, failures=failures, recorder=recorder, half=record["half"],
                            state=record["state"])  # fmt: skip


# ---- the generic walk over an algorithm half ---------------------------------------------------------


def _half_state(obj: Any, rebuilt: frozenset[str], path: Path) -> dict[str, dict[str, Any]]:
    """The checkpoint state of an algorithm half: attribute name → tagged entry (module docstring).

    ``rebuilt`` are the attributes the constructor rebuilds; ``path`` only names the file in errors.

    Raises:
        CheckpointError: an attribute (or an item inside one) is of a type a checkpoint cannot hold.
    """
    state = {}
    for name, value in _attributes(obj, rebuilt).items():
        where = f"{type(obj).__name__}.{name}"
        if isinstance(value, nn.Module):
            tensors = {k: _tensor(v, f"{where}.{k}", path) for k, v in value.state_dict().items()}
            state[name] = {"kind": "module", "state": tensors}
        else:
            state[name] = _encode(value, where, path)
    return state


def _attributes(obj: Any, rebuilt: frozenset[str]) -> dict[str, Any]:
    """``obj``'s instance attributes less ``rebuilt`` and its class's ``checkpoint_rebuilt``."""
    skip = rebuilt | frozenset(getattr(type(obj), "checkpoint_rebuilt", ()))
    return {name: value for name, value in vars(obj).items() if name not in skip}


def _tensor(value: Any, where: str, path: Path) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{path}: cannot checkpoint {where}: a {type(value).__name__} in a state dict")
    return value.detach().cpu().clone()


def _encode(value: Any, where: str, path: Path) -> dict[str, Any]:
    """The tagged entry of a tensor, a JSON-plain value, or a list/tuple/str-keyed dict of those."""
    if isinstance(value, torch.Tensor):
        return {"kind": "tensor", "value": _tensor(value, where, path)}
    if type(value) in _PLAIN:
        return {"kind": "plain", "value": value}
    if type(value) in (list, tuple):
        items = [_encode(v, f"{where}[{i}]", path) for i, v in enumerate(value)]
        return {"kind": type(value).__name__, "items": items}
    if type(value) is dict and all(type(k) is str for k in value):
        return {"kind": "dict", "items": {k: _encode(v, f"{where}[{k!r}]", path) for k, v in value.items()}}
    hint = " (hold modules in an nn.ModuleList/ModuleDict attribute)" if isinstance(value, nn.Module) else ""
    raise CheckpointError(f"{path}: cannot checkpoint {where}: a {type(value).__name__} is not a module, "
                          f"tensor, JSON-plain value or list/tuple/dict of those{hint}; if the constructor "
                          "rebuilds it, list it in the algorithm's checkpoint_rebuilt")  # fmt: skip


def _restore_plan(path: Path, obj: Any, state: Any, rebuilt: frozenset[str]) -> list[Action]:
    """Check the whole saved ``state`` against ``obj``; return the actions that restore it.

    Nothing is changed here: every check runs first, and the caller applies the actions only when all
    passed.
    """
    current = _attributes(obj, rebuilt)
    if type(state) is not dict:
        _refuse(path, "state", f"a {type(state).__name__}, not a dict of attributes")
    missing, unknown = sorted(set(current) - set(state)), sorted(set(state) - set(current))
    if missing or unknown:
        reason = f"attributes differ (missing {missing}, unknown {unknown}): another version of the algorithm"
        _refuse(path, type(obj).__name__, reason)
    return [_plan_attribute(path, obj, name, value, state[name]) for name, value in current.items()]


def _plan_attribute(path: Path, obj: Any, name: str, current: Any, entry: Any) -> Action:
    where = f"{type(obj).__name__}.{name}"
    if _kind(path, where, entry) == "module":
        saved = _module_state(path, where, entry)
        if isinstance(current, nn.Module):
            _match_state(path, where, current.state_dict(), saved)
            return lambda: current.load_state_dict(saved)
        if current is not None:
            _refuse(path, where, f"holds a module, this object a {type(current).__name__}")
        module = _rebuild(path, where, obj, name, saved)
        return lambda: setattr(obj, name, module)
    if isinstance(current, nn.Module):
        _refuse(path, where, f"holds a {entry['kind']}, this object a module")
    value = _decode(path, where, current, entry)
    if isinstance(current, nn.Parameter) and value is not None:
        return lambda: _copy_into(current, value)  # the parameter keeps its identity and requires_grad
    return lambda: setattr(obj, name, value)


def _rebuild(path: Path, where: str, obj: Any, name: str, saved: dict[str, torch.Tensor]) -> nn.Module:
    """A lazily built module from the algorithm's ``rebuild_module`` hook, loaded but not yet attached."""
    hook = getattr(obj, "rebuild_module", None)
    if hook is None:
        _refuse(path, where, "holds a module this object has not built, and there is no rebuild_module hook")
    try:
        module = hook(name, {k: tuple(v.shape) for k, v in saved.items()})
    except ValueError as exc:
        _refuse(path, where, f"cannot rebuild the module ({exc})")
    if not isinstance(module, nn.Module):
        _refuse(path, where, f"rebuild_module returned a {type(module).__name__}, not a module")
    _match_state(path, where, module.state_dict(), saved)
    module.load_state_dict(saved)
    return module


def _kind(path: Path, where: str, entry: Any) -> str:
    """The tag of a saved entry whose fields are exactly the tag and its content."""
    kind = entry.get("kind") if type(entry) is dict else None
    if kind not in _ENTRY or set(entry) != {"kind", _ENTRY[kind]}:
        _refuse(path, where, "malformed entry")
    return kind


def _module_state(path: Path, where: str, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
    saved = entry["state"]
    if not _tensor_dict(saved):
        _refuse(path, where, "malformed state dict")
    return saved


def _tensor_dict(value: Any) -> bool:
    """True for a dict of plain tensors by str names."""
    return type(value) is dict and all(type(k) is str and type(v) is torch.Tensor for k, v in value.items())


def _match_state(path: Path, where: str, expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]
                 ) -> None:  # fmt: skip
    """Same names, shapes and dtypes, or :class:`CheckpointError` naming the first difference."""
    missing, unknown = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unknown:
        _refuse(path, where, f"state dict names differ (missing {missing[:5]}, unknown {unknown[:5]})")
    for key, tensor in expected.items():
        _match_tensor(path, f"{where}.{key}", tensor, saved[key])


def _match_tensor(path: Path, where: str, current: torch.Tensor, saved: torch.Tensor) -> None:
    if saved.shape != current.shape:
        _refuse(path, where, f"shape {tuple(saved.shape)} in the checkpoint, {tuple(current.shape)} here")
    if saved.dtype != current.dtype:
        _refuse(path, where, f"dtype {saved.dtype} in the checkpoint, {current.dtype} here")


def _decode(path: Path, where: str, current: Any, entry: Any) -> Any:
    """The value a non-module entry restores, checked against ``current`` where the object has one.

    ``None`` in the checkpoint fits any attribute (an optional one not set yet); where the fresh object
    holds ``None`` (not set yet), the saved value is taken as it is.
    """
    kind = _kind(path, where, entry)
    if kind == "module":
        _refuse(path, where, "a module inside a container")
    if kind == "plain":
        value = entry["value"]
        if type(value) not in _PLAIN:
            _refuse(path, where, "malformed value")
        if value is not None and current is not None and type(value) is not type(current):
            _refuse(path, where, f"holds a {type(value).__name__}, this object a {type(current).__name__}")
        return value
    held = "tensor" if isinstance(current, torch.Tensor) else type(current).__name__
    if current is not None and kind != held:
        _refuse(path, where, f"holds a {kind}, this object a {type(current).__name__}")
    if kind == "tensor":
        saved = entry["value"]
        if type(saved) is not torch.Tensor:
            _refuse(path, where, "malformed tensor")
        if current is None:
            return saved
        _match_tensor(path, where, current, saved)
        saved = saved.to(current.device)
        return nn.Parameter(saved, current.requires_grad) if isinstance(current, nn.Parameter) else saved
    items = entry["items"]
    if kind == "dict":
        if type(items) is not dict or not all(type(k) is str for k in items):
            _refuse(path, where, "malformed dict")
        return {k: _decode(path, f"{where}[{k!r}]", (current or {}).get(k), v) for k, v in items.items()}
    if type(items) is not list:
        _refuse(path, where, f"malformed {kind}")
    refs = list(current) if current is not None and len(current) == len(items) else [None] * len(items)
    values = [_decode(path, f"{where}[{i}]", ref, item) for i, (ref, item) in enumerate(zip(refs, items))]
    return values if kind == "list" else tuple(values)


def _check_state_tree(path: Path, state: Any) -> None:
    """Structural check of a saved half without an object to restore into (the server's, at load)."""
    if type(state) is not dict or not all(type(k) is str for k in state):
        _refuse(path, "state", "not a dict of attributes")
    for name, entry in state.items():
        if _kind(path, name, entry) == "module":
            _module_state(path, name, entry)
        else:
            _decode(path, name, None, entry)


@torch.no_grad()
def _copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    target.copy_(value)


def _refuse(path: Path, where: str, reason: str) -> NoReturn:
    raise CheckpointError(f"{path}: {where}: {reason}; the checkpoint does not fit this job and nothing was "
                          f"restored: {_AFRESH}")  # fmt: skip


# ---- files and headers -------------------------------------------------------------------------------


def _class_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _header(kind: str, party: str, rnd: int, job_id: str, spec: str, half: Any) -> dict[str, Any]:
    """The header of a new checkpoint, its binding checked (fail closed: no unbound checkpoint is written)."""
    if type(rnd) is not int or rnd < 1:
        raise CheckpointError(f"{party}: checkpoint round: must be an int ≥ 1, got {rnd!r}")
    if type(job_id) is not str or not job_id:
        raise CheckpointError(f"{party}: checkpoint job_id: must be a non-empty string, got {job_id!r}")
    if type(spec) is not str or not re.fullmatch(r"[0-9a-f]{64}", spec):
        raise CheckpointError(f"{party}: checkpoint spec_digest: must be a SHA-256 hex digest, got {spec!r}")
    return {"format": FORMAT, "version": FORMAT_VERSION, "kind": kind, "party": party, "round": rnd,
            "job_id": job_id, "spec_digest": spec, "half": _class_name(half)}  # fmt: skip


def _check_header(path: Path, record: dict[str, Any], *, kind: str, party: str, rnd: int | None,
                  job_id: str | None, spec: str, half: Any) -> None:  # fmt: skip
    """The header must be what this job expects (``rnd``, ``job_id`` or ``half`` ``None``: any)."""
    found = {key: record[key] for key in _HEADER}
    if not _is(found["format"], FORMAT):
        raise CheckpointError(f"{path}: not a medsilo checkpoint (format {found['format']!r}); {_AFRESH}")
    if not _is(found["version"], FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: checkpoint format version {found['version']!r}, this medsilo reads version "
            f"{FORMAT_VERSION}; resume with the medsilo that wrote it or start the job afresh"
        )
    if not _is(found["kind"], kind):
        raise CheckpointError(f"{path}: a {found['kind']!r} checkpoint where a {kind!r} one is expected")
    if not _is(found["party"], party):
        raise CheckpointError(f"{path}: written by {found['party']!r}, not {party!r}; a party restores only "
                              "its own checkpoints")  # fmt: skip
    if type(found["round"]) is not int or found["round"] < 1 or (rnd is not None and found["round"] != rnd):
        raise CheckpointError(
            f"{path}: holds round {found['round']!r}, expected {rnd or 'a round ≥ 1'}; the file was renamed "
            "or copied: resume from the round the server names"
        )
    if type(found["job_id"]) is not str or not found["job_id"]:
        raise CheckpointError(f"{path}: job_id: must be a non-empty string, got {found['job_id']!r}")
    if job_id is not None and found["job_id"] != job_id:
        raise CheckpointError(
            f"{path}: written by job {found['job_id']!r}, not job {job_id!r}; a site resumes only from the "
            "checkpoints of the job the server's resume_from names"
        )
    if not _is(found["spec_digest"], spec):
        written = str(found["spec_digest"])[:12]
        raise CheckpointError(
            f"{path}: written for another version of the job spec (spec digest {written}…, this job's "
            f"{spec[:12]}…); a job resumes only with the exact spec it started with: restore that spec or "
            "start the job afresh"
        )
    if type(found["half"]) is not str:
        raise CheckpointError(f"{path}: half: must be a class name, got {found['half']!r}")
    if half is not None and found["half"] != _class_name(half):
        raise CheckpointError(f"{path}: holds the algorithm half {found['half']!r}, this job runs "
                              f"{_class_name(half)}; {_AFRESH}")  # fmt: skip


def _is(value: Any, expected: Any) -> bool:
    """``value == expected`` and of its exact type (a crafted header may hold a tensor or a subclass)."""
    return type(value) is type(expected) and value == expected


def _refuse_legacy(path: Path) -> None:
    if path.exists():
        raise CheckpointError(f"{path}: a pickle checkpoint (earlier medsilo versions); pickles are never "
                              f"loaded, as unpickling can run code: {_AFRESH}")  # fmt: skip


def _read(path: Path, keys: frozenset[str]) -> dict[str, Any]:
    """The record in ``path``: an intact zip archive read with ``weights_only`` (tensors and plain values)."""
    try:
        with open(path, "rb") as fh:
            starts_as_zip = fh.read(4) == b"PK\x03\x04"  # else torch would read it as a legacy pickle
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc.strerror or exc})") from None
    if not starts_as_zip or not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a medsilo checkpoint (not a torch zip archive: truncated, corrupt, or a pickle, "
            f"which is never loaded); {_AFRESH}"
        )
    try:  # torch does not check the members' CRC-32s: a damaged tensor would load silently
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint archive ({exc}); {_AFRESH}") from None
    if damaged is not None:
        raise CheckpointError(
            f"{path}: corrupt checkpoint: archive member '{damaged}' fails its CRC-32 check; {_AFRESH}"
        )
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only met an import: code, which a checkpoint never holds
        found = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line]
        detail = f" ({found[0][:200]})" if found else ""
        raise CheckpointError(
            f"{path}: refused: it holds objects other than tensors and plain values{detail}; a medsilo "
            f"checkpoint never does, so the file was planted or damaged: {_AFRESH}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad archive, all "unreadable"
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path}: unreadable checkpoint ({type(exc).__name__}: {reason}); {_AFRESH}"
        ) from None
    if type(record) is not dict or set(record) != keys:
        found = sorted(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise CheckpointError(f"{path}: not a medsilo checkpoint (fields {found}); {_AFRESH}")
    return record


def _write(path: Path, record: dict[str, Any]) -> None:
    """``torch.save`` ``record`` to ``path`` atomically: temporary file, fsync, rename, folder fsync."""
    buf = io.BytesIO()
    torch.save(record, buf)
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(buf.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)  # a checkpoint is complete or absent, never half written
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself survives a crash
        finally:
            os.close(folder)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(
            f"{path}: cannot write the checkpoint ({exc.strerror or exc}); free space or fix the folder's "
            "permissions"
        ) from exc
