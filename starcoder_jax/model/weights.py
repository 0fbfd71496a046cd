"""Hugging Face safetensors checkpoints <-> our NNX parameters.

The mapping is one table: each HF tensor name, the parameter paths it feeds
and a pair of transforms (HF -> ours, ours -> HF). HF stores nn.Linear weights
as [out, in]; we store [in, out] kernels with named head axes. The fused HF
`c_attn` is [q | k | v] along the output for multi-query models (q: N*H rows,
then one k head, then one v head) and per-head interleaved [N, (q, k, v), H]
for multi-head models. StarCoder2 keeps q_proj, k_proj, v_proj and o_proj
apart, under `model.layers.{i}.self_attn`, and has no position table.

Loading reads one tensor at a time from memory-mapped files, so host memory
stays near one copy of the model. Every problem with a checkpoint (missing,
extra, misshapen or non-float tensors) is collected and reported at once.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from starcoder_jax.config import StarCoderConfig
from starcoder_jax.model.lora import has_lora
from starcoder_jax.model.modules import Derived, StarCoder, abstract_model
from starcoder_jax.ops.int8 import QuantizedWeight
from starcoder_jax.ops.quant import is_quantized, mode_of

Path = tuple  # a parameter path such as ("blocks", 0, "attn", "query", "kernel")

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
ORBAX_PARAMS = "params"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "generation_config.json",
)
# Buffers some older exports carry; they hold no learned weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
IGNORED_KEYS = ("transformer.bias",)
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message lists every problem."""


@dataclasses.dataclass(frozen=True)
class Entry:
    hf_key: str
    hf_shape: tuple[int, ...]
    paths: tuple[Path, ...]
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]


def _same(x):
    return (x,)


def _ident(x):
    return x


def _transpose(x):
    return (x.T,)


def _transpose_back(x):
    return x.T


def split_qkv_weight(w: np.ndarray, config: StarCoderConfig) -> tuple[np.ndarray, ...]:
    """HF's fused c_attn rows [(N + 2K) H, I] -> [I, N, H], [I, K, H], [I, K, H].

    I is D for the weight itself, r for a LoRA B (model/peft.py): the rows are
    [q | k | v] for multi-query models, [N, (q, k, v), H] for multi-head ones.
    """
    n, h, i = config.n_head, config.head_dim, w.shape[1]
    if config.multi_query:
        q, kk, vv = w[: n * h], w[n * h: n * h + h], w[n * h + h:]
        return (q.T.reshape(i, n, h), kk.T.reshape(i, 1, h), vv.T.reshape(i, 1, h))
    w = w.reshape(n, 3, h, i)
    return tuple(np.ascontiguousarray(w[:, j].transpose(2, 0, 1)) for j in range(3))


def join_qkv_weight(q: np.ndarray, kk: np.ndarray, vv: np.ndarray, config: StarCoderConfig) -> np.ndarray:
    """The inverse of split_qkv_weight: [I, N, H], [I, K, H], [I, K, H] -> [(N + 2K) H, I]."""
    n, h, i = config.n_head, config.head_dim, q.shape[0]
    if config.multi_query:
        return np.concatenate([q.reshape(i, n * h).T, kk.reshape(i, h).T, vv.reshape(i, h).T])
    stacked = np.stack([x.transpose(1, 2, 0) for x in (q, kk, vv)], axis=1)  # [N, 3, H, I]
    return stacked.reshape(3 * n * h, i)


def heads_to_ours(w: np.ndarray, heads: int, h: int) -> tuple[np.ndarray]:
    """nn.Linear [heads H, I] -> our [I, heads, H] (a q/k/v projection, or a LoRA B with I = r)."""
    return (np.ascontiguousarray(w.T.reshape(w.shape[1], heads, h)),)


def heads_to_hf(w: np.ndarray) -> np.ndarray:
    """The inverse of heads_to_ours: [I, heads, H] -> [heads H, I]."""
    return w.reshape(w.shape[0], -1).T


