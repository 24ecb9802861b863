"""The official AnySat state-dict layout: which torch key is which Flax parameter, and how.

``key_map(config)`` lists (torch key, Flax parameter path, transform) for every parameter of an
``EncoderConfig``; ``TRANSFORMS`` turns a torch tensor into the Flax parameter. Pure Python: no
model is built, so ``check_keys`` checks a key set before anything is allocated.
"""

from __future__ import annotations

from collections.abc import Mapping

from anysat_jax.core import modalities as mods
from anysat_jax.models.config import EncoderConfig


class CheckpointError(ValueError):
  """A checkpoint that does not match the model; the message names the offending keys."""


def _linear(prefix: str) -> list[tuple[str, str, str]]:
  return [(f"{prefix}.weight", "kernel", "T"), (f"{prefix}.bias", "bias", "")]


def _norm(prefix: str) -> list[tuple[str, str, str]]:
  return [(f"{prefix}.weight", "scale", ""), (f"{prefix}.bias", "bias", "")]


def _sub(pairs, flax_prefix: str) -> list[tuple[str, tuple[str, ...], str]]:
  return [(t, (*flax_prefix.split("/"), leaf), op) for t, leaf, op in pairs]


def key_map(config: EncoderConfig) -> list[tuple[str, tuple[str, ...], str]]:
  """(torch key, Flax parameter path, transform) for every parameter of the model.

  Transforms: ``T`` (Linear (out, in) -> kernel (in, out)), ``conv`` ((O, I, kh, kw) ->
  (kh, kw, I, O)), ``squeeze0`` (drop a leading axis of 1), ``scalar`` (a 0-d or 1-element
  tensor -> 0-d), ``""`` (copy).
  """
  out: list[tuple[str, tuple[str, ...], str]] = [("cls_token", ("cls_token",), "")]
  for name, pcfg in config.projectors:
    m = mods.get(name)
    tp, fp = f"projector_{name}", m.param_name
    if m.projector == "vhr":
      out.append((f"{tp}.patch_embed.weight", (fp, "kernel"), "conv"))
      for j in range(len(pcfg.widths) - 1):
        out += _sub(_linear(f"{tp}.mlp.{3 * j}"), f"{fp}/fc_{j}")
        out += _sub(_norm(f"{tp}.mlp.{3 * j + 1}"), f"{fp}/ln_{j}")
      continue
    pe = f"{tp}.patch_embed"
    out.append((f"{tp}.pad_parameter", (fp, "pad_value"), "scalar"))
    for j in range(len(pcfg.widths)):
      out += _sub(_linear(f"{pe}.inconv.{4 * j}"), f"{fp}/in_fc_{j}")
      out += _sub(_norm(f"{pe}.inconv.{4 * j + 1}"), f"{fp}/in_gn_{j}")
    if pcfg.in_norm:
      out += _sub(_norm(f"{pe}.in_norm"), f"{fp}/in_norm")
    out.append((f"{pe}.attention_heads.Q", (fp, "master_query"), ""))
    out += _sub(_linear(f"{pe}.attention_heads.fc1_k"), f"{fp}/key_proj")
    for j in range(len(pcfg.out_widths)):
      out += _sub(_linear(f"{pe}.mlp.{3 * j}"), f"{fp}/out_fc_{j}")
      out += _sub(_norm(f"{pe}.mlp.{3 * j + 1}"), f"{fp}/out_gn_{j}")
    out += _sub(_norm(f"{pe}.out_norm"), f"{fp}/out_norm")
  out.append(("spatial_encoder.cls_token", ("spatial_encoder", "cls_token"), ""))
  for i in range(config.spatial_depth):
    tb, fb = f"spatial_encoder.predictor_blocks.{i}", f"spatial_encoder/block_{i}"
    out += _block(tb, fb)
    out.append((f"{tb}.attn.rpe_k.lookup_table_weight", (*fb.split("/"), "attn", "rpe_table"),
                "squeeze0"))
  out += _sub(_norm("spatial_encoder.predictor_norm"), "spatial_encoder/norm")
  for i in range(config.depth):
    out += _block(f"blocks.{i}", f"combiner/block_{i}")
  tc, fc = f"blocks.{config.depth}", "combiner/cross"
  out += _sub(_norm(f"{tc}.norm1"), f"{fc}/norm1")
  out.append((f"{tc}.attn.q_learned", (*fc.split("/"), "attn", "q_learned"), ""))
  for lin in ("wk", "wv", "proj"):
    out += _sub(_linear(f"{tc}.attn.{lin}"), f"{fc}/attn/{lin}")
  out.append((f"{tc}.attn.rpe_k.lookup_table_weight", (*fc.split("/"), "attn", "rpe_table"),
              "squeeze0"))
  out += _sub(_norm(f"{tc}.norm2"), f"{fc}/norm2")
  out += _sub(_linear(f"{tc}.mlp.fc1"), f"{fc}/mlp/fc1")
  out += _sub(_linear(f"{tc}.mlp.fc2"), f"{fc}/mlp/fc2")
  return out


def _block(tb: str, fb: str) -> list[tuple[str, tuple[str, ...], str]]:
  pairs = _sub(_norm(f"{tb}.norm1"), f"{fb}/norm1")
  pairs += _sub(_linear(f"{tb}.attn.qkv"), f"{fb}/attn/qkv")
  pairs += _sub(_linear(f"{tb}.attn.proj"), f"{fb}/attn/proj")
  pairs += _sub(_norm(f"{tb}.norm2"), f"{fb}/norm2")
  pairs += _sub(_linear(f"{tb}.mlp.fc1"), f"{fb}/mlp/fc1")
  pairs += _sub(_linear(f"{tb}.mlp.fc2"), f"{fb}/mlp/fc2")
  return pairs


TRANSFORMS = {
    "": lambda a: a,
    "T": lambda a: a.T,
    "conv": lambda a: a.transpose(2, 3, 1, 0),
    "squeeze0": lambda a: a[0],
    "scalar": lambda a: a.reshape(()) if a.size == 1 else a,
}


def listing(keys: list[str], limit: int = 12) -> str:
  """``a, b, c and 9 more``: the first ``limit`` keys."""
  shown = ", ".join(keys[:limit])
  return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_keys(keys: set[str] | Mapping[str, object], config: EncoderConfig) -> None:
  """Checks a state dict's key set against the model's, without building the model.

  Raises ``CheckpointError`` naming the missing and unknown keys (the first 12 of each).
  """
  expected = {t for t, _, _ in key_map(config)}
  missing, unknown = sorted(expected - set(keys)), sorted(set(keys) - expected)
  problems = [f"{what} keys: {listing(ks)}" for what, ks in (("missing", missing),
                                                               ("unknown", unknown)) if ks]
  if problems:
    raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(problems))
