"""The model core: Gemma2 definition, sharding rules, weights, checkpoints, tokenizers."""
