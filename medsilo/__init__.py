"""medsilo: cross-silo federated learning for hospitals on NVIDIA FLARE.

The installed package maps the repository's top-level folders into one namespace (DESIGN §2):
``medsilo.medical`` (data, models, synthetic hospitals), ``medsilo.secure`` (CKKS, DP, ledger),
``medsilo.components`` (what NVFlare runs), ``medsilo.jobs`` (job specs and the builder),
``medsilo.provisioning`` (startup kits), plus ``medsilo.cli`` and ``medsilo.config``.

``medsilo.config`` and ``medsilo.errors`` are leaves every layer may import; ``medsilo.cli`` sits on
top and is imported by nothing. Importing ``medsilo`` itself is cheap (no torch, no NVFlare).
"""

__version__ = "0.1.0"
