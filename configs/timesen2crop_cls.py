"""TimeSen2Crop pixel classification (16 crop classes): TS2C_AnySat_FT and TS2C_AnySat_LP.

  python -m anysat_jax.main --config=configs/timesen2crop_cls.py[:VARIANT] --workdir=DIR \\
      --config.init.path=AnySat.pth

Variants:
  (default)  fine-tuning: one s2 pixel series (temporal dropout 0.3), one 10 m patch, tile
             token, cross-entropy ignoring -1, AdamW lr 5e-5, wd 0, batch 2048, warmup (20
             epochs) + cosine, 100 epochs of floor(#train / 2048) steps, monitored val OA
             (tile 33TWN), tested on 33UVP.
  lp         linear probing: lr 2e-4, 200 epochs.
  demo       tiny random model on generated TimeSen2Crop pixels (12 train, 6 val, 6 test).
  lp_demo    the same, linear probing.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  mode, demo = common.parse_variant(arg, has_linear_probe=True)
  lp = mode == "linear_probe"
  c = common.base_config(
      "timesen2crop", experiment="TS2C_AnySat_LP" if lp else "TS2C_AnySat_FT", train_mode=mode,
      modalities=("s2",), patch_size=10, loss="ce_ignore", lr=2e-4 if lp else 5e-5,
      weight_decay=0.0, batch_size=2048, schedule="warmup_cosine", epochs=200 if lp else 100,
      eval_splits=("val", "test"))
  if demo:
    common.demo(c, total_steps=60, batch_size=12, lr=2e-3, eval_splits=("val", "test"),
                  eval_every=20, buckets={"s2": 8})
  return c
