"""The k-NN monitor: exact results on synthetic features (clusters, chance, hand-computed cases)
and its batches read from a prepared sample through the input pipeline. Host only."""

from __future__ import annotations

import numpy as np
import pytest

from anysat_jax.evaluators import knn
from configs.common import default_dataset_config
from input_pipeline import builders, prepare


def _clusters(rng, n_per, num_classes, dim=16, spread=0.05):
  """Well-separated clusters: orthogonal centres plus small noise; labels = cluster index."""
  centres = np.eye(dim)[:num_classes] * 10.0
  labels = np.repeat(np.arange(num_classes), n_per)
  return centres[labels] + spread * rng.standard_normal((len(labels), dim)), labels


def test_separated_clusters_are_perfect():
  rng = np.random.default_rng(0)
  x_tr, y_tr = _clusters(rng, 30, 5)
  x_va, y_va = _clusters(rng, 10, 5)
  pred = knn.predict(x_tr, y_tr, x_va, kind="multiclass", num_classes=5, k=20)
  np.testing.assert_array_equal(pred, y_va)
  assert knn.scores(y_va, pred, kind="multiclass", num_classes=5) == {
      "accuracy": 1.0, "f1_weighted": 1.0}
  # Multi-label: each cluster carries a fixed label set.
  sets = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 1], [1, 1, 1]])
  pred = knn.predict(x_tr, sets[y_tr], x_va, kind="multilabel", num_classes=3)
  np.testing.assert_array_equal(pred, sets[y_va])
  assert knn.scores(sets[y_va], pred, kind="multilabel", num_classes=3) == {
      "accuracy": 1.0, "f1_weighted": 1.0, "f1_micro": 1.0}


def test_random_labels_give_chance():
  """Labels independent of the features: accuracy ~ 1/C (4 classes: 0.25 ± 0.03 at 2000)."""
  rng = np.random.default_rng(1)
  x_tr, x_va = rng.standard_normal((4000, 32)), rng.standard_normal((2000, 32))
  y_tr, y_va = rng.integers(0, 4, 4000), rng.integers(0, 4, 2000)
  pred = knn.predict(x_tr, y_tr, x_va, kind="multiclass", num_classes=4, k=20)
  s = knn.scores(y_va, pred, kind="multiclass", num_classes=4)
  assert abs(s["accuracy"] - 0.25) < 0.03 and abs(s["f1_weighted"] - 0.25) < 0.04, s


def test_hand_computed_vote():
  """Query (1, 0.2); train (1, 0) c0, (0, 1) c1, (1, 1) c1, (-1, 0) c2. Cosines: 0.981, 0.196,
  0.832, -0.981. k=3: c0, c1, c1 → 1 (majority). k=2: c0 and c1 tie 1-1, summed similarity
  0.981 > 0.832 → 0. k=20 is capped at the 4 train rows: c1 has 2 votes → 1."""
  train = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
  labels = np.array([0, 1, 1, 2])
  q = np.array([[1.0, 0.2]])
  idx, sim = knn.cosine_neighbours(train, q, 20)
  np.testing.assert_array_equal(idx, [[0, 2, 1, 3]])
  n = np.hypot(1.0, 0.2)
  np.testing.assert_allclose(sim, [[1 / n, 1.2 / (n * np.sqrt(2)), 0.2 / n, -1 / n]], rtol=1e-12)
  for k, want in ((3, 1), (2, 0), (20, 1), (1, 0)):
    assert knn.predict(train, labels, q, kind="multiclass", num_classes=3, k=k)[0] == want, k
  # Multi-label: a class is present iff at least half of the k neighbours have it. k=3 (rows
  # 0, 2, 1): shares 2/3, 2/3, 1/3; k=2 (rows 0, 2): 1, 1/2, 1/2; k=1: row 0.
  multi = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [1, 1, 1]])
  np.testing.assert_array_equal(
      knn.predict(train, multi, q, kind="multilabel", num_classes=3, k=3), [[1, 1, 0]])
  np.testing.assert_array_equal(
      knn.predict(train, multi, q, kind="multilabel", num_classes=3, k=2), [[1, 1, 1]])
  np.testing.assert_array_equal(
      knn.predict(train, multi, q, kind="multilabel", num_classes=3, k=1), [[1, 0, 1]])


