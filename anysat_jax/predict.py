"""``python -m anysat_jax.predict``: maps and tables from a fine-tuning run
(``inference.predict_cli``)."""

import sys

from anysat_jax.core import host_memory
from anysat_jax.inference.predict_cli import main

if __name__ == "__main__":
  host_memory.return_large_blocks()
  sys.exit(main())
