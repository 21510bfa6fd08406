"""Fixtures of the tuning tests: the tiny llama as a float32 model, and its calibration tokens."""

import pytest


def tiny_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).float()


@pytest.fixture(scope="session")
def tokens(tiny_bpe):
    """8 x 32 calibration tokens of real text, for the tiny BPE llama."""
    from transformers import AutoTokenizer

    from npft_gguf.calib import CalibSettings, load_calibration
    from tests.conftest import calib_text

    tok = AutoTokenizer.from_pretrained(tiny_bpe)
    path = tiny_bpe / "calib.txt"
    path.write_text(calib_text(50_000))
    return load_calibration(CalibSettings(calib=str(path), samples=8, length=32), tok)
