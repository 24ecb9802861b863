"""Read PyTorch ``torch.save`` checkpoints with NumPy, without torch; files are untrusted.

Only the zip format (torch >= 1.6, the default since then) is supported: a zip archive holding
``<archive>/data.pkl`` (the pickled object), ``<archive>/data/<key>`` (raw storage bytes) and
optionally ``<archive>/byteorder``, every entry stored uncompressed as torch writes them.

Tensors and ``nn.Parameter``s come back as C-contiguous ``numpy.ndarray`` copies with the
tensor's dtype, shape, strides and storage offset honoured. bfloat16 (and float8) tensors keep
their width as ``ml_dtypes`` arrays (``ml_dtypes.bfloat16``); ``.astype(np.float32)`` widens
them exactly. dtype objects stored as values (``torch.float32`` ...) become ``TorchDtype``.

What a file can do is bounded, and nothing it does changes how another file is read:

- Globals: only ``ALLOWED_GLOBALS`` (tensor, storage and dtype globals, ``OrderedDict``,
  ``datetime`` value types, and ``_codecs.encode`` restricted to the latin-1 text by which pickle
  protocol 2 stores bytes), each resolved per file to an inert value or a new NumPy-based
  stand-in; nothing is imported and no other callable can run (``UnsafeCheckpointError`` names
  the refused ``module.name``).
- Opcodes: those of ``restricted.RestrictedUnpickler`` (counted; ``BUILD`` only on an
  ``OrderedDict``; object construction, sets, extensions and buffers refused by name).
- Bytes: compressed entries are refused (torch stores entries uncompressed; a deflate or bz2
  entry inflates far beyond the file), storages cannot add up to more bytes than the archive,
  and the tensors built from them (stride-0 or overlapping views) to no more than
  ``VIEW_FACTOR`` x those bytes + ``VIEW_SLACK_BYTES``.
- Messages format values with ``common.short_repr`` (bounded depth and length).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import math
import os
import tarfile
import types
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from anysat_jax.io.torch_pickle.common import (
  NUMPY_DTYPES,
  STORAGE_DTYPES,
  TorchCheckpointError,
  TorchDtype,
  UnsafeCheckpointError,
  short_repr,
  torch_dtype,
)
from anysat_jax.io.torch_pickle.restricted import RestrictedUnpickler

VIEW_FACTOR = 4               # Tensors may materialise 4x their storages' bytes (tied weights)...
VIEW_SLACK_BYTES = 64 << 20   # ... plus 64 MiB (small broadcast views).


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
  """Stand-in for ``torch.FloatStorage`` & co: only tells the element dtype."""

  name: str
  dtype: TorchDtype


_CLASSES: dict[tuple[str, str], type] = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch', 'Size'): tuple,
    ('datetime', 'datetime'): datetime.datetime,
    ('datetime', 'date'): datetime.date,
    ('datetime', 'timedelta'): datetime.timedelta,
    ('datetime', 'timezone'): datetime.timezone,
}
_METHODS: dict[tuple[str, str], str] = {  # Bound per file (its messages name the file).
    ('torch._utils', '_rebuild_tensor_v2'): '_rebuild_tensor_v2',
    ('torch._utils', '_rebuild_tensor_v3'): '_rebuild_tensor_v3',
    ('torch._utils', '_rebuild_parameter'): '_rebuild_parameter',
    ('torch._utils', '_rebuild_parameter_with_state'): '_rebuild_parameter_with_state',
    ('_codecs', 'encode'): '_encode',
}
_STORAGE_GLOBALS = {('torch', n) for n in STORAGE_DTYPES} | {('torch.storage', 'UntypedStorage')}
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {*_CLASSES, *_METHODS, *_STORAGE_GLOBALS, *(('torch', n) for n in NUMPY_DTYPES)})


class _Storage:
  """A storage read from the archive: raw bytes plus its element dtype."""

  def __init__(self, key: str, dtype: TorchDtype, raw: np.ndarray, big_endian: bool):
    self.key, self.dtype, self.raw, self.big_endian = key, dtype, raw, big_endian

  def as_dtype(self, dtype: np.dtype) -> np.ndarray | None:
    """1-D native-order view (or byte-swapped copy) of the bytes, None if sizes don't divide."""
    if self.raw.size % dtype.itemsize:
      return None
    raw = self.raw
    if self.big_endian and dtype.itemsize > 1:
      part = dtype.itemsize // 2 if dtype.kind == 'c' else dtype.itemsize
      raw = raw.reshape(-1, part)[:, ::-1].reshape(-1)
    return raw.view(dtype)


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


