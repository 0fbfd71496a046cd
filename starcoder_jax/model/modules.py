"""The StarCoder family as Flax NNX modules: GPTBigCode and StarCoder2 in one stack.

Shape letters, used in every einsum and shape comment below:
  B batch, T query length, S key length (cache length), D model width,
  N query heads, K kv heads (1 for multi-query), G query heads per kv head,
  H head dim, F mlp width, V vocab, L layers.

Weights are stored as [in, out] kernels (HF's nn.Linear stores [out, in]), with
the fused HF `c_attn` split into query / key / value projections so that each
one carries its own head axes (which the sharding rules name).

The two architectures differ where the config says (config.model_type):
GPTBigCode adds a learned position table to the token embedding, StarCoder2
rotates queries and keys by position (RoPE, `rotate`), has K kv heads
(1 <= K <= N), an attention window (`config.window`) and optional biases.
Blocks, LayerNorms, MLP and heads are the same modules.
"""

from __future__ import annotations

import math
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from starcoder_jax.config import QUANTIZATION_MODES, StarCoderConfig, check_quantization
from starcoder_jax.model.kv_cache import KVCache, LayerCache
from starcoder_jax.ops import quant
from starcoder_jax.ops.attention import attention
from starcoder_jax.ops.matmul import project, resolve
from starcoder_jax.ops.remat import recompute
from starcoder_jax.parallel.rules import ACTIVATION, constrain, kv_head_axis

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# What a block keeps for the backward pass (`StarCoder.remat`, fine-tuning's model.remat):
#   "none"         every activation, GELU's and LayerNorm's float32 intermediates
#                  included (fastest, most memory: at T = 8192 and F 8192 the tanh
#                  GELU alone keeps five [T, F] float32 arrays, 1.25 GiB a layer);
#   "elementwise"  every activation but those: the backward pass recomputes GELU and
#                  LayerNorm from their inputs, which the block keeps anyway (cheap
#                  elementwise work);
#   "projections"  the outputs of the dense projections the backward pass reads (q, k,
#                  v, attention out, tagged PROJECTION; fc's, which GELU's own
#                  checkpoint keeps): attention and GELU are rerun. Under
#                  jax.checkpoint, whose reruns XLA:CPU merges with the forward pass
#                  (ops/remat.py), so there it saves no memory;
#   "full"         only the block's input: the backward pass reruns the whole block
#                  (ops.remat.recompute, in the form that holds on the backend).
# Every policy but "none" recomputes GELU and LayerNorm. The default is "elementwise":
# on XLA:CPU it is also the faster of the two at 2048 tokens (BENCHMARKS.md, "Remat
# policies"), where keeping the intermediates costs more memory traffic than redoing them.
REMAT_POLICIES = ("none", "elementwise", "projections", "full")
DEFAULT_REMAT = "elementwise"
PROJECTION = "projection"  # the checkpoint_name of every Dense output


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


class Quantized(nnx.Variable):
    """A matmul weight held in a weight-only format (ops.quant: an int8
    QuantizedWeight or a 4-bit Packed4; not an nnx.Param: never trained).
    Its `out_sharding` names the axes of the float weight it stands for,
    [*in, *out]; parallel.mesh derives those of the arrays it holds."""


class Derived(nnx.Variable):
    """A copy of other weights in another layout, made for a backend's form
    (`StarCoder.adapt_to_backend_`): not an nnx.Param (never trained), never
    saved, remade whenever its source changes."""


def lora_param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.LoRAParam:
    """A LoRA adapter matrix (an nnx.LoRAParam, which an nnx filter tells from
    the base's nnx.Params) with its logical axes; AdamW decays it, as the HF
    Trainer decays PEFT's adapters."""
    return nnx.LoRAParam(value, out_sharding=tuple(axes), eager_sharding=False, weight_decay=True)


