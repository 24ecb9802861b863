"""One benchmark scenario in this process (the child of ``python -m anysat_jax.bench``).

  python -m anysat_jax.tools.bench_run SCENARIO [--repeats 5] [--dtype bfloat16]
  python -m anysat_jax.tools.bench_run --matmul float32

Prints one JSON line (seconds per batch, compile seconds, peak resident memory of this process).
It imports only what its scenario runs (the encoder; the train step's task for a train-step
scenario), not the trainers, data pipeline or TensorFlow, so that its peak RSS is the model's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from anysat_jax import AnySat
from anysat_jax.checkpoints import convert
from anysat_jax.core import host_memory
from anysat_jax.models import xla_options
from anysat_jax.models.config import encoder_config
from anysat_jax.tasks import pretrain as train

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


def run_scenario(name: str, repeats: int, dtype: str = "float32") -> dict:
  """Times one scenario in this process (``dtype``: the model's matmul dtype)."""
  size, batch, patch, spec, mode = SCENARIOS[name]
  inputs = {k: jax.device_put(v) for k, v in make_batch(batch, spec).items()}
  if mode == "train step":
    return _time_train_step(name, size, batch, patch, inputs, repeats, dtype)
  config = encoder_config(size, dtype=dtype)
  # Weights as a checkpoint would bring them: host arrays moved to the device one at a time.
  rng = np.random.default_rng(0)
  model = AnySat(config=config, params=jax.tree.map(
      lambda s: jax.device_put((0.02 * rng.standard_normal(s.shape)).astype(np.float32)),
      convert.param_shapes(config)))
  if mode == "forward":
    fn = jax.jit(lambda p, x: model.apply(p, x, patch, "tile"),
                 compiler_options=xla_options.forward(dtype))
  else:
    fn = jax.jit(jax.grad(lambda p, x: model.apply(p, x, patch, "tile").sum()),
                 compiler_options=xla_options.training())
  t0 = time.perf_counter()
  compiled = fn.lower(model.params, inputs).compile()
  compile_s = time.perf_counter() - t0
  host_memory.release_freed_memory()
  jax.block_until_ready(compiled(model.params, inputs))      # warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(model.params, inputs))
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return dict(scenario=name, config=size, mode=mode, dtype=dtype, batch=batch, patch_m=patch,
              s_per_batch=median, tiles_per_s=batch / median, compile_s=compile_s,
              peak_rss_mib=rss_mib, device=str(jax.devices()[0].device_kind))


def _time_train_step(name: str, size: str, batch: int, patch: int, inputs: dict,
                     repeats: int, dtype: str) -> dict:
  """The full pretraining step (teacher, student, predictor, losses, AdamW, EMA) of the GeoPlex
  config with the given model size."""
  spec = importlib.util.spec_from_file_location("geoplex_config", CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("demo" if size == "tiny" else None)
  config.model.size = size
  config.model.overrides = {"dtype": dtype}      # no remat: the CPU row
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
              dtype=dtype, batch=batch, patch_m=patch, s_per_batch=median,
              tiles_per_s=batch / median,
              compile_s=compile_s - median,
              peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              device=str(jax.devices()[0].device_kind))


def xla_matmul_gflops(dtype: str, n: int = 2048, repeats: int = 5) -> float:
  """Best-of-``repeats`` GFLOP/s of an n x n matmul with XLA on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(jnp.matmul)
  jax.block_until_ready(f(a, b))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, b))
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best / 1e9


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m anysat_jax.tools.bench_run",
                                   description=__doc__)
  parser.add_argument("scenario", nargs="?", choices=list(SCENARIOS))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--matmul", choices=("float32", "bfloat16"),
                      help="instead of a scenario: GFLOP/s of a 2048^2 matmul in this dtype")
  args = parser.parse_args(argv)
  if args.scenario and SCENARIOS[args.scenario][4] == "forward":
    host_memory.return_large_blocks()        # as the inference command lines do
  if args.matmul:
    print(json.dumps(dict(gflops=xla_matmul_gflops(args.matmul))))
  elif args.scenario:
    print(json.dumps(run_scenario(args.scenario, args.repeats, args.dtype)))
  else:
    parser.error("give a scenario or --matmul")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
