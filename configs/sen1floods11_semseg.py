"""Sen1Floods11 water segmentation, linear probing only: Sen1Floods_AnySat_LP.

  python -m anysat_jax.main --config=configs/sen1floods11_semseg.py[:demo] --workdir=DIR \\
      --config.init.path=AnySat.pth

Variants:
  (default)  linear probing: s2 and s1 (one date each) at 80 m patches, dense head on s2 (dry /
             water), cross-entropy ignoring -1, AdamW lr 2e-4, wd 0, batch 4, ReduceLROnPlateau,
             200 epochs of floor(#train / 4) steps, monitored val mIoU (SegPangaea).
  demo       tiny random model on the shipped chip (512 x 512 px, test split only: it is both
             the training and the evaluation split).
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  mode, demo = common.parse_variant(arg, has_finetune=False)
  c = common.base_config(
      "sen1floods11", experiment="Sen1Floods_AnySat_LP", train_mode=mode,
      modalities=("s2", "s1"), patch_size=80, dense_modality="s2", loss="ce_ignore", lr=2e-4,
      weight_decay=0.0, batch_size=4, schedule="plateau", eval_splits=("val", "test"))
  if demo:
    common.demo(c, total_steps=20, batch_size=1, lr=1e-2, eval_splits=("test",),
                  eval_every=10, split="test")
  return c