class _Unpickler(RestrictedUnpickler):
  """Allow-list unpickler for one checkpoint archive."""

  def __init__(self, data_pkl: bytes, zf: zipfile.ZipFile, prefix: str, path: str,
               big_endian: bool, archive_bytes: int):
    super().__init__(data_pkl, path)
    self._zf, self._prefix, self._big = zf, prefix, big_endian
    self._storages: dict[str, _Storage] = {}
    self._archive_bytes, self._stored_bytes, self._built_bytes = archive_bytes, 0, 0

  def find_class(self, module: str, name: str) -> Any:
    key = (module, name)
    if key in _CLASSES:
      return _CLASSES[key]
    if key in _METHODS:
      return getattr(self, _METHODS[key])
    if key in _STORAGE_GLOBALS:
      return _StorageType(name, torch_dtype(STORAGE_DTYPES[name]))
    if module == 'torch' and name in NUMPY_DTYPES:
      return torch_dtype(name)
    raise self.error(
        f'refusing to load global {module:.100}.{name:.100} (not in the allow-list of '
        'tensor/storage/dtype/datetime globals); this checkpoint holds other Python objects. '
        'Re-save only the state dict, e.g. torch.save(ckpt["state_dict"], path), from a trusted '
        'copy.', UnsafeCheckpointError)

  def allowed_callable(self, func: Any) -> bool:
    return (any(func is c for c in _CLASSES.values())
            or (type(func) is types.MethodType and func.__self__ is self))

  def _encode(self, text: Any, encoding: Any) -> bytes:
    """``_codecs.encode`` as pickle protocol 2 stores bytes (e.g. datetime states): latin-1 only."""
    if not (isinstance(text, str) and encoding in ('latin1', 'latin-1')):
      raise self.error(f'refusing _codecs.encode({short_repr(text)}, {short_repr(encoding)}): '
                        'only latin-1 text to bytes is allowed')
    return text.encode('latin1')

  def persistent_load(self, pid: Any) -> _Storage:
    if not (type(pid) is tuple and len(pid) == 5):
      raise self.error(f'unexpected persistent id {short_repr(pid)}')
    typename, storage_type, key, _, numel = pid
    if isinstance(typename, bytes):
      typename = typename.decode('ascii', 'replace')
    if isinstance(key, bytes):
      key = key.decode('ascii', 'replace')
    if (typename != 'storage' or not isinstance(storage_type, _StorageType)
        or not isinstance(key, str) or not _is_int(numel) or numel < 0):
      raise self.error(f'malformed storage record {short_repr(pid)}')
    if key in self._storages:
      return self._storages[key]
    dtype = storage_type.dtype
    if dtype.numpy is None:
      raise self.error(f'storage {key!r:.100}: dtype torch.{dtype.name} has no NumPy equivalent')
    nbytes = numel * dtype.numpy.itemsize
    record = f'{self._prefix}/data/{key}'
    try:
      info = self._zf.getinfo(record)
    except KeyError:
      raise self.error(f'storage {key!r:.100} is missing from the archive (no {record:.200})'
                        ) from None
    if info.file_size < nbytes:
      raise self.error(f'storage {key!r:.100} is truncated: {record:.200} has {info.file_size} '
                        f'bytes, expected {nbytes} ({numel} x {dtype.name})')
    raw = _read_stored(self._zf, info, self.path, nbytes, self._archive_bytes - self._stored_bytes)
    self._stored_bytes += nbytes
    storage = _Storage(key, dtype, np.frombuffer(raw, np.uint8), self._big)
    self._storages[key] = storage
    return storage

  def _rebuild(self, storage: Any, offset: Any, size: Any, stride: Any,
               dtype: TorchDtype) -> np.ndarray:
    """Materialises ``storage[offset:]`` viewed with ``size``/``stride`` (elements) as a copy."""
    if not isinstance(storage, _Storage):
      raise self.error(f'tensor built from {type(storage).__name__}, not a storage')
    if dtype.numpy is None:
      raise self.error(f'tensor dtype torch.{dtype.name} has no NumPy equivalent')
    if not (type(size) in (tuple, list) and type(stride) in (tuple, list)
            and len(size) == len(stride) <= 32  # NumPy's limit.
            and all(_is_int(v) and 0 <= v < 2**62 for v in (offset, *size, *stride))):
      raise self.error(f'storage {storage.key!r:.100}: bad tensor view (offset='
                        f'{short_repr(offset)}, size={short_repr(size)}, '
                        f'stride={short_repr(stride)})')
    size, stride = tuple(size), tuple(stride)
    item = dtype.numpy.itemsize
    self._built_bytes += math.prod(size) * item
    budget = VIEW_FACTOR * self._stored_bytes + VIEW_SLACK_BYTES
    if self._built_bytes > budget:
      raise self.error(
          f'storage {storage.key!r:.100}: tensor view (size={short_repr(size)}, stride='
          f'{short_repr(stride)}) would bring the tensors to {self._built_bytes} bytes, more than '
          f'{VIEW_FACTOR} x the {self._stored_bytes} bytes of storage + {VIEW_SLACK_BYTES} '
          '(stride-0 or overlapping views)')
    if 0 in size:
      return np.zeros(size, dtype.numpy)
    flat = storage.as_dtype(dtype.numpy)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if flat is None or last >= flat.size:
      raise self.error(f'storage {storage.key!r:.100}: tensor view (offset={offset}, '
                        f'size={size}, stride={stride}) does not fit the storage '
                        f'({storage.raw.size} bytes)')
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False)
    return np.array(view, order='C', copy=True)

  def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad,
                         backward_hooks, metadata=None) -> np.ndarray:
    """``torch._utils._rebuild_tensor_v2``: the storage's dtype is the tensor's."""
    if not isinstance(storage, _Storage):
      raise self.error(f'tensor built from {type(storage).__name__}, not a storage')
    return self._rebuild(storage, storage_offset, size, stride, storage.dtype)

  def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad,
                         backward_hooks, dtype, metadata=None) -> np.ndarray:
    """``torch._utils._rebuild_tensor_v3``: an untyped (byte) storage plus an explicit dtype."""
    if not isinstance(dtype, TorchDtype):
      raise self.error(f'tensor dtype {short_repr(dtype)} is not a torch dtype')
    return self._rebuild(storage, storage_offset, size, stride, dtype)

  def _rebuild_parameter(self, data, requires_grad, backward_hooks) -> np.ndarray:
    """``torch._utils._rebuild_parameter``: a Parameter is just its data here."""
    if not isinstance(data, np.ndarray):
      raise self.error(f'parameter built from {type(data).__name__}, not a tensor')
    return data

  def _rebuild_parameter_with_state(self, data, requires_grad, backward_hooks,
                                    state) -> np.ndarray:
    """As ``_rebuild_parameter``; the Parameter's extra Python attributes are dropped."""
    return self._rebuild_parameter(data, requires_grad, backward_hooks)


