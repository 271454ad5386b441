r"""Train LLaVA-HR in the paper's two stages (Sec. 4.4), with the released recipe.

Stage 1 (pre-training, LCS-558K, template "plain", R = 384, no MR-Adapters): only the
projector and the final fusion learn; both towers and the LLM stay frozen.
Stage 2 (instruction tuning, llava_v1_5_mix665k, "vicuna_v1", R = 1024): MR-Adapters are
inserted as the identity and everything learns. AdamW, weight decay 0, no gradient clipping,
warmup ratio 0.03, cosine, one epoch, lr 1e-3 / 2e-5, global batch 256 / 128, bf16, gradient
checkpointing.

    python train.py --stage 1 --data blip_laion_cc_sbu_558k.json --image-folder images/ \
        --llm vicuna-7b-v1.5/ --vit clip-vit-large-patch14-336/ --convnext convnext_large_mlp.safetensors \
        --out out/stage1 --grad-checkpoint
    torchrun --nproc_per_node 8 train.py --stage 2 --data llava_v1_5_mix665k.json \
        --image-folder data/ --init out/stage1/ckpt --out out/stage2 --fsdp --grad-checkpoint

One process per device (torchrun); DDP, or FSDP2 (--fsdp: parameters sharded per
transformer block, the release's ZeRO-3 for stage 2). Checkpoints are loadable by
generate.py and resume exactly (--resume). The layout follows nanoGPT's train.py.
"""
import argparse
import hashlib
import inspect
import json
import math
import os
import shutil
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from datetime import timedelta
from functools import partial

import failures

# before torch loads: Ctrl-C and SIGTERM are one line from here
failures.catch_signals("--debug" in sys.argv, "interrupted: nothing was saved; run it again to start", torchrun=True)

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import data
import lora
import memplan
import mra
import release
import runs
from convnext import ConvNeXtConfig
from int8 import int8_linears
from llama import LlamaConfig, RMSNorm
from tokenizer import Tokenizer
from vit import ViTConfig
from weights import available_memory, fingerprint, read_config

# -----------------------------------------------------------------------------
# settings: the release's recipe per stage; a flag overrides

# micro: the release's per-GPU batch (8 GPUs; stage 2 accumulates 2), over which each loss is a token mean
STAGE = {1: dict(template="plain", image_size=384, image_aspect_ratio="crop", lr=1e-3, global_batch=256, micro=32),
         2: dict(template="vicuna_v1", image_size=1024, image_aspect_ratio="pad", lr=2e-5, global_batch=128, micro=8)}
# random towers small enough for a CPU test: R 64 -> 2x2 ConvNeXt map, ViT 28 px -> 2x2 grid
TINY = mra.MRAConfig(vit_min_size=28,
                     vit=ViTConfig(image_size=28, patch_size=14, width=32, layers=4, heads=2, mlp_dim=64),
                     convnext=ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)),
                     llm=LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_seq_len=512))
TINY_SIZE = {1: 64, 2: 128}


def world_size(text):  # --dry-run's WORLD; the flag alone (const 0) means this run's
    if not (text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"WORLD must be a whole number >= 1, not {text!r}")
    return int(text)


def one_line_errors(kind, err, tb):
    """sys.excepthook: what a user can fix (bad data, a bad checkpoint, a missing file, a full disk, the
    memory running out) is one line, not a traceback (--debug shows it)."""
    if issubclass(kind, KeyboardInterrupt):  # at any time: the run's paths are known as soon as the flags are read
        if globals().get("replacing"):
            line = f"interrupted before the first step: {args.out} holds the run --overwrite was to replace, as it was"
        else:  # ckpt_dir None before the flags are read, and under --dry-run
            line = runs.interrupted(globals().get("ckpt_dir"), globals().get("log_path"))
        return failures.say_interrupted(kind, line, tqdm.write)
    if issubclass(kind, (RuntimeError, MemoryError)):
        a = globals().get("args")  # the flags that would need less memory, of those not given
        ways = ["a smaller --batch-size"] + ([] if a and a.grad_checkpoint else ["--grad-checkpoint"])
        ways += ["--fsdp"] if globals().get("distributed") and a and not a.fsdp else []  # (one process: no shards)
        if failure := failures.machine_failure(err, ways, globals().get("distributed")):
            source, what, cause = failure
            if source == "peer" and rank:  # a collective lost its other end: the rank that ended says why
                return
            if "replacing" not in globals():  # the model loads: nothing in --out has changed yet
                line = (f"error: {what} before the first step; once the cause is fixed ({cause}), run the same "
                        f"command again")
            else:
                where = f"step {step + 1}: " if "step" in globals() else ""  # the training loop's
                line = f"error: {where}{what}; {way_on(cause)}"
            return tqdm.write(line, file=sys.stderr)
    if not issubclass(kind, (ValueError, OSError)):
        return sys.__excepthook__(kind, err, tb)
    tqdm.write("error: " + failures.said(err), file=sys.stderr)  # below any bar


if __name__ == "__main__" and any(a.split("=")[0] == "--preset" for a in sys.argv):  # the CPU demo lives in demo.py
    if "--debug" not in sys.argv:
        sys.excepthook = one_line_errors
    import demo
    demo.run(sys.argv[1:])
    sys.exit()

p = failures.Parser(description=__doc__.split("\n")[0],
                    epilog="The CPU demo (demo.py): python train.py --preset demo; its own flags: --preset demo --help")
p.add_argument("--stage", type=int, choices=(1, 2), required=True,
               help="1: projector (and fusion) on caption pairs; 2: instruction tuning with the MR-Adapters")
p.add_argument("--data", help="LLaVA json / jsonl (required unless --dry-run)")
p.add_argument("--image-folder", default="", help="the records' image paths are under it")
p.add_argument("--out", help="run directory (required unless --dry-run)")
p.add_argument("--llm", help="HF LLaMA / Vicuna directory")
p.add_argument("--vit", help="HF CLIP ViT checkpoint (file or directory)")
p.add_argument("--convnext", help="timm / open_clip ConvNeXt safetensors")
p.add_argument("--init", help="start from our checkpoint (train.py's; a LoRA release merged by release.py "
               "merge-lora) or a released LLaVA-HR / LLaVA-1.5 directory")
p.add_argument("--projector", help="stage 2: the released stage-1 projector file")
p.add_argument("--tokenizer", help="default: tokenizer.model of --llm / --init")
p.add_argument("--config", default="full",
               help="'full' (LLaVA-HR-7B), 'tiny', or a json of MRAConfig (with --init, unused: its model stands)")
