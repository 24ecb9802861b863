"""The console of ``python -m anysat_jax.main``: a mistyped ``--config.KEY`` is one line naming
the key and the closest valid keys, exit code 2, before any training. (The console of a
pretraining run itself: ``test_trainer.test_evaluations_and_console``.)"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_mistyped_config_key_is_one_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run(
      [sys.executable, "-m", "anysat_jax.main", "--config=configs/geoplex.py:demo",
       f"--workdir={tmp_path / 'run'}", "--config.optim.lrr=1e-3"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stdout == ""
  assert proc.stderr.splitlines() == [
      "error: unknown config key 'optim.lrr'; closest: optim.lr, optim, optim.b2"], proc.stderr
  assert not (tmp_path / "run").exists()        # nothing started
