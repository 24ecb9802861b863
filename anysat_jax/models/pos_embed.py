"""Positional tables and relative-position buckets, built with NumPy from static ints.

Everything here depends only on shapes (grid sides, spacings, token counts), so it is computed
once at trace time and enters the compiled graph as a constant.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def sincos_grid(dim: int, side: int, spacing: float, zero_rows: int = 1) -> np.ndarray:
  """2-D sin-cos table of a ``side`` x ``side`` grid, float32 (zero_rows + side**2, dim).

  Row ``zero_rows + i * side + j`` encodes column position ``x = j * spacing`` and row position
  ``y = i * spacing`` as ``[sin(x w), cos(x w), sin(y w), cos(y w)]`` with
  ``w_k = 1 / 10000**(k / (dim/4))``. The first ``zero_rows`` rows (class / context tokens) are 0.
  Units of ``spacing`` are whatever the caller's positions are (metres, or units of 10 m).
  """
  q = dim // 4
  omega = (np.float32(1.0) / np.power(np.float32(10000.0),
                                      np.arange(q, dtype=np.float32) / np.float32(q)))
  coords = np.arange(side, dtype=np.float32) * np.float32(spacing)
  x = np.tile(coords, side)                         # column index varies fastest
  y = np.repeat(coords, side)
  ox = x[:, None] * omega[None, :]
  oy = y[:, None] * omega[None, :]
  table = np.concatenate([np.sin(ox), np.cos(ox), np.sin(oy), np.cos(oy)], axis=1)
  out = np.zeros((zero_rows + side * side, dim), np.float32)
  out[zero_rows:] = table
  out.setflags(write=False)
  return out


def temporal_denominators(dim: int, period: float) -> np.ndarray:
  """Denominators ``period ** (2 * (i // 2) / d)`` of the L-TAE date encoding, float32 (d,)."""
  i = np.arange(dim, dtype=np.float32)
  return np.power(np.float32(period), 2 * (i // 2) / np.float32(dim)).astype(np.float32)


def _distance_bucket(dist, xp=np):
  # Closed form of iRPE's Euclidean piecewise index for alpha 1.9, beta 3.8, gamma 15.2,
  # shifted by the 3 never-used buckets: 0 -> 3, 1 -> 4, 2..3 -> 5, >= 4 -> 6.
  d = xp.rint(dist).astype(xp.int32)
  return 3 + xp.select([d == 0, d == 1, d <= 3], [0, 1, 2], 3)


SPECIAL_BUCKET = 7
NUM_BUCKETS = 8


@functools.cache
def rpe_buckets(side: int, num_special: int = 1) -> np.ndarray:
  """iRPE bucket ids, int32 (S + side**2, S + side**2), S = ``num_special`` leading tokens.

  Grid tokens are raster ordered; any pair involving a special token gets bucket 7.
  """
  r, c = np.divmod(np.arange(side * side), side)
  dist = np.sqrt((r[:, None] - r[None, :]) ** 2 + (c[:, None] - c[None, :]) ** 2)
  size = num_special + side * side
  out = np.full((size, size), SPECIAL_BUCKET, np.int32)
  out[num_special:, num_special:] = _distance_bucket(dist)
  out.setflags(write=False)
  return out


@functools.cache
def cross_rpe_buckets(side: int, num_grids: int, num_special: int = 1) -> np.ndarray:
  """Buckets of the cross block: queries (S + N) x keys (S + num_grids * N), N = side**2.

  The keys hold ``num_grids`` copies of the patch grid (one per modality); each copy reuses the
  query-grid buckets, so keys of different modalities at the same patch share a bucket.
  """
  base = rpe_buckets(side, num_special)
  n = side * side
  key_index = np.concatenate(
      [np.arange(num_special), num_special + np.tile(np.arange(n), num_grids)])
  out = base[:, key_index]
  out.setflags(write=False)
  return out


def dynamic_cross_buckets(positions, side: int, num_grids: int, num_special: int = 1):
  """Traced version of ``cross_rpe_buckets`` for a subset of patches.

  positions: int (B, K) raster indices on the ``side`` x ``side`` grid. Returns int32
  (B, S + K, S + num_grids * K): queries are the S specials then the K patches; keys the S
  specials then ``num_grids`` copies of the K patches.
  """
  import jax.numpy as jnp
  b, k = positions.shape
  r, c = jnp.divmod(positions, side)
  dist = jnp.sqrt(((r[:, :, None] - r[:, None, :]) ** 2 +
                   (c[:, :, None] - c[:, None, :]) ** 2).astype(jnp.float32))
  grid = _distance_bucket(dist, jnp)                                   # (B, K, K)
  out = jnp.full((b, num_special + k, num_special + k), SPECIAL_BUCKET, jnp.int32)
  out = out.at[:, num_special:, num_special:].set(grid)
  key_index = np.concatenate([np.arange(num_special),
                              num_special + np.tile(np.arange(k), num_grids)])
  return out[:, :, key_index]
