"""Shared test fixtures."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

# Identical programs compiled by several tests (and their subprocesses, which inherit the
# environment) are compiled once: the suite is dominated by XLA compile time on CPU. The
# session's own cache folder is removed at the end (``pytest_unconfigure``); one given in the
# environment is left alone.
_OWN_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE_DIR = tempfile.mkdtemp(prefix="anysat-jax-test-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE_DIR
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# LLVM's optimisation of the generated CPU code is most of the compile time of these small
# programs, and more than the tests win back at run time; XLA's graph-level passes (fusion,
# layout) still run, so the numerics are those of a normal build.
BACKEND_O0 = "--xla_backend_optimization_level=0"
if BACKEND_O0 not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {BACKEND_O0}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

TESTDATA = pathlib.Path(__file__).parent / "testdata"
# Outputs of the official PyTorch model (see testdata/parity/README.md); a newer fixture set in
# the same format can be checked instead by pointing ANYSAT_PARITY_DIR at it.
PARITY_DIR = pathlib.Path(os.environ.get("ANYSAT_PARITY_DIR", TESTDATA / "parity"))


@pytest.fixture(autouse=True, scope="session")
def _highest_matmul_precision():
  with jax.default_matmul_precision("highest"):
    yield


def pytest_unconfigure(config: pytest.Config) -> None:
  if _OWN_CACHE_DIR is not None:
    shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)
