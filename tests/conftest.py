import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from builders import make_hf_model, make_tokenizer  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu run only where JAX's default backend is a GPU."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import jax

    if jax.default_backend() != "gpu":
        skip = pytest.mark.skip(reason=f"needs a GPU; JAX runs on {jax.default_backend()}")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A StarCoder-style tokenizer (vocab 512, StarCoder's 19 special tokens at 0..18)."""
    return make_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    """A random multi-query HF model with the test tokenizer beside it."""
    from starcoder_jax.model.weights import copy_tokenizer_files

    out = make_hf_model(str(tmp_path_factory.mktemp("tiny_mqa")), vocab_size=512, n_positions=512)
    copy_tokenizer_files(tokenizer_dir, out)
    return out
