"""The self-supervised student: encoder + learned mask token + JEPA predictor.

Parameters: ``{"encoder": AnySatEncoder params, "predictor": ..., "mask_token": (E,)}``. The
EMA teacher is a second copy of the encoder parameters, kept in the optimiser state
(``optim.ema_teacher``); it runs ``AnySatEncoder.features`` on the full input.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from anysat_jax.models.config import EncoderConfig
from anysat_jax.models.encoder import AnySatEncoder, grid_validity
from anysat_jax.models.predictor import Predictor


@dataclasses.dataclass(frozen=True)
class PredictorConfig:
  """JEPA predictor size (base: 768 wide, 4 blocks, 16 heads)."""

  dim: int = 768
  depth: int = 4
  num_heads: int = 16


class StudentOutput(NamedTuple):
  """pred (T, B, K_tgt, E) predicted target tokens; tokens (M, B, N, E) the student's
  spatial-encoder patch tokens of every grid modality (for the contrastive loss); valid bool
  (M, B, N): the patches that hold data (``encoder.grid_validity``), or None (all do)."""

  pred: jax.Array
  tokens: jax.Array
  valid: jax.Array | None


class Student(nn.Module):
  """Encoder on the temporally masked input, context patches only, modality masking, and the
  predictor of the target blocks."""

  encoder_config: EncoderConfig
  predictor_config: PredictorConfig = PredictorConfig()

  def setup(self):
    self.encoder = AnySatEncoder(self.encoder_config)
    p, e = self.predictor_config, self.encoder_config
    # The predictor follows the encoder's precision and memory settings.
    self.predictor = Predictor(p.dim, p.depth, p.num_heads, dtype=jnp.dtype(e.dtype),
                               attention_impl=e.attention_impl, remat=e.remat)
    self.mask_token = self.param("mask_token", nn.initializers.zeros,
                                 (self.encoder_config.dim,))

  def __call__(self, inputs: dict[str, jax.Array], patch_size: int, ctx_idx: jax.Array,
               tgt_idx: jax.Array, tgt_valid: jax.Array, visible: jax.Array, *,
               deterministic: bool = True) -> StudentOutput:
    """Args:
      inputs: temporally masked batch.
      patch_size: metres.
      ctx_idx: (B, K_ctx) context patches (raster indices); tgt_idx, tgt_valid: (T, B, K_tgt).
      visible: (B, M, K_ctx) bool modality mask of the context tokens.
      deterministic: False in training: the encoder's dropouts act (needs a ``dropout`` rng).
    """
    emb = self.encoder.embed(inputs, patch_size, deterministic=deterministic)
    b, m, n, e = emb.grids.shape
    side = int(round(n ** 0.5))
    ctx = jnp.take_along_axis(emb.grids, ctx_idx[:, None, :, None], axis=2)   # (B, M, K, E)
    z = self.encoder.combine(ctx, emb.context, patch_size, ctx_idx, side, visible,
                             self.mask_token)
    pred = self.predictor(z[:, 1:], ctx_idx, tgt_idx, side, patch_size // 10, tgt_valid)
    valid = grid_validity(inputs, patch_size, self.encoder_config)
    return StudentOutput(pred, emb.grids.transpose(1, 0, 2, 3),
                         None if valid is None else valid.transpose(1, 0, 2))

  def init_all(self, scale: int = 1) -> jax.Array:
    """Touches every parameter (for ``init``)."""
    out = self.encoder.init_all(scale)
    z = jnp.zeros((1, 1, self.encoder_config.dim)) + self.mask_token
    idx = jnp.zeros((1, 1), jnp.int32)
    pred = self.predictor(z, idx, idx[None], 1, scale, jnp.ones((1, 1, 1), bool))
    return out + pred.sum()