p.add_argument("--image-size", type=int, help="R (default 384 / 1024 in stage 1 / 2; LLaVA-1.5: its ViT's 336; "
                                               "--init: the model's own, but LLaVA-HR's stage 1 -> 2: 1024)")
p.add_argument("--gate", choices=("tanh", "sigmoid", "none"),
               help="MR-Adapter gate (default tanh, as released)")
p.add_argument("--adapters", action=argparse.BooleanOptionalAction,
               help="MR-Adapters (default: in stage 2 only); --no-adapters is the fusion-only ablation")
p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3 / 2e-5; LoRA 2e-4)")
p.add_argument("--adapter-lr-scale", type=float, default=1.0, help="MR-Adapters' lr / --lr (release 1; demo 0.1)")
p.add_argument("--tower-lr-scale", type=float, default=1.0, help="ViT and ConvNeXt lr / --lr (release 1; demo 0.1)")
p.add_argument("--warmup-ratio", type=float, default=0.03, help="linear warm-up, then cosine (default 0.03)")
p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's, not on biases and norms (default 0)")
p.add_argument("--grad-clip", type=float, default=0.0,
               help="max gradient norm; default 0: none, as released (its ZeRO configs set no gradient_clipping, "
                    "so DeepSpeed never applies HF's max_grad_norm 1.0)")
p.add_argument("--epochs", type=int, default=1, help="default 1")
p.add_argument("--global-batch", type=int, help="default 256 / 128")
p.add_argument("--batch-size", type=int, help="per device, per micro-step (default 32 / 8, as released)")
p.add_argument("--max-len", type=int, help="default 2048 / 2496 tokens (LLaVA-1.5: 2048), <image> counted as one")
p.add_argument("--max-steps", type=int, help="stop early; the schedule still spans --epochs")
p.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (default 500; 0: at the end only)")
p.add_argument("--no-save", action="store_true", help="write no checkpoint, not even the last (benchmarks)")
p.add_argument("--seed", type=int, default=42, help="default 42")
p.add_argument("--grad-checkpoint", action="store_true", help="recompute each block in backward: less memory")
p.add_argument("--lean-malloc", action="store_true", help="CPU: return freed activations to the system at once "
               "(glibc): ~2 GB less at R = 1024, 9-18%% slower steps there, far slower for small models")
p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard per block) instead of DDP")
p.add_argument("--freeze-vision", action="store_true", help="stage 2: keep both towers fixed")
p.add_argument("--freeze-llm", action="store_true", help="stage 2: keep the LLM fixed")
p.add_argument("--lora-r", type=int, help="stage 2 with LoRA of this rank on the LLM (LLaVA-1.5's: 128); needs --init")
p.add_argument("--lora-alpha", type=float, help="LoRA scale alpha / r (default 2 r, LLaVA-1.5's: 256)")
p.add_argument("--lora-dropout", type=float, help="on the input of the low-rank path (default 0.05, LLaVA-1.5's)")
p.add_argument("--lora-train-mra", action=argparse.BooleanOptionalAction,
               help="with LoRA, also train the MR-Adapters and the fusion at full rank (as LLaVA-HR does)")
p.add_argument("--lora-adapters-only", action="store_true",
               help="checkpoints hold only OUT/ckpt/lora (small), not the merged model as well")
p.add_argument("--quantize", choices=["int8"], help="with --lora-r: the frozen LLM's linears in int8 (QLoRA-style, "
               "a scale per row); checkpoints hold the adapters only: generate.py --model INIT --lora OUT/ckpt/lora")
p.add_argument("--projector-lr-scale", type=float, help="projector's lr / --lr (default 1; LoRA 0.1, as LLaVA-1.5)")
p.add_argument("--group-by-modality-length", "--group-by-length", dest="group_by_length",
               action=argparse.BooleanOptionalAction,  # LLaVA's name; --group-by-length, its first name here, still works
               help="global batches of one modality, lengths mixed at random, as LLaVA's group_by_modality_length "
                    "(default: on in stage 2)")
p.add_argument("--skip-bad", action="store_true", help="skip bad records (counted) instead of stopping")
p.add_argument("--workers", type=int, default=4, help="DataLoader workers (default 4)")
p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt")
p.add_argument("--overwrite", action="store_true", help="start over in an OUT that holds a run (deletes it)")
p.add_argument("--device", choices=("cuda", "cpu"),
               help="default: cuda (bf16 autocast, NCCL) where a GPU is visible, else cpu (fp32, gloo)")
p.add_argument("--debug", action="store_true", help="full tracebacks instead of one-line errors")
p.add_argument("--dry-run", type=world_size, nargs="?", const=0, metavar="WORLD",
               help="print the memory plan per device for WORLD processes (default: this run's) and exit, for "
                    "the model --resume continues, or from --init or --llm (else --config's); no weights or data "
                    "are read")
args = p.parse_args()
if not args.debug:
    sys.excepthook = one_line_errors
recipe = STAGE[args.stage]
# a flag left out (None) takes the default; one given as 0 is refused, never read as left out
limits = {"--batch-size >= 1": args.batch_size is None or args.batch_size >= 1, "--epochs >= 1": args.epochs >= 1,
          "--global-batch >= 1": args.global_batch is None or args.global_batch >= 1,
          "--image-size >= 32": args.image_size is None or args.image_size >= 32,
          "--max-len >= 1": args.max_len is None or args.max_len >= 1,
          "--max-steps >= 1": args.max_steps is None or args.max_steps >= 1,
          "--save-every >= 0": args.save_every >= 0, "--workers >= 0": args.workers >= 0,
          "0 <= --seed < 2**32": 0 <= args.seed < 2**32,  # torch's generators take 64 bits; epoch_order scales it
          "--lr > 0": args.lr is None or 0 < args.lr < math.inf, "0 <= --warmup-ratio <= 1": 0 <= args.warmup_ratio <= 1,
          "--grad-clip >= 0": 0 <= args.grad_clip < math.inf, "--weight-decay >= 0": 0 <= args.weight_decay < math.inf,
          "lr scales >= 0": all(0 <= s < math.inf for s in (args.adapter_lr_scale, args.tower_lr_scale,
                                                             args.projector_lr_scale or 0)),
          "--lora-r >= 1": args.lora_r is None or args.lora_r >= 1,
          "--lora-alpha > 0": args.lora_alpha is None or 0 < args.lora_alpha < math.inf,
          "0 <= --lora-dropout < 1": args.lora_dropout is None or 0 <= args.lora_dropout < 1}
