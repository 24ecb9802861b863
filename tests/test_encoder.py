"""Encoder structure: norm eps by construction, date-padding invariance, value masks, dense
layouts, one compile per input signature."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from anysat_jax import AnySat
from anysat_jax.models.layers import GroupNorm
from anysat_jax.tools.parity import rel_l2


@pytest.fixture(scope="module")
def small_model():
  return AnySat("tiny", seed=1, dim=64, depth=1, num_heads=4, spatial_depth=1, spatial_heads=4)


def _series(rng, b, t, c, px):
  x = rng.normal(size=(b, t, c, px, px)).astype(np.float32)
  d = np.sort(rng.integers(1, 366, (b, t)), axis=1).astype(np.float32)
  return x, d


def _batch(rng, b=2, px=6, aerial=True):
  s2, s2d = _series(rng, b, 5, 10, px)
  s1, s1d = _series(rng, b, 3, 3, px)
  batch = {"aerial": rng.normal(size=(b, 4, 50 * px, 50 * px)).astype(np.float32)} if aerial else {}
  return {**batch, "s2": s2, "s2_dates": s2d, "s1": s1, "s1_dates": s1d}


def test_norm_eps_by_construction(small_model):
  """LayerNorm eps 1e-5 in projectors and spatial encoder, 1e-6 in the combiner; GroupNorm 1e-5;
  two-pass LayerNorm variance everywhere."""
  seen = []

  def record(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name == "__call__" and isinstance(mod, nn.LayerNorm):
      seen.append(("/".join(mod.path), mod.epsilon, mod.use_fast_variance))
    elif context.method_name == "__call__" and isinstance(mod, GroupNorm):
      seen.append(("/".join(mod.path), mod.eps, False))
    return next_fun(*args, **kwargs)

  batch = _batch(np.random.default_rng(0), 1, px=2)
  batch["modis"] = np.zeros((1, 2, 7, 1, 1), np.float32)
  batch["modis_dates"] = np.ones((1, 2), np.float32)
  with nn.intercept_methods(record):     # tracing calls every module: no need to compile
    jax.eval_shape(lambda p: small_model.apply(p, batch, 10), small_model.params)
  paths = {p for p, _, _ in seen}
  for part in ("combiner/block_0/norm1", "combiner/cross/norm2", "spatial_encoder/norm",
               "spatial_encoder/block_0/norm1", "projector_aerial/ln_1", "projector_s2/in_norm",
               "projector_modis/in_gn_0", "projector_s1/out_norm"):
    assert any(p.endswith(part) for p in paths), part
  for path, eps, fast in seen:
    assert eps == (1e-6 if "combiner" in path else 1e-5), (path, eps)
    assert not fast, path


@pytest.mark.parametrize("output", ["all", "dense"])
def test_date_padding_with_mask_is_invisible(small_model, output):
  """A series padded to a longer T with its (B, T) date mask gives the unpadded output."""
  rng = np.random.default_rng(1)
  batch = _batch(rng, aerial=False)
  padded = dict(batch)
  for name, extra in (("s2", 4), ("s1", 2)):
    x, d = batch[name], batch[name + "_dates"]
    b, t = d.shape
    # Padding holds garbage values and dates, so only the mask can make it invisible.
    padded[name] = np.concatenate([x, rng.normal(size=(b, extra, *x.shape[2:]))], 1).astype(
        np.float32)
    padded[name + "_dates"] = np.concatenate([d, rng.integers(1, 366, (b, extra))], 1)
    padded[name + "_mask"] = np.concatenate([np.ones((b, t)), np.zeros((b, extra))], 1)
  om = "s2" if output == "dense" else None
  ref = np.asarray(small_model(batch, 20, output, om))
  got = np.asarray(small_model(padded, 20, output, om))
  assert rel_l2(got, ref) < 1e-6
  # Without the mask the padding changes the result (the test can fail).
  del padded["s2_mask"], padded["s1_mask"]
  assert rel_l2(np.asarray(small_model(padded, 20, output, om)), ref) > 1e-3


def test_padding_mask_in_the_middle_of_a_batch(small_model):
  """Samples with different real lengths in one padded batch each match their own run."""
  rng = np.random.default_rng(2)
  s2, d = _series(rng, 2, 6, 10, 6)
  mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], np.float32)
  out = np.asarray(small_model({"s2": s2, "s2_dates": d, "s2_mask": mask}, 20, "all"))
  alone = np.asarray(small_model({"s2": s2[1:, :3], "s2_dates": d[1:, :3]}, 20, "all"))
  assert rel_l2(out[1:], alone) < 1e-6


def test_value_mask_uses_the_learned_pad_value(small_model):
  """``<mod>_valid`` == 0 entries are replaced by the projector's pad value."""
  rng = np.random.default_rng(3)
  x, d = _series(rng, 1, 4, 11, 2)
  valid = np.ones_like(x)
  valid[:, :, 3] = 0
  valid[:, 1, 5:8] = 0
  params = jax.tree.map(np.asarray, small_model.params)
  params["projector_l8"]["pad_value"] = np.float32(0.7)
  model = AnySat(params=params, config=small_model.config)
  got = np.asarray(model({"l8": x, "l8_dates": d, "l8_valid": valid}, 10, "all"))
  filled = x.copy()
  filled[valid == 0] = 0.7
  want = np.asarray(model({"l8": filled, "l8_dates": d}, 10, "all"))
  assert rel_l2(got, want) < 1e-7
  assert rel_l2(np.asarray(model({"l8": x, "l8_dates": d}, 10, "all")), want) > 1e-3


