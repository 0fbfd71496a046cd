"""starcoder-jax: the StarCoder (GPTBigCode) model family in JAX / Flax NNX."""

from starcoder_jax.config import PRESETS, StarCoderConfig, preset
from starcoder_jax.kv_cache import KVCache
from starcoder_jax.model import StarCoder, abstract_model, init_model
from starcoder_jax.pretrained import load_pretrained
from starcoder_jax.tokenizer import load_tokenizer
from starcoder_jax.weights import CheckpointError, load_hf, save_hf, save_orbax

__all__ = [
    "PRESETS",
    "CheckpointError",
    "KVCache",
    "StarCoder",
    "StarCoderConfig",
    "abstract_model",
    "init_model",
    "load_hf",
    "load_pretrained",
    "load_tokenizer",
    "preset",
    "save_hf",
    "save_orbax",
]
__version__ = "0.1.0"
