"""XLA compiler options by kind of computation (``jax.jit(..., compiler_options=...)``).

Per-compile options rather than ``XLA_FLAGS``: they apply to this project's computations only
and need nothing set before JAX starts. All are for the CPU backend; elsewhere they are None.
Measured on a 2-core AMD EPYC, each option compiled both ways in one process and run
alternately.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

_YNN_FUSIONS = "xla_cpu_experimental_ynn_fusion_type"


def forward(dtype: Any = "float32") -> dict[str, str] | None:
  """Options for a forward pass without gradients (inference, evaluation); ``dtype``: the
  model's matmul dtype (``EncoderConfig.dtype``).

  float32: XLA's YNNPACK fusions (on by default in jax 0.10) are off: the base encoder's
  forward on a B = 8 TreeSatAI-like batch took 4.4 s without them against 5.6 s with them
  (their reduction fusions), XLA temp 211 against 328 MiB. bfloat16: only the matmuls go to
  YNNPACK (XLA's CPU dots compute bfloat16 operands in float32 either way): 4.1 s, temp 450
  MiB, against 4.5 s and 544 MiB with none and 4.3 s / 566 MiB with the default set (float32
  weights; 376 MiB with the bfloat16 weights that ``AnySat`` stores).
  """
  if jax.default_backend() != "cpu":
    return None
  if jnp.dtype(dtype) == jnp.bfloat16:
    return {_YNN_FUSIONS: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
  return {_YNN_FUSIONS: ""}


def training() -> dict[str, str] | None:
  """Options for a computation with a backward pass (train steps, gradients).

  XLA's CPU pipeline removes optimisation barriers (its ``cse_barrier_expander`` pass) before
  common-subexpression elimination, and the barriers are what keeps ``jax.checkpoint`` /
  ``nn.remat`` recomputations apart from the forward pass: without them XLA merges the two
  and every rematerialised value stays alive from the forward pass to the backward pass, as if
  nothing were rematerialised. With the pass off the remat policies take effect: the tiny
  encoder's forward + backward on a B = 8 TreeSatAI-like batch needs 404 MiB of XLA temp
  instead of 598 MiB, at the same speed (1.110 against 1.107 s). The pass is part of XLA's CPU
  pipeline; other backends get no options. The YNNPACK fusions stay on: without them the same
  step took 1.21 s.
  """
  if jax.default_backend() != "cpu":
    return None
  return {"xla_disable_hlo_passes": "cse_barrier_expander"}
