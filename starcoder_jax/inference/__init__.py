"""Inference: sampling, jitted prefill and decode on the KV cache, generation, fill-in-the-middle."""
