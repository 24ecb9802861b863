"""Cloud TPU pod slices: create (or reuse) a TPU VM slice, install the project on every worker,
start training on all workers, stream the log, stop, delete.

  python -m launch.tpu_pod up --name=anysat --project=PROJECT --zone=us-central2-b \\
      --accelerator_type=v4-32 --workdir=/mnt/runs/geoplex [--dry-run] [-- --config.key=value]

Actions: ``create`` (describe, else create), ``setup`` (copy this checkout to every worker and
install it in ``REMOTE_DIR/.venv`` with ``jax[tpu]``), ``start`` (``python -m anysat_jax.main``
on every worker in the background, log in ``REMOTE_DIR/run.log``), ``logs`` (follow a worker's
log), ``stop`` (SIGTERM: a checkpoint is saved), ``delete``; ``up`` = create, setup, start, logs.
Every process calls ``jax.distributed.initialize()``: ``JAX_COORDINATOR_ADDRESS`` is worker 0's
address from the TPU metadata server, process count and ids come from the same metadata.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import tomllib
from collections.abc import Sequence

from launch import common

ACTIONS = ("create", "setup", "start", "logs", "stop", "delete", "up")
# TPU VM software versions by accelerator family (cloud.google.com/tpu/docs/runtimes).
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
            "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
COORDINATOR_PORT = 8476
# Worker 0's address: first entry of the slice's endpoints, "host" or "name:id:ip".
_WORKER0 = ("$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/"
            "computeMetadata/v1/instance/attributes/worker-network-endpoints"
            " | cut -d, -f1 | awk -F: '{print $NF}')")
_EXCLUDES = ("./.git", "./.venv", "./runs", "./data", "*.egg-info", "__pycache__", ".pytest_cache")


def jax_tpu_requirement() -> str:
  """``jax[tpu]`` with the version range this project pins for jax (pyproject.toml)."""
  with open(f"{common.REPO}/pyproject.toml", "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
  spec = next(re.sub(r"^jax(?=[<>=!~ ]|$)", "", d) for d in deps if re.match(r"jax([<>=!~ ]|$)", d))
  return f"jax[tpu]{spec.strip()}"


def commands(action: str, args: argparse.Namespace, overrides: Sequence[str]) -> list[str]:
  """The bash commands of one action, in order."""
  if action == "up":
    return [c for a in ("create", "setup", "start", "logs") for c in commands(a, args, overrides)]
  where = f"--project={args.project} --zone={args.zone}"
  tpu = "gcloud compute tpus tpu-vm"
  ssh = f"{tpu} ssh {args.name} {where}"
  remote = shlex.quote(args.remote_dir)
  if action == "create":
    family = args.accelerator_type.split("-")[0]
    version = args.runtime_version or RUNTIMES.get(family)
    if version is None:
      raise SystemExit(f"no default runtime for {args.accelerator_type}; pass --runtime_version")
    create = (f"{tpu} create {args.name} {where} --accelerator-type={args.accelerator_type} "
              f"--version={version}" + (" --spot" if args.spot else ""))
    return [f"{tpu} describe {args.name} {where} --format='value(state)' || {create}"]
  if action == "setup":
    tarball = f"/tmp/anysat-jax-{args.name}.tar.gz"
    excludes = " ".join(f"--exclude={shlex.quote(e)}" for e in _EXCLUDES)
    install = (f"mkdir -p {remote} && tar -xzf anysat-jax.tar.gz -C {remote} && cd {remote} && "
               "export PATH=$HOME/.local/bin:$PATH && "
               "{ command -v uv || curl -LsSf https://astral.sh/uv/install.sh | sh; } && "
               "{ test -d .venv || uv venv --python 3.11 .venv; } && uv pip install "
               f"--python .venv/bin/python -e . {shlex.quote(jax_tpu_requirement())}")
    return [f"tar -czf {tarball} {excludes} -C {shlex.quote(common.REPO)} .",
            f"{tpu} scp {tarball} {args.name}:anysat-jax.tar.gz {where} --worker=all",
            f"{ssh} --worker=all --command={shlex.quote(install)}"]
  if action == "start":
    train = common.train_command(".venv/bin/python", args, overrides)
    start = (f"cd {remote} || exit 1; JAX_COORDINATOR_ADDRESS={_WORKER0}:{COORDINATOR_PORT} "
             f"nohup {train} > run.log 2>&1 < /dev/null & echo $! > run.pid")
    return [f"{ssh} --worker=all --command={shlex.quote(start)}"]
  if action == "logs":
    follow = f"tail -n +1 -F {remote}/run.log"
    return [f"{ssh} --worker={args.worker} --command={shlex.quote(follow)}"]
  if action == "stop":
    stop = f"kill -TERM $(cat {remote}/run.pid)"
    return [f"{ssh} --worker=all --command={shlex.quote(stop)}"]
  if action == "delete":
    return [f"{tpu} delete {args.name} {where} --quiet"]
  raise SystemExit(f"unknown action {action!r}; choose from {', '.join(ACTIONS)}")


def main(argv: Sequence[str] | None = None) -> int:
  p = common.parser("python -m launch.tpu_pod", __doc__)
  p.add_argument("action", choices=ACTIONS)
  p.add_argument("--name", required=True, help="TPU VM (slice) name")
  p.add_argument("--project", required=True, help="Google Cloud project")
  p.add_argument("--zone", required=True, help="zone, e.g. us-central2-b")
  p.add_argument("--accelerator_type", default="v4-32", help="e.g. v4-32, v5p-64, v6e-16")
  p.add_argument("--runtime_version", help="TPU VM software version (default: by family)")
  p.add_argument("--spot", action="store_true", help="create a Spot (preemptible) slice")
  p.add_argument("--remote_dir", default="anysat-jax", help="project folder on the workers")
  p.add_argument("--worker", default="0", help="logs: worker index, or 'all'")
  args, overrides = common.parse(p, argv)
  return common.run(commands(args.action, args, overrides), args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
