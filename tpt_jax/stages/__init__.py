"""The TPT stages: Think (sampler), Prune (answers), Train (loss, SFT data), Eval."""
