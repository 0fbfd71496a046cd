"""The GPTBigCode architecture (StarCoder family) as Flax NNX modules.

Shape letters, used in every einsum and shape comment below:
  B batch, T query length, S key length (cache length), D model width,
  N query heads, K kv heads (1 for multi-query), G query heads per kv head,
  H head dim, F mlp width, V vocab, L layers.

Weights are stored as [in, out] kernels (HF's nn.Linear stores [out, in]), with
the fused HF `c_attn` split into query / key / value projections so that each
one carries its own head axes (which the sharding rules name).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from starcoder_jax.config import QUANTIZATION_MODES, StarCoderConfig, check_quantization
from starcoder_jax.model.kv_cache import KVCache, LayerCache
from starcoder_jax.ops.attention import attention
from starcoder_jax.ops.int8 import (
    QuantizedWeight,
    QuantScale,
    input_blocks,
    int8_lookup,
    int8_matmul,
    quantize_int8,
)
from starcoder_jax.ops.matmul import as_rows, bfloat16_matmul, cpu_bfloat16_products
from starcoder_jax.parallel.rules import ACTIVATION, constrain

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def jnp_dtype(name: str):
    return _DTYPES[name]


def _normal(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def param(value: jax.Array, axes: tuple[str | None, ...], *, decay: bool = False) -> nnx.Param:
    """A parameter that carries its logical axes (names in parallel.rules.RULES)
    as `out_sharding` metadata, which the rules table maps to mesh axes, and
    whether AdamW's weight decay applies to it (`weight_decay`: the matmul
    kernels, not biases, LayerNorms or the embedding tables)."""
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False, weight_decay=decay)


def _set_int8(module: nnx.Module, names: tuple[str, str], w: jax.Array, n_in: int, axes,
              blocks: int = 1) -> None:
    """Stores w [*in, *out] (logical axes `axes`) on `module` as int8 (attribute
    names[0], [*out, *in] or its input-blocked form, see ops.int8.quantize_int8)
    and its per-output-channel scales (names[1])."""
    q, scale = quantize_int8(w, n_in, blocks)
    in_axes, out_axes = tuple(axes[:n_in]), tuple(axes[n_in:])
    if blocks > 1:  # [C, *out, in0 / C, *in_rest]: the blocks split like in0
        q_axes = (in_axes[0],) + out_axes + ("in_block",) + in_axes[1:]
    else:
        q_axes = out_axes + in_axes
    setattr(module, names[0], QuantizedWeight(q, out_sharding=q_axes, eager_sharding=False))
    setattr(module, names[1], QuantScale(scale, out_sharding=out_axes, eager_sharding=False))


def _quantize_attr_(module: nnx.Module, name: str, names: tuple[str, str], n_in: int,
                    as_in_out=lambda w: w, blocks: int = 1) -> None:
    """Replaces the float parameter `name` by its int8 form, in place (freed first)."""
    var = getattr(module, name)
    w, axes = var[...], var.get_metadata()["out_sharding"]
    if as_in_out is jnp.transpose:
        axes = axes[::-1]
    delattr(module, name)
    _set_int8(module, names, as_in_out(w), n_in, axes, blocks)


class Embedding(nnx.Module):
    """A lookup table [rows, D]; also the tied LM head.

    With quantize=True (the token table of an int8 model) the table is
    `qembedding` int8 [rows, D] with one scale per row, `embedding_scale`.
    """

    def __init__(self, rows: int, dim: int, axes: tuple[str, str], *, config: StarCoderConfig,
                 rngs: nnx.Rngs, quantize: bool = False):
        table = _normal(rngs, (rows, dim), config.initializer_range, jnp_dtype(config.param_dtype))
        self.dtype = jnp_dtype(config.dtype)
        if quantize:  # one scale per row: the table seen as a [D, rows] matmul weight
            _set_int8(self, self.INT8_NAMES, jnp.transpose(table), 1, axes[::-1])
        else:
            self.embedding = param(table, axes)

    INT8_NAMES = ("qembedding", "embedding_scale")

    @property
    def quantized(self) -> bool:
        return hasattr(self, "qembedding")

    def quantize_(self) -> None:
        """Replaces the float table by its int8 form, in place."""
        _quantize_attr_(self, "embedding", self.INT8_NAMES, 1, jnp.transpose)

    def __call__(self, ids: jax.Array) -> jax.Array:
        if self.quantized:
            return int8_lookup(self.qembedding[...], self.embedding_scale[...], ids, self.dtype)
        # sharding: gather the table's fsdp shards before the lookup (no-op without a mesh)
        table = constrain(self.embedding[...], (jax.P.UNCONSTRAINED, None))
        return jnp.take(table, ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> logits [B, T, V] against the table (tied LM head)."""
        if self.quantized:  # the table is already [out = V, in = D]
            return int8_matmul(x, self.qembedding[...], self.embedding_scale[...], 1)
        if cpu_bfloat16_products(self.dtype):
            table = self.embedding[...]
            return as_rows(x, 1, lambda x2: bfloat16_matmul(x2, table, True), table.shape[:1])
        table = self.embedding[...].astype(self.dtype)
        return jnp.einsum("BTD,VD->BTV", x, table, preferred_element_type=jnp.float32)


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32, returned in the compute dtype."""

    def __init__(self, dim: int, *, config: StarCoderConfig):
        pdt = jnp_dtype(config.param_dtype)
        self.scale = param(jnp.ones((dim,), pdt), ("norm",))
        self.bias = param(jnp.zeros((dim,), pdt), ("norm",))
        self.eps = config.layer_norm_epsilon
        self.dtype = jnp_dtype(config.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class Dense(nnx.Module):
    """An einsum projection with a bias: kernel [*in_axes, *out_axes], bias [*out_axes].

    Quantized (config.quantization="int8", or `quantize_()`), the kernel is
    `qkernel` int8 [*out_axes, *in_axes] with `kernel_scale` [*out_axes]; a
    kernel with more inputs than one CPU tile holds is stored in `in_blocks`
    input blocks, [C, *out_axes, in0 / C, *in_rest] (quant.quantize_int8).
    """

    def __init__(self, equation: str, in_shape, out_shape, axes: tuple[str, ...], *, std: float,
                 config: StarCoderConfig, rngs: nnx.Rngs):
        pdt = jnp_dtype(config.param_dtype)
        self.equation = equation
        self.n_in = len(in_shape)
        self.in_blocks = input_blocks(in_shape)
        kernel = _normal(rngs, (*in_shape, *out_shape), std, pdt)
        if config.quantization == "int8":
            _set_int8(self, self.INT8_NAMES, kernel, self.n_in, axes, self.in_blocks)
        else:
            self.kernel = param(kernel, axes, decay=True)
        # a [D] output bias is tiny: whole on every device like the LayerNorms
        bias_axes = tuple("norm" if a == "embed" else a for a in axes[self.n_in:])
        self.bias = param(jnp.zeros(out_shape, pdt), bias_axes)
        self.dtype = jnp_dtype(config.dtype)

    INT8_NAMES = ("qkernel", "kernel_scale")

    @property
    def quantized(self) -> bool:
        return hasattr(self, "qkernel")

    def quantize_(self) -> None:
        """Replaces the float kernel by its int8 form, in place."""
        _quantize_attr_(self, "kernel", self.INT8_NAMES, self.n_in, blocks=self.in_blocks)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.quantized:
            y = int8_matmul(x, self.qkernel[...], self.kernel_scale[...], self.n_in, self.in_blocks)
        elif self.n_in == 1 and not cpu_bfloat16_products(self.dtype):
            kernel = self.kernel[...].astype(self.dtype)
            y = jnp.einsum(self.equation, x, kernel, preferred_element_type=jnp.float32)
        else:
            # One [M, I] x [I, O] product. Contracting two axes (N, H) at once,
            # XLA:CPU reads the [N, H, D] kernel about 3x slower than the same
            # bytes as one [N*H, D] matrix (a decode step's output projection:
            # 1.7 ms vs 0.5 ms); bfloat16 compute on CPU needs 2-D operands.
            kernel = self.kernel[...]
            w2 = kernel.reshape(math.prod(kernel.shape[:self.n_in]), -1)
            if cpu_bfloat16_products(self.dtype):
                def product(x2):
                    return bfloat16_matmul(x2, w2, False)
            else:
                def product(x2):
                    return jnp.dot(x2, w2.astype(self.dtype), preferred_element_type=jnp.float32)
            y = as_rows(x, self.n_in, product, kernel.shape[self.n_in:])
        return (y + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class Attention(nnx.Module):
    """Causal self-attention with N query heads sharing K kv heads (K=1: multi-query);
    the attention form is config.attention_impl (starcoder_jax.ops.attention)."""

    def __init__(self, config: StarCoderConfig, *, rngs: nnx.Rngs):
        d, n, k, h = config.n_embd, config.n_head, config.kv_heads, config.head_dim
        std = config.initializer_range
        # One K/V head (multi-query) cannot be split: the rules keep it whole.
        kv = "shared_kv_head" if config.multi_query else "kv_heads"
        self.query = Dense("BTD,DNH->BTNH", (d,), (n, h), ("embed", "heads", "head_dim"),
                           std=std, config=config, rngs=rngs)
        self.key = Dense("BTD,DKH->BTKH", (d,), (k, h), ("embed", kv, "head_dim"),
                         std=std, config=config, rngs=rngs)
        self.value = Dense("BTD,DKH->BTKH", (d,), (k, h), ("embed", kv, "head_dim"),
                           std=std, config=config, rngs=rngs)
        # GPT-2's scaled init of the residual projections (std / sqrt(2 L)).
        self.out = Dense("BTNH,NHD->BTD", (n, h), (d,), ("heads", "head_dim", "embed"),
                         std=std / math.sqrt(2 * config.n_layer), config=config, rngs=rngs)
        self.scale = 1.0 / math.sqrt(h) if config.scale_attn_weights else 1.0
        self.attn_pdrop = config.attn_pdrop
        self.attention_impl = config.attention_impl  # ops.attention form: "auto" or forced by name
        self.resid_drop = nnx.Dropout(config.resid_pdrop)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: LayerCache | None,
                 rngs: nnx.Rngs | None = None, *, read_cache: bool = True
                 ) -> tuple[jax.Array, LayerCache | None]:
        """x [B, T, D], positions [B, T] -> ([B, T, D], updated cache).

        With a cache, k/v are written at `positions`; `read_cache=False`
        (a prefill from position 0) attends to the T new keys only instead of
        all S cache slots.
        """
        q = self.query(x)  # [B, T, N, H]
        k = self.key(x)  # [B, T, K, H]
        v = self.value(x)  # [B, T, K, H]
        k_positions = positions
        if cache is not None:
            cache = cache.write(k, v, positions)
            if read_cache:
                k, v = cache.keys(q.dtype), cache.values(q.dtype)  # [B, S, K, H]
                k_positions = cache.positions()
        # No cache, or a prefill from position 0: the keys are these T queries' own tokens, in order.
        own_keys = cache is None or not read_cache
        dropout_key = rngs.dropout() if rngs is not None and self.attn_pdrop > 0 else None
        out = attention(q, k, v, positions, k_positions, impl=self.attention_impl, own_keys=own_keys,
                        scale=self.scale, dropout_rate=self.attn_pdrop, dropout_key=dropout_key)
        y = self.out(out)
        y = self.resid_drop(y, deterministic=rngs is None, rngs=rngs)
        return y, cache


class MLP(nnx.Module):
    def __init__(self, config: StarCoderConfig, *, rngs: nnx.Rngs):
        d, f = config.n_embd, config.mlp_dim
        std = config.initializer_range
        self.fc = Dense("BTD,DF->BTF", (d,), (f,), ("embed", "mlp"), std=std, config=config, rngs=rngs)
        self.proj = Dense("BTF,FD->BTD", (f,), (d,), ("mlp", "embed"),
                          std=std / math.sqrt(2 * config.n_layer), config=config, rngs=rngs)
        self.approximate = config.gelu_approximate
        self.drop = nnx.Dropout(config.resid_pdrop)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        h = self.fc(x)  # [B, T, F]
        h = jax.nn.gelu(h.astype(jnp.float32), approximate=self.approximate).astype(x.dtype)
        return self.drop(self.proj(h), deterministic=rngs is None, rngs=rngs)


class Block(nnx.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then + mlp(ln_2(.))."""

    def __init__(self, config: StarCoderConfig, *, rngs: nnx.Rngs):
        self.ln_1 = LayerNorm(config.n_embd, config=config)
        self.attn = Attention(config, rngs=rngs)
        self.ln_2 = LayerNorm(config.n_embd, config=config)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, cache=None, rngs=None, *, read_cache=True):
        y, cache = self.attn(self.ln_1(x), positions, cache, rngs, read_cache=read_cache)
        x = x + y
        x = x + self.mlp(self.ln_2(x), rngs)
        return x, cache