bad = [rule for rule, ok in limits.items() if not ok]  # NaN fails every comparison, so it lands here too
if bad:
    p.error("need " + ", ".join(bad))
if args.dry_run is None and not (args.data and args.out):
    p.error("--data and --out are required (unless --dry-run)")
ckpt_dir, log_path = (os.path.join(args.out, "ckpt"), os.path.join(args.out, "log.jsonl")) if args.out else (None, None)
if args.resume and args.overwrite:
    p.error("--resume continues the run in --out, --overwrite deletes it: pick one")
if args.lora_r and not (args.stage == 2 and (args.init or args.dry_run is not None)):  # a plan: --config's
    p.error("--lora-r adapts a trained model in stage 2: --stage 2 and --init CHECKPOINT (a released LLaVA-HR or "
            "LLaVA-1.5 dir, a train.py checkpoint, or a LoRA release merged by release.py merge-lora) are needed")
lora_flags = [f for f, v in (("--lora-alpha", args.lora_alpha), ("--lora-dropout", args.lora_dropout),
                              ("--[no-]lora-train-mra", args.lora_train_mra),
                              ("--lora-adapters-only", args.lora_adapters_only or None)) if v is not None]
if lora_flags and not args.lora_r:  # else a full fine-tune would run, the flags silently unused
    p.error(f"{', '.join(lora_flags)} set LoRA up: it needs --lora-r (the rank; LLaVA-1.5's is 128)")
if args.quantize and not args.lora_r:
    p.error("--quantize int8 freezes the LLM's weights in int8, where only LoRA can learn: it needs --lora-r")
if args.device == "cuda" and not torch.cuda.is_available():
    p.error("--device cuda: no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES and the driver)")
parts = [f for f, v in (("--llm", args.llm), ("--vit", args.vit), ("--convnext", args.convnext),
                         ("--projector", args.projector)) if v]
if args.init and parts:  # else they would be silently unused
    p.error(f"--init gives the whole model, so {', '.join(parts)} would go unused: drop one or the other")
if args.lora_r and (args.freeze_llm or args.freeze_vision):
    p.error("--freeze-llm / --freeze-vision with --lora-r: LoRA already leaves every base weight frozen (it trains "
            "low-rank updates on the LLM, the projector and, with --lora-train-mra, the MR-Adapters): drop them")
if args.quantize and args.fsdp:
    p.error("--quantize int8 with --fsdp: FSDP2 would not shard the int8 weights (buffers); use DDP or one GPU")
args.batch_size = args.batch_size or recipe["micro"]
args.lora_dropout = 0.05 if args.lora_dropout is None else args.lora_dropout
args.lora_train_mra = args.lora_train_mra is not False
lora_alpha = args.lora_alpha or 2 * (args.lora_r or 0)
# defaults that depend on the run, resolved: a saved run (and --resume's report of a change) holds the value in effect
DEFAULTS = dict(lr=2e-4 if args.lora_r else recipe["lr"],  # LoRA: LLaVA-1.5's finetune_lora lr
                projector_lr_scale=0.1 if args.lora_r else 1.0)  # LoRA: LLaVA-1.5's mm_projector_lr 2e-5 / lr 2e-4
for k, v in DEFAULTS.items():
    if getattr(args, k) is None:
        setattr(args, k, v)
gate_given, args.gate = args.gate is not None, args.gate or "tanh"

# -----------------------------------------------------------------------------
# processes and devices: torchrun sets RANK; a plain `python train.py` is one process

distributed = "RANK" in os.environ
cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
rank, world, local_rank = 0, 1, 0
if distributed:
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda and local_rank >= torch.cuda.device_count():
        raise SystemExit(f"error: process {local_rank} of this node has no GPU of its own: {torch.cuda.device_count()} "
                         f"visible; start at most that many (torchrun --nproc_per_node), or --device cpu")
    # rank 0 alone writes a checkpoint (tens of GB at 7B) while the others wait: NCCL's 10 minutes is tight
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=1))
    rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
else:
    torch.set_flush_denormal(True)  # CPU: subnormal floats (late in tiny test runs) are ~100x slower
    if args.lean_malloc:
        memplan.fixed_malloc_threshold()
runtime = 0 if cuda else memplan.resident_bytes()  # the CPU plan adds what the process holds before any model
master = rank == 0


def leave(message=None, own=False):
    """The run ends: `message` is an error (exit status 1); `own`: this rank's alone (a record it read),
    said by this rank, where an error every rank shares is said by rank 0. Under torchrun the process
    group is destroyed and the process ends here, its output flushed: the group's C++ threads (gloo's
    workers) outlive destroy_process_group, and Python's shutdown with them alive once aborted a rank of a
    complete run ("terminate called without an active exception", SIGABRT), which torchrun reports as a
    failed run."""
    if not distributed:
        raise SystemExit(message)
    dist.destroy_process_group()
    if message and (master or own):
        print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if message else 0)

torch.manual_seed(args.seed)  # the same initial weights (new adapters, projector) on every rank
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
global_batch = args.global_batch or recipe["global_batch"]
accum, rem = divmod(global_batch, args.batch_size * world)
if rem or not accum:
    raise SystemExit(f"error: --global-batch {global_batch} is not a multiple of --batch-size {args.batch_size} "
                     f"x {world} processes")

# -----------------------------------------------------------------------------
# the model's configuration, and what trains

if args.config in ("tiny", "full"):
    cfg = TINY if args.config == "tiny" else mra.MRAConfig()
elif os.path.isfile(args.config):
    cfg = read_config(args.config, mra.MRAConfig.from_dict)
else:
    raise SystemExit(f"error: --config {args.config}: neither 'full', 'tiny' nor an MRAConfig json file")
# R: LLaVA-HR's recipe; LLaVA-1.5 reads the image at its ViT's own size (336) in both stages
image_size = args.image_size or (TINY_SIZE[args.stage] if args.config == "tiny" else
                                 cfg.vit.image_size if cfg.arch == "llava-1.5" else recipe["image_size"])
adapters = args.adapters if args.adapters is not None else args.stage == 2
stage_cfg = dict(adapters=adapters, image_size=image_size, gate=args.gate, image_aspect_ratio=recipe["image_aspect_ratio"])


