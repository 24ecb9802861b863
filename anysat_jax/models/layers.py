"""Small building blocks shared by the projectors, the spatial encoder, the combiner and the
predictor.

Mixed precision (``dtype`` bfloat16): parameters stay float32. A value is rounded to ``dtype``
only where it is about to be a matmul operand anyway (LayerNorm outputs, q / k / v, attention
weights, the MLP's hidden layer); the residual stream, the outputs of the layers that feed it
(``f32_out``), normalisation statistics, attention logits and softmaxes stay float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# "xla": explicit einsums (fastest on CPU); "dot_product_attention": jax.nn.dot_product_attention,
# which runs cuDNN's fused kernel on NVIDIA GPUs where it applies (see ``attention``).
ATTENTION_IMPLS = ("xla", "dot_product_attention")

# dot_general with a float32 result whatever the operands (the accumulation is float32 anyway).
_F32_DOT = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)


def dense(features: int, dtype: Any, name: str, *, f32_out: bool = False,
          **kwargs: Any) -> nn.Dense:
  """``nn.Dense`` with float32 parameters and ``dtype`` operands; the result is in ``dtype``, or
  float32 with ``f32_out`` (for a layer that feeds the residual stream or a norm)."""
  return nn.Dense(features, dtype=dtype, dot_general=_F32_DOT if f32_out else None, name=name,
                  **kwargs)


# What a block keeps for its backward pass: the outputs of its weight matmuls (q / k / v, the
# projections, the MLP), not those of the attention's batched matmuls (logits and weighted
# values, recomputed from q / k / v), nor anything elementwise.
_KEEP_WEIGHT_MATMULS = jax.checkpoint_policies.dots_with_no_batch_dims_saveable

# LayerNorm rematerialised: its backward pass keeps only the input and recomputes the centred
# values and statistics, where autodiff would keep two or three more token-sized arrays per norm.
_RematLayerNorm = nn.remat(nn.LayerNorm)


def layer_norm(eps: float, name: str | None = None, dtype: Any = jnp.float32) -> nn.Module:
  """LayerNorm with an explicit eps and the two-pass variance of the reference; statistics in
  float32, output in ``dtype``; rematerialised (same parameters and values as ``nn.LayerNorm``)."""
  return _RematLayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


def block_remat(block: type[nn.Module], full: bool,
                static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
  """A transformer block class whose backward pass recomputes instead of storing.

  ``full``: everything but the block's inputs is recomputed (least memory; the block's matmuls
  run twice). Otherwise the block keeps the outputs of its weight matmuls and recomputes the
  rest (LayerNorms, q / k / v head layouts, attention logits and softmax, GELU, residual
  sums): only the attention's two batched matmuls run twice. Same parameters and values as
  ``block``.
  """
  policy = None if full else _KEEP_WEIGHT_MATMULS
  return nn.remat(block, policy=policy, static_argnums=static_argnums)


@jax.checkpoint
def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU. Rematerialised: the backward pass keeps only ``x`` and recomputes the
  rest, where autodiff of the erf would keep several hidden-sized intermediates per block."""
  return jax.nn.gelu(x, approximate=False)


@jax.custom_jvp
def softmax(x: jax.Array) -> jax.Array:
  """``jax.nn.softmax`` over the last axis (same values) whose derivative needs only its output,
  so the backward pass keeps one array where autodiff of exp / sum / divide keeps two."""
  return jax.nn.softmax(x, axis=-1)


@softmax.defjvp
def _softmax_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]):
  (x,), (dx,) = primals, tangents
  y = softmax(x)
  return y, y * (dx - jnp.sum(y * dx, axis=-1, keepdims=True))


class Mlp(nn.Module):
  """Transformer MLP: Linear(E -> hidden), exact GELU, Linear(hidden -> E) (float32 out)."""

  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    x = dense(self.hidden, self.dtype, "fc1")(x)
    x = gelu(x)
    return dense(dim, self.dtype, "fc2", f32_out=True)(x)


class GroupNorm(nn.Module):
  """GroupNorm over the last (channel) axis, statistics per leading index.

  ``reduce_axis`` adds one more axis to the statistics (e.g. the date axis of a pixel's series);
  ``where`` (broadcastable to ``x`` without the channel axis) excludes entries from them.
  """

  num_groups: int
  eps: float = 1e-5
  reduce_axis: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array, where: jax.Array | None = None) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    g = x.reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
    axes = (-1,)
    if self.reduce_axis is not None:
      axes = (self.reduce_axis % x.ndim, -1)
    w = None
    if where is not None:
      w = jnp.broadcast_to(where[..., None, None], g.shape).astype(x.dtype)
    mean = _masked_mean(g, axes, w)
    var = _masked_mean(jnp.square(g - mean), axes, w)
    y = (g - mean) * jax.lax.rsqrt(var + self.eps)
    return y.reshape(x.shape) * scale + bias


