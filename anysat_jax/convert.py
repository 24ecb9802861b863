"""``python -m anysat_jax.convert``: official checkpoint to orbax (``checkpoints.convert``)."""

import sys

from anysat_jax.checkpoints.convert import main

if __name__ == "__main__":
  sys.exit(main())
