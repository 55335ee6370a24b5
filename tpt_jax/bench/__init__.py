"""Benchmarks printing one JSON line (`tpt bench sample | train | prune`, see `cli.bench`) and
the ahead-of-time memory plan (`tpt plan`)."""
