"""Read and write PyTorch ``torch.save`` checkpoints with NumPy, without torch; reads safely.

Only the zip format (torch >= 1.6, the default since then) is supported: a zip archive holding
``<archive>/data.pkl`` (the pickled object), ``<archive>/data/<key>`` (raw storage bytes) and
optionally ``<archive>/byteorder``. The pickle is read by an unpickler whose ``find_class``
resolves only an explicit allow-list of globals (``ALLOWED_GLOBALS``: tensor, storage and dtype
globals, ``datetime`` value types, and ``_codecs.encode`` restricted to the latin-1 text by which
pickle protocol 2 stores bytes) to inert values or this module's own NumPy-based stand-ins;
nothing is imported and no other callable can run. Any other global raises
``UnsafeCheckpointError`` naming the refused ``module.name`` and the file.

Tensors and ``nn.Parameter``s come back as C-contiguous ``numpy.ndarray`` copies with the
tensor's dtype, shape, strides and storage offset honoured. bfloat16 (and float8) tensors keep
their width as ``ml_dtypes`` arrays (``ml_dtypes.bfloat16``); ``.astype(np.float32)`` widens
them exactly. dtype objects stored as values (``torch.float32`` ...) become ``TorchDtype``.

``save_pth`` writes the same format (as torch writes it) from NumPy arrays and plain values.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import os
import pickle
import tarfile
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np


class TorchCheckpointError(ValueError):
  """A checkpoint file is missing pieces, malformed, or in an unsupported format."""


class UnsafeCheckpointError(TorchCheckpointError):
  """The checkpoint's pickle references a global outside the allow-list."""


@dataclasses.dataclass(frozen=True, slots=True)
class TorchDtype:
  """Stand-in for a ``torch.dtype``: its torch name and NumPy dtype (None if NumPy has none)."""

  name: str
  numpy: np.dtype | None


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
  """Stand-in for ``torch.FloatStorage`` & co: only tells the element dtype."""

  name: str
  dtype: TorchDtype


_NUMPY_DTYPES: dict[str, Any] = {
    'float64': np.float64, 'float32': np.float32, 'float16': np.float16,
    'bfloat16': ml_dtypes.bfloat16,
    'int64': np.int64, 'int32': np.int32, 'int16': np.int16, 'int8': np.int8,
    'uint64': np.uint64, 'uint32': np.uint32, 'uint16': np.uint16, 'uint8': np.uint8,
    'bool': np.bool_, 'complex128': np.complex128, 'complex64': np.complex64,
    'float8_e4m3fn': ml_dtypes.float8_e4m3fn, 'float8_e5m2': ml_dtypes.float8_e5m2,
    'float8_e4m3fnuz': ml_dtypes.float8_e4m3fnuz, 'float8_e5m2fnuz': ml_dtypes.float8_e5m2fnuz,
    'complex32': None,
}
DTYPES: dict[str, TorchDtype] = {
    name: TorchDtype(name, None if t is None else np.dtype(t)) for name, t in _NUMPY_DTYPES.items()
}

_STORAGE_DTYPES = {
    'DoubleStorage': 'float64', 'FloatStorage': 'float32', 'HalfStorage': 'float16',
    'BFloat16Storage': 'bfloat16', 'LongStorage': 'int64', 'IntStorage': 'int32',
    'ShortStorage': 'int16', 'CharStorage': 'int8', 'ByteStorage': 'uint8',
    'BoolStorage': 'bool', 'ComplexDoubleStorage': 'complex128',
    'ComplexFloatStorage': 'complex64', 'UntypedStorage': 'uint8',
}

# (module, name) -> value. Strings name an _Unpickler method (bound per file, for messages).
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): '_rebuild_tensor_v2',
    ('torch._utils', '_rebuild_tensor_v3'): '_rebuild_tensor_v3',
    ('torch._utils', '_rebuild_parameter'): '_rebuild_parameter',
    ('torch._utils', '_rebuild_parameter_with_state'): '_rebuild_parameter_with_state',
    ('torch', 'Size'): tuple,
    ('_codecs', 'encode'): '_encode',
    ('datetime', 'datetime'): datetime.datetime,
    ('datetime', 'date'): datetime.date,
    ('datetime', 'timedelta'): datetime.timedelta,
    ('datetime', 'timezone'): datetime.timezone,
    ('torch.storage', 'UntypedStorage'): _StorageType('UntypedStorage', DTYPES['uint8']),
    **{('torch', n): _StorageType(n, DTYPES[d]) for n, d in _STORAGE_DTYPES.items()},
    **{('torch', n): d for n, d in DTYPES.items()},
}


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


