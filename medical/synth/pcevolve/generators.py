"""Generators for PCEvolve: where candidate synthetic images come from.

PCEvolve needs two calls from a generator (the reference uses a text-to-image / image-to-image API):

* ``random(label, n, rng)`` — n fresh candidates of class ``label``;
* ``variation(candidate, strength, n, rng)`` — n variations of one candidate; the larger ``strength``
  (0–1), the less they resemble it.

A generator **never sees the private images**: it receives class names, its own earlier candidates
and strengths only. The only private influence is *which* candidate the site's DP selection picked
(:mod:`.evolve`).

``procedural`` (default, offline): candidates are recipes of the synthetic-image family of
:mod:`medsilo.medical.synth` — a chest X-ray's anatomy, finding and intensity response, or a pathology
patch's atypia and stain — drawn with random parameters; a variation re-draws every parameter around
the parent's by ``strength`` × its spread (and new shapes/noise with probability ``strength``), keeping
the class. Images are rendered in the model's input domain: ``(C, S, S)`` float32 in [0, 1], chest
X-rays in MONOCHROME2 orientation.

``http(s)://…`` (:class:`HTTPGenerator`): a generic image API inside or outside the hospital;
``torchscript:PATH`` (:class:`TorchScriptGenerator`): a model the site supplies. :func:`make_generator`
resolves the name; a site allows generators in its policy (``privacy.pcevolve_generators``).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import urllib.error
import urllib.request
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from medsilo.errors import MedsiloError
from medsilo.medical.synth import cxr, pathology


@dataclass
class Candidate:
    """One synthetic image and how to make more like it.

    Attributes:
        image: ``(C, S, S)`` float32 in [0, 1].
        label: class index.
        recipe: JSON-plain parameters the generator needs for :meth:`Generator.variation`.
        parent: id of the candidate this one varies, or ``None`` (a fresh draw).
        id: unique within a run (``c<class>-i<iteration>-<n>``), set by the loop.
    """

    image: np.ndarray
    label: int
    recipe: dict[str, Any]
    parent: str | None = None
    id: str = field(default="")


class Generator(Protocol):
    """What PCEvolve calls (module docstring). ``classes`` are the job's class names in label order."""

    name: str

    def random(self, label: int, n: int, rng: np.random.Generator) -> list[Candidate]: ...

    def variation(self, parent: Candidate, strength: float, n: int, rng: np.random.Generator) -> list[Candidate]: ...


# ---- procedural chest X-ray ---------------------------------------------------------------------------

_PATIENT_SPREAD = {"tilt": (-4.0, 4.0), "scale": (0.94, 1.06), "inspiration": (0.9, 1.08), "ctr": (0.35, 0.6),
                   "severity": (0.25, 1.0)}  # fmt: skip
"""Numeric anatomy/finding parameters and the range :func:`medsilo.medical.synth.cxr.sample_patient` draws."""
_RESPONSE_SPREAD = {"gamma": (0.7, 1.45), "contrast": (0.7, 1.25), "brightness": (-0.05, 0.1), "blur": (0.0, 1.2),
                    "noise": (0.012, 0.05), "heel": (-0.12, 0.18), "grid": (0.0, 0.03), "collimation": (0.0, 0.06),
                    "matrix": (160.0, 256.0)}  # fmt: skip
"""The acquisition chain (:func:`medsilo.medical.synth.cxr.acquire`): intensity response, blur, noise, heel
gradient, grid stripes, collimation and matrix size, over the range the reference scanners span — so a site's
DP picks can steer candidates toward its own scanner, which the generator never sees."""
_MARKER_CORNERS = ("tl", "tr", "bl", "br")


