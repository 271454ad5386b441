"""Fixtures shared by the tokenizer and data tests: ours and HF's slow LlamaTokenizer over the
same sentencepiece model. Each module provides `model_path` (its own trained model). And every
test starts with torch's process-wide float mode as a fresh process has it."""
import pytest
import torch
from transformers import LlamaTokenizer

from llama import Tokenizer


@pytest.fixture(scope="module")
def tok(model_path):
    return Tokenizer(model_path)


@pytest.fixture(scope="module")
def hf(model_path):
    return LlamaTokenizer(vocab_file=model_path, legacy=True)


@pytest.fixture(autouse=True)
def no_flush_denormal():
    """train.py, run in this process by some tests, flushes subnormal floats to zero for the process;
    a later test (sampling at a temperature of 1e-40) would then divide by zero."""
    yield
    torch.set_flush_denormal(False)
