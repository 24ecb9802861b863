"""FLAIR semantic segmentation at 0.2 m: FLAIR_AnySat_FT_SemSeg.

  python -m anysat_jax.main --config=configs/flair_semseg.py[:demo] --workdir=DIR \\
      --config.init.path=AnySat.pth

Variants:
  (default)  fine-tuning: aerial-flair (random 500 px crops) and s2 (temporal dropout 0.7) at
             10 m patches, dense head on aerial-flair with proj_size 10 (13 classes, "other"
             weighted 0), AdamW lr 5e-5, wd 1e-2, batch 32, ReduceLROnPlateau, 200 epochs of
             floor(#train / 32) steps (49,230 patches: 1,538 steps), validated on the test
             split as the reference; evaluation on the centred 500 px crop (the reference's
             5-window tiling of the 512 px tiles is not implemented).
  demo       tiny random model on the shipped real aerial patches (1 train, 1 test), aerial
             only (the shipped Sentinel-2 stand-in does not cover them).
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  mode, demo = common.parse_variant(arg)
  c = common.base_config(
      "flair", experiment="FLAIR_AnySat_FT_SemSeg", train_mode=mode,
      modalities=("aerial-flair", "s2"), patch_size=10, dense_modality="aerial-flair",
      proj_size=10, loss="ce_weighted", lr=5e-5, weight_decay=1e-2, batch_size=32,
      schedule="plateau", eval_splits=("test",), temporal_dropout=0.7)
  if demo:
    common.demo(c, total_steps=30, batch_size=1, lr=2e-3, eval_splits=("test",),
                  eval_every=15, modalities=("aerial-flair",))
  return c
