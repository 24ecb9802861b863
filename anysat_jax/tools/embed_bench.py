"""Memory of ``python -m anysat_jax.embed`` on large scenes: prints a table of peak resident
memory and time for Sentinel-2 scenes made on the fly.

  python -m anysat_jax.tools.embed_bench [--scene 10000:tile --scene 2000:cog ...]

Each scene (``PX:OUTPUT``, OUTPUT ``tile``, ``patch``, ``dense`` or ``cog``, a dense
cloud-optimized GeoTIFF) is written as an uncompressed, pixel-interleaved uint16 GeoTIFF of
PX x PX pixels at 10 m (10 bands per date), then embedded by the command line's code in its own
subprocess with a small random model (speed and memory do not depend on the weights); the
table gives the subprocess's peak resident memory (``VmHWM``) and the peaks of its anonymous
(heap) and file-backed parts, sampled every 0.1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import tifffile

from anysat_jax.inference import embed_cli
from anysat_jax.inference.api import AnySat
from anysat_jax.io import geotiff

OUTPUTS = ("tile", "patch", "dense", "cog")
DIM = dict(dim=64, depth=1, num_heads=4, spatial_depth=1, spatial_heads=4)
EPSG_32631 = ((geotiff.GEO_KEY_DIRECTORY, 3, 16,
                (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32631)),)


def make_scene(path: str, px: int, dates: int, seed: int = 0) -> None:
  """A px x px Sentinel-2 GeoTIFF (EPSG:32631, 10 m), ``dates`` x 10 uint16 bands, written
  strip by strip into a memory-mapped file."""
  bands = 10 * dates
  ref = geotiff.GeoRef(500000.0, 5000000.0, 10.0, 10.0, crs_tags=EPSG_32631)
  tifffile.imwrite(path, shape=(px, px, bands), dtype=np.uint16, photometric="minisblack",
                   planarconfig="contig", bigtiff=px * px * bands * 2 > 2**31,
                   extratags=ref.tags(), metadata=None)
  out = tifffile.memmap(path, mode="r+")
  rng = np.random.default_rng(seed)
  base = rng.integers(200, 4000, (1, px, bands), dtype=np.uint16)
  for r in range(0, px, 256):
    k = min(256, px - r)
    out[r:r + k] = base + rng.integers(0, 500, (k, 1, 1), dtype=np.uint16)
    out.flush()
  del out


def _child(args: argparse.Namespace) -> int:
  """Embeds one scene (in the subprocess whose memory is measured)."""

  argv = ["--input", f"s2={args.scene_path}", "--dates",
          "s2=" + ",".join(str(15 + 30 * i) for i in range(args.dates)),
          "--stats", "pastis_hd", "--patch_size", str(args.patch_size),
          "--tile_m", str(args.tile_m), "--batch", str(args.batch), "--out", args.out,
          "--overwrite"]
  if args.output in ("dense", "cog"):
    argv += ["--output", "dense", "--dense_bands", "first"] + (["--cog"] if args.output == "cog"
                                                               else [])
  else:
    argv += ["--output", args.output]
  cli = embed_cli.parse_args(argv)
  model = AnySat("tiny", modalities=("s2",), seed=0, **DIM)
  embed_cli.run(model, cli)
  return 0


def process_memory(pid: int) -> dict[str, int]:
  """VmHWM, RssAnon, RssFile of a process, kB."""
  out = {}
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      key, _, value = line.partition(":")
      if key in ("VmHWM", "RssAnon", "RssFile"):
        out[key] = int(value.split()[0])
  return out


def measure(scene: str, output: str, args: argparse.Namespace, out: str) -> dict:
  """Runs the child on ``scene``; peak memory (MiB) and seconds."""
  cmd = [sys.executable, "-m", "anysat_jax.tools.embed_bench", "--child", "--scene_path", scene,
         "--output", output, "--out", out, "--dates", str(args.dates),
         "--tile_m", str(args.tile_m), "--patch_size", str(args.patch_size),
         "--batch", str(args.batch)]
  t0 = time.time()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  peak = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}

  def poll():
    while proc.poll() is None:
      try:
        for k, v in process_memory(proc.pid).items():
          peak[k] = max(peak[k], v)
      except (OSError, ValueError):
        pass
      time.sleep(0.1)

  sampler = threading.Thread(target=poll, daemon=True)
  sampler.start()
  _, err = proc.communicate()
  sampler.join()
  if proc.returncode:
    raise RuntimeError(f"embedding {scene} failed:\n{err[-4000:]}")
  return {k: v / 1024 for k, v in peak.items()} | {"seconds": time.time() - t0}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m anysat_jax.tools.embed_bench",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add = parser.add_argument
  add("--scene", action="append", metavar="PX:OUTPUT",
      help=f"scene side in pixels and output ({', '.join(OUTPUTS)}); default 10000:tile")
  add("--dates", type=int, default=1, help="Sentinel-2 dates per scene")
  add("--tile_m", type=float, default=1280.0, help="window side, metres")
  add("--patch_size", type=int, default=40, help="patch side, metres")
  add("--batch", type=int, default=8, help="windows per model call")
  add("--workdir", help="where the scenes are written (default: a temporary folder)")
  add("--json", help="also write the rows to this file")
  add("--child", action="store_true", help=argparse.SUPPRESS)
  add("--scene_path", help=argparse.SUPPRESS)
  add("--output", default="tile", help=argparse.SUPPRESS)
  add("--out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    return _child(args)
  rows = []
  with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
    for spec in args.scene or ["10000:tile"]:
      px, _, output = spec.partition(":")
      px, output = int(px), output or "tile"
      if output not in OUTPUTS:
        parser.error(f"--scene {spec}: OUTPUT must be one of {', '.join(OUTPUTS)}")
      path = os.path.join(tmp, f"s2_{px}.tif")
      t0 = time.time()
      make_scene(path, px, args.dates)
      made = time.time() - t0
      out = os.path.join(tmp, f"out_{px}_{output}" + (".npz" if output in ("tile", "patch")
                                                          else ".tif"))
      row = {"scene_px": px, "output": output, "scene_mib": os.path.getsize(path) / 2**20,
             "out_mib": 0.0, "make_s": made, **measure(path, output, args, out)}
      row["out_mib"] = os.path.getsize(out) / 2**20
      rows.append(row)
      os.remove(path)
      print(f"{px} px {output}: peak RSS {row['VmHWM']:.0f} MiB", file=sys.stderr)
  header = (f"{'scene (px)':>11} {'output':>7} {'input MiB':>10} {'output MiB':>11} "
            f"{'peak RSS MiB':>13} {'anon MiB':>9} {'file MiB':>9} {'seconds':>8}")
  print(f"tiny model {DIM}, {args.dates} date(s), windows {args.tile_m:g} m, patch "
        f"{args.patch_size} m, batch {args.batch}")
  print(header)
  for r in rows:
    print(f"{r['scene_px']:>11} {r['output']:>7} {r['scene_mib']:>10.0f} {r['out_mib']:>11.1f} "
          f"{r['VmHWM']:>13.0f} {r['RssAnon']:>9.0f} {r['RssFile']:>9.0f} {r['seconds']:>8.1f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
