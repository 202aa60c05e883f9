"""Co-occurring chest X-ray findings for multi-label synthetic hospitals (``SynthRequest(multilabel=True)``).

Real chest X-ray labels (CheXpert, MIMIC-CXR, NIH ChestX-ray14) are multi-label: one image may show several
findings, and findings come together for a reason (heart failure gives an enlarged heart *and* effusions; a
pneumonia may bring a parapneumonic effusion). :func:`draw_findings` draws a patient's findings from a small
latent-cause model with that structure:

* heart failure (latent, P = 0.2 × the site's factor): cardiomegaly with P 0.85 (else 0.06), effusion with
  P 0.55 (else 0.08);
* pneumonia with P 0.25 × the site's factor; a pneumonia adds an effusion with P 0.25;
* nodule with P 0.15, independent of the rest.

So ``effusion`` co-occurs with ``cardiomegaly`` and ``pneumonia`` well above chance, and a patient may have none
(normal). Cardiomegaly is drawn as a large cardiothoracic ratio (0.55–0.66 against 0.46 ± 0.05), the others by
:func:`medsilo.medical.synth.cxr.render_density` (the first as the patient's ``finding``, the rest as
``co_findings``).

**Blanks.** In the *training* split each label cell is left blank (unknown) with P :data:`UNKNOWN_RATE`, as
CheXpert's training labels leave findings unmentioned; validation and test stay fully labelled (as a
radiologist-read test set is), so per-label AUROC is measured on every image.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from medsilo.medical.synth import cxr

ML_FINDINGS: tuple[str, ...] = ("pneumonia", "effusion", "nodule", "cardiomegaly")
"""The findings a multi-label synthetic hospital can label (its default labels, in this order)."""

UNKNOWN_RATE = 0.1
"""Share of training label cells written blank (unknown)."""


def site_factors(rng: np.random.Generator, skew: float | None) -> tuple[float, float]:
    """A site's prevalence factors for (heart failure, pneumonia): 1 without skew, else log-normal around 1
    with σ = 1/√(2α) (a smaller Dirichlet α, a more skewed site; clipped to 0.3–2.5)."""
    if skew is None:
        return 1.0, 1.0
    sigma = 1.0 / np.sqrt(2 * skew)
    return tuple(float(np.clip(np.exp(rng.normal(0, sigma)), 0.3, 2.5)) for _ in range(2))  # type: ignore[return-value]


def draw_findings(rng: np.random.Generator, factors: tuple[float, float] = (1.0, 1.0)) -> frozenset[str]:
    """One patient's findings (a subset of :data:`ML_FINDINGS`, possibly empty) from the latent-cause model."""
    heart_failure = rng.random() < min(0.2 * factors[0], 0.9)
    pneumonia = rng.random() < min(0.25 * factors[1], 0.9)
    found = set()
    if rng.random() < (0.85 if heart_failure else 0.06):
        found.add("cardiomegaly")
    if rng.random() < (0.55 if heart_failure else 0.08) or (pneumonia and rng.random() < 0.25):
        found.add("effusion")
    if pneumonia:
        found.add("pneumonia")
    if rng.random() < 0.15:
        found.add("nodule")
    return frozenset(found)


def sample_patient(rng: np.random.Generator, findings: frozenset[str]) -> cxr.Patient:
    """Anatomy for a patient with these findings: the rendered ones as ``finding`` + ``co_findings``, and
    cardiomegaly as an enlarged heart."""
    drawn = [f for f in ML_FINDINGS if f in findings and f != "cardiomegaly"]
    patient = cxr.sample_patient(rng, drawn[0] if drawn else "normal")
    ctr = float(rng.uniform(0.55, 0.66)) if "cardiomegaly" in findings else patient.ctr
    return replace(patient, co_findings=tuple(drawn[1:]), ctr=ctr)


def label_cells(findings: frozenset[str], labels: tuple[str, ...], split: str,
                rng: np.random.Generator) -> dict[str, str]:  # fmt: skip
    """A manifest row's label cells: ``"1"``/``"0"``, blank with P :data:`UNKNOWN_RATE` in the train split."""
    cells = {}
    for label in labels:
        blank = split == "train" and rng.random() < UNKNOWN_RATE
        cells[label] = "" if blank else str(int(label in findings))
    return cells
