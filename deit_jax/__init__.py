"""DeiT (Touvron et al. 2021) in JAX / Flax NNX."""

__version__ = "0.1.0"
