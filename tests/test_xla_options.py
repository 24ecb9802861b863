"""Forward passes compile with ``models.xla_options.forward()`` and gradients with
``training()``: same values, less memory."""

import jax
import numpy as np

from anysat_jax import AnySat
from anysat_jax.models import xla_options


def _small_model_and_batch(seed: int, spatial_depth: int) -> tuple[AnySat, dict]:
  """A small spot + s2 model and a B = 2 batch for it (40 m patches)."""
  model = AnySat("tiny", seed=seed, dim=64, depth=1, num_heads=2, spatial_depth=spatial_depth,
                 spatial_heads=4, modalities=("spot", "s2"))
  rng = np.random.default_rng(seed - 1)
  batch = {"spot": rng.normal(size=(2, 3, 120, 120)).astype(np.float32),
           "s2": rng.normal(size=(2, 5, 10, 12, 12)).astype(np.float32),
           "s2_dates": np.sort(rng.integers(0, 365, (2, 5))).astype(np.float32)}
  return model, batch


def test_forward_options_keep_values_and_lower_memory():
  model, batch = _small_model_and_batch(seed=1, spatial_depth=2)
  options = xla_options.forward()
  assert options is not None, "the tests run on the CPU backend"
  fn = lambda p, x: model.apply(p, x, 40, "all")
  plain = jax.jit(fn).lower(model.params, batch).compile()
  tuned = jax.jit(fn, compiler_options=options).lower(model.params, batch).compile()
  want, got = np.asarray(plain(model.params, batch)), np.asarray(tuned(model.params, batch))
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-6
  # The API's compiled forward is the tuned one: its output equals it.
  api = np.asarray(model(batch, 40, "all"))
  assert np.linalg.norm(api - got) / np.linalg.norm(got) < 1e-6
  temp = lambda c: c.memory_analysis().temp_size_in_bytes
  assert temp(tuned) < temp(plain), (temp(tuned), temp(plain))


def test_training_options_make_remat_take_effect():
  """With XLA CPU's barrier expander off, the blocks' recomputation is no longer merged back
  into the forward pass: same gradients, less temp memory."""
  model, batch = _small_model_and_batch(seed=2, spatial_depth=3)
  options = xla_options.training()
  assert options is not None, "the tests run on the CPU backend"
  grad = jax.grad(lambda p, x: jax.numpy.sum(jax.numpy.sin(model.apply(p, x, 40, "all"))))
  plain = jax.jit(grad).lower(model.params, batch).compile()
  tuned = jax.jit(grad, compiler_options=options).lower(model.params, batch).compile()
  for want, got in zip(jax.tree.leaves(plain(model.params, batch)),
                       jax.tree.leaves(tuned(model.params, batch)), strict=True):
    want, got = np.asarray(want), np.asarray(got)
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want) + 1e-12
  temp = lambda c: c.memory_analysis().temp_size_in_bytes
  assert temp(tuned) < 0.85 * temp(plain), (temp(tuned), temp(plain))
