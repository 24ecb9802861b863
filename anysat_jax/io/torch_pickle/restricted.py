"""A pickle machine for untrusted files: every opcode checked, counted and bounded.

``RestrictedUnpickler`` is CPython's pure-Python unpickler with its opcode table replaced, so
that nothing a file does can call, mutate or hash more than the subclass allows:

- at most ``MAX_OPCODES`` opcodes run (so objects and memo entries are bounded too);
- ``REDUCE`` calls only what ``allowed_callable`` accepts, with a tuple of arguments;
- ``BUILD`` only sets the attributes of an ``OrderedDict`` (a torch state dict's ``_metadata``);
- ``APPEND(S)`` act only on lists, ``SETITEM(S)`` only on dicts, and dict keys are scalars or flat
  tuples of scalars (whose hash is cheap: a deeply nested shared tuple's is exponential);
- object construction (``INST``, ``OBJ``, ``NEWOBJ(_EX)``), extension codes, sets and
  out-of-band buffers are refused by name.
"""

from __future__ import annotations

import collections
import datetime
import io
import pickle
import pickletools
from collections.abc import Callable
from typing import Any

from anysat_jax.io.torch_pickle.common import (
  TorchCheckpointError,
  UnsafeCheckpointError,
  short_repr,
)

MAX_OPCODES = 1_000_000  # About 35 per tensor: far above real checkpoints; ~1 s, < 100 MB.

_KEY_TYPES = (str, bytes, int, float, bool, type(None), datetime.date, datetime.datetime,
              datetime.timedelta)
_REFUSED_OPCODES = {'INST', 'OBJ', 'NEWOBJ', 'NEWOBJ_EX', 'EXT1', 'EXT2', 'EXT4', 'EMPTY_SET',
                    'ADDITEMS', 'FROZENSET', 'NEXT_BUFFER', 'READONLY_BUFFER'}


def _key_ok(key: Any) -> bool:
  return type(key) in _KEY_TYPES or (type(key) is tuple and all(type(k) in _KEY_TYPES for k in key))


class RestrictedUnpickler(pickle._Unpickler):  # Pure Python: its opcodes can be replaced.
  """Unpickles ``data`` under the rules of the module docstring; errors name ``path``."""

  dispatch: dict[int, Callable[[RestrictedUnpickler], None]] = {}  # Filled below the class.

  def __init__(self, data: bytes, path: str):
    super().__init__(io.BytesIO(data))
    self.path = path
    self._opcodes = 0

  def error(self, msg: str, cls: type[TorchCheckpointError] = TorchCheckpointError
            ) -> TorchCheckpointError:
    """An error about this file."""
    return cls(f'{self.path}: {msg}')

  def allowed_callable(self, func: Any) -> bool:
    """Whether ``REDUCE`` may call ``func`` (only what ``find_class`` returned, in subclasses)."""
    raise NotImplementedError

  def _load_reduce(self) -> None:
    args = self.stack.pop()
    func = self.stack[-1]
    if not self.allowed_callable(func) or type(args) is not tuple:
      raise self.error(f'refusing to call {short_repr(func)} with {short_repr(args)}',
                       UnsafeCheckpointError)
    if func is collections.OrderedDict and args:  # Items come by SETITEMS, keys checked there.
      raise self.error('refusing OrderedDict(...) with arguments', UnsafeCheckpointError)
    self.stack[-1] = func(*args)

  def _load_build(self) -> None:
    state = self.stack.pop()
    inst = self.stack[-1]
    if not (type(inst) is collections.OrderedDict and type(state) is dict
            and all(type(k) is str for k in state)):
      raise self.error(
          f'refusing pickle BUILD on {type(inst).__name__} with {type(state).__name__} state: '
          "only an OrderedDict's attributes (a state dict's _metadata) may be set",
          UnsafeCheckpointError)
    inst.__dict__.update(state)

  def _target(self, kind: type, opcode: str) -> Any:
    target = self.stack[-1]
    if not isinstance(target, kind) or type(target) not in (list, dict, collections.OrderedDict):
      raise self.error(f'refusing pickle {opcode} on {type(target).__name__}',
                       UnsafeCheckpointError)
    return target

  def _set_items(self, target: dict, items: list, opcode: str) -> None:
    if len(items) % 2:
      raise self.error(f'pickle {opcode} with an odd number of items')
    for i in range(0, len(items), 2):
      if not _key_ok(items[i]):
        raise self.error(f'refusing a dict key of type {type(items[i]).__name__} '
                         f'({short_repr(items[i])}): keys must be scalars or flat tuples of them',
                         UnsafeCheckpointError)
      target[items[i]] = items[i + 1]

  def _load_append(self) -> None:
    value = self.stack.pop()
    self._target(list, 'APPEND').append(value)

  def _load_appends(self) -> None:
    items = self.pop_mark()
    self._target(list, 'APPENDS').extend(items)

  def _load_setitem(self) -> None:
    value, key = self.stack.pop(), self.stack.pop()
    self._set_items(self._target(dict, 'SETITEM'), [key, value], 'SETITEM')

  def _load_setitems(self) -> None:
    items = self.pop_mark()
    self._set_items(self._target(dict, 'SETITEMS'), items, 'SETITEMS')

  def _load_dict(self) -> None:
    items = self.pop_mark()
    target: dict = {}
    self._set_items(target, items, 'DICT')
    self.append(target)


def _counted(load: Callable[[RestrictedUnpickler], None]
             ) -> Callable[[RestrictedUnpickler], None]:
  def run(self: RestrictedUnpickler) -> None:
    self._opcodes += 1
    if self._opcodes > MAX_OPCODES:
      raise self.error(f'the pickle runs more than {MAX_OPCODES} opcodes')
    load(self)
  return run


def _refused(name: str) -> Callable[[RestrictedUnpickler], None]:
  def run(self: RestrictedUnpickler) -> None:
    raise self.error(f'refusing pickle opcode {name} (not used by tensor checkpoints)',
                     UnsafeCheckpointError)
  return run


def _unknown(self: RestrictedUnpickler) -> None:
  raise self.error('invalid pickle opcode')


_OWN = {'REDUCE': RestrictedUnpickler._load_reduce, 'BUILD': RestrictedUnpickler._load_build,
        'APPEND': RestrictedUnpickler._load_append, 'APPENDS': RestrictedUnpickler._load_appends,
        'SETITEM': RestrictedUnpickler._load_setitem,
        'SETITEMS': RestrictedUnpickler._load_setitems, 'DICT': RestrictedUnpickler._load_dict}
RestrictedUnpickler.dispatch.update(dict.fromkeys(range(256), _unknown))
for _op in pickletools.opcodes:
  _code = ord(_op.code)
  RestrictedUnpickler.dispatch[_code] = (
      _refused(_op.name) if _op.name in _REFUSED_OPCODES
      else _counted(_OWN.get(_op.name, pickle._Unpickler.dispatch[_code])))