def trains(name):
    """Stage 1 trains the projector and (release, not paper) the final fusion; stage 2 all (unless frozen)."""
    if name.startswith("encoder.vit.ln_post."):  # feeds only CLIP's pooled class token, which LLaVA never uses
        return False
    if args.stage == 1:
        return name.startswith(("projector.", "encoder.fusion."))
    if args.lora_r:  # the low-rank updates, the projector, and (as LLaVA-HR) the MR-Adapters and fusion
        return ".lora_" in name or name.startswith("projector.") or (
            args.lora_train_mra and name.startswith(("encoder.adapters.", "encoder.fusion.")))
    return not (args.freeze_vision and name.startswith(("encoder.vit.", "encoder.convnext."))
                or args.freeze_llm and name.startswith("llm."))


def checkpoint_blocks(model):
    """Recompute each block in backward; the ConvNeXt's too, per block as the release does (timm's
    checkpoint_seq): at R = 1024 its maps (stage 3: 27 blocks of 64 x 64 x 768) outweigh the rest, and
    recomputing a whole stage would rebuild all its blocks' activations at once."""
    convnext = getattr(model.encoder, "convnext", None)
    conv_blocks = [b for stage in convnext.stages for b in stage.blocks] if convnext else []
    for block in [*model.llm.layers, *model.encoder.vit.blocks, *conv_blocks]:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)
    return model


