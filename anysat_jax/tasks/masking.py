"""Pretraining masks: multi-block patch masks (host, NumPy), modality and temporal masks (in jit).

Every output has a static shape per (grid side, config): a g x g patch grid always yields K_ctx
context cells and K_tgt (padded) cells per target block, see ``mask_sizes``. Patch indices are
raster indices ``row * g + col`` of the patch grid.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from anysat_jax.core import modalities as mods


@dataclasses.dataclass(frozen=True)
class MaskConfig:
  """Mask parameters (defaults: the official GeoPlex ones, plus the port's static K_ctx).

  Attributes:
    num_targets: target blocks per sample.
    target_scale: range of a target block's area, fraction of the grid area.
    target_aspect: range of a target block's aspect ratio h / w.
    context_scale: range of the (square) context block's area, fraction of the grid area.
    context_fraction: K_ctx = max(1, round(g**2 * context_fraction)) context cells per sample.
    modality_ratio: fraction of the non-guaranteed context tokens replaced by the mask token.
    temporal_keep: fraction of the dates kept in every student time series.
    max_tries: consecutive failed context draws before one more target stops constraining it.
  """

  num_targets: int = 4
  target_scale: tuple[float, float] = (0.2, 0.8)
  target_aspect: tuple[float, float] = (0.75, 1.5)
  context_scale: tuple[float, float] = (0.85, 1.0)
  context_fraction: float = 0.15
  modality_ratio: float = 0.5
  temporal_keep: float = 0.5
  max_tries: int = 20


def block_shape(u: np.ndarray | float, side: int, scale: tuple[float, float],
                aspect: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
  """Block (h, w) in cells, int64 arrays shaped like ``u``, for uniforms u in [0, 1).

  The official I-JEPA rule: one uniform drives both scale s and aspect a, n = floor(g^2 s),
  h = round(sqrt(n a)), w = round(sqrt(n / a)) (half to even), capped at g - 1. Port additions
  for tiny grids: the cap is max(g - 1, 1) and h, w >= 1 (the official loops forever on an empty
  block, reachable at g = 2).
  """
  u = np.asarray(u, np.float64)
  s = scale[0] + u * (scale[1] - scale[0])
  a = aspect[0] + u * (aspect[1] - aspect[0])
  n = np.floor(side * side * s)
  cap = max(side - 1, 1)
  h = np.clip(np.rint(np.sqrt(n * a)), 1, cap).astype(np.int64)
  w = np.clip(np.rint(np.sqrt(n / a)), 1, cap).astype(np.int64)
  return h, w


def _max_block_cells(side: int, scale: tuple[float, float], aspect: tuple[float, float]) -> int:
  """Largest h * w of ``block_shape`` over u in [0, 1).

  h * w is piecewise constant in u; it changes only where n, round(sqrt(n a)) or
  round(sqrt(n / a)) jumps. Evaluating at every such breakpoint, its neighbouring doubles and
  every midpoint between consecutive breakpoints covers all pieces exactly.
  """
  area = side * side
  pts = [np.zeros(1)]
  if scale[1] > scale[0]:
    pts.append((np.arange(area + 1) / area - scale[0]) / (scale[1] - scale[0]))
  if aspect[1] > aspect[0]:
    n = np.arange(1, area + 1, dtype=np.float64)[:, None]
    half_sq = (np.arange(side + 2) + 0.5)[None, :] ** 2
    for a in (half_sq / n, n / half_sq):
      pts.append(((a - aspect[0]) / (aspect[1] - aspect[0])).ravel())
  u = np.unique(np.concatenate(pts))
  u = u[(u >= 0) & (u < 1)]
  mid = (u[:-1] + u[1:]) / 2
  u = np.concatenate([u, mid, np.nextafter(u, -1.0), np.nextafter(u, 2.0), [np.nextafter(1.0, 0)]])
  u = u[(u >= 0) & (u < 1)]
  h, w = block_shape(u, side, scale, aspect)
  return int((h * w).max())


@functools.cache
def mask_sizes(side: int, cfg: MaskConfig) -> tuple[int, int]:
  """Static (K_ctx, K_tgt) of a ``side`` x ``side`` patch grid.

  K_ctx = max(1, round(g^2 * context_fraction)) (Python rounding); K_tgt = the largest cell count
  a target block can reach under the scale / aspect ranges and the capping of ``block_shape``.
  Examples with the defaults: g = 1: (1, 1); 2: (1, 1); 3: (1, 4); 4: (2, 9); 6: (5, 20).
  """
  if side < 1:
    raise ValueError(f"grid side must be >= 1, got {side}")
  k_ctx = max(1, round(side * side * cfg.context_fraction))
  return min(k_ctx, side * side), _max_block_cells(side, cfg.target_scale, cfg.target_aspect)


def _random_block(rng: np.random.Generator, side: int, h: int, w: int) -> np.ndarray:
  """Bool (g*g,) raster mask of an h x w block at a uniform position."""
  top = rng.integers(0, side - h + 1)
  left = rng.integers(0, side - w + 1)
  cells = np.zeros((side, side), bool)
  cells[top:top + h, left:left + w] = True
  return cells.ravel()


def _context_cells(rng: np.random.Generator, side: int, targets: list[np.ndarray], k_ctx: int,
                   cfg: MaskConfig) -> np.ndarray:
  """Exactly ``k_ctx`` sorted raster indices of one sample's context (see sample_block_masks)."""
  covered = [np.zeros(side * side, bool)]            # covered[j]: union of the first j targets
  for t in targets:
    covered.append(covered[-1] | t)
  h, w = block_shape(rng.random(), side, cfg.context_scale, (1.0, 1.0))
  ignored, fails = 0, 0
  while True:
    cand = _random_block(rng, side, int(h), int(w)) & ~covered[len(targets) - ignored]
    if cand.any():
      break
    fails += 1
    if fails == cfg.max_tries:                         # relax: drop the last constraining target
      ignored, fails = ignored + 1, 0
  cand_idx = np.flatnonzero(cand)
  if cand_idx.size >= k_ctx:
    return np.sort(rng.choice(cand_idx, k_ctx, replace=False))
  need = k_ctx - cand_idx.size
  outside = rng.permutation(np.flatnonzero(~covered[-1] & ~cand))[:need]
  rest = rng.permutation(np.flatnonzero(covered[-1] & ~cand))[:need - outside.size]
  return np.sort(np.concatenate([cand_idx, outside, rest]))


def sample_block_masks(rng: np.random.Generator, batch_size: int, side: int,
                       cfg: MaskConfig) -> dict[str, np.ndarray]:
  """Multi-block masks of one batch on a ``side`` x ``side`` patch grid (host-side NumPy).

  Per sample (all randomness from ``rng``, so the result is deterministic given its state):
  * ``num_targets`` target blocks, each with its own uniform u -> (h, w) by ``block_shape`` and a
    uniform position; cells in ascending raster order, padded to K_tgt with index 0 and
    ``tgt_valid`` False.
  * a square context block (``context_scale``) at random positions, minus the union of the
    targets; a draw with no cell left is retried, and after ``max_tries`` consecutive failures
    the last still-constraining target is ignored (official relaxation).
  * exactly K_ctx context cells: a uniform random subset of those candidates; if there are fewer
    than K_ctx, all candidates plus random cells outside every target, then (only if that is
    still short) random cells of the targets. Returned sorted.

  Returns:
    ``ctx_idx`` int32 (B, K_ctx), ``tgt_idx`` int32 (T, B, K_tgt), ``tgt_valid`` bool
    (T, B, K_tgt), with (K_ctx, K_tgt) = ``mask_sizes(side, cfg)`` and T = ``num_targets``.
  """
  k_ctx, k_tgt = mask_sizes(side, cfg)
  t = cfg.num_targets
  ctx_idx = np.zeros((batch_size, k_ctx), np.int32)
  tgt_idx = np.zeros((t, batch_size, k_tgt), np.int32)
  tgt_valid = np.zeros((t, batch_size, k_tgt), bool)
  for b in range(batch_size):
    hs, ws = block_shape(rng.random(t), side, cfg.target_scale, cfg.target_aspect)
    targets = [_random_block(rng, side, int(h), int(w)) for h, w in zip(hs, ws, strict=True)]
    for k, cells in enumerate(targets):
      idx = np.flatnonzero(cells)
      tgt_idx[k, b, :idx.size] = idx
      tgt_valid[k, b, :idx.size] = True
    ctx_idx[b] = _context_cells(rng, side, targets, k_ctx, cfg)
  return {"ctx_idx": ctx_idx, "tgt_idx": tgt_idx, "tgt_valid": tgt_valid}


def modality_mask(key: jax.Array, num_modalities: int, k_ctx: int, batch: int,
                  ratio: float = 0.5) -> jax.Array:
  """Visible-token mask, bool (B, M, K_ctx), of the modality-major context tokens.

  Per sample: every context slot gets one uniformly drawn modality that stays visible; of the
  other K_ctx (M - 1) tokens the n_keep = floor(K_ctx (M - 1) (1 - ratio)) with the lowest uniform
  noise stay visible too. Exactly K_ctx + n_keep tokens per sample are visible.
  """
  m = num_modalities
  k_pick, k_noise = jax.random.split(key)
  pick = jax.random.randint(k_pick, (batch, k_ctx), 0, m)
  guaranteed = jnp.arange(m)[None, :, None] == pick[:, None, :]
  noise = jax.random.uniform(k_noise, (batch, m, k_ctx))
  noise = jnp.where(guaranteed, 1.0, noise).reshape(batch, m * k_ctx)  # uniforms are < 1
  rank = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1).reshape(batch, m, k_ctx)
  n_keep = int(k_ctx * (m - 1) * (1 - ratio))
  return guaranteed | (rank < n_keep)


