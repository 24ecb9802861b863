"""Downstream heads against a NumPy forward and constructed layouts; losses and metrics against
hand-computed values (derivations in the comments)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from anysat_jax.evaluators import metrics
from anysat_jax.models.config import encoder_config
from anysat_jax.models.encoder import AnySatEncoder
from anysat_jax.models.heads import (
  ClassificationHead,
  DenseHead,
  DownstreamModel,
  resize_logits,
  trainable_mask,
)
from anysat_jax.tasks.losses import downstream as ld
from input_pipeline.datasets import registry

# ---------------------------------------------------------------------------------------------
# Heads.


def _np_head(x, params):
  """LayerNorm (eps 1e-5, two-pass) + Linear in float64, over the last axis."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  x = (x - mu) / np.sqrt(var + 1e-5) * p["norm"]["scale"] + p["norm"]["bias"]
  return x @ p["linear"]["kernel"] + p["linear"]["bias"]


def test_classification_head_matches_numpy():
  x = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32) * 3 + 1
  head = ClassificationHead(5)
  params = head.init(jax.random.key(0), x)["params"]
  # Non-trivial LayerNorm affine so that it is checked too.
  params["norm"] = {"scale": jnp.linspace(0.5, 1.5, 16), "bias": jnp.linspace(-1, 1, 16)}
  out = head.apply({"params": params}, x)
  assert out.shape == (3, 5)
  np.testing.assert_allclose(out, _np_head(x, params), rtol=1e-5, atol=1e-5)
  # torch.nn.Linear init: kernel and bias within 1/sqrt(fan_in).
  bound = 16 ** -0.5
  assert np.abs(params["linear"]["kernel"]).max() <= bound
  assert 0 < np.abs(params["linear"]["bias"]).max() <= bound


def test_dense_head_matches_numpy_loops():
  b, h, w, d, k, q = 2, 3, 4, 8, 3, 2
  x = np.random.default_rng(1).normal(size=(b, h, w, d)).astype(np.float32)
  head = DenseHead(k, proj_size=q)
  params = head.init(jax.random.key(1), x)["params"]
  out = np.asarray(head.apply({"params": params}, x))
  assert out.shape == (b, h * q, w * q, k)
  y = _np_head(x, params)  # (b, h, w, q * q * k)
  ref = np.zeros_like(out, np.float64)
  for i in range(h):
    for j in range(w):
      for a in range(q):
        for c in range(q):
          for cls in range(k):
            ref[:, i * q + a, j * q + c, cls] = y[:, i, j, (a * q + c) * k + cls]
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_dense_head_channel_layout_on_constructed_params():
  """Kernel 0 and bias = arange(q^2 K): logit of class k at block pixel (a, b) is
  (a q + b) K + k (the FLAIR layout, class fastest), the same in every block."""
  k, q = 3, 2
  x = np.random.default_rng(2).normal(size=(1, 2, 2, 4)).astype(np.float32)
  head = DenseHead(k, proj_size=q)
  params = head.init(jax.random.key(0), x)["params"]
  params["linear"] = {"kernel": jnp.zeros((4, q * q * k)), "bias": jnp.arange(q * q * k) * 1.0}
  out = np.asarray(head.apply({"params": params}, x))
  block = np.array([[[0, 1, 2], [3, 4, 5]],
                    [[6, 7, 8], [9, 10, 11]]], np.float32)  # [a, b, class]
  np.testing.assert_array_equal(out[0], np.tile(block, (2, 2, 1)))


def test_dense_head_q1_is_per_pixel():
  x = np.random.default_rng(3).normal(size=(2, 4, 4, 6)).astype(np.float32)
  head = DenseHead(2)
  params = head.init(jax.random.key(0), x)["params"]
  out = head.apply({"params": params}, x)
  np.testing.assert_allclose(out, _np_head(x, params), rtol=1e-5, atol=1e-5)


def test_resize_logits():
  x = jnp.arange(2.0).reshape(1, 1, 2, 1) * jnp.ones((1, 2, 1, 1))  # rows [0, 1]
  assert resize_logits(x, (2, 2)) is x
  # Half-pixel centres: source positions -0.25, 0.25, 0.75, 1.25 -> 0, 0.25, 0.75, 1.
  out = resize_logits(x, (2, 4))
  np.testing.assert_allclose(out[0, :, :, 0], [[0, 0.25, 0.75, 1]] * 2, atol=1e-6)


