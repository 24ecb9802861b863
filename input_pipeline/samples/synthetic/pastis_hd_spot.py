"""Fake PASTIS-HD SPOT-6 images, for a PASTIS root or alone.

``DATA_SPOT/PASTIS_SPOT6_RVB_1M00_2019/SPOT6_RVB_1M00_2019_<id>.tif``, RGB uint8
pixel-interleaved GeoTIFF (EPSG:2154). If ``out`` holds a PASTIS root (``metadata.geojson``,
``DATA_S2``), one image per ``ID_PATCH`` with 10 SPOT pixels per S2 pixel over the same extent
(the real 1280 x 1280 at 1 m for 128 x 128 S2 patches; 320 x 320 at 4 m for the shipped sample's
32 x 32 patches, which were downsampled 4x), coloured by the patch's ``TARGET`` classes; otherwise
``num`` (default 2) fresh 1280 x 1280 images.
"""

from __future__ import annotations

import json
import os

import numpy as np

from input_pipeline.datasets.pastis_hd import SPOT_DIR
from input_pipeline.samples.synthetic import common
from input_pipeline.samples.synthetic.common import Rng

NUM = 2
SPOT_PER_S2 = 10  # SPOT pixels per S2 pixel (1 m vs 10 m): the spot projector's conv cell.
TILE_M = 1280.0  # Side of a PASTIS patch in metres.


def write(out: str, rng: Rng, num: int) -> list[str]:
  """SPOT images for the PASTIS root in ``out`` (patch grid from its S2), else ``num`` fresh
  ones; returns the patch ids."""
  meta_path = os.path.join(out, "metadata.geojson")
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      ids = [str(feat["properties"]["ID_PATCH"]) for feat in json.load(f)["features"]]
  else:
    ids = [str(10_000 + i) for i in rng.choice(40_000, num, replace=False)]
  colours = rng.uniform(40, 220, (20, 3))  # One per PASTIS class 0-19.
  for pid in ids:
    s2_path = os.path.join(out, "DATA_S2", f"S2_{pid}.npy")
    target_path = os.path.join(out, "ANNOTATIONS", f"TARGET_{pid}.npy")
    if os.path.exists(target_path):
      classes = np.load(target_path)[0].astype(np.int64)
    else:
      side = np.load(s2_path, mmap_mode="r").shape[-1] if os.path.exists(s2_path) else 128
      classes = rng.integers(20, size=12)[common.parcels(rng, side, side, 12)]
    h, w = classes.shape
    rgb = colours[common.blow_up(classes, SPOT_PER_S2)]
    rgb += 20 * common.smooth(rng, h * SPOT_PER_S2, w * SPOT_PER_S2, 8)[..., None]
    rgb += 6 * rng.normal(size=rgb.shape)
    origin = (float(rng.integers(600, 900)) * 1000, float(rng.integers(6200, 6900)) * 1000)
    common.write_tif(os.path.join(out, SPOT_DIR, f"SPOT6_RVB_1M00_2019_{pid}.tif"),
                     np.clip(np.rint(rgb), 0, 255).astype(np.uint8),
                     pixel_m=TILE_M / (w * SPOT_PER_S2), epsg=2154, origin=origin, rgb=True)
  return ids
