"""``python -m anysat_jax.pipeline_bench``: input-pipeline throughput next to a tiny model step
(``anysat_jax.tools.pipeline_bench``)."""

import sys

from anysat_jax.tools.pipeline_bench import main

if __name__ == "__main__":
  sys.exit(main())