def weight_table(config: StarCoderConfig) -> list[Entry]:
    """Every HF tensor of a GPTBigCodeForCausalLM (or Starcoder2ForCausalLM) and how it
    maps to our params."""
    if config.model_type == "starcoder2":
        return _starcoder2_table(config)
    d, n, k, h = config.n_embd, config.n_head, config.kv_heads, config.head_dim
    f, v, p = config.mlp_dim, config.vocab_size, config.n_positions
    qkv_rows = (n + 2 * k) * h
    mqa = config.multi_query

    def split_qkv_bias(b):  # [(N + 2K) H] -> [N, H], [K, H], [K, H]
        if mqa:
            return (b[: n * h].reshape(n, h), b[n * h: n * h + h].reshape(1, h),
                    b[n * h + h:].reshape(1, h))
        b = b.reshape(n, 3, h)
        return tuple(np.ascontiguousarray(b[:, j]) for j in range(3))

    def join_qkv_bias(q, kk, vv):
        if mqa:
            return np.concatenate([q.reshape(-1), kk.reshape(-1), vv.reshape(-1)])
        return np.stack([q, kk, vv], axis=1).reshape(-1)

    def c_proj_to_ours(w):  # [D, N H] -> [N, H, D]
        return (w.T.reshape(n, h, d),)

    def c_proj_to_hf(w):
        return w.reshape(n * h, d).T

    entries = [
        Entry("transformer.wte.weight", (v, d), (("wte", "embedding"),), _same, _ident),
        Entry("transformer.wpe.weight", (p, d), (("wpe", "embedding"),), _same, _ident),
    ]
    for i in range(config.n_layer):
        hf, ours = f"transformer.h.{i}", ("blocks", i)
        attn = (*ours, "attn")
        for ln in ("ln_1", "ln_2"):
            entries += [
                Entry(f"{hf}.{ln}.weight", (d,), ((*ours, ln, "scale"),), _same, _ident),
                Entry(f"{hf}.{ln}.bias", (d,), ((*ours, ln, "bias"),), _same, _ident),
            ]
        entries += [
            Entry(f"{hf}.attn.c_attn.weight", (qkv_rows, d),
                  tuple((*attn, name, "kernel") for name in ("query", "key", "value")),
                  lambda w: split_qkv_weight(w, config), lambda *qkv: join_qkv_weight(*qkv, config)),
            Entry(f"{hf}.attn.c_attn.bias", (qkv_rows,),
                  tuple((*attn, name, "bias") for name in ("query", "key", "value")),
                  split_qkv_bias, join_qkv_bias),
            Entry(f"{hf}.attn.c_proj.weight", (d, n * h), ((*attn, "out", "kernel"),),
                  c_proj_to_ours, c_proj_to_hf),
            Entry(f"{hf}.attn.c_proj.bias", (d,), ((*attn, "out", "bias"),), _same, _ident),
            Entry(f"{hf}.mlp.c_fc.weight", (f, d), ((*ours, "mlp", "fc", "kernel"),),
                  _transpose, _transpose_back),
            Entry(f"{hf}.mlp.c_fc.bias", (f,), ((*ours, "mlp", "fc", "bias"),), _same, _ident),
            Entry(f"{hf}.mlp.c_proj.weight", (d, f), ((*ours, "mlp", "proj", "kernel"),),
                  _transpose, _transpose_back),
            Entry(f"{hf}.mlp.c_proj.bias", (d,), ((*ours, "mlp", "proj", "bias"),), _same, _ident),
        ]
    entries += [
        Entry("transformer.ln_f.weight", (d,), (("ln_f", "scale"),), _same, _ident),
        Entry("transformer.ln_f.bias", (d,), (("ln_f", "bias"),), _same, _ident),
    ]
    if not config.tie_word_embeddings:
        entries.append(Entry("lm_head.weight", (v, d), (("lm_head",),), _transpose, _transpose_back))
    return entries