def _masked_mean(x: jax.Array, axes: tuple[int, ...], w: jax.Array | None) -> jax.Array:
  if w is None:
    return jnp.mean(x, axis=axes, keepdims=True)
  total = jnp.sum(x * w, axis=axes, keepdims=True)
  return total / jnp.maximum(jnp.sum(w, axis=axes, keepdims=True), 1.0)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
              bias: jax.Array | None = None, mask: jax.Array | None = None,
              impl: str = "xla") -> jax.Array:
  """Multi-head attention ``softmax(scale q k^T + bias) v``; logits and softmax in float32,
  the two matmuls in the operands' dtype.

  Args:
    q: (B, T, N, H) queries; k, v: (B, S, N, H) keys and values (N heads of width H), one dtype.
    scale: logit scale.
    bias: additive logit bias broadcastable to (B, N, T, S), or None.
    mask: bool, broadcastable to (B, N, T, S); False entries get no weight. None: all attend.
    impl: one of ``ATTENTION_IMPLS``.
  Returns:
    (B, T, N, H) in the dtype of ``v``.
  """
  if impl == "dot_product_attention":
    implementation = _cudnn_or_none(q, k, bias, mask)
    if implementation == "cudnn" and bias is not None:
      bias = bias.astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                        implementation=implementation)
  if impl != "xla":
    raise ValueError(f"attention impl {impl!r} not in {ATTENTION_IMPLS}")
  # Head-major: XLA's batched matmuls are fastest with the batch axes leading.
  q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
  # The queries are scaled rather than the logits (as flax's attention does): on CPU, XLA hands
  # YNNPACK a logit-shaped array of the scale otherwise. Exact for power-of-two scales.
  q = q * jnp.asarray(scale, q.dtype)
  logits = jnp.einsum("bhid,bhjd->bhij", q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  attn = softmax(logits).astype(v.dtype)
  return jnp.einsum("bhij,bhjd->bihd", attn, v)


def _cudnn_or_none(q: jax.Array, k: jax.Array, bias: jax.Array | None,
                   mask: jax.Array | None) -> str | None:
  """``"cudnn"`` where cuDNN's fused attention takes the call (NVIDIA GPU, bf16/fp16, head
  width a multiple of 8 up to 128, even lengths when there is a bias or mask, as its backward
  pass needs), else None: JAX's XLA implementation (jax 0.10 never picks cuDNN by itself)."""
  width, t, s = q.shape[-1], q.shape[1], k.shape[1]
  ok = (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
        and width % 8 == 0 and width <= 128
        and (bias is None and mask is None or t % 2 == 0 and s % 2 == 0))
  return "cudnn" if ok else None


def chunked_map(module: nn.Module, fn: Callable[..., jax.Array], xs: tuple[jax.Array, ...],
                rows_per_item: int, chunk_rows: int) -> jax.Array:
  """``fn(module, *xs)`` over the leading axis of ``xs`` in chunks, each chunk rematerialised.

  ``fn`` must treat the leading-axis items independently (per pixel, per patch). With
  ``chunk_rows`` > 0 the items are cut into equal chunks of at most ``chunk_rows //
  rows_per_item`` items (the last chunk padded with zeros, its padding dropped) and looped over
  with ``nn.scan``; each chunk's activations are recomputed in the backward pass, so memory
  holds one chunk's activations instead of all of them. The module's parameters are shared
  by the chunks (its parameter tree does not change); dropout draws differ per chunk.
  ``chunk_rows`` = 0 (or one chunk): one call that keeps its weight matmuls' outputs for the
  backward pass and recomputes the rest (as ``block_remat``).
  """
  n = xs[0].shape[0]
  per_chunk = max(1, chunk_rows // max(1, rows_per_item))
  if chunk_rows <= 0 or per_chunk >= n:
    return nn.remat(fn, policy=_KEEP_WEIGHT_MATMULS)(module, *xs)
  num = math.ceil(n / per_chunk)
  size = math.ceil(n / num)
  pad = num * size - n

  def split(x):
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) if pad else x
    return x.reshape(num, size, *x.shape[1:])

  def body(mdl, carry, chunk):
    return carry, fn(mdl, *chunk)

  scan = nn.scan(nn.remat(body), variable_broadcast="params",
                 split_rngs={"params": False, "dropout": True})
  _, out = scan(module, None, tuple(split(x) for x in xs))
  return out.reshape(num * size, *out.shape[2:])[:n]