def _read_stored(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: str, nbytes: int,
                 limit: int) -> bytes:
  """The first ``nbytes`` of an uncompressed entry, if no more than ``limit`` (the archive bytes
  not yet read: entries cannot hold more bytes than the archive unless they overlap)."""
  if info.compress_type != zipfile.ZIP_STORED:
    raise TorchCheckpointError(
        f'{path}: entry {info.filename:.200} is compressed; torch writes entries uncompressed and '
        'compressed ones are refused (they can inflate far beyond the file)')
  if info.compress_size != info.file_size:
    raise TorchCheckpointError(f'{path}: entry {info.filename:.200} is stored, yet its sizes '
                               f'differ ({info.compress_size} and {info.file_size} bytes)')
  if nbytes > limit:
    raise TorchCheckpointError(
        f'{path}: entry {info.filename:.200} claims {nbytes} bytes, more than the archive holds '
        'besides what was read (lying or overlapping zip entries)')
  with zf.open(info) as f:
    raw = f.read(nbytes)
  if len(raw) < nbytes:
    raise TorchCheckpointError(f'{path}: entry {info.filename:.200} is truncated')
  return raw


_LEGACY_HINT = ('the legacy (pre-1.6, non-zip) torch.save format is not supported; re-save it '
                'with torch >= 1.6: torch.save(torch.load(old, map_location="cpu"), new)')


