"""Hostile torch checkpoints, generated here: each is refused (with the reason and the file named)
or loaded, within a few seconds and well under 1 GiB, and leaves the reader as it was: the
shipped TreeSatAI-TS sample still loads equal to its ``.npy`` twin in the same process.

The files are loaded in a child process with a 3 GiB address-space limit and a hard timeout, so
that a reader that would run away fails the tests instead of the machine.
"""

from __future__ import annotations

import bz2
import json
import os
import pathlib
import re
import struct
import subprocess
import sys
import zlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = (ROOT / 'input_pipeline' / 'samples' / 'TreeSatAI-TS' / 's1-asc'
          / 'Abies_alba_1_1005_WEFL_NLF')
MAX_CPU_SECONDS = 5.0  # CPU time of one load (wall time depends on the machine's load).
MAX_PEAK_MIB = 300  # Peak resident memory of the child, Python and NumPy included (~40 MiB).

# Loads each file given, each followed by the sample; prints one JSON line per file.
_CHILD = r'''
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
import numpy as np
from anysat_jax.io.torch_pickle.reader import load_pth

def peak_mib():  # VmHWM: peak RSS since exec or the last reset (ru_maxrss keeps the parent's).
  with open('/proc/self/status') as f:
    return next(int(l.split()[1]) for l in f if l.startswith('VmHWM')) / 1024

sample = sys.argv[1]
for case, hostile in json.loads(sys.argv[2]):
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # Resets VmHWM.
  out = {'case': case, 'error': None}
  start = time.process_time()
  try:
    load_pth(hostile)
  except BaseException as e:  # MemoryError and RecursionError too: all are reported.
    out['error'] = f'{type(e).__name__}: {str(e)[:2000]}'
  out['cpu_seconds'] = time.process_time() - start
  out['peak_mib'] = peak_mib()
  try:
    got, want = load_pth(sample + '.pth'), np.load(sample + '.npy')
    out['sample'] = 'equal' if got.dtype == want.dtype and np.array_equal(got, want) else (
        f'differs: {got.dtype} {got.shape}')
  except Exception as e:
    out['sample'] = f'{type(e).__name__}: {str(e)[:300]}'
  print(json.dumps(out), flush=True)
'''


def _load_in_child(paths: dict[str, pathlib.Path], timeout: float = 120) -> dict[str, dict]:
  """Results by case; a case the child did not reach within ``timeout`` is missing."""
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'OPENBLAS_NUM_THREADS': '1'}
  cases = json.dumps([[case, str(path)] for case, path in paths.items()])
  try:
    run = subprocess.run([sys.executable, '-c', _CHILD, str(SAMPLE), cases], env=env,
                         capture_output=True, text=True, timeout=timeout)
    stdout = run.stdout
    assert run.returncode == 0, run.stderr[-2000:]
  except subprocess.TimeoutExpired as e:
    stdout = (e.stdout or b'').decode()
  results = [json.loads(line) for line in stdout.splitlines() if line.startswith('{')]
  return {r['case']: r for r in results}


# ---------------------------------------------------------------------------------------------
# Pickle opcodes and zip archives, written byte by byte (nothing here is ever unpickled by pickle).


def _global(module: str, name: str) -> bytes:
  return f'c{module}\n{name}\n'.encode()


def _str(s: str) -> bytes:
  data = s.encode()
  return b'X' + struct.pack('<I', len(data)) + data


def _int(i: int) -> bytes:
  return b'J' + struct.pack('<i', i)


def _tuple(*items: bytes) -> bytes:
  return b'(' + b''.join(items) + b't'


def _pickle(*ops: bytes) -> bytes:
  return b'\x80\x02' + b''.join(ops) + b'.'


def _storage(key: str, numel: int, storage: str = 'FloatStorage') -> bytes:
  """The persistent id of a storage (BINPERSID)."""
  return _tuple(_str('storage'), _global('torch', storage), _str(key), _str('cpu'),
                _int(numel)) + b'Q'


def _tensor(storage: bytes, offset: bytes, size: bytes, stride: bytes) -> bytes:
  """``_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())``."""
  return (_global('torch._utils', '_rebuild_tensor_v2') + b'(' + storage + offset + size + stride
          + b'\x89' + _global('collections', 'OrderedDict') + b')R' + b'tR')


def _ints(*values: int) -> bytes:
  return _tuple(*map(_int, values))


def _nested_shared(depth: int, close: bytes) -> bytes:
  """x = 1; depth times x = [x, x] (close b'e': APPENDS on a list) or (x, x) (b'\\x86'): a
  container whose full repr or hash visits 2**depth leaves."""
  out = [_int(1)]
  for _ in range(depth):
    out.append(b'q\x00' b'0')  # BINPUT 0, POP.
    out.append((b'](' if close == b'e' else b'') + b'h\x00h\x00' + close)
  return b''.join(out)


