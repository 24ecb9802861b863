"""``core.host_memory``: freed blocks of 128 KiB and more leave the process's resident memory."""

import json
import subprocess
import sys

import pytest

CHILD = """
import json, sys
from anysat_jax.core import host_memory
if sys.argv[1] == "on":
  host_memory.return_large_blocks()
def rss_mib():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * 4096 / 2**20
first = bytearray(1 << 20)
del first                        # glibc: the mmap threshold grows past 1 MiB here
blocks = [bytearray(1 << 20) for _ in range(200)]
pinned = bytearray(1 << 20)      # keeps the heap's top in use
before = rss_mib()
del blocks
print(json.dumps(dict(freed_mib=before - rss_mib())))
"""


def _freed(mode: str) -> float:
  out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                       check=True).stdout
  return json.loads(out)["freed_mib"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator behaviour")
def test_return_large_blocks_gives_freed_memory_back():
  assert _freed("on") > 150           # 200 MiB freed: returned to the OS
  assert _freed("off") < 50           # glibc's default keeps them in its heap
