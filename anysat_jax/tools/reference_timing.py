"""Times the official PyTorch AnySat on the scenarios of ``python -m anysat_jax.bench --reference``.

  PY anysat_jax/tools/reference_timing.py --ref OFFICIAL_CHECKOUT [--only SCENARIO]...
      [--runs 3] [--warmup 1] [--threads 2] [--out results.json]

``PY`` is a Python that has torch and what the official code needs; ``OFFICIAL_CHECKOUT`` is a
checkout of the official repository (github.com/gastruc/AnySat), the folder of its
``hubconf.py``. ``bench --reference`` runs this script for you (``reference_compare``).

What it measures, per scenario, in a child process of its own (this script again, with
``--child``) so that each peak resident memory is that scenario's alone:

* ``treesat_tiny_train_fwd_bwd``: the tiny model in train mode, forward, loss = mean(out ** 2),
  backward;
* ``treesat_base_eval``: the base model in eval mode, forward under ``torch.no_grad()``.

Both take a batch of 8 TreeSatAI-like inputs: ``aerial`` (B, 4, 300, 300), ``s1-asc``
(B, 10, 2, 6, 6) and ``s2`` (B, 10, 10, 6, 6), float32 normal noise from a seeded
``torch.Generator``, with ``*_dates`` (B, 10) sorted random day indices in [0, 365); patch size
20 m, tile output: the shapes of ``anysat_jax.tools.bench_run``'s ``tiny_treesat_b8_fwd_bwd``
and ``base_treesat_b8``. The model is ``hubconf.AnySat(model_size=..., flash_attn=False)`` with
random weights (speed does not depend on them), called as ``model(inputs, 20, output="tile")``
on ``--threads`` torch threads. After ``--warmup`` untimed calls, each of ``--runs`` calls is
timed; a scenario's result is the median seconds per batch (``median_s``) and the child's peak
RSS (``peak_rss_mib``, ``ru_maxrss``: runtime, weights, inputs and run together). ``--out``
receives ``{"results": {SCENARIO: {"median_s": ..., "peak_rss_mib": ..., ...}}}``, or
``{"error": ...}`` in place of a scenario that failed (the exit status is then 1).

The official code is imported from ``--ref`` at run time and is never copied into this project.
This file imports neither JAX nor this project, and torch only inside the child's functions:
it runs with a torch-only Python, and it imports without torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

# name -> (model size, train: forward + backward in train mode; else no_grad forward in eval)
SCENARIOS = {
    "treesat_tiny_train_fwd_bwd": ("tiny", True),
    "treesat_base_eval": ("base", False),
}
BATCH = 8
PATCH_SIZE = 20
OUTPUT = "tile"
# modality -> (dates T or None for a single image, channels, pixels per side)
INPUTS = {"aerial": (None, 4, 300), "s1-asc": (10, 2, 6), "s2": (10, 10, 6)}
DAYS = 365
SEED = 0
HERE = os.path.dirname(os.path.abspath(__file__))


def peak_rss_mib() -> float:
  """This process's peak resident memory in MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss / 2 ** 20 if sys.platform == "darwin" else rss / 1024


def check_ref(ref: str) -> str | None:
  """Why ``ref`` is not an official checkout, or None when it has a ``hubconf.py``."""
  if not os.path.isfile(os.path.join(ref, "hubconf.py")):
    return (f"--ref {ref}: no hubconf.py there; give the folder of a checkout of the official "
            "AnySat repository (github.com/gastruc/AnySat)")
  return None


def make_inputs(torch: Any, batch: int = BATCH, seed: int = SEED) -> dict[str, Any]:
  """The scenario's inputs: seeded normal float32 images and sorted integer day indices."""
  gen = torch.Generator().manual_seed(seed)
  x = {}
  for name, (t, c, px) in INPUTS.items():
    shape = (batch, c, px, px) if t is None else (batch, t, c, px, px)
    x[name] = torch.randn(shape, generator=gen, dtype=torch.float32)
    if t is not None:
      x[name + "_dates"] = torch.randint(0, DAYS, (batch, t), generator=gen).sort(dim=1).values
  return x


