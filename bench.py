"""Benchmarks. Every figure is a ratio of two things measured side by side in this one run.

1. decode: our LLaMA, eager (packed weights; plain ones on an Intel CPU) and compiled
   (kernels.compile_step; on the CPU also compiled with SDPA in place of kernels.decode_attention),
   against transformers' LlamaForCausalLM on identical weights (a ~100M random model built in HF,
   saved as safetensors, loaded by ours): batch 1, greedy, the same decode loop (generate.decode_n_tokens)
   driving them all. Tokens/s, prefill time, and the bytes each token reads (weights + KV
   cache) as a fraction of the read bandwidth measured in the same run (decode is bound by
   it). With --device cuda --compile (or --only 7b), a Vicuna-7B-shaped model against HBM: the
   compiled step, bf16 and int8, q/k/v and gate/up fused or not, and its products and attention alone.
1b. batch: generate.py's batching, 8 prompts of different lengths one at a time vs as one
   left-padded batch: generated tokens/s; and the batch through the step --compile runs for it.
1c. linear (CPU): the products of a decode step alone, 1 and 8 rows: MKL (three ways), oneDNN on
   the plain weights and on its packed layout (also with q, k, v and gate, up fused), inductor's
   C++ GEMM (8 rows), and a sum over the same bytes; then the attention of 1b's batch-8 step.
2. ttft: why MRA. Time to first token of LLaVA-HR at 1024 px against LLaVA-1.5 at 336,
   448 and 1022 px, same code, widths scaled down to run on a CPU but the full token counts:
   what grows with resolution is the number of visual tokens the LLM must read.
3. table1: the paper's Table 1 cost columns at full scale (7B), counted without weights on
   the meta device: visual tokens and prefill FLOPs of one image + a short prompt.

4. experiment: the paper's claim in miniature on the synthetic task (demo.make_scene): six
   arms trained by `train.py --preset demo` with the same data, steps and seed, scored through
   generate.py's batch mode on two held-out sets: the generator's, and an independent
   renderer's (pil_scene, JPEG). Not in the default run (~30 min on 2 idle cores).

5. scale: int8 weight-only against bf16 decoding on a random ~1B LLaMA (7B shapes with
   --device cuda), each loaded in a process of its own from the same safetensors checkpoint:
   tokens/s, bytes read per token against the measured memory bandwidth (the roofline), and
   peak anonymous memory (RssAnon: what cannot be reclaimed, unlike a mapped file's pages).
   With --model DIR: the README's generate.py command on a real checkpoint, bf16 and int8:
   load seconds, peak anonymous memory / bf16 weight bytes, time to first token, tokens/s; a LoRA
   release (--model-base, --vit) also merged once (release.py merge-lora) and run merged.
   `--make-release DIR` writes a random LLaVA-HR-7B in the released layout to test that with
   (`--release-preset llava-hr-x-13b`: LLaVA-HR-X's shapes);
   `--make-lora-release DIR2 --model DIR` a LLaVA-1.5 LoRA release on its LLM (DIR2/lora, DIR2/clip).
   Not in the default run (~15 min on 2 busy cores).
5b. int8: on the CPU, torch's int8 kernel against dequantising then a matmul on Vicuna-7B's layer
   shapes, bf16, fp32 and fp16, 1 to 128 rows: up to how many rows the kernel is the faster
   (int8.KERNEL_ROWS). Not in the default run (~2 min).

6. stage2: `train.py --stage 2 --fsdp` as run (torchrun, one GPU, bf16 FSDP2) with the full vision
   towers (CLIP ViT-L/14 at 448 with three MR-Adapters, ConvNeXt-L at 1024) and a random ~1B
   LLaMA (TinyLlama's widths, multi-head attention), with and without --grad-checkpoint: tokens/s, MFU, peak CUDA
   memory. CUDA only (~6 minutes on one H100-class GPU).
7. lean: train.py --fsdp's lean start and save on the CPU: peak RSS of each of two gloo ranks
   against one process of the same run (--init from a 324M-parameter checkpoint, a checkpoint
   saved at the end), their losses and saved weights.
8. ckpt1024: --grad-checkpoint at the release's vision shapes, R = 1024, one process on the CPU:
   the losses of 2 steps with and without, each run's peak RSS against its memory plan.

    python bench.py            # sections 1-3, ~6 minutes on 2 CPU cores
    python bench.py --device cuda --compile   # + the 7B-shaped decode on a GPU
    python bench.py --device cuda --only 7b   # that alone
    python bench.py --quick    # a smoke run of the default sections at tiny sizes, ~20 s (--only picks others)
    python bench.py --only experiment   # section 4: the README's experiment table; its arms without stage 0:
    python bench.py --only experiment --experiment-out out/no-stage0 --demo-flags="--tower-steps 0 --tower-lr-scale 1"
    python bench.py --only scale [--model DIR]   # section 5
    python bench.py --only int8   # 5b: where int8.int8_linear leaves torch's CPU int8 kernel
    python bench.py --only stage2 --device cuda   # section 6
    python bench.py --only lean   # section 7 (3-10 minutes, 14 GB of memory at once: DDP's two ranks)
    python bench.py --only ckpt1024   # section 8 (~20 GB of memory without checkpointing: an idle machine)
"""
import argparse
import copy
import glob
import json
import multiprocessing
import os
import platform
import queue
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import replace
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import demo
import failures
import generate
import mra
import release
from convnext import ConvNeXtConfig
import llama
import vit
import weights
from convnext import _layout
import int8
import kernels
from llama import Llama, LlamaConfig
from vit import ViTConfig


