"""Mixed precision, the two attention implementations and rematerialisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PARITY_DIR

from anysat_jax.models.config import encoder_config, override
from anysat_jax.models.encoder import AnySatEncoder, select_output
from anysat_jax.models.predictor import Predictor
from anysat_jax.tasks import pretrain as train
from anysat_jax.tools import gpu_bench, parity

CASES = sorted(p.name for p in PARITY_DIR.glob("case_*.npz"))
CONFIG = encoder_config("tiny", dim=64, depth=1, num_heads=4, spatial_depth=2, spatial_heads=4,
                        modalities=("aerial", "s2", "s1"))


def _rel_tree(a, b) -> float:
  """Relative L2 difference of two trees, all leaves together.

  Per leaf it would be noise for the leaves whose gradient is zero in exact arithmetic (key
  biases under softmax, ~1e-7 of the tree's norm).
  """
  assert jax.tree.structure(a) == jax.tree.structure(b)
  flat = lambda t: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])
  x, y = flat(a), flat(b)
  return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


def _rel_leaves(a, b) -> float:
  """Largest relative L2 difference of two trees' leaves."""
  return max(_rel_tree(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                               strict=True))


@pytest.mark.parametrize("case", CASES)
def test_bfloat16_close_to_float32_on_parity_fixtures(case):
  """bf16 matmuls: every case's tokens and one dense map within 1e-2 of the float32 reference
  (whose own error is ~3e-7)."""
  model, inputs, variants, z = parity.load_case(str(PARITY_DIR / case))
  inputs = {k: np.asarray(v, np.float32) for k, v in inputs.items()}
  config = override(model.config, dtype="bfloat16")
  patch = int(next(iter(variants.values()))["patch_size_m"])
  same_patch = {k: v for k, v in variants.items() if int(v["patch_size_m"]) == patch}
  dense = next((v["output_modality"] for v in same_patch.values() if v["output"] == "dense"),
               None)

  @jax.jit
  def features(params):   # the inputs are constants: their dict order is the model's
    return AnySatEncoder(config).apply({"params": params}, inputs, patch, dense,
                                       method=AnySatEncoder.features)

  tokens, sub = features(model.params)
  assert tokens.dtype == jnp.float32
  errors = {}
  for name, v in same_patch.items():
    if v["output"] != "dense" or v["output_modality"] == dense:
      y = select_output(tokens, sub, v["output"], dense, patch // 10)
      errors[name] = parity.rel_l2(np.asarray(y), z["output/" + name])
  assert errors and max(errors.values()) < 1e-2, errors


def _inputs(rng, b=2):
  return {"aerial": rng.normal(size=(b, 4, 100, 100)).astype(np.float32),
          "s2": rng.normal(size=(b, 3, 10, 2, 2)).astype(np.float32),
          "s2_dates": np.sort(rng.integers(1, 366, (b, 3)), 1).astype(np.float32),
          "s1": rng.normal(size=(b, 2, 3, 2, 2)).astype(np.float32),
          "s1_dates": np.sort(rng.integers(1, 366, (b, 2)), 1).astype(np.float32)}


def _everything(config, predictor, inputs):
  """A function of (encoder params, predictor params) through every attention: spatial RPE,
  combiner (config's mode) and cross block on the full grid and on context patches (with
  modality masking), predictor with padded targets."""
  enc = AnySatEncoder(config)
  positions = jnp.array([[0, 2, 3], [3, 1, 0]])
  visible = jnp.array([[[True, False, True]] * 3, [[True, True, False]] * 3])   # (B, M, K)
  tgt_idx = jnp.array([[[1, 2], [2, 0]]])
  tgt_valid = jnp.array([[[True, False], [True, True]]])

  def fn(enc_params, pred_params):
    p = {"params": enc_params}
    full, _ = enc.apply(p, inputs, 10, method=AnySatEncoder.features)
    emb = enc.apply(p, inputs, 10, method=AnySatEncoder.embed)
    ctx = jnp.take_along_axis(emb.grids, positions[:, None, :, None], axis=2)
    part = enc.apply(p, ctx, None, 10, positions, 2, visible, jnp.ones(config.dim),
                     method=AnySatEncoder.combine)
    pred = predictor.apply({"params": pred_params}, part[:, 1:], positions, tgt_idx, 2, 1,
                           tgt_valid)
    return full, part, pred

  return fn


def _params(config, predictor, inputs):
  enc = jax.jit(lambda k: AnySatEncoder(config).init(k, method=AnySatEncoder.init_all))(
      jax.random.key(0))["params"]
  z = jnp.zeros((2, 3, config.dim))
  pred = predictor.init(jax.random.key(1), z, jnp.zeros((2, 3), int),
                        jnp.zeros((1, 2, 2), int), 2, 1)["params"]
  return enc, pred


@pytest.mark.parametrize("mode", ["token", "head_axis"])
def test_dot_product_attention_equals_xla_path(mode):
  inputs = _inputs(np.random.default_rng(0))
  config = override(CONFIG, combiner_attention=mode)
  outs = {}
  for impl in ("xla", "dot_product_attention"):
    cfg = override(config, attention_impl=impl)
    predictor = Predictor(32, 2, 4, attention_impl=impl)
    params = _params(cfg, predictor, inputs)
    outs[impl] = jax.jit(_everything(cfg, predictor, inputs))(*params)
  assert _rel_leaves(outs["dot_product_attention"], outs["xla"]) < 1e-6


def test_remat_and_chunks_give_the_same_outputs_and_gradients():
  """remat, and chunks of 9 rows (several chunks per L-TAE and spatial-encoder call, the last
  one padded) change neither the outputs nor the gradients."""
  inputs = _inputs(np.random.default_rng(1))
  outs, grads = {}, {}
  for remat, chunk in ((False, 0), (True, 0), (True, 9)):
    cfg = override(CONFIG, remat=remat, chunk_tokens=chunk)
    predictor = Predictor(32, 2, 4, remat=remat)
    params = _params(cfg, predictor, inputs)
    fn = _everything(cfg, predictor, inputs)

    def loss(e, p, fn=fn):
      out = fn(e, p)
      return sum(jnp.sum(jnp.sin(x)) for x in out), out

    # One compile per variant: the outputs come back as the loss's aux.
    (_, outs[chunk, remat]), grads[chunk, remat] = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(*params)
  for key in ((0, True), (9, True)):
    assert _rel_leaves(outs[key], outs[0, False]) < 1e-6, key
    assert _rel_tree(grads[key], grads[0, False]) < 1e-6, key


def test_bfloat16_train_step_keeps_float32_state():
  """Parameters, AdamW moments, the EMA teacher and the loss stay float32 in a bf16 step."""
  config = gpu_bench.bench_config(smoke=True, attention_impl="xla", remat=False)
  assert train.model_configs(config)[0].dtype == "bfloat16"
  name, patch, batch, shapes = gpu_bench.buckets(config)[0]
  inputs = gpu_bench.synthetic_batch(shapes, batch)
  masks = train.host_masks(config, 0, batch, gpu_bench._side(shapes, patch))
  state = jax.jit(lambda: train.init_state(config))()
  state, metrics = train.jit_train_step(config, None, lambda _: None)(state, inputs, masks,
                                                                      patch_size=patch)
  assert metrics["loss"].dtype == jnp.float32 and bool(metrics["finite"])
  dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)}
  assert dtypes == {np.dtype(np.float32)}


def test_dtype_and_attention_impl_settings():
  assert override(CONFIG, dtype=jnp.bfloat16).dtype == "bfloat16"
  for bad in (dict(dtype="int32"), dict(dtype="nonsense"), dict(attention_impl="flash")):
    with pytest.raises(ValueError):
      override(CONFIG, **bad)
