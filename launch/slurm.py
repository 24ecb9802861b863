"""SLURM GPU clusters: writes an sbatch script (one task per node, all of the node's GPUs) and
submits it.

  python -m launch.slurm --nodes=4 --gpus_per_node=8 --partition=gpu --time=24:00:00 \\
      --workdir=/shared/runs/geoplex [--dry-run] [-- --config.key=value]

``srun`` starts one ``python -m anysat_jax.main`` per node; with more than one task,
``anysat_jax.main`` calls ``jax.distributed.initialize()``, which reads the coordinator, the
process count and the process id from SLURM's environment. ``JAX_LOCAL_DEVICE_IDS`` lists all
of the node's GPUs: without it JAX would give each task only the GPU of its local task id.
SLURM sends SIGTERM ``--signal_s`` seconds before the time limit, and the run saves a checkpoint;
resubmitting the same command resumes it. The script and the SLURM log go to the workdir.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

from launch import common


def script(args: argparse.Namespace, overrides: Sequence[str]) -> str:
  """The sbatch script."""
  opts = {"job-name": args.job_name, "nodes": args.nodes, "ntasks-per-node": 1,
          "gpus-per-node": args.gpus_per_node, "cpus-per-task": args.cpus_per_task,
          "time": args.time, "partition": args.partition, "account": args.account,
          "output": os.path.join(args.workdir, "slurm-%j.out"),
          "signal": f"TERM@{args.signal_s}"}
  lines = ["#!/bin/bash", *(f"#SBATCH --{k}={v}" for k, v in opts.items() if v is not None),
           "set -euo pipefail", f"cd {shlex.quote(args.repo_dir)}",
           "export JAX_LOCAL_DEVICE_IDS=" + ",".join(map(str, range(args.gpus_per_node))),
           "srun --ntasks-per-node=1 --kill-on-bad-exit=1 "
           + common.train_command(args.python, args, overrides)]
  return "\n".join(lines) + "\n"


def commands(args: argparse.Namespace, overrides: Sequence[str]) -> list[str]:
  """mkdir the workdir, write the script there, sbatch it."""
  body = script(args, overrides)   # checks --workdir
  path = os.path.join(args.workdir, f"{args.job_name}.sbatch")
  return [f"mkdir -p {shlex.quote(args.workdir)}",
          f"cat > {shlex.quote(path)} <<'SBATCH'\n{body}SBATCH",
          f"sbatch {shlex.quote(path)}"]


def main(argv: Sequence[str] | None = None) -> int:
  p = common.parser("python -m launch.slurm", __doc__)
  p.add_argument("--nodes", type=int, default=1)
  p.add_argument("--gpus_per_node", type=int, default=8)
  p.add_argument("--cpus_per_task", type=int, help="CPU cores per node (data loading)")
  p.add_argument("--time", default="24:00:00", help="time limit")
  p.add_argument("--partition")
  p.add_argument("--account")
  p.add_argument("--job_name", default="anysat")
  p.add_argument("--signal_s", type=int, default=300,
                 help="SIGTERM this many seconds before the time limit (checkpoint)")
  p.add_argument("--repo_dir", default=common.REPO, help="this repository on the nodes")
  p.add_argument("--python", default=sys.executable, help="python of the project's environment")
  args, overrides = common.parse(p, argv)
  if args.workdir:
    args.workdir = os.path.abspath(args.workdir)   # the script runs in --repo_dir
  return common.run(commands(args, overrides), args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