@pytest.fixture(scope="module")
def tiny():
  cfg = encoder_config("tiny", modalities=("s2",), dim=64, depth=1, num_heads=4, spatial_depth=1,
                       spatial_heads=4)
  rng = np.random.default_rng(4)
  batch = {"s2": rng.normal(size=(2, 2, 10, 2, 2)).astype(np.float32),
           "s2_dates": np.array([[10, 200], [30, 90]], np.float32)}
  return AnySatEncoder(cfg), batch


def test_downstream_model_nests_the_standalone_encoder(tiny):
  encoder, batch = tiny
  model = DownstreamModel(encoder, DenseHead(3), output="dense", dense_modality="s2")
  shapes = jax.eval_shape(lambda k: model.init(k, batch, 10), jax.random.key(0))["params"]
  alone = jax.eval_shape(lambda k: encoder.init(k, batch, 10), jax.random.key(0))["params"]
  assert set(shapes) == {"encoder", "head"}
  assert jax.tree.structure(shapes["encoder"]) == jax.tree.structure(alone)
  assert jax.tree.map(np.shape, shapes["encoder"]) == jax.tree.map(np.shape, alone)
  # Any standalone encoder params dropped in under "encoder" give encoder -> head.
  rng = np.random.default_rng(5)
  fill = lambda tree: jax.tree.map(lambda a: rng.normal(0, 0.2, a.shape).astype(np.float32), tree)
  params = {"encoder": fill(alone), "head": fill(shapes["head"])}
  feats = jax.jit(encoder.apply, static_argnums=(2, 3, 4))(
      {"params": params["encoder"]}, batch, 10, "dense", "s2")
  out = jax.jit(model.apply, static_argnums=2)({"params": params}, batch, 10)
  assert out.shape == (2, 2, 2, 3)
  np.testing.assert_allclose(out, _np_head(feats, params["head"]), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="dense_modality"):
    DownstreamModel(encoder, DenseHead(3), output="dense").apply({"params": params}, batch, 10)


def test_trainable_mask_and_frozen_update():
  params = {"encoder": {"a": {"kernel": jnp.ones((2, 2))}, "cls_token": jnp.ones((1, 1, 2))},
            "head": {"linear": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}}
  lp = trainable_mask(params, "linear_probe")
  assert jax.tree.structure(lp) == jax.tree.structure(params)
  assert not any(jax.tree.leaves(lp["encoder"]))
  assert all(jax.tree.leaves(lp["head"]))
  assert all(jax.tree.leaves(trainable_mask(params, "finetune")))
  with pytest.raises(ValueError, match="mode"):
    trainable_mask(params, "lp")
  # The documented optax recipe leaves the encoder untouched (and decays nothing in it).
  labels = jax.tree.map(lambda t: "train" if t else "frozen", lp)
  tx = optax.multi_transform({"train": optax.adamw(0.1, weight_decay=0.5),
                              "frozen": optax.set_to_zero()}, labels)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  jax.tree.map(np.testing.assert_array_equal, new["encoder"], params["encoder"])
  assert not np.allclose(new["head"]["linear"]["kernel"], 1.0)


# ---------------------------------------------------------------------------------------------
# Losses.

LN2, LN3 = math.log(2), math.log(3)
# Rows: [0, 0, 0] label 0 -> log 3 = 1.098612;
#       [1, 0, 0] label 0 -> log(e + 2) - 1 = 0.551445;
#       [0, 0, ln 2] label 2 -> log(1 + 1 + 2) - ln 2 = ln 2 = 0.693147.
CE_LOGITS = np.array([[0, 0, 0], [1, 0, 0], [0, 0, LN2]], np.float32)
CE_ROWS = (LN3, math.log(math.e + 2) - 1, LN2)


def test_bce_loss():
  logits = np.array([[0, 2], [-1, 0]], np.float32)
  labels = np.array([[1, 0], [0, 1]], np.float32)
  # l(x, y) = log(1 + e^x) - x y: (0,1) ln 2; (2,0) ln(1 + e^2) = 2.126928;
  # (-1,0) ln(1 + e^-1) = 0.313262; (0,1) ln 2. Mean over B x C = 3.826484 / 4 = 0.956621.
  full = (2 * LN2 + math.log(1 + math.e ** 2) + math.log(1 + math.e ** -1)) / 4
  np.testing.assert_allclose(ld.bce_loss(logits, labels), full, rtol=1e-6)
  np.testing.assert_allclose(full, 0.956621, atol=1e-6)
  # Padded second row: mean over row 0 only = (0.693147 + 2.126928) / 2 = 1.410038.
  np.testing.assert_allclose(ld.bce_loss(logits, labels, np.array([1.0, 0.0])), 1.410038,
                             atol=1e-6)


