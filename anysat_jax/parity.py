"""``python -m anysat_jax.parity``: compare with official outputs (``tools.parity``)."""

import sys

from anysat_jax.tools.parity import main

if __name__ == "__main__":
  sys.exit(main())
