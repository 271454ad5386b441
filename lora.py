"""LoRA fine-tuning of LLaVA-HR: low-rank updates on the LLM's linear layers, merged for serving.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021). Each frozen weight W
(out x in) gets a trainable update of rank r: W' = W + (alpha / r) B A, with A (r x in) random
and B (out x r) zero, so training starts from exactly the base model. As LLaVA-1.5 releases it
(scripts/v1_5/finetune_lora.sh): r 128, alpha 256, dropout 0.05 on the input of the low-rank
path, LoRA on every linear layer of the LLM except the head (q, k, v, o, gate, up, down), lr
2e-4, the projector trained at full rank with lr 2e-5. LLaVA-HR's train.py also trains its
MR-Adapters and the final fusion at full rank ("align_stages"), LoRA or not.

train.py --lora-r writes OUT/ckpt/lora/: the LoRA tensors plus every small module the base
does not fix (projector, fusion, MR-Adapters), with lora.json and the model's mra_config.json.
`load(base, adapters)` rebuilds the fine-tuned model from the base checkpoint and that
directory; `merge` folds the updates into W for a plain model (generate.py, OUT/ckpt). The
adapters fit only the base they trained on: lora.json records a digest of its weights
(`base_digest`), and `load` refuses a base of the same shapes that holds other ones.
On an int8 base (train.py --quantize int8, QLoRA-style as Dettmers et al. 2023 but 8-bit) W is
int8.Int8Linear's frozen q * s and only A, B train; such adapters are applied to the
full-precision base at load time rather than merged into the rounded W.
`python lora.py` prints what fits on one GPU at 7B (`memory`, the model built on meta).
"""
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import mra
from int8 import Int8Linear, check_quantize, int8_linear, int8_linears, int8_reader
from weights import CheckpointError, fingerprint, load_state, read_config, read_safetensors

TARGETS = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.gate", "mlp.up", "mlp.down")
# the parts a LoRA run keeps frozen and its adapter file leaves to the base checkpoint
FROZEN = ("llm.", "encoder.vit.", "encoder.convnext.")
# the base tensors an int8 base (int8.int8_linears) holds as int8 weights and their scales
INT8_ABLE = re.compile(r"llm\.(layers\.\d+\.(attn|mlp)\.\w+|output)\.(weight|scales)")
# base_digest's roundings: a base stored or loaded in fp16 or bf16, once or twice rounded
ROUNDINGS = ((torch.float16,), (torch.bfloat16,), (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16))


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) B A dropout(x): a frozen bias-free nn.Linear (or int8.Int8Linear,
    W = q * s) plus a rank-r update.

    It holds the wrapped layer's own weight (an int8 layer's scales too), so the base keys
    ("attn.wq.weight") are unchanged and a base checkpoint loads into it as it is; the update
    adds "lora_a", "lora_b".
    """

    def __init__(self, linear, r, alpha, dropout=0.0):
        super().__init__()
        if isinstance(linear, Int8Linear):  # buffers: never trained, never in the optimizer
            self.register_buffer("weight", linear.weight)  # (out, in) int8
            self.register_buffer("scales", linear.scales)  # (out,)
        else:
            assert linear.bias is None  # LLaMA's linear layers have none
            self.weight = linear.weight  # (out, in)
            self.register_buffer("scales", None)
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)
        w, dtype = self.weight, (linear.weight if self.scales is None else linear.scales).dtype
        self.lora_a = nn.Parameter(torch.empty(r, w.shape[1], device=w.device, dtype=dtype))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(w.shape[0], r, device=w.device, dtype=dtype))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear (and peft) initialise A

    def forward(self, x):
        base = F.linear(x, self.weight) if self.scales is None else int8_linear(x, self.weight, self.scales)
        # B = 0 at the start: the update is exactly +0 and the output is the base layer's
        return base + self.scale * F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)


def add_lora(model, r, alpha, dropout=0.0):
    """Wrap the LLM's q, k, v, o, gate, up, down projections of `model` (LlavaHR) in place."""
    if not (isinstance(r, int) and r >= 1):
        raise ValueError(f"LoRA rank r must be an integer >= 1, got {r!r}")
    for block in model.llm.layers:
        for path in TARGETS:
            parent, name = path.split(".")
            owner = getattr(block, parent)
            setattr(owner, name, LoRALinear(getattr(owner, name), r, alpha, dropout))
    return model