def _starcoder2_table(config: StarCoderConfig) -> list[Entry]:
    """Starcoder2ForCausalLM's tensors: embed_tokens, per layer input_layernorm,
    self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{c_fc,c_proj} (biases
    when use_bias), then norm and an untied lm_head."""
    d, n, k, h = config.n_embd, config.n_head, config.kv_heads, config.head_dim
    f, v = config.mlp_dim, config.vocab_size

    def linear(hf, ours, hf_shape, to_ours, to_hf, bias_shape, bias_to_ours, bias_to_hf):
        out = [Entry(f"{hf}.weight", hf_shape, ((*ours, "kernel"),), to_ours, to_hf)]
        if config.use_bias:
            out.append(Entry(f"{hf}.bias", bias_shape, ((*ours, "bias"),), bias_to_ours, bias_to_hf))
        return out

    def heads(count):
        return (lambda w: heads_to_ours(w, count, h), heads_to_hf,
                (count * h,), lambda b: (b.reshape(count, h),), lambda b: b.reshape(-1))

    def o_to_ours(w):  # [D, N H] -> [N, H, D]
        return (w.T.reshape(n, h, d),)

    entries = [Entry("model.embed_tokens.weight", (v, d), (("wte", "embedding"),), _same, _ident)]
    for i in range(config.n_layer):
        hf, ours = f"model.layers.{i}", ("blocks", i)
        attn = (*ours, "attn")
        for hf_ln, ln in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
            entries += [
                Entry(f"{hf}.{hf_ln}.weight", (d,), ((*ours, ln, "scale"),), _same, _ident),
                Entry(f"{hf}.{hf_ln}.bias", (d,), ((*ours, ln, "bias"),), _same, _ident),
            ]
        for proj, name, count in (("q_proj", "query", n), ("k_proj", "key", k), ("v_proj", "value", k)):
            entries += linear(f"{hf}.self_attn.{proj}", (*attn, name), (count * h, d), *heads(count))
        entries += linear(f"{hf}.self_attn.o_proj", (*attn, "out"), (d, n * h), o_to_ours,
                          lambda w: w.reshape(n * h, d).T, (d,), _same, _ident)
        entries += linear(f"{hf}.mlp.c_fc", (*ours, "mlp", "fc"), (f, d), _transpose, _transpose_back,
                          (f,), _same, _ident)
        entries += linear(f"{hf}.mlp.c_proj", (*ours, "mlp", "proj"), (d, f), _transpose, _transpose_back,
                          (d,), _same, _ident)
    entries += [
        Entry("model.norm.weight", (d,), (("ln_f", "scale"),), _same, _ident),
        Entry("model.norm.bias", (d,), (("ln_f", "bias"),), _same, _ident),
    ]
    if not config.tie_word_embeddings:
        entries.append(Entry("lm_head.weight", (v, d), (("lm_head",),), _transpose, _transpose_back))
    return entries


# ---------------------------------------------------------------------------
# Reading an HF directory
# ---------------------------------------------------------------------------

def _refuse_pickles(path: str) -> None:
    pickles = [os.path.basename(x) for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt")
               for x in glob.glob(os.path.join(path, pattern))]
    if pickles:
        raise CheckpointError(
            f"{path} holds only PyTorch pickle weights ({', '.join(sorted(pickles))}); "
            "starcoder-jax never unpickles checkpoint files (unpickling can run arbitrary code). "
            "Convert them once, in an environment you trust, with:\n"
            "  python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\"\n"
            "then load the new directory."
        )
    raise CheckpointError(f"{path}: no {SAFE_SINGLE} or {SAFE_INDEX} found")