class ProceduralCXR:
    """Chest X-rays from :mod:`medsilo.medical.synth.cxr`'s renderer (class names = findings)."""

    name = "procedural"

    def __init__(self, classes: list[str] | tuple[str, ...], image_size: int):
        unknown = [c for c in classes if c not in cxr.CXR_FINDINGS]
        if unknown:
            raise MedsiloError(f"procedural generator: chest X-ray classes {unknown} are not findings it can draw; "
                               f"it knows {', '.join(cxr.CXR_FINDINGS)}")  # fmt: skip
        self.classes, self.size = tuple(classes), int(image_size)

    def random(self, label: int, n: int, rng: np.random.Generator) -> list[Candidate]:
        out = []
        for _ in range(n):
            patient = asdict(cxr.sample_patient(rng, self.classes[label]))
            response = {k: float(rng.uniform(*r)) for k, r in _RESPONSE_SPREAD.items()}
            response["marker_corner"] = str(rng.choice(_MARKER_CORNERS))
            out.append(self._render(label, {"patient": patient, "response": response, "seed": int(rng.integers(2**31))}))
        return out

    def variation(self, parent: Candidate, strength: float, n: int, rng: np.random.Generator) -> list[Candidate]:
        out = []
        for _ in range(n):
            patient = dict(parent.recipe["patient"])
            for key, (lo, hi) in _PATIENT_SPREAD.items():
                patient[key] = float(np.clip(patient[key] + strength * (hi - lo) / 2 * rng.standard_normal(), lo, hi))
            sx, sy = patient["shift"]
            patient["shift"] = [float(np.clip(v + strength * 0.04 * rng.standard_normal(), -0.04, 0.04)) for v in (sx, sy)]
            for key in ("finding_seed", "texture_seed"):
                if rng.random() < strength:  # new lesion shape / lung texture
                    patient[key] = int(rng.integers(2**31))
            response = {k: float(np.clip(v + strength * (_RESPONSE_SPREAD[k][1] - _RESPONSE_SPREAD[k][0]) / 2
                                         * rng.standard_normal(), *_RESPONSE_SPREAD[k]))
                        for k, v in parent.recipe["response"].items() if k in _RESPONSE_SPREAD}  # fmt: skip
            corner = parent.recipe["response"].get("marker_corner", "tl")
            response["marker_corner"] = str(rng.choice(_MARKER_CORNERS)) if rng.random() < strength / 2 else corner
            recipe = {"patient": patient, "response": response, "seed": int(rng.integers(2**31))}
            out.append(self._render(parent.label, recipe, parent=parent.id))
        return out

    def _render(self, label: int, recipe: dict[str, Any], parent: str | None = None) -> Candidate:
        """Density map → the acquisition chain the synthetic hospitals use → what the site's reader returns
        (stored values / their maximum, MONOCHROME2) → area-resized to the job's size."""
        p = dict(recipe["patient"])
        p["shift"] = tuple(p["shift"])
        rng = np.random.default_rng(recipe["seed"])
        density = cxr.render_density(cxr.Patient(**p), rng, n=max(2 * self.size, 128))
        r = recipe["response"]
        scanner = cxr.CXRScanner("procedural", "procedural", matrix=int(round(r.get("matrix", 2 * self.size))),
                                 pixel_spacing=0.16, bits_stored=12, photometric="MONOCHROME2", gamma=r["gamma"],
                                 contrast=r["contrast"], brightness=r["brightness"], blur=r["blur"],
                                 quantum_noise=r["noise"], heel=r.get("heel", 0.0), grid=r.get("grid", 0.0),
                                 collimation=r.get("collimation", 0.0), marker_corner=r.get("marker_corner", "tl"))  # fmt: skip
        img = torch.from_numpy(cxr.acquire(density, scanner, rng).astype(np.float32) / (2**12 - 1))[None, None]
        image = torch.nn.functional.interpolate(img, size=(self.size, self.size), mode="area")[0].numpy()
        return Candidate(image=np.clip(image, 0, 1).astype(np.float32), label=label, recipe=recipe, parent=parent)


# ---- procedural pathology -------------------------------------------------------------------------------