class StarCoder(nnx.Module):
    """GPTBigCodeForCausalLM in NNX.

    `model(input_ids)` maps int32 ids [B, T] to float32 logits [B, T, V].
    Generation uses `model.hidden(...)` with a `KVCache` and `model.logits(...)`
    on the positions it needs.
    """

    def __init__(self, config: StarCoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        quantized = config.quantization is not None
        self.wte = Embedding(config.vocab_size, config.n_embd, ("vocab", "embed"), config=config,
                             rngs=rngs, quantize=quantized)
        self.wpe = Embedding(config.n_positions, config.n_embd, ("positions", "embed"), config=config,
                             rngs=rngs)
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, config=config)
        if not config.tie_word_embeddings:
            head = _normal(rngs, (config.n_embd, config.vocab_size), config.initializer_range,
                           jnp_dtype(config.param_dtype))
            if quantized:
                _set_int8(self, self.HEAD_INT8_NAMES, head, 1, ("embed", "vocab"))  # [V, D], scale [V]
            else:
                self.lm_head = param(head, ("embed", "vocab"), decay=True)
        self.drop = nnx.Dropout(config.embd_pdrop)
        # Recompute block activations in the backward pass (training memory).
        self.remat = False

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None, *,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        """Logits [B, T, V] (float32) for ids [B, T]; `rngs` turns dropout on."""
        input_ids = jnp.asarray(input_ids)
        check_input_ids(input_ids, self.config)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        x, _ = self.hidden(input_ids, positions, rngs=rngs)
        return self.logits(x)

    def hidden(self, input_ids: jax.Array, positions: jax.Array, cache: KVCache | None = None,
               *, rngs: nnx.Rngs | None = None, read_cache: bool = True
               ) -> tuple[jax.Array, KVCache | None]:
        """Final hidden states [B, T, D] (after ln_f) and the updated cache.

        positions [B, T] are absolute token positions, increasing along each
        row (consecutive tokens of one sequence); with a cache, the new
        keys/values are written at those positions and every query sees the
        cached keys at positions <= its own. A prefill that starts at position
        0 passes read_cache=False: nothing older is cached, so attention reads
        the T new keys rather than all S slots.
        """
        x = self.wte(input_ids) + self.wpe(positions)  # [B, T, D]
        x = self.drop(x, deterministic=rngs is None, rngs=rngs)
        layers = []
        for i, block in enumerate(self.blocks):
            x = constrain(x, ACTIVATION)  # sharding: block boundary (no-op without a mesh)
            if self.remat and cache is None:
                x = nnx.remat(_block_without_cache)(block, x, positions, rngs)
                continue
            x, layer = block(x, positions, None if cache is None else cache.layer(i), rngs,
                             read_cache=read_cache)
            layers.append(layer)
        x = constrain(x, ACTIVATION)  # sharding: block boundary (no-op without a mesh)
        x = self.ln_f(x)
        if cache is not None:
            cache = cache.replace_layers(layers)
        return x, cache

    def logits(self, x: jax.Array, head: jax.Array | None = None) -> jax.Array:
        """Hidden states [B, T, D] -> float32 logits [B, T, V].

        head: an optional [D, V] copy of the tied embedding (`output_head()`).
        With one token per row (decode), XLA:CPU's matrix-vector product reads
        a [D, V] matrix about 1.8x faster than the [V, D] table, so the
        generation loop makes that copy once and passes it here.
        """
        if head is None and self.config.tie_word_embeddings:
            return self.wte.attend(x)
        if head is None and hasattr(self, "lm_head_q"):
            return int8_matmul(x, self.lm_head_q[...], self.lm_head_scale[...], 1)
        if head is None:
            head = self.lm_head[...]
        if cpu_bfloat16_products(x.dtype):
            return as_rows(x, 1, lambda x2: bfloat16_matmul(x2, head, False), head.shape[1:])
        return jnp.einsum("BTD,DV->BTV", x, head.astype(x.dtype), preferred_element_type=jnp.float32)

    def output_head(self) -> jax.Array:
        """The LM head as a [D, V] array (a transposed copy when tied).

        Quantized models have none: their int8 head is read in place.
        """
        if self.config.quantization is not None:
            raise ValueError("a quantized model's LM head is int8; it has no float [D, V] copy")
        if self.config.tie_word_embeddings:
            return jnp.transpose(self.wte.embedding[...])
        return self.lm_head[...]

    HEAD_INT8_NAMES = ("lm_head_q", "lm_head_scale")  # an untied head of an int8 model

    def quantize_(self, mode: str = "int8") -> StarCoder:
        """Quantizes every matmul weight in place (see starcoder_jax.ops.int8); returns self.

        Dense kernels, the token table (also the tied LM head) and an untied
        head become int8 with per-output-channel float32 scales; LayerNorms,
        biases and the position table stay as they are. Each float weight is
        freed as soon as its int8 form exists.
        """
        if check_quantization(mode, "quantize_ mode") is None:
            raise ValueError("quantize_ needs a mode: one of " + ", ".join(QUANTIZATION_MODES))
        if self.config.quantization is not None:
            return self
        for _, module in nnx.iter_modules(self):
            if isinstance(module, Dense):
                module.quantize_()
        self.wte.quantize_()
        if not self.config.tie_word_embeddings:
            _quantize_attr_(self, "lm_head", self.HEAD_INT8_NAMES, 1)
        self.config = self.config.replace(quantization=mode)
        return self


def _block_without_cache(block: Block, x, positions, rngs):
    return block(x, positions, None, rngs)[0]


def check_input_ids(input_ids, config: StarCoderConfig) -> None:
    """Raises ValueError for ids JAX would silently clamp (vocab or positions)."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers, got dtype {input_ids.dtype}")
    if input_ids.shape[1] > config.n_positions:
        raise ValueError(
            f"input_ids has {input_ids.shape[1]} tokens but the model holds "
            f"{config.n_positions} positions"
        )
    if isinstance(input_ids, jax.core.Tracer) or input_ids.size == 0:
        return
    values = np.asarray(input_ids)
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= config.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"input_ids contains token id {bad}, outside the vocabulary [0, {config.vocab_size})"
        )


def init_model(config: StarCoderConfig, seed: int = 0) -> StarCoder:
    """A randomly initialised model (GPT-2 init: normal(0.02), scaled residual projections)."""
    return StarCoder(config, rngs=nnx.Rngs(params=seed))


def abstract_model(config: StarCoderConfig) -> StarCoder:
    """The model's structure with ShapeDtypeStructs instead of arrays (no memory)."""
    return nnx.eval_shape(lambda: StarCoder(config, rngs=nnx.Rngs(params=0)))