def shard_lean(model, units, mp, device, rank, world):
    """FSDP2 (ZeRO-3) with a lean start. The loaded model holds views of its memory-mapped checkpoint
    (unread) and random tensors every rank drew alike from one seed (new adapters, a test model); emptied
    to meta and sharded, each rank copies in only its rows of each parameter, so reads only their pages:
    host memory per rank stays near 1/world of the model. Buffers are copied whole."""
    # detached: emptying the module below must not empty the tensors it was loaded with
    source = {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    model.to_empty(device="meta").float()  # fp32 master weights (released checkpoints are fp16)
    for unit in units:
        fully_shard(unit, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            full = source.pop(name)
            if isinstance(t, DTensor):  # FSDP2's Shard(0): this rank's rows of dim 0
                full, t = full[slice(*runs.rows_of(full.shape[0], world, rank))], t.to_local()
            assert full.shape == t.shape, (name, full.shape, t.shape)
            t.copy_(full)  # casts to fp32


def with_adapters(m1, cfg, source):
    """Stage 1 -> 2: the same model with new MR-Adapters (identity at init); every other tensor must load."""
    m2 = mra.LlavaHR(cfg, llm=m1.llm, vit=m1.encoder.vit, convnext=getattr(m1.encoder, "convnext", None))
    missing, unexpected = m2.load_state_dict(m1.state_dict(), strict=False)
    bad = unexpected + [k for k in missing if not k.startswith("encoder.adapters.")]
    if bad:
        raise SystemExit(f"error: {source}: does not fit the stage-2 model: {bad[:6]}")
    return m2


def max_len_within(cfg):
    """The samples' length cap (--max-len, <image> counted as one): one with an image must fit the LLM's
    context once the placeholder becomes the visual tokens. A default beyond it is lowered to fit; a
    --max-len given beyond it is refused now, not at the first long sample, hours in."""
    fits = cfg.llm.max_seq_len - cfg.visual_tokens + 1
    if args.max_len and args.max_len > fits:
        raise SystemExit(f"error: --max-len {args.max_len}: a sample with an image would take {args.max_len - 1} "
                         f"text + {cfg.visual_tokens} visual positions, over the LLM's context of "
                         f"{cfg.llm.max_seq_len}; --max-len {fits} at most")
    default = 2048 if cfg.arch == "llava-1.5" else data.MAX_LEN[recipe["template"]]  # LLaVA-1.5's, both stages
    return min(args.max_len or default, fits)


def plan(cfg, world, bf16):
    def build(c):  # the model as the run will hold it
        model = mra.LlavaHR(c)
        if args.quantize:
            int8_linears(model.llm)
        if args.lora_r:
            model = lora.add_lora(model, args.lora_r, lora_alpha, args.lora_dropout)
            if bf16 and not (args.fsdp and world > 1):
                lora.bf16_bases(model)
        return checkpoint_blocks(model) if args.grad_checkpoint else model
    mem = memplan.memory_plan(build, cfg, trains, world, args.fsdp and world > 1, args.batch_size,
                              max_len_within(cfg), args.grad_checkpoint, bf16)
    mem["runtime"] = 0 if bf16 else runtime  # a plan for this CPU: the process itself shares its memory
    return mem


def from_init(held):
    """The config a run from --init trains: --init's own, at its own R (--image-size another), except
    LLaVA-HR's stage 1 -> 2 (a model without MR-Adapters into stage 2): the stage's, R rising by design
    (stage 1 --adapters adds them too, R kept)."""
    if held.adapters and args.adapters is False:
        raise SystemExit(f"error: --no-adapters: --init {args.init} has MR-Adapters; the fusion-only ablation starts "
                         f"from a model without them (a stage-1 checkpoint)")
    if held.adapters and gate_given and args.gate != held.gate:
        raise SystemExit(f"error: --gate {args.gate}: --init {args.init} has MR-Adapters with the {held.gate} gate, "
                         f"which it keeps; a new gate needs new adapters (--init a stage-1 checkpoint)")
    own = args.image_size or held.image_size
    if held.arch == "llava-hr" and not held.adapters and (args.stage == 2 or adapters):
        # stage 2 adds them (or, --no-adapters, not) at the stage's R; stage 1 --adapters adds them at --init's
        return replace(held, **stage_cfg | dict(image_size=image_size if args.stage == 2 else own))
    if held.adapters and not adapters and master:  # stage 1 from a model that has them (a stage-2 one)
        print(f"note: --init {args.init} has MR-Adapters: they stay in the model, frozen (stage 1 trains the "
              f"projector and the fusion)", flush=True)
    return replace(held, image_size=own, image_aspect_ratio=recipe["image_aspect_ratio"])


for flag, path in (("--init", args.init), ("--llm", args.llm)):
    if path and not os.path.isdir(path):
        raise SystemExit(f"error: {flag} {path}: no such directory (a checkpoint directory is expected)")
for flag, path, what in (("--vit", args.vit, "an HF CLIP checkpoint"), ("--convnext", args.convnext, "a timm or "
                         "open_clip ConvNeXt checkpoint"), ("--projector", args.projector, "the released stage-1 "
                         "mm_projector.bin")):  # else found after the LLM loaded (minutes for a 7B)
    if path and not os.path.exists(path):
        raise SystemExit(f"error: {flag} {path}: no such file or directory ({what} is expected)")
if args.init:
    mra.run_directory(args.init)  # a run's OUT given for its OUT/ckpt: say so
    mra.lora_adapters(args.init)  # OUT/ckpt/lora given for a model
    if only := mra.adapters_only(args.init):  # a --lora-adapters-only (or --quantize) run's ckpt
        base = mra.lora_base(only)
        raise SystemExit(f"error: --init {args.init}: holds LoRA adapters only, no model: start from their base "
                         f"(--init {base}), or apply them with generate.py --model {base} --lora {only}")
if args.dry_run is not None:  # a plan for GPUs (bf16) when given a world size, else for this machine
    # the model the run would build, on the meta device: shapes from the files' headers, no weight read
    held = args.resume and args.out and runs.last_checkpoint(ckpt_dir)
    if args.resume and not held:
        raise SystemExit("error: --resume --dry-run: " + (f"no checkpoint in {args.out} to plan for" if args.out else
                                                           "--out names the run to plan for"))
    if held and not os.path.isdir(os.path.join(held, "lora")):  # a LoRA run's model is --init's, as below
        planned = mra.load_checkpoint(held, device="meta").cfg  # the run's, as saved
    else:
        planned = (from_init(mra.load_checkpoint(args.init, device="meta").cfg) if args.init else
                   mra.build(replace(cfg, **stage_cfg), args.llm, args.vit, args.convnext, device="meta").cfg)
    if master:  # under torchrun, once
        memplan.print_plan(plan(planned, args.dry_run or world, bf16=cuda or args.dry_run > 0))  # 0: no WORLD given
    leave()

# -----------------------------------------------------------------------------
# the run directory: never overwritten unasked; an --out that holds a run is resumed or refused
runs.check_out(args.out, args.resume)
if master and (os.path.isdir(args.out) or not args.resume):  # else --resume finds no run: refused below
    run_lock = runs.claim_out(args.out)
    if args.resume:
        runs.finish_cut_save(args.out, ckpt_dir)
if distributed:
    dist.barrier()  # rank 0 has made --out, taken its lock and finished a save before any rank looks into it
resume_dir = runs.previous_run(args.out, ckpt_dir, log_path, args.resume, args.overwrite)
if args.overwrite:
    runs.check_overwrite(args.out, ckpt_dir, log_path, {flag: getattr(args, flag) for flag in (
        "init", "llm", "vit", "convnext", "projector", "tokenizer", "data", "image_folder")})

# -----------------------------------------------------------------------------
# data: checked before the model loads (minutes for a 7B), so a bad file fails at once

# a LoRA run's frozen base, as read at the start: a resume must find the same weights, wherever they lie
init_digest = fingerprint(args.init) if args.lora_r else None
start_dir = resume_dir if args.resume else args.init or args.llm  # the weights the run starts from
if not (args.tokenizer or start_dir):
    raise SystemExit("error: nothing to start from: --llm (with --vit and --convnext) or --init gives the weights and "
                     "the tokenizer; to train from random weights, pass --tokenizer")
tok_path = args.tokenizer or os.path.join(start_dir, "tokenizer.model")
if not os.path.isfile(tok_path):
    raise SystemExit(f"error: --tokenizer {tok_path}: no such file" if args.tokenizer else f"error: {start_dir}: no "
                     f"tokenizer.model beside the weights: pass --tokenizer (the LLM's tokenizer.model)")
if not os.path.isfile(args.data):
    raise SystemExit(f"error: --data {args.data}: no such file (a LLaVA json or jsonl file of conversations is "
                     f"expected)")
if args.image_folder and not os.path.isdir(args.image_folder):
    raise SystemExit(f"error: --image-folder {args.image_folder}: no such directory (the records' image paths are "
                     f"under it)")
tok = Tokenizer(tok_path)
with open(tok_path, "rb") as f:  # copied into each checkpoint: a resume from ckpt.old deletes it at its first save
    tok_bytes = f.read()
# the token ids the run trains on: a resume must find the same tokenizer, wherever it lies
tokenizer = dict(tokenizer_sha256=hashlib.sha256(tok_bytes).hexdigest(), tokenizer_legacy=tok.legacy)
ds = data.LlavaDataset(args.data, args.image_folder, tok, recipe["template"], image_size,
                       recipe["image_aspect_ratio"], args.max_len, skip_bad=args.skip_bad)
by_modality = args.group_by_length if args.group_by_length is not None else args.stage == 2
# the records the run trains on (--skip-bad leaves the bad ones out): a resume must find the same
usable = dict(records=len(ds), bad_sha256=hashlib.sha256(json.dumps(ds.bad_index).encode()).hexdigest())
if args.fsdp and not by_modality and not all(ds.has_image):
    # FSDP gathers a block's shards when it runs: every rank must run the same modules
    raise SystemExit("error: --fsdp with text-only samples needs --group-by-modality-length (one modality per "
                     "micro-step)")

# -----------------------------------------------------------------------------
# the model

if args.resume and os.path.isdir(os.path.join(resume_dir, "lora")):  # the frozen base is --init's, as it was
    if not args.lora_r:
        raise SystemExit(f"error: --resume: {resume_dir} holds a LoRA run: the run's --lora-r and --init, please")
    model = lora.load(args.init, os.path.join(resume_dir, "lora"), merged=False, dropout=args.lora_dropout,
                      quantize=args.quantize, own_base=False)  # the base: runs.check_resume's init_digest
elif args.resume:
    model = mra.load_checkpoint(resume_dir)  # every weight, frozen ones included
elif args.init:
    model = mra.load_checkpoint(args.init, quantize=args.quantize)
    run_cfg = from_init(model.cfg)
    if run_cfg.adapters != model.cfg.adapters:  # stage 1 -> 2: add MRA
        model = with_adapters(model, run_cfg, f"--init {args.init}")
    else:
        model.cfg = run_cfg
else:
    if args.config == "full" and not (args.llm and args.vit and (args.convnext or cfg.arch != "llava-hr")):
        raise SystemExit("error: --llm, --vit and --convnext are needed (or --init, or --config tiny for a test)")
    model = mra.build(replace(cfg, **stage_cfg), llm=args.llm, vit=args.vit, convnext=args.convnext)
    if args.projector:  # stage 2 from the released stage-1 file (projector + final fusion)
        release.load_projector(model, args.projector)
if args.lora_r and not args.resume:
    lora.add_lora(model, args.lora_r, lora_alpha, args.lora_dropout)  # B = 0: still exactly the --init model
# the frozen base's values as loaded (not its bf16 copy below): lora.json records it, and generate.py --lora
# refuses another base with it
base_digest = lora.base_digest(model.state_dict()) if args.lora_r else None
lean = args.fsdp and distributed  # the model stays as loaded (mapped, unread) until shard_lean
sharded = lean and not args.lora_r  # saved without gathering (runs.save_shards); LoRA's merge gathers on rank 0
if not lean:  # fp32 master weights (released and HF checkpoints are fp16/bf16); bf16 comes from autocast
    model.to(device, torch.float32)
    if not cuda:
        # safetensors' tensors are views into the file's buffer, where CPU kernels round differently in
        # the last bit (observed): fresh copies keep a resumed run bit for bit on the uninterrupted one
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    elif args.lora_r:
        lora.bf16_bases(model)  # on GPUs, not FSDP across processes (which wants one dtype)
cfg = model.cfg
ds.image_size = cfg.image_size  # a resumed run keeps its checkpoint's R
ds.max_len = max_len_within(cfg)
if tok.vocab_size > cfg.llm.vocab_size:
    raise SystemExit(f"error: {tok_path}: {tok.vocab_size} pieces, but the LLM has only {cfg.llm.vocab_size} "
                     f"embeddings: the tokenizer does not belong to this model (--tokenizer)")

for name, param in model.named_parameters():
    param.requires_grad_(trains(name))
del param  # a global: it would keep the last tensor as loaded, and with it the whole mapped file
unwrapped = model  # the module itself: DDP wraps it below, fully_shard changes it in place
n_train = sum(q.numel() for q in model.parameters() if q.requires_grad)
n_all = sum(q.numel() for q in model.parameters()) + sum(b.numel() for b in model.buffers() if b.dtype == torch.int8)
trainable = {n for n, q in model.named_parameters() if q.requires_grad}

if args.grad_checkpoint:
    checkpoint_blocks(model)
if lean:
    # ZeRO-3: a unit (memplan.fsdp_units: a block, a ConvNeXt stage, the LLM's embedding and head) is
    # gathered just before it runs and freed after; the root (adapters, projector, norms) stays whole. GPUs:
    # bf16 gathers, fp32 gradient reduction and fp32 AdamW shards, as the release's ZeRO-3.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else MixedPrecisionPolicy()
    shard_lean(model, memplan.fsdp_units(model), mp, device, rank, world)
    held = sum(q.to_local().nbytes for q in model.parameters())
    print(f"rank {rank}: {held / 2**20:.1f} MiB of parameters held, {held / (4 * n_all):.2f} of the model")
elif distributed:
    # text-only micro-batches leave the vision side unused: DDP must be told it may happen.
    # An int8 base's weights are buffers, identical on every rank: not broadcast every step (by the flag's
    # newer name where torch has it: the old one then works, with a warning on every rank)
    flag = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    model = DDP(model, device_ids=[local_rank] if cuda else None, find_unused_parameters=True,
                **({flag: False} if args.quantize else {}))
    # a depthwise convolution's weight gradient (ConvNeXt, MR-Adapter) may come with another stride on its
    # size-1 dimension, the same layout; DDP copies it into its bucket, and would warn of it on every rank
    warnings.filterwarnings("ignore", "Grad strides do not match bucket view strides")

params = [q for q in model.parameters() if q.requires_grad]
# per lr scale, weights with --weight-decay, then biases and norm weights without (HF Trainer's rule, as LLaVA)
scales = (1.0, args.adapter_lr_scale, args.tower_lr_scale, args.projector_lr_scale)
lr_groups = [dict(params=[], scale=s, weight_decay=wd) for s in scales for wd in (args.weight_decay, 0.0)]
norms = {q for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, RMSNorm)) for q in m.parameters()}
for name, q in model.named_parameters():  # names may carry DDP's "module." prefix
    name = f".{name}"
    tower = ".encoder.vit." in name or ".encoder.convnext." in name
    if q.requires_grad:
        k = 1 if ".adapters." in name else 2 if tower else 3 if ".projector." in name else 0  # index into scales
        lr_groups[2 * k + bool(args.weight_decay and (name.endswith(".bias") or q in norms))]["params"].append(q)
