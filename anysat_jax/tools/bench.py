"""Encoder benchmark: prints a table of seconds per batch, tiles per second, compile time and
peak memory for the reference scenarios.

  python -m anysat_jax.bench [--scenarios NAME,...] [--repeats 5]
  python -m anysat_jax.bench --compiled [--buckets flair:10,...] [--config configs/geoplex.py]

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
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from anysat_jax import AnySat
from anysat_jax.checkpoints import convert
from anysat_jax.models.config import encoder_config
from anysat_jax.tasks import pretrain as train
from anysat_jax.tools import compiled_bench

# name -> (size, batch, patch size m, inputs {modality: (T or None, channels, pixels)}, mode)
SCENARIOS = {
    "base_treesat_b8": ("base", 8, 20, {"aerial": (None, 4, 300), "s1-asc": (10, 2, 6),
                                        "s2": (10, 10, 6)}, "forward"),
    "base_pastis_b2": ("base", 2, 40, {"spot": (None, 3, 240), "s2": (20, 10, 24),
                                       "s1": (20, 3, 24)}, "forward"),
    "tiny_treesat_b8": ("tiny", 8, 20, {"aerial": (None, 4, 300), "s1-asc": (10, 2, 6),
                                        "s2": (10, 10, 6)}, "forward"),
    "tiny_treesat_b8_fwd_bwd": ("tiny", 8, 20, {"aerial": (None, 4, 300), "s1-asc": (10, 2, 6),
                                                "s2": (10, 10, 6)}, "forward+backward"),
    "tiny_treesat_b8_train_step": ("tiny", 8, 20, {"aerial": (None, 4, 300),
                                                   "s1-asc": (10, 2, 6), "s2": (10, 10, 6)},
                                   "train step"),
    "base_treesat_b8_train_step": ("base", 8, 20, {"aerial": (None, 4, 300),
                                                   "s1-asc": (10, 2, 6), "s2": (10, 10, 6)},
                                   "train step"),
}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_FILE = os.path.join(REPO, "configs", "geoplex.py")


def make_batch(batch: int, spec: dict, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  out = {}
  for name, (t, c, px) in spec.items():
    if t is None:
      out[name] = rng.normal(size=(batch, c, px, px)).astype(np.float32)
    else:
      out[name] = rng.normal(size=(batch, t, c, px, px)).astype(np.float32)
      out[name + "_dates"] = np.sort(rng.integers(1, 366, (batch, t)), axis=1).astype(np.float32)
  return out


def run_scenario(name: str, repeats: int) -> dict:
  """Times one scenario in this process."""
  import jax

  size, batch, patch, spec, mode = SCENARIOS[name]
  config = encoder_config(size)
  # Weights as a checkpoint would bring them: host arrays moved to the device one at a time.
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: jax.device_put((0.02 * rng.standard_normal(s.shape)).astype(np.float32)),
      convert.param_shapes(config))
  model = AnySat(params=params, config=config)
  inputs = {k: jax.device_put(v) for k, v in make_batch(batch, spec).items()}
  if mode == "train step":
    return _time_train_step(name, size, batch, patch, inputs, repeats)
  if mode == "forward":
    fn = jax.jit(lambda p, x: model.apply(p, x, patch, "tile"))
  else:
    fn = jax.jit(jax.grad(lambda p, x: model.apply(p, x, patch, "tile").sum()))
  t0 = time.perf_counter()
  compiled = fn.lower(model.params, inputs).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(model.params, inputs))      # warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(model.params, inputs))
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return dict(scenario=name, config=size, mode=mode, batch=batch, patch_m=patch,
              s_per_batch=median, tiles_per_s=batch / median, compile_s=compile_s,
              peak_rss_mib=rss_mib, device=str(jax.devices()[0].device_kind))


def _time_train_step(name: str, size: str, batch: int, patch: int, inputs: dict,
                     repeats: int) -> dict:
  """The full pretraining step (teacher, student, predictor, losses, AdamW, EMA) of the GeoPlex
  config with the given model size."""
  import importlib.util

  import jax

  spec = importlib.util.spec_from_file_location("geoplex_config", CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("demo" if size == "tiny" else None)
  config.model.size = size
  config.model.overrides = {}           # float32, no remat: the CPU row
  if size == "tiny":
    config.model.predictor = dict(dim=256, depth=2, num_heads=4)
  state = jax.jit(lambda: train.init_state(config))()
  side = round(inputs["s2"].shape[-1] * 10 / patch)
  masks = {k: jax.device_put(v) for k, v in train.host_masks(config, 0, batch, side).items()}
  inputs = {**inputs, "s2_mask": jax.numpy.ones(inputs["s2_dates"].shape),
            "s1-asc_mask": jax.numpy.ones(inputs["s1-asc_dates"].shape)}
  traces = []
  step = train.jit_train_step(config, None, traces.append)
  t0 = time.perf_counter()
  state, metrics = step(state, inputs, masks, patch_size=patch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0          # includes one step
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, metrics = step(state, inputs, masks, patch_size=patch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  return dict(scenario=name, config=size, mode=f"train step ({len(traces)} compile)",
              batch=batch, patch_m=patch, s_per_batch=median, tiles_per_s=batch / median,
              compile_s=compile_s - median,
              peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              device=str(jax.devices()[0].device_kind))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m anysat_jax.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--scenarios", default=",".join(SCENARIOS))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--one", help=argparse.SUPPRESS)        # internal: run one in-process
  parser.add_argument("--compiled", action="store_true",
                      help="compile the train step of every bucket; print temp memory, FLOPs")
  parser.add_argument("--config", default=CONFIG_FILE + ":",
                      help="--compiled: config file[:variant] (default: configs/geoplex.py)")
  parser.add_argument("--buckets", default="",
                      help="--compiled: only these dataset:patch buckets, comma-separated")
  args = parser.parse_args(argv)
  if args.compiled:
    path, _, variant = args.config.partition(":")
    config = compiled_bench.load_config(path, variant or None)
    only = [b for b in args.buckets.split(",") if b]
    return compiled_bench.report(config, only)
  if args.one:
    print(json.dumps(run_scenario(args.one, args.repeats)))
    return 0
  rows = []
  header = (f"{'scenario':28s} {'config':6s} {'mode':22s} {'batch':>5s} {'s/batch':>8s} "
            f"{'tiles/s':>8s} {'compile s':>9s} {'peak RSS MiB':>12s}  device")
  print(header, flush=True)
  for name in args.scenarios.split(","):
    if name not in SCENARIOS:
      raise SystemExit(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    proc = subprocess.run([sys.executable, "-m", "anysat_jax.bench", "--one", name,
                           "--repeats", str(args.repeats)], capture_output=True, text=True,
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

