"""Synthetic chest X-rays: procedural anatomy, class-dependent findings and per-hospital scanners.

The generator draws a schematic PA chest (body silhouette, lungs with diaphragm domes, heart,
mediastinum, spine, ribs, clavicles, lung texture and hilar vessels) as a density map in [0, 1], adds
findings, then passes it through a hospital's acquisition chain and writes a CR DICOM file (a DX *for
presentation* file for the DX hospitals that :func:`make_scanner` derives), with the view it was taken in.

* Findings: ``normal`` (none), ``pneumonia`` (1–3 patchy consolidations, biased to the lower zones),
  ``effusion`` (basal fluid with a lateral meniscus), ``nodule`` (a small sharp disc). ``severity`` in
  [0, 1] sets how conspicuous a finding is, so some cases are genuinely ambiguous.
* Scanner (:class:`CXRScanner`): heel gradient, contrast/brightness/gamma, matrix size, blur, quantum
  and electronic noise, grid stripes, collimation, a burned-in lead "L" marker in a site-specific corner,
  BitsStored, MONOCHROME1 vs MONOCHROME2, RescaleSlope/Intercept, Manufacturer. These are what make a
  model trained at one hospital fail at another (feature shift).

The anatomy is a cartoon: good for federated-learning mechanics and site-shift experiments, useless
for any clinical claim. Everything is seeded; the same seed gives byte-identical files.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)
from scipy import ndimage

CXR_FINDINGS: tuple[str, ...] = ("normal", "pneumonia", "effusion", "nodule")
RENDER_SIZE = 128
"""Side of the internal density map; the scanner then resamples it to its own matrix."""


@dataclass(frozen=True)
class CXRScanner:
    """One hospital's acquisition chain and DICOM encoding.

    Attributes:
        manufacturer, model: written to (0008,0070) and (0008,1090).
        matrix: Rows = Columns of the stored image.
        pixel_spacing: (0028,0030) in mm.
        bits_stored: (0028,0101); stored values span 0 … 2**bits_stored − 1.
        photometric: ``MONOCHROME2`` (high = bright) or ``MONOCHROME1`` (high = dark).
        gamma, contrast, brightness: intensity response applied to the density map.
        blur: Gaussian σ in pixels of the stored matrix.
        quantum_noise, electronic_noise: noise std ∝ √signal and constant.
        heel: vertical exposure gradient (anode heel effect), ± fraction.
        grid: amplitude of anti-scatter grid stripes.
        collimation: fraction of each border hidden by the collimator.
        marker_corner: corner of the burned-in "L": ``tl``, ``tr``, ``bl``, ``br``.
        rescale_slope, rescale_intercept: (0028,1053)/(0028,1052) modality LUT.
        modality: (0008,0060) ``CR`` (CR Image Storage) or ``DX`` (Digital X-Ray Image Storage - For
            Presentation, (0008,0068) *Presentation Intent Type* ``FOR PRESENTATION``).
        view: (0018,5101) *View Position*: ``PA`` for a department's chest stand, ``AP`` for a bedside portable.
    """

    manufacturer: str
    model: str
    matrix: int
    pixel_spacing: float
    bits_stored: int
    photometric: str
    gamma: float = 1.0
    contrast: float = 1.0
    brightness: float = 0.0
    blur: float = 0.0
    quantum_noise: float = 0.01
    electronic_noise: float = 0.003
    heel: float = 0.0
    grid: float = 0.0
    collimation: float = 0.0
    marker_corner: str = "tl"
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    modality: str = "CR"
    view: str = "PA"

    def scaled(self, strength: float) -> CXRScanner:
        """This scanner with its intensity, blur and noise shift scaled from neutral (0) to full (1).

        Encoding (matrix, bits, photometric, rescale, marker) is kept: the reader undoes it exactly.
        """
        s = float(strength)

        def lerp(neutral: float, value: float) -> float:
            return neutral + s * (value - neutral)

        return replace(
            self,
            gamma=lerp(1.0, self.gamma),
            contrast=lerp(1.0, self.contrast),
            brightness=lerp(0.0, self.brightness),
            blur=lerp(0.3, self.blur),
            quantum_noise=lerp(0.012, self.quantum_noise),
            electronic_noise=lerp(0.003, self.electronic_noise),
            heel=lerp(0.0, self.heel),
            grid=lerp(0.0, self.grid),
            collimation=lerp(0.0, self.collimation),
        )


CXR_SCANNERS: tuple[CXRScanner, ...] = (
    CXRScanner("Synthetic Radiography A", "SR-A100", 224, 0.16, 12, "MONOCHROME2",
               blur=0.3, quantum_noise=0.012, marker_corner="tl"),
    CXRScanner("Synthetic Radiography B", "SR-B200", 256, 0.14, 14, "MONOCHROME1",
               gamma=0.7, contrast=1.25, brightness=-0.05, blur=0.0, quantum_noise=0.02, marker_corner="tr"),
    CXRScanner("Synthetic Radiography C", "SR-C50", 160, 0.22, 10, "MONOCHROME2",
               gamma=1.45, contrast=0.85, brightness=0.06, blur=1.2, quantum_noise=0.035, heel=0.18,
               collimation=0.06, marker_corner="bl"),
    CXRScanner("Synthetic Radiography D", "SR-D-portable", 192, 0.19, 12, "MONOCHROME2",
               gamma=0.85, contrast=0.7, brightness=0.10, blur=0.6, quantum_noise=0.05, heel=-0.12,
               grid=0.03, marker_corner="br", rescale_slope=2.0, rescale_intercept=-1024.0, view="AP"),
)  # fmt: skip
"""The four reference hospitals; more are derived from these by :func:`make_scanner`."""


def make_scanner(index: int, rng: np.random.Generator) -> CXRScanner:
    """Scanner of hospital ``index``: a reference profile, or for index ≥ 4 a random blend of two (the view of
    the first; even indices are DX detectors, odd ones CR)."""
    if index < len(CXR_SCANNERS):
        return CXR_SCANNERS[index]
    a, b = (CXR_SCANNERS[i] for i in rng.choice(len(CXR_SCANNERS), size=2, replace=False))
    t = float(rng.uniform(0.2, 0.8))
    mix = {
        name: (1 - t) * getattr(a, name) + t * getattr(b, name)
        for name in ("gamma", "contrast", "brightness", "blur", "quantum_noise", "electronic_noise",
                     "heel", "grid", "collimation")
    }  # fmt: skip
    return replace(
        a,
        manufacturer=f"Synthetic Radiography {chr(ord('A') + index % 26)}{index // 26 or ''}",
        model=f"SR-X{index}",
        matrix=int(rng.choice([160, 192, 224, 256])),
        bits_stored=int(rng.choice([10, 12, 14])),
        photometric=str(rng.choice(["MONOCHROME1", "MONOCHROME2"])),
        marker_corner=str(rng.choice(["tl", "tr", "bl", "br"])),
        modality="DX" if index % 2 == 0 else "CR",
        **mix,
    )


@dataclass(frozen=True)
class Patient:
    """Per-patient anatomy; a patient's follow-up images share it."""

    tilt: float
    shift: tuple[float, float]
    scale: float
    inspiration: float
    ctr: float
    finding: str
    severity: float
    finding_seed: int
    texture_seed: int = field(default=0)
    co_findings: tuple[str, ...] = ()
    """Further findings drawn on top of ``finding`` (multi-label hospitals, :mod:`.hospitals`)."""


