"""TreeSatAI-TS multilabel genus classification: TSAITS_AnySat_FT.

  python -m anysat_jax.main --config=configs/treesatai_ts_cls.py[:demo] --workdir=DIR \\
      --config.init.path=AnySat.pth

Variants:
  (default)  fine-tuning: aerial (300 px crops), s2, s1-asc at 10 m patches, tile token -> 15
             genera, BCE, AdamW lr 5e-5, wd 0, batch 256, warmup (20 epochs) + cosine, 200
             epochs of floor(#train / 256) steps (38,520 tiles: 150 steps, 30,000 in all),
             monitored val weighted F1, tested on the test list.
  demo       tiny random model on the shipped tile (train split only, so it is also the
             evaluation split); series sub-sampled to 16 (s2) and 8 (s1-asc) dates.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  mode, demo = common.parse_variant(arg)
  c = common.base_config(
      "treesatai_ts", experiment="TSAITS_AnySat_FT", train_mode=mode,
      modalities=("aerial", "s2", "s1-asc"), patch_size=10, loss="bce", lr=5e-5,
      weight_decay=0.0, batch_size=256, schedule="warmup_cosine", eval_splits=("val", "test"))
  if demo:
    common.demo(c, total_steps=40, batch_size=1, lr=2e-3, eval_splits=("train",),
                  eval_every=20, buckets={"s2": 16, "s1-asc": 8})
  return c