def merge(state, scale, dtype=None):
    """A state dict with LoRA tensors -> the plain model's, in place: W + scale * B A, computed in
    fp32, stored as `dtype` (default: W's own). One weight at a time, so never a second model."""
    for k in [k for k in state if k.endswith(".lora_a")]:
        stem = k[:-len("lora_a")]
        if stem + "scales" in state:
            raise ValueError(f"{stem}weight is int8: LoRA on an int8 base is not merged into the rounded "
                             f"weights; apply the adapters to the full-precision base (load(base, adapters))")
        a, b, w = state.pop(k), state.pop(stem + "lora_b"), state[stem + "weight"]
        delta = b.float() @ a.float()  # (out, r) @ (r, in)
        state[stem + "weight"] = (w.float() + scale * delta).to(dtype or w.dtype)
    return state


def bf16_bases(model):
    """The weights LoRA wraps, frozen and only ever read by autocast's bf16 matmuls, stored in bf16:
    the same products at half the memory (7B: 13 GB, not 26). train.py does this on GPUs, and its
    memory plan counts them so."""
    for m in model.modules():
        if isinstance(m, LoRALinear) and m.weight.is_floating_point():
            m.weight.data = m.weight.data.to(torch.bfloat16)


def adapter_state(state, trainable):
    """What the adapter file holds: the LoRA tensors, whatever trained, and every tensor outside
    the frozen LLM and towers (projector, fusion, MR-Adapters: small, and perhaps new)."""
    return {k: v for k, v in state.items() if ".lora_" in k or k in trainable or not k.startswith(FROZEN)}


def base_digest(state, rows=4):
    """{part: [hash, ...]} of the frozen base in `state` (a model's state dict as loaded, LoRA or not): what
    lora.json records, so that `load` tells the adapters' own base from another of the same shapes.

    Of the weights' values, not of the files (weights.fingerprint): the same weights as a released .bin
    directory or converted to safetensors, saved by us in fp32 or copied in fp16, are one base. Every
    FROZEN tensor (the adapter file holds the rest) gives its name, shape and `rows` evenly spaced rows
    (a 1-D one, a norm, all of it): a fine-tune moves every row of a matrix it trains (an embedding
    table's rows of tokens it never saw aside), and a few KB a tensor are read (some 1,100 tensors at
    7B, a fraction of a second; no pass over the weights). Hashed exactly, fp32 would
    tell each copy apart, so the rows are hashed once per ROUNDINGS chain: a copy rounded to fp16 or
    bf16 (stored so, or loaded with --dtype float16 / bfloat16) rounds to itself again, so some hash of
    the copy is one of the original's (`same_base`). One dtype is not enough: an fp16 copy loaded in
    bf16 is rounded twice, which is not always the value rounded to bf16 at once.
    Two parts, "linears" (the LLM's linear weights, int8 on a --quantize base) and "rest": an int8 base
    has only the rest, compared alone. 16 hex digits a hash: enough to tell two bases apart."""
    keys = sorted(k for k in state if k.startswith(FROZEN) and ".lora_" not in k)
    digest = {}
    for part, wanted in (("linears", True), ("rest", False)):
        part_keys = [k for k in keys if bool(INT8_ABLE.fullmatch(k)) == wanted]
        if not part_keys or any(not state[k].is_floating_point() for k in part_keys):  # int8: not the float values
            continue
        hashes = [hashlib.sha256() for _ in ROUNDINGS]
        for k in part_keys:
            t = state[k].detach()
            if t.dim() >= 2:
                t = t[torch.linspace(0, len(t) - 1, min(rows, len(t)), device=t.device).round().long()]
            t = t.to("cpu", torch.float32).reshape(-1)  # fp32 holds fp16 and bf16 values exactly
            for chain, h in zip(ROUNDINGS, hashes):
                rounded = t
                for dtype in chain:
                    rounded = rounded.to(dtype)
                h.update(f"{k} {tuple(state[k].shape)};".encode() + rounded.float().numpy().tobytes())
        digest[part] = [h.hexdigest()[:16] for h in hashes]
    return digest


