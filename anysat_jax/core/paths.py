"""Paths of the files the package ships, found from a checkout or from an installed wheel.

README commands name configs as ``--config=configs/geoplex.py:demo``, relative to a checkout.
From an installed package (no checkout in the working directory) such a path is resolved inside
the installed ``configs`` package instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

CONFIGS_PACKAGE = "configs"


def configs_dir() -> str | None:
  """The ``configs`` package shipped beside ``anysat_jax`` (in a checkout or in site-packages),
  or None. Found from this file, not by import, so a ``configs`` folder in the working
  directory cannot stand in for it."""
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
      __file__)))), CONFIGS_PACKAGE)
  return root if os.path.isfile(os.path.join(root, "__init__.py")) else None


def resolve_config_path(spec: str, cwd: str | None = None) -> str:
  """A ``FILE[:ARG]`` config flag value with FILE made loadable.

  FILE is kept as given if it exists (relative to ``cwd``, default the working directory) or is
  not of the form ``configs/...``. Otherwise, if ``configs/REST`` exists in the installed
  ``configs`` package, the absolute path of that file is returned, ``:ARG`` kept. Anything else
  is returned unchanged, so the config loader reports the missing file as given.
  """
  path, sep, arg = spec.partition(":")
  if not path or os.path.isabs(path):
    return spec
  if os.path.exists(os.path.join(cwd or os.getcwd(), path)):
    return spec
  parts = os.path.normpath(path).split(os.sep)
  if len(parts) < 2 or parts[0] != CONFIGS_PACKAGE:
    return spec
  root = configs_dir()
  if root is None:
    return spec
  candidate = os.path.join(root, *parts[1:])
  if not os.path.isfile(candidate):
    return spec
  return candidate + sep + arg


def resolve_config_argv(argv: Sequence[str], flag: str = "config",
                        cwd: str | None = None) -> list[str]:
  """``argv`` with the value of ``--FLAG=VALUE`` / ``--FLAG VALUE`` resolved by
  ``resolve_config_path``; overrides such as ``--FLAG.key=value`` are left alone."""
  out = list(argv)
  long = f"--{flag}"
  for i, a in enumerate(out):
    if a == "--":  # the end of the flags
      break
    if a.startswith(long + "="):
      out[i] = long + "=" + resolve_config_path(a[len(long) + 1:], cwd)
    elif a == long and i + 1 < len(out):
      out[i + 1] = resolve_config_path(out[i + 1], cwd)
  return out
