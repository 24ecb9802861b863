"""Predictor against an explicit NumPy forward; JEPA and contrastive losses against slow loops
and hand-computed cases."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anysat_jax.models import pos_embed
from anysat_jax.models.predictor import Predictor
from anysat_jax.tasks.losses import pretrain as losses
from anysat_jax.tools.parity import rel_l2

E, P, DEPTH, HEADS = 64, 32, 2, 4
SIDE, SCALE = 4, 2


@pytest.fixture(scope="module")
def predictor():
  model = Predictor(dim=P, depth=DEPTH, num_heads=HEADS)
  rng = np.random.default_rng(0)
  z = rng.normal(size=(2, 3, E)).astype(np.float32)
  ctx = np.array([[0, 5, 9], [2, 3, 15]], np.int32)
  tgt = rng.integers(0, SIDE * SIDE, (4, 2, 5)).astype(np.int32)
  params = model.init(jax.random.key(0), z, ctx, tgt, SIDE, SCALE)["params"]
  return model, jax.tree.map(np.asarray, params)


def _ln(x, p, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _dense(x, p):
  return x @ p["kernel"] + p["bias"]


def _np_predictor(params, z, ctx_idx, tgt_idx, tgt_valid=None):
  """One sequence per (target block, sample), written out with loops; float64."""
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  pe = pos_embed.sincos_grid(P, SIDE, SCALE, 0).astype(np.float64)
  erf = np.vectorize(math.erf)
  t, b, k_tgt = tgt_idx.shape
  out = np.zeros((t, b, k_tgt, E))
  for j in range(t):
    for i in range(b):
      x = _dense(z[i].astype(np.float64), params["embed"]) + pe[ctx_idx[i]]
      q = params["mask_token"] + pe[tgt_idx[j, i]]
      s = np.concatenate([params["pred_cls"][None], x, q])
      keep = np.ones(len(s), bool)
      if tgt_valid is not None:
        keep[-k_tgt:] = tgt_valid[j, i]
      for d in range(DEPTH):
        blk = params[f"block_{d}"]
        h = _ln(s, blk["norm1"])
        qkv = _dense(h, blk["attn"]["qkv"]).reshape(len(s), 3, HEADS, P // HEADS)
        heads = []
        for hh in range(HEADS):
          qq, kk, vv = qkv[:, 0, hh], qkv[:, 1, hh], qkv[:, 2, hh]
          logit = qq @ kk.T / math.sqrt(P // HEADS)
          logit[:, ~keep] = -np.inf
          a = np.exp(logit - logit.max(1, keepdims=True))
          heads.append((a / a.sum(1, keepdims=True)) @ vv)
        s = s + _dense(np.concatenate(heads, 1), blk["attn"]["proj"])
        h = _dense(_ln(s, blk["norm2"]), blk["mlp"]["fc1"])
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
        s = s + _dense(h, blk["mlp"]["fc2"])
      out[j, i] = _dense(_ln(s, params["norm"])[-k_tgt:], params["proj_out"])
  return out


def _random_params(params, seed):
  """Every leaf random (zero-init tokens / biases would hide indexing errors)."""
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  new = [rng.normal(size=x.shape).astype(np.float32) * (0.3 if x.ndim else 1.0) for x in leaves]
  return treedef.unflatten(new)


def test_predictor_matches_numpy(predictor):
  model, params = predictor
  params = _random_params(params, 1)
  rng = np.random.default_rng(2)
  z = rng.normal(size=(2, 3, E)).astype(np.float32)
  ctx = np.array([[0, 5, 9], [2, 3, 15]], np.int32)
  tgt = rng.integers(0, SIDE * SIDE, (4, 2, 5)).astype(np.int32)
  valid = rng.random((4, 2, 5)) > 0.3
  valid[..., 0] = True
  y = model.apply({"params": params}, z, ctx, tgt, SIDE, SCALE)
  assert y.shape == (4, 2, 5, E)
  assert rel_l2(np.asarray(y), _np_predictor(params, z, ctx, tgt)) < 1e-5
  y = model.apply({"params": params}, z, ctx, tgt, SIDE, SCALE, valid)
  assert rel_l2(np.asarray(y), _np_predictor(params, z, ctx, tgt, valid)) < 1e-5
  # Positions index the grid table directly: patch 0 gets pe[0] (not zeros), as a shifted
  # (off-by-one) table would not.
  pe = pos_embed.sincos_grid(P, SIDE, SCALE, 0)
  assert np.abs(pe[0]).sum() > 0 and np.all(pe[0] == pos_embed.sincos_grid(P, SIDE, SCALE, 1)[1])


def test_predictor_padding_is_invisible(predictor):
  """Valid outputs do not depend on the padded queries (count or index)."""
  model, params = predictor
  params = _random_params(params, 3)
  rng = np.random.default_rng(4)
  z = rng.normal(size=(2, 3, E)).astype(np.float32)
  ctx = np.array([[1, 2, 3], [4, 8, 12]], np.int32)
  tgt = rng.integers(0, SIDE * SIDE, (4, 2, 3)).astype(np.int32)
  base = np.asarray(model.apply({"params": params}, z, ctx, tgt, SIDE, SCALE))
  pad = rng.integers(0, SIDE * SIDE, (4, 2, 4)).astype(np.int32)
  padded = np.concatenate([tgt, pad], axis=2)
  valid = np.arange(7) < 3
  valid = np.broadcast_to(valid, (4, 2, 7))
  y = model.apply({"params": params}, z, ctx, padded, SIDE, SCALE, valid)
  np.testing.assert_allclose(np.asarray(y)[:, :, :3], base, rtol=1e-5, atol=1e-5)


def test_predictor_init(predictor):
  model, params = predictor
  assert not np.any(params["pred_cls"])
  assert abs(params["mask_token"].std() - 0.02) < 0.008
  biases = [v for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
            if path[-1].key == "bias" and "norm" not in str(path)]
  assert biases and all(not np.any(b) for b in biases)
  big = Predictor(dim=128, depth=3, num_heads=4)
  p = big.init(jax.random.key(1), jnp.zeros((1, 2, E)), jnp.zeros((1, 2), jnp.int32),
               jnp.zeros((4, 1, 3), jnp.int32), SIDE, SCALE)["params"]
  np.testing.assert_allclose(p["block_0"]["attn"]["qkv"]["kernel"].std(), 0.02, rtol=0.03)
  np.testing.assert_allclose(p["embed"]["kernel"].std(), 0.02, rtol=0.05)
  for i in range(3):
    want = 0.02 / math.sqrt(2 * (i + 1))
    np.testing.assert_allclose(p[f"block_{i}"]["attn"]["proj"]["kernel"].std(), want, rtol=0.05)
    np.testing.assert_allclose(p[f"block_{i}"]["mlp"]["fc2"]["kernel"].std(), want, rtol=0.05)
    np.testing.assert_allclose(p[f"block_{i}"]["mlp"]["fc1"]["kernel"].std(), 0.02, rtol=0.05)


def test_predictor_norm_eps(predictor):
  model, params = predictor
  seen = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(context.module, nn.LayerNorm):
      seen.append((context.module.epsilon, context.module.use_fast_variance))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply({"params": params}, jnp.zeros((1, 3, E)), jnp.zeros((1, 3), jnp.int32),
                jnp.zeros((4, 1, 2), jnp.int32), SIDE, SCALE)
  assert len(seen) == 2 * DEPTH + 1 and set(seen) == {(1e-5, False)}


# ----------------------------------------------------------------------------------- losses


def _np_jepa(pred, target, valid, kind, beta):
  total, count = 0.0, 0
  for idx in np.ndindex(*valid.shape):
    if not valid[idx]:
      continue
    for d in pred[idx].astype(np.float64) - target[idx]:
      if kind == "l2":
        total += d * d
      else:
        total += 0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta
      count += 1
  return total / count


@pytest.mark.parametrize("kind,beta", [("smooth_l1", 1.0), ("smooth_l1", 0.3), ("l2", 1.0)])
def test_jepa_loss_matches_loop(kind, beta):
  rng = np.random.default_rng(0)
  pred = rng.normal(size=(4, 2, 5, 6)).astype(np.float32) * 1.5
  target = rng.normal(size=(4, 2, 5, 6)).astype(np.float32)
  valid = rng.random((4, 2, 5)) > 0.4
  got = float(losses.jepa_loss(pred, target, valid, kind, beta))
  want = _np_jepa(pred, target, valid, kind, beta)
  assert abs(got - want) / abs(want) < 1e-6
  all_valid = float(losses.jepa_loss(pred, target, None, kind, beta))
  assert abs(all_valid - _np_jepa(pred, target, np.ones((4, 2, 5), bool), kind, beta)) < 1e-6


def test_jepa_loss_hand_case():
  pred = np.array([0.5, 2.0, -3.0, 9.0], np.float32).reshape(1, 1, 2, 2)
  target = np.zeros_like(pred)
  valid = np.array([[[True, False]]])
  # Huber(0.5) = 0.125, Huber(2) = 1.5; the second token is padding.
  assert float(losses.jepa_loss(pred, target, valid)) == pytest.approx(0.8125, abs=1e-7)
  assert float(losses.jepa_loss(pred, target, valid, "l2")) == pytest.approx(2.125, abs=1e-7)
  assert float(losses.jepa_loss(pred, target, np.zeros((1, 1, 2), bool))) == 0.0
  with pytest.raises(ValueError, match="kind"):
    losses.jepa_loss(pred, target, valid, "l1")


def test_target_tokens():
  rng = np.random.default_rng(0)
  h = (rng.normal(size=(3, 9, 8)) * 2 + 1).astype(np.float32)
  idx = rng.integers(0, 9, (4, 3, 5)).astype(np.int32)
  got = np.asarray(losses.target_tokens(h, idx))
  want = np.zeros((4, 3, 5, 8))
  for t, b, k in np.ndindex(4, 3, 5):
    v = h[b, idx[t, b, k]].astype(np.float64)
    want[t, b, k] = (v - v.mean()) / np.sqrt(v.var() + 1e-5)
  assert got.shape == (4, 3, 5, 8) and got.dtype == np.float32
  assert rel_l2(got, want) < 1e-6
  grad = jax.grad(lambda x: losses.target_tokens(x, idx).sum())(jnp.asarray(h))
  assert not np.any(np.asarray(grad))


def _np_contrastive(tokens, valid, tau):
  """The MIL-NCE written per anchor with explicit candidate lists; float64."""
  f = tokens.astype(np.float64)
  m, b, n, _ = f.shape
  valid = np.ones((m, b, n), bool) if valid is None else valid

  def cos(u, v):
    return float(u @ v) / max(np.linalg.norm(u) * np.linalg.norm(v), 1e-8)

  total = 0.0
  for a in np.ndindex(m, b, n):
    if not valid[a]:
      continue
    den = [cos(f[a], f[c]) / tau for c in np.ndindex(m, b, n)
           if (c[0], c[1]) != (a[0], a[1]) and valid[c]]
    num = [cos(f[a], f[k, a[1], a[2]]) / tau for k in range(m)
           if k != a[0] and valid[k, a[1], a[2]]]
    if den:
      total += math.log(sum(math.exp(x) for x in den))
    if num:
      total -= math.log(sum(math.exp(x) for x in num))
  return total / (m * b * n)


@pytest.mark.parametrize("masked", [False, True])
def test_contrastive_matches_loop(masked):
  rng = np.random.default_rng(1)
  tokens = rng.normal(size=(3, 2, 4, 8)).astype(np.float32)
  tokens[1, 0, 2] = tokens[0, 0, 2] + 0.1 * tokens[1, 0, 2]         # a close positive
  valid = None
  if masked:
    valid = rng.random((3, 2, 4)) > 0.3
    valid[:, 1, 1] = [True, False, False]                         # an anchor with no positive
  for tau in (0.1, 0.5):
    got = float(losses.contrastive_loss(tokens, valid, tau))
    want = _np_contrastive(tokens, valid, tau)
    assert abs(got - want) / abs(want) < 1e-6, (got, want)
  # Cosine similarity: scaling tokens changes nothing.
  scaled = float(losses.contrastive_loss(tokens * 3.0, valid, 0.1))
  assert scaled == pytest.approx(float(losses.contrastive_loss(tokens, valid, 0.1)), rel=1e-6)


def test_contrastive_hand_cases():
  e1, e2 = np.eye(2, dtype=np.float32)
  # tau = 1 (tau = 0.1 would lose the answer to cancellation in float32).
  # M = 2, B = 1, N = 2, orthogonal patches: each anchor log(e^1 + e^0) - 1.
  tokens = np.stack([np.stack([e1, e2]), np.stack([e1, e2])])[:, None]   # (2, 1, 2, 2)
  got = float(losses.contrastive_loss(tokens, tau=1.0))
  assert got == pytest.approx(math.log1p(math.exp(-1)), rel=1e-6)
  # With validity: (1, 0, 1) invalid; anchor (0, 0, 1) = diagonal has no positive and
  # contributes its denominator cos45 only.
  d = np.array([1, 1], np.float32) / np.sqrt(2)
  tokens = np.stack([np.stack([e1, d]), np.stack([e1, e2])])[:, None]
  valid = np.array([[[True, True]], [[True, False]]])
  c = 1 / math.sqrt(2)
  want = (0.0 + c + math.log1p(math.exp(c - 1))) / 4
  assert float(losses.contrastive_loss(tokens, valid, 1.0)) == pytest.approx(want, rel=1e-6)
  # One modality: no positives, defined as 0.
  assert float(losses.contrastive_loss(tokens[:1])) == 0.0


def test_contrastive_gradients_finite_with_invalid_tokens():
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.normal(size=(2, 2, 3, 4)).astype(np.float32))
  valid = np.ones((2, 2, 3), bool)
  valid[1] = False                                          # modality 1 entirely invalid
  valid[0, 0] = False
  g = jax.jit(jax.grad(lambda x: losses.contrastive_loss(x, valid)))(tokens)
  assert np.all(np.isfinite(np.asarray(g)))
  assert not np.any(np.asarray(g)[1]) and not np.any(np.asarray(g)[0, 0])
  valid[:] = False
  assert float(losses.contrastive_loss(tokens, valid)) == 0.0
