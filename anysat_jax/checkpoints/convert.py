"""Checkpoint conversion: official AnySat state dicts -> Flax parameters (and an orbax checkpoint).

Usage::

  python -m anysat_jax.convert AnySat.pth OUT_DIR [--size base] [--combiner_attention token]

Reads a torch ``.pth`` (without torch; the unpickler allows only tensor-rebuild globals), an
``.npz`` or a ``.safetensors`` file holding the ``AnyModule`` keys (``state_dict`` of the
released checkpoint), checks that every key maps to exactly one Flax parameter of the right
shape, and writes ``OUT_DIR/params`` (orbax) plus ``OUT_DIR/config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from collections.abc import Mapping

import jax
import numpy as np

from anysat_jax.core import modalities as mods
from anysat_jax.io.torch_pickle.reader import load_state_dict
from anysat_jax.models.config import EncoderConfig, ProjectorConfig, encoder_config, override
from anysat_jax.models.encoder import AnySatEncoder

Params = dict


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


_TRANSFORMS = {
    "": lambda a: a,
    "T": lambda a: a.T,
    "conv": lambda a: a.transpose(2, 3, 1, 0),
    "squeeze0": lambda a: a[0],
    "scalar": lambda a: a.reshape(()) if a.size == 1 else a,
}


def param_shapes(config: EncoderConfig) -> Params:
  """Shapes (``jax.ShapeDtypeStruct``) of every parameter, without allocating them."""
  model = AnySatEncoder(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), method=AnySatEncoder.init_all))
  return shapes["params"]


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
  flat = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      flat.update(_flatten(v, (*prefix, k)))
    else:
      flat[(*prefix, k)] = v
  return flat


def _unflatten(flat: Mapping[tuple[str, ...], object]) -> Params:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def check_layout(shapes: Mapping[str, tuple[int, ...]], config: EncoderConfig) -> int:
  """Checks a state dict's key set and shapes against the model; returns the parameter count.

  ``shapes`` maps torch keys to tensor shapes (no values needed). Raises ``CheckpointError``
  naming every missing, unknown or mis-shaped key.
  """
  model_shapes = _flatten(param_shapes(config))
  mapping = key_map(config)
  if sorted(p for _, p, _ in mapping) != sorted(model_shapes):
    raise AssertionError("internal: key map and model parameters disagree")
  expected = {t for t, _, _ in mapping}
  problems = []
  missing = sorted(expected - set(shapes))
  unknown = sorted(set(shapes) - expected)
  if missing:
    problems.append(f"missing keys: {', '.join(missing)}")
  if unknown:
    problems.append(f"unknown keys: {', '.join(unknown)}")
  for torch_key, path, op in mapping:
    if torch_key not in shapes:
      continue
    shape = tuple(shapes[torch_key])
    # A zero-stride view has any shape for free, so transforms run on shapes alone.
    got = _TRANSFORMS[op](np.broadcast_to(np.float32(0), shape)).shape
    want = tuple(model_shapes[path].shape)
    if got != want:
      problems.append(f"{torch_key}: shape {shape} does not match parameter {'/'.join(path)} "
                      f"{want} (after transform {op or 'none'})")
  if problems:
    raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(problems))
  return sum(int(np.prod(s)) for s in shapes.values())


def state_dict_to_params(state_dict: Mapping[str, np.ndarray],
                         config: EncoderConfig) -> Params:
  """Maps an ``AnyModule`` state dict onto the Flax parameter tree of ``config``.

  Raises ``CheckpointError`` naming every missing, unknown or mis-shaped key.
  """
  check_layout({k: np.shape(v) for k, v in state_dict.items()}, config)
  return _unflatten({path: np.array(_TRANSFORMS[op](np.asarray(state_dict[key])),
                                    dtype=np.float32, order="C")
                     for key, path, op in key_map(config)})


def params_to_state_dict(params: Params, config: EncoderConfig) -> dict[str, np.ndarray]:
  """The inverse of ``state_dict_to_params`` (for exporting to the official layout)."""
  flat = _flatten(params)
  inverse = {"": lambda a: a, "T": lambda a: a.T, "conv": lambda a: a.transpose(3, 2, 0, 1),
             "squeeze0": lambda a: a[None], "scalar": lambda a: a}
  return {t: np.asarray(inverse[op](np.asarray(flat[p]))) for t, p, op in key_map(config)}


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a state dict from ``.pth``/``.pt``/``.ckpt`` (torch zip), ``.npz`` or ``.safetensors``.

  npz keys may carry a ``param/`` prefix (the parity fixtures); torch files may hold the state
  dict at top level or under ``state_dict``.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  suffix = os.path.splitext(path)[1].lower()
  if suffix == ".npz":
    with np.load(path, allow_pickle=False) as z:
      sd = {k: z[k] for k in z.files if k != "meta"}
    sd = {k[len("param/"):] if k.startswith("param/") else k: v for k, v in sd.items()}
  elif suffix == ".safetensors":
    from safetensors.numpy import load_file
    sd = load_file(path)
  elif suffix in (".pth", ".pt", ".ckpt", ".bin"):
    sd = load_state_dict(path)
  else:
    raise ValueError(f"{path}: unknown checkpoint format {suffix!r} "
                     "(expected .pth, .npz or .safetensors)")
  return {k: np.asarray(v) for k, v in sd.items()}


def infer_config(state_dict: Mapping[str, np.ndarray], size: str = "base",
                 **overrides) -> EncoderConfig:
  """Reads width, depths and heads off a state dict (head dim from the iRPE tables) and the
  projector widths off their layers; projectors are built for the modalities present.
  ``overrides`` (e.g. ``combiner_attention``, ``projectors.l7.reduce_scale``) apply on top."""
  def max_index(pattern: str) -> int:
    return max(int(m.group(1)) for k in state_dict if (m := re.match(pattern, k)))

  dim = state_dict["cls_token"].shape[-1]
  depth = max_index(r"blocks\.(\d+)\.")                   # blocks.{depth} is the cross block
  spatial_depth = 1 + max_index(r"spatial_encoder\.predictor_blocks\.(\d+)\.")
  hd = state_dict[f"blocks.{depth}.attn.rpe_k.lookup_table_weight"].shape[1]
  shd = state_dict["spatial_encoder.predictor_blocks.0.attn.rpe_k.lookup_table_weight"].shape[1]
  present = tuple(n for n in mods.MODALITIES if f"projector_{n}.patch_embed.weight" in state_dict
                  or f"projector_{n}.pad_parameter" in state_dict)
  cfg = encoder_config(size, modalities=present, dim=dim, depth=depth, num_heads=dim // hd,
                       spatial_depth=spatial_depth, spatial_heads=dim // shd)
  cfg = dataclasses.replace(cfg, projectors=tuple(
      (name, _infer_projector(state_dict, name, pcfg)) for name, pcfg in cfg.projectors))
  return override(cfg, **overrides)


def _infer_projector(sd: Mapping[str, np.ndarray], name: str,
                     pcfg: ProjectorConfig) -> ProjectorConfig:
  pre = f"projector_{name}"
  if mods.get(name).projector == "vhr":
    widths = [sd[f"{pre}.patch_embed.weight"].shape[0]]
    j = 0
    while f"{pre}.mlp.{3 * j}.weight" in sd:
      widths.append(sd[f"{pre}.mlp.{3 * j}.weight"].shape[0])
      j += 1
    return dataclasses.replace(pcfg, widths=tuple(widths))
  pe = f"{pre}.patch_embed"
  widths, j = [], 0
  while f"{pe}.inconv.{4 * j}.weight" in sd:
    widths.append(sd[f"{pe}.inconv.{4 * j}.weight"].shape[0])
    j += 1
  out_widths, j = [], 0
  while f"{pe}.mlp.{3 * j}.weight" in sd:
    out_widths.append(sd[f"{pe}.mlp.{3 * j}.weight"].shape[0])
    j += 1
  n_head, d_k = sd[f"{pe}.attention_heads.Q"].shape
  return dataclasses.replace(pcfg, widths=tuple(widths), out_widths=tuple(out_widths),
                             in_norm=f"{pe}.in_norm.weight" in sd, n_head=n_head, d_k=d_k)


def config_to_json(config: EncoderConfig) -> str:
  return json.dumps(dataclasses.asdict(config), indent=1)


def config_from_json(text: str) -> EncoderConfig:
  d = json.loads(text)
  projectors = tuple((name, ProjectorConfig(**{k: tuple(v) if isinstance(v, list) else v
                                              for k, v in p.items()}))
                     for name, p in d.pop("projectors"))
  return EncoderConfig(projectors=projectors, **d)


def save(params: Params, config: EncoderConfig, out_dir: str | os.PathLike) -> None:
  """Writes ``out_dir/params`` (orbax, atomic) and ``out_dir/config.json``."""
  import orbax.checkpoint as ocp
  out_dir = os.path.abspath(os.fspath(out_dir))
  os.makedirs(out_dir, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(out_dir, "params"), params, force=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    f.write(config_to_json(config))


def load(path: str | os.PathLike) -> tuple[Params, EncoderConfig]:
  """Reads what ``save`` wrote: (params, config)."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(os.fspath(path))
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"not a converted AnySat checkpoint (no config.json): {path}")
  with open(cfg_path) as f:
    config = config_from_json(f.read())
  target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), param_shapes(config))
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(path, "params"), target)
  return params, config


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m anysat_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("src", help="official checkpoint: .pth, .npz or .safetensors")
  parser.add_argument("out", help="output directory (orbax params + config.json)")
  parser.add_argument("--size", default="base", choices=("tiny", "small", "base"))
  parser.add_argument("--combiner_attention", default="token", choices=("token", "head_axis"))
  args = parser.parse_args(argv)
  sd = read_state_dict(args.src)
  config = infer_config(sd, args.size, combiner_attention=args.combiner_attention)
  params = state_dict_to_params(sd, config)
  save(params, config, args.out)
  n = sum(int(np.prod(v.shape)) for v in sd.values())
  print(f"converted {len(sd)} tensors ({n:,} parameters) from {args.src} -> {args.out}")
  return 0

