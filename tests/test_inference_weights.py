"""A bfloat16 ``AnySat`` stores the weights its forward pass only reads rounded in bfloat16
(``models.inference_weights``): same outputs, fewer bytes, norms and L-TAE kept float32."""

import jax
import jax.numpy as jnp
import numpy as np

from anysat_jax import AnySat
from anysat_jax.models import inference_weights, xla_options

SMALL = dict(dim=64, depth=1, num_heads=2, spatial_depth=1, spatial_heads=4,
             modalities=("spot", "s2"))


def _batch():
  rng = np.random.default_rng(0)
  return {"spot": rng.normal(size=(2, 3, 120, 120)).astype(np.float32),
          "s2": rng.normal(size=(2, 5, 10, 12, 12)).astype(np.float32),
          "s2_dates": np.sort(rng.integers(0, 365, (2, 5))).astype(np.float32),
          "s2_mask": np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], np.float32),
          "s2_valid": (rng.random((2, 5, 10, 12, 12)) > 0.1).astype(np.uint8)}


def _by_path(tree):
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_bf16_model_stores_rounded_weights_with_the_same_outputs():
  f32 = AnySat("tiny", seed=3, **SMALL).params
  model = AnySat("tiny", params=f32, dtype="bfloat16", **SMALL)
  stored, original = _by_path(model.params), _by_path(f32)
  rounded = {k for k, x in stored.items() if x.dtype == jnp.bfloat16}
  # Every transformer and VHR-projector matmul weight, nothing read in float32.
  assert any("spatial_encoder" in k and "qkv" in k and "kernel" in k for k in rounded)
  assert any("combiner" in k and "fc1" in k and "kernel" in k for k in rounded)
  assert any("projector_spot" in k and "'kernel']" in k for k in rounded)
  for k in stored:
    if k not in rounded:
      assert stored[k].dtype == original[k].dtype
  for k in ("scale", "rpe_table", "cls_token", "master_query", "pad_value"):
    assert not any(k in name for name in rounded), k
  assert not any("projector_s2" in k and "in_fc" in k for k in rounded)   # L-TAE in float32
  for k in rounded:
    np.testing.assert_array_equal(stored[k], original[k].astype(jnp.bfloat16))
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  assert nbytes(model.params) < 0.7 * nbytes(f32)
  # The forward pass computes the same thing from either tree; the API is that forward pass.
  batch = _batch()
  fn = jax.jit(lambda p, x: model.apply(p, x, 40, "all"),
               compiler_options=xla_options.forward("bfloat16"))
  got = np.asarray(fn(model.params, batch))
  np.testing.assert_array_equal(got, np.asarray(fn(f32, batch)))
  np.testing.assert_array_equal(np.asarray(model(batch, 40, "all")), got)

def test_float32_model_keeps_its_params():
  model = AnySat("tiny", seed=3, **SMALL)
  assert inference_weights.round_for_inference(model.module, model.params) is model.params
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(model.params))
