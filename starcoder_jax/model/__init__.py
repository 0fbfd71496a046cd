"""The GPTBigCode model: NNX modules, the KV cache they read and write, HF / orbax parameter I/O."""

from starcoder_jax.model.modules import StarCoder, abstract_model, init_model

__all__ = ["StarCoder", "abstract_model", "init_model"]
