"""Convert a checkpoint: `python convert/hf_to_jax.py SRC DST [--dtype float32]`.

The same as `starcoder-jax convert hf-to-jax SRC DST`.
"""

import sys

from starcoder_jax.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["convert", "hf-to-jax", *sys.argv[1:]]))
