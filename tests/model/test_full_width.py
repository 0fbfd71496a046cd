"""starcoderbase-1b at full width (2 of its 24 layers): converts, runs, matches transformers."""

import jax.numpy as jnp
import numpy as np
import pytest
from builders import hf_logits, make_hf_model

import starcoder_jax as sj


@pytest.mark.slow
def test_starcoderbase_1b_width_two_layers(tmp_path):
    full = sj.preset("starcoderbase-1b")
    hf = {k: v for k, v in full.replace(n_layer=2).to_hf().items()
          if k not in ("architectures", "model_type", "torch_dtype")}
    path = make_hf_model(str(tmp_path / "hf"), weight_std=0.02, **hf)
    model = sj.load_pretrained(path)
    assert model.config == full.replace(n_layer=2)
    assert model.blocks[0].attn.query.kernel[...].shape == (2048, 16, 128)
    assert model.blocks[0].attn.key.kernel[...].shape == (2048, 1, 128)
    ids = np.random.default_rng(0).integers(0, 49152, (1, 64))
    ids[0, -1] = 49151
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    ref = hf_logits(path, ids)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
    out = str(tmp_path / "out")
    sj.save_hf(model, out)
    np.testing.assert_array_equal(hf_logits(out, ids[:, :16]), ref[:, :16])