def safetensors_files(path: str) -> list[str]:
    """The weight files of an HF directory, checked to exist."""
    index = os.path.join(path, SAFE_INDEX)
    single = os.path.join(path, SAFE_SINGLE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err!r})") from None
        files = sorted(set(weight_map.values()))
        missing = [x for x in files if not os.path.isfile(os.path.join(path, x))]
        if missing:
            raise CheckpointError(f"{index} names files that do not exist: {', '.join(missing)}")
        return [os.path.join(path, x) for x in files]
    if os.path.isfile(single):
        return [single]
    others = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if others:
        return others
    _refuse_pickles(path)
    raise AssertionError("unreachable")


def _open_checked(file: str):
    """Opens a safetensors file, turning truncation/corruption into a clear error."""
    try:
        handle = safe_open(file, framework="numpy")
    except Exception as err:  # safetensors raises its own SafetensorError
        raise CheckpointError(
            f"{file}: not a readable safetensors file ({err}); it may be truncated or "
            "corrupted (an interrupted download?)"
        ) from None
    # The header can be intact while the data is cut short: compare the end of
    # the last tensor with the file size.
    with open(file, "rb") as raw:
        header_len = int.from_bytes(raw.read(8), "little")
        header = json.loads(raw.read(header_len))
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    size = os.path.getsize(file)
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"{file}: truncated: its header describes {8 + header_len + end} bytes "
            f"but the file has {size}; download or write it again"
        )
    return handle, header


def _is_ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.endswith(IGNORED_SUFFIXES)


def read_hf_tensors(path: str, config: StarCoderConfig):
    """Checks an HF checkpoint against the table; yields (entry, array) per tensor.

    Raises CheckpointError listing every missing, extra, misshapen or
    non-float tensor before any tensor is read.
    """
    table = weight_table(config)
    handles, where = {}, {}
    for file in safetensors_files(path):
        handle, header = _open_checked(file)
        handles[file] = handle
        for key, meta in header.items():
            if key != "__metadata__":
                where[key] = (file, meta)

    problems = []
    expected = {e.hf_key for e in table}
    tied_head = config.tie_word_embeddings and "lm_head.weight" in where
    for e in table:
        if e.hf_key not in where:
            problems.append(f"missing tensor {e.hf_key} (expected shape {list(e.hf_shape)})")
            continue
        file, meta = where[e.hf_key]
        name = os.path.basename(file)
        if tuple(meta["shape"]) != e.hf_shape:
            problems.append(f"{name}: {e.hf_key} has shape {meta['shape']}, expected {list(e.hf_shape)}")
        if meta["dtype"] not in FLOAT_DTYPES:
            problems.append(f"{name}: {e.hf_key} has dtype {meta['dtype']}, expected a float type")
    for key, (file, meta) in sorted(where.items()):
        if key in expected or _is_ignored(key):
            continue
        if key == "lm_head.weight" and tied_head:
            if tuple(meta["shape"]) != (config.vocab_size, config.n_embd):
                problems.append(f"{os.path.basename(file)}: lm_head.weight has shape {meta['shape']}")
            continue
        problems.append(f"{os.path.basename(file)}: unexpected tensor {key} (shape {meta['shape']})")
    if problems:
        raise CheckpointError(
            f"{path} does not match its config.json ({len(problems)} problem"
            f"{'s' if len(problems) > 1 else ''}):\n  " + "\n  ".join(problems)
        )

    def tensors():
        for e in table:
            file, _ = where[e.hf_key]
            yield e, handles[file].get_tensor(e.hf_key)

    return table, tensors()


# ---------------------------------------------------------------------------
# Filling an abstract model
# ---------------------------------------------------------------------------

def _variables(model: StarCoder):
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    return graphdef, state, flat


def stored_state(model: StarCoder) -> nnx.State:
    """The state a checkpoint holds: every variable but the `Derived` copies,
    quantized weights in their stored layout (`neutral`)."""
    def stored(_, var):
        w = var.get_value()
        return var.replace(w.neutral()) if is_quantized(w) else var

    return nnx.map_state(stored, nnx.state(model, nnx.Not(Derived)))


