"""Entry point: ``python -m anysat_jax.main --config=configs/geoplex.py[:variant] --workdir=DIR``.

Override any config key with ``--config.key=value`` (an unknown key: one line naming the
closest valid keys, exit code 2). The run resumes by itself from the latest checkpoint in
``DIR/checkpoints``; SIGTERM (e.g. a TPU preemption) saves and exits cleanly.

Console: the trainers' progress lines and warnings; the libraries' INFO logs (absl, orbax,
TensorFlow, TFDS) only with ``--verbosity=1``.
"""

from __future__ import annotations

import os
import sys

# TensorFlow's C++ logs and start-up notices (written to fd 2 before any log setting applies),
# unless asked for (--verbosity): before anything else imports TensorFlow (the data pipeline).
if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  _stderr, _null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(_null, 2)
  try:
    import tensorflow  # noqa: F401
  finally:
    os.dup2(_stderr, 2)
    os.close(_stderr)
    os.close(_null)

import difflib  # noqa: E402
import logging as pylogging  # noqa: E402
import signal  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from anysat_jax.core import paths  # noqa: E402
from anysat_jax.trainers import finetune  # noqa: E402
from anysat_jax.trainers import pretrain as trainer  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (FILE or FILE:ARG).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and outputs go.")

_QUIET_LOGGERS = ("tensorflow", "tensorflow_datasets", "absl", "orbax", "grain", "jax")


def _init_distributed(config: ml_collections.ConfigDict) -> None:
  """Multi-process runs: ``jax.distributed.initialize`` from config, else from the environment
  (Cloud TPU, SLURM, ``JAX_COORDINATOR_ADDRESS``); single process otherwise."""
  d = config.get("distributed", {})
  if d.get("cpu_collectives"):
    jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
  if d.get("coordinator_address"):
    jax.distributed.initialize(d.coordinator_address, int(d.num_processes),
                               int(d.process_id))
  elif os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS", "1") != "1" \
      or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()


def config_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every dotted key of ``config`` (nested dicts included)."""
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out += config_keys(ml_collections.ConfigDict(value) if isinstance(value, dict) else value,
                         f"{prefix}{key}.")
  return out


def _has_key(config: ml_collections.ConfigDict, path: str) -> bool:
  node = config
  for part in path.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      return False
    node = node[part]
  return True


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; a bad ``--config.KEY=...`` override exits with one line (an unknown
  key: the closest valid keys) and code 2."""
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError, flags.Error) as e:
    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv[1:]
                 if a.startswith("--config.")]
    files = [a for a in argv[1:] if a.startswith("--config=")]
    if not overrides or not files:
      raise
    alone = flags.FlagValues()      # the file's config without the overrides
    config_flags.DEFINE_config_file("config", None, "", flag_values=alone)
    saved, sys.argv = sys.argv, [argv[0], files[-1]]   # config_flags reads sys.argv's overrides
    try:
      alone(sys.argv)
    finally:
      sys.argv = saved
    config = alone.config
    for key in overrides:
      if not _has_key(config, key):
        close = difflib.get_close_matches(key, config_keys(config), n=3, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        print(f"error: unknown config key {key!r}{hint}", file=sys.stderr)
        sys.exit(2)
    print(f"error: bad config override: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)


def _quiet_libraries() -> None:
  """The default console: warnings and the trainers' own lines only (``--verbosity=1``: all)."""
  if FLAGS.verbosity >= 1:
    return
  logging.set_verbosity(logging.WARNING)
  for name in _QUIET_LOGGERS:
    pylogging.getLogger(name).setLevel(pylogging.WARNING)


def main(argv: list[str]) -> None:
  del argv
  _quiet_libraries()
  config = FLAGS.config
  if config is None or FLAGS.workdir is None:
    raise app.UsageError("--config and --workdir are required")
  _init_distributed(config)
  stop = {"requested": False}

  def on_sigterm(signum, frame):
    del frame
    logging.warning("signal %d: saving a checkpoint and exiting", signum)
    stop["requested"] = True

  signal.signal(signal.SIGTERM, on_sigterm)
  if config.get("task", "pretrain") == "pretrain":
    trainer.pretrain(config, FLAGS.workdir, stop)
  else:
    finetune.run(config, FLAGS.workdir, stop)


if __name__ == "__main__":
  # configs/X.py resolves inside the installed package when the cwd has no such file.
  sys.exit(app.run(main, argv=paths.resolve_config_argv(sys.argv), flags_parser=parse_flags))
