"""What a hospital takes home: its model of the selected round, as a bundle with a model card.

Personalized FL gives each site its own model; at the end of a job each site writes the model it would deploy
— the one its evaluation scored at the round the server selected on validation — into its own workspace (it
never leaves the site)::

    <folder>/                       simulation: RUN_DIR/models/<site>/; deployed: <workspace>/models/<job id>/
      configs/metadata.json         MONAI bundle metadata: classes, input (channels, size, value range),
                                    modality, preprocessing, and under "medsilo": job id, spec digest,
                                    algorithm, round, per-split metrics, privacy mode and ε, augmentation
      configs/inference.json        the preprocessing as MONAI transforms and how to load the network
      models/model.ts               TorchScript: a preprocessed batch (B, C, S, S) → class probabilities (B, K);
                                    runs with torch alone
      models/model.pt               the same module's state dict (torch.save; for fine-tuning)
      docs/README.md                the model card: intended use (research only), data counts, metrics with
                                    95 % bootstrap intervals, privacy, and the ledger entry of the export

**One code path.** Every algorithm's ``Client.scores`` is what evaluation scores; :class:`Deployed` wraps a
client half so that ``forward`` *is* ``scores`` (its modules and tensors registered as the module's own), and
the TorchScript file is a trace of it, checked against ``scores`` on the site's own test images before it is
written. So ``medsilo predict`` on the site's test split gives exactly the accuracy the job reported.

**Which round.** After each round's evaluation the server tells the sites which round is best so far (its
``best_round``, chosen on mean validation accuracy); a site keeps in memory only the deployable state of
that round and of the round it just evaluated (:class:`Candidates`), and the final ``export`` task names the
selected round. A resumed job keeps candidates from the rounds it ran itself; an earlier round cannot be
exported (the site says so).

**Why TorchScript.** A hospital's inference service needs only torch to run ``model.ts`` (MONAI bundles load
their networks the same way). torch 2.13 marks ``torch.jit`` deprecated in favour of ``torch.export``; the
trace is still what runs without the training code, and the state dict beside it lets a site re-export.

**Multi-label models** (``task: multilabel``): ``model.ts`` gives one sigmoid probability per label; the
card and ``metadata.json`` (``medsilo.task``, ``labels``, ``thresholds``) list the labels, each label's AUROC
and F1 and the decision threshold chosen on this site's validation split (the one maximising that label's F1),
which ``medsilo predict`` applies.

**Record.** The export is written to a temporary sibling folder, its files hashed, a ``model_export`` entry
appended to the site's privacy ledger (model digests, round, job) under the ledger's lock, the card written
with that entry's hash, and the folder renamed into place: an auditor can link a deployed model to the
releases that trained it, and a folder without a card is never left as if complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsilo.components import checkpoint
from medsilo.components.training import auroc, choose_thresholds, classification_metrics, multilabel_metrics
from medsilo.config.common import MODALITY_CHANNELS, SITE_NAME_PATTERN
from medsilo.errors import MedsiloError
from medsilo.medical.data.transforms import normalize
from medsilo.secure.ledger import verified_entries

MODELS_DIR_ENV = "MEDSILO_MODELS_DIR"
"""Simulation: the folder the sites write their models into, one sub-folder per site (``RUN_DIR/models``)."""

BOOTSTRAP_RESAMPLES = 1000
"""Resamples of a split's images behind each 95 % interval in the model card."""


class ExportError(MedsiloError):
    """A model that cannot be exported (no candidate of the round, a trace that does not reproduce scores)."""