def kept_dates(length: int, keep: float = 0.5) -> int:
  """T_keep = max(1, floor(T * keep)): dates left in a series of T after temporal masking."""
  return max(1, math.floor(length * keep))


def temporal_mask(key: jax.Array, batch: int, length: int, date_mask: jax.Array | None = None,
                  keep: float = 0.5) -> tuple[jax.Array, jax.Array]:
  """Dates to keep in each sample's series of ``length`` dates.

  Uniformly random among the real dates (``date_mask`` != 0; all dates if None); padded dates
  are taken only when a sample has fewer than T_keep = ``kept_dates(length, keep)`` real ones.

  Returns:
    idx int32 (B, T_keep), ascending (time order); valid bool (B, T_keep), True for real dates.
  """
  noise = jax.random.uniform(key, (batch, length))
  if date_mask is not None:
    noise = noise + (date_mask == 0)                  # padding sorts after every real date
  t_keep = kept_dates(length, keep)
  idx = jnp.sort(jnp.argsort(noise, axis=-1)[:, :t_keep], axis=-1).astype(jnp.int32)
  if date_mask is None:
    return idx, jnp.ones((batch, t_keep), bool)
  return idx, jnp.take_along_axis(date_mask != 0, idx, axis=1)


def sample_temporal_masks(key: jax.Array, inputs: Mapping[str, jax.Array], keep: float = 0.5
                          ) -> dict[str, tuple[jax.Array, jax.Array]]:
  """``temporal_mask`` of every modality of ``inputs`` that has ``<mod>_dates`` (MODIS included):
  {name: (idx (B, T_keep), valid (B, T_keep))}. Keys are split over the sorted names, so the
  draw does not depend on the dict order (``jit`` sorts dict keys)."""
  names = sorted(n for n in mods.modality_keys(inputs) if n + mods.DATES_SUFFIX in inputs)
  out = {}
  for name, k in zip(names, jax.random.split(key, len(names)), strict=True):
    b, t = inputs[name + mods.DATES_SUFFIX].shape
    out[name] = temporal_mask(k, b, t, inputs.get(name + mods.MASK_SUFFIX), keep)
  return out


