"""An int8 directory written by an earlier version of the library still loads."""

import os

import numpy as np
from builders import TESTS_DIR

import starcoder_jax as sj

FIXTURE = os.path.join(TESTS_DIR, "fixtures", "int8-layout-1")


def test_int8_directory_of_the_earlier_layout_loads_with_its_logits():
    model = sj.load_pretrained(FIXTURE)
    assert model.config.quantization == "int8"
    saved = np.load(os.path.join(FIXTURE, "expected_logits.npz"))
    got = np.asarray(model(saved["ids"]))
    # the same int8 weights; the forms of the int8 product differ only in float32 round-off
    np.testing.assert_allclose(got, saved["logits"], rtol=0, atol=1e-4 * np.abs(saved["logits"]).max())
