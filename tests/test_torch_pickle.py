"""Tests for io.torch_pickle: torch checkpoints read (safely) and written, without torch."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import os
import pathlib
import pickle
import pickletools
import shlex
import struct
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

from anysat_jax.io.torch_pickle.common import (
  DTYPES,
  TorchCheckpointError,
  TorchDtype,
  UnsafeCheckpointError,
)
from anysat_jax.io.torch_pickle.reader import load_pth, load_state_dict
from anysat_jax.io.torch_pickle.writer import save_pth

TESTDATA = pathlib.Path(__file__).parent / 'testdata' / 'torch'
SAMPLE_PTH = TESTDATA / 's1asc_sample.pth'
SAMPLE_NPY = TESTDATA / 's1asc_sample.npy'

_STORAGE_NAMES = {
    np.dtype(np.float32): 'FloatStorage', np.dtype(np.float16): 'HalfStorage',
    np.dtype(np.float64): 'DoubleStorage', np.dtype(ml_dtypes.bfloat16): 'BFloat16Storage',
    np.dtype(np.int64): 'LongStorage', np.dtype(np.int32): 'IntStorage',
    np.dtype(np.uint8): 'ByteStorage', np.dtype(np.bool_): 'BoolStorage',
}


# ---------------------------------------------------------------------------------------------
# Raw torch-format pickles, for what save_pth must not write: tensor views, Parameters,
# untyped storages, big-endian data, arbitrary globals and broken archives.


@dataclasses.dataclass
class _Global:
  """A pickle GLOBAL reference, written by name only (never imported)."""
  module: str
  name: str


@dataclasses.dataclass
class _Tensor:
  """A tensor viewing storage ``key`` (elements) like torch's ``_rebuild_tensor_v2`` does.

  ``v3_dtype`` set: written like torch >= 2.3 writes uint16/float8...: an UntypedStorage (bytes)
  and ``_rebuild_tensor_v3(..., dtype)``.
  """
  key: str
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]
  parameter: bool = False
  v3_dtype: str | None = None


def _emit(obj, storages: dict[str, np.ndarray], out: list[bytes]) -> None:
  """Appends protocol-2 opcodes for ``obj`` (bool, int, str, tuple, dict, _Global, _Tensor)."""
  if isinstance(obj, bool):
    out.append(b'\x88' if obj else b'\x89')
  elif isinstance(obj, int):
    out.append(b'J' + struct.pack('<i', obj))
  elif isinstance(obj, str):
    data = obj.encode('utf-8')
    out.append(b'X' + struct.pack('<I', len(data)) + data)
  elif isinstance(obj, _Global):
    out.append(f'c{obj.module}\n{obj.name}\n'.encode('ascii'))
  elif isinstance(obj, tuple):
    out.append(b'(')
    for item in obj:
      _emit(item, storages, out)
    out.append(b't')
  elif isinstance(obj, dict):  # OrderedDict() REDUCE, or EMPTY_DICT; then SETITEMS.
    if isinstance(obj, collections.OrderedDict):
      _emit(_Global('collections', 'OrderedDict'), storages, out)
      out.append(b')R')
    else:
      out.append(b'}')
    if obj:
      out.append(b'(')
      for k, v in obj.items():
        _emit(k, storages, out)
        _emit(v, storages, out)
      out.append(b'u')
    if isinstance(obj, collections.OrderedDict):  # torch state dicts carry ._metadata (BUILD).
      _emit({'_metadata': {'': {'version': 1}}}, storages, out)
      out.append(b'b')
  elif isinstance(obj, _Tensor):
    _emit_tensor(obj, storages, out)
  else:
    raise TypeError(type(obj))


def _emit_hooks(out: list[bytes]) -> None:
  """torch's (empty) backward_hooks: ``collections.OrderedDict()``, without _metadata."""
  out.append(b'ccollections\nOrderedDict\n)R')


