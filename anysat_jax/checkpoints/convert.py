"""Checkpoint conversion: official AnySat state dicts -> Flax parameters (and an orbax checkpoint).

Usage::

  python -m anysat_jax.convert AnySat.pth OUT_DIR [--size base] [--combiner_attention token]
      [--overwrite] [--allow_nonfinite]

Reads a torch ``.pth`` (without torch; the unpickler allows only tensor-rebuild globals), an
``.npz`` or a ``.safetensors`` file holding the ``AnyModule`` keys (``state_dict`` of the
released checkpoint), checks that every key maps to exactly one Flax parameter of the right
shape and that every weight is a finite floating-point number, and writes ``OUT_DIR/params``
(orbax) plus ``OUT_DIR/config.json``.

``OUT_DIR`` is built next to itself, read back and compared, and only then moved into place: a
failed conversion leaves an existing ``OUT_DIR`` as it was. An existing non-empty ``OUT_DIR`` is
replaced only with ``--overwrite``, and only if it holds nothing but an earlier conversion
(``params`` and ``config.json``). Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Mapping

import jax
import ml_dtypes
import numpy as np

from anysat_jax.checkpoints.key_map import TRANSFORMS, CheckpointError, check_keys, key_map, listing
from anysat_jax.core import modalities as mods
from anysat_jax.io import directories
from anysat_jax.io.torch_pickle.reader import load_state_dict
from anysat_jax.models.config import EncoderConfig, ProjectorConfig, encoder_config, override
from anysat_jax.models.encoder import AnySatEncoder

Params = dict


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
  naming every missing, unknown or mis-shaped key; the key set is checked first, before the
  model's shapes are traced.
  """
  check_keys(shapes, config)
  model_shapes = _flatten(param_shapes(config))
  mapping = key_map(config)
  if sorted(p for _, p, _ in mapping) != sorted(model_shapes):
    raise AssertionError("internal: key map and model parameters disagree")
  problems = []
  for torch_key, path, op in mapping:
    shape = tuple(shapes[torch_key])
    # A zero-stride view has any shape for free, so transforms run on shapes alone.
    got = TRANSFORMS[op](np.broadcast_to(np.float32(0), shape)).shape
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
  return _unflatten({path: np.array(TRANSFORMS[op](np.asarray(state_dict[key])),
                                    dtype=np.float32, order="C")
                     for key, path, op in key_map(config)})


def params_to_state_dict(params: Params, config: EncoderConfig) -> dict[str, np.ndarray]:
  """The inverse of ``state_dict_to_params`` (for exporting to the official layout)."""
  flat = _flatten(params)
  inverse = {"": lambda a: a, "T": lambda a: a.T, "conv": lambda a: a.transpose(3, 2, 0, 1),
             "squeeze0": lambda a: a[None], "scalar": lambda a: a}
  return {t: np.asarray(inverse[op](np.asarray(flat[p]))) for t, p, op in key_map(config)}


def check_values(state_dict: Mapping[str, np.ndarray], source: str = "checkpoint",
                 allow_nonfinite: bool = False) -> None:
  """Refuses weights that are not real floating point, or not finite (unless allowed).

  Raises ``CheckpointError`` naming ``source`` and the offending keys.
  """
  dtypes = {k: np.asarray(v).dtype for k, v in state_dict.items()}
  bad_dtype = [f"{k} ({d})" for k, d in dtypes.items()
               if not (d.kind == "f" or d == ml_dtypes.bfloat16)]
  if bad_dtype:
    raise CheckpointError(f"{source}: weights must be floating point; not so: "
                          f"{listing(sorted(bad_dtype))}")
  if allow_nonfinite:
    return
  nonfinite = []
  for k, v in state_dict.items():
    n = int(np.size(v) - np.count_nonzero(np.isfinite(np.asarray(v, np.float32))))
    if n:
      nonfinite.append(f"{k} ({n} of {np.size(v)})")
  if nonfinite:
    raise CheckpointError(f"{source}: non-finite weights (NaN or Inf) in "
                          f"{listing(sorted(nonfinite))}; pass --allow_nonfinite "
                          "(allow_nonfinite=True) to convert them anyway")


