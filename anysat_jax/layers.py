"""Small building blocks shared by the projectors, the spatial encoder and the combiner."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def layer_norm(eps: float, name: str | None = None) -> nn.LayerNorm:
  """LayerNorm with an explicit eps and the two-pass variance of the reference."""
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)


class Mlp(nn.Module):
  """Transformer MLP: Linear(E -> hidden), exact GELU, Linear(hidden -> E)."""

  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    x = nn.Dense(self.hidden, name="fc1")(x)
    x = jax.nn.gelu(x, approximate=False)
    return nn.Dense(dim, name="fc2")(x)


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

