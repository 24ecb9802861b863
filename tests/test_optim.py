"""AdamW with skipped parameters against a NumPy transcription of torch.optim.AdamW; the EMA
teacher and its schedule against hand computation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from anysat_jax.tasks import optim


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"encoder": {"proj_a": rng.normal(size=(3, 4)).astype(np.float32),
                      "proj_b": rng.normal(size=(5,)).astype(np.float32),
                      "pad": np.float32(0.3)},
          "predictor": {"w": rng.normal(size=(2, 2)).astype(np.float32)},
          "mask_token": rng.normal(size=(4,)).astype(np.float32)}


def _torch_adamw(params, grads, state, lr, b1, b2, eps, wd):
  """``torch.optim.AdamW.step`` (single-tensor path) for flat dicts; grad None = skipped.

  Scalars (bias corrections, step size) in Python double, tensors in float32, as PyTorch.
  """
  out = {}
  for name, p in params.items():
    g = grads[name]
    if g is None:
      out[name] = p
      continue
    st = state.setdefault(name, {"step": 0, "m": np.zeros_like(p), "v": np.zeros_like(p)})
    st["step"] += 1
    p = p * np.float32(1 - lr * wd)
    st["m"] = np.float32(b1) * st["m"] + np.float32(1 - b1) * g
    st["v"] = np.float32(b2) * st["v"] + np.float32(1 - b2) * g * g
    bc1, bc2 = 1 - b1 ** st["step"], 1 - b2 ** st["step"]
    denom = np.sqrt(st["v"]) / np.float32(math.sqrt(bc2)) + np.float32(eps)
    out[name] = (p - np.float32(lr / bc1) * st["m"] / denom).astype(np.float32)
  return out


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


# Per step: which top-level groups / leaves are used (pad: only some datasets have masks).
USED = [
    {"encoder": {"proj_a": True, "proj_b": False, "pad": False}, "predictor": True,
     "mask_token": True},
    {"encoder": {"proj_a": False, "proj_b": True, "pad": True}, "predictor": True,
     "mask_token": True},
    {"encoder": {"proj_a": True, "proj_b": True, "pad": False}, "predictor": True,
     "mask_token": True},
    {"encoder": {"proj_a": True, "proj_b": False, "pad": False}, "predictor": True,
     "mask_token": False},
    {"encoder": True, "predictor": True, "mask_token": True},          # a prefix tree
    {"encoder": {"proj_a": True, "proj_b": True, "pad": True}, "predictor": True,
     "mask_token": True},
]


@pytest.mark.parametrize("schedule", [False, True])
def test_adamw_skip_unused_matches_torch(schedule):
  b1, b2, eps, wd = 0.9, 0.999, 1e-8, 0.05
  lrs = [1e-2, 5e-3, 1e-2, 2e-3, 1e-2, 4e-3] if schedule else [1e-2] * 6
  lr = (lambda step: jnp.asarray(lrs)[step]) if schedule else 1e-2
  tx = optim.adamw_skip_unused(lr, b1, b2, eps, wd)
  params = jax.tree.map(jnp.asarray, _params())
  state = tx.init(params)
  ref_params, ref_state = _flat(params), {}
  rng = np.random.default_rng(1)
  for step, used in enumerate(USED):
    grads = jax.tree.map(lambda p: rng.normal(size=np.shape(p)).astype(np.float32), params)
    used_flat = _flat(jax.tree.broadcast(used, grads))
    old_params, old_state = _flat(params), jax.tree.map(np.asarray, state)
    step_fn = jax.jit(lambda g, s, p, used=used: tx.update(g, s, p, used=used))  # one per pattern
    updates, state = step_fn(grads, state, params)
    params = optax.apply_updates(params, updates)
    flat_g = _flat(grads)
    ref_params = _torch_adamw(
        ref_params, {k: flat_g[k] if used_flat[k] else None for k in flat_g}, ref_state,
        lrs[step], b1, b2, eps, wd)
    got = _flat(params)
    for k in got:
      if used_flat[k]:
        np.testing.assert_allclose(got[k], ref_params[k], rtol=2e-6, atol=1e-7, err_msg=k)
      else:                                  # skipped entirely: bitwise unchanged
        np.testing.assert_array_equal(got[k], old_params[k], err_msg=k)
    for part in ("count", "mu", "nu"):
      new, old = _flat(getattr(state, part)), _flat(getattr(old_state, part))
      for k in new:
        if not used_flat[k]:
          np.testing.assert_array_equal(new[k], old[k], err_msg=(part, k))
    counts = _flat(state.count)
    for k in counts:
      assert counts[k] == ref_state.get(k, {"step": 0})["step"], k
      if k in ref_state:
        np.testing.assert_allclose(_flat(state.mu)[k], ref_state[k]["m"], rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(_flat(state.nu)[k], ref_state[k]["v"], rtol=1e-6, atol=1e-10)
  assert int(state.step) == len(USED)
  # Leaves in key order pad, proj_a, proj_b, mask_token, w: skipped 3, 1, 2, 1, 0 times.
  assert [int(c) for c in jax.tree.leaves(state.count)] == [3, 5, 4, 5, 6]


def test_used_as_traced_arrays_matches_static():
  tx = optim.adamw_skip_unused(1e-2)
  params = jax.tree.map(jnp.asarray, _params(2))
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
  used = jax.tree.broadcast(USED[0], params)
  state = tx.init(params)
  static_upd, static_state = tx.update(grads, state, params, used=used)
  traced = jax.jit(tx.update)(grads, state, params, used=jax.tree.map(jnp.asarray, used))
  for a, b in zip(jax.tree.leaves((static_upd, static_state)), jax.tree.leaves(traced),
                  strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0)
  # used=None: every leaf steps.
  upd, st = tx.update(grads, state, params)
  assert all(int(c) == 1 for c in jax.tree.leaves(st.count))
  assert all(np.all(np.asarray(u) != 0) for u in jax.tree.leaves(upd))


def test_inject_learning_rate():
  """The learning rate can live in the state (ReduceLROnPlateau); it scales the whole update."""
  tx = optax.inject_hyperparams(optim.adamw_skip_unused,
                                static_args=("b1", "b2", "eps", "weight_decay"))(1e-2)
  params = jax.tree.map(jnp.asarray, _params(4))
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, used=USED[0]))
  upd, _ = step(grads, state, params)
  state.hyperparams["learning_rate"] = jnp.asarray(1e-3)
  upd_small, _ = step(grads, state, params)
  for a, b in zip(jax.tree.leaves(upd), jax.tree.leaves(upd_small), strict=True):
    np.testing.assert_allclose(np.asarray(b), 0.1 * np.asarray(a), rtol=1e-5)


def test_ema_schedule():
  sched = optim.ema_momentum_schedule(1000)
  for i, want in ((0, 0.996), (250, 0.997), (500, 0.998), (1000, 1.0), (1500, 1.0)):
    assert float(sched(i)) == pytest.approx(want, abs=1e-7)
  sched = optim.ema_momentum_schedule(10, start=0.5, end=0.9)
  assert float(sched(5)) == pytest.approx(0.7, abs=1e-7)


def test_ema_teacher_in_chain():
  """Teacher = EMA of the pre-update encoder params, over every encoder leaf, used or not."""
  lr, m0, m1 = 0.1, 0.5, 0.9
  tx = optax.chain(optim.adamw_skip_unused(lr, weight_decay=0.0),
                   optim.ema_teacher(lambda i: jnp.where(i == 0, m0, m1), select="encoder"))
  params = jax.tree.map(jnp.asarray, _params(3))
  state = tx.init(params)
  teacher = jax.tree.map(np.asarray, optim.teacher_params(state))
  assert set(optim.teacher_params(state)) == {"proj_a", "proj_b", "pad"}
  grads = jax.tree.map(jnp.ones_like, params)
  history = [jax.tree.map(np.asarray, params["encoder"])]
  used_steps = [USED[0], {**USED[0], "encoder": False}, USED[1]]
  for used in used_steps:
    updates, state = tx.update(grads, state, params, used=used)
    params = optax.apply_updates(params, updates)
    history.append(jax.tree.map(np.asarray, params["encoder"]))
  # Step 0: the teacher starts equal to the student, so it is unchanged.
  # Step 1 uses momentum m1 and the params after step 0, step 2 those after step 1.
  want = teacher
  for i in range(3):
    m = m0 if i == 0 else m1
    want = jax.tree.map(lambda t, p, m=m: np.float32(m) * t + np.float32(1 - m) * p,
                        want, history[i])
  got = optim.teacher_params(state)
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-6, atol=1e-7, err_msg=k)
  # proj_a moved only at step 0 (unused at steps 1, 2), yet the teacher keeps following it.
  assert not np.allclose(history[1]["proj_a"], history[0]["proj_a"])
  np.testing.assert_array_equal(history[3]["proj_a"], history[1]["proj_a"])
  assert not np.allclose(np.asarray(got["proj_a"]), teacher["proj_a"])
  # The teacher buffers are copies, not the parameter buffers.
  state0 = tx.init(params)
  assert optim.teacher_params(state0)["proj_a"] is not params["encoder"]["proj_a"]
  with pytest.raises(ValueError, match="params"):
    tx.update(grads, state, None)


def test_ema_teacher_hand_values():
  tx = optim.ema_teacher(optim.ema_momentum_schedule(4, start=0.5, end=1.0))
  params = {"w": jnp.array([0.0, 4.0])}
  state = tx.init({"w": jnp.array([2.0, 2.0])})
  upd, state = tx.update({"w": jnp.ones(2)}, state, params)
  np.testing.assert_array_equal(np.asarray(upd["w"]), [1.0, 1.0])          # passthrough
  np.testing.assert_allclose(np.asarray(state.teacher["w"]), [1.0, 3.0])   # m = 0.5
  _, state = tx.update({"w": jnp.ones(2)}, state, params)
  np.testing.assert_allclose(np.asarray(state.teacher["w"]), [0.625, 3.375])  # m = 0.625
  assert int(state.count) == 2
  with pytest.raises(ValueError, match="one EmaTeacherState"):
    optim.teacher_params((state, state))
