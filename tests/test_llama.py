"""llama.py against HF transformers' LlamaForCausalLM on tiny random models."""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

import kernels
from llama import Llama, LlamaConfig, RMSNorm, apply_rope, rope
from weights import CheckpointError

TOL = dict(atol=1e-5, rtol=1e-5)
VOCAB = 96

VARIANTS = {  # name: (n_kv_heads, tie_word_embeddings, rope_theta, max_shard_size)
    "mha": (4, False, 10000.0, None),
    "gqa-tied": (2, True, 500000.0, None),
    "gqa-sharded": (2, False, 10000.0, "60KB"),
}


def make_hf(n_kv, tie, theta, seed=0):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=theta, tie_word_embeddings=tie, initializer_range=0.1,
        attn_implementation="eager", pad_token_id=0, eos_token_id=None)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1, which would hide a norm-weight mixup
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(HF model, its save_pretrained directory, ours loaded from it)."""
    n_kv, tie, theta, shard = VARIANTS[request.param]
    hf = make_hf(n_kv, tie, theta)
    path = tmp_path_factory.mktemp(request.param)
    kw = {} if shard is None else dict(max_shard_size=shard)
    hf.save_pretrained(path, safe_serialization=True, **kw)
    assert os.path.isfile(path / "model.safetensors.index.json") == (shard is not None)
    return hf, path, Llama.from_pretrained(path)


def tokens(B, T, seed=1):
    return torch.randint(1, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def test_logits_match_hf(pair):
    hf, _, ours = pair
    ids = tokens(2, 17)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, **TOL)


def test_training_loss_matches_hf(tmp_path):
    """LlavaHR.forward's loss against LlamaForCausalLM's (labels=...) on the same spliced embeddings: the
    next-token shift, the visual tokens, padding and masked turns ignored, the mean over counted tokens."""
    import mra
    from mra import IGNORE, IMAGE_TOKEN
    from test_mra import randomise, tiny_cfg
    torch.manual_seed(3)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.1,
        attn_implementation="eager")).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = mra.build(tiny_cfg(image_size=128), llm=str(tmp_path))
    randomise(model.encoder), randomise(model.projector)  # (new adapters start as the identity)
    ids = torch.cat([tokens(2, 12), torch.full((2, 1), IMAGE_TOKEN), tokens(2, 9, seed=2)], 1)
    pad = torch.ones_like(ids, dtype=torch.bool)
    pad[1, -5:] = False  # right padding, as training pads
    labels = ids.masked_fill(~pad, IGNORE)
    labels[:, :14] = IGNORE  # the human turn, as data.encode masks it
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        _, loss = model(ids, images, labels, pad)
        embeds, mask, spliced = model.splice(ids, images, labels, pad)
        ref = hf(inputs_embeds=embeds, attention_mask=mask.long(), labels=spliced).loss
    assert (spliced != IGNORE).sum(1).tolist() == [8, 3]  # of 85 and 80 positions
    torch.testing.assert_close(loss, ref, **TOL)


def test_tied_embeddings_stay_tied(pair):
    hf, _, ours = pair
    if not hf.config.tie_word_embeddings:
        assert ours.output is not None
        return
    assert ours.output is None and "output.weight" not in ours.state_dict()
    ours.zero_grad()
    ours(tokens(1, 5)).sum().backward()  # the head's gradient lands on the embedding
    assert ours.tok_embeddings.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_hf(pair, side):
    hf, _, ours = pair
    ids, mask = tokens(3, 12), torch.ones(3, 12, dtype=torch.bool)
    for row, n_pad in [(1, 4), (2, 11)]:  # row 2 keeps a single real token
        mask[row, :n_pad] = False
    if side == "right":
        mask = mask.flip(1)
    ids = ids.masked_fill(~mask, 0)
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)  # what HF's generate() passes
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask.long(), position_ids=position_ids).logits
        out = ours(ids, pad_mask=mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[mask], ref[mask], **TOL)


def test_embeds_equal_tokens(pair):
    _, _, ours = pair
    ids, mask = tokens(2, 9), torch.ones(2, 9, dtype=torch.bool)
    mask[0, :3] = False
    with torch.no_grad():
        torch.testing.assert_close(ours(embeds=ours.embed(ids)), ours(ids), atol=0, rtol=0)
        torch.testing.assert_close(ours(embeds=ours.embed(ids), pad_mask=mask), ours(ids, pad_mask=mask),
                                   atol=0, rtol=0)


def test_cache_prefill_then_decode_equals_full_forward(pair):
    _, _, ours = pair
    ids = tokens(2, 14)
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(2, 20)
        steps = [ours(ids[:, :8], cache=cache)]
        steps += [ours(ids[:, t:t + 1], cache=cache) for t in range(8, 14)]
        # the static-shape step (whole cache, masked) gives the same as the forward's growing span
        static = ours.new_cache(2, 20)
        ours(ids[:, :8], cache=static)
        decoded = [ours.decode(ids[:, t], static) for t in range(8, 14)]
    assert cache.pos == 14 and static.pos == 14
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)
    torch.testing.assert_close(torch.stack(decoded, 1), full[:, 8:], **TOL)


def test_eager_decode_equals_the_static_whole_cache_step(pair, monkeypatch):
    """Eager decode reads only the slots written so far; compiled, the step reads the whole cache
    (one shape for every position). Both must give the same logits."""
    _, _, ours = pair
    ids = tokens(2, 12)
    with torch.no_grad():
        eager, static = ours.new_cache(2, 16), ours.new_cache(2, 16)
        ours(ids[:, :6], cache=eager), ours(ids[:, :6], cache=static)
        got = [ours.decode(ids[:, t], eager) for t in range(6, 12)]
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the path a compiled step traces
        ref = [ours.decode(ids[:, t], static) for t in range(6, 12)]
    torch.testing.assert_close(torch.stack(got), torch.stack(ref), **TOL)


def test_rows_prefilled_alone_equal_the_left_padded_batch(pair):
    """mra.prefill's way with rows of different lengths: each row alone into its cache row
    (KVCache.row), after its left padding; the same cache and logits as one padded pass."""
    _, _, ours = pair
    lengths, T = [9, 4, 6], 9
    ids, mask = torch.zeros(3, T, dtype=torch.long), torch.zeros(3, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        ids[b, T - n:], mask[b, T - n:] = tokens(1, n, seed=10 + n)[0], True
    with torch.no_grad():
        batched, rows = ours.new_cache(3, T + 4), ours.new_cache(3, T + 4)
        ref = ours(ids, cache=batched, pad_mask=mask)[:, -1]
        got = torch.cat([ours(ids[b:b + 1, T - n:], cache=rows.row(b, T - n))[:, -1] for b, n in enumerate(lengths)])
        rows.pos.fill_(T)
        assert torch.equal(rows.valid, batched.valid)
        for k_ref, k_got in zip(batched.k + batched.v, rows.k + rows.v):
            real = lambda k: k[:, :, :T].transpose(1, 2)[mask]  # noqa: E731  (real slots, nkv, hd)
            torch.testing.assert_close(real(k_got), real(k_ref), **TOL)
        torch.testing.assert_close(got, ref, **TOL)
        for t in ids[:, -1], ids[:, 0], ids[:, 1]:  # and decoding continues the same
            torch.testing.assert_close(ours.decode(t, rows), ours.decode(t, batched), **TOL)


def greedy(model, ids, n, pad_mask=None):
    """Greedy tokens (B, n) and each step's logits (B, n, V), through the KV cache."""
    B, T = ids.shape
    cache = model.new_cache(B, T + n)
    logits = model(ids, cache=cache, pad_mask=pad_mask)
    # each row continues from its last real token (T - 1, unless the row is right-padded)
    last = torch.full((B,), T - 1) if pad_mask is None else (pad_mask.long() * torch.arange(T)).argmax(1)
    step = logits[torch.arange(B), last]  # (B, V)
    out, steps = [], []
    for i in range(n):
        steps.append(step)
        out.append(step.argmax(-1))
        if i < n - 1:
            step = model.decode(out[-1], cache)  # the static-shape step generation uses
    return torch.stack(out, 1), torch.stack(steps, 1)