_STAIN_SPREAD = {"h_scale": (0.6, 1.5), "e_scale": (0.6, 1.5), "h_rot": (-10.0, 15.0), "e_rot": (-6.0, 12.0),
                 "mpp_scale": (0.75, 1.4), "blur": (0.0, 1.2), "noise": (2.0, 5.0)}  # fmt: skip
"""Stain/optics parameters over the range the reference labs span."""
_ATYPIA = {
    "normal": (0.0, pathology.atypia_boundary("normal", "tumor")),
    "tumor": (pathology.atypia_boundary("normal", "tumor"), 1.0),
    "low-grade": (pathology.atypia_boundary("normal", "low-grade"), pathology.atypia_boundary("low-grade", "high-grade")),
    "high-grade": (pathology.atypia_boundary("low-grade", "high-grade"), 1.0),
}  # fmt: skip
"""Atypia a variation may move to while keeping its class: between the points where its Beta law crosses its
neighbours' (normal/tumor at 0.5; normal/low-grade at ≈ 0.36, low-/high-grade at ≈ 0.65; a graded job's
``normal`` keeps its two-class range, which reaches into low-grade's as the laws themselves do)."""


class ProceduralPathology:
    """H&E-like patches from :mod:`medsilo.medical.synth.pathology` (its classes: ``normal``/``tumor``, or the
    grades ``normal``/``low-grade``/``high-grade``)."""

    name = "procedural"

    def __init__(self, classes: list[str] | tuple[str, ...], image_size: int):
        unknown = [c for c in classes if c not in pathology.PATHOLOGY_CLASSES]
        if unknown:
            raise MedsiloError(f"procedural generator: pathology classes {unknown} are not ones it can draw; "
                               f"it knows {', '.join(pathology.PATHOLOGY_CLASSES)}")  # fmt: skip
        self.classes, self.size = tuple(classes), int(image_size)

    def random(self, label: int, n: int, rng: np.random.Generator) -> list[Candidate]:
        out = []
        for _ in range(n):
            name = self.classes[label]
            atypia = float(np.clip(pathology.sample_atypia(rng, name), *_ATYPIA[name]))
            stain = {k: float(rng.uniform(*r)) for k, r in _STAIN_SPREAD.items()}
            out.append(self._render(label, {"atypia": atypia, "stain": stain, "seed": int(rng.integers(2**31))}))
        return out

    def variation(self, parent: Candidate, strength: float, n: int, rng: np.random.Generator) -> list[Candidate]:
        lo, hi = _ATYPIA[self.classes[parent.label]]
        out = []
        for _ in range(n):
            atypia = float(np.clip(parent.recipe["atypia"] + strength * 0.25 * rng.standard_normal(), lo, hi))
            stain = {k: float(np.clip(v + strength * (_STAIN_SPREAD[k][1] - _STAIN_SPREAD[k][0]) / 2
                                      * rng.standard_normal(), *_STAIN_SPREAD[k]))
                     for k, v in parent.recipe["stain"].items()}  # fmt: skip
            recipe = {"atypia": atypia, "stain": stain, "seed": int(rng.integers(2**31))}
            out.append(self._render(parent.label, recipe, parent=parent.id))
        return out

    def _render(self, label: int, recipe: dict[str, Any], parent: str | None = None) -> Candidate:
        site = replace(pathology.StainSite(), **recipe["stain"])
        rgb = pathology.stain_patch(recipe["atypia"], site, np.random.default_rng(recipe["seed"]), size=self.size)
        image = (rgb.astype(np.float32) / 255.0).transpose(2, 0, 1).copy()
        return Candidate(image=image, label=label, recipe=recipe, parent=parent)


PROCEDURAL = {"cxr": ProceduralCXR, "pathology": ProceduralPathology}
MAX_CANDIDATE_PIXELS = 4 * 2**20
"""Largest width × height an HTTP generator's image may declare (4 megapixels; candidates are resized to the
job's image size): checked from the image header before decoding."""


