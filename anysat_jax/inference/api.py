"""Feature-extraction API, shaped like the official hub model.

  model = anysat_jax.AnySat(size="base")                 # random weights
  model = anysat_jax.AnySat.from_pretrained("base")       # released weights, by name
  model = anysat_jax.AnySat.from_pretrained("AnySat.pth") # a file (or a converted dir)
  feats = model(batch, patch_size=20, output="tile")      # (B, E)

``batch`` is a dict of numpy or jax arrays: images (B, C, H, W); time series (B, T, C, H, W)
with ``<mod>_dates`` (B, T) day of year, optional ``<mod>_mask`` (B, T) date mask and
``<mod>_valid`` value mask. Values must be normalised per channel beforehand. NaN/Inf values
are missing values by default (folded into ``<mod>_valid``, with a log line), or refused
with ``nonfinite="raise"``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from anysat_jax.checkpoints import convert
from anysat_jax.core import modalities as mods
from anysat_jax.inference import pretrained
from anysat_jax.models import inference_weights, xla_options
from anysat_jax.models.config import EncoderConfig, encoder_config, override
from anysat_jax.models.encoder import AnySatEncoder, select_output
from anysat_jax.models.validation import count_nonfinite, validate_inputs

log = logging.getLogger(__name__)

Params = Any


class AnySat:
  """An encoder with its parameters; calling it validates the batch and runs a jit-compiled
  forward pass, compiled once per input-shape signature and patch size (``tile``, ``patch`` and
  ``all`` share it; ``dense`` compiles once per dense modality).

  Attributes:
    config: the ``EncoderConfig``.
    module: the Flax module (``AnySatEncoder``).
    params: the parameter tree. With ``dtype="bfloat16"`` the arrays that the forward pass
      only reads rounded to bfloat16 (matmul weights) are stored in bfloat16: same outputs,
      half their memory (``models.inference_weights``).
    num_compiles: how many times the forward pass has been traced and compiled.
  """

  def __init__(self, size: str = "base", params: Params | None = None, *, seed: int = 0,
               config: EncoderConfig | None = None, **overrides: Any):
    """Builds a model from a size preset (``tiny``, ``small``, ``base``) and overrides (see
    ``config.encoder_config``), with ``params`` or random weights drawn from ``seed``."""
    self.config = config if config is not None else encoder_config(size, **overrides)
    self.module = AnySatEncoder(self.config)
    if params is None:
      init = jax.jit(lambda key: self.module.init(key, method=AnySatEncoder.init_all))
      # The rbg generator needs far less scratch memory than threefry for 126M values.
      params = init(jax.random.key(seed, impl="rbg"))["params"]
    self.params = inference_weights.round_for_inference(self.module, params)
    self.num_compiles = 0
    self._features = jax.jit(self._traced_features,
                             static_argnames=("order", "patch_size", "dense_modality"),
                             compiler_options=xla_options.forward(self.config.dtype))

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> AnySat:
    """Loads released weights by name (``"base"``, ``"base-head-axis"``: downloaded once,
    converted and cached, see ``inference.pretrained``), a converted checkpoint directory
    (``python -m anysat_jax.convert``), or converts an official ``.pth`` / ``.npz`` /
    ``.safetensors`` state dict on the fly.

    ``overrides`` may set ``combiner_attention`` and the projectors' ``reduce_scale``.
    """
    path = os.fspath(path)
    if path in pretrained.RELEASES and not os.path.exists(path):
      path = pretrained.resolve(path)
    if os.path.isdir(path):
      params, config = convert.load(path)
      return cls(params=params, config=override(config, **overrides))
    sd = convert.read_state_dict(path)
    config = convert.infer_config(sd, **overrides)
    return cls(params=convert.state_dict_to_params(sd, config), config=config)

  def apply(self, params: Params, batch: Mapping[str, Any], patch_size: int,
            output: str = "tile", output_modality: str | None = None, *,
            raster_dense: bool = False) -> jax.Array:
    """Pure forward pass (no validation, no jit): for composing inside your own jitted code.

    Under ``jax.jit`` a dict's keys are sorted, so give ``output_modality`` explicitly for
    ``dense``; the default (first modality) follows the dict's order.
    """
    return self.module.apply({"params": params}, dict(batch), patch_size, output,
                             output_modality, raster_dense=raster_dense)

  def __call__(self, batch: Mapping[str, Any], patch_size: int, output: str = "tile",
               output_modality: str | None = None, *, raster_dense: bool = False,
               nonfinite: str = "mask") -> jax.Array:
    """Validates ``batch`` and encodes it; see ``AnySatEncoder.__call__`` for the outputs.

    ``nonfinite``: ``"mask"`` treats NaN/Inf data values as missing (folded into
    ``<mod>_valid``, a log line counts them); ``"raise"`` refuses them with a ValueError
    naming the modality and the count.
    """
    validate_inputs(batch, patch_size, self.config, output, output_modality,
                    nonfinite=nonfinite)
    arrays = {k: _as_input(k, v) for k, v in _fold_nonfinite(batch).items()}
    dense_modality = None
    if output == "dense":
      dense_modality = output_modality or mods.modality_keys(batch)[0]
    z, sub = self._features(self.params, arrays, order=tuple(batch),
                            patch_size=int(patch_size), dense_modality=dense_modality)
    return select_output(z, sub, output, dense_modality, int(patch_size) // 10, raster_dense)

  def _traced_features(self, params, arrays, *, order, patch_size, dense_modality):
    # Tile, patch and all share one compiled function; only dense needs its sub-tokens.
    self.num_compiles += 1          # runs only when jax traces, i.e. once per compile
    ordered = {k: arrays[k] for k in order}
    return self.module.apply({"params": params}, ordered, patch_size, dense_modality,
                             method=AnySatEncoder.features)


def _fold_nonfinite(batch: Mapping[str, Any]) -> dict[str, Any]:
  """The batch with NaN/Inf data values set to 0 and marked 0 in ``<mod>_valid``."""
  out = dict(batch)
  for name in mods.modality_keys(batch):
    x = batch[name]
    bad = count_nonfinite(x)
    if not bad:
      continue
    log.info("%s: %d of %d values are NaN or Inf; treated as missing (%s%s)", name, bad, x.size,
             name, mods.VALID_SUFFIX)
    finite = jnp.isfinite(jnp.asarray(x))
    key = name + mods.VALID_SUFFIX
    if key in batch:
      finite = finite & (jnp.broadcast_to(jnp.asarray(batch[key]), finite.shape) != 0)
    out[name] = jnp.where(finite, jnp.asarray(x), 0)
    out[key] = finite.astype(jnp.uint8)
  return out


def _as_input(key: str, value: Any) -> jax.Array:
  """Data and masks as float32 (float64 is narrowed), dates as float32 days."""
  arr = value if isinstance(value, jax.Array) else np.asarray(value)
  if key.endswith(mods.AUX_SUFFIXES) or arr.dtype == np.float64:
    return jnp.asarray(arr, jnp.float32)
  return jnp.asarray(arr)

