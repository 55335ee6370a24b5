"""The model core: one definition for Gemma2, Llama 3.x and Qwen2 (the package name is history),
sharding rules, weights, checkpoints, tokenizers."""
