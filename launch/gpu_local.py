"""GPU hosts without a scheduler: one ``python -m anysat_jax.main`` process per host, each using
all of its host's GPUs.

  python -m launch.gpu_local --workdir=runs/geoplex                       # this machine
  python -m launch.gpu_local --hosts=gpu0,gpu1 --workdir=/shared/runs/geoplex [--dry-run]

With several hosts, process i runs on host i (over ``ssh``, in ``--repo_dir``; ``localhost``
runs here) with ``--config.distributed.coordinator_address=HOST0:PORT``,
``--config.distributed.num_processes=N`` and ``--config.distributed.process_id=i``, which
``anysat_jax.main`` passes to ``jax.distributed.initialize``. (JAX itself reads only the
coordinator address from the environment, ``JAX_COORDINATOR_ADDRESS``; the process count and id
come from a cluster manager or these flags.) Output lines are prefixed with ``[i]``; the launcher
exits when all processes have, with the first non-zero status.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import threading
from collections.abc import Sequence

from launch import common

LOCAL = "localhost"


def commands(args: argparse.Namespace, overrides: Sequence[str]) -> list[str]:
  """One bash command per process."""
  hosts = args.hosts.split(",")
  n = len(hosts)
  coordinator = args.coordinator_address or f"{hosts[0]}:{args.port}"
  if n > 1 and coordinator.startswith(LOCAL + ":") and set(hosts) != {LOCAL}:
    raise SystemExit("--hosts starts with localhost: give --coordinator_address=NAME:PORT with a "
                     "name the other hosts can reach")
  out = []
  for i, host in enumerate(hosts):
    dist = [] if n == 1 else [f"--config.distributed.coordinator_address={coordinator}",
                              f"--config.distributed.num_processes={n}",
                              f"--config.distributed.process_id={i}"]
    cmd = (f"cd {shlex.quote(args.repo_dir)} && "
           + common.train_command(args.python, args, [*dist, *overrides]))
    out.append(cmd if host == LOCAL else f"ssh {shlex.quote(host)} {shlex.quote(cmd)}")
  return out


def _pump(i: int, stream) -> None:
  for line in stream:
    print(f"[{i}] {line}", end="", flush=True)


def run_all(cmds: Sequence[str]) -> int:
  """Starts every command at once, prefixes their output, waits for all."""
  procs = []
  for i, cmd in enumerate(cmds):
    print(f"+ [{i}] {cmd}", file=sys.stderr, flush=True)
    procs.append(subprocess.Popen(["bash", "-c", cmd], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  pumps = [threading.Thread(target=_pump, args=(i, p.stdout)) for i, p in enumerate(procs)]
  for t in pumps:
    t.start()
  codes = [p.wait() for p in procs]
  for t in pumps:
    t.join()
  return next((c for c in codes if c), 0)


def main(argv: Sequence[str] | None = None) -> int:
  p = common.parser("python -m launch.gpu_local", __doc__)
  p.add_argument("--hosts", default=LOCAL, help="comma-separated hosts, one process each")
  p.add_argument("--coordinator_address", help="HOST:PORT of process 0 (default: HOSTS[0]:PORT)")
  p.add_argument("--port", type=int, default=8476, help="coordinator port")
  p.add_argument("--repo_dir", default=common.REPO, help="this repository on every host")
  p.add_argument("--python", default=sys.executable, help="python of the project's environment")
  args, overrides = common.parse(p, argv)
  cmds = commands(args, overrides)
  if args.dry_run or len(cmds) == 1:
    return common.run(cmds, args.dry_run)
  return run_all(cmds)


if __name__ == "__main__":
  sys.exit(main())
