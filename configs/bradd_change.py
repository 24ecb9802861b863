"""BraDD-S1TS deforestation change detection: BraDD_AnySat_FT and BraDD_AnySat_LP.

  python -m anysat_jax.main --config=configs/bradd_change.py[:VARIANT] --workdir=DIR \\
      --config.init.path=AnySat.pth

Variants:
  (default)  fine-tuning: s1 series (temporal dropout 0.5) at 40 m patches, dense head on s1
             (no change / deforestation), cross-entropy ignoring -1, AdamW lr 5e-5, wd 0,
             batch 8, ReduceLROnPlateau, 200 epochs of floor(#train / 8) steps, monitored val
             IoU of the change class (accumulated over the split, spec B.5).
  lp         linear probing, lr 2e-4.
  demo       tiny random model on generated BraDD samples (3 per split, 4-8 dates).
  lp_demo    the same, linear probing.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  mode, demo = common.parse_variant(arg, has_linear_probe=True)
  lp = mode == "linear_probe"
  c = common.base_config(
      "bradd_s1ts", experiment="BraDD_AnySat_LP" if lp else "BraDD_AnySat_FT", train_mode=mode,
      modalities=("s1",), patch_size=40, dense_modality="s1", loss="ce_ignore",
      lr=2e-4 if lp else 5e-5, weight_decay=0.0, batch_size=8, schedule="plateau",
      eval_type="change_detection", eval_splits=("val", "test"))
  if demo:
    common.demo(c, total_steps=60, batch_size=3, lr=2e-3, eval_splits=("val", "test"),
                  eval_every=20, buckets={"s1": 8})
  return c