def test_greedy_matches_hf_generate(pair):
    hf, _, ours = pair
    ids = tokens(2, 7)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
        got, _ = greedy(ours, ids, 10)
    assert torch.equal(got, ref[:, 7:])


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_padded_generation_equals_rows_alone(pair, side):
    _, _, ours = pair
    lengths, T, n = [9, 4, 6], 9, 8
    rows = [tokens(1, L, seed=10 + L)[0] for L in lengths]
    ids, mask = torch.zeros(3, T, dtype=torch.long), torch.zeros(3, T, dtype=torch.bool)
    for b, r in enumerate(rows):
        span = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[b, span], mask[b, span] = r, True
    with torch.no_grad():
        got, got_logits = greedy(ours, ids, n, pad_mask=mask)
        for b, r in enumerate(rows):
            alone, alone_logits = greedy(ours, r[None], n)
            assert torch.equal(got[b], alone[0])
            torch.testing.assert_close(got_logits[b], alone_logits[0], **TOL)


def test_rmsnorm_and_rope_match_hf_bitwise_in_bf16():
    # fp32 parity can't see where the casts sit; bf16 can
    from transformers.models.llama import modeling_llama as hf
    x = torch.randn(2, 5, 64).bfloat16()
    ours, ref = RMSNorm(64, 1e-6), hf.LlamaRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ref.weight.copy_(ours.weight)
    ours, ref = ours.bfloat16(), ref.bfloat16()
    assert torch.equal(ours(x), ref(x))
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500000.0)
    pos = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]])
    cos, sin = hf.LlamaRotaryEmbedding(cfg)(x, pos)
    our_cos, our_sin = rope(pos, 16, 500000.0, torch.bfloat16)
    q = torch.randn(2, 4, 5, 16).bfloat16()
    assert torch.equal(apply_rope(q, our_cos, our_sin), hf.apply_rotary_pos_emb(q, q, cos, sin)[0])


