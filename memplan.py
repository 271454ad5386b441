"""The memory plan: what one training process holds, counted before any weight is read.

train.py prints it before step 1 (and alone with --dry-run WORLD, for a cluster this machine is
not): fp32 weights, gradients and AdamW's two moments (sharded over the ranks under FSDP2, with
the units it holds gathered), and the activations of one micro-step, measured by running the real
forward and backward on fake tensors (FakeTensorMode: nothing is allocated or computed, so a 7B
step is counted in seconds on any machine). On the CPU the process's own resident memory is added
(`runtime`), and --lean-malloc keeps glibc's heap from holding on to freed activations
(fixed_malloc_threshold).
"""
import ctypes
import weakref

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakBytes(TorchDispatchMode):
    """Live and peak bytes of the tensors ops create while active (fake ones included)."""

    def __init__(self, known=()):
        super().__init__()
        self.live, self.peak = 0, 0
        # tensors that exist already (the weights): their views are not new memory
        self.sizes = {id(t.untyped_storage()): 0 for t in known}

    def add(self, t):
        st = t.untyped_storage()
        if id(st) not in self.sizes:  # views share their base's storage: count it once
            self.sizes[id(st)] = st.nbytes()
            self.live += st.nbytes()
            weakref.finalize(st, self.free, id(st))

    def free(self, key):
        self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        self.peak = max(self.peak, self.live)
        return out


def fixed_malloc_threshold():
    """train.py --lean-malloc, CPU training with glibc: give freed activations back to the system.
    glibc serves a request below its mmap threshold from its heap, and raises the threshold (up to
    32 MB) whenever a bigger mapped block is freed; after step 1 most activations then come from
    the heap, where freed blocks stay resident, and the process peaks ~2 GiB above its memory plan
    at R = 1024 (bench.py --only ckpt1024). A fixed threshold (what MALLOC_MMAP_THRESHOLD_ sets) keeps
    every block of 64 KiB or more mapped, and unmapped when torch frees it. The price: every such
    block is page-faulted in afresh (R = 1024: steps 9-18% slower; the demo's small model: ~70%),
    so it is a flag, not the default. Elsewhere: no-op."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc
    libc.mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD: return the heap's free top at once


def fsdp_units(model):
    """The modules train.py --fsdp shards one by one (FSDP2's units): the LLM's blocks, the ViT's blocks,
    the ConvNeXt's stages, and the LLM's embedding and head unless tied (a tied head reads the
    embedding's weight outside its module, where FSDP2 would not gather it). The rest (adapters,
    projector, norms, stems) is the root unit."""
    convnext = getattr(model.encoder, "convnext", None)  # LLaVA-1.5 has none
    ends = [model.llm.tok_embeddings, model.llm.output] if model.llm.output is not None else []
    return [*model.llm.layers, *model.encoder.vit.blocks, *(convnext.stages if convnext else []), *ends]


def gathered_bytes(model, trains, bf16):
    """What FSDP2 holds whole beside the shards while the activations live: the root unit's weights
    (kept gathered through forward and backward, FSDP2's default for the root), the two largest units'
    (one running, the next prefetched), and in backward the largest trained unit's gradients, in the
    gathered dtype and again in fp32 for their reduce-scatter. Weights gather in bf16 on GPUs
    (train.py's MixedPrecisionPolicy), in fp32 on the CPU."""
    size = 2 if bf16 else 4
    trained = {id(q) for n, q in model.named_parameters() if trains(n)}
    units = [list(u.parameters()) for u in fsdp_units(model)]
    in_units = {id(q) for u in units for q in u}
    root = sum(q.numel() for q in model.parameters() if id(q) not in in_units)
    largest = sorted((sum(q.numel() for q in u) for u in units), reverse=True)[:2]
    grads = max((sum(q.numel() for q in u if id(q) in trained) for u in units), default=0)
    return size * (root + sum(largest)) + (size + 4) * grads


def memory_plan(build, cfg, trains, world, fsdp, batch, max_len, grad_ckpt, bf16):
    """Bytes per device for build(cfg), the model as it will train (its blocks checkpointed when
    grad_ckpt): weights (fp32; a LoRA base on GPUs in bf16, as train.py holds it), gradients (with
    DDP's buckets over several ranks) and AdamW's two moments (divided over the ranks under FSDP, which
    also holds some units whole: gathered_bytes), and the activations of one micro-step of `batch`
    samples of `max_len` tokens with one image each, measured on fake tensors through the real forward
    and backward (autocast's bf16 copies of the weights included, as they are held for the whole step)."""
    with FakeTensorMode():
        # FSDP2's mixed precision gathers bf16 weights, so autocast makes no copies of them
        torch.set_default_dtype(torch.bfloat16 if fsdp and bf16 else torch.float32)
        try:
            model = build(cfg)
        finally:
            torch.set_default_dtype(torch.float32)
        n_all = sum(q.numel() for q in model.parameters())
        gathered = gathered_bytes(model, trains, bf16) if fsdp else 0
        # fp32 masters under FSDP (built in bf16 above); else as built: bf16 where train.py stores a
        # frozen LoRA base so (lora.bf16_bases), fp32 for the rest
        weight_bytes = sum(q.numel() * (4 if fsdp else q.element_size()) for q in model.parameters())
        # an int8 base (--quantize): its weights are buffers of 1 byte each, plus a scale per row
        buffers, n_int8 = sum(b.nbytes for b in model.buffers()), sum(b.numel() for b in model.buffers() if b.ndim == 2)
        n_train = sum(q.numel() for n, q in model.named_parameters() if trains(n))
        for n, q in model.named_parameters():
            q.requires_grad_(trains(n))
            if trains(n):  # gradients are counted above: drop each as soon as it is made
                q.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))
        n_vis = cfg.visual_tokens
        if n_vis >= cfg.llm.max_seq_len:
            raise ValueError(f"one image takes {n_vis} LLM positions at --image-size {cfg.image_size}, but the "
                             f"LLM holds {cfg.llm.max_seq_len}: lower --image-size or raise llm.max_seq_len")
        n_text = min(max_len - 1, cfg.llm.max_seq_len - n_vis)  # the placeholder's slot goes to the image
        ids = torch.zeros(batch, n_text, dtype=torch.long)
        with PeakBytes(known=model.parameters()) as counter, torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            # the model's forward, with the splice (data-dependent, so not traceable) as one concat
            x = torch.cat([model.encode_images(torch.zeros(batch, 3, cfg.image_size, cfg.image_size)),
                           model.llm.embed(ids)], dim=1)  # (B, N + T - 1, H)
            logits = model.llm(embeds=x)
            F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), torch.zeros(batch * (x.shape[1] - 1),
                                                                               dtype=torch.long)).backward()
        # AdamW's foreach update makes temporaries the size of what it updates: after backward,
        # when the activations are gone, this is the step's peak instead
        params = [torch.zeros_like(q, dtype=torch.float32) for q in model.parameters() if q.requires_grad]
        for q in params:
            q.grad = torch.zeros_like(q)
        opt = torch.optim.AdamW(params, lr=1e-3)
        opt.step()  # makes the state, counted above
        with PeakBytes(known=[*params, *(q.grad for q in params), *(t for st in opt.state.values()
                                                                     for t in st.values())]) as update:
            opt.step()
    shard = world if fsdp else 1
    # DDP (several ranks, unsharded) all-reduces through flat buckets of its own: a second fp32 copy of the
    # gradients, held beside each parameter's .grad for the whole run
    grad_bytes = 8 if world > 1 and not fsdp else 4
    return dict(weights=weight_bytes / shard + buffers, gradients=grad_bytes * n_train / shard,
                adam=8 * n_train / shard, activations=counter.peak, gathered=gathered,
                update=update.peak / shard,
                n_all=n_all + n_int8, n_train=n_train,
                tokens=n_vis + n_text, image_size=cfg.image_size, world=world, fsdp=fsdp, batch=batch, bf16=bf16,
                grad_ckpt=grad_ckpt)


