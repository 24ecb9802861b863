"""Pretraining masks: multi-block patch masks (host, NumPy, one random stream per batch row),
modality and temporal masks (in jit; the temporal selection also runs in NumPy).

Every output has a static shape per (grid side, config): a g x g patch grid always yields K_ctx
context cells and K_tgt (padded) cells per target block, see ``mask_sizes``; a series of T dates
keeps ``kept_dates(T)`` slots with a validity mask. Patch indices are raster indices
``row * g + col`` of the patch grid. docs/recipe.md compares them with the official masks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from anysat_jax.core import modalities as mods
from anysat_jax.core import streams


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
    temporal_keep: fraction of each sample's real dates kept in the student's time series
      (in expectation, at least one; ``select_dates``).
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


def _sample_masks(rng: np.random.Generator, side: int, cfg: MaskConfig, k_ctx: int, k_tgt: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One sample's (ctx (K_ctx,), tgt (T, K_tgt), tgt_valid (T, K_tgt)); see ``block_masks``."""
  t = cfg.num_targets
  tgt = np.zeros((t, k_tgt), np.int32)
  valid = np.zeros((t, k_tgt), bool)
  hs, ws = block_shape(rng.random(t), side, cfg.target_scale, cfg.target_aspect)
  targets = [_random_block(rng, side, int(h), int(w)) for h, w in zip(hs, ws, strict=True)]
  ctx = _context_cells(rng, side, targets, k_ctx, cfg)
  for k, cells in enumerate(targets):
    idx = np.flatnonzero(cells)
    tgt[k, :idx.size] = idx
    valid[k, :idx.size] = ~np.isin(idx, ctx)        # A context cell is not predicted.
  return ctx, tgt, valid


def block_masks(seed: int, step: int, rows: Sequence[int], side: int, cfg: MaskConfig
                ) -> dict[str, np.ndarray]:
  """Multi-block masks of the batch rows ``rows`` (global row indices) of step ``step`` on a
  ``side`` x ``side`` patch grid (host-side NumPy).

  Row ``r`` draws from its own stream ``streams.rng(seed, streams.BLOCK_MASKS, step, r)``, so a
  row's masks depend only on (seed, step, r): not on the dataset draw of the step, nor on which
  process holds the row (a process draws its own rows; 1 or N processes give the same masks).

  Per sample:
  * ``num_targets`` target blocks, each with its own uniform u -> (h, w) by ``block_shape`` and a
    uniform position; cells in ascending raster order, padded to K_tgt with index 0 and
    ``tgt_valid`` False.
  * a square context block (``context_scale``) at random positions, minus the union of the
    targets; a draw with no cell left is retried, and after ``max_tries`` consecutive failures
    the last still-constraining target is ignored (official relaxation).
  * exactly K_ctx context cells: a uniform random subset of those candidates; if there are fewer
    than K_ctx, all candidates plus random cells outside every target, then (only if that is
    still short) random cells of the targets, which are then removed from the targets
    (``tgt_valid`` False): no context cell is ever a target cell. Returned sorted.

  Returns:
    ``ctx_idx`` int32 (B, K_ctx), ``tgt_idx`` int32 (T, B, K_tgt), ``tgt_valid`` bool
    (T, B, K_tgt), with B = len(rows), (K_ctx, K_tgt) = ``mask_sizes(side, cfg)`` and
    T = ``num_targets``.
  """
  if len(rows) == 0:
    raise ValueError("block_masks needs at least one row")
  k_ctx, k_tgt = mask_sizes(side, cfg)
  ctx, tgt, valid = zip(*(_sample_masks(streams.rng(seed, streams.BLOCK_MASKS, step, r), side,
                                        cfg, k_ctx, k_tgt) for r in rows), strict=True)
  return {"ctx_idx": np.stack(ctx).astype(np.int32), "tgt_idx": np.stack(tgt, axis=1),
          "tgt_valid": np.stack(valid, axis=1)}