def test_cross_entropy_hand_values():
  ce = lambda labels, **kw: float(ld.cross_entropy(CE_LOGITS, np.array(labels), **kw))
  a, b, c = CE_ROWS
  # Plain mean: (1.098612 + 0.551445 + 0.693147) / 3 = 0.781068.
  np.testing.assert_allclose(ce([0, 0, 2]), (a + b + c) / 3, rtol=1e-6)
  np.testing.assert_allclose(ce([0, 0, 2]), 0.781068, atol=1e-6)
  # Ignore -1 (row 1): (1.098612 + 0.693147) / 2 = 0.895880.
  np.testing.assert_allclose(ce([0, -1, 2], ignore_index=-1), 0.895880, atol=1e-6)
  # CrossEntropyWeighted (last class weight 0): row 2 drops, (a + b) / 2 = 0.825028.
  w = ld.last_class_void_weights(3)
  np.testing.assert_array_equal(w, [1, 1, 0])
  np.testing.assert_allclose(ce([0, 0, 2], class_weights=w), 0.825028, atol=1e-6)
  # Weights [2, 1, 1]: (2a + 2b + c) / (2 + 2 + 1) = 3.993262 / 5 = 0.798652.
  np.testing.assert_allclose(ce([0, 0, 2], class_weights=jnp.array([2.0, 1, 1])), 0.798652,
                             atol=1e-6)
  # Padded last row: (a + b) / 2.
  np.testing.assert_allclose(ce([0, 0, 2], mask=np.array([1, 1, 0])), 0.825028, atol=1e-6)
  # One-hot targets: the same plain mean.
  onehot = np.eye(3, dtype=np.float32)[[0, 0, 2]]
  np.testing.assert_allclose(ld.cross_entropy_onehot(CE_LOGITS, onehot), 0.781068, atol=1e-6)
  np.testing.assert_allclose(ld.cross_entropy_onehot(CE_LOGITS, onehot, np.array([1, 1, 0])),
                             0.825028, atol=1e-6)


def test_cross_entropy_maps_and_empty_batches():
  # (B=2, H=1, W=3, K=3) map: example 0 holds the three rows, example 1 is padding.
  logits = np.stack([CE_LOGITS[None], np.zeros((1, 3, 3), np.float32)])
  labels = np.array([[[0, -1, 2]], [[1, 1, 1]]])
  got = ld.cross_entropy(logits, labels, ignore_index=-1, mask=np.array([1.0, 0.0]))
  np.testing.assert_allclose(got, 0.895880, atol=1e-6)
  # Nothing counted: 0 with zero (finite) gradients.
  value_and_grad = jax.jit(jax.value_and_grad(lambda x, y: ld.cross_entropy(x, y, -1)))
  loss, grad = value_and_grad(jnp.asarray(logits), jnp.full((2, 1, 3), -1))
  assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0)


# ---------------------------------------------------------------------------------------------
# Metrics.


def _run(metric, batches, jit=True):
  update = jax.jit(metric.update) if jit else metric.update
  state = metric.init()
  for logits, labels, mask in batches:
    state = update(state, jnp.asarray(logits), jnp.asarray(labels), mask)
  return metric.compute(state)


def test_counts_carry_is_exact():
  state = metrics.Counts(jnp.array([2 ** 32 - 2], jnp.uint32), jnp.array([1], jnp.uint32))
  state = metrics.add(state, jnp.array([5]))
  assert metrics.value(state)[0] == 2 * 2 ** 32 + 3


