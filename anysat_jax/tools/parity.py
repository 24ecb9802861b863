"""Parity check against outputs of the official PyTorch AnySat.

Usage::

  python -m anysat_jax.parity DIR [--tol 1e-4]

For every ``case_*.npz`` in DIR (the fixture format: ``input/<key>``, ``output/<variant>``,
JSON ``meta`` with the config, the weights file and the variants), builds the model from the
case's meta, loads the weights through the checkpoint converter, runs every variant and prints
its relative L2 error ``||y - ref|| / ||ref||``. Ends with ``worst rel_l2 <x> over <n> variants``
and exits 0 iff every variant is under the tolerance.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Any

import jax
import numpy as np

from anysat_jax.checkpoints import convert
from anysat_jax.inference.api import AnySat


def case_mode(meta: dict[str, Any]) -> str:
  """Combiner attention mode of a case (cases without the field are token mode)."""
  if "combiner_attention" in meta:
    return meta["combiner_attention"]
  return "head_axis" if meta.get("flash_attn") else "token"


def load_case(path: str) -> tuple[AnySat, dict[str, np.ndarray], dict[str, Any], Any]:
  """(model with the case's weights, ordered inputs, variants meta, npz) of one case file."""
  z = np.load(path, allow_pickle=False)
  meta = json.loads(str(z["meta"]))
  weights = os.path.join(os.path.dirname(path), meta["weights_file"])
  sd = convert.read_state_dict(weights)
  overrides = {k: v for k, v in meta.get("hubconf_overrides", {}).items() if "drop" not in k}
  config = convert.infer_config(sd, combiner_attention=case_mode(meta), **overrides)
  model = AnySat(params=convert.state_dict_to_params(sd, config), config=config)
  inputs = {k: z["input/" + k] for k in meta["inputs"]}
  return model, inputs, meta["variants"], z


def rel_l2(y: np.ndarray, ref: np.ndarray) -> float:
  if y.shape != ref.shape:
    return float("inf")
  return float(np.linalg.norm((y - ref).ravel()) / np.linalg.norm(ref.ravel()))


def run(directory: str, tol: float) -> tuple[float, int, bool]:
  """Checks every case in ``directory``; returns (worst rel_l2, variants, all passed)."""
  paths = sorted(glob.glob(os.path.join(directory, "case_*.npz")))
  if not paths:
    raise FileNotFoundError(f"no case_*.npz files in {directory}")
  worst, count, ok = 0.0, 0, True
  with jax.default_matmul_precision("highest"):
    for path in paths:
      case = os.path.basename(path)[:-4]
      try:
        model, inputs, variants, z = load_case(path)
      except Exception as e:  # report and go on with the other cases
        print(f"{case}: FAILED to load: {type(e).__name__}: {e}", flush=True)
        ok = False
        continue
      for name, v in variants.items():
        ref = z["output/" + name]
        try:
          y = np.asarray(model(inputs, int(v["patch_size_m"]), v["output"],
                               v.get("output_modality") or None))
          err = rel_l2(y, ref)
          note = "" if y.shape == ref.shape else f"  shape {y.shape} != {ref.shape}"
        except Exception as e:
          err, note = float("inf"), f"  {type(e).__name__}: {e}"
        passed = err < tol
        ok &= passed
        worst = max(worst, err)
        count += 1
        print(f"{case:32s} {name:28s} rel_l2 {err:.3e} {'ok' if passed else 'FAIL'}{note}",
              flush=True)
  return worst, count, ok


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m anysat_jax.parity", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("directory")
  parser.add_argument("--tol", type=float, default=1e-4)
  args = parser.parse_args(argv)
  worst, count, ok = run(args.directory, args.tol)
  print(f"worst rel_l2 {worst:.3e} over {count} variants")
  return 0 if ok else 1