def procedural(modality: str, classes: list[str] | tuple[str, ...], image_size: int) -> Generator:
    """The offline generator of ``modality`` (``cxr`` or ``pathology``)."""
    if modality not in PROCEDURAL:
        raise MedsiloError(f"procedural generator: no modality {modality!r}; use one of {', '.join(PROCEDURAL)}")
    return PROCEDURAL[modality](classes, image_size)


# ---- a generic image API over HTTP ------------------------------------------------------------------------

DOMAINS = {"cxr": "chest radiography (X-ray)", "pathology": "histological lymph node section"}
NORMAL = "normal"
"""The class whose prompt carries no finding (as the reference prompts it)."""


def prompt(modality: str, label: str) -> str:
    """``A <domain> image with <label>`` (the ``normal`` class: no label), ≤ 77 characters."""
    finding = "" if label == NORMAL else label
    return f"A {DOMAINS[modality]} image with {finding}".strip()[:77]


class HTTPGenerator:
    """Any image service that speaks this small JSON protocol (one ``POST`` per call):

    * ``<endpoint>/random`` with ``{"prompt", "label", "n", "size", "seed"}``;
    * ``<endpoint>/variation`` with the same fields plus ``"image"`` (base64 PNG of the picked candidate)
      and ``"strength"`` (0–1; larger = less like the image);

    each answering ``{"images": [base64 PNG, …]}`` with exactly ``n`` images of ``size`` × ``size``
    (grey for chest X-ray, RGB for pathology). A thin adapter puts a text-to-image / image-to-image
    model (e.g. a Stable Diffusion server inside the hospital network) behind it. What the service
    learns: class names, prompts and the site's DP picks — never a private image. Errors (refused
    connection, HTTP error, wrong count or shape) stop the run with the endpoint named.
    """

    name = "http"

    def __init__(self, endpoint: str, modality: str, classes: list[str] | tuple[str, ...], image_size: int,
                 timeout: float = 120.0):  # fmt: skip
        self.endpoint, self.modality = endpoint.rstrip("/"), modality
        self.classes, self.size, self.timeout = tuple(classes), int(image_size), timeout
        self.channels = 1 if modality == "cxr" else 3

    def random(self, label: int, n: int, rng: np.random.Generator) -> list[Candidate]:
        return self._call("random", label, n, rng, {})

    def variation(self, parent: Candidate, strength: float, n: int, rng: np.random.Generator) -> list[Candidate]:
        return self._call("variation", parent.label, n, rng, {"image": _png64(parent.image), "strength": strength},
                          parent=parent.id)  # fmt: skip

    def _call(self, verb: str, label: int, n: int, rng: np.random.Generator, extra: dict, parent: str | None = None):
        body = {"prompt": prompt(self.modality, self.classes[label]), "label": self.classes[label], "n": n,
                "size": self.size, "seed": int(rng.integers(2**31)), **extra}  # fmt: skip
        url = f"{self.endpoint}/{verb}"
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                images = json.loads(resp.read())["images"]
        except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
            raise MedsiloError(f"PCEvolve http generator {url}: {exc}; check the endpoint in "
                               "augmentation.pcevolve.generator and that the service is up") from None  # fmt: skip
        if not isinstance(images, list) or len(images) != n:
            raise MedsiloError(f"PCEvolve http generator {url}: asked for {n} images, got "
                               f"{len(images) if isinstance(images, list) else type(images).__name__}")  # fmt: skip
        out = []
        for i, data in enumerate(images):
            image = _unpng64(data, self.channels, url, i)
            if image.shape[1:] != (self.size, self.size):
                raise MedsiloError(f"PCEvolve http generator {url}: image {i} is {image.shape[2]}×{image.shape[1]}, "
                                   f"expected {self.size}×{self.size}")  # fmt: skip
            out.append(Candidate(image=image, label=label, recipe={}, parent=parent))
        return out


