"""Side-by-side speed and memory against the official PyTorch AnySat (``bench --reference``).

  python -m anysat_jax.bench --reference --torch_python PY --reference_dir OFFICIAL_CHECKOUT \
      [--rounds 3] [--repeats 3] [--reference_script SCRIPT]

Runs, in separate processes so that each peak resident memory (``ru_maxrss``) is its own, the
official model's scenarios through ``anysat_jax/tools/reference_timing.py`` (or another
``--reference_script`` with its command line), run by ``--torch_python`` on the official
checkout ``--reference_dir`` (github.com/gastruc/AnySat, the folder of its ``hubconf.py``; the
official code is never imported here nor copied into this project), this project's matching
``bench`` scenarios in float32 and bfloat16, and a 2048 x 2048 matmul with XLA (float32,
bfloat16) and torch (float32). The jobs are interleaved (A B C ... A B C ...) for ``--rounds``
rounds and each number is the median over rounds of the per-round median, so that a slow spell
of a shared machine hits every column. Prints one table: both models' seconds per batch and peak
RSS, the speed ratio (reference time / ours: > 1 is faster) and the memory ratio (ours /
reference: < 1 is smaller), and the matmul peaks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Any

MATMUL_N = 2048
# This project's timing script for the official model (run by the torch Python, not this one).
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_timing.py")
# (row label, reference scenario, our scenario, our dtype)
PAIRS = (
    ("tiny fwd+bwd b8", "treesat_tiny_train_fwd_bwd", "tiny_treesat_b8_fwd_bwd", "float32"),
    ("base forward b8", "treesat_base_eval", "base_treesat_b8", "float32"),
    ("base forward b8", "treesat_base_eval", "base_treesat_b8", "bfloat16"),
)

TORCH_MATMUL = f"""
import json, time, torch
torch.set_num_threads(2)
n = {MATMUL_N}
a, b = torch.randn(n, n), torch.randn(n, n)
a @ b
times = []
for _ in range(5):
  t0 = time.perf_counter(); a @ b; times.append(time.perf_counter() - t0)
print(json.dumps(dict(gflops=2 * n ** 3 / min(times) / 1e9)))
"""


def _last_json(text: str) -> dict[str, Any]:
  return json.loads(text.strip().splitlines()[-1])


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, capture_output=True, text=True, env=os.environ)


def add_options(parser: argparse.ArgumentParser) -> None:
  """``bench``'s ``--reference`` options."""
  parser.add_argument("--reference", action="store_true",
                      help="time the official PyTorch model beside ours (reference_compare)")
  parser.add_argument("--torch_python", default="",
                      help="--reference (required): a python with torch and the official "
                           "code's needs")
  parser.add_argument("--reference_dir", default="",
                      help="--reference (required): the official AnySat checkout "
                           "(github.com/gastruc/AnySat), the folder of its hubconf.py")
  parser.add_argument("--reference_script", default=SCRIPT,
                      help="--reference: the official model's timing script (default: this "
                           "project's anysat_jax/tools/reference_timing.py)")
  parser.add_argument("--rounds", type=int, default=3, help="--reference: interleaved rounds")


def check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """With ``--reference``: a parser error naming what is missing or wrong."""
  if not args.reference:
    return
  missing = [flag for flag, value in (("--torch_python", args.torch_python),
                                      ("--reference_dir", args.reference_dir)) if not value]
  if missing:
    parser.error(f"--reference needs {' and '.join(missing)} (--torch_python: a python with "
                 "torch; --reference_dir: the official AnySat checkout, the folder of its "
                 "hubconf.py)")
  if shutil.which(args.torch_python) is None:
    parser.error(f"--torch_python {args.torch_python}: no such program")
  if not os.path.isfile(os.path.join(args.reference_dir, "hubconf.py")):
    parser.error(f"--reference_dir {args.reference_dir}: no hubconf.py there; give the folder "
                 "of a checkout of the official AnySat repository (github.com/gastruc/AnySat)")
  if not os.path.isfile(args.reference_script):
    parser.error(f"--reference_script {args.reference_script}: no such file")


