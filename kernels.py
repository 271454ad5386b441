"""Decoding fast: the kernels that run llama.py's products and attention, picked where faster, as
measured (`python bench.py`): oneDNN's products and packed weights on an x86 CPU (MKL's at one row on an
Intel CPU), q, k, v and gate, up fused into two products on a GPU and for CPU batches, and a written-out
decode attention for the compiled CPU step. Every path is the same model, equal up to rounding
(tests/test_llama.py, tests/test_generate.py).

llama.py builds its layers from `Linear` and, in a compiled decode step, attends as COMPILED_ATTENTION
says; generate.py and bench.py call `fast_products` once the model has loaded, and `compile_step` for
--compile's decode step (one compile per KV cache length, rounded to CACHE_ROUND slots).
"""
import ctypes
import logging
import platform
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from int8 import Int8Linear


def cpu_info():
    """/proc/cpuinfo's fields for the first CPU ({"vendor_id": "GenuineIntel", ...}); {} where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}


# measured on x86 only; elsewhere (ARM: oneDNN over ACL) torch's own choice stands
ONEDNN = (platform.machine() in ("x86_64", "AMD64") and torch.backends.mkldnn.is_available()
          and all(hasattr(torch.ops.mkldnn, op) for op in ("_linear_pointwise", "_reorder_linear_weight")))
# MKL picks its code by the CPU's vendor: on an Intel CPU its one-row product (F.linear's gemv) reads plain
# weights faster than oneDNN's packed ones (12.2 vs 14.4 ms, the bench model on a Xeon), prefill as fast; on
# the AMD CPUs measured, at under half oneDNN's rate (`python bench.py --only linear`). So on Intel plain fp32
# weights stay with MKL, where it is torch's BLAS (a build with OpenBLAS, say, keeps oneDNN).
MKL_GEMV = ONEDNN and torch.backends.mkl.is_available() and cpu_info().get("vendor_id") == "GenuineIntel"


class Linear(nn.Linear):
    """nn.Linear whose fp32 CPU inference runs through oneDNN's matmul, not MKL's gemv (AMD: 1.4-2x as fast,
    equal up to rounding; an Intel CPU keeps MKL, MKL_GEMV). Training (no oneDNN backward) and compiled steps
    of plain weights (inductor picks its kernels) keep F.linear. After pack_linears the weight is oneDNN's
    blocked `packed` one and only this path remains."""
    packed = None

    def forward(self, x):
        if self.packed is not None:
            if torch.is_grad_enabled() and x.requires_grad:
                raise RuntimeError("this Linear's weight is packed for inference (kernels.pack_linears): it can't "
                                   "be trained; load the model again for that")
            if torch.compiler.is_compiling():  # one opaque op to inductor, which can't read the layout
                return packed_linear(x, self.packed, self.bias, self.out_features)
            weight = self.packed
        elif (ONEDNN and not MKL_GEMV and x.device.type == "cpu" and x.dtype == torch.float32
                and not torch.compiler.is_compiling()
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            weight = self.weight
        else:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")


def pack_linears(model, min_bytes=64 << 20):
    """fp32 inference on an x86 CPU: each Linear's weight moves into oneDNN's blocked layout (a
    plain one gets slower kernels or a repack per call); memory does not grow. `bench.py --only linear`:
    8-row products 1.2-1.75x as fast, 1-row 0.92x (Zen 3) to 1.58x (Zen 5). Weights that stay in the
    caches gain nothing: under `min_bytes` in all, nothing is packed. The Parameters stay, on meta
    (shapes and counts still read, any other use fails loudly); the model is for inference only.
    Returns how many were packed (0 on a GPU, in bf16, off x86)."""
    linears = [m for m in model.modules() if isinstance(m, Linear) and m.packed is None and ONEDNN
               and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    if sum(m.weight.nbytes for m in linears) < min_bytes:
        return 0
    model.requires_grad_(False)
    for m in linears:
        m.packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach())
        m.weight = nn.Parameter(m.weight.detach().to("meta"), requires_grad=False)
    return len(linears)


@torch.library.custom_op("mra::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor],
                  out_features: int) -> torch.Tensor:
    """A packed Linear inside a compiled step (generate.py --compile with batches on the CPU)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@packed_linear.register_fake
