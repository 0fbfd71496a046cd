"""Training: data sources, the optax train step and loop, orbax checkpoints, losses."""
