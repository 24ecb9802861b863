"""``python -m anysat_jax.recipe --config=configs/geoplex.py``: the data and mask draws of a
pretraining config, simulated on the host (``anysat_jax.tools.recipe``)."""

from absl import flags

from anysat_jax.tools import recipe

flags.adopt_module_key_flags(recipe)      # --help lists the tool's flags.

if __name__ == "__main__":
  recipe.run()