def same_base(recorded, found):
    """Two base_digest's are of one base: in each part both have, one rounding of the one is one of the other."""
    return all(set(recorded[p]) & set(found[p]) for p in recorded.keys() & found.keys())


def check_digest(d):
    """lora.json's base_digest, as base_digest writes it, or None (adapters saved before it was recorded)."""
    digest = d.get("base_digest")
    if digest is not None and not (isinstance(digest, dict) and digest and all(
            isinstance(v, list) and v and all(isinstance(h, str) for h in v) for v in digest.values())):
        raise ValueError(f"base_digest is {digest!r}, expected {{part: [hash, ...]}} as train.py writes it")
    return digest


def save_adapters(path, state, cfg, r, alpha, base, digest):
    """DIR/model.safetensors (adapter_state), DIR/mra_config.json, DIR/lora.json {r, alpha, base, base_digest}.
    digest: base_digest of the base as the run loaded it (before any bf16 copy of it, lora.bf16_bases)."""
    mra.save_checkpoint(None, path, state=state, cfg=cfg)
    with open(os.path.join(path, "lora.json"), "w") as f:
        json.dump(dict(r=r, alpha=alpha, base=os.path.abspath(base), base_digest=digest), f, indent=1)


def check_scale(file, r, alpha, alpha_key):
    """A LoRA's rank and alpha as its config file gives them (train.py's lora.json, peft's adapter_config.json)."""
    if not (isinstance(r, int) and r >= 1 and isinstance(alpha, (int, float)) and 0 < alpha < math.inf):
        raise CheckpointError(f"{file}: r must be a whole number >= 1 and {alpha_key} a finite number > 0, not "
                              f"{r!r} and {alpha!r}")


def check_base(base, adapters, trained_on, digest, state):
    """Refuse a base that holds other weights than the adapters' own (the merge would be another model, its
    answers silently wrong). lora.json from before base_digest: only its path is known, so a base elsewhere
    is noted (it may be a copy), not refused."""
    if digest is None:
        if trained_on and os.path.realpath(base) != os.path.realpath(trained_on):
            print(f"note: --lora {adapters} was trained on {trained_on} (lora.json, saved before it recorded a "
                  f"digest of the base's weights: not checked), and --model {base} is another path: unless it holds "
                  f"the same weights, the answers are wrong; --model {trained_on}", file=sys.stderr, flush=True)
        return
    if not same_base(digest, base_digest(state)):
        if trained_on and os.path.realpath(base) == os.path.realpath(trained_on):  # a later save there, say
            raise CheckpointError(f"--lora {adapters} was trained on {trained_on} (lora.json), whose weights have "
                                  f"changed since: the adapters only fit their base as it was; --model a copy of it")
        raise CheckpointError(f"--lora {adapters} was trained on {trained_on} (lora.json), and --model {base} holds "
                              f"other weights: the adapters only fit their own base; --model {trained_on}")


