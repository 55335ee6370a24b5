"""tpt_jax: Think, Prune, Train for Gemma2, Llama 3.x and Qwen2.5 in JAX."""
__version__ = "0.1.0"
