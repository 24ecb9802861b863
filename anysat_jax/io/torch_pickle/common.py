"""What the torch checkpoint reader and writer share: errors, dtype stand-ins, bounded repr."""

from __future__ import annotations

import dataclasses
import reprlib
from typing import Any

import ml_dtypes
import numpy as np


class TorchCheckpointError(ValueError):
  """A checkpoint file is missing pieces, malformed, in an unsupported format, or out of bounds."""


class UnsafeCheckpointError(TorchCheckpointError):
  """The checkpoint's pickle references a global or operation outside the allow-list."""


@dataclasses.dataclass(frozen=True, slots=True)
class TorchDtype:
  """Stand-in for a ``torch.dtype``: its torch name and NumPy dtype (None if NumPy has none)."""

  name: str
  numpy: np.dtype | None


NUMPY_DTYPES: dict[str, Any] = {
    'float64': np.float64, 'float32': np.float32, 'float16': np.float16,
    'bfloat16': ml_dtypes.bfloat16,
    'int64': np.int64, 'int32': np.int32, 'int16': np.int16, 'int8': np.int8,
    'uint64': np.uint64, 'uint32': np.uint32, 'uint16': np.uint16, 'uint8': np.uint8,
    'bool': np.bool_, 'complex128': np.complex128, 'complex64': np.complex64,
    'float8_e4m3fn': ml_dtypes.float8_e4m3fn, 'float8_e5m2': ml_dtypes.float8_e5m2,
    'float8_e4m3fnuz': ml_dtypes.float8_e4m3fnuz, 'float8_e5m2fnuz': ml_dtypes.float8_e5m2fnuz,
    'complex32': None,
}


def torch_dtype(name: str) -> TorchDtype:
  """A new ``TorchDtype`` for a torch dtype name (a key of ``NUMPY_DTYPES``)."""
  t = NUMPY_DTYPES[name]
  return TorchDtype(name, None if t is None else np.dtype(t))


# For writers and callers; the reader hands out new objects for every file, never these.
DTYPES: dict[str, TorchDtype] = {name: torch_dtype(name) for name in NUMPY_DTYPES}
# torch's typed storage classes -> element dtype name.
STORAGE_DTYPES: dict[str, str] = {
    'DoubleStorage': 'float64', 'FloatStorage': 'float32', 'HalfStorage': 'float16',
    'BFloat16Storage': 'bfloat16', 'LongStorage': 'int64', 'IntStorage': 'int32',
    'ShortStorage': 'int16', 'CharStorage': 'int8', 'ByteStorage': 'uint8',
    'BoolStorage': 'bool', 'ComplexDoubleStorage': 'complex128',
    'ComplexFloatStorage': 'complex64', 'UntypedStorage': 'uint8',
}

class _Repr(reprlib.Repr):
  def repr_OrderedDict(self, x: Any, level: int) -> str:  # Else builtins.repr: unbounded.
    return f'OrderedDict({self.repr_dict(x, level)})'


_REPR = _Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60
_REPR.maxtuple = _REPR.maxlist = _REPR.maxdict = 6


def short_repr(value: Any) -> str:
  """``repr`` bounded in depth and length: cheap even for deeply nested, shared containers."""
  return _REPR.repr(value)
