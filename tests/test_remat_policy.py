"""Blocks keep their matmul outputs and recompute the rest (``layers.block_remat``): same
values and gradients as plain autodiff, and far fewer bytes kept for the backward pass."""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import print_saved_residuals

from anysat_jax.models import layers, pos_embed
from anysat_jax.models.spatial_encoder import RPEBlock


def _residual_bytes(f, *args):
  """Bytes of the arrays (other than the arguments) that autodiff of ``f`` keeps for its
  backward pass."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(f, *args)
  total = 0
  for line in out.getvalue().splitlines():
    dtype, shape = re.match(r"(\w+)\[([\d,]*)\]", line).groups()
    if "from the argument" not in line:
      total += _ITEMSIZE[dtype] * int(np.prod([int(d) for d in shape.split(",") if d]))
  return total


_ITEMSIZE = {"f32": 4, "i32": 4, "u32": 4, "bf16": 2, "f16": 2, "bool": 1, "i8": 1, "u8": 1}


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_block_remat_same_gradients_fewer_residuals():
  x = jax.random.normal(jax.random.key(0), (6, 26, 32))
  buckets = jnp.asarray(pos_embed.rpe_buckets(5, 1))
  plain = RPEBlock(num_heads=4)
  params = plain.init(jax.random.key(1), x, buckets)
  kept = layers.block_remat(RPEBlock, full=False)(num_heads=4)
  loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply(p, x, buckets)))
  for want, got in zip(jax.tree.leaves(jax.grad(loss(plain), argnums=(0, 1))(params, x)),
                       jax.tree.leaves(jax.grad(loss(kept), argnums=(0, 1))(params, x)),
                       strict=True):
    assert _rel(got, want) < 1e-5
  np.testing.assert_array_equal(kept.apply(params, x, buckets), plain.apply(params, x, buckets))
  before, after = _residual_bytes(loss(plain), params, x), _residual_bytes(loss(kept), params, x)
  assert after < 0.7 * before, (after, before)


def test_softmax_derivative_keeps_only_its_output():
  x = jax.random.normal(jax.random.key(2), (3, 4, 7, 7))
  w = jax.random.normal(jax.random.key(3), (3, 4, 7, 7))
  ours = lambda x, w: jnp.sum(layers.softmax(x) * w)
  ref = lambda x, w: jnp.sum(jax.nn.softmax(x, axis=-1) * w)
  np.testing.assert_array_equal(layers.softmax(x), jax.nn.softmax(x, axis=-1))
  assert _rel(jax.grad(ours)(x, w), jax.grad(ref)(x, w)) < 1e-6
  assert _residual_bytes(ours, x, w) == x.size * 4               # the output only
  assert _residual_bytes(ref, x, w) > _residual_bytes(ours, x, w)
