"""A class map predicted by ``python -m anysat_jax.predict`` on the shipped PASTIS sample.

Runs the PASTIS segmentation demo (``configs/pastis_semseg.py:lp_demo``: a tiny random encoder,
linear probing on S2, 60 steps on the 5 training patches) into ``--workdir`` unless a run is
already there, writes a 2 x 2 mosaic of four sample patches that share their S2 dates (20275,
20534: validation; 20213: test; 40230: training) as a georeferenced 30-band GeoTIFF (3 dates x
10 bands), predicts it in 320 m windows, and draws input (S2 RGB of the last date), predicted
classes and ground truth with ``evaluators.figures``. Regenerate ``docs/figures/predict_pastis.png``
with::

  python docs/figures/predict_pastis.py --workdir /tmp/pastis_lp_demo
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from anysat_jax.evaluators import figures
from anysat_jax.evaluators.segmentation import rgb_bands
from anysat_jax.inference import predict_cli
from anysat_jax.io import geotiff
from input_pipeline.datasets.pastis_hd import CLASSES, VOID

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "input_pipeline/samples/PASTIS"
OUT = Path(__file__).with_name("predict_pastis.png")
MOSAIC = ((20275, 20534), (20213, 40230))
DATES = "2018-09-17,2018-09-22,2018-09-27"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="the demo run's workdir (made if empty)")
  args = parser.parse_args()
  work = Path(args.workdir)
  if not (work / "checkpoints" / "config.json").exists():
    subprocess.run([sys.executable, "-m", "anysat_jax.main",
                    "--config=configs/pastis_semseg.py:lp_demo", f"--workdir={work}",
                    f"--config.data.data_dir={work / 'tfds'}"], check=True, cwd=REPO)
  s2 = np.block([[np.load(SAMPLE / f"DATA_S2/S2_{i}.npy").astype(np.float32) for i in row]
                 for row in MOSAIC])                                   # (3, 10, 64, 64)
  truth = np.block([[np.load(SAMPLE / f"ANNOTATIONS/TARGET_{i}.npy")[0].astype(np.int64)
                     for i in row] for row in MOSAIC])
  scene = work / "mosaic_s2.tif"
  geotiff.write(scene, s2.reshape(30, 64, 64), geotiff.GeoRef(600000.0, 6500000.0, 10.0, 10.0))
  out = work / "mosaic_classes.tif"
  status = predict_cli.main(["--workdir", str(work), "--input", f"s2={scene}",
                             "--dates", f"s2={DATES}", "--tile_m", "320", "--out", str(out),
                             "--overwrite"])
  if status:
    sys.exit(status)
  pred, _ = geotiff.read(out)
  figures.save_segmentation_panel(OUT, figures.rgb_from_bands(s2[-1], rgb_bands("s2")),
                                  pred[0].astype(np.int64), truth, CLASSES,
                                  figures.COLORMAPS["pastis_hd"], VOID)
  print(f"wrote {os.path.relpath(OUT, REPO)}")


if __name__ == "__main__":
  main()
