"""Pretraining masks: static sizes, multi-block geometry, context fill rule, modality and
temporal masks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anysat_jax.tasks import masking
from anysat_jax.tasks.masking import MaskConfig

CFG = MaskConfig()


def _official_block_shape(u, side, scale, aspect):
  """The reference ``_sample_block_size`` with plain Python floats and ``round``."""
  s = scale[0] + u * (scale[1] - scale[0])
  a = aspect[0] + u * (aspect[1] - aspect[0])
  n = int(side * side * s)
  h, w = round(math.sqrt(n * a)), round(math.sqrt(n / a))
  while h >= side:
    h -= 1
  while w >= side:
    w -= 1
  return h, w


def test_block_shape_matches_reference_rule():
  rng = np.random.default_rng(0)
  for side in (3, 4, 6, 8, 10, 16, 32):
    for u in rng.random(200):
      h, w = masking.block_shape(u, side, CFG.target_scale, CFG.target_aspect)
      assert (int(h), int(w)) == _official_block_shape(u, side, CFG.target_scale,
                                                       CFG.target_aspect)
  # The spec's ranges: 6x6 targets 2x3 ... 5x4, 5x5 context; 32x32 targets up to 31x23.
  assert _shape(0.0, 6) == (2, 3) and _shape(np.nextafter(1.0, 0), 6) == (5, 4)
  assert _shape(np.nextafter(1.0, 0), 32) == (31, 23)
  assert tuple(map(int, masking.block_shape(0.5, 6, CFG.context_scale, (1.0, 1.0)))) == (5, 5)
  # Tiny grids: never empty, never more than the grid allows.
  assert _shape(0.0, 2) == (1, 1) and _shape(0.0, 1) == (1, 1)


def _shape(u, side):
  return tuple(map(int, masking.block_shape(u, side, CFG.target_scale, CFG.target_aspect)))


def test_mask_sizes_table_and_maximality():
  want = {1: (1, 1), 2: (1, 1), 3: (1, 4), 4: (2, 9), 5: (4, 16), 6: (5, 20), 8: (10, 42),
          10: (15, 63), 16: (38, 180), 32: (154, 713)}
  for side, sizes in want.items():
    assert masking.mask_sizes(side, CFG) == sizes, side
  # K_tgt is reached and never exceeded on a dense grid of uniforms.
  u = np.arange(400_000) / 400_000
  for side in (3, 5, 6, 8, 12, 16):
    h, w = masking.block_shape(u, side, CFG.target_scale, CFG.target_aspect)
    assert (h * w).max() == masking.mask_sizes(side, CFG)[1], side
  # Independent scale / aspect would allow more: the bound really depends on the coupling.
  assert masking.mask_sizes(10, MaskConfig(context_fraction=0.3)) == (30, 63)


def _rectangle(idx, side):
  r, c = np.divmod(idx, side)
  h, w = r.max() - r.min() + 1, c.max() - c.min() + 1
  return (int(h), int(w)) if h * w == idx.size else None


def _block_length(cells: np.ndarray) -> int:
  """Length of the ascending prefix of a padded ``tgt_idx`` row (the block's cells)."""
  return 1 + int(np.argmin(np.append(np.diff(cells) > 0, False)))


@pytest.mark.parametrize("side,batch", [(1, 3), (2, 4), (3, 16), (6, 32), (10, 8), (32, 1)])
def test_block_masks_structure(side, batch):
  out = masking.block_masks(side, 0, range(batch), side, CFG)
  k_ctx, k_tgt = masking.mask_sizes(side, CFG)
  ctx, tgt, valid = out["ctx_idx"], out["tgt_idx"], out["tgt_valid"]
  assert ctx.shape == (batch, k_ctx) and ctx.dtype == np.int32
  assert tgt.shape == valid.shape == (4, batch, k_tgt) and tgt.dtype == np.int32
  assert valid.dtype == bool
  u = np.arange(20_000) / 20_000
  reachable = set(zip(*masking.block_shape(u, side, CFG.target_scale, CFG.target_aspect),
                      strict=True))
  for b in range(batch):
    assert np.all(np.diff(ctx[b]) > 0) and ctx[b].min() >= 0 and ctx[b].max() < side * side
    for k in range(4):
      n = _block_length(tgt[k, b])
      assert not valid[k, b, n:].any() and np.all(tgt[k, b, n:] == 0)   # padding
      cells = tgt[k, b, :n]
      assert _rectangle(cells, side) in {(int(h), int(w)) for h, w in reachable}
      # Every cell of the block is predicted unless it is a context cell.
      np.testing.assert_array_equal(valid[k, b, :n], ~np.isin(cells, ctx[b]))


def test_block_masks_deterministic_per_row_and_per_block_sizes():
  a = masking.block_masks(7, 3, range(16), 8, CFG)
  b = masking.block_masks(7, 3, range(16), 8, CFG)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  for other in (masking.block_masks(8, 3, range(16), 8, CFG),
                masking.block_masks(7, 4, range(16), 8, CFG)):
    assert not np.array_equal(a["tgt_idx"], other["tgt_idx"])
  # A process drawing rows 8..15 gets exactly those rows of the global draw, and they differ
  # from rows 0..7 (what another process holds).
  second = masking.block_masks(7, 3, range(8, 16), 8, CFG)
  np.testing.assert_array_equal(second["ctx_idx"], a["ctx_idx"][8:])
  np.testing.assert_array_equal(second["tgt_idx"], a["tgt_idx"][:, 8:])
  assert not np.array_equal(second["tgt_idx"], a["tgt_idx"][:, :8])
  counts = a["tgt_valid"].sum(-1)                                     # (4, B)
  assert np.any(counts.min(0) != counts.max(0))                       # sizes differ per block


@pytest.mark.parametrize("side", [3, 4, 5, 6, 8, 10, 16, 32])
def test_no_context_cell_is_a_target(side):
  """The GeoPlex grids: a context cell is never a valid target cell (leak exactly 0), also when
  the targets cover the grid and the context must take target cells."""
  masks = masking.block_masks(1, side, range(32), side, CFG)
  assert masking.leak(masks) == 0.0
  big = MaskConfig(target_scale=(0.7, 0.8), context_fraction=0.3)
  masks = masking.block_masks(2, side, range(32), side, big)
  assert masking.leak(masks) == 0.0
  # Those contexts did take target cells (the leak the removal prevents).
  raw = [np.isin(masks["ctx_idx"][b], masks["tgt_idx"][:, b]) for b in range(32)]
  assert np.mean(raw) > 0.05
  hand = {"ctx_idx": np.array([[1, 2]]), "tgt_idx": np.array([[[2, 3]]]),
          "tgt_valid": np.array([[[True, True]]])}
  assert masking.leak(hand) == 0.5


def test_context_avoids_targets_when_possible():
  """16x16 grid with small targets: the context is K_ctx cells of one square block, off-target."""
  side = 16
  k_ctx = masking.mask_sizes(side, CFG)[0]
  cfg = MaskConfig(target_scale=(0.05, 0.1))
  out = masking.block_masks(0, 0, range(8), side, cfg)
  h_ctx = int(masking.block_shape(0.5, side, cfg.context_scale, (1.0, 1.0))[0])
  for b in range(8):
    tgt = out["tgt_idx"][:, b][out["tgt_valid"][:, b]]
    ctx = out["ctx_idx"][b]
    assert ctx.size == k_ctx and not np.isin(ctx, tgt).any()
    r, c = np.divmod(ctx, side)
    assert r.max() - r.min() < h_ctx and c.max() - c.min() < h_ctx


def _cells(side, rows, cols):
  m = np.zeros((side, side), bool)
  m[rows, cols] = True
  return m.ravel()


def test_context_fill_rule():
  side = 6
  # Targets cover everything but 3 cells: all 3 are taken, then random target cells.
  free = [(0, 0), (5, 5), (2, 3)]
  cover = np.ones((side, side), bool)
  for r, c in free:
    cover[r, c] = False
  targets = [cover.ravel()] * 4
  for seed in range(5):
    ctx = masking._context_cells(np.random.default_rng(seed), side, targets, 7, CFG)
    assert ctx.size == 7 and np.unique(ctx).size == 7 and np.all(np.diff(ctx) > 0)
    assert set(r * side + c for r, c in free) <= set(ctx.tolist())
  # Targets cover the whole grid: after 4 relaxations the context block itself is used.
  full = [np.ones(side * side, bool)] * 4
  ctx = masking._context_cells(np.random.default_rng(0), side, full, 5, CFG)
  r, c = np.divmod(ctx, side)
  assert ctx.size == 5 and r.max() - r.min() < 5 and c.max() - c.min() < 5
  # The last target is dropped first: targets 0-2 leave only column 5, target 3 covers it.
  left = _cells(side, slice(None), slice(0, 5))
  targets = [left, left, left, _cells(side, slice(None), slice(5, 6))]
  ctx = masking._context_cells(np.random.default_rng(1), side, targets, 2, CFG)
  assert np.all(ctx % side == 5)


def test_modality_mask_counts():
  key = jax.random.key(0)
  mask = jax.jit(masking.modality_mask, static_argnums=(1, 2, 3, 4))
  for m, k in ((1, 4), (2, 5), (3, 7), (4, 1)):
    vis = np.asarray(mask(key, m, k, 6, 0.5))
    assert vis.shape == (6, m, k) and vis.dtype == bool
    n_keep = int(k * (m - 1) * 0.5)
    np.testing.assert_array_equal(vis.sum((1, 2)), k + n_keep)
    assert vis.any(axis=1).all()                                      # every slot keeps one
  vis = np.asarray(mask(jax.random.key(1), 3, 50, 40, 0.5))
  frac = vis.mean((0, 2))
  np.testing.assert_allclose(frac, (50 + 50) / 150, atol=0.03)       # no modality favoured
  again = np.asarray(masking.modality_mask(jax.random.key(1), 3, 50, 40, 0.5))
  np.testing.assert_array_equal(vis, again)


def test_select_dates_keeps_real_dates_per_sample():
  rng = np.random.default_rng(0)
  date_mask = np.zeros((4, 8), np.float32)
  date_mask[0] = 1                                    # 8 real dates
  date_mask[1, :2] = 1                                # 2 real
  date_mask[2, [1, 4, 6, 7]] = 1                      # 4 real, not in front
  for _ in range(20):                                 # row 3: none real
    noise = rng.random((4, 9))
    idx, valid = masking.select_dates(noise, date_mask, 0.5)
    assert idx.shape == valid.shape == (4, 4) and idx.dtype == np.int32
    real = date_mask[np.arange(4)[:, None], idx] != 0
    assert not (valid & ~real).any()                                  # only real dates kept
    np.testing.assert_array_equal(valid.sum(1), [4, 1, 2, 0])         # half of each's real
    for b in range(4):
      n = valid[b].sum()
      assert np.all(np.diff(idx[b, :n]) > 0) and np.all(np.diff(idx[b, n:]) > 0)
      assert len(set(idx[b])) == 4
    jidx, jvalid = jax.jit(lambda x, m: masking.select_dates(x, m, 0.5, xp=jnp))(noise, date_mask)
    np.testing.assert_array_equal(jidx, idx)
    np.testing.assert_array_equal(jvalid, valid)
  idx, valid = masking.select_dates(rng.random((2, 7)), None, 0.5)    # 6 dates, all real
  assert idx.shape == (2, 3) and valid.sum(1).tolist() == [3, 3]
  assert masking.kept_dates(1) == 1 and masking.kept_dates(7) == 4


@pytest.mark.parametrize("bucket", [8, 20, 60])
def test_temporal_keep_is_half_of_each_samples_real_dates(bucket):
  """Series with few real dates in a long bucket keep 0.5 +- 0.05 of them on average, per
  sample count (the bucket-level rule kept them all); the kept dates are uniform."""
  rng = np.random.default_rng(bucket)
  for n_real in (2, 3, 4, 5):
    rows = 2000
    date_mask = np.zeros((rows, bucket), bool)
    date_mask[:, :n_real] = True
    idx, valid = masking.select_dates(rng.random((rows, bucket + 1)), date_mask, 0.5)
    kept = valid.sum(1) / n_real
    assert abs(kept.mean() - 0.5) < 0.05, (n_real, kept.mean())
    assert kept.min() > 0 and kept.max() <= 1
    hits = np.bincount(idx[valid], minlength=bucket)[:n_real] / rows
    np.testing.assert_allclose(hits, 0.5, atol=0.06)


def test_sample_temporal_masks_in_jit():
  date_mask = np.zeros((3, 10), np.float32)
  date_mask[:, :4] = 1
  inputs = {"s2": np.zeros((3, 10, 1, 1, 1), np.float32), "s2_dates": np.ones((3, 10), np.int32),
            "s2_mask": date_mask}
  idx, valid = jax.jit(masking.sample_temporal_masks, static_argnums=2)(
      jax.random.key(0), inputs, 0.5)["s2"]
  idx, valid = np.asarray(idx), np.asarray(valid)
  assert idx.shape == (3, 5) and valid.sum(1).max() <= 3 and valid.sum(1).min() >= 1
  assert np.all(idx[valid] < 4)


def test_apply_temporal_mask():
  rng = np.random.default_rng(0)
  b, t = 2, 6
  inputs = {
      "aerial": rng.normal(size=(b, 4, 10, 10)).astype(np.float32),
      "s2": rng.normal(size=(b, t, 10, 2, 2)).astype(np.float32),
      "s2_dates": np.tile(np.arange(10, 10 + t, dtype=np.float32), (b, 1)),
      "s2_mask": np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], np.float32),
      "s2_valid": (rng.random((b, t, 1, 2, 2)) > 0.3).astype(np.uint8),
      "modis": rng.normal(size=(b, 4, 7, 1, 1)).astype(np.float32),
      "modis_dates": np.tile(np.arange(4, dtype=np.float32), (b, 1)),
  }
  masks = masking.sample_temporal_masks(jax.random.key(0), inputs, 0.5)
  assert set(masks) == {"s2", "modis"}
  out = masking.apply_temporal_mask(inputs, masks)
  assert out["aerial"] is inputs["aerial"]
  idx, valid = (np.asarray(a) for a in masks["s2"])
  rows = np.arange(b)[:, None]
  np.testing.assert_array_equal(out["s2"], inputs["s2"][rows, idx])
  np.testing.assert_array_equal(out["s2_dates"], inputs["s2_dates"][rows, idx])
  np.testing.assert_array_equal(
      out["s2_valid"], np.broadcast_to(inputs["s2_valid"], inputs["s2"].shape)[rows, idx])
  np.testing.assert_array_equal(out["s2_mask"], valid.astype(np.float32))
  assert out["s2_mask"].dtype == np.float32
  np.testing.assert_array_equal(valid.sum(1), [2, 3])                # half of 4 and of 6 real
  assert out["modis"].shape == (b, 2, 7, 1, 1) and out["modis_mask"].dtype == np.float32
  jitted = jax.jit(lambda k, x: masking.apply_temporal_mask(
      x, masking.sample_temporal_masks(k, x, 0.5)))(jax.random.key(0), inputs)
  np.testing.assert_array_equal(jitted["s2"], out["s2"])
