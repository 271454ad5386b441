"""LLaMA-2 decoder (Vicuna v1.5): the language model of LLaVA-HR.

Pre-norm transformer blocks: x + Attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)), with rotary position
embeddings and (optionally) grouped-query attention. This is F_L in the paper's Eq. 1,
p = prod_s F_L(R_s | F_P(F_v), f_t, R_<s): it reads the projected visual tokens and the text embeddings
f_t as one sequence, so the forward takes token ids *or* input embeddings (mra.py splices the visual
tokens in). A static, preallocated KV cache serves batched generation with left or right padding.
Its Linear layers and the compiled decode step's attention run through kernels.py's faster kernels,
equal up to rounding. The tokenizer is tokenizer.py's.

References: Touvron et al., "Llama 2" (2023); Su et al., "RoFormer" (RoPE); Shazeer, "GLU Variants
Improve Transformer" (SwiGLU); HF transformers' modeling_llama.py (the numerics matched here);
gpt-fast and nanoGPT (the layout).
"""
import copy
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from int8 import check_quantize, int8_linears, int8_reader
import kernels
from kernels import Linear
from weights import CheckpointError, check_bool, check_positive, load_state, read_checkpoint, read_config, remap


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None = n_heads (multi-head attention, as in Vicuna)
    hidden_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        # unchecked config.json fields must fail here, named, not as a shape error or NaN logits (rope_theta 0)
        check_positive(self, ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"),
                       ("norm_eps", "rope_theta"))
        check_bool(self, ("tie_embeddings",))
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads} heads do not divide dim {self.dim}, or {self.n_kv_heads} key/value "
                             f"heads do not divide them")

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @classmethod
    def from_name(cls, name):
        return cls(**LLAMA_PRESETS[name])

    @classmethod
    def from_hf(cls, cfg):
        """From an HF config.json dict (LlamaConfig, or LLaVA's, which carries the same fields)."""
        # refuse what we do not implement rather than load weights that would silently misbehave
        unsupported = {"rope_scaling": cfg.get("rope_scaling"), "attention_bias": cfg.get("attention_bias", False),
                       "mlp_bias": cfg.get("mlp_bias", False),
                       "hidden_act": cfg.get("hidden_act", "silu") != "silu" and cfg["hidden_act"]}
        for field, value in unsupported.items():
            if value:
                raise ValueError(f"HF config sets {field}={value!r}, which llama.py does not implement")
        # Mistral's local attention: refused unless unset, off (Qwen2's use_sliding_window false) or >= the context
        window, context = cfg.get("sliding_window"), cfg.get("max_position_embeddings", 2048)  # (HF's default)
        if window is not None and cfg.get("use_sliding_window", True) is not False \
                and not (isinstance(window, int) and window >= context):
            raise ValueError(f"HF config sets sliding_window={window!r}, which llama.py does not implement")
        c = cls(vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                n_heads=cfg["num_attention_heads"],
                n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=cfg.get("rope_theta", 10000.0), max_seq_len=context,
                tie_embeddings=cfg.get("tie_word_embeddings", False))
        if cfg.get("head_dim", c.head_dim) != c.head_dim:
            raise ValueError(f"HF config sets head_dim={cfg['head_dim']} != hidden_size / n_heads")
        return c


LLAMA_PRESETS = {
    "vicuna-7b-v1.5": dict(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008),
    "vicuna-13b-v1.5": dict(dim=5120, n_layers=40, n_heads=40, hidden_dim=13824),
    "llama-tiny": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=172, max_seq_len=256),
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x * rsqrt(mean(x^2) + eps) in fp32, so bf16 activations don't lose the mean of squares; cast
        # back before the weight, exactly as HF does (the order changes bf16 results)
        h = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)
        return self.weight * h.to(x.dtype)


