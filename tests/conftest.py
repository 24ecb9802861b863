"""Shared test fixtures."""

from __future__ import annotations

import os
import pathlib

import jax
import pytest

TESTDATA = pathlib.Path(__file__).parent / "testdata"
# Outputs of the official PyTorch model (see testdata/parity/README.md); a newer fixture set in
# the same format can be checked instead by pointing ANYSAT_PARITY_DIR at it.
PARITY_DIR = pathlib.Path(os.environ.get("ANYSAT_PARITY_DIR", TESTDATA / "parity"))


@pytest.fixture(autouse=True, scope="session")
def _highest_matmul_precision():
  with jax.default_matmul_precision("highest"):
    yield
