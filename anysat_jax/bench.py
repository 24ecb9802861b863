"""``python -m anysat_jax.bench``: CPU/GPU timing and memory table (``anysat_jax.tools.bench``)."""

import sys

from anysat_jax.tools.bench import main

if __name__ == "__main__":
  sys.exit(main())
