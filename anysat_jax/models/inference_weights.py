"""Parameters stored in the matmul dtype, for inference.

With ``dtype="bfloat16"`` the modules keep float32 parameters and round them to bfloat16 where
they are matmul operands (see ``layers``): training needs float32 master weights. A forward
pass alone computes the same thing from parameters stored already rounded, with half their
memory and no casts per call. Which parameters: those that the encoder's forward pass reads,
and reads only through a cast to the matmul dtype, read off its jaxpr, so the rule follows the
modules' code rather than parameter names; the LayerNorms, the L-TAE projectors, tokens and
position tables stay float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp

from anysat_jax.models.encoder import AnySatEncoder


def round_for_inference(module: AnySatEncoder, params: Any) -> Any:
  """``params`` with each array that the forward pass only reads rounded to the module's
  matmul dtype stored in that dtype (same forward values); unchanged for float32 models."""
  dtype = jnp.dtype(module.config.dtype)
  if dtype == jnp.float32:
    return params
  leaves, treedef = jax.tree.flatten(params)

  def touch_all(*flat: jax.Array) -> jax.Array:
    variables = {"params": jax.tree.unflatten(treedef, flat)}
    return module.apply(variables, method=AnySatEncoder.init_all)

  closed = jax.make_jaxpr(touch_all)(*leaves)
  cast, other = set(), set()
  _find_uses(closed.jaxpr, {v: i for i, v in enumerate(closed.jaxpr.invars)}, dtype, cast, other)
  return jax.tree.unflatten(treedef, [
      x.astype(dtype) if i in cast - other and jnp.issubdtype(x.dtype, jnp.floating) else x
      for i, x in enumerate(leaves)])


def _find_uses(jaxpr: jex.Jaxpr, watched: dict[jex.Var, int], dtype: jnp.dtype, cast: set[int],
               other: set[int]) -> None:
  """Adds the index of each watched variable that ``jaxpr`` reads through
  ``convert_element_type`` to ``dtype`` to ``cast``, and that it reads in any other way to
  ``other``. Nested jaxprs (jit, remat, custom derivatives, scan) are followed where their
  inputs are the equation's inputs one to one; any other nesting counts as another use."""
  for eqn in jaxpr.eqns:
    hits = [(pos, watched[v]) for pos, v in enumerate(eqn.invars)
            if isinstance(v, jex.Var) and v in watched]
    if not hits:
      continue
    if (eqn.primitive.name == "convert_element_type"
        and jnp.dtype(eqn.params["new_dtype"]) == dtype):
      cast.update(i for _, i in hits)
      continue
    inner = list(jex.jaxprs_in_params(eqn.params))
    if inner and all(len(j.invars) == len(eqn.invars) for j in inner):
      for j in inner:
        _find_uses(j, {j.invars[pos]: i for pos, i in hits}, dtype, cast, other)
    else:
      other.update(i for _, i in hits)
  other.update(watched[v] for v in jaxpr.outvars if isinstance(v, jex.Var) and v in watched)