def rope(positions, head_dim, theta, dtype):
    """cos, sin of shape (B, 1, T, head_dim) for integer positions (B, T)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2), angle = pos * theta^(-2i/d)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    # HF's rotate_half convention: dimension i is paired with i + d/2 (not with its neighbour as
    # in Meta's original code), so HF q/k weights load unchanged, without permuting their rows.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def additive_mask(allowed, dtype):
    """A bool mask (True: may attend) as 0 / -inf to add to the scores. Built once per call and
    shared by every layer: given the bool mask, SDPA would convert it again in each."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` slots and written in place.

    k, v: one tensor per layer (a compiled step writing through a view of a bigger input copies it
    whole), (B, n_kv_heads, max_len, head_dim); v transposed after values_by_channel. valid: (B, max_len),
    True where a slot holds a real (not padding) token, False from `pos` on. pos: (1,) long, the next
    slot of every row; a tensor, so a compiled step reads it as data (an int recompiles per token).
    rope: [cos, sin] of every slot, (max_len, head_dim) each, for decode to look up."""

    def __init__(self, n_layers, batch_size, n_kv_heads, max_len, head_dim, dtype, device, rope):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.rope = rope
        self.by_channel = False  # values_by_channel
        for t in self.k + self.v + [self.valid, self.pos] + rope:  # a CUDA graph updates them in place
            torch._dynamo.mark_static_address(t)

    def write(self, layer, k, v, start=None):
        """Store k, v (B, n_kv, T, hd) and return the keys and values to attend to: start (int): at slots
        [start, start+T), returning [0, start+T) (prefill, eager decode); None: one token at slot `pos`,
        returning the whole cache (a compiled decode step: static shapes)."""
        cache_k, cache_v = self.k[layer], self.v[layer]
        d = 3 if self.by_channel else 2  # the values' slot dimension, as stored
        if self.by_channel:
            v = v.transpose(-1, -2)  # (B, n_kv, hd, T)
        if start is None:
            cache_k.index_copy_(2, self.pos, k)
            cache_v.index_copy_(d, self.pos, v)
            end = cache_k.shape[2]
        else:
            end = start + k.shape[2]
            cache_k[:, :, start:end] = k
            cache_v.narrow(d, start, end - start).copy_(v)
        v = cache_v.narrow(d, 0, end)
        return cache_k[:, :, :end], v.transpose(-1, -2) if self.by_channel else v  # (B, nkv, end, hd) each

    def values_by_channel(self):
        """Store each layer's values as (B, nkv, head_dim, max_len), still used through write(): a compiled
        CPU step (kernels.decode_attention) then sums e_s * v_s over contiguous slots. New tensors, not a transposed
        view (see k, v above). SDPA reads this layout slower: compile_step switches a cache after prefill."""
        if not self.by_channel:
            for i, t in enumerate(self.v):  # one layer at a time: memory grows by one layer's values
                self.v[i] = t.transpose(-1, -2).contiguous()
                torch._dynamo.mark_static_address(self.v[i])
            self.by_channel = True

    def rewind(self, pos):
        """Forget every slot from `pos` on (chat's roll-back to a common prefix): masked, then overwritten."""
        self.pos.fill_(pos)
        self.valid[:, pos:] = False

    def row(self, b, first):
        """Row b from slot `first` on, as a cache of its own (pos 0) that shares this one's memory:
        a prompt prefilled into it lands in place, in row b after the row's left padding."""
        view = copy.copy(self)
        d = 3 if self.by_channel else 2  # the values' slot dimension
        view.k = [t[b:b + 1, :, first:] for t in self.k]
        view.v = [t[b:b + 1].narrow(d, first, t.shape[d] - first) for t in self.v]
        view.valid, view.pos = self.valid[b:b + 1, first:], torch.zeros_like(self.pos)
        return view


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig, layer):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, c.n_heads, c.n_kv_heads, c.head_dim
        # Linear: nn.Linear with a faster CPU inference path (kernels.py)
        self.wq = Linear(c.dim, c.n_heads * c.head_dim, bias=False)
        self.wk = Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.wv = Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.wo = Linear(c.n_heads * c.head_dim, c.dim, bias=False)
        self.wqkv = None  # kernels.fuse_linears: wq, wk, wv as one

    def forward(self, x, cos, sin, mask, cache, start, last_only=False):
        B, T, _ = x.shape
        # last_only: keys and values of all T tokens (the cache needs them), the query of the last only
        xq, Tq = (x[:, -1:], 1) if last_only else (x, T)
        if self.wqkv is None:
            q, k, v = self.wq(xq), self.wk(x), self.wv(x)
        else:
            q, k, v = self.wqkv(x).split([self.n_heads * self.head_dim] + 2 * [self.n_kv_heads * self.head_dim], -1)
            q = q[:, -Tq:]
        q = q.view(B, Tq, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, Tq, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos[..., -Tq:, :], sin[..., -Tq:, :]), apply_rope(k, cos, sin)
        if last_only and mask is not None:
            mask = mask[:, :, -1:]  # (B, 1, 1, S); with no mask, the last query sees every slot
        if cache is not None:
            k, v = cache.write(self.layer, k, v, start)  # (B, nkv, S, hd), S = slots attended to
        # softmax(q k^T / sqrt(hd) + mask) v, mask 0 / -inf (causal when None); grouped-query (enable_gqa):
        # each k/v head serves n_heads / n_kv_heads consecutive q heads, read in place, not copied
        if T == 1 and torch.compiler.is_compiling() and kernels.COMPILED_ATTENTION.get(q.device.type) == "written-out":
            y = kernels.decode_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and not last_only,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, Tq, -1))  # (B, Tq, nh*hd) -> (B, Tq, D)


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate = Linear(c.dim, c.hidden_dim, bias=False)
        self.up = Linear(c.dim, c.hidden_dim, bias=False)
        self.down = Linear(c.hidden_dim, c.dim, bias=False)
        self.gate_up = None  # kernels.fuse_linears: gate, up as one

    def forward(self, x):
        gate, up = (self.gate(x), self.up(x)) if self.gate_up is None else self.gate_up(x).chunk(2, -1)
        return self.down(F.silu(gate) * up)  # SwiGLU