def load(base, adapters, dtype=None, device="cpu", merged=True, dropout=0.0, quantize=None, own_base=True):
    """The fine-tuned model: `base` (a checkpoint dir) + `adapters` (a dir save_adapters wrote).

    merged=True: a plain LlavaHR with the updates folded in (for generation); False: the LoRA
    modules kept (train.py --resume). Adapters that do not fit the base (of other shapes, or other
    weights than those they trained on: check_base): one CheckpointError. own_base=False leaves the
    weights to the caller (train.py --resume checks the run's init_digest, and says so in its flags).
    quantize="int8": unmerged, LoRA on the int8 base (a --quantize run's resume); merged, the
    merged weights quantized one at a time (generate.py --lora --quantize int8), after the base was
    loaded whole in dtype: the peak is the float model's."""
    check_quantize(quantize)  # merged, the base loads unquantized: its loader would not see another value
    info_path = os.path.join(adapters, "lora.json")
    if not os.path.isfile(info_path):
        inside = os.path.join(adapters, "lora")  # OUT/ckpt given for OUT/ckpt/lora
        raise CheckpointError(f"--lora {adapters}: " + ("no lora.json" if os.path.isdir(adapters) else
                                                          "no such directory") +
                              " (expected a LoRA adapter directory, OUT/ckpt/lora of a train.py --lora-r run)" +
                              (f"; its adapters are in --lora {inside}" if os.path.isfile(
                                  os.path.join(inside, "lora.json")) else ""))
    r, alpha, trained_on, digest = read_config(info_path, lambda d: (d["r"], d["alpha"], d.get("base"),
                                                                     check_digest(d)))
    check_scale(info_path, r, alpha, "alpha")
    merged_here = os.path.join(base, "lora")  # train.py's OUT/ckpt: the merged model, its adapters beside it
    if (os.path.isfile(os.path.join(base, "mra_config.json")) and os.path.isdir(merged_here)
            and (os.path.realpath(merged_here) == os.path.realpath(adapters)
                 or fingerprint(merged_here) == fingerprint(adapters))):  # the same adapters, copied elsewhere
        raise CheckpointError(f"--lora {adapters}: {base} is the model with these adapters already merged in; "
                              f"applying them again would add the update twice. Use --model {base} alone, or "
                              f"--model {trained_on or 'BASE'} --lora {adapters}")
    cfg_path = os.path.join(adapters, "mra_config.json")
    if not os.path.isfile(cfg_path):  # save_adapters writes it beside lora.json: the model the adapters trained in
        raise CheckpointError(f"--lora {adapters}: no mra_config.json beside lora.json (train.py writes both); copy "
                              f"the whole adapter directory again")
    cfg = read_config(cfg_path, mra.MRAConfig.from_dict)
    tensors = read_safetensors(adapters, dtype, device)
    ranks = {v.shape[0] for k, v in tensors.items() if k.endswith(".lora_a")}
    if ranks != {r}:  # else every layer's shape mismatch would be blamed on the base
        raise CheckpointError(f"{info_path}: r {r}, but the adapters in {adapters} are of rank "
                              f"{', '.join(map(str, sorted(ranks))) or 'none (no lora_a tensors)'}")
    q = quantize if not merged else None  # merged: W + (alpha / r) B A in full precision, then quantized
    state = {k: v for k, v in mra.load_checkpoint(base, dtype, device, q).state_dict().items() if k not in tensors}
    state |= tensors
    with torch.device("meta"):
        model = mra.LlavaHR(cfg)
        if q:
            int8_linears(model.llm)
        add_lora(model, r, alpha, dropout)
    try:
        load_state(model, state, f"adapters {adapters} on base {base}", one_dtype=dtype is None)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (the adapters were trained on {trained_on}: they do not fit this base model)") from None
    if own_base:  # of the right shapes: now its weights (a stage-2 checkpoint for the stage-1 one fits as well)
        check_base(base, adapters, trained_on, digest, model.state_dict())
    if not merged:
        return model
    state = model.state_dict()
    del model, tensors  # the state dict now holds the only references: merge frees each old W
    state = merge(state, alpha / r)
    with torch.device("meta"):
        plain = mra.LlavaHR(cfg)
        if quantize:
            int8_linears(plain.llm)
    if quantize:  # one merged weight at a time becomes int8 + scales, the float one freed
        int8 = {k for k, v in plain.state_dict().items() if v.dtype == torch.int8}.__contains__
        convert = int8_reader(int8, dtype, device)
        state = {k2: v2 for k in list(state) for k2, v2 in convert(k, state.pop(k)).items()}
    return load_state(plain, state, adapters, one_dtype=dtype is None)


# -----------------------------------------------------------------------------
# memory per GPU: the weights, gradients and Adam state of the model as built, plus activations


