"""The JEPA predictor: context tokens + positioned mask tokens -> predicted target tokens.

Pre-norm ViT of width P (LayerNorm eps 1e-5, exact GELU). Linear weights are drawn from
N(0, 0.02) with zero bias (PyTorch's ``trunc_normal_(std=0.02)`` truncates at +-2 absolute,
i.e. +-100 std, so it is a plain normal); in block i (1-based) the attention output projection
and the second MLP layer are divided by sqrt(2 i).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from anysat_jax.models import layers, pos_embed

INIT_STD = 0.02
_normal = nn.initializers.normal


class Attention(nn.Module):
  """Multi-head self-attention; keys where ``key_mask`` is False get no weight."""

  num_heads: int
  proj_std: float = INIT_STD
  dtype: Any = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    """x: (B, L, P); key_mask: bool (B, L) or None. Returns (B, L, P)."""
    b, length, p = x.shape
    hd = p // self.num_heads
    qkv = layers.dense(3 * p, self.dtype, "qkv", kernel_init=_normal(INIT_STD))(x)
    qkv = qkv.reshape(b, length, 3, self.num_heads, hd)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    o = layers.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], hd ** -0.5, mask=mask,
                         impl=self.attention_impl)
    return layers.dense(p, self.dtype, "proj", f32_out=True,
                        kernel_init=_normal(self.proj_std))(o.reshape(b, length, p))


class Mlp(nn.Module):
  """``layers.Mlp`` with the predictor's initialisation (fc2 std ``out_std``)."""

  hidden: int
  out_std: float = INIT_STD
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.dense(self.hidden, self.dtype, "fc1", kernel_init=_normal(INIT_STD))(x)
    h = layers.gelu(h)
    return layers.dense(x.shape[-1], self.dtype, "fc2", f32_out=True,
                        kernel_init=_normal(self.out_std))(h)


class Block(nn.Module):
  """Pre-norm block ``x += Attn(LN(x)); x += MLP(LN(x))``, LayerNorm eps 1e-5; ``index`` is the
  1-based block number of the sqrt(2 i) init rescale."""

  num_heads: int
  index: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    std = INIT_STD / math.sqrt(2 * self.index)
    y = layers.layer_norm(1e-5, "norm1", self.dtype)(x)
    x = x + Attention(self.num_heads, std, self.dtype, self.attention_impl, name="attn")(
        y, key_mask)
    hidden = int(x.shape[-1] * self.mlp_ratio)
    y = layers.layer_norm(1e-5, "norm2", self.dtype)(x)
    return x + Mlp(hidden, std, self.dtype, name="mlp")(y)


class Predictor(nn.Module):
  """Predicts the teacher's tokens of every target block from the student's context tokens.

  Attributes:
    dim: predictor width P (base 768, divisible by 4 and by ``num_heads``).
    depth: number of blocks (base 4).
    num_heads: attention heads (base 16).
    mlp_ratio: MLP hidden width / P.
    dtype: matmul dtype of the blocks (see ``layers``); the embedding, the output projection,
      the residual stream and the output are float32.
    attention_impl: see ``layers.attention``.
    remat: recompute each block's activations in the backward pass (without it, only the
      cheap ones: ``layers.block_remat``).
  """

  dim: int = 256
  depth: int = 2
  num_heads: int = 4
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  attention_impl: str = "xla"
  remat: bool = False

  @nn.compact
  def __call__(self, z_ctx: jax.Array, ctx_idx: jax.Array, tgt_idx: jax.Array, side: int,
               scale: int, tgt_valid: jax.Array | None = None) -> jax.Array:
    """Runs one sequence ``[pred_cls, context, target queries]`` per (target block, sample).

    Args:
      z_ctx: (B, K_ctx, E) student context tokens (combiner output without its class token).
      ctx_idx: int (B, K_ctx) raster patch indices of the context tokens.
      tgt_idx: int (T, B, K_tgt) raster patch indices of each target block.
      side: patch grid side g (static).
      scale: patch size in units of 10 m (static): spacing of the sin-cos grid, as the combiner.
      tgt_valid: optional bool (T, B, K_tgt); padded target queries (False) are not attended to,
        so the outputs at valid positions do not depend on the padding.
    Returns:
      (T, B, K_tgt, E) predicted target tokens.
    """
    b, k_ctx, e = z_ctx.shape
    t, _, k_tgt = tgt_idx.shape
    p = self.dim
    pe = jnp.asarray(pos_embed.sincos_grid(p, side, scale, 0), z_ctx.dtype)   # (g*g, P)
    x = nn.Dense(p, kernel_init=_normal(INIT_STD), name="embed")(z_ctx) + pe[ctx_idx]
    mask_token = self.param("mask_token", _normal(INIT_STD), (p,))
    pred_cls = self.param("pred_cls", nn.initializers.zeros, (p,))
    queries = mask_token.astype(x.dtype) + pe[tgt_idx]                       # (T, B, K_tgt, P)
    seq = jnp.concatenate([
        jnp.broadcast_to(pred_cls.astype(x.dtype), (t, b, 1, p)),
        jnp.broadcast_to(x, (t, b, k_ctx, p)),
        queries], axis=2).reshape(t * b, 1 + k_ctx + k_tgt, p)
    key_mask = None
    if tgt_valid is not None:
      key_mask = jnp.concatenate([jnp.ones((t, b, 1 + k_ctx), bool), tgt_valid.astype(bool)],
                                 axis=2).reshape(t * b, -1)
    block = layers.block_remat(Block, full=self.remat)
    for i in range(self.depth):
      seq = block(self.num_heads, i + 1, self.mlp_ratio, self.dtype, self.attention_impl,
                  name=f"block_{i}")(seq, key_mask)
    seq = layers.layer_norm(1e-5, "norm")(seq)
    out = nn.Dense(e, kernel_init=_normal(INIT_STD), name="proj_out")(seq[:, -k_tgt:])
    return out.reshape(t, b, k_tgt, e)
