"""The shared spatial transformer: sub-patch tokens of one patch -> one patch token.

It runs once per modality on (B*N, K, E) token groups, prepends a class token, adds a sin-cos
table of the sub-patch positions in metres, and applies pre-norm blocks whose attention carries
the contextual relative-position (iRPE) term of the reference.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anysat_jax.models import layers, pos_embed


class RPEAttention(nn.Module):
  """Self-attention with iRPE on keys: ``logits = (q s) k^T + R``, s = hd**-0.5.

  ``R[i, j] = <(q s)_i of head 0, W[:, bucket(i, j)]>`` is added to every head, as in the
  reference (its gather keeps head 0 only).
  """

  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, buckets: jax.Array) -> jax.Array:
    """x (b, L, E); buckets: int (L, L) iRPE bucket ids."""
    b, length, e = x.shape
    hd = e // self.num_heads
    qkv = layers.dense(3 * e, self.dtype, "qkv")(x).reshape(b, length, 3, self.num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]              # (b, L, h, hd) each
    table = self.param("rpe_table", nn.initializers.zeros, (hd, pos_embed.NUM_BUCKETS))
    qw = (q[:, :, 0].astype(jnp.float32) * hd ** -0.5) @ table      # (b, L, 8), head 0
    # R[b, i, j] = qw[b, i, bucket(i, j)] as a contraction with the (constant) one-hot buckets:
    # the same values as a gather, and a backward pass without a scatter (slow on CPU and TPU)
    # or a saved (b, L, L) index array.
    onehot = jax.nn.one_hot(buckets, pos_embed.NUM_BUCKETS, dtype=qw.dtype)   # (L, L, 8)
    rpe = jnp.einsum("bik,ijk->bij", qw, onehot, precision=jax.lax.Precision.HIGHEST)
    o = layers.attention(q, k, v, hd ** -0.5, bias=rpe[:, None], impl=self.attention_impl)
    return layers.dense(e, self.dtype, "proj", f32_out=True)(o.reshape(b, length, e))


class RPEBlock(nn.Module):
  """Pre-norm transformer block (LayerNorm eps 1e-5) with RPE attention."""

  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, buckets: jax.Array) -> jax.Array:
    y = layers.layer_norm(1e-5, "norm1", self.dtype)(x)
    x = x + RPEAttention(self.num_heads, self.dtype, self.attention_impl, name="attn")(y, buckets)
    hidden = int(x.shape[-1] * self.mlp_ratio)
    y = layers.layer_norm(1e-5, "norm2", self.dtype)(x)
    return x + layers.Mlp(hidden, self.dtype, name="mlp")(y)


def pe_grid_side(scale: int, subpatch_m: float) -> int:
  """Side G of the sub-patch positional grid: max(1, int(s * 10 / rho)) with the reference's
  float division and truncation."""
  return max(1, int(scale * 10 / subpatch_m))


class SpatialEncoder(nn.Module):
  """Encodes each patch's K sub-patch tokens (width ``dim``) into one patch token.

  ``dtype``: matmul dtype (see ``layers``); ``remat``: recompute each block's activations in the
  backward pass instead of storing them (without it, only the cheap ones:
  ``layers.block_remat``); ``chunk_tokens`` > 0: run the patches in chunks of at most that many
  tokens, each chunk rematerialised as a whole (``layers.chunked_map``; then ``remat`` is
  implied).
  """

  dim: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  attention_impl: str = "xla"
  remat: bool = False
  chunk_tokens: int = 0

  def setup(self):
    block = layers.block_remat(RPEBlock, full=self.remat and not self.chunk_tokens)
    # A list attribute names its modules block_0, block_1, ...
    self.block = [block(self.num_heads, self.mlp_ratio, self.dtype, self.attention_impl)
                  for _ in range(self.depth)]
    self.norm = layers.layer_norm(1e-5)
    self.cls_token = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, self.dim))

  def __call__(self, tokens: jax.Array, scale: int,
               subpatch_m: float) -> tuple[jax.Array, jax.Array]:
    """tokens (B*N, K, E) of one modality; returns (patch tokens (B*N, E), sub-tokens (B*N, K, E)).

    ``subpatch_m`` is the modality's sub-patch spacing rho in metres.
    """
    bn, k, e = tokens.shape
    side = pe_grid_side(scale, subpatch_m)
    if side * side != k:
      raise ValueError(f"spatial encoder: {k} sub-patch tokens per patch but a positional grid "
                       f"of {side}x{side} (patch scale {scale}, sub-patch {subpatch_m} m)")
    cls = jnp.broadcast_to(self.cls_token.astype(tokens.dtype), (bn, 1, e))
    x = jnp.concatenate([cls, tokens], 1)
    x = x + jnp.asarray(pos_embed.sincos_grid(e, side, subpatch_m, 1), x.dtype)
    buckets = pos_embed.rpe_buckets(math.isqrt(1 + k), 1)
    x = layers.chunked_map(self, lambda mdl, x: mdl.blocks(x, buckets), (x,), 1 + k,
                           self.chunk_tokens)
    return x[:, 0], x[:, 1:]

  def blocks(self, x: jax.Array, buckets: np.ndarray) -> jax.Array:
    """The blocks and the final LayerNorm on (b, 1 + K, E) token groups."""
    buckets = jnp.asarray(buckets)
    for block in self.block:
      x = block(x, buckets)
    return self.norm(x)