class Deployed(nn.Module):
    """A client half's deployed model as one module: ``forward(x)`` is ``client.scores(x)``.

    Args:
        client: an algorithm's client half (``medsilo.components.algorithms.base.Client``).

    The client's modules become sub-modules (``parts.<attribute>``), its tensors buffers
    (``state.<attribute>``) and its parameters parameters, so a trace records them as the module's own
    state and ``state_dict`` holds everything the prediction uses.
    """

    def __init__(self, client: Any):
        super().__init__()
        self._client = (client,)  # a tuple: not registered as a sub-module
        self.parts = nn.ModuleDict()
        self.state = nn.Module()
        for name, value in vars(client).items():
            if isinstance(value, nn.Module):
                self.parts[name] = value
            elif isinstance(value, nn.Parameter):
                self.state.register_parameter(name, value)
            elif isinstance(value, torch.Tensor):
                self.state.register_buffer(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, K)`` for a preprocessed batch ``(B, C, S, S)``."""
        return self._client[0].scores(x)


def trace(client: Any, example: torch.Tensor) -> torch.jit.ScriptModule:
    """TorchScript of ``client``'s deployed model, traced on ``example`` and checked against ``scores``.

    Raises:
        ExportError: the trace does not give ``scores``' probabilities on ``example`` (to 1e-5).
    """
    module = Deployed(client).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # branches on the fixed state are resolved
        warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated", category=DeprecationWarning)
        traced = torch.jit.trace(module, example, check_trace=False)
        want, got = client.scores(example), traced(example)
    if want.shape != got.shape or not torch.allclose(want, got, atol=1e-5, rtol=1e-4):
        raise ExportError(f"the traced model of {type(client).__module__} does not reproduce its scores "
                          f"(max difference {float((want - got).abs().max()):.3g})")  # fmt: skip
    return traced


class Candidates:
    """The deployable states a site keeps until the job's round is selected: at most the server's best round
    so far and the round just evaluated.

    Attributes:
        states: round → :func:`~medsilo.components.checkpoint.snapshot` of the client half.
        evals: round → the site's evaluation of that round (``{"val": …, "test": …}``).
    """

    def __init__(self) -> None:
        self.states: dict[int, dict] = {}
        self.evals: dict[int, dict] = {}

    def keep(self, rnd: int, client: Any, evaluation: Mapping[str, Any], best: Any) -> None:
        """Keep round ``rnd``'s state (the model evaluated as round ``rnd``); drop every kept round but ``rnd``
        and ``best`` (the server's best round so far, ``None`` before it knows one)."""
        self.states[rnd] = checkpoint.snapshot(client)
        self.evals[rnd] = dict(evaluation)
        for old in [r for r in self.states if r not in (rnd, best)]:
            del self.states[old], self.evals[old]

    def restore(self, rnd: int, client: Any) -> dict:
        """Put ``client`` into round ``rnd``'s state; returns that round's evaluation.

        Raises:
            ExportError: the round is not kept (it was never evaluated here, or before a resume).
        """
        if rnd not in self.states:
            kept = ", ".join(map(str, sorted(self.states))) or "none"
            raise ExportError(f"round {rnd} is not among the rounds this site kept ({kept}); a resumed job keeps "
                              "only rounds it ran itself")  # fmt: skip
        checkpoint.restore_snapshot(client, self.states[rnd])
        return self.evals[rnd]


@dataclass(frozen=True)
class ExportFacts:
    """What the bundle and its card say about the job (everything but the model and the data).

    Attributes:
        site, job_id, spec_digest, job_name, algorithm, modality, classes, image_size: the job.
        round: the selected round exported.
        privacy_mode: the job's privacy mode; ``epsilon``/``delta``: what this site's releases of the jobs that
            trained the model cost (DP modes), composed.
        trained_by: the jobs whose rounds trained the model, oldest first (a resumed job and the interrupted
            one it continues).
        augmentation: the training augmentation that ran (resolved, JSON).
        medsilo_version: the version that wrote the bundle.
        task: the job's ``task`` (``single`` or ``multilabel``; then ``classes`` are the labels).
    """

    site: str
    job_id: str
    spec_digest: str
    job_name: str
    algorithm: str
    modality: str
    classes: tuple[str, ...]
    image_size: int
    round: int
    privacy_mode: str
    epsilon: float | None
    delta: float | None
    augmentation: list
    medsilo_version: str
    trained_by: tuple[str, ...] = ()
    task: str = "single"


def bootstrap(probs: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> dict[str, list[float] | None]:
    """95 % percentile intervals of accuracy and AUROC over :data:`BOOTSTRAP_RESAMPLES` resamples of the
    images (with replacement); an AUROC interval is ``None`` when too few resamples hold two classes."""
    p, y = probs.double().numpy(), labels.numpy()
    correct = p.argmax(1) == y
    rng = np.random.default_rng(seed)
    accs, aurocs = [], []
    for _ in range(BOOTSTRAP_RESAMPLES):
        idx = rng.integers(0, len(y), len(y))
        accs.append(float(correct[idx].mean()))
        value = auroc(p[idx], y[idx])
        if not math.isnan(value):
            aurocs.append(value)
    interval = lambda xs: [float(np.percentile(xs, 2.5)), float(np.percentile(xs, 97.5))]  # noqa: E731
    return {"acc": interval(accs), "auroc": interval(aurocs) if len(aurocs) >= BOOTSTRAP_RESAMPLES // 2 else None}


def export_model(folder: Path, client: Any, data: Any, facts: ExportFacts, record) -> dict[str, Any]:
    """Write the bundle of ``client`` (already in the selected round's state) into ``folder``, atomically.

    Args:
        folder: the bundle folder; it must not exist yet.
        client: the client half in the state to deploy.
        data: the site's :class:`~medsilo.medical.data.SiteData` (counts, test images for the trace check).
        facts: what the bundle says about the job.
        record: ``record(what) -> entry hash``: appends the ``model_export`` ledger entry (the site pipeline's
            :meth:`~medsilo.secure.pipeline.base.SitePipeline.record_export`).

    Returns:
        ``{"round", "sha256", "state_sha256", "ledger_entry"}`` (digests of ``model.ts`` and ``model.pt``).

    Raises:
        ExportError: the folder exists, or the trace does not reproduce the scores. Nothing is left behind.
    """
    folder = Path(folder)
    if folder.exists() or folder.is_symlink():
        raise ExportError(f"the model folder of {folder.name} exists already; a job exports its model once")
    if folder.parent.is_symlink():
        raise ExportError(f"the models folder of {folder.name} is a symbolic link; refusing to write through it")
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.partial-"))  # new, never a planted link
    try:
        for sub in ("configs", "models", "docs"):
            (tmp / sub).mkdir(parents=True)
        test_x = torch.stack([data.test[i][0] for i in range(min(len(data.test), 64))])
        traced = trace(client, test_x)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated", category=DeprecationWarning)
            traced.save(str(tmp / "models" / "model.ts"))
        torch.save(Deployed(client).state_dict(), tmp / "models" / "model.pt")
        metrics = {}
        if facts.task == "multilabel":
            metrics, counts = _multilabel_metrics(client, data, facts)
        else:
            for split in ("val", "test"):
                ds = data.split(split)
                probs, labels = _predict(client, ds)  # scored once: the point figures and the bootstrap share them
                point = classification_metrics(probs, labels)
                metrics[split] = {"acc": point["acc"], "auroc": _plain(point["auroc"]), "n": len(labels),
                                  "ci95": bootstrap(probs, labels, seed=facts.round)}  # fmt: skip
            counts = {split: dict(zip(facts.classes, data.split(split).class_counts(len(facts.classes)).tolist(),
                                      strict=True)) for split in ("train", "val", "test")}  # fmt: skip
        digest = _sha256(tmp / "models" / "model.ts")
        state_digest = _sha256(tmp / "models" / "model.pt")
        channels = int(data.channels)
        metadata = _metadata(facts, metrics, counts, channels, digest, state_digest)
        (tmp / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        (tmp / "configs" / "inference.json").write_text(json.dumps(_inference(facts, channels), indent=2) + "\n")
        entry = record({"kind": "model", "round": facts.round, "model_sha256": digest, "state_sha256": state_digest,
                        "metadata_sha256": _sha256(tmp / "configs" / "metadata.json"), "format": "monai-bundle",
                        "trained_by": list(facts.trained_by or (facts.job_id,))})
        (tmp / "docs" / "README.md").write_text(_card(facts, metrics, counts, channels, digest, entry))
        if folder.exists() or folder.is_symlink():
            raise ExportError(f"the model folder of {folder.name} appeared while it was written; not replaced")
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"round": facts.round, "sha256": digest, "state_sha256": state_digest, "ledger_entry": entry}


def _multilabel_metrics(client: Any, data: Any, facts: ExportFacts) -> tuple[dict, dict]:
    """A multi-label model's figures per split (thresholds chosen on validation, as the job's evaluation did) and
    its data counts (positive, negative and unknown images per label and split)."""
    scored = {split: _predict(client, data.split(split)) for split in ("val", "test")}
    cut = choose_thresholds(*scored["val"])
    metrics = {}
    for split, (probs, targets) in scored.items():
        m = multilabel_metrics(probs, targets, facts.classes, cut)
        metrics[split] = {"acc": _plain(m["acc"]), "auroc": _plain(m["macro_auroc"]), "n": len(targets),
                          "macro_f1": _plain(m["macro_f1"]),
                          "per_label": {c: {"auroc": _plain(m[f"auroc/{c}"]), "f1": _plain(m[f"f1/{c}"]),
                                            "threshold": float(m[f"threshold/{c}"])} for c in facts.classes},
                          "ci95": {"acc": None, "auroc": macro_auroc_interval(probs, targets, seed=facts.round)}}
    counts = {}
    for split in ("train", "val", "test"):
        y = data.split(split).labels
        counts[split] = {c: {"positive": int((y[:, k] == 1).sum()), "negative": int((y[:, k] == 0).sum()),
                             "unknown": int(torch.isnan(y[:, k]).sum())} for k, c in enumerate(facts.classes)}
    return metrics, counts  # fmt: skip


def macro_auroc_interval(probs: torch.Tensor, targets: torch.Tensor, seed: int = 0) -> list[float] | None:
    """95 % percentile interval of the macro-AUROC (mean over labels with both values known) over
    :data:`BOOTSTRAP_RESAMPLES` resamples of the images; ``None`` when too few resamples define it."""
    p, y = probs.double().numpy(), targets.double().numpy()
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        idx = rng.integers(0, len(y), len(y))
        per_label = []
        for k in range(p.shape[1]):
            known = ~np.isnan(y[idx, k])
            col, truth = p[idx, k][known], y[idx, k][known].astype(int)
            if len(np.unique(truth)) == 2:
                per_label.append(auroc(np.stack([1 - col, col], 1), truth))
        if per_label:
            values.append(float(np.mean(per_label)))
    if len(values) < BOOTSTRAP_RESAMPLES // 2:
        return None
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def _predict(client: Any, ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
    loader = torch.utils.data.DataLoader(ds, batch_size=256, shuffle=False)
    probs, labels = [], []
    with torch.no_grad():
        for x, y in loader:
            probs.append(client.scores(x))
            labels.append(y)
    return torch.cat(probs), torch.cat(labels)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _plain(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


NORMALIZE = {"a_min": 0.0, "a_max": 1.0, "b_min": -2.0, "b_max": 2.0}
"""medsilo's fixed intensity map ``(x − 0.5) / 0.25`` as MONAI ``ScaleIntensityRange`` arguments."""


def _preprocessing(facts: ExportFacts, channels: int) -> dict[str, Any]:
    reader = {"cxr": "DICOM CR/DX through medsilo.medical.data.readers.LoadCXR (modality LUT, VOI LUT or window, "
                     "MONOCHROME1 inverted): one channel in [0, 1]",
              "pathology": "PNG/JPEG/TIFF as RGB scaled to [0, 1] (medsilo.medical.data.readers.LoadPatch)",
              "image": f"PNG/JPEG/TIFF scaled to [0, 1] (8-bit / 255, 16-bit / 65535), {channels} channel(s) "
                       "(medsilo.medical.data.readers.LoadImageFile)"}[facts.modality]  # fmt: skip
    return {"read": reader,
            "resize": f"longest side to {facts.image_size} (area averaging), zero-padded to a square",
            "normalize": "(x - 0.5) / 0.25, the same at every site"}  # fmt: skip


def _metadata(facts: ExportFacts, metrics: dict, counts: dict, channels: int, digest: str, state_digest: str):
    import monai

    classes = {str(i): name for i, name in enumerate(facts.classes)}
    multilabel = facts.task == "multilabel"
    task_fields = {"task": facts.task, "labels": list(facts.classes) if multilabel else [],
                   "thresholds": {c: metrics["val"]["per_label"][c]["threshold"] for c in facts.classes}
                   if multilabel else {}}  # fmt: skip
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "1.0.0",
        "changelog": {"1.0.0": f"exported by medsilo {facts.medsilo_version} from job {facts.job_id}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {},
        "task": f"{facts.modality} {'multi-label ' if multilabel else ''}classification ({', '.join(facts.classes)})",
        "description": f"{facts.algorithm} model of site {facts.site}, round {facts.round} of job {facts.job_name}",
        "authors": f"site {facts.site} (medsilo federated job {facts.job_id})",
        "copyright": f"the data holder of site {facts.site}",
        "intended_use": "research only; not for clinical use",
        "data_source": f"site {facts.site}'s own data (never left the site)",
        "data_type": facts.modality,
        "image_classes": f"{channels} channel(s), {facts.image_size}x{facts.image_size}, preprocessed",
        "label_classes": classes,
        "pred_classes": classes,
        "eval_metrics": {f"{split}_{k}": v for split, m in metrics.items() for k, v in m.items() if k in ("acc", "auroc")},
        "references": ["DESIGN.md §4 (evaluation), medsilo components/export.py"],
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": facts.modality,
                                 "num_channels": channels, "spatial_shape": [facts.image_size, facts.image_size],
                                 "dtype": "float32", "value_range": [-2, 2], "is_patch_data": False,
                                 "channel_def": {str(c): "intensity" for c in range(channels)}}},
            "outputs": {"pred": {"type": "probabilities", "format": "labels" if multilabel else "classes",
                                 "num_channels": len(facts.classes),
                                 "spatial_shape": [1], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": False, "channel_def": classes}},
        },  # fmt: skip
        "medsilo": {
            "version": facts.medsilo_version, "site": facts.site, "job_id": facts.job_id, "job": facts.job_name,
            "spec_sha256": facts.spec_digest, "algorithm": facts.algorithm, "round": facts.round,
            "modality": facts.modality, "classes": list(facts.classes), "channels": channels, **task_fields,
            "image_size": facts.image_size, "preprocessing": _preprocessing(facts, channels),
            "metrics": metrics, "data_counts": counts,
            "privacy": {"mode": facts.privacy_mode, "epsilon": facts.epsilon, "delta": facts.delta},
            "trained_by": list(facts.trained_by or (facts.job_id,)),
            "augmentation": facts.augmentation, "model_sha256": digest, "state_sha256": state_digest,
        },  # fmt: skip
    }


def _inference(facts: ExportFacts, channels: int) -> dict[str, Any]:
    return {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "network_def": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location=@device)",
        "_comment": "images as medsilo's reader returns them ((C, H, W) float32 in [0, 1]; see metadata.json "
                    "medsilo.preprocessing), then these transforms, then the network: probabilities per class",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Resize", "spatial_size": facts.image_size, "size_mode": "longest", "mode": "area"},
                {"_target_": "SpatialPad", "spatial_size": [facts.image_size, facts.image_size], "mode": "constant"},
                {"_target_": "ScaleIntensityRange", **NORMALIZE},
            ],
        },
    }  # fmt: skip


def _card(facts: ExportFacts, metrics: dict, counts: dict, channels: int, digest: str, entry: str) -> str:
    def cell(split: str, key: str) -> str:
        m = metrics[split]
        value, ci = m[key], m["ci95"][key]
        if value is None:
            return "—"
        return f"{value:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")

    multilabel = facts.task == "multilabel"
    jobs = ", ".join(facts.trained_by or (facts.job_id,))
    eps = (f"ε = {facts.epsilon:.3g} at δ = {facts.delta:g}: this site's DP releases of the job(s) that trained "
           f"the model ({jobs}), composed" if facts.epsilon else "no differential privacy (ε not accounted)")  # fmt: skip
    show = (lambda n: f"{n['positive']}/{n['negative']}/{n['unknown']}") if multilabel else str  # noqa: E731
    rows = "\n".join(f"| {split} | " + " | ".join(show(counts[split][c]) for c in facts.classes) + " |"
                     for split in ("train", "val", "test"))  # fmt: skip
    output = ("one probability per label (sigmoid), in the order above; a label is present when its probability "
              "is at least its threshold (below)") if multilabel else "class probabilities, in the order above"
    data_note = ": positive/negative/unknown images per label" if multilabel else ""
    label_table = "" if not multilabel else "\n## Per label (test split; thresholds chosen on validation)\n\n" \
        "| label | AUROC | F1 | threshold | validation AUROC |\n|---|---:|---:|---:|---:|\n" + "\n".join(
            f"| {c} | {_fmt(metrics['test']['per_label'][c]['auroc'])} | {_fmt(metrics['test']['per_label'][c]['f1'])} "
            f"| {metrics['val']['per_label'][c]['threshold']:.3f} | {_fmt(metrics['val']['per_label'][c]['auroc'])} |"
            for c in facts.classes) + "\n\nIn the metrics table above, AUROC is the macro mean over labels " \
        "and accuracy is exact match (every known label of an image right).\n"  # fmt: skip
    return f"""# Model card: {facts.algorithm} model of site {facts.site}

**Intended use: research only. Not a medical device; not for clinical decisions.**

| | |
|---|---|
| job | {facts.job_name} (id `{facts.job_id}`, spec SHA-256 `{facts.spec_digest[:16]}…`); trained by {jobs} |
| algorithm | {facts.algorithm}; the model this site deploys at round {facts.round}, selected on validation |
| task | {facts.modality}{" multi-label" if multilabel else ""}: {", ".join(facts.classes)} |
| input | {channels} channel(s), {facts.image_size}×{facts.image_size}, preprocessed as in `configs/metadata.json` (`medsilo.preprocessing`) |
| output | {output} |
| privacy | mode `{facts.privacy_mode}`; {eps} |
| training augmentation | {json.dumps(facts.augmentation) if facts.augmentation else "none"} |
| written by | medsilo {facts.medsilo_version} |

## Data (this site's images; they never left the site){data_note}

| split | {" | ".join(facts.classes)} |
|---|{"---:|" * len(facts.classes)}
{rows}

## Metrics (95 % bootstrap intervals over images, {BOOTSTRAP_RESAMPLES} resamples)

| split | accuracy | AUROC | images |
|---|---:|---:|---:|
| validation | {cell("val", "acc")} | {cell("val", "auroc")} | {metrics["val"]["n"]} |
| test | {cell("test", "acc")} | {cell("test", "auroc")} | {metrics["test"]["n"]} |

Small splits give wide intervals; the test split was never used to choose anything.
{label_table}
## Use

```bash
medsilo predict --model <this folder> --manifest MANIFEST.csv --out predictions.csv
python -c "import torch; m = torch.jit.load('models/model.ts'); print(m(torch.zeros(1, {channels}, {facts.image_size}, {facts.image_size})))"
```

## Provenance

- `models/model.ts` SHA-256 `{digest}`
- recorded in this site's privacy ledger, entry hash `{entry}` (event `model_export`); `medsilo audit verify`
  checks the ledger, and the entry links this model to the job's releases before it.
"""


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