def naive_attention(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
    # the textbook formula: a row whose keys are all masked gives softmax(-inf...) = NaN here
    if enable_gqa:  # each k/v head serves n_heads / n_kv_heads consecutive q heads
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5  # (B, nh, T, S)
    if is_causal:
        attn_mask = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:  # additive: 0 where allowed, -inf where masked
        scores = scores + attn_mask
    return scores.softmax(-1) @ v


def test_textbook_attention_equals_sdpa_with_padding(pair, monkeypatch):
    """SDPA (fast) against the formula in its comment (readable), padded and cached; the
    textbook version also proves no query is left with every key masked."""
    _, _, ours = pair
    ids, mask = tokens(3, 10), torch.ones(3, 10, dtype=torch.bool)
    mask[1, :6], mask[2, 7:] = False, False
    with torch.no_grad():
        fast = ours(ids, pad_mask=mask), greedy(ours, ids, 5, pad_mask=mask)[1]
        monkeypatch.setattr(F, "scaled_dot_product_attention", naive_attention)
        slow = ours(ids, pad_mask=mask), greedy(ours, ids, 5, pad_mask=mask)[1]
    assert all(torch.isfinite(t).all() for t in slow)
    torch.testing.assert_close(slow, fast, **TOL)


def test_cache_overflow_is_refused():
    model = Llama(LlamaConfig.from_name("llama-tiny"))
    cache = model.new_cache(1, 8)
    model(tokens(1, 6), cache=cache)
    with pytest.raises(ValueError, match="cache length"):
        model(tokens(1, 3), cache=cache)
    model.decode(tokens(1, 1)[:, 0], cache)
    model.decode(tokens(1, 1)[:, 0], cache)
    with pytest.raises(ValueError, match=r"decoding at slot 8: past the cache length \(8 positions\)"):
        model.decode(tokens(1, 1)[:, 0], cache)
    n = model.config.max_seq_len  # a cache longer than the model's context: the context is the limit
    cache = model.new_cache(1, n + 4)
    model(torch.zeros(1, n, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=f"decoding at slot {n}: past the max_seq_len"):
        model.decode(tokens(1, 1)[:, 0], cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, model.config.max_seq_len + 1, dtype=torch.long))


def test_presets_parameter_counts():
    # the published sizes of LLaMA-2 7B / 13B (Vicuna v1.5 is a fine-tune of them)
    for name, n in [("vicuna-7b-v1.5", 6_738_415_616), ("vicuna-13b-v1.5", 13_015_864_320)]:
        with torch.device("meta"):
            model = Llama(LlamaConfig.from_name(name))
        assert sum(p.numel() for p in model.parameters()) == n


def test_from_hf_refuses_rope_scaling():
    cfg = make_hf(4, False, 10000.0).config.to_dict()
    cfg["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ValueError, match="rope_scaling"):
        LlamaConfig.from_hf(cfg)


def test_pair_source_loads_the_same(pair):
    hf, path, ours = pair
    cfg = json.loads((path / "config.json").read_text())
    model = Llama.from_pretrained((cfg, hf.state_dict()), dtype=torch.float64)
    assert model.norm.weight.dtype == torch.float64
    ids = tokens(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).float(), ours(ids), **TOL)


# ----- loader errors: every one names the file or key -----

@pytest.fixture
def checkpoint(tmp_path):
    """A single-file checkpoint dir and a function that rewrites its tensors."""
    make_hf(4, False, 10000.0).save_pretrained(tmp_path, safe_serialization=True)

    def rewrite(edit):
        file = tmp_path / "model.safetensors"
        tensors = load_file(file)
        edit(tensors)
        save_file(tensors, file, metadata={"format": "pt"})
    return tmp_path, rewrite


def test_missing_key(checkpoint):
    path, rewrite = checkpoint
    rewrite(lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing model\.layers\.1\.mlp\.up_proj\.weight"):
        Llama.from_pretrained(path)


def test_unexpected_key(checkpoint):
    path, rewrite = checkpoint
    rewrite(lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(CheckpointError, match=r"unexpected model\.layers\.0\.self_attn\.q_proj\.bias"):
        Llama.from_pretrained(path)


def test_wrong_shape(checkpoint):
    path, rewrite = checkpoint
    rewrite(lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(CheckpointError, match=r"for model\.norm\.weight: model expects \(64,\), checkpoint has \(65,\)"):
        Llama.from_pretrained(path)


def test_old_inv_freq_is_ignored(checkpoint):
    path, rewrite = checkpoint
    rewrite(lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    Llama.from_pretrained(path)


def test_missing_shard(tmp_path):
    make_hf(4, False, 10000.0).save_pretrained(tmp_path, safe_serialization=True, max_shard_size="60KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        Llama.from_pretrained(tmp_path)


def test_truncated_file(checkpoint):
    path, _ = checkpoint
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Llama.from_pretrained(path)


def test_missing_config(checkpoint, tmp_path_factory):
    path, _ = checkpoint
    bare = tmp_path_factory.mktemp("bare")
    shutil.copy(path / "model.safetensors", bare)
    with pytest.raises(CheckpointError, match=r"bare\d*/config\.json"):
        Llama.from_pretrained(bare)


def test_last_only_logits_equal_the_full_passes_last_row():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("llama-tiny"))
    tokens = torch.randint(0, model.config.vocab_size, (2, 7))
    pad = torch.ones(2, 7, dtype=torch.bool)
    pad[1, :3] = False  # left padding: the last position is real in every row
    for mask in (pad, None):  # None: SDPA's causal path, which the one last query must not take
        full = model(tokens, pad_mask=mask)
        last = model(tokens, pad_mask=mask, last_only=True)
        assert last.shape == (2, 1, model.config.vocab_size)
        torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-6)
        # the last layer takes the last query only, yet caches every token's keys and values, and a
        # chunk after a cached prefix (queries from slot 4 on) gives the same last logits
        whole, trimmed, chunked = (model.new_cache(2, 16) for _ in range(3))
        model(tokens, pad_mask=mask, cache=whole)
        torch.testing.assert_close(model(tokens, pad_mask=mask, cache=trimmed, last_only=True), last)
        for a, b in zip(whole.k + whole.v, trimmed.k + trimmed.v):
            assert torch.equal(a, b)
        model(tokens[:, :4], pad_mask=None if mask is None else mask[:, :4], cache=chunked)
        rest = model(tokens[:, 4:], pad_mask=None if mask is None else mask[:, 4:], cache=chunked, last_only=True)
        torch.testing.assert_close(rest[:, 0], full[:, -1], rtol=1e-5, atol=1e-6)


def test_linear_inference_path_equals_f_linear_and_training_keeps_autograd():
    # kernels.Linear: oneDNN for CPU inference (one row or many; MKL's F.linear on an Intel CPU), F.linear for
    # training
    torch.manual_seed(0)
    lin = kernels.Linear(64, 172, bias=False)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight), **TOL)
        torch.testing.assert_close(lin(x[:1, :1]), F.linear(x[:1, :1], lin.weight), **TOL)
    lin(x).square().sum().backward()
    expected = torch.autograd.grad(F.linear(x, lin.weight).square().sum(), lin.weight)[0]
    torch.testing.assert_close(lin.weight.grad, expected, atol=0, rtol=0)


def test_int8_quantizes_an_untied_head_and_keeps_a_tied_one():
    """--quantize int8 covers the output head (read whole every token) unless it is the embedding
    table; an int8 model answers through both (the head's int8 kernel and the dequantised path)."""
    from dataclasses import replace

    from int8 import Int8Linear, quantize_
    for tied in (False, True):
        torch.manual_seed(0)
        c = replace(LlamaConfig.from_name("llama-tiny"), tie_embeddings=tied)
        model = quantize_(Llama(c).eval())
        assert isinstance(model.output, Int8Linear) != tied
        ids = torch.randint(0, c.vocab_size, (2, 7))
        with torch.no_grad():
            logits = model(ids)
        assert logits.shape == (2, 7, c.vocab_size) and logits.isfinite().all()


@pytest.mark.skipif(not kernels.ONEDNN, reason="oneDNN's packed layout: x86 CPUs")
def test_packed_linears_answer_as_the_plain_ones():
    """pack_linears (generate.py's eager CPU path) moves each weight into oneDNN's blocked layout in
    place of the plain one: the same logits and greedy tokens, the same parameter count, and a
    packed model refuses to train."""
    import copy

    import generate
    torch.manual_seed(0)
    plain = Llama(LlamaConfig.from_name("llama-tiny")).eval()
    packed = copy.deepcopy(plain)
    assert kernels.pack_linears(packed) == 0  # a model this small stays in the caches: left as it is
    assert kernels.pack_linears(packed, min_bytes=0) == 7 * plain.config.n_layers + 1  # q k v o, gate up down; head
    assert all(m.weight.is_meta for m in packed.modules() if isinstance(m, kernels.Linear))
    assert sum(p.numel() for p in packed.parameters()) == sum(p.numel() for p in plain.parameters())
    ids = torch.randint(3, plain.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids), plain(ids), **TOL)
    tokens = []
    for model in (plain, packed):
        cache = model.new_cache(2, 32)
        with torch.no_grad():
            logits = model(ids, cache=cache, last_only=True)[:, -1]
        tokens.append(generate.decode_n_tokens(model.decode, logits, cache, 16, lambda x: x.argmax(-1), eos_id=-1))
    assert tokens[0] == tokens[1] and len(tokens[0][0]) == 16
    with pytest.raises(RuntimeError, match="packed for inference"):
        packed(embeds=torch.randn(1, 3, plain.config.dim, requires_grad=True))


@pytest.mark.skipif(not kernels.ONEDNN, reason="oneDNN's packed layout: x86 CPUs")
def test_pack_linears_packs_from_min_bytes_on_and_leaves_a_model_for_inference():
    # llama-tiny's Linear weights, fp32: per layer q 64x64, k and v 32x64 (2 k/v heads of 16), o 64x64, gate, up
    # and down 172x64; 2 layers, and the untied head 256x64: 107,008 weights, 428,032 bytes
    import copy
    torch.manual_seed(0)
    plain = Llama(LlamaConfig.from_name("llama-tiny")).eval()
    total = 4 * (2 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 172 * 64) + 256 * 64)
    assert total == 428_032
    packed = copy.deepcopy(plain)
    assert kernels.pack_linears(packed, min_bytes=total + 1) == 0  # under min_bytes: nothing packed
    assert kernels.pack_linears(packed, min_bytes=total) == 7 * 2 + 1  # exactly min_bytes: packed
    # for inference only: no parameter asks for gradients, so a forward outside no_grad answers as the plain one
    assert not any(p.requires_grad for p in packed.parameters())
    ids = torch.randint(3, plain.config.vocab_size, (2, 9))
    torch.testing.assert_close(packed(ids), plain(ids).detach(), **TOL)