opt = torch.optim.AdamW([g for g in lr_groups if g["params"]], lr=0.0, betas=(0.9, 0.999), eps=1e-8)

# the data position carries over only if these stay as the run had them, and a LoRA run's model (its
# scale, rank and frozen base) is the one its adapters were trained in: --resume refuses a change
# (--epochs may change: an epoch's order depends on the seed and its number alone; the cosine's length changes)
fixed = dict(global_batch=global_batch, seed=args.seed, stage=args.stage, group_by_length=by_modality,
             lora_r=args.lora_r, quantize=args.quantize, lora_alpha=lora_alpha if args.lora_r else None)
MODEL_FIXED = {"lora_r", "quantize", "lora_alpha"}
# flags --resume does not list when they change: where and how the run goes on, and the ones above
RESUME_FREE = {"resume", "overwrite", "debug", "dry_run", "out", "workers", "max_steps", "save_every", "no_save",
               "data", "init", *fixed}

start_step, skipped = 0, 0  # skipped: samples --skip-bad replaced as they loaded, so far
if args.resume:
    state, run = runs.read_state(resume_dir)
    runs.check_resume(run, resume_dir, args, ds, tok_path, fixed=fixed, model_fixed=MODEL_FIXED,
                      tokenizer=tokenizer, usable=usable, init_digest=init_digest)
    changed = runs.changed_flags(run, vars(args), RESUME_FREE, fixed, DEFAULTS)
    if changed and master:  # allowed (a lower lr after a spike, say), but no longer the run it was
        print(f"--resume with settings other than the run's: {', '.join(changed)}; the model's shape and config "
              f"come from the checkpoint, the rest applies from here on")
    # a parameter without Adam state (older runs skipped the vision side after text-only batches) starts
    # fresh: strict=False, as AdamW would at its first gradient. The same ones must train.
    runs.check_trained(state, trainable, args.lora_r)
    runs.load_optimizer(unwrapped, opt, state, resume_dir, rank, world)
    start_step, skipped = state["step"], state.get("skipped", 0)  # (runs saved before it was kept: 0)