def _emit_tensor(t: _Tensor, storages: dict[str, np.ndarray], out: list[bytes]) -> None:
  if t.parameter:  # _rebuild_parameter(tensor, requires_grad=True, backward_hooks)
    _emit(_Global('torch._utils', '_rebuild_parameter'), storages, out)
    out.append(b'(')
    _emit(dataclasses.replace(t, parameter=False), storages, out)
    out.append(b'\x88')
    _emit_hooks(out)
    out.append(b'tR')
    return
  # _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks)
  # _rebuild_tensor_v3(untyped storage, offset, size, stride, requires_grad, hooks, dtype)
  arr = storages[t.key]
  v3 = t.v3_dtype is not None
  _emit(_Global('torch._utils', '_rebuild_tensor_v3' if v3 else '_rebuild_tensor_v2'),
        storages, out)
  out.append(b'(')
  storage_type = _Global('torch', 'UntypedStorage' if v3 else _STORAGE_NAMES[arr.dtype])
  numel = arr.nbytes if v3 else arr.size
  _emit(('storage', storage_type, t.key, 'cpu', numel), storages, out)
  out.append(b'Q')  # BINPERSID: torch's persistent_id for the storage.
  for item in (t.offset, t.size, t.stride, False):
    _emit(item, storages, out)
  _emit_hooks(out)
  if v3:
    _emit(_Global('torch', t.v3_dtype), storages, out)
  out.append(b'tR')


def _pickle_bytes(obj, storages: dict[str, np.ndarray]) -> bytes:
  out = [b'\x80\x02']
  _emit(obj, storages, out)
  out.append(b'.')
  return b''.join(out)


def _write_zip(path: pathlib.Path, data_pkl: bytes, records: dict[str, bytes],
               byteorder: str | None = 'little') -> pathlib.Path:
  """Writes the torch zip layout: <archive>/data.pkl, data/<key>, byteorder, version."""
  name = path.stem
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
    zf.writestr(f'{name}/data.pkl', data_pkl)
    if byteorder is not None:
      zf.writestr(f'{name}/byteorder', byteorder)
    for key, raw in records.items():
      zf.writestr(f'{name}/data/{key}', raw)
    zf.writestr(f'{name}/version', '3\n')
  return path


def _save(path: pathlib.Path, obj, storages: dict[str, np.ndarray],
          byteorder: str | None = 'little') -> pathlib.Path:
  order = '>' if byteorder == 'big' else '<'
  records = {}
  for key, arr in storages.items():
    if order == '>' and arr.dtype.itemsize > 1:
      swapped = arr.view(f'u{arr.dtype.itemsize}').astype(f'>u{arr.dtype.itemsize}')
      records[key] = swapped.tobytes()
    else:
      records[key] = arr.tobytes()
  return _write_zip(path, _pickle_bytes(obj, storages), records, byteorder)


def _ops(data_pkl: bytes) -> list[tuple[str, object]]:
  """Opcode names and arguments, without memo traffic (which torch writes and we do not)."""
  memo = {'PUT', 'BINPUT', 'LONG_BINPUT', 'MEMOIZE'}
  return [(op.name, arg) for op, arg, _ in pickletools.genops(data_pkl) if op.name not in memo]


def _records(path: pathlib.Path) -> dict[str, bytes]:
  with zipfile.ZipFile(path) as zf:
    return {name: zf.read(name) for name in zf.namelist()}


# ---------------------------------------------------------------------------------------------
# 1. The real torch file.


def test_real_torch_file_matches_numpy_twin():
  got = load_pth(SAMPLE_PTH)
  want = np.load(SAMPLE_NPY)
  assert isinstance(got, np.ndarray)
  assert got.dtype == want.dtype == np.float32
  assert got.shape == want.shape == (60, 3, 6, 6)
  assert got.flags.c_contiguous and got.flags.writeable
  np.testing.assert_array_equal(got, want)


