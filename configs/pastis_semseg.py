"""PASTIS-HD semantic segmentation: Pastis_AnySat_FT_SemSeg and Pastis_AnySat_LP_SemSeg.

  python -m anysat_jax.main --config=configs/pastis_semseg.py[:VARIANT] --workdir=DIR \\
      --config.init.path=AnySat.pth

Variants:
  (default)  fine-tuning: spot, s2, s1 at 40 m patches, dense head on s2 (20 classes, void 19
             weighted 0), AdamW lr 5e-5, wd 0, batch 4, ReduceLROnPlateau, 200 epochs of
             floor(#train / 4) steps (folds 1-3; ~360 steps), monitored val mIoU (fold 4),
             tested on fold 5.
  lp         linear probing (s2 only, as the reference config), same optimiser.
  demo       tiny random model on the shipped PASTIS sample (32 x 32 px, 5 train / 2 val /
             2 test patches) with generated SPOT images: 2-core CPU, a few minutes.
  lp_demo    the same, linear probing.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  mode, demo = common.parse_variant(arg, has_linear_probe=True)
  lp = mode == "linear_probe"
  c = common.base_config(
      "pastis_hd", experiment="Pastis_AnySat_LP_SemSeg" if lp else "Pastis_AnySat_FT_SemSeg",
      train_mode=mode, modalities=("s2",) if lp else ("spot", "s2", "s1"), patch_size=40,
      dense_modality="s2", loss="ce_weighted", lr=5e-5, weight_decay=0.0, batch_size=4,
      schedule="plateau", eval_splits=("val", "test"))
  if demo:
    common.demo(c, total_steps=60, batch_size=2, lr=2e-3, eval_splits=("val", "test"),
                  eval_every=20)
  return c
