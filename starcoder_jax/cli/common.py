"""What the subcommands share: the default model and how a command names its model."""

from __future__ import annotations

from starcoder_jax.model.pretrained import DEFAULT_MODEL  # the small model shipped in the package


def model_name(given: str | None) -> str:
    """The model a command runs: --model, else the shipped default model."""
    if given:
        return given
    if DEFAULT_MODEL:
        return DEFAULT_MODEL
    raise ValueError("--model is required (a model directory or a hub id); there is no default model")
