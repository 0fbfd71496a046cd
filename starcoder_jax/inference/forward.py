"""A compiled full forward pass: `forward(model, ids)` -> logits, one program per length bucket.

`model(ids)` is the model's math run op by op (eager JAX): right for a
traced caller (a train step, `nnx.jit`), slow from a notebook, where every
call dispatches each operation on its own. `forward` splits the model once,
jits the pure function of (params, ids, positions), and pads the length up to
a bucket (a power of two, at least 16, at most the model's positions), so
prompts of similar length share one compiled program. Right padding does
not change the logits of the real tokens: attention is causal and a padded
token is never a key of an earlier query.
"""

from __future__ import annotations

import functools
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from starcoder_jax.model.modules import StarCoder, check_input_ids

MIN_BUCKET = 16


def length_bucket(t: int, n_positions: int) -> int:
    """The padded length for t tokens: the next power of two >= max(t, MIN_BUCKET), at most n_positions."""
    return min(max(MIN_BUCKET, 1 << max(t - 1, 0).bit_length()), n_positions)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, positions: jax.Array) -> jax.Array:
    """The module call as a pure function of the split model; models of one structure
    (the graphdef) share its compilations."""
    return nnx.merge(graphdef, state)(ids, positions)


class _Split:
    """One model's split state; valid while the model keeps the same config and
    the very same arrays."""

    def __init__(self, model: StarCoder):
        self.config = model.config
        self.graphdef, self.state = nnx.split(model)
        self.leaves = jax.tree.leaves(self.state)

    def serves(self, model: StarCoder) -> bool:
        return model.config == self.config and same_arrays(jax.tree.leaves(nnx.state(model)), self.leaves)


def same_arrays(leaves, recorded) -> bool:
    """Whether `leaves` are the very arrays `recorded` (by identity: a model whose
    arrays were replaced, even by equal ones, is another model to run)."""
    return len(leaves) == len(recorded) and all(a is b for a, b in zip(leaves, recorded))


_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def forward(model: StarCoder, input_ids, positions=None) -> jax.Array:
    """Float32 logits [B, T, V] of ids [B, T], as `model(input_ids, positions)`, compiled.

    positions [B, T] (optional): absolute positions, 0..T-1 in every row by
    default. The first call for a model (and each new length bucket or batch
    size) compiles; later calls of the same shapes run the compiled program.
    Changing the model's weights (assigning arrays) makes the next call split
    it again; a changed structure or config (`quantize_`) also compiles again.
    """
    ids = np.asarray(input_ids)
    config = model.config
    check_input_ids(ids, config)
    b, t = ids.shape
    if positions is None:
        positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    positions = np.asarray(positions, np.int32)
    if positions.shape != (b, t):
        raise ValueError(f"positions must be [B, T] = {(b, t)} like input_ids, got {positions.shape}")
    split = _SPLITS.get(model)
    if split is None or not split.serves(model):
        split = _SPLITS[model] = _Split(model)
    pad = length_bucket(t, config.n_positions) - t
    if pad:
        # padded tokens (built on the host: no per-shape device programs): id 0 at
        # the positions after the row's last, clipped to the table
        last = positions[:, -1:] if t else np.full((b, 1), -1, np.int32)
        tail = np.minimum(last + np.arange(1, pad + 1, dtype=np.int32), config.n_positions - 1)
        ids = np.concatenate([ids.astype(np.int32), np.zeros((b, pad), np.int32)], axis=1)
        positions = np.concatenate([positions, tail], axis=1)
    logits = _forward(split.graphdef, split.state, jnp.asarray(ids, jnp.int32), jnp.asarray(positions))
    return logits[:, :t] if pad else logits