def read_state_dict(path: str | os.PathLike,
                    allow_nonfinite: bool = False) -> dict[str, np.ndarray]:
  """Reads a state dict from ``.pth``/``.pt``/``.ckpt`` (torch zip), ``.npz`` or ``.safetensors``.

  npz keys may carry a ``param/`` prefix (the parity fixtures); torch files may hold the state
  dict at top level or under ``state_dict``. Every weight must be finite floating point
  (``check_values``; non-finite ones pass with ``allow_nonfinite``).

  Raises:
    FileNotFoundError: no such file.
    CheckpointError: unknown format, object arrays, non-float or non-finite weights.
    TorchCheckpointError: a torch file that is malformed or refused (see ``io.torch_pickle``).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  suffix = os.path.splitext(path)[1].lower()
  if suffix in (".npz", ".safetensors"):
    try:
      if suffix == ".npz":  # Object arrays (pickles) are never loaded.
        with np.load(path, allow_pickle=False) as z:
          sd = {k: z[k] for k in z.files if k != "meta"}
        sd = {k[len("param/"):] if k.startswith("param/") else k: v for k, v in sd.items()}
      else:
        from safetensors.numpy import load_file
        sd = load_file(path)
    except Exception as e:  # Whatever the library raises on a malformed file.
      raise CheckpointError(f"{path}: cannot read {suffix[1:]}: {type(e).__name__}: {e}"
                            ) from None
  elif suffix in (".pth", ".pt", ".ckpt", ".bin"):
    sd = load_state_dict(path)
  else:
    raise CheckpointError(f"{path}: unknown checkpoint format {suffix!r} "
                          "(expected .pth, .npz or .safetensors)")
  sd = {k: np.asarray(v) for k, v in sd.items()}
  check_values(sd, path, allow_nonfinite)
  return sd


def _shape(sd: Mapping[str, np.ndarray], key: str, ndim: int) -> tuple[int, ...]:
  """The shape of ``sd[key]``, which must exist, have ``ndim`` axes and no empty one."""
  if key not in sd:
    raise CheckpointError(f"missing key {key} (needed to infer the architecture)")
  shape = tuple(np.shape(sd[key]))
  if len(shape) != ndim or 0 in shape:
    raise CheckpointError(f"{key}: shape {shape}, expected {ndim} non-empty axes")
  return shape


def _count(sd: Mapping[str, np.ndarray], prefix: str) -> int:
  """How many ``<prefix>.<i>.`` blocks there are; their indices must be exactly 0..n-1."""
  pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
  indices = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
  if not indices:
    raise CheckpointError(f"missing keys {prefix}.0.* (needed to infer the architecture)")
  if len(indices) != max(indices) + 1:  # Checked before any model of that depth is built.
    raise CheckpointError(f"{prefix}.<i> indices are not 0..{max(indices)}: only "
                          f"{len(indices)} distinct indices are present")
  return len(indices)


def infer_config(state_dict: Mapping[str, np.ndarray], size: str = "base",
                 **overrides) -> EncoderConfig:
  """Reads width, depths and heads off a state dict (head dim from the iRPE tables) and the
  projector widths off their layers; projectors are built for the modalities present.
  ``overrides`` (e.g. ``combiner_attention``, ``projectors.l7.reduce_scale``) apply on top.

  Raises ``CheckpointError`` for a key set that is not the model's (checked before any model
  is built), missing keys, and empty or inconsistent widths.
  """
  dim = _shape(state_dict, "cls_token", 3)[-1]
  depth = _count(state_dict, "blocks") - 1                 # blocks.{depth} is the cross block
  spatial_depth = _count(state_dict, "spatial_encoder.predictor_blocks")
  hd = _shape(state_dict, f"blocks.{depth}.attn.rpe_k.lookup_table_weight", 3)[1]
  shd = _shape(state_dict, "spatial_encoder.predictor_blocks.0.attn.rpe_k.lookup_table_weight",
               3)[1]
  if dim % hd or dim % shd:
    raise CheckpointError(f"width {dim} (cls_token) is not a multiple of the head widths {hd} "
                          f"and {shd} (iRPE tables)")
  present = tuple(n for n in mods.MODALITIES if f"projector_{n}.patch_embed.weight" in state_dict
                  or f"projector_{n}.pad_parameter" in state_dict)
  cfg = encoder_config(size, modalities=present, dim=dim, depth=depth, num_heads=dim // hd,
                       spatial_depth=spatial_depth, spatial_heads=dim // shd)
  cfg = dataclasses.replace(cfg, projectors=tuple(
      (name, _infer_projector(state_dict, name, pcfg)) for name, pcfg in cfg.projectors))
  cfg = override(cfg, **overrides)
  check_keys(state_dict, cfg)
  return cfg


def _infer_projector(sd: Mapping[str, np.ndarray], name: str,
                     pcfg: ProjectorConfig) -> ProjectorConfig:
  pre = f"projector_{name}"
  if mods.get(name).projector == "vhr":
    widths = [_shape(sd, f"{pre}.patch_embed.weight", 4)[0]]
    j = 0
    while f"{pre}.mlp.{3 * j}.weight" in sd:
      widths.append(_shape(sd, f"{pre}.mlp.{3 * j}.weight", 2)[0])
      j += 1
    return dataclasses.replace(pcfg, widths=tuple(widths))
  pe = f"{pre}.patch_embed"
  widths, j = [], 0
  while f"{pe}.inconv.{4 * j}.weight" in sd:
    widths.append(_shape(sd, f"{pe}.inconv.{4 * j}.weight", 2)[0])
    j += 1
  out_widths, j = [], 0
  while f"{pe}.mlp.{3 * j}.weight" in sd:
    out_widths.append(_shape(sd, f"{pe}.mlp.{3 * j}.weight", 2)[0])
    j += 1
  n_head, d_k = _shape(sd, f"{pe}.attention_heads.Q", 2)
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


_OUTPUT_ENTRIES = {"params", "config.json"}


def _check_out(out_dir: str, overwrite: bool) -> None:
  """Refuses an ``out_dir`` that is a file, or that exists non-empty without ``overwrite``, or
  that holds anything but an earlier conversion."""
  if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f"{out_dir} exists and is not a directory")
  entries = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
  if entries and not overwrite:
    raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite "
                          "(overwrite=True) to replace an earlier conversion")
  if entries - _OUTPUT_ENTRIES:
    raise FileExistsError(f"{out_dir} holds other files than a conversion "
                          f"({listing(sorted(entries - _OUTPUT_ENTRIES), 5)}); refusing to "
                          "replace it")


def save(params: Params, config: EncoderConfig, out_dir: str | os.PathLike,
         overwrite: bool = False) -> None:
  """Writes ``out_dir/params`` (orbax) and ``out_dir/config.json``, atomically.

  Built in a sibling folder, read back and compared with ``params``/``config``, then moved
  into place (``io.directories``): a failure leaves an existing ``out_dir`` untouched. An
  existing non-empty ``out_dir`` is replaced only with ``overwrite`` and only if it holds
  nothing but an earlier conversion.

  Raises:
    FileExistsError: ``out_dir`` is a file, or exists as described above.
    CheckpointError: what was written does not read back equal.
  """
  import orbax.checkpoint as ocp
  out_dir = os.path.abspath(os.fspath(out_dir))
  _check_out(out_dir, overwrite)
  with directories.built_aside(out_dir) as tmp:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, "params"), params)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      f.write(config_to_json(config))
    with ocp.StandardCheckpointer() as ckptr:  # Without a target: no model is traced.
      back = ckptr.restore(os.path.join(tmp, "params"))
    with open(os.path.join(tmp, "config.json")) as f:
      back_config = config_from_json(f.read())
    back, want = _flatten(back), _flatten(params)
    same = back.keys() == want.keys() and all(
        np.array_equal(np.asarray(back[k]), np.asarray(want[k]), equal_nan=True) for k in want)
    if back_config != config or not same:
      raise CheckpointError(f"{out_dir}: the written checkpoint does not read back equal; "
                            "nothing was replaced")
    _check_out(out_dir, overwrite)  # Again: something may have appeared meanwhile.


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
  """Command-line entry point; returns the exit status (2 with one error line on bad input)."""
  parser = argparse.ArgumentParser(prog="python -m anysat_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("src", help="official checkpoint: .pth, .npz or .safetensors")
  parser.add_argument("out", help="output directory (orbax params + config.json)")
  parser.add_argument("--size", default="base", choices=("tiny", "small", "base"))
  parser.add_argument("--combiner_attention", default="token", choices=("token", "head_axis"))
  parser.add_argument("--overwrite", action="store_true",
                      help="replace OUT if it holds an earlier conversion")
  parser.add_argument("--allow_nonfinite", action="store_true",
                      help="convert weights that hold NaN or Inf instead of refusing them")
  args = parser.parse_args(argv)
  try:
    _check_out(os.path.abspath(args.out), args.overwrite)  # Before the (long) conversion.
    sd = read_state_dict(args.src, args.allow_nonfinite)  # Its errors name the file.
    try:
      config = infer_config(sd, args.size, combiner_attention=args.combiner_attention)
      params = state_dict_to_params(sd, config)
    except CheckpointError as e:
      raise CheckpointError(f"{args.src}: {e}") from None
    save(params, config, args.out, overwrite=args.overwrite)
  except (ValueError, OSError) as e:  # Bad input or output: one line, no traceback.
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  n = sum(int(np.prod(v.shape)) for v in sd.values())
  print(f"converted {len(sd)} tensors ({n:,} parameters) from {args.src} -> {args.out}")
  return 0
