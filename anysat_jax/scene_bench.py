"""``python -m anysat_jax.scene_bench``: peak memory of ``embed`` on a scene larger than memory
against the documented bound (``anysat_jax.tools.scene_memory_bench``)."""

import sys

from anysat_jax.tools.scene_memory_bench import main

if __name__ == "__main__":
  sys.exit(main())
