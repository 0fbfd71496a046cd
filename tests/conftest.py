import atexit
import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# One persistent compilation cache for the run, shared with the subprocesses the
# tests start (CLI, notebooks, multi-device): many tests compile the very same
# programs (the same tiny models through fresh jit closures), and XLA:CPU
# compilation is most of the suite's time. A fresh directory per run keeps runs
# independent of each other; STARCODER_JAX_TEST_CACHE names a lasting one.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = os.environ.get("STARCODER_JAX_TEST_CACHE")
    if not _cache:
        _cache = tempfile.mkdtemp(prefix="starcoder-jax-xla-cache-")
        atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    if "jax" in sys.modules:  # imported before this file (a plugin): its config read the environment already
        import jax

        jax.config.update("jax_compilation_cache_dir", _cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

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