def _png64(image: np.ndarray) -> str:
    arr = np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)
    pil = Image.fromarray(arr[0], mode="L") if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0), "RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _unpng64(data: str, channels: int, url: str, index: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
            pil = Image.open(io.BytesIO(base64.b64decode(data, validate=True)), formats=["PNG", "JPEG"])
        width, height = pil.size
        if width * height > MAX_CANDIDATE_PIXELS:  # from the header, before any pixel is decoded
            raise ValueError(f"it declares {width}×{height} pixels, more than {MAX_CANDIDATE_PIXELS} accepted")
        pil = pil.convert("L" if channels == 1 else "RGB")
    except (binascii.Error, UnidentifiedImageError, Image.DecompressionBombError, OSError, TypeError,
            ValueError) as exc:  # fmt: skip
        raise MedsiloError(f"PCEvolve http generator {url}: image {index} is not a base64 PNG/JPEG ({exc})") from None
    arr = np.asarray(pil, dtype=np.float32) / 255.0
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1).copy()


# ---- a local model ------------------------------------------------------------------------------------------


class TorchScriptGenerator:
    """A generator the site supplies as a TorchScript file (offline, e.g. a small diffusion or VAE model
    trained on public data), with two methods::

        random(label: int, n: int, seed: int) -> Tensor (n, C, S, S) in [0, 1]
        variation(image: Tensor (C, S, S), strength: float, n: int, seed: int) -> Tensor (n, C, S, S)

    Loaded with ``torch.jit.load`` on CPU; outputs are checked for shape and range.
    """

    name = "torchscript"

    def __init__(self, path: str, modality: str, classes: list[str] | tuple[str, ...], image_size: int):
        try:
            self.model = torch.jit.load(path, map_location="cpu").eval()
        except (RuntimeError, ValueError, OSError) as exc:
            raise MedsiloError(f"PCEvolve torchscript generator {path}: cannot load ({str(exc).splitlines()[0]})") from None
        self.path, self.size, self.channels = path, int(image_size), 1 if modality == "cxr" else 3

    def random(self, label: int, n: int, rng: np.random.Generator) -> list[Candidate]:
        return self._wrap(self.model.random(label, n, int(rng.integers(2**31))), label, n, None)

    def variation(self, parent: Candidate, strength: float, n: int, rng: np.random.Generator) -> list[Candidate]:
        out = self.model.variation(torch.as_tensor(parent.image), float(strength), n, int(rng.integers(2**31)))
        return self._wrap(out, parent.label, n, parent.id)

    def _wrap(self, images, label: int, n: int, parent: str | None) -> list[Candidate]:
        arr = images.detach().float().cpu().numpy()
        if arr.shape != (n, self.channels, self.size, self.size):
            raise MedsiloError(f"PCEvolve torchscript generator {self.path}: returned shape {tuple(arr.shape)}, "
                               f"expected {(n, self.channels, self.size, self.size)}")  # fmt: skip
        arr = np.clip(np.nan_to_num(arr, nan=0.0), 0, 1)
        return [Candidate(image=a, label=label, recipe={}, parent=parent) for a in arr]


def make_generator(name: str, modality: str, classes: list[str] | tuple[str, ...], image_size: int) -> Generator:
    """The generator a job or command names: ``procedural``, ``http(s)://…`` or ``torchscript:PATH``.

    Raises:
        MedsiloError: an unknown generator, or a modality PCEvolve has no generators for (``image``).
    """
    if modality not in DOMAINS:
        raise MedsiloError(f"PCEvolve: no generator makes {modality!r} images; it runs on {', '.join(DOMAINS)} data")
    if name == "procedural":
        return procedural(modality, classes, image_size)
    if name.startswith(("http://", "https://")):
        return HTTPGenerator(name, modality, classes, image_size)
    if name.startswith("torchscript:"):
        return TorchScriptGenerator(name.removeprefix("torchscript:"), modality, classes, image_size)
    raise MedsiloError(f"PCEvolve generator {name!r}: use procedural, an http(s):// endpoint or torchscript:PATH")
