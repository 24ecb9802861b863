"""The benchmark helpers: the scenario child's imports, the loop bench's window and progress-line
parsing, and the model formulations changed for speed or memory against their plain form (tiny
arrays; no timing)."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from anysat_jax.core import modalities as mods
from anysat_jax.models import layers
from anysat_jax.models.config import ProjectorConfig
from anysat_jax.models.projectors import VHRProjector
from anysat_jax.tools import bench, compiled_bench, loop_bench
from anysat_jax.trainers import pretrain as trainer


def _rel_l2(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_scenario_child_imports_no_trainer_or_data_pipeline():
  # Its peak RSS is the model's: TensorFlow alone would add ~500 MiB.
  code = ("import sys, json, anysat_jax.tools.bench_run; print(json.dumps(sorted({m.split('.')[0] "
          "for m in sys.modules} & {'tensorflow', 'grain', 'input_pipeline', 'orbax', "
          "'tensorboard'}) + sorted(m for m in sys.modules if m.startswith('anysat_jax.trainers'))"
          "))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_loop_window_and_progress_line_parsing():
  config = loop_bench.loop_config(compiled_bench.load_config(bench.CONFIG_FILE, "demo"), 20, 60)
  assert (config.total_steps, config.log_every) == (80, 20)
  assert config.eval_every > config.total_steps
  assert config.checkpoint.every_steps > config.total_steps
  line = trainer.progress_line(40, 80, {"loss": 1.5, "loss/flair": 2.0}, 3.25)
  m = loop_bench.RATE.match(line)
  assert m and (int(m[1]), float(m[2])) == (40, 3.25)


def test_rematerialised_gelu_equals_exact_gelu_and_its_gradient():
  x = jnp.linspace(-6.0, 6.0, 257, dtype=jnp.float32).reshape(1, 257)
  ref = lambda v: jax.nn.gelu(v, approximate=False)
  np.testing.assert_array_equal(np.asarray(layers.gelu(x)), np.asarray(ref(x)))
  g = jax.grad(lambda v: (layers.gelu(v) * jnp.cos(v)).sum())(x)
  g_ref = jax.grad(lambda v: (ref(v) * jnp.cos(v)).sum())(x)
  assert _rel_l2(g, g_ref) < 1e-6


def test_vhr_projector_tokens_are_the_strided_conv_in_blocked_order():
  # NumPy strided conv, then tokens of patch (pr, pc) in the blocked order (a, b', c, d):
  # conv cell row pr*s*g + a*g + c, column pc*s*g + b'*g + d.
  m = mods.get("aerial")
  k, g, s, n, dim = m.kernel, m.cells_per_10m(), 2, 2, 8
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, m.channels, n * s * g * k + 7, n * s * g * k + 3)).astype(np.float32)
  proj = VHRProjector(m, ProjectorConfig(widths=(dim,)))
  params = proj.init(jax.random.key(0), jnp.asarray(x), s)
  out = np.asarray(proj.apply(params, jnp.asarray(x), s))
  kernel = np.asarray(params["params"]["kernel"], np.float64)
  hc = n * s * g
  win = x[:, :, :hc * k, :hc * k].reshape(2, m.channels, hc, k, hc, k).astype(np.float64)
  cells = np.einsum("bcikjl,klcd->bijd", win, kernel)
  ref = cells.reshape(2, n, s, g, n, s, g, dim).transpose(0, 1, 4, 2, 5, 3, 6, 7)
  ref = ref.reshape(2 * n * n, (s * g) ** 2, dim)
  assert out.shape == ref.shape
  assert _rel_l2(out, ref) < 1e-6
