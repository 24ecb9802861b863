"""The pretraining validation loss: fixed val batches and masks per dataset, aggregation of a
loss function's values, determinism across evaluations. A fake loss of known values; host only."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from anysat_jax.evaluators import pretrain_loss
from anysat_jax.tasks import masking
from configs.common import default_dataset_config
from input_pipeline import loader, prepare

MASKS = masking.MaskConfig()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> ml_collections.ConfigDict:
  """PASTIS-HD and TreeSatAI-TS, S2 only, from their samples (PASTIS: 5 train patches;
  TreeSatAI-TS: 1 train tile, no val tile)."""
  d = str(tmp_path_factory.mktemp("tfds"))
  datasets = {}
  for name in ("pastis_hd", "treesatai_ts"):
    prepare.ensure_prepared(name, d, modalities=("s2",))
    dcfg = default_dataset_config(name)
    dcfg.modalities, dcfg.buckets, dcfg.crop = ("s2",), {"s2": 20}, {}
    datasets[name] = dcfg
  return ml_collections.ConfigDict(dict(data_dir=d, datasets=datasets))


def fake_loss(params, batch, masks, *, patch_size):
  """loss = w * mean(s2) + mean(tgt_valid); aux: the two terms."""
  a = float(np.mean(batch["s2"]))
  b = float(np.mean(masks["tgt_valid"])) + 0 * patch_size
  return params["w"] * a + b, {"jepa": a, "contrastive": b}


def test_val_sets_and_loss(data):
  sets = pretrain_loss.val_sets(data, MASKS, seed=5, split="train", batch_size=2,
                                max_batches=4)
  # TreeSatAI-TS: one train tile, so batches of 1; PASTIS: 2 full batches of 2 (the 5th patch
  # would only fill a padded batch).
  assert [(s.name, s.patch_size, len(s.batches), s.examples) for s in sets] == [
      ("pastis_hd", 40, 2, 4), ("treesatai_ts", 10, 1, 1)]
  p = sets[0]
  assert p.batches[0]["s2"].shape == (2, 20, 10, 32, 32) and "label" not in p.batches[0]
  k_ctx, k_tgt = masking.mask_sizes(8, MASKS)        # 32 px x 10 m / 40 m = 8 patches a side.
  assert p.masks[0]["ctx_idx"].shape == (2, k_ctx)
  assert p.masks[0]["tgt_idx"].shape == p.masks[0]["tgt_valid"].shape == (2, 4, k_tgt)
  assert masking.leak({"ctx_idx": p.masks[0]["ctx_idx"],
                       "tgt_idx": p.masks[0]["tgt_idx"].transpose(1, 0, 2),
                       "tgt_valid": p.masks[0]["tgt_valid"].transpose(1, 0, 2)}) == 0.0
  # Masks differ between batches and datasets, and are the same at every construction.
  assert not np.array_equal(p.masks[0]["tgt_idx"], p.masks[1]["tgt_idx"])
  assert p.masks[0]["seed"] != p.masks[1]["seed"] != sets[1].masks[0]["seed"]
  again = pretrain_loss.val_sets(data, MASKS, seed=5, split="train", batch_size=2,
                                 max_batches=4)
  for s, t in zip(sets, again, strict=True):
    for m, n in zip(s.masks, t.masks, strict=True):
      for k in m:
        np.testing.assert_array_equal(m[k], n[k])
    for x, y in zip(s.batches, t.batches, strict=True):
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])
  other_seed = pretrain_loss.val_sets(data, MASKS, seed=6, split="train", batch_size=2)
  assert not np.array_equal(other_seed[0].masks[0]["ctx_idx"], p.masks[0]["ctx_idx"])

  # The batches are the evaluation pipeline's first full batches, read independently here.
  cfg = ml_collections.ConfigDict(dict(data_dir=data.data_dir, seed=0,
                                       datasets={"pastis_hd": data.datasets["pastis_hd"]}))
  cfg.datasets.pastis_hd.batch_size, cfg.datasets.pastis_hd.per_device_batch = 2, None
  ref = list(loader.dataset_pipeline(cfg, "pastis_hd", shard_index=0, shard_count=1,
                                     training=False))[:2]
  jepa = [float(np.mean(r["s2"])) for r in ref]
  con = [float(np.mean(m["tgt_valid"])) for m in p.masks]
  out = pretrain_loss.evaluate(fake_loss, {"w": 3.0}, sets)
  t_jepa = float(np.mean(sets[1].batches[0]["s2"]))
  t_con = float(np.mean(sets[1].masks[0]["tgt_valid"]))
  want = {
      "val/pastis_hd/loss": np.mean([3 * a + b for a, b in zip(jepa, con, strict=True)]),
      "val/pastis_hd/jepa": np.mean(jepa), "val/pastis_hd/contrastive": np.mean(con),
      "val/pastis_hd/examples": 4.0,
      "val/treesatai_ts/loss": 3 * t_jepa + t_con, "val/treesatai_ts/jepa": t_jepa,
      "val/treesatai_ts/contrastive": t_con, "val/treesatai_ts/examples": 1.0}
  want["val/loss"] = (want["val/pastis_hd/loss"] + want["val/treesatai_ts/loss"]) / 2
  assert out == pytest.approx(want, rel=1e-6)
  assert pretrain_loss.evaluate(fake_loss, {"w": 3.0}, again) == out


def test_empty_split_left_out_and_nonfinite_refused(data, caplog):
  """TreeSatAI-TS's sample has no val tile: it is left out with a warning."""
  sets = pretrain_loss.val_sets(data, MASKS, seed=0, batch_size=4, max_batches=1)
  assert [(s.name, s.examples) for s in sets] == [("pastis_hd", 2)]
  assert "treesatai_ts has no 'val' examples; left out" in caplog.text
  with pytest.raises(FloatingPointError, match=r"pastis_hd batch 0: \['loss', 'jepa'\]"):
    pretrain_loss.evaluate(lambda *a, **k: (np.nan, {"jepa": np.inf}), None, sets)
  only_treesat = ml_collections.ConfigDict(dict(
      data_dir=data.data_dir, datasets={"treesatai_ts": data.datasets["treesatai_ts"]}))
  with pytest.raises(ValueError, match="no dataset has 'val' examples"):
    pretrain_loss.val_sets(only_treesat, MASKS, seed=0)