def load_official(ref: str) -> Any:
  """The official ``hubconf`` module, imported from ``ref`` (and from nowhere else)."""
  problem = check_ref(ref)
  if problem:
    raise SystemExit(problem)
  ref = os.path.realpath(ref)
  sys.path.insert(0, ref)                       # hubconf imports its own src package from there
  hubconf = importlib.import_module("hubconf")
  found = os.path.dirname(os.path.realpath(hubconf.__file__))
  if found != ref:
    raise SystemExit(f"imported hubconf from {found}, not from --ref {ref}")
  return hubconf


def time_scenario(name: str, ref: str, runs: int, warmup: int, threads: int) -> dict[str, Any]:
  """Runs one scenario in this process and returns its timings and peak RSS."""
  import torch  # only the child needs torch: the module imports without it

  torch.set_num_threads(threads)
  torch.manual_seed(SEED)                       # random weights: speed does not depend on them
  size, train = SCENARIOS[name]
  model = load_official(ref).AnySat(model_size=size, flash_attn=False)
  x = make_inputs(torch)
  if train:
    model.train()

    def step() -> None:
      out = model(x, PATCH_SIZE, output=OUTPUT)
      (out ** 2).mean().backward()
  else:
    model.eval()

    def step() -> None:
      with torch.no_grad():
        model(x, PATCH_SIZE, output=OUTPUT)

  times = []
  for i in range(warmup + runs):
    if train:
      model.zero_grad(set_to_none=True)         # each step makes its gradients anew
    t0 = time.perf_counter()
    step()
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return dict(median_s=statistics.median(times), times_s=times, peak_rss_mib=peak_rss_mib(),
              model_size=size, mode="train forward+backward" if train else "eval no_grad forward",
              batch=BATCH, patch_size=PATCH_SIZE, threads=torch.get_num_threads(),
              torch=str(torch.__version__))


def run_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
  """One scenario in a fresh process (this script with ``--child``): its result or its error."""
  cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--ref", args.ref,
         "--runs", str(args.runs), "--warmup", str(args.warmup), "--threads", str(args.threads)]
  p = subprocess.run(cmd, capture_output=True, text=True)
  lines = p.stdout.strip().splitlines()
  if p.returncode or not lines:
    return {"error": f"exit status {p.returncode}: {(p.stderr or p.stdout)[-3000:]}"}
  try:
    return json.loads(lines[-1])
  except json.JSONDecodeError:
    return {"error": f"no result line in the child's output: {p.stdout[-1000:]}"}


def main(argv: list[str] | None = None) -> int:
  # Run as a script, this file's folder is sys.path[0]: its modules (bench.py, parity.py, ...)
  # must not shadow anything that torch or the official code imports.
  if sys.path and os.path.realpath(sys.path[0] or ".") == os.path.realpath(HERE):
    del sys.path[0]
  parser = argparse.ArgumentParser(prog="reference_timing.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--ref", required=True,
                      help="the official AnySat checkout: the folder of its hubconf.py")
  parser.add_argument("--only", action="append", choices=list(SCENARIOS),
                      help="a scenario to run (repeatable; default: all)")
  parser.add_argument("--runs", type=int, default=3, help="timed calls per scenario")
  parser.add_argument("--warmup", type=int, default=1, help="untimed calls before them")
  parser.add_argument("--threads", type=int, default=2, help="torch threads")
  parser.add_argument("--out", default="", help="write the results here as JSON")
  parser.add_argument("--child", choices=list(SCENARIOS), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.runs < 1 or args.warmup < 0 or args.threads < 1:
    parser.error("--runs and --threads must be >= 1, --warmup >= 0")
  problem = check_ref(args.ref)
  if problem:
    parser.error(problem)
  if args.child:
    print(json.dumps(time_scenario(args.child, args.ref, args.runs, args.warmup, args.threads)),
          flush=True)
    return 0
  results = {}
  for name in dict.fromkeys(args.only or SCENARIOS):
    results[name] = run_child(name, args)
    r = results[name]
    line = (r["error"] if "error" in r
            else f"{r['median_s']:.3f} s/batch, peak RSS {r['peak_rss_mib']:.0f} MiB")
    print(f"{name}: {line}", file=sys.stderr if "error" in r else sys.stdout, flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"results": results}, f, indent=1)
  return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
  raise SystemExit(main())
