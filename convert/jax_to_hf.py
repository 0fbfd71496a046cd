"""Convert a checkpoint: `python convert/jax_to_hf.py SRC DST [--dtype float32]`.

The same as `starcoder-jax convert jax-to-hf SRC DST`.
"""

import sys

from starcoder_jax.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["convert", "jax-to-hf", *sys.argv[1:]]))
