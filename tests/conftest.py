"""Fixtures shared by the tokenizer and data tests: ours and HF's slow LlamaTokenizer over the
same sentencepiece model. Each module provides `model_path` (its own trained model)."""
import pytest
from transformers import LlamaTokenizer

from llama import Tokenizer


@pytest.fixture(scope="module")
def tok(model_path):
    return Tokenizer(model_path)


@pytest.fixture(scope="module")
def hf(model_path):
    return LlamaTokenizer(vocab_file=model_path, legacy=True)