def _zip(path: pathlib.Path, entries: list[tuple[str, bytes, int, int, int]],
         claimed_sizes: dict[str, int] | None = None) -> pathlib.Path:
  """A zip archive of (name, payload as stored, method, uncompressed size, crc32) entries:
  payloads are written as given, so they can be pre-compressed; ``claimed_sizes`` replaces the
  stored size an entry's headers give."""
  local, central = bytearray(), bytearray()
  for name, payload, method, size, crc in entries:
    stored = (claimed_sizes or {}).get(name, len(payload))
    fields = (20, 0, method, 0, 0x21, crc, stored, size, len(name.encode()), 0)
    central += struct.pack('<IHHHHHHIIIHHHHHII', 0x02014B50, 20, *fields, 0, 0, 0, 0,
                           len(local)) + name.encode()
    local += struct.pack('<IHHHHHIIIHH', 0x04034B50, *fields) + name.encode() + payload
  end = struct.pack('<IHHHHIIH', 0x06054B50, 0, 0, len(entries), len(entries), len(central),
                    len(local), 0)
  path.write_bytes(bytes(local + central + end))
  return path


def _stored(name: str, data: bytes) -> tuple[str, bytes, int, int, int]:
  return (name, data, 0, len(data), zlib.crc32(data))


def _pth(path: pathlib.Path, data_pkl: bytes, *storages: tuple[str, bytes]) -> pathlib.Path:
  arc = path.stem
  return _zip(path, [_stored(f'{arc}/data.pkl', data_pkl), _stored(f'{arc}/byteorder', b'little'),
                     *(_stored(f'{arc}/data/{k}', v) for k, v in storages)])


def _deflated_zeros(nbytes: int) -> tuple[bytes, int]:
  """A raw deflate stream of ``nbytes`` zeros (a multiple of 1 MiB) and their crc32, built
  from one compressed MiB repeated (the compressor is reset after each)."""
  chunk, c = bytes(1 << 20), zlib.compressobj(9, zlib.DEFLATED, -15)
  block = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
  crc = 0
  for _ in range(nbytes >> 20):
    crc = zlib.crc32(chunk, crc)
  return block * (nbytes >> 20) + c.flush(), crc


# ---------------------------------------------------------------------------------------------
# The hostile files: name -> (writer, regex the refusal must match; None: it may load).

_FLOAT4 = ('0', b'\0' * 4)
_DEFLATED, _BZIP2 = 8, 12  # zip compression methods.


def _poison_storage_type(p):
  """BUILD on the FloatStorage stand-in: once rewrote, for every later file, its dtype."""
  return _pth(p, _pickle(_global('torch', 'FloatStorage'),
                         _tuple(_str('FloatStorage'), _global('torch', 'uint8')), b'b'))


def _poison_dtype(p):
  """BUILD on the torch.float32 stand-in, which float32 storages shared."""
  return _pth(p, _pickle(_global('torch', 'float32'), _tuple(_str('float32'), b'N'), b'b'))


def _stride0_view(p):
  """A 4-byte storage viewed as (8192, 16384) with stride 0: 512 MiB."""
  return _pth(p, _pickle(_tensor(_storage('0', 1), _int(0), _ints(8192, 16384), _ints(0, 0))),
              _FLOAT4)


def _overlapping_view(p):
  """A 520 KiB storage viewed as (131072, 1024) with strides (1, 1): 512 MiB."""
  n = 131072 + 1024
  return _pth(p, _pickle(_tensor(_storage('0', n), _int(0), _ints(131072, 1024), _ints(1, 1))),
              ('0', bytes(4 * n)))


def _repeated_views(p):
  """One 256 KiB storage viewed whole by 2048 tensors: 512 MiB."""
  n = 65536
  tensor = _tensor(b'h\x00', _int(0), _ints(n), _ints(1))
  return _pth(p, _pickle(_storage('0', n), b'q\x00', b'0', b'(', tensor * 2048, b'l'),
              ('0', bytes(4 * n)))