def run_ours(scenario: str, dtype: str, repeats: int) -> dict[str, Any]:
  """One of our scenarios in a fresh process: {'s': seconds per batch, 'rss': MiB}."""
  p = _run([sys.executable, "-m", "anysat_jax.tools.bench_run", scenario, "--dtype", dtype,
            "--repeats", str(repeats)])
  if p.returncode:
    raise RuntimeError(f"{scenario} ({dtype}) failed:\n{p.stderr[-2000:]}")
  r = _last_json(p.stdout)
  return dict(s=r["s_per_batch"], rss=r["peak_rss_mib"])


def run_reference(python: str, script: str, ref_dir: str, scenario: str,
                  repeats: int) -> dict[str, Any]:
  """One official scenario through a timing script with ``SCRIPT``'s command line (it runs each
  scenario in a fresh process)."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "ref.json")
    p = _run([python, script, "--only", scenario, "--runs", str(repeats), "--warmup", "1",
              "--out", out, "--ref", ref_dir])
    if p.returncode or not os.path.exists(out):
      raise RuntimeError(f"reference {scenario} failed:\n{p.stdout[-1000:]}{p.stderr[-2000:]}")
    with open(out) as f:
      r = json.load(f)["results"][scenario]
  if "error" in r:
    raise RuntimeError(f"reference {scenario}: {r['error']}")
  return dict(s=r["median_s"], rss=r["peak_rss_mib"])


def run_matmul(python: str) -> dict[str, float]:
  """XLA float32 / bfloat16 and (run by ``python``) torch float32 matmul GFLOP/s."""
  out = {}
  for dtype in ("float32", "bfloat16"):
    p = _run([sys.executable, "-m", "anysat_jax.tools.bench_run", "--matmul", dtype])
    out[f"xla {dtype}"] = _last_json(p.stdout)["gflops"] if not p.returncode else float("nan")
  p = _run([python, "-c", TORCH_MATMUL])
  out["torch float32"] = _last_json(p.stdout)["gflops"] if not p.returncode else float("nan")
  return out


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown CPU"


def _keep(jobs: dict, key: tuple[str, ...], result: dict[str, float]) -> None:
  """Adds a job's result and logs it (stderr) as it comes."""
  jobs.setdefault(key, []).append(result)
  print(f"  {' '.join(key)}: {json.dumps(result)}", file=sys.stderr, flush=True)


def compare(torch_python: str, script: str, ref_dir: str, rounds: int = 3,
            repeats: int = 3) -> int:
  """Runs the interleaved rounds and prints the table; 0 on success. The arguments are those
  that ``check_options`` accepted."""
  jobs: dict[tuple[str, ...], list[dict[str, Any]]] = {}
  for _ in range(rounds):
    done = set()       # the reference's base forward serves both dtypes of ours
    for _, ref, ours, dtype in PAIRS:
      if ref not in done:
        _keep(jobs, ("ref", ref), run_reference(torch_python, script, ref_dir, ref, repeats))
        done.add(ref)
      _keep(jobs, ("ours", ours, dtype), run_ours(ours, dtype, repeats))
    _keep(jobs, ("matmul",), run_matmul(torch_python))
  med = {k: {f: statistics.median(x[f] for x in v) for f in v[0]} for k, v in jobs.items()}
  spread = {k: (min(x["s"] for x in v), max(x["s"] for x in v))
            for k, v in jobs.items() if k[0] != "matmul"}
  print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs; medians of {rounds} interleaved "
        f"rounds x {repeats} timed runs", flush=True)
  print(f"{'scenario':18s} {'dtype':9s} {'ref s':>7s} {'ours s':>7s} {'speed x':>7s} "
        f"{'ref MiB':>8s} {'ours MiB':>8s} {'mem x':>6s}  ours s min-max", flush=True)
  for label, ref, ours, dtype in PAIRS:
    o = med[("ours", ours, dtype)]
    rr = med[("ref", ref)]
    lo, hi = spread[("ours", ours, dtype)]
    print(f"{label:18s} {dtype:9s} {rr['s']:7.3f} {o['s']:7.3f} {rr['s'] / o['s']:7.2f} "
          f"{rr['rss']:8.0f} {o['rss']:8.0f} {o['rss'] / rr['rss']:6.2f}  {lo:.3f}-{hi:.3f}",
          flush=True)
  peaks = ", ".join(f"{k} {v:.0f}" for k, v in med[("matmul",)].items())
  print(f"matmul {MATMUL_N}^2 GFLOP/s: {peaks}", flush=True)
  return 0
