"""Encoder benchmark: prints a table of seconds per batch, tiles per second, compile time and
peak memory for the reference scenarios.

  python -m anysat_jax.bench [--scenarios NAME,...] [--repeats 5]
  python -m anysat_jax.bench --reference --torch_python PY --reference_dir OFFICIAL_CHECKOUT
  python -m anysat_jax.bench --loop [--config configs/geoplex.py:demo] [--steps 60]
  python -m anysat_jax.bench --compiled [--buckets flair:10,...] [--config configs/geoplex.py]

``--reference`` times the official PyTorch model (a checkout of github.com/gastruc/AnySat, run
by a Python with torch through ``anysat_jax/tools/reference_timing.py``) beside this one,
interleaved, and prints both with their ratios and the machine's matmul peaks
(``anysat_jax.tools.reference_compare``).

``--loop`` runs the pretraining loop and then its compiled step alone on the same steps and
prints the ratio of their steps/s (``anysat_jax.tools.loop_bench``).

``--compiled`` compiles (does not run) the pretraining step of every GeoPlex bucket at its
per-device batch in the config's settings and prints XLA's temporary memory and FLOPs of each
(``anysat_jax.tools.compiled_bench``): numbers that do not depend on machine noise.

Each scenario runs in its own subprocess so that its peak resident memory is its own. Runs on
the default JAX backend (a GPU when one is present). Random weights and inputs: speed does not
depend on the values.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from anysat_jax.tools import compiled_bench, loop_bench, reference_compare
from anysat_jax.tools.bench_run import SCENARIOS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_FILE = os.path.join(REPO, "configs", "geoplex.py")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m anysat_jax.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--scenarios", default=",".join(SCENARIOS))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="matmul dtype of the forward / fwd+bwd scenarios")
  reference_compare.add_options(parser)
  parser.add_argument("--compiled", action="store_true",
                      help="compile the train step of every bucket; print temp memory, FLOPs")
  parser.add_argument("--config", default=None,
                      help="--compiled / --loop: config file[:variant] (default: "
                           "configs/geoplex.py, its demo variant for --loop)")
  parser.add_argument("--loop", action="store_true",
                      help="the training loop's steps/s against its compiled step alone")
  parser.add_argument("--steps", type=int, default=60, help="--loop: steps timed")
  parser.add_argument("--warm", type=int, default=20,
                      help="--loop: steps before the timed ones (every bucket compiles)")
  parser.add_argument("--buckets", default="",
                      help="--compiled: only these dataset:patch buckets, comma-separated")
  args = parser.parse_args(argv)
  reference_compare.check_options(parser, args)
  if args.loop:
    path, _, variant = (args.config or CONFIG_FILE + ":demo").partition(":")
    return loop_bench.report(compiled_bench.load_config(path, variant or None), args.warm,
                             args.steps)
  if args.compiled:
    path, _, variant = (args.config or CONFIG_FILE + ":").partition(":")
    config = compiled_bench.load_config(path, variant or None)
    only = [b for b in args.buckets.split(",") if b]
    return compiled_bench.report(config, only)
  if args.reference:
    return reference_compare.compare(args.torch_python, args.reference_script,
                                     args.reference_dir, args.rounds, args.repeats)
  rows = []
  header = (f"{'scenario':28s} {'config':6s} {'mode':22s} {'batch':>5s} {'s/batch':>8s} "
            f"{'tiles/s':>8s} {'compile s':>9s} {'peak RSS MiB':>12s}  device")
  print(header, flush=True)
  for name in args.scenarios.split(","):
    if name not in SCENARIOS:
      raise SystemExit(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    proc = subprocess.run([sys.executable, "-m", "anysat_jax.tools.bench_run", name,
                           "--repeats", str(args.repeats), "--dtype", args.dtype],
                          capture_output=True, text=True,
                          env=os.environ)
    if proc.returncode:
      print(f"{name}: failed\n{proc.stderr[-2000:]}", flush=True)
      continue
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    rows.append(r)
    print(f"{r['scenario']:28s} {r['config']:6s} {r['mode']:22s} {r['batch']:5d} "
          f"{r['s_per_batch']:8.3f} {r['tiles_per_s']:8.1f} {r['compile_s']:9.1f} "
          f"{r['peak_rss_mib']:12.0f}  {r['device']}", flush=True)
  return 0 if len(rows) == len(args.scenarios.split(",")) else 1

