"""Fixtures shared by the tokenizer and data tests: ours and HF's slow LlamaTokenizer over the
same sentencepiece model. Each module provides `model_path` (its own trained model). And every
test starts with torch's process-wide float mode as a fresh process has it, and (but those marked
cuda) sees no GPU, as CI's machine: their exact fp32 comparisons hold on a machine with one too."""
import signal

import pytest
import torch
from transformers import LlamaTokenizer

from tokenizer import Tokenizer

# A suite started in the background by a shell without job control inherits Ctrl-C (SIGINT) ignored, and so
# would every process it starts: the tests of Ctrl-C need it delivered (a handled signal is reset to its
# default in a process started from this one, where Python then raises KeyboardInterrupt)
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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


@pytest.fixture(scope="session", autouse=True)
def triton_probed_with_the_gpu_visible():
    """torch asks once per process whether triton can run (torch.cuda.is_available among its checks)
    and keeps the answer: asked first under the fixture below, the cuda tests could not compile."""
    if torch.cuda.is_available():
        from torch.utils._triton import has_triton
        has_triton()


@pytest.fixture(autouse=True)
def no_gpu_unless_marked(request, monkeypatch):
    """train.py and generate.py take a visible GPU by default (bf16 / fp16): outside the cuda-marked
    tests, this process and the ones it starts see none."""
    if request.node.get_closest_marker("cuda") is None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
