"""tpt_jax: Think, Prune, Train for Gemma2, Llama 3.x and Qwen2.5 in JAX."""
from setuptools import find_packages, setup

setup(
    name="tpt_jax",
    version="0.1.0",
    description="Think, Prune, Train: self-improving Gemma2, Llama 3.x and Qwen2.5 reasoners in JAX (TPU pods to laptop CPU)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tpt_jax", "tpt_jax.*"]),
    package_data={"tpt_jax.bench": ["gsm8k_lengths.json"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.9",
        "transformers>=4.44",
        "datasets>=2.20",
        "sentencepiece>=0.2",
        "tensorflow-datasets>=4.9",
        "safetensors>=0.4",
        "numpy",
        "pyyaml",
        "tqdm",
        "huggingface_hub>=0.24",
        "tensorboardX>=2.6",
        "math-verify>=0.7",
        "sympy",
        "matplotlib",
    ],
    extras_require={
        # torch is only the HF parity reference; 2.13.0 is the CPU build this workplace carries.
        # tensorboard: its event reader checks what tracking wrote; hypothesis: property tests.
        "test": ["pytest>=8", "pytest-timeout", "hypothesis>=6", "torch==2.13.0", "tensorboard"],
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],  # NVIDIA GPUs: JAX's CUDA 12 wheels (CUDA and cuDNN from pip)
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["tpt=tpt_jax.cli:main"]},
)
