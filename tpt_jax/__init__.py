"""tpt_jax: Think, Prune, Train for Gemma2 in JAX."""
__version__ = "0.1.0"
