"""``python -m anysat_jax.gpu_bench``: GeoPlex steps/s and MFU on a GPU (``tools.gpu_bench``)."""

import sys

from anysat_jax.tools.gpu_bench import main

if __name__ == "__main__":
  sys.exit(main())