def load_pth(path: str | os.PathLike) -> Any:
  """Loads a ``torch.save`` zip checkpoint with tensors as NumPy arrays, without torch.

  Args:
    path: the ``.pth``/``.pt``/``.ckpt`` file.

  Returns:
    The unpickled object; tensors/Parameters become C-contiguous ``np.ndarray`` copies
    (bfloat16 as ``ml_dtypes.bfloat16``), containers and Python scalars are kept.

  Raises:
    FileNotFoundError: no such file.
    UnsafeCheckpointError: the pickle references a global or opcode outside the allow-list.
    TorchCheckpointError: not a torch zip checkpoint, legacy format, broken storages, or past a
      bound (compressed entries, opcodes, view bytes).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'PyTorch checkpoint not found: {path}')
  if not zipfile.is_zipfile(path):
    with open(path, 'rb') as f:
      head = f.read(2)
    if head[:1] == b'\x80' or tarfile.is_tarfile(path):
      raise TorchCheckpointError(f'{path}: {_LEGACY_HINT}')
    raise TorchCheckpointError(f'{path}: not a PyTorch checkpoint (not a zip archive)')
  try:
    with zipfile.ZipFile(path) as zf:
      names = set(zf.namelist())
      pkls = [n for n in names if n.endswith('/data.pkl') and n.count('/') == 1]
      if len(pkls) != 1:
        raise TorchCheckpointError(
            f'{path}: not a torch.save zip archive (expected one <archive>/data.pkl, found '
            f'{len(pkls)})')
      prefix = pkls[0][:-len('/data.pkl')]
      archive_bytes = os.path.getsize(path)
      big_endian = False
      if f'{prefix}/byteorder' in names:
        info = zf.getinfo(f'{prefix}/byteorder')
        order = _read_stored(zf, info, path, min(info.file_size, 16), archive_bytes)
        order = order.decode('ascii', 'replace').strip()
        if order not in ('little', 'big'):
          raise TorchCheckpointError(f'{path}: unknown byteorder {order!r:.20}')
        big_endian = order == 'big'
      info = zf.getinfo(pkls[0])
      data_pkl = _read_stored(zf, info, path, info.file_size, archive_bytes)
      return _Unpickler(data_pkl, zf, prefix, path, big_endian, archive_bytes).load()
  except TorchCheckpointError:
    raise
  except Exception as e:  # Malformed pickle or zip: report it against the file.
    raise TorchCheckpointError(
        f'{path}: cannot read checkpoint: {type(e).__name__}: {str(e):.300}') from e


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Loads a state dict (``name -> array``) from a torch checkpoint.

  Returns ``ckpt['state_dict']`` if the file holds a dict with that key, else the file's dict
  itself. Key prefixes such as ``model.`` are left alone.

  Raises:
    TorchCheckpointError: the result is not a mapping of ``str`` to arrays (plus the errors of
      ``load_pth``).
  """
  obj = load_pth(path)
  if isinstance(obj, Mapping) and 'state_dict' in obj:
    obj = obj['state_dict']
  if not isinstance(obj, Mapping):
    raise TorchCheckpointError(
        f'{os.fspath(path)}: expected a state dict (mapping of names to tensors), got '
        f'{type(obj).__name__}')
  for k, v in obj.items():
    if not (isinstance(k, str) and isinstance(v, np.ndarray)):
      raise TorchCheckpointError(
          f'{os.fspath(path)}: expected a state dict (mapping of names to tensors), but entry '
          f'{short_repr(k)} is a {type(v).__name__}')
  return obj if isinstance(obj, dict) else dict(obj)
