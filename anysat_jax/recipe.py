"""``python -m anysat_jax.recipe --config=configs/geoplex.py``: the data and mask draws of a
pretraining config, simulated on the host (``anysat_jax.tools.recipe``)."""

from anysat_jax.tools.recipe import run

if __name__ == "__main__":
  run()