def activation_bytes(cfg, batch, seq, grad_checkpoint, lora_dropout=False):
    """Rough activation memory of one micro-batch under bf16 autocast with SDPA (no T x T
    scores): per token and LLM layer, the tensors backward keeps, about 10 D + 4 H values
    (norm outputs, q k v, attention output, SwiGLU's gate, up, product) at 2 bytes; with
    checkpointing only each block's input (fp32) and one block recomputed at a time. The ViT
    (behind the MR-Adapters, so backward runs through it) counts the same way per image;
    logits cost 10 bytes per vocabulary entry (bf16, fp32 for the loss, its gradient)."""
    llm, vit = cfg.llm, cfg.vit

    def layer(d, h, extra=0):
        return 2 * (10 * d + 4 * h + extra)

    drop = 6 * llm.dim + llm.hidden_dim if lora_dropout else 0  # each LoRA input, dropped
    per_llm, n_vit = layer(llm.dim, llm.hidden_dim, drop), cfg.visual_tokens
    per_vit = layer(vit.width, vit.mlp_dim)
    if grad_checkpoint:
        llm_b = seq * (llm.n_layers * 4 * llm.dim + per_llm)
        vit_b = n_vit * (vit.layers * 4 * vit.width + per_vit)
    else:
        llm_b, vit_b = seq * llm.n_layers * per_llm, n_vit * vit.layers * per_vit
    return batch * (llm_b + vit_b + seq * 10 * llm.vocab_size)


def memory(model, batch, seq, grad_checkpoint, shards=1, lora_dropout=False):
    """GB per GPU for training `model` (its requires_grad flags and dtypes as set): weights,
    fp32 gradients and Adam's two moments for what trains, activations. shards: FSDP's world
    size (weights, gradients and optimizer state split across it), 1 for DDP or one GPU."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    frozen_int8 = [*model.buffers()]  # an int8 base's weights and scales (--quantize int8)
    gb = dict(weights=sum(t.numel() * t.element_size() for t in params + frozen_int8) / shards,
              grads=4 * trainable / shards, adam=8 * trainable / shards,
              activations=activation_bytes(model.cfg, batch, seq, grad_checkpoint, lora_dropout))
    gb = {k: v / 2 ** 30 for k, v in gb.items()}
    gb["total"] = sum(gb.values())
    return gb


def setup_7b(r=None, alpha=None, int8=False):
    """LLaVA-HR-7B on meta as train.py would train it: full stage 2 (fp32, all trains), or LoRA
    rank r (the wrapped weights frozen in bf16, or int8 with --quantize int8; LoRA + projector +
    fusion + MR-Adapters train)."""
    with torch.device("meta"):
        model = mra.LlavaHR(replace(mra.MRAConfig(), adapters=True))
        if int8:
            int8_linears(model.llm)
        if r:
            add_lora(model, r, alpha or 2 * r)
    for name, p in model.named_parameters():
        p.requires_grad_(not r or ".lora_" in name or not name.startswith(FROZEN))
    for m in model.modules():  # as train.py stores them on one GPU
        if isinstance(m, LoRALinear) and m.weight.is_floating_point():
            m.weight.data = m.weight.data.to(torch.bfloat16)
    return model


def fits_table(seq=2048):
    rows = []
    for r, int8 in ((None, False), (128, False), (64, False), (16, False), (128, True), (64, True)):
        model = setup_7b(r, int8=int8)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for ckpt in (True, False):
            for batch in (1, 4):
                gb = memory(model, batch, seq, ckpt, lora_dropout=bool(r))
                fit = " / ".join("yes" if gb["total"] <= 0.9 * cap else "no" for cap in (24, 48, 80))
                name = "full" if r is None else f"LoRA r {r}" + (" on int8" if int8 else "")
                rows.append(f"| {name} | {n_train / 1e6:,.0f}M | "
                            f"{'yes' if ckpt else 'no'} | {batch} | {gb['weights']:.1f} | "
                            f"{gb['grads'] + gb['adam']:.1f} | {gb['activations']:.1f} | {gb['total']:.1f} | {fit} |")
    return rows


if __name__ == "__main__":
    print("| setup | trains | grad ckpt | batch | weights | grads + Adam | activations | total GiB | fits 24 / 48 / 80 |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(fits_table()))