def test_multilabel_f1():
  # Predictions = logit > 0.      pred       truth
  logits = np.array([[1, -1, 2, -1],     # 1 0 1 0    1 0 0 0
                     [-1, 1, -1, -1],    # 0 1 0 0    1 1 0 0
                     [1, 1, -1, -1],     # 1 1 0 0    0 1 0 0
                     [-1, -1, -1, -1],   # 0 0 0 0    0 0 0 0
                     [1, 1, 1, 1]],      # padded row (would add an FP to every class)
                    np.float32)
  labels = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
                    np.float32)
  mask = np.array([1, 1, 1, 1, 0], np.float32)
  # Class 0: TP 1, FP 1, FN 1 -> F1 2/4 = 0.5 (support 2); class 1: TP 2 -> F1 1 (support 2);
  # class 2: FP 1 -> F1 0 (support 0); class 3: empty -> 0 (support 0).
  # macro (0.5 + 1 + 0 + 0) / 4 = 0.375; weighted (0.5*2 + 1*2) / 4 = 0.75;
  # micro: TP 3, FP 2, FN 1 -> 6 / 9 = 0.666667.
  metric = metrics.multilabel_f1(4)
  for batches in ([(logits, labels, mask)],
                  [(logits[:2], labels[:2], mask[:2]), (logits[2:], labels[2:], mask[2:])]):
    out = _run(metric, batches)
    np.testing.assert_allclose(out["F1_per_class"], [0.5, 1, 0, 0])
    np.testing.assert_allclose(out["F1_Score_macro"], 0.375)
    np.testing.assert_allclose(out["F1_Score_weighted"], 0.75)
    np.testing.assert_allclose(out["F1_Score_micro"], 6 / 9)
  assert metric.compute(metric.init())["F1_Score_macro"] == 0.0   # a fresh state is a reset


def test_multiclass_f1_and_oa():
  preds, labels = [0, 2, 2, 1, 1, 0], np.array([0, 1, 2, 2, 1, 2])
  logits = np.eye(3, dtype=np.float32)[preds] * 2 - 1
  mask = np.array([1, 1, 1, 1, 1, 0], np.float32)       # last row padded
  # Confusion (rows truth): M[0,0]=1, M[1,2]=1, M[2,2]=1, M[2,1]=1, M[1,1]=1.
  # TP [1,1,1]; FP (col - TP) [0,1,1]; FN (row - TP) [0,1,1]; F1 [1, 0.5, 0.5];
  # macro 2/3; support [1,2,2] -> weighted (1 + 1 + 1) / 5 = 0.6; micro 6/10 = 0.6 = OA 3/5.
  for lab in (labels, np.eye(3, dtype=np.float32)[labels]):       # int or one-hot labels
    out = _run(metrics.multiclass_f1(3), [(logits, lab, mask)])
    np.testing.assert_allclose(out["F1_per_class"], [1, 0.5, 0.5])
    np.testing.assert_allclose(out["F1_Score_macro"], 2 / 3)
    np.testing.assert_allclose(out["F1_Score_weighted"], 0.6)
    np.testing.assert_allclose(out["F1_Score_micro"], 0.6)
    np.testing.assert_allclose(out["OA"], 0.6)


def _seg_logits(pred, k):
  return np.eye(k, dtype=np.float32)[np.asarray(pred)]


def test_segmentation_iou_pastis_convention():
  truth = np.array([[[0, 0, 1, 1], [2, 3, 1, 0]],
                    [[1, 1, 1, 1], [1, 1, 1, 1]]])          # example 1 is padding
  pred = np.array([[[0, 1, 1, 1], [2, 2, 3, 0]],
                   [[0, 0, 0, 0], [0, 0, 0, 0]]])
  mask = np.array([1, 0], np.float32)
  batch = [(_seg_logits(pred, 4), truth, mask)]
  # Pairs (t, p): (0,0) (0,1) (1,1) (1,1) (2,2) (3,2) (1,3) (0,0).
  # Last class dropped: (3,2) and (1,3) vanish; M[0,0]=2, M[0,1]=1, M[1,1]=2, M[2,2]=1.
  # IoU: c0 2/(2+0+1) = 2/3; c1 2/(2+1+0) = 2/3; c2 1; c3 0/0 = NaN.
  # mIoU = (2/3 + 2/3 + 1) / 3 = 7/9 = 0.777778; acc = 5/6 = 0.833333.
  out = _run(metrics.segmentation_iou(4, drop_last_class=True), batch)
  np.testing.assert_allclose(out["IoU_per_class"], [2 / 3, 2 / 3, 1, np.nan])
  np.testing.assert_allclose(out["mIoU"], 7 / 9)
  np.testing.assert_allclose(out["acc"], 5 / 6)
  assert out["confusion"][3, 2] == 1 and out["confusion"].sum() == 8
  # Ignoring label 3 instead keeps the pixel predicted as 3 (an FP of class 3):
  # c1: TP 2, FP 1, FN 1 -> 0.5; c3: 0/(0+1+0) = 0; mIoU = (2/3 + 0.5 + 1 + 0) / 4 = 0.541667;
  # acc = 5/7 = 0.714286.
  out = _run(metrics.segmentation_iou(4, drop_last_class=False, ignore_index=3), batch)
  np.testing.assert_allclose(out["IoU_per_class"], [2 / 3, 0.5, 1, 0])
  np.testing.assert_allclose(out["mIoU"], (2 / 3 + 1.5) / 4)
  np.testing.assert_allclose(out["acc"], 5 / 7)