@pytest.mark.skipif(not kernels.ONEDNN, reason="oneDNN's matmul: x86 CPUs")
@pytest.mark.parametrize("intel", [False, True])
def test_plain_weights_take_the_faster_library_per_vendor(monkeypatch, intel):
    """fp32 inference on plain weights: oneDNN's matmul on an AMD CPU, MKL's (F.linear) on an Intel one
    (kernels.MKL_GEMV: MKL picks its code by vendor); training keeps F.linear on both. Equal up to rounding."""
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: calls.append(1) or linear(*a))
    monkeypatch.setattr(kernels, "MKL_GEMV", intel)
    torch.manual_seed(0)
    m = kernels.Linear(64, 32)
    x = torch.randn(3, 64)
    with torch.no_grad():
        got = m(x)
    assert len(calls) == intel
    torch.testing.assert_close(got, linear(x, m.weight, m.bias), **TOL)
    calls.clear()
    m(x).sum().backward()
    assert len(calls) == 1 and m.weight.grad is not None


@pytest.mark.skipif(not kernels.ONEDNN, reason="oneDNN's matmul: x86 CPUs")
@pytest.mark.parametrize("mkl", [True, False])
def test_mkl_gemv_on_an_intel_cpu_with_torch_built_with_mkl(mkl):
    """kernels.MKL_GEMV, read as kernels is imported, on an Intel CPU (/proc/cpuinfo faked): set where MKL is
    torch's BLAS (F.linear's product is MKL's), not in a build without it."""
    import subprocess
    import sys
    code = ("import builtins, io, torch\n"
            "real = builtins.open\n"
            "builtins.open = lambda f, *a, **k: (io.StringIO('vendor_id\\t: GenuineIntel\\n') if f == '/proc/cpuinfo'\n"
            "                                    else real(f, *a, **k))\n"
            f"torch.backends.mkl.is_available = lambda: {mkl}\n"
            "import kernels\n"
            "print(kernels.cpu_info()['vendor_id'], kernels.MKL_GEMV)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["GenuineIntel", str(mkl)]


def test_compiled_decode_attends_as_eager_with_grouped_queries():
    """A compiled CPU step attends through kernels.decode_attention (grouped-query here: 4 query
    heads over 2 key/value heads, two rows, one left-padded): the same logits as eager SDPA."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("llama-tiny")).eval()
    assert model.config.n_kv_heads < model.config.n_heads
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    pad = torch.ones(2, 6, dtype=torch.bool)
    pad[1, :2] = False
    step = kernels.compile_step(model.decode, torch.device("cpu"))
    with torch.no_grad():
        eager, static = model.new_cache(2, 32), model.new_cache(2, 32)
        model(ids[:, :6], cache=eager, pad_mask=pad), model(ids[:, :6], cache=static, pad_mask=pad)
        got = [step(ids[:, t], static) for t in range(6, 12)]
        ref = [model.decode(ids[:, t], eager) for t in range(6, 12)]
    torch.testing.assert_close(torch.stack(got), torch.stack(ref), **TOL)
    # the compiled step read its values channel-major (KVCache.values_by_channel); an eager
    # prefill after it (chat's next turn) reads that layout as it reads the usual one
    assert static.by_channel and static.v[0].shape[-1] == 32 and static.v[0].is_contiguous() and not eager.by_channel
    with torch.no_grad():
        torch.testing.assert_close(model(ids[:, :5], cache=static), model(ids[:, :5], cache=eager), **TOL)


def test_training_mask_is_built_once_in_the_autocast_dtype():
    # under bf16 autocast (GPU training) an fp32 mask was cast anew in every layer's SDPA, and each
    # copy kept for backward; a batch without padding takes the causal fast path, no mask at all.
    # CPU autocast stands in for CUDA's here; the mask is the one (T, T) tensor per row and head
    torch.manual_seed(0)
    m = Llama(LlamaConfig(vocab_size=128, dim=64, n_layers=4, n_heads=4, hidden_dim=128, max_seq_len=64))
    B, T = 2, 24
    x = torch.randn(B, T, 64, requires_grad=True)
    for padded in (True, False):
        pad = torch.ones(B, T, dtype=torch.bool)
        pad[1, 18:] = not padded
        masks = {}

        def pack(t):
            if t.dim() == 4 and t.shape[-2:] == (T, T):
                masks[t.untyped_storage().data_ptr()] = t.dtype
            return t
        with torch.autocast("cpu", torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(embeds=x, pad_mask=pad).float().sum().backward()
        assert list(masks.values()) == ([torch.bfloat16] if padded else [])
    with torch.no_grad():  # and the fast path answers as the mask does (fp32): an unpadded row beside a padded one
        pad = torch.ones(B, T, dtype=torch.bool)
        pad[1, 18:] = False
        torch.testing.assert_close(m(embeds=x[:1], pad_mask=pad[:1]), m(embeds=x, pad_mask=pad)[:1], rtol=0, atol=1e-6)


def test_fused_linears_answer_as_the_separate_ones():
    """fuse_linears (generate.py on a GPU and for CPU batches): q, k, v as one product and gate, up as one. The same
    logits (prefill with padding and last_only, eager and compiled decode), plain and int8 weights;
    fused then packed; a LoRA's layers are left as they are."""
    import copy

    import lora
    from int8 import quantize_
    torch.manual_seed(0)
    plain = Llama(LlamaConfig.from_name("llama-tiny")).eval()
    ids = torch.randint(3, plain.config.vocab_size, (2, 12))
    pad = torch.ones(2, 6, dtype=torch.bool)
    pad[1, :2] = False

    def answers(model, compiled=False):
        step = kernels.compile_step(model.decode, torch.device("cpu")) if compiled else model.decode
        cache = model.new_cache(2, 32)
        with torch.no_grad():
            out = [model(ids[:, :6], cache=cache, pad_mask=pad, last_only=True)[:, 0]]
            out += [step(ids[:, t], cache) for t in range(6, 12)]
        return torch.stack(out)

    q8 = quantize_(copy.deepcopy(plain))
    for model in (plain, q8):
        fused = copy.deepcopy(model)
        assert kernels.fuse_linears(fused) == 2 * plain.config.n_layers and kernels.fuse_linears(fused) == 0
        attn, mlp = fused.layers[0].attn, fused.layers[0].mlp
        assert not hasattr(attn, "wq") and not hasattr(mlp, "gate") and type(attn.wqkv) is type(attn.wo)
        assert sum(p.numel() for p in fused.state_dict().values()) == sum(p.numel() for p in model.state_dict().values())
        torch.testing.assert_close(answers(fused), answers(model), **TOL)
    fused = copy.deepcopy(plain)
    kernels.fuse_linears(fused)
    torch.testing.assert_close(answers(fused, compiled=True), answers(plain), **TOL)
    if kernels.ONEDNN:
        assert kernels.pack_linears(fused, min_bytes=0) == 4 * plain.config.n_layers + 1
        torch.testing.assert_close(answers(fused), answers(plain), **TOL)
    adapted = torch.nn.Module()
    adapted.llm = copy.deepcopy(plain)
    lora.add_lora(adapted, 4, 8)
    assert kernels.fuse_linears(adapted.llm) == 0 and isinstance(adapted.llm.layers[0].attn.wq, lora.LoRALinear)


def test_fuse_linears_leaves_linears_with_a_bias_apart():
    # the fused product has no bias: q, k, v with biases (a model other than LLaMA's) stay three products,
    # and the model answers as before; the rest is fused
    import copy
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("llama-tiny")).eval()
    attn = model.layers[0].attn
    for name in ("wq", "wk", "wv"):
        old = getattr(attn, name)
        new = kernels.Linear(old.in_features, old.out_features, bias=True)
        torch.nn.init.normal_(new.bias)
        setattr(attn, name, new)
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    fused = copy.deepcopy(model)
    assert kernels.fuse_linears(fused) == 2 * 2 - 1
    assert fused.layers[0].attn.wqkv is None and fused.layers[0].attn.wq.bias is not None
    assert fused.layers[0].mlp.gate_up is not None and fused.layers[1].attn.wqkv is not None
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), model(ids), **TOL)


