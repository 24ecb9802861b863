"""Peak memory of ``python -m anysat_jax.embed`` on a scene larger than memory, against the
documented bound (``python -m anysat_jax.scene_bench``).

  python -m anysat_jax.scene_bench --px 10000 --size tiny [--raster_backend tifffile]

Makes a Sentinel-2 scene on the fly: a tiled (256 px), deflate-compressed, pixel-interleaved
uint16 GeoTIFF of PX x PX pixels at 10 m (EPSG:32631, 10 bands per date, nodata 0 in a corner
triangle, as at a granule's edge), written strip by strip so that making it is bounded too.
Then runs the command line on it in a subprocess, twice: on a reference scene of k x k windows,
k*k >= 3 batches (the runtime, the compiled model and a batch of windows in flight, in the
steady state that the first call alone does not reach: the part of the bound that does not
depend on the scene) and on the scene itself. Reports each run's peak resident memory
(``VmHWM``, and the peaks of its anonymous and file-backed parts, sampled every 0.1 s), its
time, the peaks of its resident memory over the first and the second half of the run (equal
when bounded), and the bound: the reference run's peak plus the terms that grow with the scene
(docs/api.md, "Memory"). ``--limit_s`` stops the scene's run after that many seconds and
reports the windows done (a partial run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np

from anysat_jax.io import geotiff, raster_backend, tiff_windows
from anysat_jax.models.config import SIZES
from anysat_jax.tools.embed_bench import EPSG_32631, process_memory

BANDS = 10                 # Sentinel-2 bands per date
_COUNT_BLOCK = 512         # inference.embed counts missing values in 512 x 512 px blocks


def _strips(px: int, dates: int, seed: int, rows: int = 128) -> Iterator[np.ndarray]:
  """(k, px, dates * 10) uint16 strips: smooth fields plus noise; 0 (nodata) in the corner
  triangle row + col < px / 10."""
  rng = np.random.default_rng(seed)
  bands = dates * BANDS
  x = np.arange(px, dtype=np.float32)
  phase = rng.uniform(0, 6.3, bands).astype(np.float32)
  for r in range(0, px, rows):
    y = np.arange(r, min(r + rows, px), dtype=np.float32)
    field = np.sin(x[None, :, None] / 400 + phase) * np.cos(y[:, None, None] / 300 + phase)
    strip = 1500 + 100 * np.arange(bands, dtype=np.float32) + 800 * field
    strip += rng.uniform(0, 200, strip.shape).astype(np.float32)
    strip = strip.astype(np.uint16)
    strip[(y[:, None] + x[None, :]) < px / 10] = 0
    yield strip


def make_scene(path: str, px: int, dates: int = 1, seed: int = 0) -> None:
  """The benchmark's scene (see the module docstring), streamed into ``path``."""
  ref = geotiff.GeoRef(500000.0, 5000000.0, 10.0, 10.0, crs_tags=EPSG_32631)
  geotiff.write_rows(path, (px, px, dates * BANDS), _strips(px, dates, seed), ref,
                     compression="deflate", nodata=0, dtype=np.uint16, level=1)


def measure(cmd: list[str], log_path: str, limit_s: float | None = None) -> dict:
  """Runs ``cmd``; its peak memory (MiB), seconds, windows done and whether it finished."""
  t0 = time.time()
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, text=True)
  peak = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
  trace, last = [], 0.0          # (seconds, resident MiB) every 10 s: is it flat?
  while proc.poll() is None:
    try:
      status = process_memory(proc.pid)
      for k, v in status.items():
        peak[k] = max(peak[k], v)
      if time.time() - last >= 10:
        last = time.time()
        trace.append((round(last - t0), (status["RssAnon"] + status["RssFile"]) / 1024))
    except (OSError, ValueError, KeyError):
      pass
    if limit_s is not None and time.time() - t0 > limit_s:
      proc.terminate()
      proc.wait()
      break
    time.sleep(0.1)
  seconds = time.time() - t0
  with open(log_path, errors="replace") as f:
    text = f.read()
  done = re.findall(r"windows:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)", text)
  finished = proc.returncode == 0
  if not finished and limit_s is None:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{text[-4000:]}")
  halves = [max((mib for t, mib in trace if (t >= seconds / 2) == late), default=0.0)
            for late in (False, True)]
  return {**{k: v / 1024 for k, v in peak.items()}, "seconds": seconds, "finished": finished,
          "trace": trace, "half_peaks": halves,
          "windows_done": int(done[-1][0]) if done else 0,
          "windows": int(done[-1][1]) if done else 0}