def test_save_pth_reproduces_real_torch_layout(tmp_path):
  """save_pth writes what torch.save wrote for the real file (up to memo opcodes)."""
  real = _records(SAMPLE_PTH)
  archive = next(iter(real)).split('/')[0]
  path = tmp_path / f'{archive}.pth'
  save_pth(path, np.load(SAMPLE_NPY))
  ours = _records(path)
  # The real file predates the byteorder record that newer torch writes after data.pkl.
  assert ours.pop(f'{archive}/byteorder') == sys.byteorder.encode()
  assert list(ours) == list(real)
  assert ours[f'{archive}/data/0'] == real[f'{archive}/data/0']
  assert ours[f'{archive}/version'] == real[f'{archive}/version']
  assert _ops(ours[f'{archive}/data.pkl']) == _ops(real[f'{archive}/data.pkl'])


# ---------------------------------------------------------------------------------------------
# 2. Malicious pickles are refused without running anything.


class _Exploit:
  """Pickles as a call to os.system (only pickled here, never unpickled by real pickle)."""

  def __init__(self, command: str):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


def _call_pickle(module: str, name: str, *args: str) -> bytes:
  """Raw opcodes for ``module.name(*args)``: GLOBAL, MARK, args, TUPLE, REDUCE, STOP."""
  out = [b'\x80\x02']
  _emit(_Global(module, name), {}, out)
  _emit(args, {}, out)
  out.append(b'R.')
  return b''.join(out)


def _malicious(kind: str, marker: pathlib.Path) -> tuple[bytes, str]:
  """data.pkl bytes that would create ``marker`` if unpickled, and the global to refuse."""
  cmd = f'touch {shlex.quote(str(marker))}'
  system = f'{os.system.__module__}.system'  # posix.system on Linux.
  if kind == 'reduce':
    return pickle.dumps(_Exploit(cmd), protocol=2), system
  if kind == 'stack_global':  # Protocol 4 names globals with STACK_GLOBAL.
    return pickle.dumps(_Exploit(cmd), protocol=4), system
  code = f'__import__("pathlib").Path({str(marker)!r}).touch()'
  module, name, arg = {
      'os_system': ('os', 'system', cmd), 'subprocess': ('subprocess', 'call', cmd),
      'eval': ('builtins', 'eval', code), 'nonexistent': ('evil_mod_xyz', 'run', cmd)}[kind]
  return _call_pickle(module, name, arg), f'{module}.{name}'


@pytest.mark.parametrize(
    'kind', ['reduce', 'stack_global', 'os_system', 'subprocess', 'eval', 'nonexistent'])
def test_malicious_pickle_is_refused(tmp_path, kind):
  marker = tmp_path / 'pwned'
  data_pkl, refused = _malicious(kind, marker)
  path = _write_zip(tmp_path / 'evil.pth', data_pkl, {})
  modules_before = set(sys.modules)
  with pytest.raises(UnsafeCheckpointError) as info:
    load_pth(path)
  message = str(info.value)
  assert refused in message
  assert str(path) in message
  assert not marker.exists()
  assert refused.split('.')[0] not in set(sys.modules) - modules_before  # Nothing imported.
  with pytest.raises(UnsafeCheckpointError):
    load_state_dict(path)
  assert not marker.exists()


def test_refusal_inside_a_state_dict(tmp_path):
  """A refused global anywhere in the tree (e.g. next to real tensors) stops the load."""
  marker = tmp_path / 'pwned'
  w = np.arange(6, dtype=np.float32)
  data_pkl = _pickle_bytes({'state_dict': collections.OrderedDict(w=_Tensor('0', 0, (6,), (1,))),
                            'hparams': _Global('builtins', 'exec')}, {'0': w})
  path = _write_zip(tmp_path / 'ckpt.pth', data_pkl, {'0': w.tobytes()})
  with pytest.raises(UnsafeCheckpointError, match=r'builtins\.exec'):
    load_state_dict(path)
  assert not marker.exists()


