"""Weight-only int8 (`--quantize int8`): each Linear's weight stored as int8 with one scale per output
channel; activations keep the model's dtype. A decode step reads every weight once per token, so half
of bf16's bytes is up to twice the tokens/s where bandwidth bounds it. A LoRA can train on such a base
(lora.py): gradients flow to the input only, the int8 weights stay frozen buffers.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def check_quantize(quantize):
    """The loaders' `quantize` argument: None or "int8" -> whether to quantize."""
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', not {quantize!r}")
    return quantize == "int8"


class Int8Linear(nn.Module):
    """A bias-free Linear with int8 weights, one scale per output channel (weight-only: activations keep
    the model's dtype). Decoding reads every weight once per token: half of bf16's bytes, up to 2x tokens/s.

        s_o = max_i |W_oi| / 127,   q_oi = round(W_oi / s_o) in [-127, 127]      (quantize)
        y = x W^T ~= x (q * s)^T = (x q^T) * s                                    (forward)

    The error per weight is at most s_o / 2, half a step of its row's grid. The weights are
    buffers, never trained; gradients flow to x only (LoRA on an int8 base, lora.py)."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features))

    @staticmethod
    def quantize(w, dtype=None):
        """(out, in) float weight -> int8 (out, in), scales (out,) in `dtype` (default: w's)."""
        dtype = dtype or w.dtype
        w = w.float()
        exact = w.abs().amax(dim=1) / 127
        # in dtype, rounded up where dtype rounds down (fp16's subnormals, below max|W| ~ 7.8e-3, coarsely),
        # so no |q| passes 127; an all-zero row gets the least positive scale and q = 0, not 0 / 0
        scales, on = exact.to(dtype), dict(dtype=dtype, device=w.device)  # on w's device: nothing mixes CPU and GPU
        scales = torch.where(scales.float() < exact, scales.nextafter(torch.tensor(torch.inf, **on)), scales)
        least = torch.nextafter(torch.zeros((), **on), torch.ones((), **on))
        scales = torch.where(scales > 0, scales, least)
        # divide by the scales as stored, so q * s reconstructs with the scales forward will use
        q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return q, scales

    def forward(self, x):
        return int8_linear(x, self.weight, self.scales)


KERNEL_ROWS = {torch.bfloat16: 32, torch.float32: 2, torch.float16: 1}  # int8_linear's, per activation dtype


def int8_linear(x, q, scales):
    """(x q^T) * s for x (..., in), q int8 (out, in), scales (out,) -> (..., out)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return Int8Matmul.apply(x, q, scales)
    shape, x = x.shape[:-1], x.reshape(-1, x.shape[-1]).contiguous()  # (N, in)
    s = scales if scales.dtype == x.dtype else scales.to(x.dtype)  # stored in the model's dtype: no copy
    # torch's int8 kernel (as gpt-fast) is built for decode's few rows: its time grows with the rows, where
    # dequantising once for an ordinary matmul costs about the same for any few. At 7B's shapes on an Intel
    # Xeon the kernel was the faster up to 32 rows in bf16, 2 in fp32 and 1 in fp16, the two far slower
    # than bf16 (8x and more: `python bench.py --only int8`). In bf16 the kernel reads past a row whose
    # length is not a multiple of 16 (wrong sums, or a segfault; torch 2.14 on an AVX-512 CPU): such layers
    # (no LLaMA release has one) dequantise instead
    if (x.device.type == "cpu" and x.shape[0] <= KERNEL_ROWS.get(x.dtype, 0)
            and hasattr(torch.ops.aten, "_weight_int8pack_mm") and (x.dtype != torch.bfloat16 or x.shape[1] % 16 == 0)):
        y = torch.ops.aten._weight_int8pack_mm(x, q, s)  # (N, out)
    else:  # dequantise, then an ordinary matmul (torch.compile fuses the two on CUDA)
        y = F.linear(x, q.to(x.dtype)) * s
    return y.view(*shape, -1)  # (..., out)


class Int8Matmul(torch.autograd.Function):
    """int8_linear with a gradient for x: dL/dx = (dL/dy * s) q. Backward dequantises q again
    rather than keeping a float copy of it for every layer until then (QLoRA's trick)."""

    @staticmethod
    def forward(ctx, x, q, scales):
        ctx.save_for_backward(q, scales)
        with torch.no_grad():
            return int8_linear(x, q, scales)

    @staticmethod
    def backward(ctx, grad):
        q, scales = ctx.saved_tensors
        return (grad * scales.to(grad.dtype)) @ q.to(grad.dtype), None, None  # (..., out) @ (out, in)


def int8_linears(model):
    """Swap the blocks' nn.Linear layers (q, k, v, o and the MLP's three) and the output head for
    Int8Linear, in place. The head (vocab x dim, 6% of a 1B model's weights) is read whole every
    token; a head tied to the embedding table stays as it is (it is also the token lookup)."""
    for block in model.layers:
        for part in (block.attn, block.mlp):
            for name, m in list(part.named_children()):
                if isinstance(m, nn.Linear):
                    setattr(part, name, Int8Linear(m.in_features, m.out_features))
    if isinstance(model.output, nn.Linear):
        model.output = Int8Linear(model.output.in_features, model.output.out_features)
    return model


def quantize_(model):
    """A float LLaMA's layers and head (those int8_linears swaps) quantized in place; returns it."""
    state = model.state_dict()
    with torch.device("meta"):  # the new layers' buffers: shapes only, the quantized tensors go in below
        int8_linears(model)
    for k in [k for k in state if isinstance(model.get_submodule(k.rpartition(".")[0]), Int8Linear)]:
        state[k], state[k.removesuffix("weight") + "scales"] = Int8Linear.quantize(state[k])
    model.load_state_dict(state, assign=True)
    return model


def int8_reader(quantized, dtype, device):
    """A read_checkpoint `convert`: weights whose key `quantized` picks become int8 + scales as
    they are read, one tensor at a time; every other tensor is cast to dtype."""
    def convert(key, t):
        if quantized(key):
            q, scales = Int8Linear.quantize(t, dtype)
            return {key: q.to(device), key.removesuffix("weight") + "scales": scales.to(device)}
        return {key: t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)}
    return convert