def test_fast_products_fuse_on_a_gpu_at_one_row_and_on_the_cpu_from_two():
    # generate.py's choice (fast_products): a GPU fuses q, k, v and gate, up whatever the rows; the CPU at one
    # row keeps them apart (no faster there), and fuses batches. compiled=True: nothing is packed at one row
    for device, rows, fused in (("cuda", 1, True), ("cpu", 1, False), ("cpu", 2, True)):
        llm = Llama(LlamaConfig.from_name("llama-tiny")).eval()
        kernels.fast_products(llm, torch.device(device), rows, compiled=True)
        assert all((layer.attn.wqkv is not None and layer.mlp.gate_up is not None) == fused
                   for layer in llm.layers), (device, rows)


def test_a_config_json_without_optional_fields_reads_as_transformers_reads_it():
    # the fields LlamaConfig defaults (an eps, the RoPE base, the context, tying, the k/v heads) default as HF's do
    required = dict(vocab_size=96, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4)
    ours, hf = LlamaConfig.from_hf(required), transformers.LlamaConfig(**required)
    assert (ours.norm_eps, ours.rope_theta, ours.max_seq_len, ours.tie_embeddings, ours.n_kv_heads) == (
        hf.rms_norm_eps, getattr(hf, "rope_theta", None) or hf.rope_parameters["rope_theta"],
        hf.max_position_embeddings, hf.tie_word_embeddings, hf.num_key_value_heads)