@pytest.mark.parametrize('args', [('eJwDAAAAAAE=', 'base64'), ('x', 'utf-8'), ('x', 'rot13')])
def test_codecs_encode_only_turns_latin1_text_into_bytes(tmp_path, args):
  """``_codecs.encode`` is allowed as protocol 2 uses it for bytes, and for nothing else."""
  path = _write_zip(tmp_path / 'codec.pth', _call_pickle('_codecs', 'encode', *args), {})
  modules_before = set(sys.modules)
  with pytest.raises(TorchCheckpointError, match=r'codec\.pth'):
    load_pth(path)
  assert not set(sys.modules) - modules_before


# ---------------------------------------------------------------------------------------------
# 3. save_pth checkpoints round-trip exactly.

_WRITABLE_DTYPES = [np.float32, np.float16, np.float64, ml_dtypes.bfloat16, np.int64, np.int32,
                    np.int16, np.int8, np.uint8, np.bool_]


def _assert_same(got, want):
  assert isinstance(got, np.ndarray)
  assert got.dtype == want.dtype
  assert got.shape == want.shape
  assert got.flags.c_contiguous
  assert got.tobytes() == np.ascontiguousarray(want).tobytes()


@pytest.mark.parametrize('dtype', _WRITABLE_DTYPES, ids=lambda d: np.dtype(d).name)
def test_save_pth_arrays_round_trip(tmp_path, dtype):
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 100, (3, 4)).astype(dtype)
  arrays = {
      'x': x, 'x_t': x.T, 'col': x[:, 1], 'scalar': x[1, 2:3].reshape(()),
      'empty': np.zeros((0, 4), dtype), 'swapped': x.astype(x.dtype.newbyteorder('S')),
  }
  path = tmp_path / 'arrays.pth'
  save_pth(path, arrays)
  got = load_pth(path)
  assert list(got) == list(arrays)
  for k, want in arrays.items():
    _assert_same(got[k], want.astype(x.dtype))
  assert len([n for n in _records(path) if '/data/' in n]) == len(arrays)


def test_checkpoint_dict_with_state_dict_and_epoch(tmp_path):
  rng = np.random.default_rng(0)
  sd = collections.OrderedDict(
      w=rng.standard_normal((3, 4)).astype(np.float32),
      bf=rng.standard_normal(5).astype(ml_dtypes.bfloat16),
      idx=rng.integers(-2**40, 2**40, size=(2, 3), dtype=np.int64))
  sd._metadata = {'': {'version': 1}, 'w': {'version': 2}}
  ckpt = {'state_dict': sd, 'epoch': 3, 'step': 2**40, 'huge': -2**100, 'lr': 1e-4,
          'name': 'anysat ∞', 'blob': bytes(range(256)), 'tags': ['a', None, True, False],
          'empty': ([], {}, ()), 'shapes': ((1,), (1, 2), (1, 2, 3), (1, 2, 3, 4)),
          'dtype': DTYPES['bfloat16']}
  path = tmp_path / 'ckpt.pth'
  save_pth(path, ckpt)
  got = load_pth(path)
  assert {k: v for k, v in got.items() if k != 'state_dict'} == {
      k: v for k, v in ckpt.items() if k != 'state_dict'}
  assert isinstance(got['state_dict'], collections.OrderedDict)
  assert got['state_dict']._metadata == sd._metadata
  state = load_state_dict(path)
  assert isinstance(state, dict) and list(state) == list(sd)
  for k in sd:
    _assert_same(state[k], sd[k])


_DATES = {
    'image_dates': [datetime.datetime(2019, 3, 1), datetime.datetime(2019, 3, 13, 9, 41, 7, 5)],
    'label_dates': [datetime.date(2019, 2, 20), datetime.date(2020, 2, 29)],
    'aware': datetime.datetime(2020, 1, 1, 12, tzinfo=datetime.UTC),
    'offset': datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone(
        datetime.timedelta(hours=-3), 'BRT')),
    'revisit': datetime.timedelta(days=12, seconds=3, microseconds=4),
}


def test_datetimes_round_trip(tmp_path):
  path = tmp_path / 'dates.pth'
  save_pth(path, _DATES)
  got = load_pth(path)
  assert got == _DATES
  assert [type(d) for d in got['label_dates']] == [datetime.date] * 2
  assert got['offset'].tzinfo == _DATES['offset'].tzinfo


