"""Question sources: GSM8K, MATH-style, any JSONL, tfds, and the built-in synthetic task."""
from tpt_jax.data.sources import load_seed, load_split, seed_examples
from tpt_jax.data.synthetic import seed_solutions, synthetic_split

__all__ = ["load_seed", "load_split", "seed_examples", "seed_solutions", "synthetic_split"]