# ---- loading an exported model -----------------------------------------------------------------------


CLASS_NAME = r"[A-Za-z0-9][A-Za-z0-9_ .-]{0,62}"
"""Class names as a job spec allows them (``medsilo.config.job.ClassName``)."""


def load_bundle(folder: Path, ledger: Path | None = None, root_ca: Path | None = None) -> tuple[dict, bytes]:
    """The ``medsilo`` section of a bundle's ``configs/metadata.json`` and the exact bytes of ``models/model.ts``,
    after checking them.

    A TorchScript file is code: loading and running it can do what any program of the user can. So the bytes
    that will be loaded are the bytes that were hashed, and with ``ledger`` (and the network's ``root_ca``) the
    model and metadata digests must be the ones a verified ``model_export`` entry of the exporting site
    recorded — without it, the model is only checked against its own metadata (which whoever can change the
    model can change too).

    Raises:
        MedsiloError: not an exported model folder, metadata out of its allowed ranges, a model file that
            differs from the recorded one, or (with ``ledger``) no verified export entry of these digests.
    """
    meta_file, model_file = folder / "configs" / "metadata.json", folder / "models" / "model.ts"
    if not meta_file.is_file() or not model_file.is_file():
        raise MedsiloError(f"{folder}: not an exported model (expected configs/metadata.json and models/model.ts)")
    meta_bytes, model = meta_file.read_bytes(), model_file.read_bytes()
    try:
        meta = json.loads(meta_bytes)["medsilo"]
        ok = (meta["modality"] in MODALITY_CHANNELS and meta["channels"] in (1, 3)
              and isinstance(meta["image_size"], int) and 8 <= meta["image_size"] <= 512
              and isinstance(meta["classes"], list) and len(meta["classes"]) >= 2
              and all(isinstance(c, str) and re.fullmatch(CLASS_NAME, c) for c in meta["classes"])
              and re.fullmatch(SITE_NAME_PATTERN, str(meta["site"])) is not None
              and isinstance(meta["model_sha256"], str))  # fmt: skip
    except (ValueError, KeyError, TypeError) as exc:
        raise MedsiloError(f"{meta_file}: not medsilo model metadata ({type(exc).__name__}: {exc})") from None
    if not ok:
        raise MedsiloError(f"{meta_file}: modality, channels, image_size, classes or site out of their allowed values")
    if meta.get("task", "single") not in ("single", "multilabel"):
        raise MedsiloError(f"{meta_file}: task must be 'single' or 'multilabel', got {meta.get('task')!r}")
    if meta.get("task") == "multilabel":
        cut = meta.get("thresholds")
        if not (isinstance(cut, dict) and list(cut) == meta["classes"]
                and all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in cut.values())):  # fmt: skip
            raise MedsiloError(f"{meta_file}: a multi-label model needs thresholds: one number in [0, 1] per label")
    digest = hashlib.sha256(model).hexdigest()
    if digest != meta["model_sha256"]:
        raise MedsiloError(f"{model_file}: differs from the model the export recorded (SHA-256 in "
                           f"{meta_file}); re-export it or restore it from backup")  # fmt: skip
    if ledger is not None:
        meta_digest = hashlib.sha256(meta_bytes).hexdigest()
        entries = verified_entries(ledger, root_ca)
        if not any(e["event"] == "model_export" and e.get("party") == meta["site"] and
                   e["what"].get("model_sha256") == digest and e["what"].get("metadata_sha256") == meta_digest
                   for e in entries):  # fmt: skip
            raise MedsiloError(f"{folder}: no verified model_export entry of site {meta['site']} in {ledger} records "
                               "this model and metadata; it is not the model that site exported")  # fmt: skip
    return meta, model