def quantized_weight(w: jax.Array, n_in: int, axes, mode: str) -> Quantized:
    """w [*in, *out] (logical axes `axes`) in the weight format `mode` (ops.quant.quantize)."""
    return Quantized(quant.quantize(w, n_in, mode), out_sharding=tuple(axes), eager_sharding=False)


def _quantized(var: nnx.Variable, n_in: int, mode: str) -> Quantized:
    """The `mode` form of a float [*in, *out] parameter, or var itself if it is quantized already."""
    if isinstance(var, Quantized):
        return var
    return quantized_weight(var[...], n_in, var.get_metadata()["out_sharding"], mode)


def _check_equation(equation: str, n_in: int, n_out: int) -> None:
    """A Dense equation such as "BTD,DNH->BTNH": leading axes, then n_in inputs and n_out outputs."""
    lhs, _, out = equation.partition("->")
    x, _, w = lhs.partition(",")
    if len(w) != n_in + n_out or x[len(x) - n_in:] != w[:n_in] or out[len(out) - n_out:] != w[n_in:]:
        raise ValueError(f"Dense equation {equation!r} does not contract {n_in} input axes into "
                         f"{n_out} output axes (expected e.g. 'BTD,DF->BTF')")


class Embedding(nnx.Module):
    """A lookup table [rows, D]; also the tied LM head.

    With quantize set (the token table of a quantized model: a weight
    format of ops.quant) `embedding` holds the table's transpose [D, rows]
    in that format, output-major like every quantized weight: a row's
    values and scales together (int8: q [rows, D], one scale per row).
    """

    def __init__(self, rows: int, dim: int, axes: tuple[str, str], *, config: StarCoderConfig,
                 rngs: nnx.Rngs, quantize: str | None = None):
        table = _normal(rngs, (rows, dim), config.initializer_range, jnp_dtype(config.param_dtype))
        self.dtype = jnp_dtype(config.dtype)
        self.matmul_impl = config.matmul_impl
        self.embedding = (quantized_weight(jnp.transpose(table), 1, axes[::-1], quantize) if quantize
                          else param(table, axes))

    @property
    def quantized(self) -> bool:
        return isinstance(self.embedding, Quantized)

    def quantize_(self, mode: str) -> None:
        """Replaces the float table by its `mode` form, in place."""
        if not self.quantized:
            table = self.embedding
            self.embedding = quantized_weight(jnp.transpose(table[...]), 1,
                                              table.get_metadata()["out_sharding"][::-1], mode)

    def __call__(self, ids: jax.Array) -> jax.Array:
        if self.quantized:
            return quant.lookup(self.embedding.get_value(), ids, self.dtype)
        # sharding: gather the table's fsdp shards before the lookup (no-op without a mesh)
        table = constrain(self.embedding[...], (jax.P.UNCONSTRAINED, None))
        return jnp.take(table, ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> logits [B, T, V] against the table (tied LM head)."""
        return project(x, self.embedding.get_value(), 1, impl=self.matmul_impl, dtype=self.dtype,
                       out_major=not self.quantized)


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32, returned in the compute dtype."""

    def __init__(self, dim: int, *, config: StarCoderConfig):
        pdt = jnp_dtype(config.param_dtype)
        self.scale = param(jnp.ones((dim,), pdt), ("norm",))
        self.bias = param(jnp.zeros((dim,), pdt), ("norm",))
        self.eps = config.layer_norm_epsilon
        self.dtype = jnp_dtype(config.dtype)

    def __call__(self, x: jax.Array, *, recompute: bool = False) -> jax.Array:
        # recompute (every remat policy but "none"): checkpointed, so the backward
        # pass renormalizes x, which the residual stream keeps anyway, where autodiff
        # keeps four more [B, T, D] float32 intermediates per LayerNorm.
        return jax.checkpoint(self._normalize)(x) if recompute else self._normalize(x)

    def _normalize(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class LoRA(nnx.Module):
    """A LoRA adapter of a projection [*in] -> [*out] (PEFT's lora_A, lora_B):
    the update dropout(x) @ A @ B * scale, with A [*in, r] and B [r, *out] in
    our [in, out] layout.

    A starts kaiming-uniform in (-1/sqrt(in), 1/sqrt(in)) and B at zero, as in
    PEFT, so a new adapter leaves the model's outputs as they were. Both are
    nnx.LoRAParams whose logical axes are the kernel's, with `lora_rank`
    (never split) for r. shared_a: no A of its own; the caller passes the
    rank-r input made by another adapter's A (key and value read the query's:
    HF's fused c_attn has one A for all three). Dropout applies to the
    adapter's input only, and only when rngs are given.
    """

    def __init__(self, in_shape, out_shape, axes: tuple[str, ...], *, rank: int, scale: float,
                 dropout: float, dtype, matmul_impl: str, rngs: nnx.Rngs, shared_a: bool = False):
        n_in = len(in_shape)
        self.n_in, self.scale, self.matmul_impl = n_in, float(scale), matmul_impl
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = None if shared_a else jax.random.uniform(rngs.params(), (*in_shape, rank), jnp.float32, -bound, bound)
        self.a = nnx.data(None if shared_a else lora_param(a.astype(dtype), (*axes[:n_in], "lora_rank")))
        self.b = lora_param(jnp.zeros((rank, *out_shape), dtype), ("lora_rank", *axes[n_in:]))
        self.drop = nnx.Dropout(dropout)

    def down(self, x: jax.Array, dtype, rngs: nnx.Rngs | None = None) -> jax.Array:
        """x [..., *in] -> float32 [..., r]: dropout(x) @ A."""
        x = self.drop(x, deterministic=rngs is None, rngs=rngs)
        return project(x, self.a[...], self.n_in, impl=self.matmul_impl, dtype=dtype)

    def up(self, low: jax.Array, dtype) -> jax.Array:
        """low [..., r] -> the float32 update [..., *out]: low @ B * scale."""
        return project(low.astype(dtype), self.b[...], 1, impl=self.matmul_impl, dtype=dtype) * self.scale


class Dense(nnx.Module):
    """A projection with a bias: kernel [*in_axes, *out_axes], bias [*out_axes],
    computed by ops.matmul.project in the form config.matmul_impl picks.

    equation: the product written out ("BTD,DNH->BTNH"), checked against the
    shapes. Quantized (config.quantization, or `quantize_(mode)`), the
    kernel is a weight in that format (ops.quant) under the same name.
    `lora`: a LoRA adapter added to the output (model.lora.add_lora), or None.
    """

    def __init__(self, equation: str, in_shape, out_shape, axes: tuple[str, ...], *, std: float,
                 config: StarCoderConfig, rngs: nnx.Rngs, bias: bool = True):
        _check_equation(equation, len(in_shape), len(out_shape))
        pdt = jnp_dtype(config.param_dtype)
        self.n_in = len(in_shape)
        self.matmul_impl = config.matmul_impl
        kernel = _normal(rngs, (*in_shape, *out_shape), std, pdt)
        if config.quantization is not None:
            self.kernel = quantized_weight(kernel, self.n_in, axes, config.quantization)
        else:
            self.kernel = param(kernel, axes, decay=True)
        # a [D] output bias is tiny: whole on every device like the LayerNorms
        bias_axes = tuple("norm" if a == "embed" else a for a in axes[self.n_in:])
        self.bias = param(jnp.zeros(out_shape, pdt), bias_axes) if bias else None
        self.dtype = jnp_dtype(config.dtype)
        self.lora: LoRA | None = nnx.data(None)  # a data attribute: add_lora may set one later

    @property
    def quantized(self) -> bool:
        return isinstance(self.kernel, Quantized)

    def quantize_(self, mode: str) -> None:
        """Replaces the float kernel by its `mode` form, in place."""
        self.kernel = _quantized(self.kernel, self.n_in, mode)

    def lora_input(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array | None:
        """The adapter's rank-r input dropout(x) @ A [..., r], or None without an adapter."""
        return None if self.lora is None else self.lora.down(x, self.dtype, rngs)

    def __call__(self, x: jax.Array, *, low_rank: jax.Array | None = None,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        """x [..., *in] -> [..., *out]; low_rank: the adapter's input made elsewhere (`lora_input`)."""
        y = project(x, self.kernel.get_value(), self.n_in, impl=self.matmul_impl, dtype=self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        if self.lora is not None:
            y = y + self.lora.up(self.lora_input(x, rngs) if low_rank is None else low_rank, self.dtype)
        # named for the "projections" remat policy, which saves exactly these outputs
        return checkpoint_name(y.astype(self.dtype), PROJECTION)


def rotate(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (RoPE, in transformers' half-split form): x [B, T, *, H]
    at positions [B, T] -> x * cos + rotate_half(x) * sin, the angles of dimension pair
    (i, i + H/2) being position / theta^(2i / H); computed in float32, returned in x's dtype."""
    h = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    x32 = x.astype(jnp.float32)
    half = jnp.concatenate([-x32[..., h // 2:], x32[..., :h // 2]], axis=-1)
    return (x32 * jnp.cos(angles) + half * jnp.sin(angles)).astype(x.dtype)


class Attention(nnx.Module):
    """Causal self-attention with N query heads sharing K kv heads (K=1: multi-query),
    rotary positions and a window for StarCoder2; the attention form is
    config.attention_impl (starcoder_jax.ops.attention)."""

    def __init__(self, config: StarCoderConfig, *, rngs: nnx.Rngs):
        d, n, k, h = config.n_embd, config.n_head, config.kv_heads, config.head_dim
        std = config.initializer_range
        # One K/V head (multi-query) cannot be split: the rules keep it whole.
        kv = kv_head_axis(k, n)
        bias = config.use_bias
        self.query = Dense("BTD,DNH->BTNH", (d,), (n, h), ("embed", "heads", "head_dim"),
                           std=std, config=config, rngs=rngs, bias=bias)
        self.key = Dense("BTD,DKH->BTKH", (d,), (k, h), ("embed", kv, "head_dim"),
                         std=std, config=config, rngs=rngs, bias=bias)
        self.value = Dense("BTD,DKH->BTKH", (d,), (k, h), ("embed", kv, "head_dim"),
                           std=std, config=config, rngs=rngs, bias=bias)
        # GPT-2's scaled init of the residual projections (std / sqrt(2 L)).
        self.out = Dense("BTNH,NHD->BTD", (n, h), (d,), ("heads", "head_dim", "embed"),
                         std=std / math.sqrt(2 * config.n_layer), config=config, rngs=rngs, bias=bias)
        self.scale = 1.0 / math.sqrt(h) if config.scale_attn_weights or config.rotary else 1.0
        self.rope_theta = config.rope_theta if config.rotary else None  # None: positions are learned
        self.window = config.window
        self.fused_qkv = config.fused_qkv  # HF's one c_attn: one LoRA A shared by q, k and v
        self.attn_pdrop = config.attn_pdrop
        self.attention_impl = config.attention_impl  # ops.attention form: "auto" or forced by name
        self.resid_drop = nnx.Dropout(config.resid_pdrop)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: LayerCache | None,
                 rngs: nnx.Rngs | None = None, *, read_cache: bool = True,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, LayerCache | None]:
        """x [B, T, D], positions [B, T] -> ([B, T, D], updated cache).

        With a cache, k/v are written at `positions`; `read_cache=False`
        (a prefill from position 0) attends to the T new keys only instead of
        all S cache slots. A ring-buffer cache (a windowed model) is read as it
        was before the write, followed by the T new keys. segment_ids [B, T] (int, no cache): a token sees
        only the keys of its own segment (documents packed into one row).
        """
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids are for training and evaluation without a cache; got a cache too")
        # c_attn's one LoRA A, read by q, k and v (or None); separate projections have their own
        low = self.query.lora_input(x, rngs) if self.fused_qkv else None
        q = self.query(x, low_rank=low, rngs=rngs)  # [B, T, N, H]
        k = self.key(x, low_rank=low, rngs=rngs)  # [B, T, K, H]
        v = self.value(x, low_rank=low, rngs=rngs)  # [B, T, K, H]
        if self.rope_theta is not None:
            q, k = rotate(q, positions, self.rope_theta), rotate(k, positions, self.rope_theta)
        k_positions = positions
        if cache is not None and cache.ring:
            new_k, new_v = k, v
            if read_cache:  # the slots before this write, then the new keys
                k = jnp.concatenate([cache.keys(q.dtype).astype(k.dtype), k], axis=1)  # [B, S + T, K, H]
                v = jnp.concatenate([cache.values(q.dtype).astype(v.dtype), v], axis=1)
                # A slot holding a position at or after this chunk's first is stale (a rejected
                # speculative token, a cancelled request's tail): the chunk brings its own.
                cached = cache.positions()
                cached = jnp.where(cached < positions[:, :1], cached, -1)
                k_positions = jnp.concatenate([cached, positions.astype(jnp.int32)], axis=1)
            cache = cache.write(new_k, new_v, positions)
        elif cache is not None:
            cache = cache.write(k, v, positions)
            if read_cache:
                k, v = cache.keys(q.dtype), cache.values(q.dtype)  # [B, S, K, H]
                k_positions = cache.positions()
        # No cache, or a prefill from position 0: the keys are these T queries' own tokens, in order.
        own_keys = cache is None or not read_cache
        dropout_key = rngs.dropout() if rngs is not None and self.attn_pdrop > 0 else None
        out = attention(q, k, v, positions, k_positions, impl=self.attention_impl, own_keys=own_keys,
                        scale=self.scale, dropout_rate=self.attn_pdrop, dropout_key=dropout_key,
                        q_segments=segment_ids, k_segments=segment_ids, window=self.window)
        y = self.out(out, rngs=rngs)
        y = self.resid_drop(y, deterministic=rngs is None, rngs=rngs)
        return y, cache


class MLP(nnx.Module):
    def __init__(self, config: StarCoderConfig, *, rngs: nnx.Rngs):
        d, f = config.n_embd, config.mlp_dim
        std = config.initializer_range
        self.fc = Dense("BTD,DF->BTF", (d,), (f,), ("embed", "mlp"), std=std, config=config, rngs=rngs,
                        bias=config.use_bias)
        self.proj = Dense("BTF,FD->BTD", (f,), (d,), ("mlp", "embed"),
                          std=std / math.sqrt(2 * config.n_layer), config=config, rngs=rngs, bias=config.use_bias)
        self.approximate = config.gelu_approximate
        self.drop = nnx.Dropout(config.resid_pdrop)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None, *, recompute: bool = False) -> jax.Array:
        h = self.fc(x, rngs=rngs)  # [B, T, F]
        # recompute (every remat policy but "none"): checkpointed, so the backward
        # pass recomputes GELU's derivative from its input. Left to autodiff, the
        # tanh form keeps five [B, T, F] float32 intermediates per layer (1.25 GiB at
        # T = 8192 for starcoderbase-1b). (A custom VJP doing the same measured
        # worse on XLA:CPU: its rerun merged with the forward.)
        h = jax.checkpoint(self._gelu)(h) if recompute else self._gelu(h)
        return self.drop(self.proj(h, rngs=rngs), deterministic=rngs is None, rngs=rngs)

    def _gelu(self, h: jax.Array) -> jax.Array:
        return jax.nn.gelu(h.astype(jnp.float32), approximate=self.approximate).astype(h.dtype)


class Block(nnx.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then + mlp(ln_2(.))."""

    def __init__(self, config: StarCoderConfig, *, rngs: nnx.Rngs):
        self.ln_1 = LayerNorm(config.n_embd, config=config)
        self.attn = Attention(config, rngs=rngs)
        self.ln_2 = LayerNorm(config.n_embd, config=config)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, cache=None, rngs=None, *, read_cache=True, segment_ids=None,
                 recompute_elementwise=False):
        """recompute_elementwise: the backward pass recomputes GELU and the
        LayerNorms from their inputs rather than keeping their intermediates."""
        r = recompute_elementwise
        y, cache = self.attn(self.ln_1(x, recompute=r), positions, cache, rngs, read_cache=read_cache,
                             segment_ids=segment_ids)
        x = x + y
        x = x + self.mlp(self.ln_2(x, recompute=r), rngs, recompute=r)
        return x, cache


class StarCoder(nnx.Module):
    """GPTBigCodeForCausalLM (or Starcoder2ForCausalLM, per config.model_type) in NNX.

    `model(input_ids)` maps int32 ids [B, T] to float32 logits [B, T, V].
    Generation uses `model.hidden(...)` with a `KVCache` and `model.logits(...)`
    on the positions it needs.
    """

    def __init__(self, config: StarCoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        quantized = config.quantization is not None
        self.wte = Embedding(config.vocab_size, config.n_embd, ("vocab", "embed"), config=config,
                             rngs=rngs, quantize=config.quantization)
        # GPTBigCode's learned positions; StarCoder2 rotates q and k instead (no table)
        self.wpe = None if config.rotary else Embedding(config.n_positions, config.n_embd, ("positions", "embed"),
                                                        config=config, rngs=rngs)
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, config=config)
        if not config.tie_word_embeddings:
            head = _normal(rngs, (config.n_embd, config.vocab_size), config.initializer_range,
                           jnp_dtype(config.param_dtype))
            if quantized:  # output-major, as every quantized weight (int8: q [V, D], scale [V])
                self.lm_head = quantized_weight(head, 1, ("embed", "vocab"), config.quantization)
            else:
                self.lm_head = param(head, ("embed", "vocab"), decay=True)
        self.drop = nnx.Dropout(config.embd_pdrop)
        # What blocks keep for the backward pass: a name of REMAT_POLICIES (training memory).
        self.remat = DEFAULT_REMAT

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None, *,
                 segment_ids: jax.Array | None = None, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Logits [B, T, V] (float32) for ids [B, T]; `rngs` turns dropout on.

        segment_ids [B, T] (int): packed documents; a token attends only
        within its own segment (positions are still absolute: restart them
        per document to run each one as if alone).
        """
        input_ids = jnp.asarray(input_ids)
        check_input_ids(input_ids, self.config)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        x, _ = self.hidden(input_ids, positions, rngs=rngs, segment_ids=segment_ids)
        return self.logits(x)

    def hidden(self, input_ids: jax.Array, positions: jax.Array, cache: KVCache | None = None,
               *, rngs: nnx.Rngs | None = None, read_cache: bool = True,
               segment_ids: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """Final hidden states [B, T, D] (after ln_f) and the updated cache.

        positions [B, T] are absolute token positions, increasing along each
        row (consecutive tokens of one sequence); with a cache, the new
        keys/values are written at those positions and every query sees the
        cached keys at positions <= its own. A prefill that starts at position
        0 passes read_cache=False: nothing older is cached, so attention reads
        the T new keys rather than all S slots. segment_ids [B, T] (int,
        without a cache only) keep packed documents apart in attention.
        """
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids are for training and evaluation without a cache; got a cache too")
        x = self.wte(input_ids)  # [B, T, D]
        if self.wpe is not None:
            # A position past the table (only a speculative pass's lookahead feeds one, for a
            # token that is never kept) reads its last row: jnp.take would give NaN, which a
            # cache slot's value would carry into every later query's weighted sum.
            x = x + self.wpe(jnp.minimum(positions, self.config.n_positions - 1))
        x = self.drop(x, deterministic=rngs is None, rngs=rngs)
        layers = []
        policy = check_remat(self.remat, "StarCoder.remat")
        elementwise = policy != "none"
        rematted = _rematted_block(policy)
        for i, block in enumerate(self.blocks):
            x = constrain(x, ACTIVATION)  # sharding: block boundary (no-op without a mesh)
            if rematted is not None and cache is None:
                x = rematted(block, x, positions, rngs, segment_ids)
                continue
            x, layer = block(x, positions, None if cache is None else cache.layer(i), rngs,
                             read_cache=read_cache, segment_ids=segment_ids, recompute_elementwise=elementwise)
            layers.append(layer)
        x = constrain(x, ACTIVATION)  # sharding: block boundary (no-op without a mesh)
        x = self.ln_f(x, recompute=elementwise)
        if cache is not None:
            cache = cache.replace_layers(layers)
        return x, cache

    def logits(self, x: jax.Array) -> jax.Array:
        """Hidden states [B, T, D] -> float32 logits [B, T, V].

        One token per row (decode) on the "cpu" form reads the tied head from
        the [D, V] copy `adapt_to_backend_` makes, when there is one and it
        was made from the current table.
        """
        impl = self.config.matmul_impl
        if not self.config.tie_word_embeddings:
            return project(x, self.lm_head.get_value(), 1, impl=impl, dtype=x.dtype)
        head = self._decode_head() if x.shape[1] == 1 and resolve(impl) == "cpu" else None
        if head is None:
            return self.wte.attend(x)
        return project(x, head, 1, impl=impl, dtype=self.wte.dtype)

    def _decode_head(self) -> jax.Array | None:
        """The [D, V] copy of the tied table, or None: none made, or made from
        another table than the current one (its weights changed since)."""
        copy = vars(self).get("decode_head")
        if copy is None:
            return None
        table = self.wte.embedding.get_value()
        # Inside a traced program the table is a tracer: the copy was checked
        # where the program's parameters were split off (adapt_to_backend_).
        if not isinstance(table, jax.core.Tracer) and not copy.get_metadata()["source"].made_from(table):
            return None
        return copy.get_value()

    def adapt_to_backend_(self, *, sharded: bool = False, decode: bool = False) -> StarCoder:
        """Lays the weights out for the matmul form config.matmul_impl resolves
        to here (ops.matmul.resolve; sharded: the model will run under a
        mesh); in place, idempotent; returns self.

        On the "cpu" form int8 kernels take the CPU tile loop's input blocks
        (ops.int8.QuantizedWeight.for_cpu), and with `decode` (the model is
        about to generate) a tied float head gets a [D, V] copy
        (`decode_head`, a `Derived` variable): XLA:CPU's matrix-vector
        product reads it about 1.8x faster than the [V, D] table
        (BENCHMARKS.md, "CPU decode LM head"). A copy made from an older
        table (the weights were trained, updated or quantized since) is
        remade here (or dropped without `decode`), and `logits` never reads
        one outside a traced program. Other forms: the stored layout and no copy.
        """
        cpu = resolve(self.config.matmul_impl, sharded=sharded) == "cpu"
        for var in self._quantized_matmul_weights():
            w = var.get_value()
            var.set_value(w.for_cpu() if cpu else w.neutral())
        fresh = self._decode_head() is not None
        wanted = cpu and self.config.tie_word_embeddings and not self.wte.quantized
        if wanted and decode and not fresh:
            table = self.wte.embedding.get_value()
            self.decode_head = Derived(jnp.transpose(table), source=_Source(table),
                                       out_sharding=("embed", "vocab"), eager_sharding=False)
        elif "decode_head" in vars(self) and not (wanted and fresh):
            del self.decode_head
        return self

    def _quantized_matmul_weights(self) -> list[Quantized]:
        """The quantized weights read only by products (not the token table, which lookups read)."""
        found = [m.kernel for _, m in nnx.iter_modules(self) if isinstance(m, Dense) and m.quantized]
        if not self.config.tie_word_embeddings and isinstance(self.lm_head, Quantized):
            found.append(self.lm_head)
        return found

    def quantize_(self, mode: str = "int8", *, sharded: bool = False) -> StarCoder:
        """Quantizes every matmul weight in place to `mode` (QUANTIZATION_MODES:
        int8, see starcoder_jax.ops.int8; int4 or nf4, ops.int4); returns self.

        Dense kernels, the token table (also the tied LM head) and an untied
        head become quantized weights under the same names; LayerNorms,
        biases and the position table stay as they are. Each float weight is
        released as soon as its quantized form exists. The result is laid out for the
        matmul form (`adapt_to_backend_(sharded=sharded)`).
        """
        if check_quantization(mode, "quantize_ mode") is None:
            raise ValueError("quantize_ needs a mode: one of " + ", ".join(QUANTIZATION_MODES))
        if self.config.quantization is not None:
            if self.config.quantization != mode:
                raise ValueError(f"the model is {self.config.quantization}-quantized already; quantize the "
                                 f"float model to {mode} (load it again without quantize)")
            return self
        for _, module in nnx.iter_modules(self):
            if isinstance(module, Dense):
                module.quantize_(mode)
        self.wte.quantize_(mode)
        if not self.config.tie_word_embeddings:
            self.lm_head = _quantized(self.lm_head, 1, mode)
        self.config = self.config.replace(quantization=mode)
        return self.adapt_to_backend_(sharded=sharded)


class _Source:
    """Which array a derived copy was made from (by identity: jax arrays never
    change in place, so another array object means other weights). Held
    weakly: a stale copy does not keep its old source alive."""

    def __init__(self, array: jax.Array):
        self._ref = weakref.ref(array)

    def made_from(self, array) -> bool:
        return self._ref() is array


def _block_without_cache(block: Block, x, positions, rngs, segment_ids=None):
    """A block's output without a cache, recomputing GELU and LayerNorm (the
    remat policies that rerun blocks keep their intermediates neither)."""
    return block(x, positions, None, rngs, segment_ids=segment_ids, recompute_elementwise=True)[0]


def check_remat(remat: str | bool, argument: str = "remat") -> str:
    """A remat setting as a name of REMAT_POLICIES; True (older configs) is "full", False "none"."""
    if isinstance(remat, bool):
        return "full" if remat else "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"{argument} must be one of {', '.join(REMAT_POLICIES)} (or true / false), "
                         f"got {remat!r}")
    return remat


def _rematted_block(policy: str):
    """`_block_without_cache` under a policy that reruns blocks, or None ("none"
    and "elementwise" run blocks as they are)."""
    if policy in ("none", "elementwise"):
        return None
    if policy == "full":
        return _block_recomputed
    # graph=False: in graph mode nnx.remat writes back to the caller's variables and refuses
    # those of another trace level (the frozen params of a split model: LoRA, train.frozen)
    return nnx.remat(_block_without_cache, policy=jax.checkpoint_policies.save_only_these_names(PROJECTION),
                     graph=False)


def _block_recomputed(block: Block, x, positions, rngs, segment_ids=None):
    """`_block_without_cache` keeping only its arguments for the backward pass,
    which reruns it (ops.remat.recompute: the form that holds on each backend)."""
    graphdef, state = nnx.split(block)
    key = None if rngs is None else rngs.dropout()  # one key per block: the rerun draws the same masks

    def run(state, x, positions, segment_ids, key):
        again = None if key is None else nnx.Rngs(dropout=key)
        return _block_without_cache(nnx.merge(graphdef, state), x, positions, again, segment_ids)

    return recompute(run)(state, x, positions, segment_ids, key)


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
