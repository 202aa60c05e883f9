"""Medical data and models: DICOM chest X-ray and pathology readers, MONAI transforms, the model zoo,
and synthetic hospitals.

Shape conventions, stated once (MONAI's channel-first layout):

* one image: ``(C, H, W)``; a batch: ``(B, C, H, W)``; ``C`` = 1 for chest X-ray, 3 for pathology.
* pixel values after loading: float32 in [0, 1], MONOCHROME2 polarity (higher = brighter = denser).
* features: ``(B, d)`` with ``d`` the job's shared feature dimension; logits ``(B, K)`` for ``K`` classes.
* prototypes and per-class sums: ``(K, d)``; per-class counts: ``(K,)``.

Nothing in this package imports NVFlare, and nothing downloads: every network is built with random
initialisation (``pretrained=False``).
"""
