"""The round loop of `tpt run`: rounds, the run directory, the end-of-run report."""