def scene_terms(args: argparse.Namespace, px: int) -> dict[str, float]:
  """The bound's terms that depend on the scene (MiB), for tile output: the features of all
  windows, the missing-value count's block, the reader's tile cache; dense output adds the
  blender's row of windows and the writer's row of tiles."""
  win = round(args.tile_m / 10)
  per_side = -(-(px - win) // win) + 1
  dim = SIZES[args.size]["dim"]
  terms = {"count block": args.dates * BANDS * _COUNT_BLOCK**2 * 5 / 2**20,
           "reader cache": float(raster_backend.GDAL_CACHE_MIB if args.raster_backend ==
                                 "rasterio" else tiff_windows.CACHE_MIB)}
  if args.output == "dense":
    depth = dim                                            # --dense_bands first
    terms["row of windows"] = win * px * (depth + 1) * 4 * 2 / 2**20
    terms["row of tiles"] = geotiff.output_tile_side((px, px, depth)) * px * depth * 4 / 2**20
  else:
    terms["features"] = per_side**2 * dim * 4 / 2**20
  return terms


def _command(args: argparse.Namespace, scene: str, out: str) -> list[str]:
  cmd = [sys.executable, "-m", "anysat_jax.embed", "--input", f"s2={scene}", "--dates",
         "s2=" + ",".join(str(15 + 30 * i) for i in range(args.dates)), "--stats", "pastis_hd",
         "--patch_size", str(args.patch_size), "--tile_m", str(args.tile_m), "--batch",
         str(args.batch), "--size", args.size, "--out", out, "--overwrite"]
  if args.raster_backend:
    cmd += ["--raster_backend", args.raster_backend]
  if args.output == "dense":
    return [*cmd, "--output", "dense", "--dense_bands", "first"]
  return [*cmd, "--output", "tile"]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m anysat_jax.scene_bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add = parser.add_argument
  add("--px", type=int, default=10000, help="scene side, pixels (10 m)")
  add("--dates", type=int, default=1, help="Sentinel-2 dates")
  add("--size", default="tiny", choices=tuple(SIZES), help="random-init model size")
  add("--output", default="tile", choices=("tile", "dense"))
  add("--tile_m", type=float, default=1280.0, help="window side, metres")
  add("--patch_size", type=int, default=40, help="patch side, metres")
  add("--batch", type=int, default=8, help="windows per model call")
  add("--raster_backend", choices=raster_backend.BACKENDS,
      help="default: rasterio when installed, else tifffile")
  add("--limit_s", type=float, help="stop the scene's run after this many seconds")
  add("--workdir", help="where the scenes are written (default: a temporary folder)")
  add("--json", help="also write the results to this file")
  args = parser.parse_args(argv)
  args.raster_backend = args.raster_backend or raster_backend.active()
  win = round(args.tile_m / 10)
  ref_px = math.ceil(math.sqrt(3 * args.batch)) * win
  if ref_px >= args.px:
    parser.error(f"--px {args.px} is not larger than the reference scene ({ref_px} px)")
  rows = {}
  with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
    for name, px in (("reference", ref_px), ("scene", args.px)):
      path = os.path.join(tmp, f"{name}.tif")
      t0 = time.time()
      make_scene(path, px, args.dates)
      made = time.time() - t0
      out = os.path.join(tmp, f"{name}_out" + (".tif" if args.output == "dense" else ".npz"))
      row = measure(_command(args, path, out), os.path.join(tmp, f"{name}.log"),
                    args.limit_s if name == "scene" else None)
      row.update(px=px, file_mib=os.path.getsize(path) / 2**20, make_s=made,
                 decoded_mib=px * px * args.dates * BANDS * 4 / 2**20)
      rows[name] = row
      os.remove(path)
      print(f"{name} {px} px: peak RSS {row['VmHWM']:.0f} MiB, {row['seconds']:.0f} s, "
            f"{row['windows_done']}/{row['windows']} windows", file=sys.stderr, flush=True)
  terms = scene_terms(args, args.px)
  bound = rows["reference"]["VmHWM"] + sum(terms.values())
  print(f"{args.size} model (random init), {args.dates} date(s), {args.output} output, windows "
        f"{args.tile_m:g} m, patch {args.patch_size} m, batch {args.batch}, raster backend "
        f"{args.raster_backend}")
  print(f"{'run':>10} {'px':>6} {'file MiB':>9} {'float32 MiB':>12} {'peak RSS MiB':>13} "
        f"{'anon MiB':>9} {'file MiB':>9} {'seconds':>8} {'windows':>12}")
  for name, r in rows.items():
    print(f"{name:>10} {r['px']:>6} {r['file_mib']:>9.0f} {r['decoded_mib']:>12.0f} "
          f"{r['VmHWM']:>13.0f} {r['RssAnon']:>9.0f} {r['RssFile']:>9.0f} {r['seconds']:>8.0f} "
          f"{r['windows_done']:>6}/{r['windows']:<5}")
  first, second = rows["scene"]["half_peaks"]
  print(f"scene's resident memory (sampled every 10 s), peak over the first half of its run "
        f"{first:.0f} MiB, over the second half {second:.0f} MiB")
  over = rows["scene"]["VmHWM"] - bound
  print("bound: reference peak + " + " + ".join(f"{k} {v:.0f}" for k, v in terms.items())
        + f" = {bound:.0f} MiB; scene peak {rows['scene']['VmHWM']:.0f} MiB, "
        + ("within it" if over <= 0 else f"{over:.0f} MiB ({over / bound:.1%}) above it"))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "runs": rows, "terms_mib": terms, "bound_mib": bound}, f,
                indent=1)
  return 0
