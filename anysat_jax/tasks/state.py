"""The train state of every task."""

from __future__ import annotations

from typing import Any

import flax
import jax


@flax.struct.dataclass
class TrainState:
  """step: int32 () optimiser steps done; params: the trained parameters (pretraining: the
  student {"encoder", "predictor", "mask_token"}; fine-tuning: {"encoder", "head"}); opt_state:
  the Optax state (pretraining: AdamW moments and the EMA teacher); key: PRNG key of the
  in-step randomness (folded with ``step``)."""

  step: jax.Array
  params: Any
  opt_state: Any
  key: jax.Array