def test_written_out_attention_keeps_large_scores_finite():
    # softmax(s) = e^(s - max s) / sum: without the shift a score above ~88 overflows e^s in fp32 (NaN answers)
    import llama
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 64, generator=g) * 40, torch.randn(2, 2, 32, 64, generator=g) * 40, \
        torch.randn(2, 2, 32, 64, generator=g)
    mask = llama.additive_mask((torch.arange(32) < 30)[None, None, None].expand(2, 1, 1, 32), torch.float32)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double(), enable_gqa=True)
    assert ((q * k[:, :1]).sum(-1) / 8).max() > 200  # scores far past e^x's float32 range
    torch.testing.assert_close(kernels.decode_attention(q, k, v, mask).double(), want, rtol=1e-5, atol=1e-5)


def test_written_out_attention_is_as_accurate_as_sdpa_in_bf16():
    # scores of std 9 (LLaMA's reach 10-40 on attention-sink tokens): in bf16 the written-out attention
    # (a compiled CPU step's, kernels.decode_attention) rounded them before the softmax, 10x SDPA's error
    import llama
    g = torch.Generator().manual_seed(0)
    S = 256
    q, k = torch.randn(1, 4, 1, 64, generator=g) * 3, torch.randn(1, 2, S, 64, generator=g) * 3
    v = torch.randn(1, 2, S, 64, generator=g)
    mask = llama.additive_mask((torch.arange(S) < S - 10)[None, None, None], torch.float32)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double(),
                                           enable_gqa=True)
    bf = [t.bfloat16() for t in (q, k, v, mask)]
    sdpa_error = (F.scaled_dot_product_attention(*bf[:3], attn_mask=bf[3], enable_gqa=True).double() - exact).abs().max()
    for attend in (kernels.decode_attention, torch.compile(kernels.decode_attention, fullgraph=True)):
        y = attend(*bf)
        assert y.dtype == torch.bfloat16 and (y.double() - exact).abs().max() <= 2 * sdpa_error
