import sys

from starcoder_jax.cli.main import main

sys.exit(main())
