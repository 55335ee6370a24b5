"""The TPT stages: Think (sampler, prompts), Prune (answers), Train (loss, SFT data), Eval."""