def print_plan(plan):
    gb = lambda n: f"{n / 2**30:8.2f} GiB" if n >= 2**30 else f"{n / 2**20:8.2f} MiB"  # noqa: E731
    how = f"FSDP2 over {plan['world']} ranks" if plan["fsdp"] else f"{plan['world']} process(es), unsharded"
    print(f"memory plan per device: {plan['n_train'] / 1e6:.2f}M of {plan['n_all'] / 1e6:.2f}M parameters "
          f"train; {how}; micro-batch {plan['batch']} x {plan['tokens']} tokens (one image at R={plan['image_size']}); "
          f"{'bf16 autocast' if plan['bf16'] else 'fp32'}; {'with' if plan['grad_ckpt'] else 'no'} grad checkpointing")
    for k in ("weights", "gradients", "adam", "activations", "gathered", "update", "runtime"):
        if plan[k] or k not in ("gathered", "runtime"):  # those two only where there are any (FSDP, a CPU plan)
            print(f"  {k:<12}{gb(plan[k])}")
    print(f"  {'peak':<12}{gb(plan_peak(plan))}")


def resident_bytes():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def plan_peak(plan):
    # the activations and FSDP's gathered units (forward, backward) and the update's temporaries
    # (optimizer step, on the shards) never coexist
    return (plan["weights"] + plan["gradients"] + plan["adam"] + max(plan["activations"] + plan["gathered"],
                                                                     plan["update"]) + plan["runtime"])