@pytest.mark.parametrize('value', [*_DATES['image_dates'], *_DATES['label_dates'],
                                   _DATES['aware'], _DATES['offset'], _DATES['revisit']], ids=str)
def test_datetimes_are_written_as_torch_writes_them(tmp_path, value):
  """The opcodes of CPython's protocol-2 pickler (torch.save's), memo traffic aside."""
  path = tmp_path / 'date.pth'
  save_pth(path, value)
  assert _ops(_records(path)['date/data.pkl']) == _ops(pickle.dumps(value, protocol=2))


def test_datetimes_pickled_by_cpython_are_read(tmp_path):
  """As in real BraDD-S1TS samples: memoised (BINGET) datetime and _codecs.encode globals."""
  path = _write_zip(tmp_path / 'sample.pth', pickle.dumps(_DATES, protocol=2), {})
  assert load_pth(path) == _DATES


class _Tz(datetime.tzinfo):
  """A tzinfo other than ``datetime.timezone`` (like ``zoneinfo.ZoneInfo``)."""


@pytest.mark.parametrize('value', [
    object(), {1, 2}, np.float32(1), np.zeros(2, np.uint16), np.zeros(2, object),
    datetime.time(12), [datetime.datetime(2020, 1, 1, tzinfo=_Tz())]],
    ids=lambda v: type(v).__name__)
def test_save_pth_refuses_other_types(tmp_path, value):
  with pytest.raises(TypeError, match='cannot write'):
    save_pth(tmp_path / 'x.pth', {'value': value})


def test_dtype_values_become_torch_dtype(tmp_path):
  path = tmp_path / 'd.pth'
  save_pth(path, {'dtype': DTYPES['bfloat16'],
                               'compute': DTYPES['float32']})
  assert ('GLOBAL', 'torch bfloat16') in _ops(_records(path)['d/data.pkl'])
  got = load_pth(path)
  assert got['dtype'] == TorchDtype('bfloat16', np.dtype(ml_dtypes.bfloat16))
  assert got['compute'].numpy == np.float32


def test_load_state_dict_rejects_non_mapping(tmp_path):
  with pytest.raises(TorchCheckpointError, match='s1asc_sample.pth.*ndarray'):
    load_state_dict(SAMPLE_PTH)
  path = tmp_path / 'mixed.pth'
  save_pth(path, {'w': np.zeros(2, np.float32), 'epoch': 3})
  with pytest.raises(TorchCheckpointError, match="mixed.pth.*'epoch'"):
    load_state_dict(path)


# ---------------------------------------------------------------------------------------------
# 4. Tensors as torch lays them out: views, Parameters, untyped storages, byte orders.


def _state_dict_fixture():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((3, 4)).astype(np.float32)
  h = rng.standard_normal(7).astype(np.float16)
  idx = rng.integers(-2**40, 2**40, size=(2, 3), dtype=np.int64)
  p = rng.standard_normal((2, 2, 2)).astype(np.float32)
  bf = rng.standard_normal(5).astype(ml_dtypes.bfloat16)
  u16 = rng.integers(0, 2**16, size=4, dtype=np.uint16)
  scalar = np.array([0.25, -1.5], np.float32)
  storages = {'0': w.reshape(-1), '1': h, '2': idx.reshape(-1), '3': p.reshape(-1),
              '4': bf, '5': u16, '6': scalar}
  sd = collections.OrderedDict([
      ('w', _Tensor('0', 0, (3, 4), (4, 1))),
      ('w_t', _Tensor('0', 0, (4, 3), (1, 4))),          # Transposed view of the same storage.
      ('h_tail', _Tensor('1', 2, (5,), (1,))),           # Non-zero storage offset.
      ('idx', _Tensor('2', 0, (2, 3), (3, 1))),
      ('idx_col', _Tensor('2', 1, (2,), (3,))),          # Strided column with offset.
      ('p', _Tensor('3', 0, (2, 2, 2), (4, 2, 1), parameter=True)),
      ('bf', _Tensor('4', 0, (5,), (1,))),
      ('u16', _Tensor('5', 0, (4,), (1,), v3_dtype='uint16')),
      ('pad_parameter', _Tensor('6', 1, (), ())),        # 0-d tensor.
      ('expanded', _Tensor('6', 0, (3, 2), (0, 1))),     # Broadcast (stride 0).
      ('empty', _Tensor('6', 0, (0, 4), (4, 1))),
  ])
  want = {
      'w': w, 'w_t': w.T, 'h_tail': h[2:], 'idx': idx, 'idx_col': idx[:, 1], 'p': p, 'bf': bf,
      'u16': u16, 'pad_parameter': np.array(-1.5, np.float32),
      'expanded': np.broadcast_to(scalar, (3, 2)), 'empty': np.zeros((0, 4), np.float32),
  }
  return sd, storages, want