def _placed(value, want, sharding):
    """value (an array, or a quantized weight of arrays) in the dtypes of `want`
    (float params take the config's param dtype; quantized weights keep
    theirs), on `sharding` (the same structure) or the default device."""
    def put(a, w, s=None):
        a = np.asarray(a).astype(w.dtype, copy=False)
        return jax.device_put(a, s) if s is not None else jnp.asarray(a)

    if not is_quantized(want):
        return put(value, want, sharding)
    if sharding is None:
        return jax.tree.map(put, value, want)
    return jax.tree.map(put, value, want, sharding)


def model_from_arrays(config: StarCoderConfig, arrays, *, total: int | None = None,
                      progress: bool | None = None, shardings: dict | None = None,
                      desc: str = "loading") -> StarCoder:
    """Builds a model from (path, np.ndarray) pairs, one tensor resident at a time.

    `shardings` maps a parameter path to a `jax.sharding.Sharding` to place it
    straight onto its devices; absent paths go to the default device.
    """
    graphdef, state, flat = _variables(abstract_model(config))
    filled = set()
    for path, array in tqdm(arrays, total=total, desc=desc, unit="tensor",
                            disable=(not progress) if progress is not None else None):
        var = flat[path]
        want = var.get_value()
        if tuple(array.shape) != tuple(want.shape) or mode_of(array) != mode_of(want) or (
                is_quantized(array) and array.neutral_shapes() != want.neutral_shapes()):
            raise CheckpointError(f"{'.'.join(map(str, path))}: {_describe(array)}, expected {_describe(want)}")
        if is_quantized(array):
            array = array.neutral()
        var.set_value(_placed(array, want, (shardings or {}).get(path)))
        filled.add(path)
    missing = [".".join(map(str, p)) for p in flat if p not in filled]
    if missing:
        raise CheckpointError(f"parameters never filled: {', '.join(missing)}")
    return nnx.merge(graphdef, state)


def _describe(value) -> str:
    kind = f"{mode_of(value)} weight of shape" if is_quantized(value) else "shape"
    return f"{kind} {tuple(value.shape)}"


def load_hf(path: str, config: StarCoderConfig | None = None, *, dtype: str = "float32",
            compute_dtype: str | None = None, progress: bool | None = None,
            shardings: dict | None = None, **impls: str) -> StarCoder:
    """Loads an HF GPTBigCode or StarCoder2 directory (config.json + safetensors) into our model.

    impls: attention_impl / matmul_impl for the model's config (default "auto").
    """
    path = os.fspath(path)
    if config is None:
        config = StarCoderConfig.from_hf(path)
    config = config.replace(param_dtype=dtype, dtype=compute_dtype or dtype, **impls)
    table, tensors = read_hf_tensors(path, config)

    def arrays():
        for entry, hf_array in tensors:
            yield from zip(entry.paths, entry.to_ours(hf_array))

    total = sum(len(e.paths) for e in table)
    return model_from_arrays(config, arrays(), total=total, progress=progress,
                             shardings=shardings, desc=f"loading {os.path.basename(path) or path}")


# ---------------------------------------------------------------------------
# Writing an HF directory
# ---------------------------------------------------------------------------

def param_arrays(model: StarCoder) -> dict[Path, jax.Array]:
    _, _, flat = _variables(model)
    return {p: v.get_value() for p, v in flat.items()}


