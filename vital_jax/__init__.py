"""vital_jax: JAX/Flax framework for latent-reasoning medical vision-language models."""

__version__ = "0.1.0"