@pytest.mark.parametrize('byteorder', ['little', None, 'big'])
def test_tensor_views_round_trip(tmp_path, byteorder):
  sd, storages, want = _state_dict_fixture()
  path = _save(tmp_path / 'sd.pth', sd, storages, byteorder=byteorder)
  got = load_pth(path)
  assert isinstance(got, collections.OrderedDict)
  assert list(got) == list(want)
  for k in want:
    _assert_same(got[k], want[k])
  assert got['bf'].dtype == ml_dtypes.bfloat16
  assert got._metadata == {'': {'version': 1}}  # The OrderedDict's BUILD state is kept.
  assert not np.shares_memory(got['w_t'], got['w'])
  state = load_state_dict(path)
  assert list(state) == list(want)
  _assert_same(state['w_t'], want['w_t'])


def test_shared_storage_is_read_once_and_values_are_independent(tmp_path):
  sd, storages, _ = _state_dict_fixture()
  got = load_pth(_save(tmp_path / 'sd.pth', sd, storages))
  got['w'][0, 0] = 123.0
  assert got['w_t'][0, 0] != 123.0


# ---------------------------------------------------------------------------------------------
# 4. Broken files: errors name the file (and the storage key).


def test_truncated_storage(tmp_path):
  w = np.arange(10, dtype=np.float32)
  data_pkl = _pickle_bytes(collections.OrderedDict(w=_Tensor('7', 0, (10,), (1,))), {'7': w})
  path = _write_zip(tmp_path / 'trunc.pth', data_pkl, {'7': w.tobytes()[:-4]})
  with pytest.raises(TorchCheckpointError, match=r"trunc\.pth.*storage '7'.*truncated"):
    load_pth(path)


def test_missing_storage_record(tmp_path):
  w = np.arange(10, dtype=np.float32)
  data_pkl = _pickle_bytes(collections.OrderedDict(w=_Tensor('7', 0, (10,), (1,))), {'7': w})
  path = _write_zip(tmp_path / 'nostorage.pth', data_pkl, {})
  with pytest.raises(TorchCheckpointError, match=r"nostorage\.pth.*storage '7'.*missing"):
    load_pth(path)


def test_view_outside_storage_is_refused(tmp_path):
  w = np.arange(4, dtype=np.float32)
  data_pkl = _pickle_bytes(_Tensor('0', 2, (3,), (1,)), {'0': w})
  path = _write_zip(tmp_path / 'oob.pth', data_pkl, {'0': w.tobytes()})
  with pytest.raises(TorchCheckpointError, match=r"oob\.pth.*storage '0'.*does not fit"):
    load_pth(path)


def test_missing_data_pkl(tmp_path):
  path = tmp_path / 'nopkl.pth'
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('nopkl/data/0', b'\0' * 8)
    zf.writestr('nopkl/version', '3\n')
  with pytest.raises(TorchCheckpointError, match=r'nopkl\.pth.*data\.pkl'):
    load_pth(path)


def test_not_a_zip(tmp_path):
  path = tmp_path / 'junk.pth'
  path.write_bytes(b'this is not a checkpoint')
  with pytest.raises(TorchCheckpointError, match=r'junk\.pth.*not a zip'):
    load_pth(path)