def test_hand_computed_scores():
  """true 0 0 1 2, pred 0 1 1 1: F1 c0 = 2/3 (support 2), c1 = 1/2 (1), c2 = 0 (1) →
  weighted (4/3 + 1/2) / 4 = 11/24; accuracy 1/2."""
  s = knn.scores(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), kind="multiclass",
                 num_classes=3)
  assert s["accuracy"] == 0.5 and s["f1_weighted"] == pytest.approx(11 / 24, rel=1e-12)
  # Multi-label: class 0 tp 1 fn 1 → 2/3 (support 2); class 1 tp 1 fp 1 → 2/3 (support 1);
  # class 2 no positive at all → 0 (support 0). Weighted 2/3; micro 2*2 / (3 + 3) = 2/3;
  # exact match: rows 0 and 2 of 3.
  true = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
  pred = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0]])
  s = knn.scores(true, pred, kind="multilabel", num_classes=3)
  assert s == pytest.approx({"accuracy": 2 / 3, "f1_weighted": 2 / 3, "f1_micro": 2 / 3})


def test_evaluate_drops_padding_rows_and_checks_features():
  """``example_mask`` 0 rows (padding of evaluation batches) are neither neighbours nor
  queries: here they would out-vote the real rows."""
  rng = np.random.default_rng(2)
  x_tr, y_tr = _clusters(rng, 6, 2, dim=4)
  x_va, y_va = _clusters(rng, 3, 2, dim=4)

  def batch(x, y, pad):
    # Padding rows: class-0 labels with class-1 features.
    xp = np.concatenate([x, np.tile(np.eye(4)[1] * 10, (pad, 1))])
    yp = np.concatenate([y, np.zeros(pad, int)])
    mask = np.concatenate([np.ones(len(x)), np.zeros(pad)]).astype(np.float32)
    return {"feat": xp, "label": yp, "example_mask": mask, "name": np.array(["n"] * len(yp))}

  embed = lambda inputs: inputs["feat"]  # noqa: E731
  train = [batch(x_tr[:6], y_tr[:6], 0), batch(x_tr[6:], y_tr[6:], 20)]
  val = [batch(x_va, y_va, 10)]
  out = knn.evaluate(embed, train, val, kind="multiclass", k=5)
  assert out == {"accuracy": 1.0, "f1_weighted": 1.0, "k": 5.0, "n_train": 12.0, "n_val": 6.0}
  with pytest.raises(ValueError, match="NaN or inf"):
    knn.evaluate(lambda i: i["feat"] * np.nan, train, val, kind="multiclass")
  with pytest.raises(ValueError, match=r"expected \(6, E\)"):
    knn.evaluate(lambda i: i["feat"][:2], train, val, kind="multiclass")


def test_monitor_set_from_prepared_sample(tmp_path):
  """PASTIS classification (S2 only) from its sample (5 train, 2 val patches): fixed shapes,
  the prepared labels, the train split capped at max_examples = 3."""
  d = str(tmp_path)
  name = prepare.ensure_prepared("pastis_hd_cls", d, modalities=("s2",))
  dcfg = default_dataset_config("pastis_hd_cls")
  dcfg.modalities, dcfg.buckets = ("s2",), {"s2": 20}
  s = knn.monitor_set(d, "pastis_hd_cls", dcfg, batch_size=2, max_examples=3)
  assert (s.name, s.kind, s.num_classes, s.patch_size) == ("pastis_hd_cls", "multilabel", 18, 40)
  assert [b["s2"].shape for b in s.train + s.val] == [(2, 20, 10, 32, 32)] * 3
  assert [b["example_mask"].tolist() for b in s.train] == [[1, 1], [1, 0]]
  assert [b["example_mask"].tolist() for b in s.val] == [[1, 1]]
  ref = {ex["name"].decode(): ex["label"] for ex in builders.data_sources(name, d)["val"]}
  for n, y in zip(s.val[0]["name"][:2], s.val[0]["label"][:2], strict=True):
    np.testing.assert_array_equal(y, ref[n])
  # The evaluation over these batches runs end to end with a stand-in embedding.
  out = knn.evaluate(lambda i: i["s2"].mean(axis=(1, 3, 4)), s.train, s.val, kind=s.kind)
  assert out["n_train"] == 3 and out["n_val"] == 2 and out["k"] == 3
