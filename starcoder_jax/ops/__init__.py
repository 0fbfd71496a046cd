"""Backend forms of the model's kernels, each behind one entry point: attention,
projections (float, bfloat16 on XLA:CPU, int8) and the int8 weight format."""