def test_legacy_format(tmp_path):
  path = tmp_path / 'legacy.pth'
  path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001))
  with pytest.raises(TorchCheckpointError, match=r'legacy\.pth.*legacy.*re-save'):
    load_pth(path)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='nothere.pth'):
    load_pth(tmp_path / 'nothere.pth')


def test_malformed_pickle(tmp_path):
  path = _write_zip(tmp_path / 'bad.pth', b'\x80\x02(K\x01', {})
  with pytest.raises(TorchCheckpointError, match=r'bad\.pth'):
    load_pth(path)


# ---------------------------------------------------------------------------------------------
# 5. Opcodes outside what tensor checkpoints use are refused by name (hostile_pth: the bounds).

_OD = b'ccollections\nOrderedDict\n'


@pytest.mark.parametrize('ops, refused', [
    (_OD + b')\x81', 'opcode NEWOBJ'),                      # OrderedDict.__new__(OrderedDict)
    (b'(icollections\nOrderedDict\n', 'opcode INST'),
    (b'\x8f', 'opcode EMPTY_SET'),
    (b'\x82\x01', 'opcode EXT1'),
    (b']}b', 'BUILD on list'),                            # BUILD only on an OrderedDict.
    (_OD + b')R(K\x01K\x02tb', 'BUILD on OrderedDict with tuple state'),
    (b'}(K\x01e', 'APPENDS on dict'),
    (b']K\x01K\x02s', 'SETITEM on list'),
    (_OD + b'(K\x01K\x02\x86]\x85tR', 'OrderedDict\\(...\\) with arguments'),
    (b']K\x01\x85R', r'refusing to call \[\] with \(1,\)'),    # Only what find_class gave.
], ids=lambda v: v if isinstance(v, str) else None)
def test_refused_opcodes_are_named(tmp_path, ops, refused):
  path = _write_zip(tmp_path / 'ops.pth', b'\x80\x02' + ops + b'.', {})
  with pytest.raises(UnsafeCheckpointError, match=rf'ops\.pth: .*{refused}'):
    load_pth(path)


def test_each_file_gets_its_own_stand_ins(tmp_path):
  """Values from globals are new per file, never the module's shared ``DTYPES``."""
  path = tmp_path / 'd.pth'
  save_pth(path, {'dtype': DTYPES['float32']})
  first, second = load_pth(path)['dtype'], load_pth(path)['dtype']
  assert first == second == DTYPES['float32']
  assert first is not second and first is not DTYPES['float32']


def test_io_imports_no_jax():
  """Datasets read .pth tiles with the reader: ``anysat_jax.io`` must not load JAX or Flax."""
  code = ('import sys\n'
          'import anysat_jax.io.directories, anysat_jax.io.torch_pickle.reader\n'
          'import anysat_jax.io.torch_pickle.writer\n'
          'print(sorted({"jax", "flax"} & set(sys.modules)))')
  env = {**os.environ, 'PYTHONPATH': str(pathlib.Path(__file__).resolve().parents[1])}
  run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env)
  assert run.returncode == 0, run.stderr
  assert run.stdout.strip() == '[]'


def test_save_pth_replaces_a_file_whole_or_not_at_all(tmp_path, monkeypatch):
  path = tmp_path / 'x.pth'
  save_pth(path, np.arange(3, dtype=np.float32))
  before = path.read_bytes()

  def full_disk(*args, **kwargs):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(zipfile.ZipFile, 'writestr', full_disk)
  with pytest.raises(OSError, match='No space'):
    save_pth(path, np.arange(5, dtype=np.float32))
  monkeypatch.undo()
  assert path.read_bytes() == before and os.listdir(tmp_path) == ['x.pth']
  save_pth(path, np.arange(5, dtype=np.float32))
  np.testing.assert_array_equal(load_pth(path), np.arange(5, dtype=np.float32))
  assert os.listdir(tmp_path) == ['x.pth']
