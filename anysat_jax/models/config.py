"""Encoder configuration: the size presets and per-modality projector settings.

``EncoderConfig`` is a frozen (hashable) dataclass so that it can parameterise jit-compiled
functions. ``encoder_config(size, **overrides)`` accepts flat field names (``dim=64``) and the
official hub's dotted names (``**{"projectors.l7.reduce_scale": 3}``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from anysat_jax.core import modalities as mods
from anysat_jax.models.layers import ATTENTION_IMPLS


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
  """One modality's projector.

  widths: VHR: MLP widths after the conv, e.g. (E, 2E, E). L-TAE: input-MLP widths after the
    channels, e.g. (E/8, E/2, E, 2E, E).
  out_widths: L-TAE only: widths of the MLP after the temporal attention, e.g. (E,).
  reduce_scale, date_period, in_norm: see ``modalities.Modality``.
  n_head, d_k: L-TAE attention heads and key width.
  dropout: L-TAE only: dropout rate after every input-MLP stage and after the output MLP
    (the pretraining config's rates, ``LTAE_DROPOUT``); active only in a non-deterministic
    (training) apply.
  attn_dropout: L-TAE only: dropout rate of the attention weights over the dates (0.1, fixed
    in the reference); likewise training-only.
  """

  widths: tuple[int, ...]
  out_widths: tuple[int, ...] = ()
  reduce_scale: int = 1
  date_period: float = 367.0
  in_norm: bool = False
  n_head: int = 16
  d_k: int = 8
  dropout: float = 0.0
  attn_dropout: float = 0.1


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """The whole encoder. Widths are channels; depths are blocks.

  dtype: compute dtype name (``float32`` or ``bfloat16``) of the transformers' and VHR
    projectors' matmuls (see ``layers``); parameters, the residual stream, norms, softmaxes, the
    L-TAE projectors and the outputs stay float32.
  attention_impl: ``xla`` (explicit einsums) or ``dot_product_attention``
    (``jax.nn.dot_product_attention``, cuDNN's fused kernel on NVIDIA GPUs in bf16); see
    ``layers.attention``.
  remat: recompute each transformer block's activations in the backward pass (less memory).
  chunk_tokens: > 0: the L-TAE projectors (pixel x date rows) and the spatial encoder (patch x
    token rows) run in chunks of at most this many rows, each chunk rematerialised, so that
    training holds one chunk's activations instead of the whole batch's (see
    ``layers.chunked_map``); 0: one pass. Results do not depend on it.
  """

  dim: int
  depth: int
  num_heads: int
  spatial_depth: int
  spatial_heads: int
  mlp_ratio: float = 4.0
  combiner_attention: str = "token"
  projectors: tuple[tuple[str, ProjectorConfig], ...] = ()
  dtype: str = "float32"
  attention_impl: str = "xla"
  remat: bool = False
  chunk_tokens: int = 0

  def projector(self, modality: str) -> ProjectorConfig:
    for name, cfg in self.projectors:
      if name == modality:
        return cfg
    raise ValueError(f"modality {modality!r} has no projector in this model "
                     f"(it has: {', '.join(self.modality_names)})")

  @property
  def modality_names(self) -> tuple[str, ...]:
    return tuple(name for name, _ in self.projectors)


SIZES: Mapping[str, dict[str, int]] = {
    "tiny": dict(dim=256, depth=2, num_heads=4, spatial_depth=2, spatial_heads=4),
    "small": dict(dim=512, depth=4, num_heads=8, spatial_depth=4, spatial_heads=8),
    "base": dict(dim=768, depth=6, num_heads=12, spatial_depth=6, spatial_heads=12),
}


# L-TAE dropout rates of the pretraining encoder config (Any_Base_multi.yaml); 0.2 elsewhere.
LTAE_DROPOUT = {"s2": 0.0, "l8": 0.0}


def default_projector(modality: str, dim: int) -> ProjectorConfig:
  m = mods.get(modality)
  if m.projector == "vhr":
    return ProjectorConfig(widths=(dim, 2 * dim, dim))
  return ProjectorConfig(widths=(dim // 8, dim // 2, dim, 2 * dim, dim), out_widths=(dim,),
                         reduce_scale=m.reduce_scale, date_period=m.date_period,
                         in_norm=m.in_norm, dropout=LTAE_DROPOUT.get(modality, 0.2))


# Dotted names of the official hub constructor that map onto ours.
_HUB_NAMES = {"embed_dim": "dim", "depth": "depth", "num_heads": "num_heads",
              "spatial_encoder.embed_dim": "dim", "spatial_encoder.depth": "spatial_depth",
              "spatial_encoder.num_heads": "spatial_heads", "mlp_ratio": "mlp_ratio",
              "spatial_encoder.mlp_ratio": "mlp_ratio"}
_PROJECTOR_NAMES = {"mlp_in": "widths", "reduce_scale": "reduce_scale", "T": "date_period",
                    "in_norm": "in_norm", "n_head": "n_head", "d_k": "d_k", "dropout": "dropout",
                    "attn_dropout": "attn_dropout"}


def encoder_config(size: str = "base", *, modalities: tuple[str, ...] | None = None,
                   **overrides: Any) -> EncoderConfig:
  """Builds a config from a preset (``tiny``, ``small``, ``base``) and overrides.

  Overrides: any ``EncoderConfig`` field (``dim``, ``depth``, ``combiner_attention``, ``dtype``
  (a name or a numpy / jax dtype, stored as its name) …), or the
  hub's dotted names (``embed_dim``, ``spatial_encoder.depth``, ``projectors.<mod>.<field>``
  with field ``mlp_in``, ``mlp``, ``reduce_scale``, ``T``, ``in_norm``, ``n_head``, ``d_k``,
  ``dropout``, ``attn_dropout``, ``embed_dim``). ``modalities`` limits which projectors are
  built (default: all 11). Unknown names raise ``ValueError``.
  """
  if size not in SIZES:
    raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
  fields, per_modality = _parse(overrides)
  fields = {**SIZES[size], **fields}
  names = tuple(mods.MODALITIES) if modalities is None else tuple(modalities)
  for name in names:
    mods.get(name)
  projectors = tuple((name, default_projector(name, fields["dim"])) for name in names)
  return _apply(EncoderConfig(projectors=projectors, **fields), {}, per_modality)


def run_overrides(overrides: Mapping[str, Any], projectors: Mapping[str, Mapping[str, Any]]
                  ) -> dict[str, Any]:
  """The ``encoder_config`` overrides of a run config: its ``model.overrides`` and its
  ``model.projectors`` (``{mod: {field: value}}``, the form a ``ConfigDict`` can hold) as
  ``projectors.<mod>.<field>``."""
  out = dict(overrides)
  for name, fields in projectors.items():
    out.update({f"projectors.{name}.{k}": v for k, v in fields.items()})
  return out


def override(config: EncoderConfig, **overrides: Any) -> EncoderConfig:
  """A copy of ``config`` with overrides (same names as ``encoder_config``)."""
  return _apply(config, *_parse(overrides))


def _parse(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
  fields: dict[str, Any] = {}
  per_modality: dict[str, dict[str, Any]] = {}
  valid_fields = {f.name for f in dataclasses.fields(EncoderConfig)} - {"projectors"}
  for key, value in overrides.items():
    if key in valid_fields:
      fields[key] = value
    elif key in _HUB_NAMES:
      fields[_HUB_NAMES[key]] = value
    elif key.startswith("projectors.") and key.count(".") == 2:
      _, name, attr = key.split(".")
      mods.get(name)
      per_modality.setdefault(name, {})[attr] = value
    else:
      raise ValueError(f"unknown encoder setting {key!r}")
  if fields.get("combiner_attention", "token") not in ("token", "head_axis"):
    raise ValueError(f"combiner_attention must be 'token' or 'head_axis', "
                     f"got {fields['combiner_attention']!r}")
  if fields.get("attention_impl", "xla") not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, "
                     f"got {fields['attention_impl']!r}")
  if "dtype" in fields:
    fields["dtype"] = _dtype_name(fields["dtype"])
  return fields, per_modality


def _dtype_name(dtype: Any) -> str:
  """Canonical name of a floating compute dtype (``jnp.bfloat16`` -> ``bfloat16``)."""
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    raise ValueError(f"unknown dtype {dtype!r}") from None
  if not jnp.issubdtype(name, jnp.floating):
    raise ValueError(f"compute dtype must be floating, got {name!r}")
  return name


def _apply(config: EncoderConfig, fields: dict[str, Any],
           per_modality: dict[str, dict[str, Any]]) -> EncoderConfig:
  unknown = sorted(set(per_modality) - set(config.modality_names))
  if unknown:
    raise ValueError(f"projector settings given for modalities not built: {unknown}")
  projectors = []
  for name, cfg in config.projectors:
    changes: dict[str, Any] = {}
    for attr, value in per_modality.get(name, {}).items():
      if attr == "embed_dim":
        continue  # a projector's output width is the model width
      if attr == "mlp":
        changes["widths" if mods.get(name).projector == "vhr" else "out_widths"] = tuple(value)
      elif attr in _PROJECTOR_NAMES:
        changes[_PROJECTOR_NAMES[attr]] = tuple(value) if isinstance(value, list) else value
      else:
        raise ValueError(f"unknown projector setting 'projectors.{name}.{attr}'")
    projectors.append((name, dataclasses.replace(cfg, **changes)))
  config = dataclasses.replace(config, projectors=tuple(projectors), **fields)
  _check(config)
  return config


def _check(config: EncoderConfig) -> None:
  for name, field in (("num_heads", config.num_heads), ("spatial_heads", config.spatial_heads)):
    if config.dim % field:
      raise ValueError(f"dim {config.dim} is not divisible by {name} {field}")
  for name, p in config.projectors:
    if mods.get(name).projector != "ltae":
      continue
    # GroupNorm(4) over a width of 4 has one channel per group: it outputs its bias whatever
    # the input, and the projector would ignore its data.
    narrow = [w for w in (*p.widths, *p.out_widths) if w // 4 < 2 or w % 4]
    if narrow or p.widths[-1] % p.n_head:
      raise ValueError(f"projectors.{name}: L-TAE widths {p.widths} + {p.out_widths} need "
                       f"multiples of 4 of at least 8 (GroupNorm(4)) and a last width divisible "
                       f"by n_head {p.n_head}; use dim >= 64 or set projectors.{name}.mlp_in")
