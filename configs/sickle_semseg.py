"""SICKLE paddy / non-paddy segmentation: Sickle_AnySat_FT and Sickle_AnySat_LP.

  python -m anysat_jax.main --config=configs/sickle_semseg.py[:VARIANT] --workdir=DIR \\
      --config.init.path=AnySat.pth

Variants:
  (default)  fine-tuning: l8, s2, s1 (temporal dropout 0.2) at 10 m patches, dense head on s2,
             cross-entropy ignoring -1, AdamW lr 5e-5, wd 0, batch 12, ReduceLROnPlateau, 200
             epochs of floor(#train / 12) steps, monitored val IoU (macro Jaccard); the test
             set is unreleased, so the val split is the only evaluation (as the reference).
  lp         linear probing, same optimiser (lr 5e-5).
  demo       tiny random model on generated SICKLE samples (3 per split, 32 x 32 px).
  lp_demo    the same, linear probing.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  mode, demo = common.parse_variant(arg, has_linear_probe=True)
  c = common.base_config(
      "sickle", experiment="Sickle_AnySat_LP" if mode == "linear_probe" else "Sickle_AnySat_FT",
      train_mode=mode, modalities=("l8", "s2", "s1"), patch_size=10, dense_modality="s2",
      loss="ce_ignore", lr=5e-5, weight_decay=0.0, batch_size=12, schedule="plateau",
      eval_splits=("val",))
  if demo:
    common.demo(c, total_steps=40, batch_size=3, lr=2e-3, eval_splits=("val",),
                  eval_every=20, buckets={"l8": 8, "s2": 8, "s1": 8})
  return c
