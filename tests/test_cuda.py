"""What runs only on a GPU (`python -m pytest -m cuda`; skipped without CUDA): the compiled
MR-Adapter and the compiled decode step as CUDA graphs, and bf16 generation."""

import pytest
import torch

import generate
import kernels
import mra
from test_release import (IDS, PAD_MASK, greedy, images, llava_config, make_clip, make_convnext, make_heads,
                          make_llama, release_state, write_release)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def release_adapter(seed=0):
    """An MR-Adapter at the release's widths (ViT-L d = 1024, ConvNeXt-L C = 1536), weights drawn
    at random (the zero init would leave f_l = f_h = 0), and its inputs at R = 1024."""
    g = torch.Generator().manual_seed(seed)
    ad = mra.MRAdapter(1024, 1536)
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return ad, torch.randn(2, 1024, 1024, generator=g), torch.randn(2, 1536, 32, 32, generator=g)


def check_compiled_adapter_bf16(device):
    ad, x, slow = release_adapter()
    exact = ad.to(device)(x.to(device), slow.to(device))
    ad, x, slow = ad.to(torch.bfloat16), x.to(device, torch.bfloat16), slow.to(device, torch.bfloat16)
    eager = ad(x, slow)
    fused = torch.compile(ad, dynamic=False)(x, slow)  # as DualEncoder runs it on CUDA
    # the fused kernels round to bf16 once where eager rounds after every op: they may differ by
    # a unit in the last place of the output's magnitude, and fusing must not be less accurate
    ulp = 2 ** -7 * exact.abs().max().item()
    torch.testing.assert_close(fused.float(), eager.float(), rtol=0, atol=ulp)
    assert (fused.float() - exact).abs().max() <= (eager.float() - exact).abs().max()


def test_compiled_adapter_equals_eager_in_bf16():
    check_compiled_adapter_bf16("cuda")


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    """The released LLaVA-HR layout of tests/test_release.py, at R = 384."""
    torch.manual_seed(0)
    parts = dict(clip=make_clip(), convnext=make_convnext(), llama=make_llama(), heads=make_heads())
    return write_release(tmp_path_factory.mktemp("llava-hr"), release_state(**parts), llava_config(384))


def forced(model, x, tokens, step, ids=IDS, pad_mask=PAD_MASK):
    """Logits (B, n, V) of prefill and then each step fed the given tokens (B, n) (teacher
    forcing: both precisions see the same sequence, so one early near-tie cannot fork them)."""
    logits, cache = model.prefill(ids.to(x.device), x, pad_mask.to(x.device), max_new_tokens=tokens.shape[1])
    out = [logits.float()]
    for t in tokens[:, :-1].T:
        out.append(step(t, cache).float())
    return torch.stack(out, 1)


def check_bf16_agrees_with_fp32(path, device, n=8):
    """bf16 (eager, and compiled as generation runs it) against fp32: logits within bf16's
    precision at every step of the fp32 greedy run, so the same greedy token at every step
    where fp32's choice is clear of that precision (a random tiny model has near-ties too)."""
    x = images(384).to(device)
    with torch.no_grad():
        ref, ref_logits = greedy(mra.load_checkpoint(path, torch.float32, device).eval(), x, n,
                                 IDS.to(device), PAD_MASK.to(device))
        model = mra.load_checkpoint(path, torch.bfloat16, device).eval()
        atol = 0.05 * ref_logits.abs().max().item()  # bf16: 8 mantissa bits through every layer
        top2 = ref_logits.topk(2, dim=-1).values
        clear = top2[..., 0] - top2[..., 1] > 2 * atol  # no error within atol can flip these
        assert clear.sum() >= 3, "the test model has too few clear greedy choices to test anything"
        # eager; then fused (kernels.fuse_linears, as generate.py runs on a GPU), eager and compiled
        for step in (model.llm.decode, "fuse", "compile"):
            if step == "fuse":
                kernels.fuse_linears(model.llm)
            step = kernels.compile_step(model.llm.decode, torch.device(device)) if step == "compile" else model.llm.decode
            logits = forced(model, x, ref, step)
            torch.testing.assert_close(logits, ref_logits, rtol=0, atol=atol)
            assert torch.equal(logits.argmax(-1)[clear], ref[clear])


