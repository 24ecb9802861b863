"""The combiner: self-attention over all patch tokens of all modalities, then a cross-attention
block whose learned queries (one tile query + one per patch) read the sequence."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from anysat_jax.models import layers, pos_embed

ATTENTION_MODES = ("token", "head_axis")


class SelfAttention(nn.Module):
  """Multi-head self-attention of the combiner (no RPE).

  ``mode="token"``: ordinary attention over tokens (the reference with ``flash_attn=False``).
  ``mode="head_axis"``: for each token separately, attention across its heads (the reference with
  ``flash_attn=True``, whose kernel reads the (B, heads, tokens, hd) tensors as
  (batch, seqlen, nheads, headdim)); tokens are never mixed.
  """

  num_heads: int
  mode: str = "token"
  dtype: Any = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, length, e = x.shape
    hd = e // self.num_heads
    qkv = layers.dense(3 * e, self.dtype, "qkv")(x).reshape(b, length, 3, self.num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]              # (b, L, h, hd) each
    if self.mode == "token":
      o = layers.attention(q, k, v, hd ** -0.5, impl=self.attention_impl)
    elif self.mode == "head_axis":
      # Swapped axes, as the reference's kernel reads them: heads are the sequence, tokens the
      # attention heads.
      q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))       # (b, h, L, hd)
      o = layers.attention(q, k, v, hd ** -0.5, impl=self.attention_impl).transpose(0, 2, 1, 3)
    else:
      raise ValueError(f"combiner attention mode {self.mode!r} not in {ATTENTION_MODES}")
    return layers.dense(e, self.dtype, "proj", f32_out=True)(o.reshape(b, length, e))


class Block(nn.Module):
  """Pre-norm ViT block, LayerNorm eps 1e-6."""

  num_heads: int
  mlp_ratio: float = 4.0
  mode: str = "token"
  dtype: Any = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = layers.layer_norm(1e-6, "norm1", self.dtype)(x)
    x = x + SelfAttention(self.num_heads, self.mode, self.dtype, self.attention_impl,
                          name="attn")(y)
    hidden = int(x.shape[-1] * self.mlp_ratio)
    y = layers.layer_norm(1e-6, "norm2", self.dtype)(x)
    return x + layers.Mlp(hidden, self.dtype, name="mlp")(y)


class CrossAttention(nn.Module):
  """Learned queries attend over the sequence, with iRPE between query and key patches.

  Queries: ``q_learned + PE`` of the patch grid (units of 10 m, spacing s), zero PE for the
  ``num_special`` leading queries (tile query; MODIS slot). Logits are ``(q k^T) hd**-0.5 + R``
  with ``R[i, j] = <q_i of head 0 (unscaled), W[:, bucket(i, j)]>``.
  """

  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, y: jax.Array, side: int, scale: int, num_grids: int,
               num_special: int, positions: jax.Array | None = None) -> jax.Array:
    """y (B, L, E); ``positions`` (B, K): raster indices of the K grid patches present (each
    modality's block of keys holds the same K patches), or None for the full grid."""
    b, length, e = y.shape
    hd = e // self.num_heads
    q_learned = self.param("q_learned", nn.initializers.normal(0.02), (1, 1, e))
    table = jnp.asarray(pos_embed.sincos_grid(e, side, scale, num_special), q_learned.dtype)
    k = layers.dense(e, self.dtype, "wk")(y).reshape(b, length, self.num_heads, hd)
    v = layers.dense(e, self.dtype, "wv")(y).reshape(b, length, self.num_heads, hd)
    rpe_table = self.param("rpe_table", nn.initializers.zeros, (hd, pos_embed.NUM_BUCKETS))
    if positions is None:
      q = q_learned[0] + table                                          # (Lq, E)
      qh = q.reshape(-1, self.num_heads, hd)                            # (Lq, h, hd)
      buckets = pos_embed.cross_rpe_buckets(side, num_grids, num_special)
      rpe = jnp.take_along_axis(qh[:, 0] @ rpe_table, jnp.asarray(buckets), 1)
      qh, rpe = jnp.broadcast_to(qh, (b, *qh.shape)), rpe[None, None]   # rpe (1, 1, Lq, L)
    else:
      rows = jnp.concatenate([jnp.broadcast_to(jnp.arange(num_special), (b, num_special)),
                              num_special + positions], axis=1)         # (B, Lq) table rows
      q = q_learned[0] + table[rows]                                    # (B, Lq, E)
      qh = q.reshape(b, -1, self.num_heads, hd)                         # (B, Lq, h, hd)
      buckets = pos_embed.dynamic_cross_buckets(positions, side, num_grids, num_special)
      rpe = jnp.take_along_axis(qh[:, :, 0] @ rpe_table, buckets, axis=2)
      rpe = rpe[:, None]                                                # (B, 1, Lq, L)
    o = layers.attention(qh.astype(k.dtype), k, v, hd ** -0.5, bias=rpe,
                         impl=self.attention_impl)
    return layers.dense(e, self.dtype, "proj", f32_out=True)(o.reshape(b, -1, e))


class CrossBlock(nn.Module):
  """Cross-attention (no residual: queries and keys differ in length) + pre-norm MLP."""

  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, side: int, scale: int, num_grids: int,
               num_special: int, positions: jax.Array | None = None) -> jax.Array:
    y = layers.layer_norm(1e-6, "norm1", self.dtype)(x)
    z = CrossAttention(self.num_heads, self.dtype, self.attention_impl, name="attn")(
        y, side, scale, num_grids, num_special, positions)
    hidden = int(z.shape[-1] * self.mlp_ratio)
    y = layers.layer_norm(1e-6, "norm2", self.dtype)(z)
    return z + layers.Mlp(hidden, self.dtype, name="mlp")(y)


class Combiner(nn.Module):
  """``depth`` self-attention blocks then the cross block. Returns (B, 1 + N, E).

  ``dtype``: matmul dtype (see ``layers``); ``remat``: recompute each block's activations in the
  backward pass instead of storing them (without it, only the cheap ones: ``layers.block_remat``).
  """

  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  mode: str = "token"
  dtype: Any = jnp.float32
  attention_impl: str = "xla"
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, side: int, scale: int, num_grids: int,
               has_context: bool, positions: jax.Array | None = None) -> jax.Array:
    """x: (B, 1 + [1] + num_grids * K, E) = class token, optional MODIS context token, then
    each modality's K patch tokens (the full grid, K = side**2, or the patches at
    ``positions`` (B, K)). Returns (B, 1 + K, E)."""
    block = layers.block_remat(Block, full=self.remat)
    # The grid geometry (side, scale, num_grids, num_special) is static.
    cross = layers.block_remat(CrossBlock, full=self.remat, static_argnums=(2, 3, 4, 5))
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_ratio, self.mode, self.dtype, self.attention_impl,
                name=f"block_{i}")(x)
    num_special = 2 if has_context else 1
    z = cross(self.num_heads, self.mlp_ratio, self.dtype, self.attention_impl, name="cross")(
        x, side, scale, num_grids, num_special, positions)
    if has_context:
      z = jnp.concatenate([z[:, :1], z[:, 2:]], axis=1)   # drop the MODIS query's output
    return z