class Block(nn.Module):
    def __init__(self, c: LlamaConfig, layer):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(c.dim, c.norm_eps), Attention(c, layer)
        self.mlp_norm, self.mlp = RMSNorm(c.dim, c.norm_eps), MLP(c)

    def forward(self, x, cos, sin, mask, cache=None, start=None, last_only=False):
        h = self.attn(self.attn_norm(x), cos, sin, mask, cache, start, last_only)
        x = (x[:, -1:] if last_only else x) + h  # last_only: (B, 1, D)
        return x + self.mlp(self.mlp_norm(x))


# HF names of the weights int8_linears quantizes (q/k/v/o_proj, gate/up/down_proj, lm_head)
INT8_KEYS = re.compile(r"^(model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj|lm_head)\.weight$")

# HF LlamaForCausalLM key -> ours
LLAMA_KEYS = [
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.wq.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attn.wk.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attn.wv.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.wo.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.gate.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.up.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
]
# an int8 model's scales sit beside each quantized weight, under the same names
INT8_SCALES = [(a.removesuffix("weight") + "scales", b.removesuffix("weight") + "scales")
               for a, b in LLAMA_KEYS if INT8_KEYS.match(a.replace("{i}", "0"))]
# older checkpoints saved the RoPE frequencies; we recompute them
LLAMA_IGNORE = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"]


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = c = config
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        # tied: the head *is* the embedding matrix, used directly in head(); holding no second
        # parameter means nothing can untie them (load_state_dict(assign=True) would)
        self.output = None if c.tie_embeddings else Linear(c.dim, c.vocab_size, bias=False)

    def embed(self, tokens):
        return self.tok_embeddings(tokens)  # (B, T) -> (B, T, D)

    def new_cache(self, batch_size, max_len, reuse=False):
        """In the embeddings' dtype and device. reuse: the last cache made with reuse=True, emptied (zeroed: a NaN
        left in a padding slot would pass the mask), if it has this shape; else it goes and the new one is kept. A
        CUDA graph is recorded per input addresses: a new cache per batch was a new recording, each checked per step."""
        c, dtype, device = self.config, self.tok_embeddings.weight.dtype, self.tok_embeddings.weight.device
        cache = self.__dict__.pop("reusable_cache", None) if reuse else None
        wanted = ((batch_size, max_len), dtype, device)
        if cache is not None and (cache.valid.shape, cache.k[0].dtype, cache.k[0].device) == wanted:
            for t in cache.k + cache.v:
                t.zero_()
            cache.rewind(0)
        else:
            cache = None  # the last one's memory is free before the new one takes its own
            # KVCache.rope, made here: computed in a compiled step, it would be recomputed in every loop reading it
            slots = torch.arange(max_len, device=device)[None]
            tables = [t[0, 0] for t in rope(slots, c.head_dim, c.rope_theta, dtype)]
            cache = KVCache(c.n_layers, batch_size, c.n_kv_heads, max_len, c.head_dim, dtype, device, tables)
        if reuse:
            self.reusable_cache = cache  # one at a time, until the next reuse (or `del model.llm.reusable_cache`)
        return cache

    def forward(self, tokens=None, *, embeds=None, cache=None, pad_mask=None, last_only=False):
        """Logits (B, T, V) for token ids (B, T) or input embeddings (B, T, D).

        pad_mask (B, T) bool, True = real token: padding is never attended to (its own output is finite
        but meaningless). A token's RoPE position is the number of real tokens before it in its row (HF's
        cumsum(mask) - 1), so a row reads the same however it is padded. No cache: causal attention over
        the T tokens (training). cache = new_cache(B, max_len): the T tokens go to slots [pos, pos+T),
        their pad_mask into cache.valid, and attend causally to every valid slot in [0, pos+T); pos += T.
        So: prefill, left or right padded, then `decode`. last_only: the last position's logits (B, 1, V)."""
        x = self.embed(tokens) if embeds is None else embeds
        B, T, _ = x.shape
        start = 0 if cache is None else int(cache.pos)
        end = start + T
        cache_len = float("inf") if cache is None else cache.valid.shape[1]
        for name, limit in (("max_seq_len", self.config.max_seq_len), ("cache length", cache_len)):
            if end > limit:
                raise ValueError(f"{end} positions exceed the {name} ({limit})")
        valid = torch.ones(B, T, dtype=torch.bool, device=x.device) if pad_mask is None else pad_mask.bool()
        if cache is not None:
            cache.valid[:, start:end] = valid
            valid = cache.valid[:, :end]  # (B, S), S = end
        positions = (valid.cumsum(-1) - valid.long())[:, start:]  # (B, T): real tokens before each
        cos, sin = rope(positions, self.config.head_dim, self.config.rope_theta, x.dtype)

        mask = None  # None: SDPA's causal fast path (no padding, queries start at slot 0; flash on a GPU)
        if start > 0 or (pad_mask is not None and not bool(valid.all())):
            q_slot = torch.arange(start, end, device=x.device)[:, None]  # (T, 1)
            k_slot = torch.arange(end, device=x.device)[None, :]  # (1, S)
            # causal over real keys, and every query sees at least its own slot: a padded query with every
            # key masked is a softmax over nothing, NaN in some SDPA kernels, poisoning real tokens next layer
            mask = ((k_slot <= q_slot) & valid[:, None, :]) | (k_slot == q_slot)  # (B, T, S)
            # in SDPA's dtype: under autocast every layer cast an fp32 mask anew and kept it for backward
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            mask = additive_mask(mask[:, None], dtype)  # (B, 1, T, S), over heads

        # last_only (prefill needs the next-token logits only): the last layer's outputs at the other
        # T-1 tokens feed nothing else, so it skips their queries, attention, wo and MLP, the head their rows
        *layers, last = self.layers
        for layer in layers:
            x = layer(x, cos, sin, mask, cache, start)
        x = last(x, cos, sin, mask, cache, start, last_only)
        if cache is not None:
            cache.pos.fill_(end)
        return self.head(x)

    def head(self, x):
        x = self.norm(x)
        return F.linear(x, self.tok_embeddings.weight) if self.output is None else self.output(x)

    def decode(self, tokens, cache):
        """One token per row, tokens (B,), at slot cache.pos -> next-token logits (B, V); pos += 1.

        forward(tokens[:, None], cache=cache) shaped for the compiled step: every shape is the same at every
        position (the query attends over the whole cache, masked by cache.valid) and the position is read
        from tensors, so one graph (one CUDA graph) serves every step. Eagerly: the slots written so far."""
        start = span = None  # compiled: the whole cache
        if not torch.compiler.is_compiling():  # (a compiled step can't check)
            start, span = int(cache.pos), int(cache.pos) + 1
            for name, limit in (("max_seq_len", self.config.max_seq_len), ("cache length", cache.valid.shape[1])):
                if span > limit:
                    raise ValueError(f"decoding at slot {start}: past the {name} ({limit} positions)")
        x = self.embed(tokens[:, None])  # (B, 1, D)
        # RoPE position: the row's real tokens so far (slots from pos on are not valid yet)
        positions = cache.valid.sum(-1, keepdim=True)  # (B, 1)
        cos, sin = (t[positions][:, None] for t in cache.rope)  # (B, 1, 1, hd)
        cache.valid.index_fill_(1, cache.pos, True)
        mask = additive_mask(cache.valid[:, None, None, :span], x.dtype)  # (B, 1, 1, S): real slots so far
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, start)
        cache.pos += 1
        return self.head(x)[:, 0]

    @classmethod
    def from_pretrained(cls, src, dtype=None, device="cpu", quantize=None):
        """src: an HF checkpoint dir (config.json + safetensors or .bin, shards with an index),
        or a (config, tensors) pair: LlamaConfig or HF config dict, and {HF key: tensor}.
        quantize="int8": the blocks' linear weights as Int8Linear, quantized as they are read
        (a pair's tensors must already be: int8_reader did it while reading them)."""
        check_quantize(quantize)
        if isinstance(src, (str, os.PathLike)):
            cfg_path = os.path.join(src, "config.json")
            if not os.path.isfile(cfg_path):
                raise CheckpointError(f"{cfg_path}: missing (an HF LLaMA checkpoint needs config.json)")
            config, tensors, source = read_config(cfg_path, LlamaConfig.from_hf), None, str(src)
        else:
            (config, tensors), source = src, "LLaMA tensors"
            config = config if isinstance(config, LlamaConfig) else LlamaConfig.from_hf(config)
        # HF leaves lm_head.weight out of tied checkpoints; if one is there, the embedding wins (as in HF);
        # so do its int8 scales, when load_release quantized it while reading
        keep = lambda k: not (config.tie_embeddings and k in ("lm_head.weight", "lm_head.scales"))  # noqa: E731
        if tensors is None:
            convert = int8_reader(INT8_KEYS.match, dtype, device) if quantize else None
            tensors = read_checkpoint(src, dtype, device, keep=keep, convert=convert)
        else:
            tensors = {k: t.to(device, dtype if dtype is not None and t.is_floating_point() else t.dtype)
                       for k, t in tensors.items() if keep(k)}
        table = LLAMA_KEYS + INT8_SCALES if quantize else LLAMA_KEYS
        state, unexpected = remap(tensors, table, ignore=LLAMA_IGNORE)
        with torch.device("meta"):
            model = cls(config)
            if quantize:
                int8_linears(model)
        return load_state(model, state, source, unexpected, table, one_dtype=dtype is None)
