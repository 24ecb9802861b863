"""anysat_jax: the AnySat Earth-observation foundation model in JAX/Flax."""

from anysat_jax.api import AnySat
from anysat_jax.config import EncoderConfig, encoder_config
from anysat_jax.encoder import AnySatEncoder
from anysat_jax.modalities import MODALITIES, Modality

__all__ = ["AnySat", "AnySatEncoder", "EncoderConfig", "MODALITIES", "Modality", "encoder_config"]
__version__ = "0.1.0"