def bundle_encoder(folder: Path, channels: int, ledger: Path | None, root_ca: Path | None = None):
    """PCEvolve's ``federated`` encoder: the feature extractor of a model this site exported.

    A **non-private reference** (benchmarks, ε = ∞): the model was fitted on the site's own images, so it
    cannot serve a DP selection over those images (:class:`medsilo.medical.synth.pcevolve.evolve.PCEvolveConfig`
    refuses it at finite ε).

    The bundle is loaded through :func:`load_bundle` (with ``ledger``: only a model whose digests a verified
    ``model_export`` entry records — a TorchScript file is code). Its features are those of the first
    ``base`` (the zoo's feature extractor, ``SplitModel.base``) among the deployed module's parts; images are
    resized to the bundle's input size and normalised as the job normalised them.

    Returns:
        ``(embed, facts)``: ``embed`` maps ``(B, C, S, S)`` [0, 1] → ``(B, d)``; ``facts`` names the model
        (``encoder``, ``encoder_sha256``, ``encoder_job``) for ``pcevolve.json`` and the ledger.

    Raises:
        MedsiloError: what :func:`load_bundle` refuses, another channel count, or a model with no feature
            extractor the trace recorded.
    """
    meta, model_bytes = load_bundle(folder, ledger, root_ca)
    if meta["channels"] != channels:
        raise MedsiloError(f"{folder}: the exported model takes {meta['channels']}-channel images, this dataset has "
                           f"{channels}; choose a model of the same modality")  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated", category=DeprecationWarning)
        module = torch.jit.load(io.BytesIO(model_bytes), map_location="cpu").eval()  # the bytes hashed
    size = int(meta["image_size"])
    base = next((m for name, m in module.named_modules() if name.split(".")[-1] == "base"), None)
    probe = torch.zeros(1, channels, size, size)
    try:
        with torch.no_grad():
            dim = base(probe).shape if base is not None else None
    except (RuntimeError, AttributeError):  # a part the trace never called has no forward
        dim = None
    if dim is None or len(dim) != 2:
        raise MedsiloError(f"{folder}: the exported {meta['algorithm']} model has no feature extractor (parts.*.base) "
                           "the trace recorded; use another encoder (pretrained)")  # fmt: skip

    @torch.no_grad()
    def embed(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != size:
            x = nn.functional.interpolate(x.float(), size=(size, size), mode="area" if x.shape[-1] > size else "bilinear")
        return torch.cat([base(normalize(b.float())) for b in x.split(128)])

    facts = {"encoder": "federated", "encoder_sha256": meta["model_sha256"], "encoder_job": meta["job_id"],
             "encoder_algorithm": meta["algorithm"]}  # fmt: skip
    return embed, facts
