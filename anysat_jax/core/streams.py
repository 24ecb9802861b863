"""Independent NumPy random streams of the host-side draws, one per consumer.

Every host-side random choice of a run comes from ``rng(seed, STREAM, *keys)``: the run seed, the
consumer's stream id and the consumer's own counters (step, row, ...). Two consumers never share
a stream, so, e.g., the dataset drawn at a step does not correlate with that step's masks, and a
draw depends only on its keys (resuming or changing the process count draws the same values).
"""

from __future__ import annotations

import numpy as np

MIXTURE = 1        # Dataset and patch size of each step (input_pipeline.mixture).
BLOCK_MASKS = 2    # Context and target blocks of each sample (anysat_jax.tasks.masking).


def rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
  """The generator of ``stream`` at ``keys`` for the run ``seed`` (all non-negative ints)."""
  entropy = [int(seed), int(stream), *(int(k) for k in keys)]
  if min(entropy) < 0:
    raise ValueError(f"random stream keys must be non-negative, got {entropy}")
  return np.random.default_rng(entropy)
