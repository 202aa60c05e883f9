"""Synthetic hospitals for demos, tests and benchmarks (DESIGN §8): chest X-ray DICOM with per-hospital
scanners, H&E-like pathology patches with per-lab stains, label skew, a scarce site, patient-level
splits. Seeded and offline. :mod:`.pcevolve`: differentially private synthetic data for scarce sites.
"""

from medsilo.medical.synth.hospitals import SynthRequest, synthesize

__all__ = ["SynthRequest", "synthesize"]
