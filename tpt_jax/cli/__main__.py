"""`python -m tpt_jax.cli`: the `tpt` command."""
import sys

from tpt_jax.cli import main

sys.exit(main())
