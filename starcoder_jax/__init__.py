"""starcoder-jax: the StarCoder (GPTBigCode) model family in JAX / Flax NNX."""

from starcoder_jax.config import PRESETS, StarCoderConfig, preset
from starcoder_jax.inference.forward import forward
from starcoder_jax.inference.generate import Generation, generate, stream
from starcoder_jax.model.kv_cache import KVCache
from starcoder_jax.model.lora import LoRAConfig, add_lora, merge_lora
from starcoder_jax.model.modules import StarCoder, abstract_model, init_model
from starcoder_jax.model.peft import save_peft
from starcoder_jax.model.plan import shard_plan
from starcoder_jax.model.pretrained import load_pretrained
from starcoder_jax.model.weights import CheckpointError, load_hf, save_hf, save_orbax
from starcoder_jax.tokenizer import load_tokenizer

__all__ = [
    "PRESETS",
    "CheckpointError",
    "Generation",
    "KVCache",
    "LoRAConfig",
    "StarCoder",
    "StarCoderConfig",
    "abstract_model",
    "add_lora",
    "forward",
    "generate",
    "init_model",
    "load_hf",
    "load_pretrained",
    "load_tokenizer",
    "merge_lora",
    "preset",
    "save_hf",
    "save_orbax",
    "save_peft",
    "shard_plan",
    "stream",
]
__version__ = "0.1.0"