def _deflate_storage(p):
  """A 512 MiB storage of zeros deflated to ~530 KB."""
  n = 512 << 20
  payload, crc = _deflated_zeros(n)
  arc = p.stem
  data_pkl = _pickle(_tensor(_storage('0', n // 4), _int(0), _ints(n // 4), _ints(1)))
  return _zip(p, [_stored(f'{arc}/data.pkl', data_pkl),
                  (f'{arc}/data/0', payload, _DEFLATED, n, crc)])


def _lying_entry_size(p):
  """A storage entry of 4 bytes whose zip headers claim 1 GiB (stored: both sizes)."""
  n, arc = 1 << 30, p.stem
  data_pkl = _pickle(_tensor(_storage('0', n // 4), _int(0), _ints(n // 4), _ints(1)))
  return _zip(p, [_stored(f'{arc}/data.pkl', data_pkl),
                  (f'{arc}/data/0', b'\0' * 4, 0, n, zlib.crc32(b'\0' * 4))],
              claimed_sizes={f'{arc}/data/0': n})


def _bz2_data_pkl(p):
  """data.pkl bz2-compressed: a 16 MiB string in a hundred bytes."""
  data_pkl = _pickle(b'X' + struct.pack('<I', 16 << 20) + b'a' * (16 << 20))
  return _zip(p, [(f'{p.stem}/data.pkl', bz2.compress(data_pkl), _BZIP2, len(data_pkl),
                   zlib.crc32(data_pkl))])


def _nested_list_persistent_id(p):
  """A malformed persistent id holding a 40-deep shared list: its repr has 2**40 leaves."""
  return _pth(p, _pickle(_tuple(_nested_shared(40, b'e')), b'Q'))


def _nested_list_in_ordered_dict(p):
  """A malformed persistent id holding an OrderedDict whose value is a 40-deep shared list."""
  od = _global('collections', 'OrderedDict') + b')R' + b'(' + _str('k') + _nested_shared(40, b'e')
  return _pth(p, _pickle(_tuple(od + b'u'), b'Q'))


def _nested_tuple_view_size(p):
  """A tensor size holding a 40-deep shared tuple, formatted into the error message."""
  size = _tuple(_nested_shared(40, b'\x86'))
  return _pth(p, _pickle(_tensor(_storage('0', 1), _int(0), size, _ints(1))), _FLOAT4)


def _nested_list_codecs(p):
  """``_codecs.encode`` of a 40-deep shared list, formatted into the error message."""
  return _pth(p, _pickle(_global('_codecs', 'encode'),
                         _tuple(_nested_shared(40, b'e'), _str('latin1')), b'R'))


def _nested_tuple_dict_key(p):
  """A dict key that is a 40-deep shared tuple: hashing it visits 2**40 leaves."""
  return _pth(p, _pickle(b'}', _nested_shared(40, b'\x86'), _int(1), b's'))


def _opcode_count(p):
  """1.1 million one-byte opcodes (EMPTY_LIST), each a new object."""
  return _pth(p, _pickle(b'(', b']' * 1_100_000, b'l'))


def _memo_index(p):
  """LONG_BINPUT at index 2**26: CPython's C unpickler grew its memo array to 1 GiB."""
  return _pth(p, _pickle(b'N', b'r' + struct.pack('<I', 1 << 26)))


HOSTILE = {
    'poison_storage_type': (_poison_storage_type, r'BUILD on _StorageType'),
    'poison_dtype': (_poison_dtype, r'BUILD on TorchDtype'),
    'stride0_view': (_stride0_view, r'stride-0 or overlapping views'),
    'overlapping_view': (_overlapping_view, r'stride-0 or overlapping views'),
    'repeated_views': (_repeated_views, r'stride-0 or overlapping views'),
    'deflate_storage': (_deflate_storage, r'data/0 is compressed'),
    'bz2_data_pkl': (_bz2_data_pkl, r'data\.pkl is compressed'),
    'lying_entry_size': (_lying_entry_size, r'data/0 claims 1073741824 bytes, more than the '
                                            r'archive holds'),
    'nested_list_persistent_id': (_nested_list_persistent_id, r'unexpected persistent id \(\['),
    'nested_list_in_ordered_dict': (_nested_list_in_ordered_dict,
                                    r"unexpected persistent id \(OrderedDict\(\{'k': \[\["),
    'nested_tuple_view_size': (_nested_tuple_view_size, r'bad tensor view .*size=\(\(\('),
    'nested_list_codecs': (_nested_list_codecs, r'refusing _codecs\.encode\(\[\['),
    'nested_tuple_dict_key': (_nested_tuple_dict_key, r'refusing a dict key of type tuple'),
    'opcode_count': (_opcode_count, r'more than 1000000 opcodes'),
    'memo_index': (_memo_index, None),
}


@pytest.fixture(scope='module')
def hostile_results(tmp_path_factory) -> tuple[dict[str, pathlib.Path], dict[str, dict]]:
  """Every hostile file written, then loaded by one child process (one start-up for all)."""
  folder = tmp_path_factory.mktemp('hostile')
  paths = {case: write(folder / f'{case}.pth') for case, (write, _) in HOSTILE.items()}
  return paths, _load_in_child(paths)


@pytest.mark.parametrize('case', list(HOSTILE))
def test_hostile_file_is_bounded_and_harmless(hostile_results, case):
  paths, results = hostile_results
  _, refusal = HOSTILE[case]
  assert case in results, f'{case}: not loaded within the time limit (or an earlier case hung)'
  out = results[case]
  if refusal is None:
    assert out['error'] is None, out
  else:
    assert out['error'] is not None, f'{case}: loaded, expected a refusal matching {refusal!r}'
    assert out['error'].split(':')[0] in ('TorchCheckpointError', 'UnsafeCheckpointError'), out
    assert str(paths[case]) in out['error'], out
    assert len(out['error']) < 1000, out  # The bounded repr.
    assert re.search(refusal, out['error']), out
  assert out['cpu_seconds'] < MAX_CPU_SECONDS, out
  assert out['peak_mib'] < MAX_PEAK_MIB, out
  assert out['sample'] == 'equal', out  # Nothing the file did changed how the next is read.
