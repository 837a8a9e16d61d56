"""InfiniteContext tests. Run: pytest test_all.py

Every test holds our code to an independent reference: float64 math, a peer library
(transformers, tiktoken), a closed form, or a real process / server on loopback.
Sections follow the pipeline; each starts with a banner naming the issue it proves.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run in the CPU interpreter here
os.environ.setdefault("WANDB_MODE", "offline")

import pytest
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)


# ============================================================================ model (issue 2)
import math

import model as M


def _tiny_cfg(**kw):
    base = dict(vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24, max_position_embeddings=256)
    base.update(kw)
    return M.ModelConfig(**base)


def _model(cfg, dtype, seed=0):
    torch.manual_seed(seed)
    m = M.Transformer(cfg).to(dtype).eval()
    with torch.no_grad():  # non-trivial norm weights so a swapped or skipped norm shows
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("attn,q_lora,yarn_on", [("mla", None, False), ("mla", 24, False), ("mla", None, True),
                                                 ("mla", 24, True), ("mha", None, False), ("mha", None, True)])
def test_model_decode_matches_forward(dtype, tol, q_lora, yarn_on, attn):
    """Token-by-token decode through a paged cache (shuffled block table, page 16, rows of different
    lengths, unwritten slots poisoned with NaN) reproduces the full forward pass at every position."""
    cfg = _tiny_cfg(q_lora_rank=q_lora, attn=attn, num_key_value_heads=2 if attn == "mha" else None,
                    rope_scaling=M.yarn(8, 16) if yarn_on else None)
    m = _model(cfg, dtype)
    B, T, page = 3, 40, 16
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    pos = torch.arange(T)[None].expand(B, T) + 100 * yarn_on   # beyond the original 16 positions under YaRN
    with torch.no_grad():
        full = m(idx, pos=pos)
        pages = T // page + 1
        kv = torch.full((cfg.num_hidden_layers, B * pages + 2, page, M.cache_width(cfg)), float("nan"), dtype=dtype)
        table = torch.randperm(B * pages + 2, generator=g)[: B * pages].view(B, pages).int()
        assert not torch.equal(table.flatten().sort().values, table.flatten())
        cache = M.Cache(kv, table, torch.zeros(B, dtype=torch.int32))
        # a prefill chunk of 8 for every row, then rows continue one token at a time; row 2 lags behind
        # row 0 and 1 by 5 tokens so that decode steps see ragged lengths
        got = [m(idx[:, :8], pos=pos[:, :8], cache=cache)]
        lens, steps, step = torch.full((B,), 8), [], 0
        while bool((lens < T).any()):
            active = (lens < T) & ((torch.arange(B) != 2) | (step >= 5))    # row 2 starts 5 steps late
            rows, step = torch.nonzero(active)[:, 0], step + 1
            sub = M.Cache(kv, table[rows], cache.seq_lens[rows].clone())
            out = m(idx[rows, lens[rows]][:, None], pos=pos[rows, lens[rows]][:, None], cache=sub)
            for j, r in enumerate(rows.tolist()):
                steps.append((r, int(lens[r]), out[j, 0]))
            cache.seq_lens[rows] = sub.seq_lens
            lens[rows] += 1
    scale = max(1.0, full.abs().max().item())
    assert (got[0] - full[:, :8]).abs().max().item() <= tol * scale
    assert len(steps) == B * (T - 8)
    for r, t, logit in steps:
        assert (logit - full[r, t]).abs().max().item() <= tol * scale, (r, t)


def test_model_rope_is_deepseek_complex_rotation():
    cfg = _tiny_cfg()
    inv, m2 = M.rope_frequencies(cfg, 16, dtype=torch.float64)
    assert m2 == 1.0
    torch.testing.assert_close(inv, 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    x = torch.randn(2, 5, 3, 16, dtype=torch.float64)
    pos = torch.randint(0, 1000, (2, 5))
    cos, sin = M.rope_cos_sin(inv, pos)
    got = M.apply_rope(x, cos, sin)
    z = torch.view_as_complex(x.view(2, 5, 3, 8, 2).contiguous())             # pairs (x[2i], x[2i+1])
    rot = torch.polar(torch.ones_like(inv), pos[..., None].double() * inv)     # e^{i * pos * theta_i}
    ref = torch.view_as_real(z * rot[:, :, None]).flatten(-2)
    assert (got - ref).abs().max().item() < 1e-12


def test_model_yarn_frequencies_closed_form():
    """YaRN: dims faster than beta_fast rotations keep their frequency, slower than beta_slow are divided
    by the factor, the ramp between is linear; softmax scale multiplier (0.1 ln s + 1)^2."""
    cfg = _tiny_cfg(rope_scaling=M.yarn(40, 4096))
    d = 64
    inv, m2 = M.rope_frequencies(cfg, d, dtype=torch.float64)
    base = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    cd = lambda r: d * math.log(4096 / (2 * math.pi * r)) / (2 * math.log(10000))
    low, high = math.floor(cd(32)), math.ceil(cd(1))
    for i in range(d // 2):
        t = min(max((i - low) / (high - low), 0.0), 1.0)
        assert abs(inv[i].item() - (base[i].item() * (1 - t) + base[i].item() / 40 * t)) < 1e-15
    assert abs(m2 - (0.1 * math.log(40) + 1) ** 2) < 1e-12


def test_model_positions_are_explicit_and_relative():
    cfg = _tiny_cfg()
    m = _model(cfg, torch.float64)
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    pos = torch.arange(12)[None].expand(2, 12)
    with torch.no_grad():
        a = m(idx, pos=pos)
        b = m(idx, pos=pos + 777)                        # same offset everywhere: RoPE is relative
        gap = pos.clone()
        gap[:, 6:] += 50                                 # PoSE-style skip inside the sequence
        c = m(idx, pos=gap)
    assert (a - b).abs().max().item() < 1e-9
    assert (a[:, :6] - c[:, :6]).abs().max().item() < 1e-12     # before the gap: causal, unchanged
    assert (a[:, 6:] - c[:, 6:]).abs().max().item() > 1e-3      # after it: the relative distances changed


def test_model_cache_bytes_and_param_count():
    for name, cfg in M.PRESETS.items():
        c = M.new_cache(cfg, 1, 64, page=64, dtype=torch.bfloat16)
        per_token_layer = c.kv.element_size() * c.kv[0, 0, 0].numel()
        assert per_token_layer == 2 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        assert M.kv_bytes_per_token(cfg) == cfg.num_hidden_layers * per_token_layer
        mha = M.ModelConfig(**{**M.asdict(cfg), "attn": "mha"})
        c = M.new_cache(mha, 1, 64, page=64, dtype=torch.bfloat16)
        assert c.kv.element_size() * c.kv[0, 0, 0].numel() == 2 * 2 * cfg.num_attention_heads * cfg.v_head_dim
        gqa = M.ModelConfig(**{**M.asdict(cfg), "attn": "mha", "num_key_value_heads": 4})
        assert M.new_cache(gqa, 1, 64, dtype=torch.bfloat16).kv[0, 0, 0].numel() * 2 == M.kv_bytes_per_token(cfg, "gqa") // cfg.num_hidden_layers
    assert M.kv_bytes_per_token(M.PRESETS["1b"]) == 27648                  # 27 KiB/token
    assert M.kv_bytes_per_token(M.PRESETS["1b"], "mha") == 192 * 1024
    with torch.device("meta"):
        n = M.Transformer(M.PRESETS["1b"]).num_params()
        small = M.Transformer(M.PRESETS["small"]).num_params(non_embedding=False)
    assert 1.03e9 < n < 1.07e9, n
    assert small * 2 <= 12 * 2**20, small                                # bf16 weights within 12 MiB


def test_model_generate_greedy_and_sampled():
    cfg = _tiny_cfg()
    m = _model(cfg, torch.float32)
    idx = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        out = m.generate(idx, 6, stop_ids=())
        seq = idx.clone()                                                  # greedy by full recomputation
        for _ in range(6):
            seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert out == seq[:, 10:].tolist()
    first = out[0][2]
    assert m.generate(idx[:1], 6, stop_ids=(first,))[0] == out[0][: out[0].index(first)]
    g1, g2 = (torch.Generator().manual_seed(5) for _ in range(2))
    s1 = m.generate(idx, 8, temperature=1.0, top_k=5, top_p=0.9, generator=g1, stop_ids=())
    s2 = m.generate(idx, 8, temperature=1.0, top_k=5, top_p=0.9, generator=g2, stop_ids=())
    assert s1 == s2 and all(len(r) == 8 for r in s1)


def test_model_sample_top_k_top_p_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(M.sample(logits, 1.0, top_p=0.7, generator=g)) for _ in range(300)}
    assert seen == {0, 1}                                # 0.5 < 0.7 <= 0.8: the nucleus is {0, 1}
    seen = {int(M.sample(logits, 1.0, top_k=3, generator=g)) for _ in range(300)}
    assert seen == {0, 1, 2}


def test_model_tokenizer_bytes_and_specials():
    enc = M.get_tokenizer()
    assert enc.n_vocab == M.ModelConfig().vocab_size == 264
    text = "héllo  wörld\t🙂\n"
    assert enc.encode(text) == list(text.encode("utf-8"))                 # id = byte value
    assert enc.encode("a<|im_end|>", allowed_special="all") == [97, M.IM_END]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [M.EOT]
    assert enc.decode(enc.encode(M.chat_prompt([{"role": "user", "content": "hi"}]), allowed_special="all")) \
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_model_checkpoint_roundtrip_and_clear_errors(tmp_path):
    cfg = _tiny_cfg()
    m = _model(cfg, torch.float32)
    p = str(tmp_path / "ckpt.pt")
    M.save_checkpoint(p, m, step=3, rng=torch.get_rng_state())
    obj = torch.load(p, weights_only=True)
    assert obj["step"] == 3 and obj["config"]["hidden_size"] == 64
    m2 = M.load_checkpoint(p)
    idx = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(m(idx), m2(idx))
    assert M.load_checkpoint(str(tmp_path)).config == cfg                 # a folder holding ckpt.pt
    data = open(p, "rb").read()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("hello")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    (tmp_path / "empty").mkdir()
    bad = dict(obj, config={**obj["config"], "hidden_size": 32})
    torch.save(bad, tmp_path / "mismatch.pt")
    cases = {"missing.pt": "no such file", "trunc.pt": "truncated or foreign", "text.pt": "truncated or foreign",
             "foreign.pt": "not an InfiniteContext checkpoint", "empty": "directory", "mismatch.pt": "do not match"}
    for name, why in cases.items():
        with pytest.raises(M.CheckpointError) as e:
            M.load_checkpoint(str(tmp_path / name))
        msg = str(e.value)
        assert str(tmp_path / name) in msg and why in msg and "\n" not in msg


# ============================================================================ hf export (issue 3)


# ============================================================================ mla kernel (issue 4)


# ============================================================================ needle (issue 5)


# ============================================================================ train (issue 6)


# ============================================================================ dpo (issue 7)


# ============================================================================ judge (issue 8)


# ============================================================================ serve (issue 9)


# ============================================================================ infra (issue 10)
