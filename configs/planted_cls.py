"""PLANTED tree-species classification (40 classes): Planted_AnySat_FT.

  python -m anysat_jax.main --config=configs/planted_cls.py[:demo] --workdir=DIR \\
      --config.init.path=AnySat.pth

Variants:
  (default)  fine-tuning: s2, s1, l7, alos, modis at 30 m patches, tile token, cross-entropy,
             AdamW lr 5e-5, wd 1e-4, batch 64, ReduceLROnPlateau, temporal dropout 0.3 (ALOS
             0.1), 200 epochs of floor(#train / 64) steps (1,075,701 samples: 16,807 steps),
             monitored val macro F1. The reference's density sampling of the training split
             (classes drawn with probability ~ sqrt(frequency)) is not implemented.
  demo       tiny random model on generated PLANTED samples (3 per split).
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  mode, demo = common.parse_variant(arg)
  c = common.base_config(
      "planted", experiment="Planted_AnySat_FT", train_mode=mode,
      modalities=("s2", "s1", "l7", "alos", "modis"), patch_size=30, loss="ce", lr=5e-5,
      weight_decay=1e-4, batch_size=64, schedule="plateau", eval_splits=("val", "test"),
      temporal_dropout={"s2": 0.3, "s1": 0.3, "l7": 0.3, "alos": 0.1, "modis": 0.3})
  if demo:
    common.demo(c, total_steps=40, batch_size=3, lr=2e-3, eval_splits=("val", "test"),
                  eval_every=20)
  return c
