"""Atomic writes of key, context and certificate files: :func:`medsilo.fs.write_atomic` (one helper for every
layer), under the name the secure modules use."""

from medsilo.fs import write_atomic

__all__ = ["write_atomic"]