class _Unpickler(pickle.Unpickler):
  """Allow-list unpickler for one checkpoint archive."""

  def __init__(self, data_pkl, zf: zipfile.ZipFile, prefix: str, path: str, big_endian: bool):
    super().__init__(data_pkl)
    self._zf, self._prefix, self._path, self._big = zf, prefix, path, big_endian
    self._storages: dict[str, _Storage] = {}

  def _error(self, msg: str) -> TorchCheckpointError:
    return TorchCheckpointError(f'{self._path}: {msg}')

  def find_class(self, module: str, name: str) -> Any:
    value = ALLOWED_GLOBALS.get((module, name))
    if value is None:
      raise UnsafeCheckpointError(
          f'{self._path}: refusing to load global {module}.{name!s} (not in the allow-list of '
          'tensor/storage/dtype/datetime globals); this checkpoint holds other Python objects. '
          'Re-save only the state dict, e.g. torch.save(ckpt["state_dict"], path), from a trusted '
          'copy.')
    return getattr(self, value) if isinstance(value, str) else value

  def _encode(self, text: Any, encoding: Any) -> bytes:
    """``_codecs.encode`` as pickle protocol 2 stores bytes (e.g. datetime states): latin-1 only."""
    if not (isinstance(text, str) and encoding in ('latin1', 'latin-1')):
      raise self._error(f'refusing _codecs.encode({text!r:.50}, {encoding!r:.50}): only latin-1 '
                        'text to bytes is allowed')
    return text.encode('latin1')

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) == 5):
      raise self._error(f'unexpected persistent id {pid!r:.200}')
    typename, storage_type, key, _, numel = pid
    if isinstance(typename, bytes):
      typename = typename.decode('ascii')
    if isinstance(key, bytes):
      key = key.decode('ascii')
    if (typename != 'storage' or not isinstance(storage_type, _StorageType)
        or not isinstance(key, str) or not _is_int(numel) or numel < 0):
      raise self._error(f'malformed storage record {pid!r:.200}')
    if key in self._storages:
      return self._storages[key]
    dtype = storage_type.dtype
    if dtype.numpy is None:
      raise self._error(f'storage {key!r}: dtype torch.{dtype.name} has no NumPy equivalent')
    nbytes = numel * dtype.numpy.itemsize
    record = f'{self._prefix}/data/{key}'
    try:
      info = self._zf.getinfo(record)
    except KeyError:
      raise self._error(f'storage {key!r} is missing from the archive (no {record})') from None
    raw = b''
    if info.file_size >= nbytes:
      with self._zf.open(info) as f:
        raw = f.read(nbytes)
    if len(raw) < nbytes:
      raise self._error(f'storage {key!r} is truncated: {record} has {info.file_size} bytes, '
                        f'expected {nbytes} ({numel} x {dtype.name})')
    storage = _Storage(key, dtype, np.frombuffer(raw, np.uint8), self._big)
    self._storages[key] = storage
    return storage

  def _rebuild(self, storage: Any, offset: Any, size: Any, stride: Any,
               dtype: TorchDtype) -> np.ndarray:
    """Materialises ``storage[offset:]`` viewed with ``size``/``stride`` (elements) as a copy."""
    if not isinstance(storage, _Storage):
      raise self._error(f'tensor built from {type(storage).__name__}, not a storage')
    if dtype.numpy is None:
      raise self._error(f'tensor dtype torch.{dtype.name} has no NumPy equivalent')
    size, stride = tuple(size), tuple(stride)
    if (not _is_int(offset) or offset < 0 or len(size) != len(stride)
        or not all(_is_int(v) and v >= 0 for v in size + stride)):
      raise self._error(f'storage {storage.key!r}: bad tensor view '
                        f'(offset={offset!r}, size={size!r}, stride={stride!r})')
    if 0 in size:
      return np.zeros(size, dtype.numpy)
    flat = storage.as_dtype(dtype.numpy)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if flat is None or last >= flat.size:
      raise self._error(f'storage {storage.key!r}: tensor view (offset={offset}, size={size}, '
                        f'stride={stride}) does not fit the storage ({storage.raw.size} bytes)')
    item = dtype.numpy.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False)
    return np.array(view, order='C', copy=True)

  def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad,
                         backward_hooks, metadata=None) -> np.ndarray:
    """``torch._utils._rebuild_tensor_v2``: the storage's dtype is the tensor's."""
    if not isinstance(storage, _Storage):
      raise self._error(f'tensor built from {type(storage).__name__}, not a storage')
    return self._rebuild(storage, storage_offset, size, stride, storage.dtype)

  def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad,
                         backward_hooks, dtype, metadata=None) -> np.ndarray:
    """``torch._utils._rebuild_tensor_v3``: an untyped (byte) storage plus an explicit dtype."""
    if not isinstance(dtype, TorchDtype):
      raise self._error(f'tensor dtype {dtype!r:.100} is not a torch dtype')
    return self._rebuild(storage, storage_offset, size, stride, dtype)

  def _rebuild_parameter(self, data, requires_grad, backward_hooks) -> np.ndarray:
    """``torch._utils._rebuild_parameter``: a Parameter is just its data here."""
    if not isinstance(data, np.ndarray):
      raise self._error(f'parameter built from {type(data).__name__}, not a tensor')
    return data

  def _rebuild_parameter_with_state(self, data, requires_grad, backward_hooks,
                                    state) -> np.ndarray:
    """As ``_rebuild_parameter``; the Parameter's extra Python attributes are dropped."""
    return self._rebuild_parameter(data, requires_grad, backward_hooks)


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
    UnsafeCheckpointError: the pickle references a global outside ``ALLOWED_GLOBALS``.
    TorchCheckpointError: not a torch zip checkpoint, legacy format, or broken storages.
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
      pkls = [n for n in zf.namelist() if n.endswith('/data.pkl') and n.count('/') == 1]
      if len(pkls) != 1:
        raise TorchCheckpointError(
            f'{path}: not a torch.save zip archive (expected one <archive>/data.pkl, found '
            f'{len(pkls)})')
      prefix = pkls[0][:-len('/data.pkl')]
      big_endian = False
      if f'{prefix}/byteorder' in zf.namelist():
        order = zf.read(f'{prefix}/byteorder').decode('ascii', 'replace').strip()
        if order not in ('little', 'big'):
          raise TorchCheckpointError(f'{path}: unknown byteorder {order!r}')
        big_endian = order == 'big'
      with zf.open(pkls[0]) as data_pkl:
        return _Unpickler(data_pkl, zf, prefix, path, big_endian).load()
  except TorchCheckpointError:
    raise
  except Exception as e:  # Malformed pickle or zip: report it against the file.
    raise TorchCheckpointError(f'{path}: cannot read checkpoint: {type(e).__name__}: {e}') from e


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
          f'{k!r:.100} is a {type(v).__name__}')
  return obj if isinstance(obj, dict) else dict(obj)

