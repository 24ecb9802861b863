"""``python -m anysat_jax.embed``: features of rasters of any size (``inference.embed_cli``)."""

import sys

from anysat_jax.core import host_memory
from anysat_jax.inference.embed_cli import main

if __name__ == "__main__":
  host_memory.return_large_blocks()
  sys.exit(main())