sampler = data.BatchSampler(ds, args.batch_size, accum, world, rank, args.seed, args.epochs, by_modality, start_step)
loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=args.workers, pin_memory=cuda,
                                     collate_fn=partial(data.collate, pad_id=tok.pad_id))
total_steps = sampler.total_steps
stop_step = min(total_steps, args.max_steps) if args.max_steps else total_steps
if start_step >= stop_step:  # resumed at or past where this run stops: it is done as it is
    if master:
        flag, why = (("--max-steps", f"--max-steps {args.max_steps}") if stop_step < total_steps else
                     ("--epochs", f"{args.epochs} epoch(s)"))
        print(f"nothing to train: the checkpoint is at step {start_step}, and this run ends at step {stop_step} "
              f"({why}); a larger {flag} goes on")
    leave()
warmup = math.ceil(args.warmup_ratio * total_steps)


def get_lr(step):
    """HF's cosine schedule with linear warmup, as LLaVA trains (step 0 has lr 0)."""
    if step < warmup:
        return args.lr * step / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def way_on(cause):
    """The way on, in words, from a run stopped by an error: the last checkpoint is as it was."""
    if replacing:
        return (f"{args.out} holds the run --overwrite was to replace, as it was (it goes after the first step); "
                f"once the cause is fixed ({cause}), run the same command again")
    return (f"the last checkpoint {ckpt_dir} is untouched; once the cause is fixed ({cause}), --resume continues "
            f"from it" if os.path.isdir(ckpt_dir) else
            f"no checkpoint kept; once the cause is fixed ({cause}), --overwrite starts over")


