"""Device mesh and placement rules: batches over all devices, parameters replicated or FSDP.

Mesh axes are ``("data", "fsdp")``. The batch axis is split over both (every device holds a
distinct slice of examples); a parameter leaf of at least ``fsdp_min_size`` elements is split
over ``fsdp`` along its largest axis divisible by the fsdp size, smaller leaves are replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp")


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """Mesh from ``config.mesh.{data, fsdp}`` (-1 = all remaining devices)."""
  n = jax.device_count()
  data, fsdp = int(config.mesh.data), int(config.mesh.fsdp)
  if data == -1:
    data = n // fsdp
  if fsdp == -1:
    fsdp = n // data
  if data * fsdp != n:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} does not match the {n} devices")
  return jax.make_mesh((data, fsdp), AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis over every device."""
  return NamedSharding(mesh, P(AXES))


def _leaf_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def tree_sharding(tree: Any, mesh: jax.sharding.Mesh, fsdp_min_size: int) -> Any:
  """NamedSharding per leaf of a pytree of arrays (or shape structs) by the FSDP rule."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, _leaf_spec(tuple(np.shape(x)), fsdp, fsdp_min_size)), tree)


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Process-local rows -> global arrays sharded over the batch axis."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