def _(x, packed, bias, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


# How a compiled decode step attends, per device: "written-out" (decode_attention) or "sdpa"; read as
# the step is traced (bench.py compiles one with each)
COMPILED_ATTENTION = {"cpu": "written-out", "cuda": "sdpa"}


def decode_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(hd) + mask) v for one query per row, q (B, nh, 1, hd), over the whole cache,
    k, v (B, nkv, S, hd), mask (B, 1, 1, S). Written out, a compiled CPU step fuses it into one pass over
    the keys and one over the (channel-major) values: faster than SDPA's kernel (`bench.py --only decode`).
    On a GPU the compiled step keeps SDPA (bench.py --device cuda --compile times both)."""
    B, nh, _, hd = q.shape
    nkv = k.shape[1]
    # scores and softmax in fp32, as SDPA's kernels keep them: in bf16 a score near 30 is rounded by up
    # to 1/16, e^(1/16) = 6% in its weight (the keys and values convert as read: no bytes added)
    q = q.view(B, nkv, nh // nkv, 1, hd).float() * hd ** -0.5  # each k/v head's queries (grouped-query)
    s = (q * k[:, :, None]).sum(-1) + mask  # (B, nkv, g, S)
    e = (s - s.amax(-1, keepdim=True)).exp()  # softmax(s) = e / sum(e)
    # dividing after the sum over slots: once per channel, not once per slot
    return ((e[..., None] * v[:, :, None]).sum(-2) / e.sum(-1, keepdim=True)).view(B, nh, 1, hd).to(v.dtype)


def fuse_linears(model):
    """Inference: q, k, v as one product and gate, up as one (weights' rows stacked): a batch-1 decode
    step reads the same bytes in 4 products per layer, not 7 (fast_products: on a GPU, and for CPU batches,
    where oneDNN's 8-row products are faster fused). In place, before pack_linears; plain and int8 weights
    (merge a LoRA first). The keys change (attn.wqkv, mlp.gate_up): save the model unfused."""
    n = 0
    for block in model.layers:
        for part, names, fused in ((block.attn, ("wq", "wk", "wv"), "wqkv"), (block.mlp, ("gate", "up"), "gate_up")):
            if getattr(part, fused) is not None:
                continue  # fused already
            ms = [getattr(part, name) for name in names]
            if not (all(type(m) is Linear and m.packed is None and m.bias is None for m in ms)
                    or all(type(m) is Int8Linear for m in ms)):
                continue  # LoRA, packed: as they are
            int8, w = type(ms[0]) is Int8Linear, torch.cat([m.weight.detach() for m in ms])
            with torch.device("meta"):  # shapes only: the stacked tensors go in next
                new = Int8Linear(w.shape[1], w.shape[0]) if int8 else Linear(w.shape[1], w.shape[0], bias=False)
            if int8:
                new.weight, new.scales = w, torch.cat([m.scales for m in ms])
            else:
                new.weight = nn.Parameter(w, requires_grad=False)
            for name in names:
                delattr(part, name)
            setattr(part, fused, new)
            n += 1
    return n


def fast_products(llm, device, rows, compiled):
    """The LLM's weight products as generate.py (and bench.py) runs them, `rows` prompts at a time. On a GPU, and
    for batches on the CPU, q, k, v and gate, up fused: 4 products per layer, not 7 (one row on the CPU: no
    faster). fp32 on an x86 CPU: weights in oneDNN's blocked layout (pack_linears), except at one row
    where inductor's products (compiled) or MKL's on an Intel CPU (eager, MKL_GEMV) are faster."""
    if device.type == "cuda" or rows > 1:
        fuse_linears(llm)
    if rows > 1 or not (compiled or MKL_GEMV):
        pack_linears(llm)


# -----------------------------------------------------------------------------
# the compiled decode step, and memory kept for the next prompt

# generate.prefill rounds each KV cache's length up to a multiple of CACHE_ROUND slots; a compiled step
# attends over its whole cache (unwritten slots masked) and compiles once per cache
# length: 128, not 256, made the CPU's compiled batch of 8 1.05-1.07x the eager one, not 0.94-0.99x
# (`bench.py --only batch`, an Intel Xeon)
CACHE_ROUND = 128


def cpp_compiler():
    """Whether inductor, compiling for a CPU, finds a C++ compiler (its own search: CXX, else g++)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        return bool(get_cpp_compiler())
    except ImportError:  # a torch without it: found when compiling, as before
        return True
    except Exception:  # noqa: BLE001 -- InvalidCxxCompiler
        return False


def compile_step(step, device, max_batch=1):
    """torch.compile a decode step. Its shapes are the same at every position (see
    Llama.decode), so it compiles once per cache shape and never sees a dynamic shape. A batch run
    meets up to max_batch batch sizes (skipped questions, the last batch) times the cache lengths
    (CACHE_ROUND steps of the context): past dynamo's limits (8; 256 in all), a fullgraph step fails."""
    model = getattr(step, "__self__", None)  # step: model.decode
    shapes = max_batch * (getattr(getattr(model, "config", None), "max_seq_len", 4096) // CACHE_ROUND + 1)
    for limit in ("recompile_limit", "accumulated_recompile_limit"):  # at least 64: caches not of CACHE_ROUND too
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), shapes, 64))
    if device.type == "cuda":  # the whole step replayed as one CUDA graph (reduce-overhead's option)
        options = {"triton.cudagraphs": True}
        # int8 weights: coordinate-descent tuning makes inductor write each one-row product as a reduction
        # that dequantises as it reads (1 byte per weight); else the bf16 copy is written and read back
        # every step (5). bf16 weights keep cuBLAS: tuned triton products were slower there (0.55 vs 0.59)
        if isinstance(model, torch.nn.Module) and any(isinstance(m, Int8Linear) for m in model.modules()):
            options["coordinate_descent_tuning"] = True
        return torch.compile(step, fullgraph=True, dynamic=False, options=options)
    # CPU, batch 1: each Linear is a matrix-vector product; inductor's decompose_mm pass (off by default; its
    # N, K <= 2048 limit raised to take in the vocabulary head, a third of the weights) reads them at about
    # twice MKL's gemv bandwidth on the AMD hosts measured. Batches call oneDNN on weights fast_products
    # packed (packed_linear): about twice inductor's MKL rate at 8 rows there, 1.6x on an Intel Xeon (`python
    # bench.py --only linear`). Pointwise results of over 8 ops (CPU default 50) are stored, not redone in
    # each loop reading them (the query's RoPE, per cache slot); multiply-adds fused. cpp_extension imported
    # now and muted: nothing it logs lands in the answer.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension  # noqa: F401 ("import torch.utils..." would make torch a local)
    from torch._inductor.fx_passes import decompose_mem_bound_mm
    decompose_mem_bound_mm.cpu_max_other_dimension_decomposition = 1 << 20
    compiled = torch.compile(step, fullgraph=True, dynamic=False,
                             options={"post_grad_fusion_options": {"decompose_mm_pass": {}},
                                      "realize_cpu_opcount_threshold": 8,
                                      "cpp.enable_floating_point_contract_flag": "fast"})

    def run(tokens, cache):
        if COMPILED_ATTENTION["cpu"] == "written-out":
            cache.values_by_channel()  # the layout decode_attention reads in one pass (once per cache)
        return compiled(tokens, cache)
    return run


def keep_freed_memory():
    """On glibc (Linux), keep freed blocks of up to 32 MB for reuse rather than return them to the
    kernel, which maps fresh zeroed pages (a page fault per 4 KB) at the next allocation. A prefill
    allocates and frees activations layer after layer: with glibc's defaults the bench model's
    1,100-token prefill page-faulted ~50,000 times (200 MB), ~160 ms of its 2 threads' time in the
    kernel, ours and transformers' alike (`python bench.py --only decode --glibc-defaults`); with
    these settings, none. Peak memory is unchanged, just not returned between prompts."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # at most 32 MB on 64-bit glibc
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):  # not glibc: its allocator stands
        pass