def test_bf16_generation_agrees_with_fp32(release_dir):
    check_bf16_agrees_with_fp32(release_dir, "cuda")


def test_one_cuda_graph_serves_every_decode_step(release_dir, monkeypatch):
    from torch._dynamo.utils import counters
    from torch._inductor.cudagraph_trees import CUDAGraphTreeManager
    recorded = []
    record = CUDAGraphTreeManager.record_function
    monkeypatch.setattr(CUDAGraphTreeManager, "record_function",
                        lambda self, *a, **k: recorded.append(1) or record(self, *a, **k))
    # fp32: eager and compiled then pick the same greedy tokens for all 64 steps (in bf16 their
    # different roundings could break a near-tie of the random tiny model; bf16 is tested above)
    model = mra.load_checkpoint(release_dir, torch.float32, "cuda").eval()
    kernels.fuse_linears(model.llm)  # as generate.py runs on a GPU
    prompts = [row[mask].tolist() for row, mask in zip(IDS, PAD_MASK)]
    x = images(384).cuda()
    eager = generate.generate(model, prompts, x, max_new_tokens=64, eos_id=-1)
    torch._dynamo.reset()
    with torch.no_grad():  # as generate runs it (a graph compiled with grad on would not serve it)
        generate.prefill(model, prompts, x, 0, 64)  # the MR-Adapters compile here (DualEncoder on CUDA)
    counters.clear()  # from here on, only the decode step's graphs count
    step = kernels.compile_step(model.llm.decode, torch.device("cuda"))
    for _ in range(2):  # two batches of one shape: the second gets the first's cache (Llama.new_cache's reuse)
        assert generate.generate(model, prompts, x, max_new_tokens=64, eos_id=-1, step=step) == eager
    assert counters["stats"]["unique_graphs"] == 1  # compiled once for 2 x 63 steps
    assert counters["inductor"]["cudagraph_skips"] == 0  # and run as a CUDA graph...
    assert len(recorded) == 1  # ...recorded once, replayed for every later step and batch
    # only the new tokens are copied into the graph per step: the cache is read and written in place
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] <= 1


# last: its coordinate-descent tuning compiles longest (the step twice), so a run cut short by its
# timeout loses this test alone
def check_int8_compiled_agrees_with_eager(path, device, n=8):
    """--quantize int8 --compile: the step compiled as generate.py compiles it for int8 weights (on a
    GPU with coordinate-descent tuning: each product a reduction that dequantises as it reads) gives
    eager int8's logits, within bf16's precision, at every step of eager's greedy run. One prompt: the
    tuned path takes one-row products only (inductor's mm decomposition), so batch 1 as well as 3."""
    with torch.no_grad():
        model = mra.load_checkpoint(path, torch.bfloat16, device, quantize="int8").eval()
        kernels.fuse_linears(model.llm)  # as generate.py runs on a GPU
        step = kernels.compile_step(model.llm.decode, torch.device(device))
        for rows, x in ((slice(None), images(384)), (slice(2, 3), images(384)[1:])):  # row 2 holds image 1
            ids, pad_mask, x = IDS[rows].to(device), PAD_MASK[rows].to(device), x.to(device)
            ref, ref_logits = greedy(model, x, n, ids, pad_mask)
            logits = forced(model, x, ref, step, ids, pad_mask)
            torch.testing.assert_close(logits, ref_logits.float(), rtol=0, atol=0.05 * ref_logits.abs().max().item())


def test_int8_compiled_step_agrees_with_eager(release_dir):
    check_int8_compiled_agrees_with_eager(release_dir, "cuda")