def test_outputs_are_consistent(small_model):
  batch = _batch(np.random.default_rng(4))
  allt = np.asarray(small_model(batch, 20, "all"))
  np.testing.assert_array_equal(np.asarray(small_model(batch, 20, "tile")), allt[:, 0])
  np.testing.assert_array_equal(np.asarray(small_model(batch, 20, "patch")),
                                allt[:, 1:].reshape(2, 3, 3, -1))
  dense = np.asarray(small_model(batch, 20, "dense", "s2"))
  assert dense.shape == (2, 6, 6, 128)
  # Channels [:E] repeat the patch token over its 2 x 2 cells.
  np.testing.assert_array_equal(dense[:, 2:4, 4:6, :64],
                                np.broadcast_to(allt[:, 1 + 1 * 3 + 2, None, None], (2, 2, 2, 64)))


def test_raster_dense_unpermutes_aerial(small_model):
  """raster_dense places the aerial sub-patch token of in-patch pixel (a*5+c, b*5+d) there."""
  batch = _batch(np.random.default_rng(5))
  blocked = np.asarray(small_model(batch, 20, "dense", "aerial"))[..., 64:]
  raster = np.asarray(small_model(batch, 20, "dense", "aerial", raster_dense=True))[..., 64:]
  assert blocked.shape == raster.shape == (2, 30, 30, 64)
  # Patch (0, 0), blocked index t = ((a*2 + b)*5 + c)*5 + d sits at row t // 10, col t % 10.
  for a, b_, c, d in ((0, 1, 2, 3), (1, 0, 4, 0), (1, 1, 3, 4)):
    t = ((a * 2 + b_) * 5 + c) * 5 + d
    np.testing.assert_array_equal(raster[:, a * 5 + c, b_ * 5 + d], blocked[:, t // 10, t % 10])


def test_one_compile_per_input_signature():
  model = AnySat("tiny", seed=0, dim=64, depth=1, num_heads=4, spatial_depth=1, spatial_heads=4,
                 modalities=("s2", "s1"))
  rng = np.random.default_rng(6)
  s2, d = _series(rng, 2, 4, 10, 4)
  batch = {"s2": s2, "s2_dates": d}
  for output in ("tile", "patch", "all", "tile"):
    model(batch, 20, output)
  assert model.num_compiles == 1
  model({"s2": s2 + 1, "s2_dates": d}, 20, "tile")              # new values, same shapes
  assert model.num_compiles == 1
  model(batch, 40, "tile")                                       # new patch size
  assert model.num_compiles == 2
  s2b, db = _series(rng, 2, 7, 10, 4)
  model({"s2": s2b, "s2_dates": db}, 20, "tile")                 # new T
  assert model.num_compiles == 3
  model(batch, 20, "dense")
  model(batch, 20, "dense", "s2")
  assert model.num_compiles == 4
