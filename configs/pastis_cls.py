"""PASTIS-HD multilabel classification of the crop types present: Pastis_AnySat_FT.

  python -m anysat_jax.main --config=configs/pastis_cls.py[:demo] --workdir=DIR \\
      --config.init.path=AnySat.pth

Variants:
  (default)  fine-tuning: spot, s2, s1 at 40 m patches, tile token -> 18 classes (background
             and void removed), BCE, AdamW lr 5e-5, wd 0, batch 4, warmup (20 epochs) + cosine,
             200 epochs of floor(#train / 4) steps (folds 1-3; ~360 steps), monitored val
             macro F1 (fold 4), tested on fold 5.
  demo       tiny random model on the shipped PASTIS sample with generated SPOT images.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  mode, demo = common.parse_variant(arg)
  c = common.base_config(
      "pastis_hd_cls", experiment="Pastis_AnySat_FT", train_mode=mode,
      modalities=("spot", "s2", "s1"), patch_size=40, loss="bce", lr=5e-5, weight_decay=0.0,
      batch_size=4, schedule="warmup_cosine", eval_splits=("val", "test"))
  if demo:
    common.demo(c, total_steps=60, batch_size=2, lr=2e-3, eval_splits=("val", "test"),
                  eval_every=20)
  return c
