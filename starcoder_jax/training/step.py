"""The optimizer and the jitted train and eval steps over a split model.

A model is split with an nnx filter into the trainable params, which the
step differentiates and AdamW updates, and the rest (frozen params, derived
variables), which the step reads and returns unchanged and which has no
optimizer state.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from starcoder_jax.training.config import OptimConfig
from starcoder_jax.training.losses import LOSS_CHUNK, token_nll_sum


def path_name(path) -> str:
    """An NNX state path as "blocks/0/attn/query/kernel"."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


@dataclasses.dataclass(frozen=True)
class PathMatches:
    """An nnx filter: the variables whose path (`path_name`) contains a match of `pattern`."""

    pattern: str

    def __call__(self, path, value) -> bool:
        return re.search(self.pattern, path_name(path)) is not None


def trainable_filter(trainable: Sequence[str] = (), frozen: Sequence[str] = (), *,
                     lora: bool = False) -> nnx.filterlib.Filter:
    """The nnx.Params matching one of `trainable` (every Param when empty) and none
    of `frozen` (regular expressions over `path_name`, as train.trainable / train.frozen).
    lora: among the LoRA adapters (nnx.LoRAParam) only; the base stays frozen."""
    parts = [nnx.LoRAParam if lora else nnx.Param]
    if trainable:
        parts.append(nnx.Any(*map(PathMatches, trainable)))
    if frozen:
        parts.append(nnx.Not(nnx.Any(*map(PathMatches, frozen))))
    return nnx.All(*parts)


def decay_mask(params: nnx.State) -> nnx.State:
    """True for the params whose NNX metadata says `weight_decay` (model.modules.param:
    the matmul kernels and an untied head), False for the rest."""
    def wants_decay(path, var) -> bool:
        metadata = var.get_metadata()
        if "weight_decay" not in metadata:
            raise ValueError(f"parameter {path_name(path)} has no weight_decay metadata "
                             "(parameters are made with model.modules.param)")
        return bool(metadata["weight_decay"])
    return nnx.map_state(wants_decay, params)


def learning_rate_schedule(o: OptimConfig, steps: int):
    warmup = min(o.warmup_steps, steps)
    if o.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, o.learning_rate, max(warmup, 1)),
             optax.constant_schedule(o.learning_rate)], [warmup])
    return optax.warmup_cosine_decay_schedule(
        0.0, o.learning_rate, warmup_steps=warmup, decay_steps=max(steps, warmup + 1),
        end_value=o.learning_rate * o.min_lr_ratio)


def make_optimizer(o: OptimConfig, steps: int):
    """(AdamW after global-norm clipping, its learning-rate schedule)."""
    schedule = learning_rate_schedule(o, steps)
    tx = optax.chain(
        optax.clip_by_global_norm(o.clip_norm),
        optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask),
    )
    return tx, schedule


def optimizer_state_bytes(params: nnx.State, tx) -> int:
    """Bytes of `tx`'s state for `params` (arrays or ShapeDtypeStructs: an abstract
    model's state), from shapes only."""
    state = jax.eval_shape(tx.init, params)
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))


def make_train_step(graphdef: nnx.GraphDef, tx, *, seed: int, dropout: bool, skip_nonfinite: bool,
                    out_shardings=None, loss_chunk: int | None = LOSS_CHUNK, separator: int | None = None):
    """A jitted `step(params, opt_state, rest, ids, mask, step) -> (params, opt_state, metrics)`.

    params: the trainable state, rest: the other states of
    `nnx.split(model, trainable, ...)` (read, not differentiated, not returned).
    ids, mask [A, b, T + 1]: A accumulation micro-batches of b rows. The loss is
    the mean over the batch's targets; the dropout key of micro-batch i is
    fold_in(fold_in(key(seed), step), i), so a resumed run draws the same masks.
    skip_nonfinite: a non-finite loss or gradient keeps the old params and state.
    out_shardings: (params, optimizer state, metrics) shardings under a mesh, so
    gradients and updates stay split like their params instead of coming
    back whole on every device.
    loss_chunk: tokens per piece of the LM head and cross-entropy
    (losses.head_nll_sum); None or 0: whole [b, T, V] logits.
    separator: the token that ends each packed document, to keep documents
    apart in attention (data.separate_documents; losses.target_nll); None:
    each row is one sequence.
    """

    def micro_loss(params, rest, ids, mask, key):
        model = nnx.merge(graphdef, params, rest)
        rngs = nnx.Rngs(dropout=key) if dropout else None
        return token_nll_sum(model, ids, mask, rngs, chunk=loss_chunk, separator=separator)

    @functools.partial(jax.jit, donate_argnums=(0, 1), out_shardings=out_shardings)
    def step_fn(params, opt_state, rest, ids, mask, step):
        count = jnp.maximum(jnp.sum(mask[:, :, 1:]), 1).astype(jnp.float32)
        base = jax.random.fold_in(jax.random.key(seed), step)

        def body(carry, xs):
            grads, total = carry
            ids_i, mask_i, i = xs
            loss, g = jax.value_and_grad(micro_loss)(params, rest, ids_i, mask_i, jax.random.fold_in(base, i))
            return (jax.tree.map(jnp.add, grads, g), total + loss), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        accum = jnp.arange(ids.shape[0])
        (grads, total), _ = jax.lax.scan(body, (zeros, jnp.float32(0)), (ids, mask, accum))
        grads = jax.tree.map(lambda g: g / count, grads)
        loss = total / count
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            new_params = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_params, params)
            new_opt = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_opt, opt_state)
        return new_params, new_opt, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    return step_fn


def make_eval_fn(graphdef: nnx.GraphDef, loss_chunk: int | None = LOSS_CHUNK, separator: int | None = None):
    """A jitted `eval(params, rest, ids, mask) -> (nll sum, target count)` for ids, mask [B, T + 1]
    (loss_chunk, separator: as make_train_step)."""
    @jax.jit
    def eval_fn(params, rest, ids, mask):
        model = nnx.merge(graphdef, params, rest)
        return token_nll_sum(model, ids, mask, chunk=loss_chunk, separator=separator), jnp.sum(mask[:, 1:])
    return eval_fn