def now(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def argmax(logits):
    return logits.argmax(-1)


def host(device):
    """The machine a run's figures belong to: the CPU as /proc/cpuinfo names it (the README quotes hosts
    by vendor, family and model), the threads torch uses, the GPU if any, and the libraries' versions."""
    info = kernels.cpu_info()
    cpu = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info:
        cpu += f" ({info.get('vendor_id', '?')}, family {info['cpu family']}, model {info.get('model', '?')})"
    gpu = f"; {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    try:
        import transformers
        versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    except ImportError:
        versions = f"torch {torch.__version__}"
    return f"host: {cpu}, {os.cpu_count()} CPUs, torch on {torch.get_num_threads()} threads{gpu}; {versions}"


def table(rows, header):
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


# ---------------------------------------------------------------------------------------
# 1. Decode speed against transformers

def read_rates(device, repeats=3, seconds=0.5):
    """{kind of read: the memory read bandwidth it reaches, bytes/s}: the best of `repeats` samples, each
    reading a buffer far larger than the last-level cache (CPU: 8x the largest cache sysfs lists,
    at least 512 MB; GPU: 4 GB) over and over for `seconds`, so every byte comes from DRAM / HBM.
    A sample spans many passes, as a decode run spans many steps: one pass (~10 ms on a CPU) can
    catch a moment when a shared host's memory is quiet, which no run of seconds sees.
    Two kinds of read share each sample's time: a sum, and a one-row product (the buffer as a
    matrix of 4,096 columns times a vector: MKL's or cuBLAS's gemv, as in decode). Neither is the
    faster everywhere, and a roofline that some read beats is no limit: on a 2-core Xeon (family
    6, model 167) on 2026-12-06 sums read 23.3-24.1 GB/s and products 30.6-31.0, where the compiled
    decode step read 24-27 (`--only decode`); the day before, sums there read 29.5."""
    if device.type == "cuda":
        n = 4 << 30
    else:
        sizes = [64 << 20]
        for f in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
            text = open(f).read().strip()  # e.g. "32768K"
            sizes.append(int(text[:-1]) << {"K": 10, "M": 20}[text[-1]] if text[-1] in "KM" else int(text))
        n = 8 * max(sizes) // (16 << 10) * (16 << 10)  # whole rows of 4,096 floats
    buf, x = torch.ones(n // 4, device=device), torch.ones(4096, device=device)
    reads = {"sum": lambda: buf.sum(), "one-row product": lambda: torch.mv(buf.view(-1, 4096), x)}
    for read in reads.values():
        read()  # pages touched, kernels loaded
    best = dict.fromkeys(reads, 0.0)
    for _ in range(repeats):
        for kind, read in reads.items():
            passes, t0 = 0, now(device)
            while passes == 0 or now(device) - t0 < seconds / len(reads):
                read()
                passes += 1
            best[kind] = max(best[kind], passes * n / (now(device) - t0))
    return best


def read_bandwidth(device, repeats=3, seconds=0.5):
    """The roofline's bandwidth, bytes/s: the faster of read_rates'."""
    return max(read_rates(device, repeats, seconds).values())


def cache_length(n):
    return -(-n // kernels.CACHE_ROUND) * kernels.CACHE_ROUND  # rounded up as generate.prefill does


@torch.no_grad()
def run_ours(llm, ids, n, step, cache_len=None, ahead=None):
    """(tokens, prefill seconds, decode seconds) for n greedy tokens after ids (1, P); ahead: as
    generate.decode_n_tokens (default: each step queued before its tokens are read, on a GPU)."""
    dev = ids.device
    t0 = now(dev)  # the cache's allocation counted in prefill, as transformers' grows inside its call
    # on CUDA one cache per shape, as generate() gives a compiled step (its graph replays, not re-recorded)
    cache = llm.new_cache(1, cache_len or cache_length(ids.shape[1] + n), reuse=dev.type == "cuda")
    logits = llm(ids, cache=cache, last_only=True)[:, -1]
    t1 = now(dev)
    out = generate.decode_n_tokens(step, logits, cache, n, argmax, eos_id=-1, ahead=ahead)[0]
    return out, t1 - t0, now(dev) - t1


@torch.no_grad()
def run_hf(hf, ids, n):
    dev = ids.device
    t0 = now(dev)
    o = hf(ids, use_cache=True, logits_to_keep=1)
    t1 = now(dev)
    past = [o.past_key_values]

    def step(tokens, _):  # HF's own cache object, threaded through the same loop
        o = hf(tokens[:, None], past_key_values=past[0], use_cache=True)
        past[0] = o.past_key_values
        return o.logits[:, -1]
    # ahead=False: an eager step, as ours is (decode_n_tokens would take this closure for a compiled one)
    out = generate.decode_n_tokens(step, o.logits[:, -1], None, n, argmax, eos_id=-1, ahead=False)[0]
    return out, t1 - t0, now(dev) - t1


@torch.no_grad()
def paired_roofline(impls, ids, device, cache_len, pairs=30, steps=16):
    """Decode's read rate and the machine's, in pairs taken back to back: `steps` decode steps
    after the prompt (generate.decode_n_tokens, as generate.py runs them), then a read-bandwidth
    sample as long as they took. For each of impls ({name: (llm, step)}, taking turns pair by
    pair, so that all meet the same moments) its pairs' (decode bytes/s, read bytes/s); the
    median of their ratios is the paired roofline fraction. A shared machine's bandwidth swings
    (here 30-68 GB/s within a minute), so a best run set against the best sample of another
    moment mixes two conditions; a pair shares one."""
    llm = next(iter(impls.values()))[0]
    weight_bytes, kv_bytes = bytes_per_token(llm, ids.shape[1], steps + 1)  # the prompt's token, then `steps`
    caches, logits = {}, {}
    for name, (llm, _) in impls.items():
        caches[name] = llm.new_cache(1, cache_len)  # the shape the compiled step was compiled for
        logits[name] = llm(ids, cache=caches[name], last_only=True)[:, -1]
    ratios = {name: [] for name in impls}
    for _ in range(pairs + 1):
        for name, (_, step) in impls.items():
            caches[name].rewind(ids.shape[1])
            t0 = now(device)
            generate.decode_n_tokens(step, logits[name], caches[name], steps + 1, argmax, eos_id=-1)  # steps steps
            dt = now(device) - t0
            ratios[name].append(((weight_bytes + kv_bytes) * steps / dt, read_bandwidth(device, 1, seconds=dt)))
    return {name: r[1:] for name, r in ratios.items()}  # the first pair warms up


@torch.no_grad()
def paired_prefill(llm, hf, ids, cache_len, pairs):
    """Prefill side by side, as paired_roofline does decode: in each pair, ours (cache allocation
    included) and transformers' back to back, which goes first alternating. Returns each pair's
    transformers seconds / ours; a moment of noise then moves one pair, not the figure. Also each
    side's page faults and system seconds per prefill, {side: [(faults, s), ...]} (the allocator's
    cost: see kernels.keep_freed_memory and --glibc-defaults)."""
    dev, ratios, kernel = ids.device, [], {"ours": [], "transformers": []}
    usage = lambda: (lambda r: (r.ru_minflt, r.ru_stime))(resource.getrusage(resource.RUSAGE_SELF))  # noqa: E731
    for i in range(pairs + 1):
        times = {}
        for side in (("ours", "transformers") if i % 2 else ("transformers", "ours")):
            u0, t0 = usage(), now(dev)
            if side == "ours":
                llm(ids, cache=llm.new_cache(1, cache_len), last_only=True)
            else:
                hf(ids, use_cache=True, logits_to_keep=1)
            times[side], u1 = now(dev) - t0, usage()
            kernel[side].append((u1[0] - u0[0], u1[1] - u0[1]))
        ratios.append(times["transformers"] / times["ours"])
    return ratios[1:], {side: k[1:] for side, k in kernel.items()}  # the first pair warms up


def median(xs):
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def by_moment(pairs):
    """paired_roofline's pairs (decode bytes/s, read bytes/s) -> the ratio's median in the third
    of pairs with the slowest reads and in the third with the fastest, and the two rates' ranges."""
    pairs, k = sorted(pairs, key=lambda p: p[1]), max(1, len(pairs) // 3)
    ratio = lambda ps: median([d / b for d, b in ps])  # noqa: E731
    gbs = lambda xs: f"{min(xs) / 1e9:.0f}-{max(xs) / 1e9:.0f} GB/s"  # noqa: E731
    return ratio(pairs[:k]), ratio(pairs[-k:]), gbs([d for d, _ in pairs]), gbs([b for _, b in pairs])


def bytes_per_token(llm, prompt_len, new_tokens):
    """Bytes a decode step reads: every weight once (int8 ones with their scales; of the embedding
    table, one row, unless the head is tied to it and reads it whole) and the KV cache up to the
    current position (its mean over the generated tokens)."""
    c, emb = llm.config, llm.tok_embeddings.weight
    head = emb.nbytes if llm.output is None else 0  # a tied head: the table read once more, whole
    weights = sum(t.nbytes for t in llm.state_dict().values()) - emb.nbytes + emb[0].nbytes + head
    kv = emb.element_size() * 2 * c.n_layers * c.n_kv_heads * c.head_dim * (prompt_len + new_tokens / 2)
    return weights, kv


def bench_decode(a, device):
    try:
        import transformers
    except ImportError:
        print("decode: skipped, transformers is not installed (pip install -r requirements-dev.txt)")
        return {}
    c = LlamaConfig(vocab_size=32000, dim=a.dim, n_layers=a.layers, n_heads=a.dim // 64,
                    hidden_dim=a.hidden, max_seq_len=4096)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps, attn_implementation="sdpa", torch_dtype=torch.float32)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).to(device).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d, safe_serialization=True)
        # copies as generate.py runs them: eager (kernels.fast_products: packed weights, plain ones and
        # MKL's product on an Intel CPU), or the step compiled (on the CPU also with SDPA in place of
        # kernels.decode_attention, to compare)
        ours, dense, dense_sdpa = (Llama.from_pretrained(d, device=device).eval() for _ in range(3))
    kernels.fast_products(ours, device, rows=1, compiled=False)
    kernels.fast_products(dense, device, rows=1, compiled=True)
    n_params = sum(p.numel() for p in ours.parameters())
    ids = torch.randint(3, c.vocab_size, (1, a.prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    cache_len = cache_length(a.prompt_len + a.new_tokens)

    def attending(how, step):  # the step traced, and so run, with this kernels.COMPILED_ATTENTION["cpu"]
        def run(tokens, cache):
            kernels.COMPILED_ATTENTION["cpu"] = how
            return step(tokens, cache)
        return run
    compiled = attending("written-out", kernels.compile_step(dense.decode, device))
    steps = {"ours": (ours, ours.decode), "ours compiled": (dense, compiled)}  # name: (model, step)
    if device.type == "cpu":
        steps["ours compiled, SDPA"] = (dense_sdpa, attending("sdpa", kernels.compile_step(dense_sdpa.decode, device)))
    # warm-up: kernels, allocator, and the compiles, for the cache shape measured below
    run_ours(ours, ids[:, :16], 4, ours.decode), run_hf(hf, ids[:, :16], 4)
    torch._dynamo.utils.counters.clear()
    t0 = time.perf_counter()
    for llm, step in list(steps.values())[1:]:
        run_ours(llm, ids[:, :16], 4, step, cache_len=cache_len)
    compile_s = (time.perf_counter() - t0) / (len(steps) - 1)
    runs = {name: (lambda llm=llm, step=step: run_ours(llm, ids, a.new_tokens, step))
            for name, (llm, step) in steps.items()} | {"transformers": lambda: run_hf(hf, ids, a.new_tokens)}
    best = {}  # name: (tokens, best prefill s, best decode s), each side's best over the repeats
    # the roofline is sampled right after each decode run, for as long as that run decoded: a
    # shared machine's bandwidth drifts over minutes and spikes for fractions of a second, so
    # each run is paired with a window of the same length in the same conditions. The best sample
    # stands, as each side's best run does.
    samples, kinds = [], {}
    for _ in range(a.repeats):  # alternate them
        for name, fn in runs.items():
            out, pre, dec = fn()
            old = best.get(name, (out, pre, dec))
            best[name] = (out, min(pre, old[1]), min(dec, old[2]))
            rates = read_rates(device, 1, seconds=dec)
            samples.append(max(rates.values()))
            kinds = {kind: max(rate, kinds.get(kind, 0.0)) for kind, rate in rates.items()}
    bandwidth = max(samples)
    pairs = 3 if a.quick else 30
    paired_rates = paired_roofline(steps, ids, device, cache_len, pairs)
    paired = {name: median([d / b for d, b in r]) for name, r in paired_rates.items()}
    prefill_pairs, prefill_kernel = paired_prefill(ours, hf, ids, cache_len, 3 if a.quick else 9)
    kernels.COMPILED_ATTENTION["cpu"] = "written-out"
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    weight_bytes, kv_bytes = bytes_per_token(ours, a.prompt_len, a.new_tokens)
    rows, tps, frac = [], {}, {}
    ref = best["transformers"][0]
    for name, (out, pre, dec) in best.items():
        tps[name] = (a.new_tokens - 1) / dec  # decode steps per second (the first token is prefill's)
        gbs = (weight_bytes + kv_bytes) * tps[name]
        frac[name] = gbs / bandwidth
        same = next((i for i, (x, y) in enumerate(zip(out, ref)) if x != y), len(out))
        rows.append([name, f"{pre:.2f}", f"{tps[name]:.1f}", f"{gbs / 1e9:.2f}", f"{frac[name]:.2f}",
                     f"{paired[name]:.2f}" if name in paired else "-", f"{same}/{len(out)}"])
    print(f"\n1. decode: {n_params / 1e6:.0f}M-parameter LLaMA (dim {c.dim}, {c.n_layers} layers), fp32, "
          f"{device.type}, {torch.get_num_threads()} threads, batch 1, greedy, {a.new_tokens} new tokens after "
          f"{a.prompt_len} prompt tokens; best of {a.repeats}. Each step reads {weight_bytes / 1e6:.0f} MB of "
          f"weights + {kv_bytes / 1e6:.0f} MB of KV cache; this machine reads {bandwidth / 1e9:.1f} GB/s (the best "
          f"of {len(samples)} samples, {min(samples) / 1e9:.1f} at worst, each right after a decode run and as long "
          f"as it, the faster of two reads of a buffer beyond its caches: " +
          ", ".join(f"{kind} {rate / 1e9:.1f}" for kind, rate in kinds.items()) + " GB/s at best)")
    table(rows, ["impl", "prefill s", "tokens/s", "GB/s", "x read roofline", "paired", "tokens = transformers"])
    print(f"paired: the median over {pairs} pairs of 16 decode steps and a bandwidth sample as long, the "
          f"implementations taking turns pair by pair (paired_roofline)")
    slow, fast, decode_range, read_range = by_moment(paired_rates["ours compiled"])
    print(f"compiled, pair by pair: decode read {decode_range} while the buffer read {read_range}; paired {slow:.2f} "
          f"in the third of pairs with the slowest reads, {fast:.2f} in the third with the fastest")
    print(f"compiled steps: {compile_s:.0f} s to compile each, {graphs} graph(s) for {len(steps) - 1} step(s), "
          f"each measured over {a.repeats * (a.new_tokens - 1) + (pairs + 1) * 16} steps")
    print(f"prefill, pair by pair: transformers' time / ours {median(prefill_pairs):.2f}x, the median of "
          f"{len(prefill_pairs)} pairs ({min(prefill_pairs):.2f}-{max(prefill_pairs):.2f}x; paired_prefill); per "
          f"prefill, medians: " + ", ".join(f"{side} {median([f for f, _ in k]):.0f} page faults and "
                                            f"{median([s for _, s in k]) * 1e3:.0f} ms in the kernel"
                                            for side, k in prefill_kernel.items())
          + (" (glibc's allocator as it is: --glibc-defaults)" if a.glibc_defaults else
             " (freed memory kept, as generate.py does: kernels.keep_freed_memory)"))
    hf_tps = tps["transformers"]
    return {"read_bandwidth_gb_s": f"{bandwidth / 1e9:.1f}",
            "decode_tokens_per_s_ours": f"{tps['ours']:.1f}",
            "decode_tokens_per_s_ours_compiled": f"{tps['ours compiled']:.1f}",
            "decode_tokens_per_s_transformers": f"{hf_tps:.1f}",
            "decode_speedup_vs_transformers": f"{tps['ours'] / hf_tps:.2f}x",
            "decode_compiled_speedup_vs_transformers": f"{tps['ours compiled'] / hf_tps:.2f}x",
            # paired: decode and the machine's bandwidth measured at the same moments (see
            # paired_roofline); best runs: each side's best, from different moments
            "decode_roofline_fraction": f"{max(paired['ours'], paired['ours compiled']):.2f}",
            "decode_roofline_fraction_best_runs": f"{max(frac['ours'], frac['ours compiled']):.2f}",
            "prefill_speedup_vs_transformers_best_runs": f"{best['transformers'][1] / best['ours'][1]:.2f}x",
            "prefill_speedup_vs_transformers": f"{median(prefill_pairs):.2f}x"}  # paired, as the roofline


@torch.no_grad()
def bench_batch(a, device):
    """Throughput of generate.py's batching: 8 prompts of different lengths answered one at a
    time and as one left-padded batch of 8, in turns; same model as section 1, eager, each side's
    products as generate.py picks them for its batch size (kernels.fast_products). Then the
    batch of 8 through the step `--compile` runs for it (oneDNN's products inside)."""
    c = LlamaConfig(vocab_size=32000, dim=a.dim, n_layers=a.layers, n_heads=a.dim // 64,
                    hidden_dim=a.hidden, max_seq_len=4096)
    torch.manual_seed(0)
    model = mra.LlavaHR(replace(small_cfg("llava-1.5", 336, True), llm=c)).to(device).eval()  # text-only here
    alone = copy.deepcopy(model)  # each as generate.py runs it: --batch-size 8 (eager or compiled), and 1
    kernels.fast_products(model.llm, device, rows=8, compiled=False)
    kernels.fast_products(alone.llm, device, rows=1, compiled=False)
    compiled = kernels.compile_step(model.llm.decode, device)
    lo, hi = a.batch_prompt_lens
    g = torch.Generator().manual_seed(1)
    prompts = [[1] + torch.randint(3, c.vocab_size, (lo + (hi - lo) * i // 7 - 1,), generator=g).tolist()
               for i in range(8)]

    def run(batch, step=None):  # (prefill s, decode s) for these prompts in one batch
        m = model if len(batch) > 1 else alone
        step = step or m.llm.decode
        t0 = now(device)
        # a compiled step on CUDA gets its own cache back every time, as generate() gives it (its graph replays)
        reuse = step is compiled and device.type == "cuda"
        logits, cache = generate.prefill(m, batch, None, 0, a.new_tokens, reuse)
        t1 = now(device)
        generate.decode_n_tokens(step, logits, cache, a.new_tokens, argmax, eos_id=-1)
        return t1 - t0, now(device) - t1

    run(prompts[:1]), run(prompts), run(prompts, compiled)  # warm-up (and compile)
    # The three take turns, each prompt alone and then the whole batch, so all meet the same
    # moments (a shared machine's bandwidth drifts over seconds): batch 1 is the sum of the eight
    # single runs, batch 8 the mean of the eight batch runs.
    single, batch, batch_compiled = [], [], []
    for p in prompts:
        single.append(run([p]))
        batch.append(run(prompts))
        batch_compiled.append(run(prompts, compiled))
    times = {"batch 1": [sum(t) for t in zip(*single)], "batch 8": [sum(t) / len(batch) for t in zip(*batch)],
             "batch 8, compiled": [sum(t) / len(batch) for t in zip(*batch_compiled)]}
    n = 8 * a.new_tokens
    rows, tps = [], {}
    for name, (pre, dec) in times.items():
        tps[name] = n / (pre + dec)
        rows.append([name, f"{pre:.2f}", f"{dec:.2f}", f"{8 * (a.new_tokens - 1) / dec:.1f}", f"{tps[name]:.1f}"])
    print(f"\n1b. batch throughput: 8 prompts of {lo}-{hi} tokens, {a.new_tokens} new tokens each, greedy, same "
          f"LLM as 1, through generate.prefill/decode_n_tokens (left-padded); one at a time vs one batch, eager, taking "
          f"turns (each prompt alone, then the batch: the 8 single runs against the mean of the 8 batch runs); "
          f"then the batch through kernels.compile_step, in the same turns")
    table(rows, ["", "prefill s", "decode s", "decode tokens/s", "tokens/s overall"])
    return {"batch8_throughput_vs_batch1": f"{tps['batch 8'] / tps['batch 1']:.2f}x",
            "batch8_compiled_vs_eager": f"{tps['batch 8, compiled'] / tps['batch 8']:.2f}x"}


@torch.no_grad()
def bench_linear(a, rows=(1, 8), repeats=15):
    """The products a decode step makes, alone: every Linear weight of section 1's model (its
    layers and output head) times `rows` rows, through torch's F.linear (MKL for fp32), MKL on
    the transposed product and on its own packed layout, oneDNN's matmul on the plain weight
    (kernels.Linear's but on an Intel CPU) and on the weight in oneDNN's blocked layout
    (kernels.pack_linears), the latter with q, k, v and gate, up fused into two products per layer,
    and (8 rows) inductor's C++ GEMM template on weights frozen into a compiled graph, against a
    sum over the same weights (what reading them costs). Then the attention of a batch-8 step. Each
    is the median of `repeats` passes, all interleaved."""
    if not kernels.ONEDNN:
        print("linear: skipped, oneDNN's matmul is used on x86 CPUs only")
        return {}
    g = torch.Generator().manual_seed(0)
    shapes = [(a.dim, a.dim)] * 4 + [(a.hidden, a.dim)] * 2 + [(a.dim, a.hidden)]  # q k v o, gate up, down
    weights = [torch.randn(shape, generator=g) * 0.02 for _ in range(a.layers) for shape in shapes]
    weights.append(torch.randn(32000, a.dim, generator=g) * 0.02)
    pack = torch.ops.mkldnn._reorder_linear_weight
    packed = [pack(w) for w in weights]
    fused = [pack(torch.cat(weights[i + lo:i + hi])) for i in range(0, 7 * a.layers, 7)
             for lo, hi in ((0, 3), (3, 4), (4, 6), (6, 7))] + packed[-1:]  # [qkv, o, gate|up, down] per layer
    n_bytes = sum(w.nbytes for w in weights)
    onednn = torch.ops.mkldnn._linear_pointwise
    mkl_packed = hasattr(torch.ops.mkl, "_mkl_linear") and torch.backends.mkl.is_available()
    out, table_rows = {}, []
    for n in rows:
        x = {k: torch.randn(n, k, generator=g) for k in (a.dim, a.hidden)}
        impls = {"F.linear (MKL)": lambda: [torch.nn.functional.linear(x[w.shape[1]], w) for w in weights],
                 "MKL, W x^T": lambda: [torch.mm(w, x[w.shape[1]].t()) for w in weights],
                 "oneDNN, plain weight": lambda: [onednn(x[w.shape[1]], w, None, "none", [], "") for w in weights],
                 "oneDNN, packed weight": lambda: [onednn(x[w.shape[1]], p, None, "none", [], "")
                                                   for w, p in zip(weights, packed)],
                 "oneDNN, packed, qkv and gate|up fused": lambda: [onednn(x[a.dim if i % 4 < 3 else a.hidden], p, None,
                                                                          "none", [], "") for i, p in enumerate(fused)]}
        if mkl_packed:
            mkl = [torch.ops.mkl._mkl_reorder_linear_weight(w, n) for w in weights]
            impls["MKL, its packed layout"] = lambda: [torch.ops.mkl._mkl_linear(x[w.shape[1]], m, w, None, n)
                                                       for w, m in zip(weights, mkl)]
        if n > 1:
            impls["inductor C++ GEMM, frozen weights"] = frozen_products(weights, x, a.dim)
        impls["sum of the weights"] = lambda: [w.sum() for w in weights]
        med = interleaved_medians(impls, repeats)
        for k, t in med.items():
            table_rows.append([n, k, f"{t * 1e3:.1f}", f"{n_bytes / t / 1e9:.1f}",
                               f"{2 * n * n_bytes / 4 / t / 1e9:.0f}" if "sum" not in k else "-"])
        out[f"linear_packed_speedup_{n}_rows"] = f"{med['oneDNN, plain weight'] / med['oneDNN, packed weight']:.2f}x"
    print(f"\n1c. linear: the {len(weights)} weights of section 1's model ({n_bytes / 1e6:.0f} MB, fp32) times a few "
          f"rows, {torch.get_num_threads()} threads; medians of {repeats} interleaved passes")
    table(table_rows, ["rows", "product", "ms", "GB/s", "GFLOP/s"])
    vendor = kernels.cpu_info().get("vendor_id", "CPU")
    print(f"generate.py's eager products on this {vendor}: oneDNN's on packed weights, "
          + ("but MKL's on plain ones at one row (kernels.MKL_GEMV)" if kernels.MKL_GEMV else "at one row too")
          + "; a batch's with q, k, v and gate, up fused (kernels.fast_products)")
    return out | bench_batch_attention(a, repeats)


@torch.no_grad()
def bench_int8_rows(a, rows=(1, 2, 4, 8, 16, 32, 64, 128), repeats=5):
    """Where int8.int8_linear should leave torch's CPU int8 kernel (`_weight_int8pack_mm`, whose time
    grows with the rows) for dequantising then an ordinary matmul: both on Vicuna-7B's three layer
    shapes (unfused), in bf16, fp32 and fp16, a few rows to many; medians of `repeats` interleaved
    passes. int8.KERNEL_ROWS holds the limits measured so."""
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        print("int8 rows: skipped, this torch has no _weight_int8pack_mm")
        return {}
    g = torch.Generator().manual_seed(0)
    shapes = [(a.dim, a.dim), (a.hidden, a.dim), (a.dim, a.hidden)] if a.quick else [(4096, 4096), (11008, 4096),
                                                                                      (4096, 11008)]
    weights = [torch.randint(-127, 128, shape, generator=g, dtype=torch.int8) for shape in shapes]
    table_rows, out = [], {}
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        name, limit, winning = str(dtype).removeprefix("torch."), 0, True
        for n in rows:
            times = {"kernel": 0.0, "dequantise": 0.0}
            for q in weights:
                s, x = torch.rand(q.shape[0], generator=g).to(dtype), torch.randn(n, q.shape[1], generator=g).to(dtype)
                med = interleaved_medians({"kernel": lambda: torch.ops.aten._weight_int8pack_mm(x, q, s),
                                           "dequantise": lambda: torch.nn.functional.linear(x, q.to(dtype)) * s},
                                          repeats)
                times = {k: times[k] + med[k] for k in times}
            table_rows.append([name, n, f"{times['kernel'] * 1e3:.2f}", f"{times['dequantise'] * 1e3:.2f}"])
            winning = winning and times["kernel"] < times["dequantise"]  # the faster at every count so far
            limit = n if winning else limit
        out[f"int8_kernel_rows_{name}"] = limit
    print(f"\n5b. int8 products on the CPU, {torch.get_num_threads()} threads: torch's int8 kernel against "
          f"dequantising then a matmul, summed over the layer shapes {shapes}; medians of {repeats} passes")
    table(table_rows, ["dtype", "rows", "kernel ms", "dequantise + matmul ms"])
    return out


def interleaved_medians(impls, repeats):
    """{name: median seconds} of each call in `impls`, run in turns `repeats` times."""
    times = {name: [] for name in impls}
    for _ in range(repeats):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: median(t) for name, t in times.items()}


def frozen_products(weights, x, dim):
    """The products through inductor's C++ GEMM template (max_autotune picks it, or ATen's op where
    faster), which needs the weights frozen into the graph as constants (freezing): a plain copy the
    graph keeps. Returns the compiled call."""
    class Products(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.ParameterList(torch.nn.Parameter(w, requires_grad=False) for w in weights)

        def forward(self, x_dim, x_hidden):
            return [torch.nn.functional.linear(x_dim if w.shape[1] == dim else x_hidden, w) for w in self.w]
    other = next(k for k in x if k != dim)
    with torch._inductor.config.patch(freezing=True, max_autotune=True, max_autotune_gemm_backends="CPP,ATEN"):
        compiled = torch.compile(Products().eval())
        compiled(x[dim], x[other])  # compiled (and autotuned) here, under these settings
    return lambda: compiled(x[dim], x[other])


def bench_batch_attention(a, repeats):
    """Attention of section 1b's batch-8 decode step, one query per row, at its average slot count:
    SDPA (eager decode's kernel) with the left padding masked, the same as two matrix products,
    and a sum over the same keys and values (what reading them costs)."""
    lo, hi = a.batch_prompt_lens
    nh, hd, slots = a.dim // 64, 64, hi + a.new_tokens // 2
    g = torch.Generator().manual_seed(0)
    k, v = ([torch.randn(8, nh, cache_length(hi + a.new_tokens), hd, generator=g)[:, :, :slots]
             for _ in range(a.layers)] for _ in range(2))
    q = torch.randn(8, nh, 1, hd, generator=g)
    lens = torch.tensor([lo + (hi - lo) * i // 7 + a.new_tokens // 2 for i in range(8)])
    mask = llama.additive_mask((torch.arange(slots) >= slots - lens[:, None])[:, None, None], q.dtype)
    F = torch.nn.functional
    impls = {"SDPA": lambda: [F.scaled_dot_product_attention(q, kl, vl, attn_mask=mask) for kl, vl in zip(k, v)],
             "two matrix products": lambda: [((q @ kl.transpose(-1, -2)) * hd ** -0.5 + mask).softmax(-1) @ vl
                                             for kl, vl in zip(k, v)],
             "sum of the keys and values": lambda: [(kl.sum(), vl.sum()) for kl, vl in zip(k, v)]}
    med = interleaved_medians(impls, repeats)
    n_bytes = 2 * sum(t.numel() * 4 for t in k)
    print(f"\n1c. attention of 1b's batch-8 step: 8 rows x {nh} heads, one query each, over {slots} slots (the batch's "
          f"average, left padding masked) in {a.layers} layers, {n_bytes / 1e6:.0f} MB of keys and values; medians of "
          f"{repeats} interleaved passes")
    table([[name, f"{t * 1e3:.2f}", f"{n_bytes / t / 1e9:.1f}"] for name, t in med.items()], ["", "ms", "GB/s"])
    return {"attention_batch8_sdpa_vs_sum": f"{med['sum of the keys and values'] / med['SDPA']:.2f}"}


@torch.no_grad()
def bench_decode_7b(device, bandwidth, prompt_len=1100, new_tokens=128, c=LlamaConfig.from_name("vicuna-7b-v1.5")):
    """A Vicuna-7B-shaped LLaMA (c), random bf16 weights, on a GPU: eager and compiled (one CUDA
    graph per step) decode against the measured HBM read bandwidth. Rows print as measured, and a
    part that fails prints why while the rest runs on: most of this runs on a GPU only."""
    def fresh():
        with torch.device("meta"):
            model = Llama(c)
        model = model.to(torch.bfloat16).to_empty(device=device).eval()
        torch.manual_seed(0)
        for name, p in model.named_parameters():  # norms at 1, the rest small: finite activations
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
        return model

    llm = fresh()
    ids = torch.randint(3, c.vocab_size, (1, prompt_len), device=device)
    cache_len = cache_length(prompt_len + new_tokens)
    weight_bytes, kv_bytes = bytes_per_token(llm, prompt_len, new_tokens)
    frac, tps = {}, {}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"\n1c. decode, {c.n_layers} layers of dim {c.dim}, bf16, {where}, batch 1, {new_tokens} new tokens after "
          f"{prompt_len}; {(weight_bytes + kv_bytes) / 1e9:.1f} GB per step; HBM reads {bandwidth / 1e9:.0f} GB/s. "
          f"The 'alone' rows: one part of the step by itself, replayed as one CUDA graph (the ceiling of a step "
          f"built on these kernels): the weight products, one row each; the attention over the whole "
          f"{cache_len}-slot cache, the step's SDPA and the CPU step's written-out attention compiled. Then the "
          f"whole step with the attention it does not use, and with the fused weights as int8")
    print("impl | prefill s | tokens/s | GB/s | x read roofline", flush=True)

    def row(name, *cells):
        print(" | ".join([name, *cells]), flush=True)  # now: a later crash or timeout keeps it

    def measure(name, step, ahead=None):
        _, pre, dec = min((run_ours(llm, ids, new_tokens, step, ahead=ahead) for _ in range(2)), key=lambda r: r[2])
        tps[name] = (new_tokens - 1) / dec
        n_bytes = sum(bytes_per_token(llm, prompt_len, new_tokens))
        frac[name] = n_bytes * tps[name] / bandwidth
        row(f"{name} ({n_bytes / 1e9:.1f} GB)", f"{pre:.3f}", f"{tps[name]:.1f}", f"{n_bytes * tps[name] / 1e9:.0f}",
            f"{frac[name]:.2f}")

    def alone(name, n_bytes, seconds):
        frac[name] = n_bytes / seconds / bandwidth
        row(f"{name} ({n_bytes / 1e9:.2f} GB)", "-", "-", f"{n_bytes / seconds / 1e9:.0f}", f"{frac[name]:.2f}")

    def compiled():  # and warmed up: compiled for the cache shape measured
        step = kernels.compile_step(llm.decode, device)
        run_ours(llm, ids[:, :16], 4, step, cache_len=cache_len)
        return step

    # The parts, most wanted first (a run cut short by its timeout keeps what came before): the step
    # as generate.py runs it on a GPU (q, k, v and gate, up fused), the other attention, int8, unfused
    def fused():  # "not ahead": each step launched only after the host read the tokens it is fed (GPU idle)
        kernels.fuse_linears(llm)
        step = compiled()
        for name, s, ahead in (("eager", llm.decode, None), ("compiled", step, None), ("compiled, not ahead", step, False)):
            measure(name, s, ahead)
        alone("GEMVs alone", *gemv_pass(llm, device))

    def attention():
        attn_bytes, attn_s = attention_pass(c, cache_len, device)
        for name, seconds in attn_s.items():
            alone(f"attention alone, {name}", attn_bytes, seconds)
        # the whole step again with the other attention (on a GPU the written-out one)
        used = kernels.COMPILED_ATTENTION.get(device.type, "sdpa")
        other = "sdpa" if used == "written-out" else "written-out"
        with mock.patch.dict(kernels.COMPILED_ATTENTION, {device.type: other}):
            measure(f"compiled, {other} attention", compiled())
        tps[f"attention {used}"], tps[f"attention {other}"] = tps["compiled"], tps[f"compiled, {other} attention"]

    def quantized():  # as generate.py --quantize int8 --compile runs
        int8.quantize_(llm)
        measure("compiled, int8 weights", compiled())

    def unfused():  # q, k, v and gate, up as separate products, on weights as made
        nonlocal llm
        llm = None  # the int8 model let go first
        llm = fresh()
        measure("compiled, 7 products per layer", compiled())
        alone("GEMVs alone, 7 per layer", *gemv_pass(llm, device))

    summary = {"decode_7b_bf16_roofline_fraction": lambda: f"{max(frac['eager'], frac['compiled']):.2f}",
               "decode_7b_bf16_ahead_speedup": lambda: f"{frac['compiled'] / frac['compiled, not ahead']:.2f}x",
               "decode_7b_bf16_fused_speedup":
                   lambda: f"{frac['compiled'] / frac['compiled, 7 products per layer']:.2f}x",
               "decode_7b_bf16_gemv_roofline_fraction": lambda: f"{frac['GEMVs alone']:.2f}",
               "decode_7b_bf16_gemv_roofline_fraction_unfused": lambda: f"{frac['GEMVs alone, 7 per layer']:.2f}",
               "decode_7b_bf16_attention_written_out_speedup":  # > 1: faster than SDPA, alone and in the step
                   lambda: f"{frac['attention alone, written out, compiled'] / frac['attention alone, SDPA']:.2f}x",
               "decode_7b_bf16_written_out_attention_step_speedup":
                   lambda: f"{tps['attention written-out'] / tps['attention sdpa']:.2f}x",
               "decode_7b_int8_speedup_vs_bf16": lambda: f"{tps['compiled, int8 weights'] / tps['compiled']:.2f}x",
               "decode_7b_int8_roofline_fraction": lambda: f"{frac['compiled, int8 weights']:.2f}"}
    out = {}
    for part in (fused, attention, quantized, unfused):
        t0 = time.perf_counter()
        try:
            part()
        except Exception:
            traceback.print_exc()
            print(f"{part.__name__}: failed (above); its rows and summary lines are left out", flush=True)
        # compiles included: what the next run's timeout must allow for each part
        print(f"{part.__name__}: {time.perf_counter() - t0:.0f} s", flush=True)
        for name, value in summary.items():  # printed as soon as known: a run cut short by a timeout keeps them
            try:
                if name not in out:
                    out[name] = value()
                    print(f"{name}: {out[name]}", flush=True)
            except KeyError:  # a part it needs has not run, or failed
                pass
    return out


@torch.no_grad()
def gemv_pass(llm, device, passes=50):
    """(bytes, seconds) of one pass of every Linear weight of llm (layers and head) times one row,
    what a batch-1 decode step's products read; on CUDA the pass is one CUDA graph replayed."""
    ws = [m.weight for m in llm.modules() if isinstance(m, torch.nn.Linear)]
    xs = {k: torch.randn(1, k, device=device, dtype=ws[0].dtype) for k in {w.shape[1] for w in ws}}
    return sum(w.nbytes for w in ws), timed_pass(lambda: [torch.nn.functional.linear(xs[w.shape[1]], w) for w in ws],
                                                 device, passes)


@torch.no_grad()
def attention_pass(c, slots, device, dtype=torch.bfloat16, passes=50):
    """(bytes, {impl: seconds}) of a batch-1 decode step's attention alone: in each of c.n_layers layers
    one query per head over a cache of `slots` keys and values (its last tenth masked, not yet written),
    as the compiled step reads it: SDPA, and kernels.decode_attention compiled (the CPU step's attention)."""
    q = torch.randn(1, c.n_heads, 1, c.head_dim, device=device, dtype=dtype)
    kv = [torch.randn(2, 1, c.n_kv_heads, slots, c.head_dim, device=device, dtype=dtype) for _ in range(c.n_layers)]
    mask = llama.additive_mask((torch.arange(slots, device=device) < slots - slots // 10)[None, None, None], dtype)
    impls = {"SDPA": lambda k, v: torch.nn.functional.scaled_dot_product_attention(
                 q, k, v, attn_mask=mask, enable_gqa=c.n_kv_heads != c.n_heads),
             "written out, compiled": torch.compile(lambda k, v: kernels.decode_attention(q, k, v, mask), fullgraph=True)}
    return sum(t.nbytes for t in kv), {name: timed_pass(lambda f=f: [f(k, v) for k, v in kv], device, passes)
                                       for name, f in impls.items()}


def timed_pass(run, device, passes):
    """Seconds per call of run (warmed up; on CUDA captured as one CUDA graph and replayed)."""
    run()
    if device.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        run = graph.replay
    run()
    t0 = now(device)
    for _ in range(passes):
        run()
    return (now(device) - t0) / passes


# ---------------------------------------------------------------------------------------
# 2. Time to first token: LLaVA-HR at 1024 px against LLaVA-1.5

def small_cfg(arch, R, quick):
    """Narrow towers and LLM, real patch sizes and strides: real visual-token counts."""
    s = 1 if quick else 2
    return mra.MRAConfig(
        arch=arch, image_size=R, adapters=arch == "llava-hr",
        vit=ViTConfig(image_size=336, patch_size=14, width=64 * s, layers=4, heads=s, mlp_dim=256 * s),
        convnext=ConvNeXtConfig(depths=(1, 1, 3, 1), dims=(16 * s, 32 * s, 64 * s, 128 * s)),
        llm=LlamaConfig(vocab_size=4096, dim=256 * s, n_layers=4, n_heads=4 * s, hidden_dim=688 * s,
                        max_seq_len=8192))


@torch.no_grad()
def bench_ttft(a, device):
    cases = [("llava-1.5", 336), ("llava-hr", 384)] if a.quick else \
        [("llava-1.5", 336), ("llava-1.5", 448), ("llava-1.5", 1022), ("llava-hr", 1024)]
    ids = torch.tensor([[1] + [5] * 40 + [mra.IMAGE_TOKEN] + [6] * 20], device=device)  # system, image, question
    models = {}
    for arch, R in cases:
        torch.manual_seed(0)
        model = mra.build(small_cfg(arch, R, a.quick), device=device).eval()
        models[arch, R] = model, torch.randn(1, 3, R, R, device=device)
    times = {case: [] for case in cases}
    for _ in range(1 + a.repeats):  # the cases in turn, round after round (the first round warms up)
        for case, (model, image) in models.items():
            t0 = now(device)
            logits, _ = model.prefill(ids, image, max_new_tokens=1)
            logits.argmax(-1)
            times[case].append(now(device) - t0)
    ttft = {case: min(t[1:]) for case, t in times.items()}
    rows = [[arch, R, models[arch, R][0].cfg.visual_tokens, f"{ttft[arch, R]:.3f}"] for arch, R in cases]
    ref = ttft[cases[-1]]
    for r, case in zip(rows, cases):
        r.append(f"{ttft[case] / ref:.2f}")
    # the headline: the median over rounds of the last two cases' ratio, each round's pair timed back to
    # back (a paired ratio, as decode's roofline: not the ratio of the table's two best times)
    (arch0, R0), (arch1, R1) = cases[-2], cases[-1]
    rounds = [x / y for x, y in zip(times[cases[-2]][1:], times[cases[-1]][1:])]
    print(f"\n2. time to first token (image encoding + LLM prefill of {ids.shape[1] - 1} text tokens + the visual "
          f"tokens), scaled-down widths, {device.type}; best of {a.repeats} rounds, the cases in turn")
    table(rows, ["model", "px", "visual tokens", "TTFT s", f"x {cases[-1][0]}@{cases[-1][1]}"])
    print(f"{arch0}@{R0} / {arch1}@{R1}, round by round: " + ", ".join(f"{r:.2f}x" for r in rounds)
          + "; the summary line is their median")
    slug = {"llava-hr": "llava_hr", "llava-1.5": "llava15"}
    return {f"ttft_speedup_{slug[arch1]}_{R1}_vs_{slug[arch0]}_{R0}": f"{median(rounds):.2f}x"}


# ---------------------------------------------------------------------------------------
# 3. Table 1 at full scale, on the meta device

PAPER_TOKENS_PER_S = {("llava-1.5", 336): 23.8, ("llava-1.5", 448): 19.9, ("llava-1.5", 672): 12.7,
                      ("llava-1.5", 1022): 5.6, ("llava-hr", 384): 23.8, ("llava-hr", 768): 23.5,
                      ("llava-hr", 1024): 19.7, ("llava-hr", 1536): 12.6}


def prefill_flops(arch, R, text_tokens):
    """FLOPs of encoding one R x R image and prefilling the LLM on text + visual tokens."""
    cfg = mra.MRAConfig(arch=arch, image_size=R, adapters=arch == "llava-hr")
    cfg = replace(cfg, llm=replace(cfg.llm, max_seq_len=8192))  # 1.5@1022 overflows Vicuna's 4096
    with torch.device("meta"):
        model = mra.LlavaHR(cfg)
    # splice() reads ids on the host, which meta tensors cannot do; so the prefill is run as its
    # two halves: encoder + projector on the image, then the LLM on the spliced length
    with FlopCounterMode(display=False) as counter:
        visual = model.encode_images(torch.empty(1, 3, R, R, device="meta"))  # (1, N, H)
        model.llm(embeds=torch.empty(1, text_tokens + visual.shape[1], cfg.llm.dim, device="meta"))
    return visual.shape[1], counter.get_total_flops()


def bench_table1(a):
    cases = [("llava-1.5", 336), ("llava-hr", 1024)] if a.quick else list(PAPER_TOKENS_PER_S)
    rows, flops = [], {}
    for arch, R in cases:
        n, flops[arch, R] = prefill_flops(arch, R, a.text_tokens)
        rows.append([f"{arch}-7b", R, n, f"{flops[arch, R] / 1e12:.1f}", PAPER_TOKENS_PER_S[arch, R]])
    base = flops[cases[0]]
    for r, case in zip(rows, cases):
        r.insert(4, f"{flops[case] / base:.2f}")
    print(f"\n3. Table 1 cost at full scale (Vicuna-7B, CLIP ViT-L/14, ConvNeXt-L), counted on the meta device: "
          f"prefill of one image + {a.text_tokens} text tokens (logits at every position, as training's forward "
          f"computes them; generation's prefill computes the last one only)")
    table(rows, ["model", "px", "visual tokens", "TFLOPs", f"x {cases[0][0]}@{cases[0][1]}", "paper tok/s (A800)"])
    out = {}
    if ("llava-1.5", 1022) in flops:
        out["flops_ratio_llava-1.5@1022_vs_llava-hr@1024"] = \
            f"{flops['llava-1.5', 1022] / flops['llava-hr', 1024]:.2f}x"
        out["visual_tokens_llava-1.5@1022_vs_llava-hr@1024"] = \
            f"{mra.visual_tokens('llava-1.5', 1022)} vs {mra.visual_tokens('llava-hr', 1024)}"
    else:
        out["prefill_tflops_llava-hr@1024"] = f"{flops['llava-hr', 1024] / 1e12:.1f}"
    return out


# (name, MRAConfig changes, R in stage 1, R in stage 2, extra train.py flags)
ARMS = [("(a) LLaVA-1.5 style: ViT alone, low res", dict(arch="llava-1.5"), 112, 112, []),
        ("(b) ViT alone, 224 px", dict(arch="llava-1.5"), 224, 224, []),
        ("(c) LLaVA-HR, MR-Adapters (tanh gate)", {}, 128, 256, []),
        ("(d) no adapters, final fusion only", {}, 128, 256, ["--no-adapters"]),
        ("(d) sigmoid gate", {}, 128, 256, ["--gate", "sigmoid"]),
        ("(d) no gate", {}, 128, 256, ["--gate", "none"])]


def score(questions, answers):
    """Exact-match accuracy per question category (answers compared case- and period-free), and
    the texture's per pattern and phase ("dots x%3=0,y%3=2")."""
    norm = lambda s: s.strip().rstrip(".").lower()  # noqa: E731
    truth = {q["question_id"]: q for q in map(json.loads, open(questions))}
    right, seen = {}, {}
    for a in map(json.loads, open(answers)):
        q = truth[a["question_id"]]
        keys = [q["category"]] + ([f"{q['answer']} {q['phase']}"] if "phase" in q else [])
        for k in keys:
            seen[k] = seen.get(k, 0) + 1
            right[k] = right.get(k, 0) + (norm(a["text"]) == norm(q["answer"]))
    return {k: right[k] / seen[k] for k in sorted(seen)}, seen


def paths_picture(src="examples/demo.png", out="examples/paths.png"):
    """What each path of the demo model sees of the demo image (trace_image.paths_picture): the
    256 px image the ConvNeXt reads, the 112 px ViT input made from it, LLaVA-1.5's 112 px image."""
    import trace_image
    with torch.device("meta"):  # only the preprocessing runs: no weights needed
        model = mra.LlavaHR(mra.MRAConfig.from_name("demo"))
    trace_image.paths_picture(data.load_image(src), model).save(out)
    return out


def pil_scene(rng, size=256):
    """The demo task's spec (README) drawn a second way, to catch a model that learned the
    generator rather than the task: PIL ImageDraw shapes, written without demo.make_scene or
    demo.texture_mask. Returns a PIL image and its answers (the caller saves it as JPEG 90)."""
    from PIL import Image, ImageDraw
    import numpy as np
    bg = [rng.randint(*demo.BACKGROUND) for _ in range(3)]
    im = Image.new("RGB", (size, size), tuple(bg))
    draw = ImageDraw.Draw(im)
    texture = rng.choice(demo.TEXTURES)
    k = rng.randint(*demo.DARKEN[texture])
    dark = tuple(c - k for c in bg)  # the texture's pixels: the background, k grey levels darker
    if texture == "horizontal lines":
        p = rng.randrange(2)
        for y in range(p, size, 2):
            draw.line([(0, y), (size - 1, y)], fill=dark)
        phase = f"y%2={p}"
    elif texture == "vertical lines":
        p = rng.randrange(2)
        for x in range(p, size, 2):
            draw.line([(x, 0), (x, size - 1)], fill=dark)
        phase = f"x%2={p}"
    elif texture == "checkerboard":
        p = rng.randrange(2)
        draw.point([(x, y) for y in range(size) for x in range((y + p) % 2, size, 2)], fill=dark)
        phase = f"(x+y)%2={p}"
    else:
        px, py = rng.randrange(3), rng.randrange(3)
        draw.point([(x, y) for y in range(py, size, 3) for x in range(px, size, 3)], fill=dark)
        phase = f"x%3={px},y%3={py}"
    for _ in range(rng.randint(2, 4)):
        w, h = rng.randint(20, 70), rng.randint(20, 70)
        x0, y0 = rng.randint(0, size - w), rng.randint(0, size - h)
        fill = None
        while fill is None or max(fill) < 90 or any(max(abs(a - b) for a, b in zip(fill, rgb)) < 60
                                                     for rgb in demo.COLOURS.values()):
            fill = tuple(rng.randint(0, 255) for _ in range(3))
        draw.rectangle([x0, y0, x0 + w - 1, y0 + h - 1], fill=fill)
    colour = rng.choice(sorted(demo.COLOURS))
    r = rng.randint(22, 40)
    cx, cy = rng.randint(r, size - r - 1), rng.randint(r, size - r - 1)
    fill = tuple(c + rng.randint(-demo.JITTER, demo.JITTER) for c in demo.COLOURS[colour])
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    digit = rng.randint(0, 9)
    gx, gy = rng.randint(0, size - 9), rng.randint(0, size - 15)
    for i, bit in enumerate(demo.DIGITS[digit]):
        if bit == "1":
            x0, y0 = gx + 3 * (i % 3), gy + 3 * (i // 3)
            draw.rectangle([x0, y0, x0 + 2, y0 + 2], fill=(20, 20, 20))
    a = rng.randint(*demo.NOISE)
    nrng = np.random.default_rng(rng.randint(0, 2 ** 31))
    noise = nrng.normal(0, a / 2, (size, size, 3)) if rng.random() < 0.5 else nrng.integers(-a, a + 1, (size, size, 3))
    im = Image.fromarray(np.clip(np.asarray(im, dtype=np.float64) + noise, 0, 255).round().astype(np.uint8))
    return im, {"colour": colour, "texture": texture, "digit": digit, "phase": phase}


def make_pil_heldout(out, n, seed=2):
    """n pil_scene scenes as JPEG 90 under out/images, every question of each in questions.jsonl."""
    import random
    if os.path.isfile(os.path.join(out, "questions.jsonl")):  # drawn earlier: reused if it is as asked
        with open(os.path.join(out, "questions.jsonl")) as f:
            had = len({json.loads(line)["image"] for line in f if line.strip()})
        if had != n:
            raise SystemExit(f"error: {out} holds {had} scenes drawn earlier, not the {n} asked for: --pil-scenes "
                             f"{had} reuses them, or delete {out} to draw {n}")
        return out
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    rng, answers = random.Random(seed), []
    for i in range(n):
        im, ans = pil_scene(rng)
        name = f"images/pil{seed}_{i:05d}.jpg"
        im.save(os.path.join(out, name), quality=90)
        answers.append(dict(ans, image=name))
    demo.write_questions(out, answers, 3 * n, seed)
    return out


def bench_experiment(a):
    """Train the chosen arms (--arms; an arm with a result.json is kept, delete it to rerun), score
    each on both held-out sets, and write the table of every arm that has a result."""
    paths_picture()
    d = demo.prepare(a.data_dir)
    sets = {"gen": os.path.join(d, "test"), "pil": make_pil_heldout(os.path.join(d, "test_pil"), a.pil_scenes)}
    for i in a.arms:
        name, change, r1, r2, flags = ARMS[i]
        arm = os.path.join(a.experiment_out, f"arm{i}")
        if os.path.isfile(os.path.join(arm, "result.json")):
            continue
        os.makedirs(arm, exist_ok=True)
        base = mra.MRAConfig.from_name("demo")
        cfg = replace(base, vit=replace(base.vit, image_size=r2) if change.get("arch") else base.vit, **change)
        with open(os.path.join(arm, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f)
        t0 = time.time()
        subprocess.run([sys.executable, "train.py", "--preset", "demo", "--out", arm, "--data-dir", a.data_dir,
                        "--config", os.path.join(arm, "config.json"), "--stage1-size", str(r1),
                        "--image-size", str(r2), "--overwrite"] + shlex.split(a.demo_flags) + flags,
                       check=True)  # an arm without a result is redone; --demo-flags first, so the arm's own win
        result = {"train_s": time.time() - t0, "tokens": replace(cfg, image_size=r2).visual_tokens}
        steps = [json.loads(line) for line in open(os.path.join(arm, "stage2", "log.jsonl"))]
        result["tokens_per_s"] = sum(s["tokens_per_s"] for s in steps) / len(steps)
        for key, test in sets.items():
            answers = os.path.join(arm, f"answers_{key}.jsonl")
            if os.path.exists(answers):
                os.remove(answers)
            subprocess.run([sys.executable, "generate.py", "--model", os.path.join(arm, "stage2", "ckpt"),
                            "--questions", os.path.join(test, "questions.jsonl"), "--answers", answers,
                            "--image-folder", test, "--batch-size", "50", "--max-new-tokens", "8"], check=True)
            result[key], result[key + "_seen"] = score(os.path.join(test, "questions.jsonl"), answers)
        with open(os.path.join(arm, "result.json"), "w") as f:
            json.dump(result, f, indent=1)
    return experiment_tables(a.experiment_out)


def experiment_tables(out):
    """out/results.md from every arm's result.json: the main table (generator's held-out set /
    the independent renderer's) and the texture per pattern and phase."""
    results = {i: json.load(open(p)) for i in range(len(ARMS))
               for p in [os.path.join(out, f"arm{i}", "result.json")] if os.path.isfile(p)}
    both = lambda r, k: f"{r['gen'][k]:.1%} / {r['pil'][k]:.1%}"  # noqa: E731
    header = ["arm", "visual tokens", "texture", "colour", "digit", "train min", "tokens/s"]
    rows = [[ARMS[i][0], r["tokens"], *(both(r, k) for k in ("texture", "colour", "digit")),
             f"{r['train_s'] / 60:.1f}", f"{r['tokens_per_s']:.0f}"] for i, r in results.items()]
    table(rows, header)
    phases = sorted({k for r in results.values() for k in r["gen"] if " " in k and "%" in k})
    ph_header = ["pattern, darkened pixels"] + [ARMS[i][0].split(":")[0].split(",")[0] + ": gen / pil" for i in results]
    ph_rows = [[k] + [f"{r['gen'].get(k, 0):.0%} ({r['gen_seen'].get(k, 0)}) / {r['pil'].get(k, 0):.0%} "
                      f"({r['pil_seen'].get(k, 0)})" for r in results.values()] for k in phases]
    table(ph_rows, ph_header)
    md = lambda h, rs: "| " + " | ".join(h) + " |\n|" + "---|" * len(h) + "\n" + "".join(  # noqa: E731
        "| " + " | ".join(map(str, r)) + " |\n" for r in rs)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md(header, rows) + "\n" + md(ph_header, ph_rows))
    return {f"arm{i}_{s}_{k}_accuracy": f"{r[s][k]:.3f}" for i, r in results.items()
            for s in ("gen", "pil") for k in ("texture", "colour", "digit")}


# ---------------------------------------------------------------------------------------
# 5. Scale: int8 against bf16, and real checkpoints in the memory users have

class PeakAnon:
    """Samples a process's RssAnon (/proc/PID/status) every 20 ms in a thread; .peak in bytes.
    Anonymous memory is what loading allocates; a memory-mapped checkpoint's pages are not in it."""

    def __init__(self, pid, field="RssAnon"):  # field="VmRSS": the whole resident set, mapped pages too
        self.pid, self.field, self.peak, self.stop = pid, field + ":", 0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    kb = next(int(line.split()[1]) for line in f if line.startswith(self.field))
                self.peak = max(self.peak, kb * 1024)
            except (OSError, StopIteration):
                pass
            time.sleep(0.02)

    def done(self):
        self.stop.set()
        self.thread.join()
        return self.peak


def random_llama(path, c):
    """A random LLaMA in HF layout (config.json + model.safetensors) in fp16, as releases are: loading
    in bf16 then casts every tensor into memory of its own. (A checkpoint already in the dtype asked
    for stays mapped from the file: lean, but decode re-reads it from disk once memory runs short.)"""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    hf = dict(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
              num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
              rms_norm_eps=c.norm_eps)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Llama(c).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {weights.their_name(k, llama.LLAMA_KEYS): torch.ones(s, dtype=torch.float16) if len(s) == 1 else
             (torch.randn(s, generator=g) / s[-1] ** 0.5).half() for k, s in shapes.items()}
    save_file(state, os.path.join(path, "model.safetensors"))


@torch.no_grad()
def scale_worker(path, quantize, device, prompt_len, new_tokens, threads, out):
    """In a fresh process: load, prefill, decode; report through the queue `out`. threads: the
    parent's --threads, so decode runs on as many threads as read_bandwidth did there."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    t0 = time.perf_counter()
    model = Llama.from_pretrained(path, torch.bfloat16, device, quantize=quantize).eval()
    load_s = time.perf_counter() - t0
    c = model.config
    ids = torch.randint(3, c.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    run_ours(model, ids, 4, model.decode)  # warm-up: the same shapes (kernels, allocator)
    tokens, _, dec = run_ours(model, ids, new_tokens, model.decode)  # generate.py's step
    weight_bytes, kv_bytes = bytes_per_token(model, prompt_len, new_tokens)
    out.put(dict(load_s=load_s, tokens_per_s=(new_tokens - 1) / dec, bytes_per_token=weight_bytes + kv_bytes,
                 tokens=tokens, cuda_peak=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0))


def in_process(target, *args):
    """Run target(*args, queue) in a spawned process, sampling its RssAnon; (result, peak bytes)."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=target, args=args + (q,))
    proc.start()
    peak = PeakAnon(proc.pid)
    while True:  # a worker that died (out of memory, say) never puts a result: stop, don't wait for ever
        try:
            result = q.get(timeout=5)
            break
        except queue.Empty:
            if not proc.is_alive():
                try:  # a result put just before the worker exited
                    result = q.get(timeout=1)
                    break
                except queue.Empty:
                    pass
                peak.done()
                raise SystemExit(f"{target.__name__}{args[:1]}: the worker died (exit code {proc.exitcode})")
    proc.join()
    return result, peak.done()


def memory_table(context=2048):
    """Weights + KV cache at `context` tokens for the released models, counted on the meta device
    (no weights exist): float32, bfloat16, and int8 (LLM linear weights int8, the rest bfloat16)."""
    rows = []
    for preset in ("llava-hr-7b", "llava-hr-x-13b"):
        cfg = mra.MRAConfig.from_name(preset)
        c = cfg.llm
        for name, dtype, quantized in (("float32", torch.float32, False), ("bfloat16", torch.bfloat16, False),
                                       ("int8", torch.bfloat16, True)):
            with torch.device("meta"):
                model = mra.LlavaHR(cfg)
                if quantized:
                    int8.int8_linears(model.llm)
            model.to(dtype)  # floating tensors only: int8 weights stay int8
            w = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            kv = 2 * c.n_layers * c.n_kv_heads * c.head_dim * context * torch.empty(0, dtype=dtype).element_size()
            rows.append([preset, name, f"{w / 1e9:.1f}", f"{kv / 1e9:.1f}", f"{(w + kv) / 1e9:.1f}",
                         *("yes" if w + kv <= 0.9 * gb * 1e9 else "no" for gb in (16, 24, 80))])
    print(f"\nmemory: weights + KV cache at {context} tokens (batch 1), counted on the meta device; fits: the "
          f"total within 90% of the memory, the rest left to activations, the runtime and the system")
    table(rows, ["model", "dtype", "weights GB", "KV GB", "total GB", "16 GB", "24 GB", "80 GB"])


SCALE_PROMPT = 64  # decode speed is the point here; a short prompt keeps the KV cache small


def bench_scale(a, device):
    memory_table()
    if a.model:
        return bench_release(a)
    if device.type == "cuda":  # 7B shapes: the decode GPUs are bought for
        c = LlamaConfig(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, max_seq_len=2048)
    elif a.quick:
        c = LlamaConfig(vocab_size=4096, dim=256, n_layers=2, n_heads=4, hidden_dim=688, max_seq_len=512)
    else:  # ~1B: TinyLlama's widths, Vicuna's vocabulary
        c = LlamaConfig(dim=2048, n_layers=18, n_heads=16, hidden_dim=5632, max_seq_len=2048)
    bw = read_bandwidth(device, 2 if a.quick else 10)
    rows, res = [], {}
    with tempfile.TemporaryDirectory() as d:
        random_llama(d, c)
        n_params = sum(n for n, _, _ in weights.tensor_sizes(d).values())
        for _ in range(a.repeats):  # alternate the two, a fresh process each; each one's best run stands
            for name, quantize in (("bf16", None), ("int8", "int8")):
                r, peak = in_process(scale_worker, d, quantize, str(device), SCALE_PROMPT, a.new_tokens,
                                     a.threads)
                highest = max(peak, res[name]["peak"]) if name in res else peak
                if name not in res or r["tokens_per_s"] > res[name]["tokens_per_s"]:
                    res[name] = r
                res[name]["peak"] = highest
    for name, r in res.items():
        rows.append([name, f"{r['load_s']:.1f}", f"{r['tokens_per_s']:.2f}", f"{r['bytes_per_token'] / 1e9:.2f}",
                     f"{r['bytes_per_token'] * r['tokens_per_s'] / 1e9:.1f}",
                     f"{bw / r['bytes_per_token']:.2f}", f"{r['peak'] / 1e9:.2f}",
                     f"{r['cuda_peak'] / 1e9:.2f}" if device.type == "cuda" else "-"])
    print(f"\n5. scale: a random {n_params / 1e6:,.0f}M-parameter LLaMA (dim {c.dim}, {c.n_layers} layers), "
          f"{device.type}, {torch.get_num_threads()} threads, batch 1, greedy, {a.new_tokens} new tokens after "
          f"{SCALE_PROMPT} prompt tokens; best of {a.repeats} runs each, alternated, in processes of their own (peak: "
          f"the highest); read bandwidth measured {bw / 1e9:.1f} GB/s")
    table(rows, ["weights", "load s", "tokens/s", "GB/token", "GB/s", "roofline tok/s", "peak anon GB", "CUDA peak GB"])
    same = next((i for i, (x, y) in enumerate(zip(res["bf16"]["tokens"], res["int8"]["tokens"])) if x != y),
                len(res["bf16"]["tokens"]))
    print(f"greedy tokens identical for the first {same} of {len(res['bf16']['tokens'])} (random weights: near-ties)")
    return {"int8_decode_speedup_vs_bf16": f"{res['int8']['tokens_per_s'] / res['bf16']['tokens_per_s']:.2f}",
            "decode_tokens_per_s_bf16": f"{res['bf16']['tokens_per_s']:.2f}",
            "decode_tokens_per_s_int8": f"{res['int8']['tokens_per_s']:.2f}"}


def failure(code, stderr):
    """A failed command's own last line ('error: ' dropped: the caller says it), or how it ended without one."""
    lines = stderr.strip().splitlines()
    if lines:
        return lines[-1].removeprefix("error: ")
    return f"killed by signal {-code} (out of memory?)" if code < 0 else f"exit status {code}, no message"


def sampled(cmd):
    """cmd in a process of its own, its anonymous memory sampled: (exit status, stdout, stderr, peak, wall s)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = PeakAnon(proc.pid)
    stdout, stderr = proc.communicate()
    return proc.returncode, stdout, stderr, peak.done(), time.perf_counter() - t0


def bench_release(a):
    """generate.py as the README runs it, bf16 then int8, on a released-layout checkpoint. A LoRA release
    (with --model-base and --vit, generate.py's flags) is also merged once (release.py merge-lora, into a
    temporary directory) and run from the merged model."""
    from PIL import Image
    lora = os.path.isfile(os.path.join(a.model, "adapter_config.json"))
    if lora and not (a.model_base and a.vit):
        raise SystemExit(f"error: --model {a.model}: a LoRA release; give its --model-base and --vit")
    if not lora and (a.model_base or a.vit):
        raise SystemExit(f"error: --model-base and --vit go with a LoRA release as --model; {a.model} is not one")
    rows, out = [], {}
    with tempfile.TemporaryDirectory() as d:
        image = os.path.join(d, "x.png")
        Image.effect_noise((336, 336), 64).convert("RGB").save(image)
        variants, model = [("bf16", ["--model", a.model]), ("int8", ["--model", a.model, "--quantize", "int8"])], a.model
        if lora:
            model = os.path.join(d, "merged")
            code, _, stderr, peak, wall = sampled([sys.executable, "release.py", "merge-lora", a.model, model,
                                                   "--model-base", a.model_base, "--vit", a.vit])
            if code:
                raise SystemExit(f"error: release.py merge-lora failed: {failure(code, stderr)}")
            given = ["--model-base", a.model_base, "--vit", a.vit]
            variants = [("lora_bf16", variants[0][1] + given), ("lora_int8", variants[1][1] + given),
                        ("merged_bf16", ["--model", model])]
        bf16 = weights.weight_bytes(weights.tensor_sizes(model), torch.bfloat16)
        if lora:
            rows.append(["merge-lora (fp16)", "-", f"{peak / 1e9:.2f}", f"{peak / bf16:.2f}", "-", "-", f"{wall:.0f}"])
        for name, flags in variants:
            cmd = [sys.executable, "generate.py", *flags, "--image", image, "--prompt", "What is in the image?",
                   "--dtype", "bfloat16", "--max-new-tokens", str(a.new_tokens), "--device", a.device]
            code, stdout, stderr, peak, wall = sampled(cmd)
            if code:  # e.g. refused: not enough memory for this variant; the next may fit
                print(f"{name}: generate.py failed: {failure(code, stderr)}")
                continue
            load = re.search(r"loaded in ([\d.]+) s", stderr)
            speed = re.search(r"time to first token ([\d.]+) s, then ([\d.]+) tokens/s", stderr)
            rows.append([name, f"{float(load[1]):.1f}", f"{peak / 1e9:.2f}", f"{peak / bf16:.2f}",
                         speed[1] if speed else "-", speed[2] if speed else "-", f"{wall:.0f}"])
            out[f"peak_anon_over_bf16_weights_{name}"] = f"{peak / bf16:.2f}"
            print(f"{name} answer: {stdout.strip()[:80]!r}")
    print(f"\n5. {a.model}: generate.py --dtype bfloat16, {a.new_tokens} new tokens, one image; "
          f"bf16 weights {bf16 / 1e9:.2f} GB; peak anonymous memory sampled every 20 ms")
    table(rows, ["weights", "load s", "peak anon GB", "/ bf16 weights", "TTFT s", "tokens/s", "wall s"])
    return out


def make_tokenizer(path, n=32000):
    """A sentencepiece BPE model with n pieces (byte fallback, <unk> <s> </s> = 0 1 2, as LLaMA's):
    trained on a few lines, then padded with placeholder pieces up to n."""
    import sentencepiece as spm
    try:  # protobuf: in requirements-dev.txt, not in the runtime's requirements.txt
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:
        raise SystemExit(f"error: a {n}-piece tokenizer.model is written through sentencepiece's protobuf model, and "
                         f"protobuf does not import ({e}): pip install protobuf (or -r requirements-dev.txt)") from None
    with tempfile.TemporaryDirectory() as d:
        lines = [f"What is in the image? A picture of {w} number {i}." for i, w in enumerate(["cat", "sign"] * 75)]
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=os.path.join(d, "t"),
                                       vocab_size=300, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1,
                                       eos_id=2, pad_id=-1, minloglevel=2)
        m = pb.ModelProto()
        m.ParseFromString(open(os.path.join(d, "t.model"), "rb").read())
    for i in range(n - len(m.pieces)):
        m.pieces.add(piece=f"▁x{i}", score=-1000.0 - i)
    with open(path, "wb") as f:
        f.write(m.SerializeToString())


def make_release(path, preset="llava-hr-7b", shard_gb=2.0, seed=0):
    """A random LLaVA-HR in the released layout: config.json, fp16 pytorch_model-0000N-of-0000M.bin
    shards (of ~shard_gb; the releases' are ~10 GB) + pytorch_model.bin.index.json, a 32,000-piece
    tokenizer.model and its tokenizer_config.json. Release names come from
    our names through the loaders' own tables (their_name), so nothing here is a second copy of them."""
    cfg = mra.MRAConfig.from_name(preset)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in mra.LlavaHR(cfg).state_dict().items()}
    convnext_table, _ = _layout(["stages.0.blocks.0.weight"])  # the release's layout (gamma as .weight)

    def release_name(k):
        for ours, prefix, table in (("llm.", "", llama.LLAMA_KEYS), ("encoder.vit.", release.HR_VIT, vit.HF_KEYS),
                                    ("encoder.convnext.", release.HR_CONVNEXT, convnext_table)):
            if k.startswith(ours):
                return prefix + weights.their_name(k[len(ours):], table)
        return weights.their_name(k, release.RELEASE_KEYS)

    if os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)):  # a real release, say
        raise SystemExit(f"error: --make-release {path}: exists and is not an empty directory; the random shards, "
                         f"config.json and tokenizer.model would replace its files: name a new directory")
    os.makedirs(path, exist_ok=True)
    need, free = 2 * sum(s.numel() for s in shapes.values()), shutil.disk_usage(path).free  # fp16
    if need > free:  # found now, not as a write fails some shards in
        raise SystemExit(f"error: --make-release {path}: its fp16 shards need {need / 1e9:.2f} GB of disk, {free / 1e9:.2f} "
                         f"GB is free there: free some, or name a directory on another disk")
    c = cfg.llm
    make_tokenizer(os.path.join(path, "tokenizer.model"), c.vocab_size)  # first: it alone needs protobuf
    hf = dict(model_type="llava", architectures=["LlavaLlamaForCausalLM"], vocab_size=c.vocab_size,
              hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
              num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
              rms_norm_eps=c.norm_eps, torch_dtype="float16", image_aspect_ratio="pad", mm_projector_type="mlp2x_gelu",
              mm_hidden_size=cfg.vit.width, input_image_size=cfg.image_size, vit_min_size=cfg.vit_min_size,
              is_multipath_encoder=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=1)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:  # the mode the releases' say (Vicuna v1.5's)
        json.dump(dict(tokenizer_class="LlamaTokenizer", legacy=False, add_bos_token=True, add_eos_token=False), f)
    groups, size = [[]], 0  # consecutive keys, a new shard after every shard_gb (what the maker holds)
    for k, shape in shapes.items():
        if size >= shard_gb * 1e9:
            groups, size = groups + [[]], 0
        groups[-1].append(k)
        size += 2 * shape.numel()
    g, weight_map = torch.Generator().manual_seed(seed), {}
    for i, group in enumerate(groups):
        name = f"pytorch_model-{i + 1:05d}-of-{len(groups):05d}.bin"
        shard = {}
        for k in group:
            s = shapes[k]  # norms 1, biases 0, weights N(0, 1 / fan_in): activations stay O(1)
            shard[release_name(k)] = (torch.ones(s) if re.search(r"(norm|ln\w*)\.weight$", k) else
                                      torch.zeros(s) if len(s) == 1 else
                                      torch.randn(s, generator=g) / (s[1:].numel() ** 0.5)).half()
        torch.save(shard, os.path.join(path, name))
        weight_map |= dict.fromkeys(shard, name)
        del shard
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    return path


def make_lora_release(path, base, r=128, alpha=256, seed=1):
    """A random LLaVA-1.5 LoRA release as llava-v1.5-7b-lora ships, on the LLM of `base` (a --make-release
    dir, which serves as the --model-base: only its LLM is read from it): PATH/lora (LLaVA's config.json;
    adapter_config.json and adapter_model.safetensors, peft's LoRA of rank r on the seven projections of every
    layer, fp16, B and A both random so the merge changes every weight; non_lora_trainables.bin, base's
    projector under peft's names) and PATH/clip (base's CLIP ViT as an HF CLIP directory, for --vit)."""
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise SystemExit(f"error: --model {base}: no config.json; a --make-release DIR (LLaVA-HR's layout) is expected")
    from safetensors.torch import save_file
    if os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        raise SystemExit(f"error: --make-lora-release {path}: exists and is not an empty directory: name a new directory")
    try:  # read and checked before PATH is written
        hf = weights.read_config(os.path.join(base, "config.json"))
        tower = weights.read_checkpoint(base, keep=lambda k: k.startswith((release.HR_VIT, "model.mm_projector.")))
        projector = {"base_model.model." + k: tower.pop(k) for k in list(tower) if k.startswith("model.mm_projector.")}
        tower = {k[len(release.HR_VIT):]: v for k, v in tower.items()}  # vision_model.*: an HF CLIP's keys
        v = vit.ViT.from_pretrained(tower).config
    except weights.CheckpointError as e:
        raise SystemExit(f"error: --model {base}: {str(e).removeprefix(f'{base}: ')}; a --make-release DIR "
                         f"(LLaVA-HR's layout) is expected") from None
    if not projector:
        raise SystemExit(f"error: --model {base}: no model.mm_projector.* weights; a --make-release DIR (LLaVA-HR's "
                         f"layout) is expected")
    lora_dir, clip_dir = os.path.join(path, "lora"), os.path.join(path, "clip")
    os.makedirs(lora_dir), os.makedirs(clip_dir)
    torch.save(projector, os.path.join(lora_dir, "non_lora_trainables.bin"))
    save_file(tower, os.path.join(clip_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(clip_dir, "config.json"), "w") as f:
        json.dump(dict(model_type="clip_vision_model", hidden_size=v.width, intermediate_size=v.mlp_dim,
                       num_hidden_layers=v.layers, num_attention_heads=v.heads, image_size=v.image_size,
                       patch_size=v.patch_size, layer_norm_eps=v.eps, hidden_act="quick_gelu"), f, indent=1)
    del tower
    llava = {k: x for k, x in hf.items() if k not in ("input_image_size", "vit_min_size", "is_multipath_encoder")}
    with open(os.path.join(lora_dir, "config.json"), "w") as f:  # LLaVA-1.5's: one CLIP-L/336 tower
        json.dump(llava | dict(mm_vision_tower=f"openai/clip-vit-large-patch{v.patch_size}-{v.image_size}",
                               mm_vision_select_layer=-2, mm_vision_select_feature="patch"), f, indent=1)
    with open(os.path.join(lora_dir, "adapter_config.json"), "w") as f:
        json.dump(dict(peft_type="LORA", r=r, lora_alpha=alpha, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                       target_modules=list(release.PROJECTIONS)), f, indent=1)
    with torch.device("meta"):  # the LLM's weights under their HF names, as the base holds them
        llm = {weights.their_name(k, llama.LLAMA_KEYS): t.shape
               for k, t in llama.Llama(llama.LlamaConfig.from_hf(hf)).state_dict().items()}
    g, pairs, targets = torch.Generator().manual_seed(seed), {}, tuple(f"{p}.weight" for p in release.PROJECTIONS)
    for k, (out, inp) in ((k, s) for k, s in llm.items() if k.endswith(targets)):
        # (alpha / r) B A about a tenth of the weight (N(0, 1 / fan_in)) it is added to
        key = "base_model.model." + k.removesuffix(".weight")
        pairs[key + ".lora_A.weight"] = (torch.randn(r, inp, generator=g) / inp ** 0.5).half()
        pairs[key + ".lora_B.weight"] = (torch.randn(out, r, generator=g) * 0.1 / (alpha / r * r ** 0.5)).half()
    save_file(pairs, os.path.join(lora_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    return path


# ---------------------------------------------------------------------------------------
# 6. stage-2 training on one GPU, through train.py itself

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}  # dense, FLOP/s


def bench_stage2(a, device, steps=8, batch=4, words=150):
    """train.py --stage 2 --fsdp (torchrun, one process) on random weights and one synthetic
    1024 px image + ~200 text tokens per sample; the first two steps (allocator, kernels) are not
    timed. MFU counts model FLOPs: 3x the forward (measured with FlopCounterMode on the meta
    device), the forward that checkpointing repeats not included."""
    if device.type != "cuda":
        print("\n6. stage2: needs a CUDA device (--device cuda); skipped")
        return {}
    from PIL import Image
    # LLaVA-HR-7B's towers, a TinyLlama-sized LLM with Vicuna's multi-head attention (TinyLlama has 4
    # key-value heads; LLaVA-HR-7B attends with all 32)
    llm = LlamaConfig(dim=2048, n_layers=22, n_heads=32, hidden_dim=5632, max_seq_len=4096)
    cfg = replace(mra.MRAConfig(), llm=llm)
    rows, out = [], {}
    with tempfile.TemporaryDirectory() as d:
        make_tokenizer(os.path.join(d, "tokenizer.model"))
        Image.effect_noise((1024, 1024), 64).convert("RGB").save(os.path.join(d, "x.png"))
        answer = " ".join(["A picture of a cat", "number 7 sign"] * (words // 8))
        turns = [{"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": answer}]
        records = [dict(id=i, image="x.png", conversations=turns) for i in range(steps * batch)]
        with open(os.path.join(d, "data.json"), "w") as f:
            json.dump(records, f)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f)
        for ckpt in (False, True):
            run = os.path.join(d, f"run{int(ckpt)}")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "train.py",
                   "--stage", "2", "--config", os.path.join(d, "config.json"), "--data", os.path.join(d, "data.json"),
                   "--image-folder", d, "--tokenizer", os.path.join(d, "tokenizer.model"), "--out", run,
                   "--global-batch", str(batch), "--batch-size", str(batch), "--max-steps", str(steps),
                   "--fsdp", "--no-save", "--workers", "4"] + (["--grad-checkpoint"] if ckpt else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:  # train.py's own error, without torchrun's report that follows it
                print(proc.stderr.split("torch.distributed.elastic.multiprocessing.api")[0][-3000:])
                raise SystemExit("stage2: train.py failed (above)")
            with open(os.path.join(run, "log.jsonl")) as f:
                log = [json.loads(line) for line in f]
            dt = (log[-1]["time"] - log[1]["time"]) / (len(log) - 2)  # seconds per step after the warm-up
            tokens = log[-1]["tokens"] / batch  # per sample: visual + text
            n_vis = cfg.visual_tokens
            with torch.device("meta"):
                model = mra.LlavaHR(replace(cfg, adapters=True))
            with FlopCounterMode(display=False) as counter:
                model.encode_images(torch.empty(1, 3, cfg.image_size, cfg.image_size, device="meta"))
                model.llm(embeds=torch.empty(1, round(tokens), llm.dim, device="meta"))
            flops = 3 * counter.get_total_flops() * batch / dt
            peak = next((v for k, v in PEAK_BF16.items() if k in torch.cuda.get_device_name(device)), None)
            mfu = f"{flops / peak:.1%}" if peak else "-"
            rows.append(["yes" if ckpt else "no", f"{batch * tokens / dt:,.0f}", f"{dt:.2f}", mfu,
                         f"{max(r['cuda_peak_gib'] for r in log):.1f}"])
            out[f"stage2_tokens_per_s{'_grad_ckpt' if ckpt else ''}"] = f"{batch * tokens / dt:,.0f}"
    n = sum(q.numel() for q in model.parameters())
    print(f"\n6. stage 2 on {torch.cuda.get_device_name(device)}: train.py --fsdp (bf16 FSDP2, one GPU), "
          f"{n / 1e9:.2f}B parameters (ViT-L/14 at 448, ConvNeXt-L at 1024, LLM dim {llm.dim} x {llm.n_layers}), "
          f"micro-batch {batch} x {tokens:.0f} tokens ({n_vis} visual), {steps - 2} timed steps")
    table(rows, ["grad ckpt", "tokens/s", "s/step", "MFU", "peak GiB"])
    return out


# ---------------------------------------------------------------------------------------
# 7. the lean FSDP start: host memory per rank against one process


def write_run(d, cfg, records):
    """What a train.py --stage 2 run reads, under d: tokenizer.model (32,000 pieces), data.json
    (records) and config.json (cfg)."""
    make_tokenizer(os.path.join(d, "tokenizer.model"))
    for name, obj in (("data.json", records), ("config.json", cfg.to_dict())):
        with open(os.path.join(d, name), "w") as f:
            json.dump(obj, f)


def plan_gib(printed):
    """The peak of the memory plan train.py printed before step 1, GiB."""
    line = next(line for line in printed.splitlines() if line.startswith("  peak")).split()
    return float(line[1]) * (1 if line[2] == "GiB" else 2**-10)


def bench_lean(a, port=29533):
    """train.py --stage 2 --init CKPT --lean-malloc, one process, then two gloo ranks under DDP and
    under --fsdp, of the same run, each saving its checkpoint at the end: peak RSS of each process
    (VmRSS sampled every 20 ms) against one process's and against its memory plan, the losses, and
    the saved weights against one process's. The towers are tiny, the LLM 20 x 1024 wide (quick: 2
    layers)."""
    from PIL import Image
    cfg = replace(small_cfg("llava-hr", 128, True), vit_min_size=28, llm=LlamaConfig(
        dim=1024, n_layers=2 if a.quick else 20, n_heads=16, hidden_dim=2816, max_seq_len=512))
    with tempfile.TemporaryDirectory() as d:
        records = []
        for i in range(8):
            Image.effect_noise((64, 64), 32 + 8 * i).convert("RGB").save(os.path.join(d, f"{i}.png"))
            records.append(dict(id=i, image=f"{i}.png", conversations=[
                {"from": "human", "value": "What is in the image?\n<image>"},
                {"from": "gpt", "value": f"A picture of a cat, number {i}."}]))
        write_run(d, cfg, records)
        torch.manual_seed(0)
        mra.save_checkpoint(mra.build(cfg), os.path.join(d, "init"))
        n = sum(s[0] for s in weights.tensor_sizes(os.path.join(d, "init")).values())
        cmd = [sys.executable, "train.py", "--stage", "2", "--config", os.path.join(d, "config.json"),
               "--init", os.path.join(d, "init"), "--data", os.path.join(d, "data.json"), "--image-folder", d,
               "--tokenizer", os.path.join(d, "tokenizer.model"), "--image-size", "128", "--workers", "0",
               "--global-batch", "2", "--batch-size", "1", "--max-steps", "3", "--lr", "1e-3", "--warmup-ratio", "0",
               "--group-by-modality-length", "--grad-checkpoint", "--lean-malloc",
               "--grad-clip", "1"]  # the README's losses were measured with it (train.py's default then)
        rows, losses, diffs, outs = [], {}, {}, {}
        runs = (("one process", 1, []), ("DDP, 2 ranks", 2, []), ("--fsdp, 2 ranks", 2, ["--fsdp"]))
        for name, world, flags in runs:
            out = outs[name] = os.path.join(d, f"run{len(outs)}")
            env = os.environ | dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                                    OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)))
            procs = [subprocess.Popen(cmd + ["--out", out] + flags, text=True,
                                      stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      env=env | dict(RANK=str(r), LOCAL_RANK=str(r)) if world > 1 else env)
                     for r in range(world)]
            peaks = [PeakAnon(p.pid, "VmRSS") for p in procs]
            plan = plan_gib(procs[0].stdout.read())  # rank 0 prints the plan (per device: every rank's)
            for p in procs:
                if p.wait():
                    raise SystemExit(f"lean: train.py failed: {p.stderr.read()[-2000:]}")
            with open(os.path.join(out, "log.jsonl")) as f:
                losses[name] = [json.loads(line)["loss"] for line in f]
            for r, peak in enumerate(peaks):
                gib = peak.done() / 2**30
                rows.append([name if world == 1 else f"{name}: rank {r}", f"{gib:.2f}", f"{plan:.2f}",
                             f"{gib / plan:.2f}"])
        one = float(rows[0][1])
        for r in rows:
            r.insert(2, f"{float(r[1]) / one:.2f}")
        alone = weights.read_safetensors(os.path.join(outs.pop("one process"), "ckpt"))
        for name, out in outs.items():  # the saved weights, one run's at a time
            saved = weights.read_safetensors(os.path.join(out, "ckpt"))
            assert saved.keys() == alone.keys()
            diffs[name] = max((saved[k] - alone[k]).abs().max().item() for k in saved)
            del saved
        del alone
    print(f"\n7. DDP and the lean FSDP start, and saving: train.py --stage 2 --init (a {n / 1e6:.0f}M-parameter "
          f"checkpoint, fp32), --grad-checkpoint --lean-malloc, 3 steps of 2 samples, then the checkpoint; "
          f"{os.cpu_count()} CPU cores")
    table(rows, ["run", "peak RSS GiB", "x one process", "plan GiB", "peak / plan"])
    for name, diff in diffs.items():
        worst = max((abs(x - y) / abs(y) for x, y in zip(losses[name], losses["one process"])), default=0)
        print(f"{name}: losses {losses[name]} (one process: {losses['one process']}), largest relative difference "
              f"{worst:.1e}; saved weights against one process's: largest absolute difference {diff:.1e}")
    return {"lean_fsdp_rank_peak_vs_one_process": max(r[2] for r in rows if r[0].startswith("--fsdp")),
            "lean_peak_vs_plan": f"{min(float(r[4]) for r in rows):.2f}-{max(float(r[4]) for r in rows):.2f}"}


# ---------------------------------------------------------------------------------------
# 8. --grad-checkpoint at the release's R = 1024: the same numbers, the memory it saves


def bench_ckpt1024(a):
    """train.py --stage 2, one process, fp32 on the CPU, at the release's vision shapes (CLIP
    ViT-L/14 at 448 with three MR-Adapters, ConvNeXt-L at R = 1024) and a random 2-layer 1024-wide
    LLM: 2 steps of one 1024 px image + ~130 tokens (lr 2e-5 from step 1, so step 2's loss
    follows an update), without and then with --grad-checkpoint, both with --lean-malloc.
    Prints each run's losses, peak RSS (VmRSS, sampled every 20 ms) and the memory plan train.py
    printed before step 1. Without checkpointing the plan is 19.3 GiB (21 GB; with it 11.3 GiB):
    an idle machine with 24 GB, please. --quick: small towers at R = 256, a smoke run of the same command."""
    from PIL import Image
    R = 256 if a.quick else 1024
    llm = LlamaConfig(dim=1024, n_layers=2, n_heads=16, hidden_dim=2816, max_seq_len=4096)
    cfg = replace(small_cfg("llava-hr", R, True) if a.quick else mra.MRAConfig(), image_size=R, llm=llm)
    rows, losses = [], {}
    with tempfile.TemporaryDirectory() as d:
        Image.effect_noise((R, R), 64).convert("RGB").save(os.path.join(d, "x.png"))
        write_run(d, cfg, [dict(id=i, image="x.png", conversations=[
            {"from": "human", "value": "<image>\nWhat is in the image?"},
            {"from": "gpt", "value": " ".join([f"A picture of a cat number {i}", "sign"] * 12)}]) for i in range(2)])
        for ckpt in (False, True):
            cmd = [sys.executable, "train.py", "--stage", "2", "--config", os.path.join(d, "config.json"),
                   "--data", os.path.join(d, "data.json"), "--image-folder", d, "--image-size", str(R),
                   "--tokenizer", os.path.join(d, "tokenizer.model"), "--out", os.path.join(d, f"run{int(ckpt)}"),
                   "--global-batch", "1", "--batch-size", "1", "--max-steps", "2", "--max-len", "256",
                   "--warmup-ratio", "0", "--grad-clip", "1",  # the README's losses were measured with it
                   "--workers", "0", "--no-save", "--lean-malloc"] + (["--grad-checkpoint"] if ckpt else [])
            proc = subprocess.Popen(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            peak = PeakAnon(proc.pid, "VmRSS")
            out, err = proc.communicate()
            if proc.returncode:
                raise SystemExit(f"ckpt1024: train.py failed: {err[-2000:]}")
            plan = plan_gib(out)
            with open(os.path.join(d, f"run{int(ckpt)}", "log.jsonl")) as f:
                log = [json.loads(line) for line in f]
            losses[ckpt] = [e["loss"] for e in log]
            gib = peak.done() / 2**30
            rows.append(["yes" if ckpt else "no", *(f"{x!r}" for x in losses[ckpt]), f"{gib:.2f}",
                         f"{gib * 2**30 / 1e9:.2f}", f"{plan:.2f}", f"{gib / plan:.2f}",
                         " / ".join(f"{e['tokens'] / e['tokens_per_s']:.0f}" for e in log)])
    n_vis = cfg.visual_tokens
    print(f"\n8. --grad-checkpoint at R = {R}: train.py --stage 2 --lean-malloc, one process, fp32 CPU, "
          f"{'small towers' if a.quick else 'ViT-L/14 at 448 with three MR-Adapters, ConvNeXt-L'}, a 2-layer "
          f"1024-wide LLM; 2 steps of one image ({n_vis} visual tokens) + text, --max-len 256; "
          f"{os.cpu_count()} CPU cores")
    table(rows, ["grad ckpt", "loss 1", "loss 2", "peak RSS GiB", "peak RSS GB", "plan GiB", "peak / plan",
                 "step 1 / 2 s"])
    rel = [abs(x - y) / abs(y) for x, y in zip(losses[True], losses[False])]
    print("relative difference of the losses, with vs without: " + ", ".join(f"step {i + 1}: {r:.1e}"
                                                                           for i, r in enumerate(rel)))
    return {f"ckpt{R}_loss_rel_diff": f"{max(rel):.1e}", f"ckpt{R}_peak_gb": rows[1][4],
            f"ckpt{R}_peak_gb_no_ckpt": rows[0][4]}


def at_least(low):
    """An argparse type: a whole number >= low (a negative --threads was torch's traceback, a negative
    --text-tokens one from inside the FLOP counter)."""
    def parse(text):
        if not (text.lstrip("-").isdigit() and int(text) >= low):
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, not {text!r}")
        return int(text)
    return parse


def main(argv=None):
    p = failures.Parser(prog="bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run (of the default sections, or those --only names)")
    p.add_argument("--only", choices=["decode", "7b", "batch", "linear", "ttft", "table1", "experiment", "scale", "int8",
                                      "stage2", "lean", "ckpt1024"],
                   action="append",
                   help="run these sections")
    p.add_argument("--data-dir", default="data/demo", help="experiment: the synthetic data")
    p.add_argument("--experiment-out", default="out/experiment")
    p.add_argument("--arms", default="abcd",
                   help="experiment: the arms to train, by letter (d: all three ablations) or index 0-5")
    p.add_argument("--pil-scenes", type=at_least(1), default=300, help="experiment: scenes in the independent held-out set")
    # e.g. --demo-flags="--tower-steps 0 --tower-lr-scale 1": the arms without stage 0 (README); demo.run takes
    # its own flags (--tower-steps, --scenes) and passes the rest to both train.py stages, where the last wins
    p.add_argument("--demo-flags", default="",
                   help="experiment: more flags for every arm's train.py --preset demo (one string: "
                        "--demo-flags=\"...\"); use another --experiment-out, as arms with a result are kept")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=at_least(1), help="torch CPU threads (default: torch's choice)")
    p.add_argument("--prompt-len", type=at_least(1), default=1100)
    p.add_argument("--new-tokens", type=at_least(1), default=128)
    p.add_argument("--dim", type=at_least(64), default=768, help="a multiple of 64 (heads of 64)")
    p.add_argument("--layers", type=at_least(1), default=8)
    p.add_argument("--hidden", type=at_least(1), default=2048)
    p.add_argument("--batch-prompt-lens", type=at_least(1), nargs=2, default=(64, 256), metavar=("MIN", "MAX"),
                   help="batch: the 8 prompts' lengths run from MIN to MAX tokens")
    p.add_argument("--repeats", type=at_least(1), default=2, help="decode: runs of each implementation (the best counts)")
    p.add_argument("--text-tokens", type=at_least(0), default=60, help="table1: text tokens beside the image")
    p.add_argument("--compile", action="store_true",
                   help="decode on CUDA: also a Vicuna-7B-shaped model, bf16 and int8, eager and compiled (~40 GB of GPU memory)")
    p.add_argument("--glibc-defaults", action="store_true",
                   help="leave glibc's allocator as it is, rather than keep freed memory as generate.py does on "
                        "the CPU (kernels.keep_freed_memory; both sides share the process either way)")
    p.add_argument("--model", help="scale: a real (released-layout) checkpoint to run generate.py on")
    p.add_argument("--model-base", help="scale: with a LoRA release as --model, its base LLM (generate.py's flag)")
    p.add_argument("--vit", help="scale: with a LoRA release as --model, its CLIP tower (generate.py's flag)")
    p.add_argument("--make-release", metavar="DIR", help="write a random LLaVA-HR-7B in the released .bin layout, exit")
    p.add_argument("--release-preset", default="llava-hr-7b", choices=list(mra.MRA_PRESETS),
                   help="--make-release: the model whose shapes it has (llava-hr-x-13b: LLaVA-HR-X, 28.5 GB of fp16)")
    p.add_argument("--make-lora-release", metavar="DIR", help="write a random LLaVA-1.5 LoRA release (DIR/lora, r 128) "
                   "and its CLIP tower (DIR/clip) on --model's LLM (a --make-release DIR, the --model-base), exit")
    a = p.parse_args(argv)
    if a.dim % 64:
        p.error(f"--dim {a.dim}: a multiple of 64 is expected (heads of 64)")
    if a.batch_prompt_lens[0] > a.batch_prompt_lens[1]:
        p.error(f"--batch-prompt-lens MIN MAX: MIN {a.batch_prompt_lens[0]} is above MAX {a.batch_prompt_lens[1]}")
    if unknown := set(a.arms) - {arm[0][1] for arm in ARMS} - set(map(str, range(len(ARMS)))):
        p.error(f"--arms {a.arms}: no arm {''.join(sorted(unknown))!r}; letters "
                f"{''.join(sorted({arm[0][1] for arm in ARMS}))} or indexes 0-{len(ARMS) - 1} are expected")
    try:
        device = torch.device(a.device)
    except RuntimeError:
        p.error(f"--device {a.device}: not a device torch knows (cpu, cuda, cuda:1, ...)")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {a.device}: bench.py runs on cpu or cuda")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        p.error(f"--device {a.device}: no CUDA device here" if not torch.cuda.is_available() else
                f"--device {a.device}: this machine has {torch.cuda.device_count()} CUDA device(s), from cuda:0")
    if a.quick:
        a.prompt_len, a.new_tokens, a.dim, a.layers, a.hidden, a.repeats = 64, 8, 128, 2, 256, 1
        a.batch_prompt_lens = (8, 32)
    a.arms = [i for i, arm in enumerate(ARMS) if arm[0][1] in a.arms or str(i) in a.arms]
    if a.threads:
        torch.set_num_threads(a.threads)
    if device.type == "cpu" and not a.glibc_defaults:
        kernels.keep_freed_memory()
    if a.make_release:
        print(make_release(a.make_release, a.release_preset))
        return
    if a.make_lora_release:
        if not a.model:
            raise SystemExit("error: --make-lora-release DIR needs --model BASE (a --make-release DIR)")
        print(make_lora_release(a.make_lora_release, a.model))
        return
    sections = a.only or ["decode", "batch", "linear", "ttft", "table1"]
    print(host(device))
    summary = {}
    if "decode" in sections:
        summary |= bench_decode(a, device)
    if "7b" in sections or ("decode" in sections and a.compile):
        if device.type != "cuda":
            print("\n1c. the 7B-shaped decode: skipped, it needs --device cuda")
        else:
            summary |= bench_decode_7b(device, read_bandwidth(device))
    if "batch" in sections:
        summary |= bench_batch(a, device)
    if "linear" in sections and device.type == "cpu":
        summary |= bench_linear(a)
    if "ttft" in sections:
        summary |= bench_ttft(a, device)
    if "table1" in sections:
        summary |= bench_table1(a)
    if "experiment" in sections:
        summary |= bench_experiment(a)
    if "scale" in sections:
        summary |= bench_scale(a, device)
    if "int8" in sections:
        summary |= bench_int8_rows(a) if device.type == "cpu" else print("\n5b. int8: skipped, a CPU section") or {}
    if "stage2" in sections:
        summary |= bench_stage2(a, device)
    if "lean" in sections:
        summary |= bench_lean(a)
    if "ckpt1024" in sections:
        summary |= bench_ckpt1024(a)
    # the headline figures last, in a fixed order
    last = ["decode_speedup_vs_transformers", "decode_compiled_speedup_vs_transformers",
            "decode_roofline_fraction", "prefill_speedup_vs_transformers", "batch8_throughput_vs_batch1",
            "ttft_speedup_llava_hr_1024_vs_llava15_1022"]
    print()
    for k in sorted(summary, key=lambda k: last.index(k) if k in last else -1):
        print(f"{k}: {summary[k]}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main()
    except (weights.CheckpointError, data.DataError, OSError) as e:  # a checkpoint or a file given (--model,
        sys.exit(f"error: {e}")  # --make-release DIR): one line, as generate.py says it
