"""``python -m anysat_jax.embed``: features of rasters of any size (``inference.embed_cli``)."""

import sys

from anysat_jax.inference.embed_cli import main

if __name__ == "__main__":
  sys.exit(main())
