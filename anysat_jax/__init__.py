"""anysat_jax: the AnySat Earth-observation foundation model in JAX/Flax.

The top-level names load lazily, so ``anysat_jax.core`` and ``anysat_jax.io`` (used by the input
pipeline) import without JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "AnySat": "anysat_jax.inference.api",
    "AnySatEncoder": "anysat_jax.models.encoder",
    "EncoderConfig": "anysat_jax.models.config",
    "encoder_config": "anysat_jax.models.config",
    "MODALITIES": "anysat_jax.core.modalities",
    "Modality": "anysat_jax.core.modalities",
}
__all__ = sorted(_LAZY)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'anysat_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(list(globals()) + __all__)
