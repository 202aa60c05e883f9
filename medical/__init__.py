"""Medical data and models: DICOM chest X-ray and pathology readers, MONAI transforms, the model zoo,
and synthetic hospitals.

Shape conventions, stated once (MONAI's channel-first layout):

* one image: ``(C, H, W)``; a batch: ``(B, C, H, W)``; ``C`` = 1 for chest X-ray, 3 for pathology.
* pixel values after loading: float32 in [0, 1], MONOCHROME2 polarity (higher = brighter = denser).
* features: ``(B, d)`` with ``d`` the job's shared feature dimension; logits ``(B, K)`` for ``K`` classes.
* prototypes and per-class sums: ``(K, d)``; per-class counts: ``(K,)``.

Nothing in this package imports NVFlare, and nothing downloads: every network is built with random
initialisation (``pretrained=False``).

Imports sit at the top of each module, with one deliberate exception: MONAI (about 2 s to import on top of
torch) is imported inside the functions that build transforms, readers and networks, and
:func:`medsilo.medical.models.build_model` loads the zoo when called. The config layer (which learns the
backbone names from :mod:`medsilo.medical.models`), ``medsilo synth``, the server and ``medsilo audit`` never
pay for it.
"""
