"""Write PyTorch ``torch.save`` zip checkpoints from NumPy arrays and plain values, without torch.

The output is what ``torch.save`` (protocol 2, zip format, every entry stored uncompressed)
writes, so ``torch.load`` and ``reader.load_pth`` read it. Used to write test and sample data.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import math
import os
import pickle
import secrets
import struct
import sys
import zipfile
from typing import Any

import numpy as np

from anysat_jax.io.torch_pickle.common import DTYPES, STORAGE_DTYPES, TorchDtype

_STORAGE_NAMES = {DTYPES[d].numpy: n for n, d in STORAGE_DTYPES.items() if n != 'UntypedStorage'}
_DATETIME_TYPES = (datetime.datetime, datetime.date, datetime.timedelta, datetime.timezone)
_TUPLE_OPS = {0: pickle.EMPTY_TUPLE, 1: pickle.TUPLE1, 2: pickle.TUPLE2, 3: pickle.TUPLE3}


@dataclasses.dataclass(frozen=True, slots=True)
class _Global:
  """A pickle GLOBAL, written by name (nothing is imported)."""

  module: str
  name: str


class _Pickler:
  """Protocol-2 pickle opcodes as ``torch.save`` (CPython's pickler) writes them, no memo.

  Arrays become ``_rebuild_tensor_v2`` tensors over storages ``'0'``, ``'1'``, ... whose
  native-order, C-contiguous data is collected in ``storages``.
  """

  def __init__(self):
    self.out: list[bytes] = [pickle.PROTO + b'\x02']
    self.storages: list[np.ndarray] = []

  def save(self, obj: Any) -> None:
    write = self.out.append
    if obj is None or type(obj) in (bool, int, float):  # Not subclasses (enums, NumPy scalars).
      write(pickle.dumps(obj, 2)[2:-1])  # CPython's own opcodes; scalars are never memoised.
    elif isinstance(obj, str):
      data = obj.encode('utf-8', 'surrogatepass')
      write(pickle.BINUNICODE + struct.pack('<I', len(data)) + data)
    elif isinstance(obj, bytes):  # As protocol 2 stores bytes.
      self._reduce(_Global('_codecs', 'encode'), (obj.decode('latin1'), 'latin1'))
    elif isinstance(obj, _Global):
      write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode('ascii'))
    elif isinstance(obj, TorchDtype):
      self.save(_Global('torch', obj.name))
    elif isinstance(obj, tuple):
      if len(obj) > 3:
        write(pickle.MARK)
      for item in obj:
        self.save(item)
      write(_TUPLE_OPS.get(len(obj), pickle.TUPLE))
    elif isinstance(obj, list):
      write(pickle.EMPTY_LIST)
      if obj:
        write(pickle.MARK)
        for item in obj:
          self.save(item)
        write(pickle.APPENDS)
    elif isinstance(obj, dict):
      ordered = isinstance(obj, collections.OrderedDict)
      if ordered:
        self._reduce(_Global('collections', 'OrderedDict'), ())
      else:
        write(pickle.EMPTY_DICT)
      if obj:
        write(pickle.MARK)
        for k, v in obj.items():
          self.save(k)
          self.save(v)
        write(pickle.SETITEMS)
      if ordered and vars(obj):  # Attributes, e.g. a torch state dict's ``_metadata``.
        self.save(vars(obj))
        write(pickle.BUILD)
    elif type(obj) in _DATETIME_TYPES:
      cls, args = obj.__reduce_ex__(2)[:2]
      self._reduce(_Global('datetime', cls.__name__), args)
    elif isinstance(obj, np.ndarray):
      self._tensor(obj)
    else:
      raise TypeError(f'cannot write a {type(obj).__name__} into a torch checkpoint')

  def _reduce(self, func: _Global, args: tuple) -> None:
    self.save(func)
    self.save(args)
    self.out.append(pickle.REDUCE)

  def _tensor(self, array: np.ndarray) -> None:
    """``_rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())``."""
    array = np.asarray(array, array.dtype.newbyteorder('='), order='C')
    storage = _STORAGE_NAMES.get(array.dtype)
    if storage is None:
      raise TypeError(f'cannot write a {array.dtype} array: torch has no typed storage for it')
    key = str(len(self.storages))
    self.storages.append(array)
    size = array.shape
    stride = tuple(math.prod(size[i + 1:]) for i in range(len(size)))
    self.save(_Global('torch._utils', '_rebuild_tensor_v2'))
    self.out.append(pickle.MARK)
    self.save(('storage', _Global('torch', storage), key, 'cpu', array.size))
    self.out.append(pickle.BINPERSID)
    for item in (0, size, stride, False, collections.OrderedDict()):
      self.save(item)
    self.out.append(pickle.TUPLE + pickle.REDUCE)


def save_pth(path: str | os.PathLike, obj: Any) -> None:
  """Writes ``obj`` as ``torch.save(obj, path)`` would (zip format), without torch.

  Args:
    path: the file to write; its stem names the archive folder, as with torch.
    obj: nested ``dict``/``OrderedDict`` (attributes such as ``_metadata`` kept), ``list``,
      ``tuple``, ``str``, ``bytes``, ``int``, ``float``, ``bool``, ``None``, ``TorchDtype``,
      ``datetime``/``date``/``timedelta``/``timezone`` values and ``np.ndarray``s. Arrays become
      contiguous CPU tensors, one storage each (float64/32/16, bfloat16, int64/32/16/8, uint8,
      bool, complex128/64).

  The file is written next to ``path`` and renamed: an existing ``path`` is replaced whole or
  not at all.

  Raises:
    TypeError: ``obj`` holds another type, or an array dtype torch has no typed storage for.
  """
  pickler = _Pickler()
  pickler.save(obj)
  pickler.out.append(pickle.STOP)
  records = [('data.pkl', b''.join(pickler.out)), ('byteorder', sys.byteorder.encode())]
  records += [(f'data/{i}', a.tobytes()) for i, a in enumerate(pickler.storages)]
  records.append(('version', b'3\n'))
  path = os.fspath(path)
  archive = os.path.splitext(os.path.basename(path))[0]
  tmp = f'{path}.tmp-{secrets.token_hex(4)}'  # Replaces an existing file only once complete.
  try:
    with open(tmp, 'xb') as f, zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED) as zf:
      for name, data in records:  # A fixed timestamp keeps the bytes deterministic.
        zf.writestr(zipfile.ZipInfo(f'{archive}/{name}', date_time=(1980, 1, 1, 0, 0, 0)), data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
