"""A training run on disk: its --out directory (one run at a time, never overwritten unasked), its
checkpoints (written atomically; whole, or FSDP2 shards that no rank holds whole), and what --resume
checks before it continues. train.py's bookkeeping, kept apart so that train.py reads as the recipe.
"""
import os

import torch
from safetensors import safe_open
from torch.distributed.tensor import DTensor

import mra
from weights import write_safetensors


def rows_of(n, world, rank):
    """Rows [start, stop) of a dim 0 of n that rank holds under FSDP2 (torch.chunk's split)."""
    size = -(-n // world)
    return min(n, rank * size), min(n, rank * size + size)


def fsync(path, tree=False):
    """Flush a file, or a directory's entries (tree: and everything under it), to the disk. A rename can
    reach the disk before the data it names: after a host crash, ckpt/ could hold empty files, and
    ckpt.old be gone already."""
    for root, _, files in os.walk(path) if tree else [(path, (), ())]:
        for p in [*(os.path.join(root, f) for f in files), root]:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def save_shards(model, opt, path, cfg, rank, world):
    """--fsdp: a checkpoint no rank holds whole. Each weight is gathered on every rank in turn and rank 0
    streams it into model.safetensors (what generate.py and --resume load); each rank writes its rows of
    AdamW's state to optimizer-R-of-W.safetensors (load_shards reads them back for any world)."""
    state = model.state_dict()  # DTensors of the global shapes: the file's header
    full = (t.full_tensor() if isinstance(t, DTensor) else t for t in state.values())  # collectives
    if rank == 0:
        mra.save_checkpoint(None, path, state=state, cfg=cfg, tensors=full)
    else:
        for _ in full:  # each rank takes part in each gather, then drops the tensor
            pass
    names = {q: n for n, q in model.named_parameters()}
    rows = {f"{names[q]}/{k}": v.to_local() if isinstance(v, DTensor) else v  # "step" is the same on every rank
            for q, st in opt.state.items() for k, v in st.items()}
    mine = os.path.join(path, f"optimizer-{rank + 1:05d}-of-{world:05d}.safetensors")
    write_safetensors(mine, rows)
    fsync(mine)  # by its writer: rank 0 (save) flushes only what is in its own machine's cache


def load_shards(model, opt, path, saved_world, rank, world):
    """AdamW's state from save_shards' files, cut for this run's ranks whatever the saved run's were:
    each rank reads only the rows it holds. A parameter with no state (no gradient yet) gets none."""
    files = []
    for r in range(saved_world):
        f = os.path.join(path, f"optimizer-{r + 1:05d}-of-{saved_world:05d}.safetensors")
        try:
            files.append(safe_open(f, framework="pt"))
        except Exception as e:  # noqa: BLE001 -- missing (OSError) or cut short (SafetensorError)
            why = (str(e).splitlines() or [type(e).__name__])[0]
            raise SystemExit(f"--resume: {f}: the optimizer state the run's rank {r} saved is missing or "
                             f"unreadable ({why}); start anew from its weights with --init {path}") from None
    named = dict(model.named_parameters())
    for key in files[0].keys():  # "name/k": AdamW's state k of a parameter
        name, k = key.split("/")
        q = named[name]
        if not files[0].get_slice(key).get_shape():  # a scalar ("step"): every file holds it
            opt.state[q][k] = files[0].get_tensor(key)
            continue
        st = opt.state[q][k] = torch.zeros_like(q)  # a DTensor sharded as q is, under FSDP
        local = st.to_local() if isinstance(q, DTensor) else st
        start, stop = rows_of(q.shape[0], world, rank) if isinstance(q, DTensor) else (0, q.shape[0])
        parts = []
        for r, f in enumerate(files):  # the saved rows [a, b) of rank r that this rank holds now
            a, b = rows_of(q.shape[0], saved_world, r)
            if max(a, start) < min(b, stop):
                parts.append(f.get_slice(key)[max(a, start) - a:min(b, stop) - a])
        if parts:
            local.copy_(torch.cat(parts))
