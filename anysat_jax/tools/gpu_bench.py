"""GPU benchmark: GeoPlex pretraining-step throughput and MFU per (dataset, patch size) bucket,
and inference milliseconds per mono-date TreeSatAI tile, in bfloat16.

  python -m anysat_jax.gpu_bench [--steps 5] [--attention_impl dot_product_attention] [--remat]
  python -m anysat_jax.gpu_bench --smoke          # tiny model, 1 bucket: checks the script

Training: the base model and the batch sizes, patch sizes, dataset shapes (crops) and series
lengths of ``configs/geoplex.py``, on synthetic batches (no data files); one full step (teacher,
student, predictor, losses, AdamW, EMA) per call, timed after a warm-up step (median). Every
bucket is compiled first, all in parallel. FLOPs per step are XLA's
(``compiled.cost_analysis()``); MFU = FLOPs / step time / peak bf16 FLOP/s of the card, from
``PEAK_BF16_TFLOPS`` or ``--peak_tflops``. Inference: ``AnySatEncoder`` ``tile`` output of
aerial 300 x 300 px + s2 (T = 1) + s1-asc (T = 1) at 6 x 6 px, at patch sizes 10 m and 20 m.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import os
import statistics
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from anysat_jax.core import modalities as mods
from anysat_jax.models.encoder import AnySatEncoder
from anysat_jax.models.validation import validate_inputs
from anysat_jax.tasks import pretrain as train
from input_pipeline import loader
from input_pipeline.datasets import registry

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_FILE = os.path.join(REPO, "configs", "geoplex.py")
# Dense bf16 peak TFLOP/s by device kind (first match wins).
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}
SMOKE_DATASETS = ("flair",)
TREESAT_MONO = {"aerial": (None, 300), "s2": (1, 6), "s1-asc": (1, 6)}


def bench_config(smoke: bool, attention_impl: str, remat: bool) -> ml_collections.ConfigDict:
  """``configs/geoplex.py`` (with ``smoke``, the ``demo`` variant's FLAIR only) in bfloat16."""
  spec = importlib.util.spec_from_file_location("geoplex_config", CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("demo" if smoke else None)
  if smoke:
    config.data.datasets = {k: config.data.datasets[k] for k in SMOKE_DATASETS}
  config.model.overrides = {**config.model.overrides, "dtype": "bfloat16",
                            "attention_impl": attention_impl, "remat": remat}
  return config


def synthetic_batch(modalities: dict[str, tuple[int | None, int]], batch: int,
                    seed: int = 0) -> dict[str, np.ndarray]:
  """Random inputs for ``{modality: (T or None, pixels per side)}``, in that order, as the input
  pipeline delivers them (series with int32 dates and float32 date masks)."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, (t, px) in modalities.items():
    c = mods.get(name).channels
    if t is None:
      out[name] = rng.normal(size=(batch, c, px, px)).astype(np.float32)
    else:
      out[name] = rng.normal(size=(batch, t, c, px, px)).astype(np.float32)
      out[name + mods.DATES_SUFFIX] = np.sort(rng.integers(1, 366, (batch, t)), 1).astype(np.int32)
      out[name + mods.MASK_SUFFIX] = np.ones((batch, t), np.float32)
  return out


def buckets(config: ml_collections.ConfigDict) -> list[tuple[str, int, int, dict]]:
  """(dataset, patch size m, batch size, {modality: (T or None, pixels)}) of every bucket."""
  out = []
  for name, d in config.data.datasets.items():
    stored = registry.get_spec(name).modalities
    shapes = {m: (d.buckets.get(m) if mods.get(m).temporal else None,
                  min(stored[m][0], d.crop.get(m, stored[m][0]))) for m in d.modalities}
    batch = loader.global_batch_size(name, d, shard_count=1, num_devices=jax.device_count())
    out.extend((name, p, batch, shapes) for p in d.patch_sizes)
  return out


def _side(shapes: dict, patch: int) -> int:
  name = next(m for m in shapes if not mods.get(m).context_token)
  return mods.grid_side(name, shapes[name][1], patch)


def _cost_flops(compiled: Any) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", float("nan")))


def _time(fn, steps: int) -> float:
  """Median seconds of ``fn()`` (which blocks) over ``steps`` calls, after one warm-up call."""
  fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def peak_tflops(device_kind: str, override: float | None) -> float | None:
  if override:
    return override
  return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_kind), None)


def run(smoke: bool, steps: int, attention_impl: str, remat: bool, peak: float | None,
        infer_batch: int) -> list[dict]:
  """Compiles every bucket and the inference functions in parallel, then times them in turn."""
  config = bench_config(smoke, attention_impl, remat)
  enc_cfg, _ = train.model_configs(config)
  init = jax.jit(lambda: train.init_state(config))
  state = init()
  step = train.jit_train_step(config, None, lambda _: None)
  jobs = []   # (row, lowered, inputs)
  for name, patch, batch, shapes in buckets(config):
    host = synthetic_batch(shapes, batch)
    validate_inputs(host, patch, enc_cfg)
    masks = train.host_masks(config, 0, batch, _side(shapes, patch))
    inputs = (jax.device_put(host), jax.device_put(masks))
    row = dict(kind="train step", bucket=f"{name} p{patch}", batch=batch)
    jobs.append((row, step.lower(state, *inputs, patch_size=patch), inputs))
  model = AnySatEncoder(enc_cfg)
  b = 2 if smoke else infer_batch
  mono = synthetic_batch(TREESAT_MONO, b)
  mono = {k: v for k, v in mono.items() if not k.endswith(mods.MASK_SUFFIX)}
  forward = jax.jit(lambda p, x, patch: model.apply({"params": p}, x, patch, "tile"),
                    static_argnums=2)
  for patch in (10,) if smoke else (10, 20):
    validate_inputs(mono, patch, enc_cfg)
    row = dict(kind="inference", bucket=f"treesatai mono-date p{patch}", batch=b)
    jobs.append((row, forward.lower(state.params["encoder"], mono, patch),
                 (jax.device_put(mono),)))
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    futures = [pool.submit(lowered.compile) for _, lowered, _ in jobs]
  print(f"compiled {len(jobs)} programs in {time.perf_counter() - t0:.0f} s", flush=True)
  rows = []
  for (row, _, inputs), future in zip(jobs, futures, strict=True):
    try:
      compiled = future.result()
      row["flops"] = _cost_flops(compiled)
      if row["kind"] == "train step":
        def call(compiled=compiled, inputs=inputs):
          nonlocal state
          state, metrics = compiled(state, *inputs)
          jax.block_until_ready(metrics)
      else:
        params = state.params["encoder"]
        call = lambda compiled=compiled, inputs=inputs, params=params: jax.block_until_ready(
            compiled(params, *inputs))
      row["s"] = _time(call, steps)
    except Exception as e:  # e.g. out of memory: report it and go on with a fresh state
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
      state = init()
    rows.append(row)
    print(format_row(row, peak), flush=True)
  train_rows = {r["bucket"]: r.get("s") for r in rows if r["kind"] == "train step"}
  if all(train_rows.values()):
    ds = config.data.datasets
    mean = sum(d.weight * statistics.mean(train_rows[f"{n} p{p}"] for p in d.patch_sizes)
               for n, d in ds.items()) / sum(d.weight for d in ds.values())
    print(f"GeoPlex mixture (dataset weights, patch sizes uniform): {1e3 * mean:.1f} ms/step")
  return rows


def format_row(r: dict, peak: float | None) -> str:
  head = f"{r['kind']:10s} {r['bucket']:28s} {r['batch']:5d}"
  if "error" in r:
    return f"{head}  failed: {r['error']}"
  tflops = r["flops"] / r["s"] / 1e12
  mfu = f"{100 * tflops / peak:5.1f}%" if peak else "  n/a"
  per_tile = 1e3 * r["s"] / r["batch"]
  return (f"{head} {1e3 * r['s']:9.1f} {per_tile:8.2f} {r['batch'] / r['s']:9.1f} "
          f"{r['flops'] / 1e9:10.2f} {tflops:8.2f} {mfu}")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m anysat_jax.gpu_bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=5, help="timed steps per bucket")
  parser.add_argument("--attention_impl", default="xla",
                      choices=("xla", "dot_product_attention"))
  parser.add_argument("--remat", action="store_true", help="rematerialise transformer blocks")
  parser.add_argument("--peak_tflops", type=float, help="peak bf16 TFLOP/s of the card")
  parser.add_argument("--infer_batch", type=int, default=64, help="tiles per inference call")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny model, 1 bucket, 2 steps: checks the script (any backend)")
  args = parser.parse_args(argv)
  steps = 2 if args.smoke else args.steps
  kind = jax.devices()[0].device_kind
  peak = peak_tflops(kind, args.peak_tflops)
  print(f"device: {kind} x{jax.device_count()} ({jax.default_backend()}), peak bf16 "
        f"{f'{peak:.0f} TFLOP/s' if peak else 'unknown (--peak_tflops)'}; jax {jax.__version__}")
  print(f"model: {'demo (tiny)' if args.smoke else 'base'}, matmuls bfloat16, attention "
        f"{args.attention_impl}, remat {args.remat}; median of {steps} steps", flush=True)
  print(f"{'':10s} {'bucket':28s} {'batch':>5s} {'ms/call':>9s} {'ms/tile':>8s} {'tiles/s':>9s} "
        f"{'GFLOP':>10s} {'TFLOP/s':>8s} {'MFU':>6s}", flush=True)
  rows = run(args.smoke, steps, args.attention_impl, args.remat, peak, args.infer_batch)
  return 0 if all("error" not in r for r in rows) else 1

