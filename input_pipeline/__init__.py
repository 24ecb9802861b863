"""Input pipeline: dataset readers, TFDS builders, Grain loaders and the GeoPlex mixture."""
