"""Entry point: ``python -m anysat_jax.main --config=configs/geoplex.py[:variant] --workdir=DIR``.

Override any config key with ``--config.key=value``. The run resumes by itself from the latest
checkpoint in ``DIR/checkpoints``; SIGTERM (e.g. a TPU preemption) saves and exits cleanly.
"""

from __future__ import annotations

import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (FILE or FILE:ARG).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and outputs go.")


def _init_distributed(config) -> None:
  """Multi-process runs: ``jax.distributed.initialize`` from config, else from the environment
  (Cloud TPU, SLURM, ``JAX_COORDINATOR_ADDRESS``); single process otherwise."""
  import jax
  d = config.get("distributed", {})
  if d.get("cpu_collectives"):
    jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
  if d.get("coordinator_address"):
    jax.distributed.initialize(d.coordinator_address, int(d.num_processes),
                               int(d.process_id))
  elif os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS", "1") != "1" \
      or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()


class _QuietLibraries:
  """Keeps orbax's and grain's per-operation INFO lines out of the run log."""

  def filter(self, record) -> bool:
    return record.levelno >= logging.WARNING or not any(
        f"/{lib}/" in record.pathname for lib in ("orbax", "grain", "tensorflow_datasets"))


def main(argv: list[str]) -> None:
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = FLAGS.config
  if config is None or FLAGS.workdir is None:
    raise app.UsageError("--config and --workdir are required")
  _init_distributed(config)
  from anysat_jax.trainers import pretrain as trainer  # after jax.distributed is set up
  stop = {"requested": False}

  def on_sigterm(signum, frame):
    del frame
    logging.warning("signal %d: saving a checkpoint and exiting", signum)
    stop["requested"] = True

  signal.signal(signal.SIGTERM, on_sigterm)
  task = config.get("task", "pretrain")
  if task == "pretrain":
    trainer.pretrain(config, FLAGS.workdir, stop)
  else:
    from anysat_jax.trainers import finetune
    finetune.run(config, FLAGS.workdir, stop)


if __name__ == "__main__":
  sys.exit(app.run(main))
