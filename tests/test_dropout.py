"""Dropout as in the official pretraining encoder: L-TAE input/output MLP dropout (0.2 except
s2, l8) and attention dropout 0.1, active only in a training (non-deterministic) apply; and
the patch validity that keeps empty patches out of the contrastive loss."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anysat_jax.models.config import default_projector, encoder_config, override
from anysat_jax.models.encoder import AnySatEncoder, grid_validity
from anysat_jax.models.jepa import PredictorConfig, Student
from anysat_jax.tasks import pretrain
from anysat_jax.tasks.losses import pretrain as losses
from anysat_jax.tools.parity import rel_l2
from configs import geoplex

CONFIG = encoder_config("tiny", dim=64, depth=1, num_heads=4, spatial_depth=1, spatial_heads=4,
                        modalities=("s2", "s1"))


def _batch(seed=0, b=2, px=4):
  rng = np.random.default_rng(seed)
  out = {}
  for name, t, c in (("s2", 4, 10), ("s1", 3, 3)):
    out[name] = rng.normal(size=(b, t, c, px, px)).astype(np.float32)
    out[name + "_dates"] = np.sort(rng.integers(1, 366, (b, t)), axis=1).astype(np.int32)
  return out


@pytest.fixture(scope="module")
def encoder():
  model = AnySatEncoder(CONFIG)
  params = model.init(jax.random.key(0), method=AnySatEncoder.init_all)["params"]
  return model, params


def _features(model, params, batch, deterministic, seed=0):
  fn = jax.jit(lambda p, x, k: model.apply({"params": p}, x, 20, deterministic=deterministic,
                                           rngs={"dropout": k},
                                           method=AnySatEncoder.features)[0])
  return np.asarray(fn(params, batch, jax.random.key(seed)))


def test_default_rates():
  """The pretraining config's rates: 0 for s2 and l8, 0.2 for the other series; attention 0.1."""
  rates = {m: (default_projector(m, 64).dropout, default_projector(m, 64).attn_dropout)
           for m in ("s2", "l8", "s1", "s1-asc", "alos", "l7", "modis")}
  assert rates == {"s2": (0.0, 0.1), "l8": (0.0, 0.1), "s1": (0.2, 0.1), "s1-asc": (0.2, 0.1),
                   "alos": (0.2, 0.1), "l7": (0.2, 0.1), "modis": (0.2, 0.1)}


def test_dropout_only_in_training_apply(encoder):
  model, params = encoder
  batch = _batch()
  inference = np.asarray(model.apply({"params": params}, batch, 20, "all"))
  assert rel_l2(_features(model, params, batch, True, 1), inference) < 1e-6
  a = _features(model, params, batch, False, 1)
  b = _features(model, params, batch, False, 2)
  assert rel_l2(a, inference) > 1e-2 and rel_l2(b, a) > 1e-2
  assert rel_l2(_features(model, params, batch, False, 1), a) < 1e-7    # the rng decides


def test_zero_rates_are_deterministic(encoder):
  """With every rate 0 a training apply equals inference: dropout is the only randomness."""
  model, params = encoder
  off = AnySatEncoder(override(CONFIG, **{"projectors.s1.dropout": 0.0,
                                          "projectors.s1.attn_dropout": 0.0,
                                          "projectors.s2.attn_dropout": 0.0}))
  batch = _batch()
  assert rel_l2(_features(off, params, batch, False, 3), _features(off, params, batch, True)) \
      < 1e-6


def test_run_config_sets_projector_rates():
  """``model.projectors`` of a run config reaches the pretraining encoder (a ConfigDict
  cannot hold the dotted ``projectors.<mod>.<field>`` names)."""
  config = geoplex.get_config("demo")
  config.model.projectors = {"s1": {"dropout": 0.0, "attn_dropout": 0.05}}
  projectors = dict(pretrain.model_configs(config)[0].projectors)
  assert (projectors["s1"].dropout, projectors["s1"].attn_dropout) == (0.0, 0.05)
  assert (projectors["l7"].dropout, projectors["s2"].attn_dropout) == (0.2, 0.1)
  config.model.projectors = {"s9": {"dropout": 0.0}}
  with pytest.raises(ValueError, match="s9"):
    pretrain.model_configs(config)


def test_student_training_apply_has_dropout():
  student = Student(CONFIG, PredictorConfig(32, 1, 4))
  params = student.init(jax.random.key(0), method=Student.init_all)["params"]
  batch = _batch(1)
  ctx = np.array([[0, 3], [1, 2]], np.int32)
  tgt = np.array([[[1, 2], [0, 3]]], np.int32)
  valid = np.ones((1, 2, 2), bool)
  visible = np.ones((2, 2, 2), bool)

  @functools.partial(jax.jit, static_argnums=1)
  def run(k, deterministic):
    out = student.apply({"params": params}, batch, 20, ctx, tgt, valid, visible,
                        deterministic=deterministic, rngs={"dropout": k})
    return out.tokens, out.pred

  keys = jax.random.split(jax.random.key(5))
  det = student.apply({"params": params}, batch, 20, ctx, tgt, valid, visible)
  (ta, pa), (tb, pb) = (run(k, False) for k in keys)
  # The patch tokens (contrastive loss) and, through the combiner, the predictions change.
  assert rel_l2(np.asarray(ta), np.asarray(tb)) > 1e-2
  assert rel_l2(np.asarray(ta), np.asarray(det.tokens)) > 1e-2
  assert rel_l2(np.asarray(pa), np.asarray(pb)) > 1e-4
  same_t, same_p = run(keys[0], True)
  assert rel_l2(np.asarray(same_t), np.asarray(det.tokens)) < 1e-5   # jit vs eager
  assert rel_l2(np.asarray(same_p), np.asarray(det.pred)) < 1e-5


def test_grid_validity_and_contrastive_exclusion():
  """A patch with no real date (date mask) or no measured value (value mask) is invalid, and
  leaving it in would change the contrastive loss."""
  batch = _batch(2)
  batch["s2_mask"] = np.ones((2, 4), np.float32)
  batch["s2_mask"][1] = 0                                    # sample 1: no real s2 date
  valid = np.ones(batch["s1"].shape, np.uint8)
  valid[0, :, :, :2, 2:] = 0                                 # sample 0: top-right s1 patch
  valid[0, 1, 0, 0, 0] = 0                                   # one missing value: still valid
  batch["s1_valid"] = valid
  got = np.asarray(grid_validity(batch, 20, CONFIG))         # (B, M, N), 2 x 2 patches
  want = np.ones((2, 2, 4), bool)
  want[1, 0] = False
  want[0, 1, 1] = False
  np.testing.assert_array_equal(got, want)
  assert grid_validity(_batch(2), 20, CONFIG) is None

  tokens = np.random.default_rng(3).normal(size=(2, 2, 4, 8)).astype(np.float32)
  mask = jnp.asarray(got.transpose(1, 0, 2))
  with_mask = float(losses.contrastive_loss(tokens, mask))
  assert abs(with_mask - float(losses.contrastive_loss(tokens))) > 1e-3
  # Equal to the loss over the valid tokens only, whatever the invalid tokens hold.
  noisy = tokens.copy()
  noisy[~got.transpose(1, 0, 2)] = 100.0
  assert float(losses.contrastive_loss(noisy, mask)) == pytest.approx(with_mask, rel=1e-6)