def leak(masks: Mapping[str, np.ndarray]) -> float:
  """Fraction of the context cells of ``block_masks`` output that are valid target cells of
  their own sample (0 by construction)."""
  ctx, tgt, valid = masks["ctx_idx"], masks["tgt_idx"], masks["tgt_valid"]
  inside = [np.isin(ctx[b], tgt[:, b][valid[:, b]]) for b in range(ctx.shape[0])]
  return float(np.mean(inside))


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
  """T_keep = max(1, ceil(T * keep)): date slots of a series of T after temporal masking."""
  return max(1, math.ceil(length * keep))


def select_dates(noise: Any, date_mask: Any | None, keep: float = 0.5, xp: Any = np
                 ) -> tuple[Any, Any]:
  """The dates each sample keeps, from uniforms; NumPy or, in jit, ``xp=jax.numpy``.

  Each sample keeps n_keep = clip(floor(n_real * keep + u), 1, T_keep) of its n_real real dates,
  uniformly chosen: ``keep`` of its real dates in expectation (stochastic rounding), however
  few it has and whatever the bucket length T. Padded dates are never kept.

  Args:
    noise: (B, T + 1) uniforms in [0, 1): columns :T order the dates, column T is u.
    date_mask: (B, T), nonzero = real date, or None (every date is real).
    keep: fraction of the real dates kept.
  Returns:
    idx int32 (B, T_keep): the kept dates in ascending order, then the unused slots (their
    indices, ascending); valid bool (B, T_keep): True on the kept dates.
  """
  b, t = noise.shape[0], noise.shape[1] - 1
  t_keep = kept_dates(t, keep)
  real = xp.ones((b, t), bool) if date_mask is None else date_mask != 0
  n_keep = xp.clip(xp.floor(real.sum(-1) * keep + noise[:, t]), 1, t_keep)
  order = xp.argsort(noise[:, :t] + ~real, axis=-1)[:, :t_keep]      # Real dates first.
  chosen = (xp.arange(t_keep)[None, :] < n_keep[:, None]) & xp.take_along_axis(real, order, 1)
  key = xp.sort(order + t * ~chosen, axis=-1)                        # Kept first, in time order.
  return (key % t).astype(xp.int32), key < t


def sample_temporal_masks(key: jax.Array, inputs: Mapping[str, jax.Array], keep: float = 0.5
                          ) -> dict[str, tuple[jax.Array, jax.Array]]:
  """``select_dates`` of every modality of ``inputs`` that has ``<mod>_dates`` (MODIS included):
  {name: (idx (B, T_keep), valid (B, T_keep))}. Keys are split over the sorted names, so the
  draw does not depend on the dict order (``jit`` sorts dict keys)."""
  names = sorted(n for n in mods.modality_keys(inputs) if n + mods.DATES_SUFFIX in inputs)
  out = {}
  for name, k in zip(names, jax.random.split(key, len(names)), strict=True):
    b, t = inputs[name + mods.DATES_SUFFIX].shape
    noise = jax.random.uniform(k, (b, t + 1))
    out[name] = select_dates(noise, inputs.get(name + mods.MASK_SUFFIX), keep, xp=jnp)
  return out


def apply_temporal_mask(inputs: Mapping[str, jax.Array],
                        masks: Mapping[str, tuple[jax.Array, jax.Array]]) -> dict[str, jax.Array]:
  """A new input dict whose series in ``masks`` keep only the dates ``idx``.

  ``<mod>`` (B, T, C, H, W), ``<mod>_dates`` (B, T) and ``<mod>_valid`` (broadcast to the series
  first) are gathered along T; ``<mod>_mask`` becomes ``valid`` (in the input mask's dtype,
  float32 if it had none: a sample may use fewer slots than T_keep). Other keys pass through.
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
    dtype = inputs[name + mods.MASK_SUFFIX].dtype if name + mods.MASK_SUFFIX in inputs else (
        jnp.float32)
    out[name + mods.MASK_SUFFIX] = valid.astype(dtype)
  return out