def test_change_iou_is_dataset_level():
  truth = np.array([[[0, 1, 1]], [[0, 0, 1]]])
  pred = np.array([[[1, 1, 0]], [[0, 0, 1]]])
  # Class 1 over both examples: TP 2, FP 1 (t0 p1), FN 1 (t1 p0) -> 2/4 = 0.5 (a per-batch
  # average of batch 1 (1/3) and batch 2 (1/1) would give 0.667).
  batches = [(_seg_logits(pred[i:i + 1], 2), truth[i:i + 1], None) for i in range(2)]
  out = _run(metrics.change_iou(), batches, jit=False)
  np.testing.assert_allclose(out["IoU"], 0.5)
  np.testing.assert_allclose(out["IoU_per_class"], [2 / 4, 0.5])   # class 0: TP 2, FP 1, FN 1


def test_sickle_jaccard_macro():
  truth = np.array([[[0, 0, -1], [1, 1, 0]]])
  pred = np.array([[[0, 1, 1], [1, 0, 0]]])
  # Without the -1 pixel: M[0,0]=2, M[0,1]=1, M[1,1]=1, M[1,0]=1.
  # IoU0 = 2/(2+1+1) = 0.5; IoU1 = 1/(1+1+1) = 1/3; macro = 0.416667.
  out = _run(metrics.jaccard_macro(2, ignore_index=-1), [(_seg_logits(pred, 2), truth, None)])
  np.testing.assert_allclose(out["IoU"], (0.5 + 1 / 3) / 2)
  # A class absent from truth and prediction has no weight: IoU = IoU0 = 1.
  out = _run(metrics.jaccard_macro(2), [(_seg_logits([[0, 0]], 2), np.array([[0, -1]]), None)])
  np.testing.assert_allclose(out["IoU"], 1.0)


def test_seg_pangaea():
  truth = np.array([[0, 0, 1, 1, -1]])
  pred = np.array([[0, 1, 1, 1, 0]])
  # Without the -1 pixel: M[0,0]=1, M[0,1]=1, M[1,1]=2. inter [1, 2]; truth counts [2, 2];
  # predicted counts [1, 3]; union [2, 3] -> IoU [0.5, 0.666667] (1e-6 guards);
  # precision [1, 2/3], recall [0.5, 1] -> F1 [2*0.5/1.5, 2*(2/3)/(5/3)] = [0.666667, 0.8];
  # mIoU 0.583333, mF1 0.733333, mAcc 3/4.
  batch = [(_seg_logits(pred, 2), truth, None)]
  out = _run(metrics.seg_pangaea(2), batch)
  np.testing.assert_allclose(out["mIoU"], 0.583333, rtol=1e-5)
  np.testing.assert_allclose(out["mF1"], 0.733333, rtol=1e-5)
  np.testing.assert_allclose(out["mAcc"], 0.75, rtol=1e-5)
  # With a third, absent class its 0 IoU counts in the plain mean: (0.5 + 0.666667 + 0) / 3.
  out = _run(metrics.seg_pangaea(3), [(_seg_logits(pred, 3), truth, None)])
  np.testing.assert_allclose(out["mIoU"], 0.388889, rtol=1e-5)


# Monitored metrics of the paper's experiments (spec B.7).
MONITORS = {"treesatai_ts": "F1_Score_weighted", "pastis_hd_cls": "F1_Score_macro",
            "pastis_hd": "mIoU", "flair": "mIoU", "planted": "F1_Score_macro",
            "bradd_s1ts": "IoU", "sickle": "IoU", "timesen2crop": "OA", "sen1floods11": "mIoU"}


def test_metric_registry():
  assert set(metrics.TASKS) == set(MONITORS)
  for task, monitor in MONITORS.items():
    metric = metrics.metric_for(task)
    assert metric.monitor == monitor, task
    assert metric.num_classes == registry.get_spec(task).label.num_classes, task
  for exp, task in metrics.EXPERIMENTS.items():
    assert metrics.metric_for(exp).monitor == MONITORS[task], exp
  assert metrics.metric_for("pastis_hd").compute(metrics.metric_for("pastis_hd").init())[
      "confusion"].shape == (20, 20)
  with pytest.raises(ValueError, match="no metric"):
    metrics.metric_for("imagenet")
