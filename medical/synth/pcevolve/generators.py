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

Other generators (a generic HTTP image API, a local model) plug in through :data:`GENERATORS`; they
implement :class:`Generator`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import numpy as np
from scipy import ndimage

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
                    "noise": (0.01, 0.05)}  # fmt: skip
"""Intensity response, over the range the reference scanners span."""


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
                        for k, v in parent.recipe["response"].items()}  # fmt: skip
            recipe = {"patient": patient, "response": response, "seed": int(rng.integers(2**31))}
            out.append(self._render(parent.label, recipe, parent=parent.id))
        return out

    def _render(self, label: int, recipe: dict[str, Any], parent: str | None = None) -> Candidate:
        p = dict(recipe["patient"])
        p["shift"] = tuple(p["shift"])
        rng = np.random.default_rng(recipe["seed"])
        density = cxr.render_density(cxr.Patient(**p), rng, n=self.size)
        r = recipe["response"]
        img = np.clip(r["contrast"] * (density - 0.5) + 0.5 + r["brightness"], 0, 1) ** r["gamma"]
        if r["blur"] > 0:
            img = ndimage.gaussian_filter(img, r["blur"] * self.size / 128)
        img = img + r["noise"] * np.sqrt(np.clip(img, 0, 1)) * rng.standard_normal(img.shape)
        image = np.clip(img, 0, 1).astype(np.float32)[None]
        return Candidate(image=image, label=label, recipe=recipe, parent=parent)


# ---- procedural pathology -------------------------------------------------------------------------------

_STAIN_SPREAD = {"h_scale": (0.6, 1.5), "e_scale": (0.6, 1.5), "h_rot": (-10.0, 15.0), "e_rot": (-6.0, 12.0),
                 "mpp_scale": (0.75, 1.4), "blur": (0.0, 1.2), "noise": (2.0, 5.0)}  # fmt: skip
"""Stain/optics parameters over the range the reference labs span."""
_ATYPIA = {"normal": (0.0, 0.5), "tumor": (0.5, 1.0)}
"""Atypia a variation may move to while keeping its class (the two beta laws cross at 0.5)."""


class ProceduralPathology:
    """H&E-like patches from :mod:`medsilo.medical.synth.pathology` (classes ``normal``/``tumor``)."""

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


def procedural(modality: str, classes: list[str] | tuple[str, ...], image_size: int) -> Generator:
    """The offline generator of ``modality`` (``cxr`` or ``pathology``)."""
    if modality not in PROCEDURAL:
        raise MedsiloError(f"procedural generator: no modality {modality!r}; use one of {', '.join(PROCEDURAL)}")
    return PROCEDURAL[modality](classes, image_size)


GENERATORS = {"procedural": procedural}
"""Generator name → factory ``(modality, classes, image_size) -> Generator``."""