def save_hf(model: StarCoder, out_dir: str, *, max_shard_bytes: int = 5 * 2**30,
            dtype: str | None = None, tokenizer_from: str | None = None,
            progress: bool | None = None) -> str:
    """Writes `model` as an HF directory GPTBigCodeForCausalLM.from_pretrained (or
    Starcoder2ForCausalLM's, for a StarCoder2 model) loads.

    Tensors are written in `dtype` (default: the model's param dtype), split
    into shards of at most `max_shard_bytes` with an index file when needed;
    only one shard's tensors are in host memory at a time. Tokenizer files
    found in `tokenizer_from` are copied alongside.
    """
    config = model.config
    _refuse_adapters(model, "HF safetensors")
    if config.quantization is not None:
        raise ValueError(f"this model is {config.quantization}-quantized; HF safetensors hold float "
                         "weights: export the model before quantizing it (or load the float checkpoint)")
    dtype = dtype or config.param_dtype
    np_dtype = jnp.dtype(dtype)
    os.makedirs(out_dir, exist_ok=True)
    params = param_arrays(model)
    table = weight_table(config)

    shards, current, size = [], [], 0
    for e in table:
        nbytes = int(np.prod(e.hf_shape)) * np_dtype.itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += nbytes
    shards.append(current)

    names = ([SAFE_SINGLE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for stale in glob.glob(os.path.join(out_dir, "model*.safetensors*")):
        os.remove(stale)
    weight_map = {}
    bar = tqdm(total=len(table), desc=f"writing {out_dir}", unit="tensor",
               disable=(not progress) if progress is not None else None)
    for name, shard in zip(names, shards):
        tensors = {}
        for e in shard:
            ours = [np.asarray(jax.device_get(params[p])) for p in e.paths]
            tensors[e.hf_key] = np.ascontiguousarray(e.to_hf(*ours).astype(np_dtype))
            weight_map[e.hf_key] = name
            bar.update()
        save_file(tensors, os.path.join(out_dir, name), metadata={"format": "pt"})
        del tensors
    bar.close()
    if len(shards) > 1:
        total = sum(int(np.prod(e.hf_shape)) * np_dtype.itemsize for e in table)
        with open(os.path.join(out_dir, SAFE_INDEX), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

    hf_config = config.replace(param_dtype=dtype).to_hf()
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer_from:
        copy_tokenizer_files(tokenizer_from, out_dir)
    return out_dir


def _refuse_adapters(model: StarCoder, what: str) -> None:
    if has_lora(model):
        raise ValueError(f"this model has LoRA adapters, which {what} do not hold: write "
                         "merge_lora(model) for the merged model, or save_peft(model, DIR) for the adapters")


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        file = os.path.join(src, name)
        if os.path.isfile(file) and os.path.abspath(src) != os.path.abspath(dst):
            shutil.copy2(file, os.path.join(dst, name))
            copied.append(name)
    return copied


# ---------------------------------------------------------------------------
# Our own orbax checkpoint of the params (fast reload, sharded restore)
# ---------------------------------------------------------------------------

def is_orbax_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, ORBAX_PARAMS)) and os.path.isfile(
        os.path.join(path, "config.json"))


def save_orbax(model: StarCoder, out_dir: str, *, tokenizer_from: str | None = None) -> str:
    """Writes config.json + an orbax checkpoint of the params under out_dir/params."""
    import orbax.checkpoint as ocp

    _refuse_adapters(model, "orbax model directories")
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, ORBAX_PARAMS)
    if os.path.exists(target):
        shutil.rmtree(target)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target, stored_state(model))
        ckptr.wait_until_finished()
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(model.config.to_hf(), f, indent=2)
    if tokenizer_from:
        copy_tokenizer_files(tokenizer_from, out_dir)
    return out_dir


