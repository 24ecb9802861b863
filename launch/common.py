"""Pieces shared by the launchers: argument parsing, the training command, running commands."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
  """A parser with the options every launcher has; config overrides go after ``--``."""
  p = argparse.ArgumentParser(prog=prog, description=doc,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/geoplex.py",
                 help="config file[:variant], relative to the repository")
  p.add_argument("--workdir", help="run directory, shared by all processes")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="environment variable of the training processes (repeatable)")
  p.add_argument("--dry-run", action="store_true",
                 help="print the commands that would run and run nothing")
  return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None
          ) -> tuple[argparse.Namespace, list[str]]:
  """(options, the ``--config.key=value`` overrides after ``--``)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = argv[argv.index("--") + 1:] if "--" in argv else []
  args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
  for kv in args.env:
    if "=" not in kv:
      p.error(f"--env takes KEY=VALUE, got {kv!r}")
  return args, overrides


def train_command(python: str, args: argparse.Namespace, overrides: Sequence[str],
                  env: Sequence[str] = ()) -> str:
  """``[env K=V ...] PYTHON -m anysat_jax.main --config=... --workdir=... OVERRIDES``."""
  if not args.workdir:
    raise SystemExit("--workdir is required")
  env = [*env, *args.env]
  argv = [python, "-m", "anysat_jax.main", f"--config={args.config}",
          f"--workdir={args.workdir}", *overrides]
  return shlex.join(["env", *env, *argv] if env else argv)


def run(commands: Sequence[str], dry_run: bool) -> int:
  """Runs bash commands in turn, stopping at the first failure; with ``dry_run`` prints them."""
  for cmd in commands:
    if dry_run:
      print(cmd, flush=True)
      continue
    print(f"+ {cmd}", file=sys.stderr, flush=True)
    rc = subprocess.run(["bash", "-c", cmd]).returncode
    if rc:
      return rc
  return 0
