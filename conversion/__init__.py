"""Command-line converters between HuggingFace checkpoints and vital_jax's Flax model directories."""