def load_orbax(path: str, *, dtype: str = "float32", compute_dtype: str | None = None,
               shardings: dict | None = None, **impls: str) -> StarCoder:
    """Restores a directory written by `save_orbax`, casting to `dtype`."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    saved = StarCoderConfig.from_hf(path)
    config = saved.replace(param_dtype=dtype, dtype=compute_dtype or dtype, **impls)
    if _int8_layout_1(path):
        return model_from_arrays(config, _layout_1_arrays(path, saved), progress=False, shardings=shardings)
    graphdef, state, flat = _variables(abstract_model(saved))
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for p, var in flat.items():
        value, sharding = var.get_value(), (shardings or {}).get(p)
        if sharding is None:
            sharding = jax.tree.map(lambda _: one_device, value)
        var.set_value(jax.tree.map(lambda sds, s: jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=s),
                                   value, sharding))
    with ocp.StandardCheckpointer() as ckptr:
        try:
            restored = ckptr.restore(os.path.join(path, ORBAX_PARAMS), state)
        except Exception as err:
            raise CheckpointError(f"{path}: cannot restore the orbax params ({err})") from None
    model = nnx.merge(graphdef, restored)
    if config == saved:
        return model
    arrays = ((p, a) for p, a in param_arrays(model).items())
    return model_from_arrays(config, arrays, progress=False, shardings=shardings)


# The int8 directories of the first layout (before QuantizedWeight): each int8
# weight as two variables, int8 values under the first name and scales under
# the second, and kernels with more than 2048 inputs input-blocked,
# [C, *out, in0 / C, *in_rest]. They load converted to today's layout.
_LAYOUT_1_NAMES = {"qkernel": ("kernel_scale", "kernel"), "qembedding": ("embedding_scale", "embedding"),
                   "lm_head_q": ("lm_head_scale", "lm_head")}
RECONVERT = "starcoder-jax convert hf-to-jax SRC DST --quantize int8"


def _int8_layout_1(path: str) -> bool:
    """Whether an orbax directory holds int8 weights in the first layout."""
    with open(os.path.join(path, ORBAX_PARAMS, "_METADATA"), encoding="utf-8") as f:
        keys = json.load(f).get("tree_metadata", {})
    return any(f"'{name}'" in key for key in keys for name in _LAYOUT_1_NAMES)


def _layout_1_arrays(path: str, saved: StarCoderConfig):
    """(parameter path, value) pairs of a first-layout int8 directory, int8
    weights as QuantizedWeights in the stored layout."""
    import orbax.checkpoint as ocp

    def fail(why):
        return CheckpointError(f"{path}: an int8 directory of an earlier layout that cannot be converted "
                               f"({why}); convert its float checkpoint again with `{RECONVERT}`")

    with ocp.StandardCheckpointer() as ckptr:
        try:
            tree = ckptr.restore(os.path.join(path, ORBAX_PARAMS))
        except Exception as err:
            raise fail(f"orbax cannot restore it: {err}") from None
    flat = {tuple(int(k) if k.isdigit() else k for k in p[:-1]): np.asarray(v)
            for p, v in _flat_dict(tree)}
    _, _, want = _variables(abstract_model(saved))
    for p, a in flat.items():
        *module, name = p
        if name in _LAYOUT_1_NAMES:
            scale_name, new_name = _LAYOUT_1_NAMES[name]
            target = want.get((*module, new_name))
            scale = flat.get((*module, scale_name))
            if target is None or scale is None or not isinstance(target.get_value(), QuantizedWeight):
                raise fail(f"{'.'.join(map(str, p))} has no int8 weight to become")
            n_in = target.get_value().n_in
            blocks = a.shape[0] if a.ndim == n_in + scale.ndim + 1 else 1
            w = QuantizedWeight(a, scale, n_in, blocks)
            if w.shape != target.get_value().shape:
                raise fail(f"{'.'.join(map(str, p))} has shape {a.shape}, which stands for no "
                           f"weight of shape {target.get_value().shape}")
            yield (*module, new_name), w
        elif not any(name == s for s, _ in _LAYOUT_1_NAMES.values()):
            if p not in want:
                raise fail(f"it holds {'.'.join(map(str, p))}, which this model does not have")
            yield p, a


def _flat_dict(tree, prefix=()):
    """(key path, leaf) of a nested dict."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat_dict(v, (*prefix, k))
        else:
            yield (*prefix, k), v
