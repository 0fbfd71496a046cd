"""`python -m starcoder_jax.eval BENCHMARK ...`: the `starcoder-jax eval` command on its own."""

import sys

from starcoder_jax.cli.eval import main

sys.exit(main())