@contextmanager
def save_errors(step, tmp):
    """A failed write stops the run in one line; the last good checkpoint stays as it was."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 -- a full disk shows as OSError, RuntimeError or SafetensorError
        if master:
            shutil.rmtree(tmp, ignore_errors=True)
        bar.close()
        why = (str(e).splitlines() or [type(e).__name__])[0]
        if "inline_container" in why or "PytorchStreamWriter" in why:  # torch.save's words for a file cut short
            why = "a file could not be written in full"
        # the memory runs out here gathering --fsdp's shards, or merging a LoRA run's model in fp32
        failure = failures.machine_failure(e, [], distributed)
        cause = "more free memory" if failure and failure[0] == "memory" else "a full disk?"
        raise SystemExit(f"error: step {step}: saving to {tmp} failed ({why}); {way_on(cause)}") from None


def merged_state(step, adapters):
    """A LoRA run's merged model: --init read again in fp32 + the adapters saved in `adapters`. None
    (the checkpoint holds the adapters alone, said in one line) if --init is no longer the base the
    run read, or cannot be read now: the trained adapters are never lost to it."""
    try:
        if fingerprint(args.init) == init_digest:
            return lora.load(args.init, adapters, torch.float32).state_dict()
        why = f"--init {args.init} has changed since the run read it"
    except (ValueError, OSError) as e:  # CheckpointError: gone, unreadable, too big for the memory free
        why = (str(e).splitlines() or [type(e).__name__])[0]
    tqdm.write(f"step {step}: {ckpt_dir} holds the LoRA adapters alone, not the merged model ({why}); "
               f"generate.py --model BASE --lora {ckpt_dir}/lora applies them to their base", file=sys.stderr)
    return None


def save(step):
    """OUT/ckpt: weights (generate.py loads the dir) + train_state.pt (under --fsdp, AdamW's state
    in one file per rank), replaced atomically."""
    tmp = ckpt_dir + ".tmp"
    if master:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that was killed
    if sharded:
        dist.barrier()  # cleared before any rank writes into it
        with save_errors(step, tmp):
            os.makedirs(tmp, exist_ok=True)
            runs.save_shards(unwrapped, opt, tmp, cfg, rank, world)
        dist.barrier()  # every rank's file is complete before rank 0 renames the directory
        extra = dict(params=json.dumps(sorted(trainable)), world=world)
    else:
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        # with FSDP (LoRA) every rank takes part in gathering the full tensors; rank 0 writes them
        weights = get_model_state_dict(unwrapped, options=full)
        extra = dict(optimizer=get_optimizer_state_dict(unwrapped, opt, options=full))
    # every rank's random state (dropout draws per rank, for its own samples' shapes)
    rng = [torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if cuda else [])
    rngs = [rng] * world
    if distributed:
        dist.all_gather_object(rngs, rng)
    if master:
        # the data file's digest as it was read (at the start), not as it may be now
        run = dict(fixed, **usable, **tokenizer, data=os.path.realpath(args.data), data_sha256=ds.sha256,
                   args=vars(args), init=args.lora_r and os.path.realpath(args.init), init_digest=init_digest)
        # plain types and tensors only: torch.load(weights_only=True) reads it back
        state = dict(step=step, skipped=skipped, rng=rngs, run=json.dumps(run), **extra)
        with save_errors(step, tmp):
            if args.lora_r:  # the adapters alone (resume reads them), and for generate.py the merged model
                adapters = os.path.join(tmp, "lora")
                lora.save_adapters(adapters, lora.adapter_state(weights, trainable), cfg, args.lora_r, lora_alpha,
                                   args.init, base_digest)
                weights = None  # freed: merged anew from --init in fp32 (on GPUs the base held here is bf16)
                if not (args.lora_adapters_only or args.quantize):
                    weights = merged_state(step, adapters)
            if not sharded and weights is not None:
                mra.save_checkpoint(None, tmp, state=weights, cfg=cfg)
            with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
                f.write(tok_bytes)
            with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:  # the mode it tokenised in
                json.dump(dict(legacy=tok.legacy), f)
            runs.write_train_state(tmp, state)  # last: a ckpt.tmp that holds train_state.pt is complete
        runs.replace_checkpoint(args.out, ckpt_dir)
    if distributed:
        dist.barrier()


# -----------------------------------------------------------------------------
# training loop

# --overwrite: the old run goes only once the new one has made a step (bad data found at the first batch, a
# NaN loss, running out of memory: each leaves it as it was); what is no run (a stale ckpt.tmp) goes now
replacing = args.overwrite and runs.holds_run(ckpt_dir, log_path)
if master:
    if args.overwrite and not replacing:
        runs.delete_run(ckpt_dir, log_path)
    if args.resume:  # steps logged after the last save are run again: drop them
        runs.trim_log(log_path, start_step)
    print(f"stage {args.stage}: {n_train / 1e6:.2f}M of {n_all / 1e6:.2f}M parameters train; R={cfg.image_size}, "
          f"{cfg.visual_tokens} visual tokens; {len(ds)} samples, {total_steps} steps of {global_batch} "
          f"({world} x {args.batch_size} x {accum} accumulation); "
          f"{'FSDP2' if args.fsdp and distributed else 'DDP' if distributed else 'one process'}")
    if ds.bad:
        print(f"skipping {len(ds.bad)} bad records, e.g. {ds.bad[0]}")
    the_plan = plan(cfg, world, bf16=cuda)  # the longest sample the stage allows
    memplan.print_plan(the_plan)
    avail = available_memory(device)
    if not cuda and not args.lean_malloc and avail and memplan.plan_peak(the_plan) > avail / 2:
        print(f"the plan needs over half of the {avail / 2**30:.1f} GiB available, and glibc's heap can hold ~20% "
              f"more (bench.py --only ckpt1024): --lean-malloc keeps the peak near the plan, at slower steps")
    if ds.dropped_first:
        print(f"{ds.dropped_first} conversations open with a gpt turn: dropped that turn (as the release does)")
    epoch = sampler.steps_per_epoch * global_batch  # grouped: each modality's last global batch filled up
    if by_modality and (epoch - len(ds)) * 10 > epoch:  # a tenth of each epoch repeats: a small dataset
        print(f"note: an epoch is {epoch} samples for {len(ds)} records: each modality's last global batch of "
              f"{global_batch} is filled up with repeats of its own records; a smaller --global-batch repeats fewer")
log = open(log_path, "a") if master and not replacing else None
bar = tqdm(total=stop_step, initial=start_step, disable=not master, desc=f"stage {args.stage}", dynamic_ncols=True)
batches = iter(loader)  # draws a seed from the global RNG: the saved state goes back only after it
if args.resume:  # dropout (LoRA's) then draws the masks the uninterrupted run drew
    # this rank's state (older checkpoints kept rank 0's alone; another number of ranks takes rank 0's)
    rngs = state.get("rng") or [[state["cpu_rng"]] + ([state["cuda_rng"]] if "cuda_rng" in state else [])]
    rng = rngs[rank if len(rngs) == world else 0]
    torch.set_rng_state(rng[0])
    if cuda and len(rng) > 1:
        torch.cuda.set_rng_state(rng[1])
t0 = time.time()
for step in range(start_step, stop_step):
    lr = get_lr(step)
    for g in opt.param_groups:
        g["lr"] = lr * g["scale"]
    sums = torch.zeros(3, device=device)  # over micro-batches (and ranks): loss, tokens, samples skipped
    for k in range(accum):
        try:
            batch = next(batches)
        except data.DataError as e:  # a record found bad as it loads
            bar.close()
            way = way_on("fix or drop it, or pass --skip-bad to skip such records")
            # this rank's record: torchrun ends the rest
            leave(f"error: step {step + 1}: {failures.said(e)}; {way}", own=True)
        # DDP: average gradients across ranks only once, after the last micro-batch
        sync = model.no_sync() if isinstance(model, DDP) and k < accum - 1 else nullcontext()
        with sync, autocast:
            _, loss = model(batch["input_ids"].to(device), None if batch["images"] is None else batch["images"].to(device),
                            batch["labels"].to(device), batch["pad_mask"].to(device))
            (loss / accum).backward()  # the mean over micro-batches, then over ranks (DDP)
        n_img = 0 if batch["images"] is None else batch["images"].shape[0]
        positions = mra.llm_positions(batch["pad_mask"].sum().item(), n_img, cfg)  # placeholders expanded
        sums += torch.tensor([loss.item(), positions, batch["skipped"]], device=device)
    if distributed:
        dist.all_reduce(sums)  # every rank sees the same numbers, so every rank stops together
    loss_sum, tokens, n_skipped = sums.tolist()
    loss = loss_sum / (accum * world)
    # the release's AdamW (DeepSpeed's, on flat partitions) steps every trainable parameter every step: a
    # text-only batch gives the vision side a zero gradient (its forward splices in features[0:0]), so
    # momentum still moves it and its moments decay, where torch's AdamW would skip a parameter with none
    for q in params:
        if q.grad is None:
            q.grad = torch.zeros_like(q)
    # a finite loss can still give non-finite gradients (an overflow in backward): the norm is checked too,
    # measured (max_norm inf) when not clipped; it is the whole model's on every rank, so all stop alike
    norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or math.inf)
    norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not (math.isfinite(loss) and math.isfinite(norm)):
        bar.close()
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
        leave(f"error: step {step + 1}: {what}; stopping without saving this state: {way_on('a lower --lr?')}")
    opt.step()
    opt.zero_grad(set_to_none=True)
    skipped += int(n_skipped)

    done, dt = step + 1, time.time() - t0
    tok_s = tokens / max(dt, 1e-9)  # all ranks together
    t0 = time.time()
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
    bar.update()
    if master and replacing:  # --overwrite: the new run has made its first step
        runs.delete_run(ckpt_dir, log_path)
        log = open(log_path, "a")
    replacing = False
    if master:
        entry = dict(step=done, loss=loss, lr=lr, tokens=int(tokens), tokens_per_s=tok_s,
                     skipped=skipped, time=time.time())
        if cuda:  # this rank's, the most any step has held so far
            entry["cuda_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        try:
            log.write(json.dumps(entry) + "\n")
            log.flush()
        except OSError as e:  # a full disk: a line cut short is dropped by --resume, which runs the step again
            bar.close()
            raise SystemExit(f"error: step {done}: writing {log_path} failed ({e.strerror or e}); "
                             f"{way_on('a full disk?')}")
    if not args.no_save and (done == stop_step or (args.save_every and done % args.save_every == 0)):
        if master:  # the log reaches the disk before the checkpoint: after a crash it holds every step saved
            os.fsync(log.fileno())
        save(done)
bar.close()
if master:
    kept = "no checkpoint (--no-save)" if args.no_save else f"checkpoint in {ckpt_dir}"
    print(f"done: step {stop_step} of {total_steps}; {kept}"
          + (f" (adapters only: generate.py --model {args.init} --lora {ckpt_dir}/lora)"
             if not args.no_save and (args.lora_adapters_only or args.quantize) else "")
          + (f"; {len(ds.bad)} bad records skipped, {skipped} replaced at load time" if args.skip_bad else ""))
    log.close()
    run_lock.close()  # --out is free: for the next run, even in this same process (the tests run train.py in it)
if distributed:
    leave()