def sample_patient(rng: np.random.Generator, finding: str) -> Patient:
    """Draw anatomy and finding severity for one patient."""
    if finding not in CXR_FINDINGS:
        raise ValueError(f"finding must be one of {CXR_FINDINGS}, got {finding!r}")
    return Patient(
        tilt=float(rng.uniform(-4, 4)),
        shift=(float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.04, 0.04))),
        scale=float(rng.uniform(0.94, 1.06)),
        inspiration=float(rng.uniform(0.9, 1.08)),
        ctr=float(np.clip(rng.normal(0.46, 0.05), 0.35, 0.6)),
        finding=finding,
        severity=float(rng.uniform(0.25, 1.0)),
        finding_seed=int(rng.integers(2**31)),
        texture_seed=int(rng.integers(2**31)),
    )


def _grid(n: int, patient: Patient, jitter: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Patient coordinates (x right, y down, both ≈ [-1, 1]) of an n×n image, with pose applied."""
    c = (np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1
    yy, xx = np.meshgrid(c, c, indexing="ij")
    theta = np.deg2rad(patient.tilt + jitter[0])
    s = patient.scale * (1 + jitter[1])
    xs = xx - patient.shift[0] - jitter[2]
    ys = yy - patient.shift[1] - jitter[3]
    x = (np.cos(theta) * xs + np.sin(theta) * ys) / s
    y = (-np.sin(theta) * xs + np.cos(theta) * ys) / s
    return x, y


def _soft(mask_distance: np.ndarray, width: float) -> np.ndarray:
    """Smooth step from 1 (inside, distance < 0) to 0 (outside) over ``width``."""
    return 1.0 / (1.0 + np.exp(np.clip(mask_distance / width, -30, 30)))


def _lung(x: np.ndarray, y: np.ndarray, side: int, insp: float) -> np.ndarray:
    """Hard mask of one lung (side −1: image left = patient right): rounded apex, domed base."""
    cx, cy, a = side * 0.37, -0.08, 0.27
    top = 0.5 * insp
    apex = (np.abs(x - cx) / a) ** 2.4 + (np.maximum(cy - y, 0) / top) ** 2.4 < 1
    # the diaphragm dome is highest mid-lung and lowest at the costophrenic angle
    base = cy + 0.58 * insp - 0.14 * (1 - np.clip((x - cx) / a, -1, 1) ** 2) - (0.04 if side < 0 else 0.0)
    return apex & (y < base)


def render_density(patient: Patient, rng: np.random.Generator, n: int = RENDER_SIZE) -> np.ndarray:
    """Density map (n, n) float32 in [0, 1]: 0 = air, 1 = dense; MONOCHROME2 orientation.

    ``rng`` varies the acquisition (small pose jitter, noise texture) between images of one patient.
    """
    jitter = rng.normal(0, [0.8, 0.01, 0.01, 0.01])
    x, y = _grid(n, patient, jitter)
    tex_rng = np.random.default_rng(patient.texture_seed)

    # body silhouette with shoulders and neck
    body_w = np.where(y < -0.72, 0.17, 0.86 - 0.35 * np.clip((-0.55 - y) / 0.2, 0, 1) ** 2)
    body = _soft(np.abs(x) - body_w, 0.02) * _soft(-0.98 - y, 0.02)
    density = 0.5 * body + 0.06 * body * (1 - np.abs(x) / 0.9)

    lungs = _lung(x, y, -1, patient.inspiration) | _lung(x, y, +1, patient.inspiration)
    lungs = ndimage.gaussian_filter(lungs.astype(np.float32), 1.2)

    # lung texture and hilar vessels (smoothed noise, stronger near the hila)
    noise = ndimage.gaussian_filter(tex_rng.standard_normal((n, n)).astype(np.float32), 1.6)
    hila = np.exp(-((np.abs(x) - 0.2) ** 2 + (y + 0.02) ** 2) / 0.05)
    density -= lungs * (0.36 - 0.05 * noise / (noise.std() + 1e-6) - 0.10 * hila)

    # mediastinum, spine with vertebrae, heart
    medi = _soft(np.abs(x) - 0.09 - 0.04 * np.clip(y, 0, 1), 0.02) * _soft(y - 0.5, 0.05) * body
    density += 0.14 * medi
    spine = _soft(np.abs(x) - 0.045, 0.01) * body
    density += spine * (0.1 + 0.04 * np.cos(y * 34))
    hw = patient.ctr * 0.8  # half the cardiothoracic ratio of a ~0.85-wide thorax, in x units
    hx, hy = 0.07 + 0.3 * (patient.ctr - 0.46), 0.17
    heart = _soft(np.sqrt(((x - hx) / hw) ** 2 + ((y - hy) / 0.2) ** 2) - 1, 0.04)
    density += 0.2 * heart

    # ribs: arcs across each hemithorax, fading below the diaphragm
    ribs = np.zeros_like(x)
    ax = np.abs(x)
    for k in range(10):
        y0 = -0.6 + k * 0.115 * patient.inspiration
        curve = y0 + 0.22 * ((ax - 0.1) / 0.75) ** 2 - 0.08 * (ax - 0.1)
        band = np.exp(-(((y - curve) / 0.026) ** 2)) * (ax > 0.08) * (ax < 0.86)
        ribs += band * (1.0 - 0.6 * (k / 9))
    density += 0.09 * ribs * body

    # clavicles
    for side in (-1, 1):
        t = np.clip((side * x - 0.08) / 0.6, 0, 1)
        line = -0.63 - 0.1 * t
        density += 0.12 * np.exp(-(((y - line) / 0.028) ** 2)) * ((side * x) > 0.06) * ((side * x) < 0.7)

    density += _finding(patient, x, y, lungs, n)
    for i, extra in enumerate(patient.co_findings, start=1):  # multi-label: each finding from its own seed
        density += _finding(replace(patient, finding=extra, finding_seed=patient.finding_seed + i), x, y, lungs, n)
    return np.clip(density, 0, 1).astype(np.float32)


def _finding(patient: Patient, x: np.ndarray, y: np.ndarray, lungs: np.ndarray, n: int) -> np.ndarray:
    """Added density of the patient's finding (zeros for ``normal``)."""
    out = np.zeros_like(x)
    if patient.finding == "normal":
        return out
    rng = np.random.default_rng(patient.finding_seed)
    sev = patient.severity
    if patient.finding == "pneumonia":
        inside = np.flatnonzero(lungs.ravel() > 0.7)
        weights = (y.ravel()[inside] + 1.2) ** 2  # lower zones more often
        for _ in range(int(rng.integers(1, 4))):
            centre = inside[rng.choice(len(inside), p=weights / weights.sum())]
            cy, cx = y.ravel()[centre], x.ravel()[centre]
            sigma = rng.uniform(0.08, 0.15)
            blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
            patchy = ndimage.gaussian_filter(rng.standard_normal((n, n)).astype(np.float32), 2.0)
            patchy = 0.6 + 0.8 * np.clip(patchy / (patchy.std() + 1e-6), -1.5, 1.5) / 3 + 0.2
            out += (0.1 + 0.3 * sev) * blob * patchy
        return out * lungs
    if patient.finding == "effusion":
        side = int(rng.choice([-1, 1]))
        cx = side * 0.38
        level = 0.48 * patient.inspiration - (0.08 + 0.3 * sev) + 0.25 * (np.abs(x - cx) / 0.3) ** 2
        fluid = _soft(level - y, 0.03) * (np.sign(x) == side)
        return 0.30 * fluid * lungs
    # nodule
    inside = np.flatnonzero(lungs.ravel() > 0.9)
    centre = inside[rng.integers(len(inside))]
    cy, cx = y.ravel()[centre], x.ravel()[centre]
    r = rng.uniform(0.025, 0.05)
    disc = _soft(np.sqrt((x - cx) ** 2 + (y - cy) ** 2) - r, 0.006)
    return (0.12 + 0.22 * sev) * disc * lungs


_L_GLYPH = np.array(
    [[1, 1, 0, 0, 0, 0],
     [1, 1, 0, 0, 0, 0],
     [1, 1, 0, 0, 0, 0],
     [1, 1, 0, 0, 0, 0],
     [1, 1, 0, 0, 0, 0],
     [1, 1, 1, 1, 1, 1],
     [1, 1, 1, 1, 1, 1]], dtype=np.float32)  # fmt: skip


def acquire(density: np.ndarray, scanner: CXRScanner, rng: np.random.Generator) -> np.ndarray:
    """Pass a density map through the scanner; returns stored pixel values (matrix, matrix) uint16.

    The values are what goes into PixelData: quantised to ``bits_stored`` and inverted for MONOCHROME1.
    """
    n = density.shape[0]
    rows = (np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1
    img = density * (1 + scanner.heel * rows[:, None])
    img = np.clip(scanner.contrast * (img - 0.5) + 0.5 + scanner.brightness, 0, 1) ** scanner.gamma
    m = scanner.matrix
    img = ndimage.zoom(img, m / n, order=1, grid_mode=True, mode="nearest")[:m, :m]
    if scanner.blur > 0:
        img = ndimage.gaussian_filter(img, scanner.blur)
    sigma = scanner.quantum_noise * np.sqrt(np.clip(img, 0, 1)) + scanner.electronic_noise
    img = img + sigma * rng.standard_normal(img.shape).astype(np.float32)
    if scanner.grid > 0:
        img = img + scanner.grid * np.sin(np.arange(m, dtype=np.float32) * (2 * np.pi / 3.3))[None, :]
    if scanner.collimation > 0:
        k = int(round(scanner.collimation * m))
        img[:k, :] = img[-k:, :] = img[:, :k] = img[:, -k:] = 0.96
    glyph = np.kron(_L_GLYPH, np.ones((max(1, m // 64),) * 2, dtype=np.float32))
    gh, gw = glyph.shape
    off = max(2, m // 40)
    r0 = off if scanner.marker_corner[0] == "t" else m - off - gh
    c0 = off if scanner.marker_corner[1] == "l" else m - off - gw
    patch = img[r0 : r0 + gh, c0 : c0 + gw]
    img[r0 : r0 + gh, c0 : c0 + gw] = np.where(glyph > 0, 1.0, patch)
    top = 2**scanner.bits_stored - 1
    stored = np.rint(np.clip(img, 0, 1) * top).astype(np.uint16)
    if scanner.photometric == "MONOCHROME1":
        stored = np.uint16(top) - stored
    return stored


def write_cxr_dicom(
    path: str | Path,
    stored: np.ndarray,
    scanner: CXRScanner,
    *,
    patient_pseudonym: str,
    uid_seed: str,
    study_date: str,
    institution: str,
    instance_number: int = 1,
) -> None:
    """Write stored pixels as a CR Image Storage file, or for a DX scanner a Digital X-Ray Image Storage - For
    Presentation file (Explicit VR Little Endian), with the scanner's view.

    The file is de-identified the way a site would de-identify real data: the patient is a pseudonym,
    (0012,0062) *Patient Identity Removed* is ``YES``, birth date and physician names are empty, and
    (0028,0301) *Burned In Annotation* is ``NO`` (the "L" marker identifies no one). UIDs derive from
    ``uid_seed`` so the same seed gives the same bytes.

    Args:
        path: output file.
        stored: (Rows, Columns) uint16 values from :func:`acquire`.
        scanner: the acquiring scanner (encoding tags).
        patient_pseudonym: the site's pseudonym, written to PatientID and PatientName.
        uid_seed: unique string per image (e.g. ``"<seed>/<site>/<index>"``).
        study_date: ``YYYYMMDD``.
        institution: InstitutionName.
        instance_number: InstanceNumber.
    """
    study_uid = generate_uid(entropy_srcs=["study", uid_seed])
    sop_uid = generate_uid(entropy_srcs=["sop", uid_seed])
    meta = FileMetaDataset()
    sop_class = DigitalXRayImageStorageForPresentation if scanner.modality == "DX" else ComputedRadiographyImageStorage
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = scanner.modality
    ds.Manufacturer = scanner.manufacturer
    ds.ManufacturerModelName = scanner.model
    ds.InstitutionName = institution
    ds.ReferringPhysicianName = ""
    ds.PatientName = patient_pseudonym
    ds.PatientID = patient_pseudonym
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "medsilo synthetic image; no real patient"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = scanner.view
    if scanner.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["series", uid_seed])
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ["L", "F"]
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = scanner.photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = scanner.bits_stored
    ds.HighBit = scanner.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [f"{scanner.pixel_spacing:.4f}"] * 2
    ds.ImagerPixelSpacing = [f"{scanner.pixel_spacing:.4f}"] * 2
    top = 2**scanner.bits_stored - 1
    ds.RescaleIntercept = f"{scanner.rescale_intercept:g}"
    ds.RescaleSlope = f"{scanner.rescale_slope:g}"
    ds.RescaleType = "US"
    ds.WindowCenter = f"{scanner.rescale_intercept + scanner.rescale_slope * top / 2:g}"
    ds.WindowWidth = f"{scanner.rescale_slope * (top + 1):g}"
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
