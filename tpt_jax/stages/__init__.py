"""The TPT stages: Think (sampler), Prune (answers), Train (trainer, compiled step, loss, SFT data), Eval."""