def apply_temporal_mask(inputs: Mapping[str, jax.Array],
                        masks: Mapping[str, tuple[jax.Array, jax.Array]]) -> dict[str, jax.Array]:
  """A new input dict whose series in ``masks`` keep only the dates ``idx``.

  ``<mod>`` (B, T, C, H, W), ``<mod>_dates`` (B, T) and ``<mod>_valid`` (broadcast to the series
  first) are gathered along T; ``<mod>_mask``, if the input has one, becomes ``valid`` in its
  dtype. Without a date mask every date is real, so none is added. Other keys pass through.
  """
  take = jax.vmap(lambda a, i: a[i])
  out = dict(inputs)
  for name, (idx, valid) in masks.items():
    x = inputs[name]
    out[name] = take(x, idx)
    out[name + mods.DATES_SUFFIX] = take(inputs[name + mods.DATES_SUFFIX], idx)
    if name + mods.VALID_SUFFIX in inputs:
      out[name + mods.VALID_SUFFIX] = take(
          jnp.broadcast_to(inputs[name + mods.VALID_SUFFIX], x.shape), idx)
    if name + mods.MASK_SUFFIX in inputs:
      out[name + mods.MASK_SUFFIX] = valid.astype(inputs[name + mods.MASK_SUFFIX].dtype)
  return out
