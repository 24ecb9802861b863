"""The combiner: self-attention over all patch tokens of all modalities, then a cross-attention
block whose learned queries (one tile query + one per patch) read the sequence."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from anysat_jax import layers, pos_embed

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

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, length, e = x.shape
    hd = e // self.num_heads
    qkv = nn.Dense(3 * e, name="qkv")(x).reshape(b, length, 3, self.num_heads, hd)
    if self.mode == "token":
      q, k, v = qkv.transpose(2, 0, 3, 1, 4)                       # (b, h, L, hd) each
      attn = jax.nn.softmax(jnp.einsum("bhid,bhjd->bhij", q * hd ** -0.5, k), axis=-1)
      o = jnp.einsum("bhij,bhjd->bhid", attn, v).transpose(0, 2, 1, 3)
    elif self.mode == "head_axis":
      q, k, v = qkv.transpose(2, 0, 1, 3, 4)                       # (b, L, h, hd) each
      attn = jax.nn.softmax(jnp.einsum("bigd,bihd->bigh", q * hd ** -0.5, k), axis=-1)
      o = jnp.einsum("bigh,bihd->bigd", attn, v)
    else:
      raise ValueError(f"combiner attention mode {self.mode!r} not in {ATTENTION_MODES}")
    return nn.Dense(e, name="proj")(o.reshape(b, length, e))


class Block(nn.Module):
  """Pre-norm ViT block, LayerNorm eps 1e-6."""

  num_heads: int
  mlp_ratio: float = 4.0
  mode: str = "token"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + SelfAttention(self.num_heads, self.mode, name="attn")(
        layers.layer_norm(1e-6, "norm1")(x))
    hidden = int(x.shape[-1] * self.mlp_ratio)
    return x + layers.Mlp(hidden, name="mlp")(layers.layer_norm(1e-6, "norm2")(x))


class CrossAttention(nn.Module):
  """Learned queries attend over the sequence, with iRPE between query and key patches.

  Queries: ``q_learned + PE`` of the patch grid (units of 10 m, spacing s), zero PE for the
  ``num_special`` leading queries (tile query; MODIS slot). Logits are ``(q k^T) hd**-0.5 + R``
  with ``R[i, j] = <q_i of head 0 (unscaled), W[:, bucket(i, j)]>``.
  """

  num_heads: int

  @nn.compact
  def __call__(self, y: jax.Array, side: int, scale: int, num_grids: int,
               num_special: int, positions: jax.Array | None = None) -> jax.Array:
    """y (B, L, E); ``positions`` (B, K): raster indices of the K grid patches present (each
    modality's block of keys holds the same K patches), or None for the full grid."""
    b, length, e = y.shape
    hd = e // self.num_heads
    q_learned = self.param("q_learned", nn.initializers.normal(0.02), (1, 1, e))
    table = jnp.asarray(pos_embed.sincos_grid(e, side, scale, num_special), y.dtype)
    k = nn.Dense(e, name="wk")(y).reshape(b, length, self.num_heads, hd).transpose(0, 2, 1, 3)
    v = nn.Dense(e, name="wv")(y).reshape(b, length, self.num_heads, hd).transpose(0, 2, 1, 3)
    rpe_table = self.param("rpe_table", nn.initializers.zeros, (hd, pos_embed.NUM_BUCKETS))
    if positions is None:
      q = q_learned[0].astype(y.dtype) + table                          # (Lq, E)
      qh = q.reshape(-1, self.num_heads, hd).transpose(1, 0, 2)       # (h, Lq, hd)
      buckets = pos_embed.cross_rpe_buckets(side, num_grids, num_special)
      rpe = jnp.take_along_axis(qh[0] @ rpe_table.astype(q.dtype), jnp.asarray(buckets), 1)
      logits = jnp.einsum("hid,bhjd->bhij", qh, k) * hd ** -0.5 + rpe   # rpe (Lq, L)
    else:
      rows = jnp.concatenate([jnp.broadcast_to(jnp.arange(num_special), (b, num_special)),
                              num_special + positions], axis=1)         # (B, Lq) table rows
      q = q_learned[0].astype(y.dtype) + table[rows]                    # (B, Lq, E)
      qh = q.reshape(b, -1, self.num_heads, hd).transpose(0, 2, 1, 3)  # (B, h, Lq, hd)
      buckets = pos_embed.dynamic_cross_buckets(positions, side, num_grids, num_special)
      rpe = jnp.take_along_axis(qh[:, 0] @ rpe_table.astype(q.dtype), buckets, axis=2)
      logits = jnp.einsum("bhid,bhjd->bhij", qh, k) * hd ** -0.5 + rpe[:, None]
    attn = jax.nn.softmax(logits, axis=-1)
    o = jnp.einsum("bhij,bhjd->bihd", attn, v).reshape(b, -1, e)
    return nn.Dense(e, name="proj")(o)


class CrossBlock(nn.Module):
  """Cross-attention (no residual: queries and keys differ in length) + pre-norm MLP."""

  num_heads: int
  mlp_ratio: float = 4.0

  @nn.compact
  def __call__(self, x: jax.Array, side: int, scale: int, num_grids: int,
               num_special: int, positions: jax.Array | None = None) -> jax.Array:
    z = CrossAttention(self.num_heads, name="attn")(
        layers.layer_norm(1e-6, "norm1")(x), side, scale, num_grids, num_special, positions)
    hidden = int(z.shape[-1] * self.mlp_ratio)
    return z + layers.Mlp(hidden, name="mlp")(layers.layer_norm(1e-6, "norm2")(z))


class Combiner(nn.Module):
  """``depth`` self-attention blocks then the cross block. Returns (B, 1 + N, E)."""

  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  mode: str = "token"

  @nn.compact
  def __call__(self, x: jax.Array, side: int, scale: int, num_grids: int,
               has_context: bool, positions: jax.Array | None = None) -> jax.Array:
    """x: (B, 1 + [1] + num_grids * K, E) = class token, optional MODIS context token, then
    each modality's K patch tokens (the full grid, K = side**2, or the patches at
    ``positions`` (B, K)). Returns (B, 1 + K, E)."""
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_ratio, self.mode, name=f"block_{i}")(x)
    num_special = 2 if has_context else 1
    z = CrossBlock(self.num_heads, self.mlp_ratio, name="cross")(
        x, side, scale, num_grids, num_special, positions)
    if has_context:
      z = jnp.concatenate([z[:, :1], z[:, 2:]], axis=1)   # drop the MODIS query's output
    return z
