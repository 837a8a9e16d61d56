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
@pytest.mark.parametrize("fused", [False, True])
def test_model_decode_matches_forward(dtype, tol, q_lora, yarn_on, attn, fused):
    """Token-by-token decode through a paged cache (shuffled block table, page 16, rows of different
    lengths, unwritten slots poisoned with NaN) reproduces the full forward pass at every position.
    fused: the cached passes run after fuse_projections (serve.py's engine), the full pass before it."""
    cfg = _tiny_cfg(q_lora_rank=q_lora, attn=attn, num_key_value_heads=2 if attn == "mha" else None,
                    rope_scaling=M.yarn(8, 16) if yarn_on else None)
    m = _model(cfg, dtype)
    B, T, page = 3, 40, 16
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    pos = torch.arange(T)[None].expand(B, T) + 100 * yarn_on   # beyond the original 16 positions under YaRN
    with torch.no_grad():
        full = m(idx, pos=pos)
        if fused:
            keys, n_params = list(m.state_dict()), m.num_params()
            M.fuse_projections(m)
            mlp = m.layers[0].mlp
            assert mlp.gate_up.shape == (2 * cfg.intermediate_size, cfg.hidden_size)
            assert mlp.up_proj.weight.untyped_storage().data_ptr() == mlp.gate_up.untyped_storage().data_ptr()  # views
            assert (getattr(m.layers[0].self_attn, "qkv_a", None) is not None) == (attn == "mla")
            assert list(m.state_dict()) == keys and m.num_params() == n_params   # checkpoints and counts unchanged
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


def test_model_rope_frequencies_stay_fp32_under_bf16():
    m = M.Transformer(_tiny_cfg()).to(torch.bfloat16)
    assert m.inv_freq.dtype == torch.float32 and m.lm_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(m.inv_freq, M.rope_frequencies(m.config, 16)[0], rtol=0, atol=0)


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


def test_model_readme_commands_work_on_a_fresh_clone(tmp_path):
    """As a new user: clone, then the README's two commands exactly as written (fresh venv, pip install -r
    requirements.txt), the main job shortened with flags and the test command restricted to one test."""
    import re
    import subprocess
    readme = open(os.path.join(ROOT, "README.md")).read()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    main_cmd, test_cmd = re.findall(r"```bash\n(.*?)\n```", quick, re.S)[:2]
    install, main_job = main_cmd.rsplit(" && ", 1)
    assert main_job == "python train.py" and test_cmd == install + " && pytest test_all.py"
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", ROOT, str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = ":".join(p for p in env["PATH"].split(":") if ".venv" not in p)
    run = lambda cmd: subprocess.run(["bash", "-c", cmd], cwd=clone, env=env, capture_output=True, text=True,
                                     timeout=1200)
    r = run(f"{install} && {main_job} --max_iters=3 --log_interval=1 --eval_lengths=512 --eval_depths=50 "
            f"--eval_samples=1 --threads=1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (clone / "out" / "tiny" / "ckpt.pt").exists() and "accuracy" in r.stdout + r.stderr
    r = run(f"{test_cmd} -q -k test_model_rope_is_deepseek_complex_rotation")
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


# ============================================================================ hf export (issue 3)
import json as _hf_json  # noqa: E402
import random as _hf_random  # noqa: E402


def _hf_model(q_lora=None, yarn_on=False, bf16_exact=True, seed=0, **kw):
    """A tiny MLA model; nope != rope != v widths so that a swapped dimension cannot pass. With bf16_exact the
    weights are rounded to bf16 first, so the default bf16 export holds them exactly."""
    cfg = _tiny_cfg(q_lora_rank=q_lora, qk_nope_head_dim=24, qk_rope_head_dim=16, v_head_dim=20,
                    rope_scaling=M.yarn(8, 32) if yarn_on else None, **kw)
    m = _model(cfg, torch.float32, seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(("q_proj.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight")):
                p.mul_(8)   # peaked attention: positions (RoPE, YaRN) then move the logits visibly
            if bf16_exact:
                p.copy_(p.bfloat16().float())
    return m


def _hf_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("q_lora,yarn_on", [(None, False), (24, False), (None, True), (24, True)])
def test_hf_transformers_logits_parity(tmp_path, q_lora, yarn_on):
    """transformers' own DeepseekV3ForCausalLM, loaded from our export, gives our logits; under YaRN the
    sequence (200) runs far past the original 32 positions, where the YaRN frequencies and m^2 matter."""
    from transformers import AutoModelForCausalLM
    m = _hf_model(q_lora, yarn_on)
    M.export_hf(m, str(tmp_path))
    hf, info = AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager", dtype=torch.float32,
                                                    output_loading_info=True)
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    assert hf.generation_config.eos_token_id == [M.IM_END, M.EOT] and hf.config.bos_token_id == M.EOT
    idx = torch.randint(0, m.config.vocab_size, (2, 200), generator=torch.Generator().manual_seed(3))
    idx[:, :8] = torch.tensor([M.EOT, M.IM_START, M.IM_END, M.PAD, 0, 1, 255, 263])  # pad_token_id's row too
    with torch.no_grad():
        ours, theirs = m(idx), hf(idx).logits
    tol = 1e-4 * max(1.0, ours.abs().max().item())
    assert (ours - theirs).abs().max().item() <= tol
    if yarn_on:  # the same weights without YaRN are far off: the comparison above really exercised YaRN
        plain = M.Transformer(M.ModelConfig(**{**M.asdict(m.config), "rope_scaling": None})).eval()
        plain.load_state_dict(m.state_dict())
        with torch.no_grad():
            assert (plain(idx) - theirs).abs().max().item() > 100 * tol, (plain(idx) - theirs).abs().max().item() / tol


def test_hf_roundtrip_bit_exact_shards_and_generations(tmp_path):
    # float32 export: load_hf reproduces every weight bit for bit, and the config
    m = _hf_model(24, True, bf16_exact=False, max_position_embeddings=256)     # 256 = 8 x 32, as exported
    M.export_hf(m, str(tmp_path / "f32"), dtype=torch.float32)
    back = M.load_hf(str(tmp_path / "f32"))
    assert _hf_same_weights(m, back) and back.config == m.config
    # default bf16 export: exactly the bf16-rounded weights, loaded as float32
    M.export_hf(m, str(tmp_path / "bf16"))
    rounded = M.Transformer(m.config)
    rounded.load_state_dict({k: v.bfloat16().float() for k, v in m.state_dict().items()})
    assert _hf_same_weights(rounded, M.load_hf(str(tmp_path / "bf16")))
    assert not _hf_same_weights(m, rounded)                                    # the rounding was real
    # sharded: every file within the limit (or one tensor alone), an index naming every tensor once
    d, limit = tmp_path / "sharded", 16 * 1024
    M.export_hf(m, str(d), max_shard_bytes=limit)
    from safetensors import safe_open
    index = _hf_json.loads((d / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (d / "model.safetensors").exists()
    assert sorted(index["weight_map"]) == sorted(M.hf_name(k) for k in m.state_dict())
    total = 0
    for f in files:
        with safe_open(str(d / f), "pt") as sf:
            sizes = [sf.get_tensor(k).numel() * 2 for k in sf.keys()]
            assert set(sf.keys()) == {k for k, v in index["weight_map"].items() if v == f}
        assert sum(sizes) <= limit or len(sizes) == 1
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    assert _hf_same_weights(rounded, M.load_hf(str(d)))
    M.export_hf(m, str(d))                          # re-export into the same folder: one file, no stale shards
    assert sorted(p.name for p in d.glob("model*")) == ["model.safetensors"]
    # a ckpt.pt and its export generate the same tokens (greedy), both through load_checkpoint
    mb = _hf_model(None, True, seed=1)
    M.save_checkpoint(str(tmp_path / "ckpt.pt"), mb)
    M.export_hf(M.load_checkpoint(str(tmp_path / "ckpt.pt")), str(tmp_path / "export"))
    a, b = M.load_checkpoint(str(tmp_path / "ckpt.pt")), M.load_checkpoint(str(tmp_path / "export"))
    assert _hf_same_weights(a, b)
    idx = torch.randint(0, 256, (2, 50), generator=torch.Generator().manual_seed(0))
    ga, gb = a.generate(idx, 30, stop_ids=()), b.generate(idx, 30, stop_ids=())
    assert ga == gb and len(ga[0]) == 30
    # the shipped `small` preset fits one file of <= 15 MiB
    M.export_hf(M.Transformer(M.PRESETS["small"]), str(tmp_path / "small"))
    assert sorted(p.name for p in (tmp_path / "small").glob("model*")) == ["model.safetensors"]
    assert (tmp_path / "small" / "model.safetensors").stat().st_size <= 15 * 2**20


def test_hf_tokenizer_ids_decode_and_chat_template(tmp_path):
    from transformers import AutoTokenizer
    M.export_hf(_hf_model(), str(tmp_path))
    tok, enc = AutoTokenizer.from_pretrained(str(tmp_path)), M.get_tokenizer()
    assert len(tok) == enc.n_vocab == 264
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (M.EOT, M.IM_END, M.PAD)
    table = ["", "hello world", "héllo  wörld", "naïve café Ångström", "🙂👍🏽👨‍👩‍👧", "中文字符 日本語 한국어",
             "tab\there\t\tend", "line\nbreak\r\n\n\nend\n", "runs     of      spaces   ", "   leading", "x  \n  y",
             "it's we'll I'M they've", "<|endoftext|>", "a<|im_end|>b<|im_start|>c", "text <|endoftext|> more",
             "<|pad|><|reserved_3|>", "<|not_special|>", "123 4567 8.9e-3", "\u00a0nbsp\u2003em\u200bzw",
             "\x00\x01\x7f control", "ﬁ ligature Ⅻ ½ ①", "a\u0301 combining", "🙂" * 5 + "<|im_end|>"]
    rng = _hf_random.Random(0)
    pool = "aZ9 \t\n'é中🙂\u00a0\u0301.,!" + "".join(M.SPECIAL_TOKENS[:3])
    table += ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(100)]
    for s in table:   # ids, not only round trips: a wrong byte order would still round-trip
        want = enc.encode(s, allowed_special="all")
        assert tok.encode(s, add_special_tokens=False) == want, s
        assert tok(s)["input_ids"] == want, s                     # nothing added around (no BOS)
        assert tok.decode(want) == s
    for _ in range(300):  # random ids, many of them invalid UTF-8 (lone continuation bytes, cut sequences)
        ids = [rng.choice([rng.randrange(264), rng.randrange(0x80, 0x100), rng.randrange(0x20, 0x7f)])
               for _ in range(rng.randint(1, 24))]
        assert tok.decode(ids) == enc.decode(ids, errors="replace"), ids
    chats = [[{"role": "user", "content": "hi"}],
             [{"role": "system", "content": "Be brief.\n"}, {"role": "user", "content": "héllo 🙂\nline 2"},
              {"role": "assistant", "content": "ok\n\n"}, {"role": "user", "content": "  spaces  "}]]
    for msgs in chats:
        for gen in (True, False):
            assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == M.chat_prompt(msgs, gen)


# The config keys vLLM's DeepSeek-V3 code reads for a dense MLA model (read statically; vLLM does not run
# here), from vllm/model_executor/models/deepseek_v2.py (DeepseekV2DecoderLayer, DeepseekV2MLAAttention,
# DeepseekV2Model(.load_weights), DeepseekV2ForCausalLM, get_spec_layer_idx_from_weight_name) and
# vllm/transformers_utils/model_arch_config_convertor.py (is_deepseek_mla, get_head_size,
# get_total_num_kv_heads, derive_max_model_len_and_key); rope_theta/rope_scaling become its rope_parameters.
_VLLM_KEYS = {
    "architectures": list, "model_type": str, "vocab_size": int, "hidden_size": int, "num_hidden_layers": int,
    "num_attention_heads": int, "num_key_value_heads": int, "intermediate_size": int, "hidden_act": str,
    "rms_norm_eps": float, "max_position_embeddings": int, "q_lora_rank": (int, type(None)), "kv_lora_rank": int,
    "qk_nope_head_dim": int, "qk_rope_head_dim": int, "v_head_dim": int,
    "n_routed_experts": int, "first_k_dense_replace": int, "moe_layer_freq": int, "routed_scaling_factor": float,
    "n_group": int, "num_nextn_predict_layers": int, "rope_theta": float, "rope_scaling": (dict, type(None)),
    # read only by MoE layers (none here), kept as DeepSeek-V3 integers
    "n_shared_experts": int, "moe_intermediate_size": int, "num_experts_per_tok": int, "topk_group": int,
    "norm_topk_prob": bool,
}
_VLLM_YARN_KEYS = {"rope_type": str, "factor": float, "original_max_position_embeddings": int, "beta_fast": float,
                   "beta_slow": float, "mscale": float, "mscale_all_dim": float}
_VLLM_MUST_BE_ABSENT = ["index_topk", "compress_ratios", "llama_4_scaling"]   # V3.2 indexer, V4, Llama-4 scaling


@pytest.mark.parametrize("q_lora,yarn_on", [(None, False), (24, True)])
def test_hf_config_has_every_key_vllm_reads(tmp_path, q_lora, yarn_on):
    m = _hf_model(q_lora, yarn_on)
    M.export_hf(m, str(tmp_path))
    c = _hf_json.loads((tmp_path / "config.json").read_text())
    for key, typ in _VLLM_KEYS.items():
        assert key in c and isinstance(c[key], typ) and not (typ is int and isinstance(c[key], bool)), key
    assert not any(k in c for k in _VLLM_MUST_BE_ABSENT) and "rope_parameters" not in c
    cfg = m.config
    assert c["architectures"] == ["DeepseekV3ForCausalLM"] and c["model_type"] == "deepseek_v3"
    assert c["hidden_act"] == "silu" and c["rope_interleave"] is True and c["tie_word_embeddings"] is False
    assert c["attention_bias"] is False and c["torch_dtype"] == "bfloat16"
    assert c["num_key_value_heads"] == c["num_attention_heads"] == cfg.num_attention_heads
    assert c["first_k_dense_replace"] == c["num_hidden_layers"] and c["num_nextn_predict_layers"] == 0
    assert c["q_lora_rank"] == q_lora and c["kv_lora_rank"] + c["qk_rope_head_dim"] == M.cache_width(cfg)
    assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (M.EOT, M.IM_END, M.PAD)
    tcfg = _hf_json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tcfg["tokenizer_class"] == "PreTrainedTokenizerFast" and tcfg["clean_up_tokenization_spaces"] is False
    assert tcfg["model_max_length"] == c["max_position_embeddings"] and "chat_template" in tcfg
    gen = _hf_json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [M.IM_END, M.EOT]
    if not yarn_on:
        assert c["rope_scaling"] is None and c["max_position_embeddings"] == cfg.max_position_embeddings
        return
    rs = c["rope_scaling"]
    for key, typ in _VLLM_YARN_KEYS.items():
        assert isinstance(rs[key], typ), key
    assert rs["type"] == rs["rope_type"] == "yarn" and rs["mscale"] == rs["mscale_all_dim"]
    assert c["max_position_embeddings"] == rs["factor"] * rs["original_max_position_embeddings"] == 256


def test_hf_errors_are_one_line_and_name_the_folder(tmp_path):
    with pytest.raises(ValueError, match="MHA"):
        M.export_hf(M.Transformer(_tiny_cfg(attn="mha")), str(tmp_path / "mha"))
    good = tmp_path / "good"
    M.export_hf(_hf_model(), str(good), max_shard_bytes=16 * 1024)
    cases = {}

    def case(name, why, edit):
        d = tmp_path / name
        d.mkdir()
        for f in good.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        edit(d)
        cases[name] = why

    def set_config(**kw):
        return lambda d: (d / "config.json").write_text(
            _hf_json.dumps({**_hf_json.loads((good / "config.json").read_text()), **kw}))

    case("foreign", "not 'deepseek_v3'", set_config(model_type="llama"))
    case("moe", "MoE", set_config(first_k_dense_replace=1))
    case("mismatch", "do not match", set_config(hidden_size=32))
    case("badjson", "not valid JSON", lambda d: (d / "config.json").write_text("{oops"))
    case("noweights", "no model.safetensors", lambda d: [p.unlink() for p in d.glob("model*")])
    case("lostshard", "unreadable", lambda d: next(d.glob("model-00002-*")).unlink())
    case("truncated", "unreadable", lambda d: next(d.glob("model-00001-*")).write_bytes(b"\x10\x00"))
    for name, why in cases.items():
        for load in (M.load_hf, M.load_checkpoint):   # load_checkpoint routes a folder with config.json here
            with pytest.raises(M.CheckpointError) as e:
                load(str(tmp_path / name))
            msg = str(e.value)
            assert str(tmp_path / name) in msg and why in msg and "\n" not in msg, msg
    with pytest.raises(M.CheckpointError, match="no config.json"):
        M.load_hf(str(tmp_path / "missing"))


# ============================================================================ mla kernel (issue 4)
import mla_kernel  # noqa: E402


def _kernel_case(B, H, R, P, page, lens, dtype, seed, num_splits=None, config=None, spare=1, preload=None):
    """Random queries and per-row keys, scattered into a paged cache through a shuffled block
    table whose spare pages hold random junk; returns (kernel output, float64 reference computed
    from the unpaged rows, kernel inputs)."""
    g = torch.Generator().manual_seed(seed)
    max_pages = max(1, -(-max(lens) // page)) + spare                   # spare pages a row
    num_blocks = B * max_pages + 2
    cache = torch.randn(num_blocks, page, R + P, generator=g).to(dtype)  # junk everywhere first
    block_table = torch.randperm(num_blocks, generator=g)[: B * max_pages].view(B, max_pages).int()
    rows = [torch.randn(n, R + P, generator=g).to(dtype) for n in lens]  # (n, R+P) per row
    for b, n in enumerate(lens):
        for t in range(n):
            cache[block_table[b, t // page], t % page] = rows[b][t]
    q_lat = torch.randn(B, H, R, generator=g).to(dtype)
    q_pe = torch.randn(B, H, P, generator=g).to(dtype)
    sm_scale = (R // 4 + P) ** -0.5
    ref = torch.zeros(B, H, R, dtype=torch.float64)
    for b, n in enumerate(lens):
        if n:
            c, k_pe = rows[b][:, :R].double(), rows[b][:, R:].double()
            s = (q_lat[b].double() @ c.T + q_pe[b].double() @ k_pe.T) * sm_scale  # (H, n)
            ref[b] = torch.softmax(s, -1) @ c
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    out = torch.full((B, H, R), float("nan"), dtype=dtype)               # poison: every element must be written
    mla_kernel.mla_decode(q_lat, q_pe, cache, block_table, seq_lens, sm_scale, out=out, num_splits=num_splits,
                          config=config, preload=preload)
    return out, ref, (q_lat, q_pe, cache, block_table, seq_lens, sm_scale)


def _rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("B,H,R,P,page,lens,dtype,splits", [
    (3, 3, 64, 32, 16, [37, 100, 1], torch.bfloat16, None),     # tiny preset widths, odd lengths, 3 heads
    (2, 16, 64, 32, 32, [600, 333], torch.float16, None),        # auto splits > 1: merge pass
    (3, 1, 64, 32, 64, [64, 130, 191], torch.bfloat16, 4),       # one head, page 64, forced splits
    (2, 16, 512, 64, 16, [50, 17], torch.float16, None),         # DeepSeek-V3 widths, page 16 < tile
    (1, 16, 256, 64, 64, [300], torch.bfloat16, 3),              # small preset widths: merge by whole rows
    (1, 4, 256, 64, 64, [300], torch.bfloat16, 3),               # B x H < SMs: merge by 64-column slices
])
def test_kernel_matches_float64(B, H, R, P, page, lens, dtype, splits):
    out, ref, _ = _kernel_case(B, H, R, P, page, lens, dtype, seed=B * 1000 + H * 10 + R, num_splits=splits)
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite output elements"
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3  # bf16 output rounding alone is ~3e-3
    assert _rel_err(out, ref) < tol


def test_kernel_fresh_inputs_and_splits_agree():
    # same function on different random draws; neither the split count nor the tile config (tiles wider and
    # narrower than a page, 1 or 2 stages) changes the result, also when the rows fill their tables exactly
    for seed, spare in ((1, 1), (2, 0)):
        outs = [_kernel_case(2, 16, 64, 32, 16, [257, 90], torch.float16, seed, num_splits=s, config=c, spare=spare)
                for s in (1, 5) for c in ((32, 4, 1), (32, 4, 2), (16, 4, 1))]
        for out, ref, _ in outs:
            assert _rel_err(out, ref) < 2e-3
        for out, _, _ in outs[1:]:
            assert (outs[0][0].float() - out.float()).abs().max().item() < 2e-3


@pytest.mark.parametrize("page,splits,config", [
    (64, 3, (32, 4, 2)),     # splits of 256 tokens: 4 pages each, two tiles a page
    (128, 4, (64, 4, 2)),    # splits of 192 tokens: every other split starts mid-page
])
def test_kernel_preloaded_page_ids_match_float64(page, splits, config):
    # large batches take each split's page ids from registers (loaded before the tile loop): same result
    lens = [600, 333, 0, 65]
    out, ref, _ = _kernel_case(4, 16, 64, 32, page, lens, torch.float16, seed=page, num_splits=splits, config=config,
                               preload=True)
    assert torch.isfinite(out).all()
    assert _rel_err(out, ref) < 2e-3
    plain, _, _ = _kernel_case(4, 16, 64, 32, page, lens, torch.float16, seed=page, num_splits=splits, config=config,
                               preload=False)
    assert (out.float() - plain.float()).abs().max().item() < 2e-3


def test_kernel_empty_row_gives_zeros():
    for splits in (1, 3):
        out, ref, _ = _kernel_case(3, 3, 64, 32, 16, [40, 0, 70], torch.bfloat16, seed=7, num_splits=splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert _rel_err(out[[0, 2]], ref[[0, 2]]) < 1e-2


def test_kernel_reference_matches_float64():
    out, ref, args = _kernel_case(2, 3, 64, 32, 16, [45, 0], torch.bfloat16, seed=11)
    assert _rel_err(mla_kernel.mla_decode_ref(*args), ref) < 1e-2
    q_lat, q_pe, cache, bt, sl, scale = args
    ref64 = mla_kernel.mla_decode_ref(q_lat.double(), q_pe.double(), cache.double(), bt, sl, scale)
    assert _rel_err(ref64, ref) < 1e-12


def test_kernel_rejects_bad_shapes():
    q_lat, q_pe = torch.randn(1, 2, 64).bfloat16(), torch.randn(1, 2, 32).bfloat16()
    bt, sl = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="cache width"):
        mla_kernel.mla_decode(q_lat, q_pe, torch.randn(1, 16, 64 + 16).bfloat16(), bt, sl, 0.1)
    with pytest.raises(ValueError, match="page size"):
        mla_kernel.mla_decode(q_lat, q_pe, torch.randn(1, 24, 96).bfloat16(), bt, sl, 0.1)
    with pytest.raises(ValueError, match="int32"):
        mla_kernel.mla_decode(q_lat, q_pe, torch.randn(1, 16, 96).bfloat16(), bt.long(), sl, 0.1)


def test_kernel_split_count_heuristic():
    # B=1 at 128k on 132 SMs: one split per CTA slot; a full batch: no splits; short rows: few splits
    assert mla_kernel.num_kv_splits(1, 1, 131072, 132, ctas_per_sm=2) == 264
    assert mla_kernel.num_kv_splits(64, 2, 131072, 132) == 1
    assert mla_kernel.num_kv_splits(16, 1, 131072, 132, ctas_per_sm=2) == 16
    assert mla_kernel.num_kv_splits(1, 1, 1024, 132) == 16      # short caches: 64-token splits
    assert mla_kernel.num_kv_splits(1, 1, 16384, 132, ctas_per_sm=2) == 128
    assert mla_kernel.num_kv_splits(64, 1, 640, 132, ctas_per_sm=1) == 2     # mla_decode's large batches
    assert [mla_kernel.head_group(h) for h in (1, 3, 16, 17, 64, 100, 128)] == [16, 16, 16, 32, 64, 64, 64]


@pytest.mark.parametrize("M", [1, 3, 17])   # the GEMV, the few-row GEMV, tl.dot
def test_fused_linear_matches_float64(M):
    g = torch.Generator().manual_seed(M)
    x, w, gam = torch.randn(M, 96, generator=g), torch.randn(80, 96, generator=g) / 10, torch.rand(96, generator=g) + 0.5
    xd, wd = x.double(), w.double()
    xn = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * gam.double()            # RMSNorm in float64
    gate, up = (xn @ wd.T).chunk(2, -1)
    silu = gate * torch.sigmoid(gate)
    res = torch.randn(M, 40, generator=g)
    h = res.clone()
    cases = [(mla_kernel.fused_linear(x, w), xd @ wd.T),
             (mla_kernel.fused_linear(x, w, norm=gam), xn @ wd.T),
             (mla_kernel.fused_linear(x, w, norm=gam, swiglu=True), silu * up),
             (mla_kernel.fused_linear(x, w[:40], out=h, residual=h), res.double() + xd @ wd[:40].T),   # in place
             # num_stages 2: Triton pipelines the weight loads (1, above: the hand-written double buffer)
             (mla_kernel.fused_linear(x, w, norm=gam, config=(min(64, 1 << (M - 1).bit_length()), 16, 32, 4, 2)),
              xn @ wd.T)]
    G, K, N, stride = 4, 24, 20, 30      # per-group weights (G, K, N) as a strided (G, N, K) view, x groups 30 apart
    xg, wg = torch.randn(M, G * stride, generator=g), torch.randn(G, K, N, generator=g)
    cases.append((mla_kernel.fused_linear(xg, wg.transpose(1, 2), x_group_stride=stride),
                  torch.einsum("mgk,gkn->mgn", xg.view(M, G, stride)[..., :K].double(), wg.double()).reshape(M, -1)))
    for got, want in cases:
        assert got.shape == want.shape and _rel_err(got, want) < 1e-5
    assert h.data_ptr() == cases[3][0].data_ptr()


def test_rope_and_swiglu_kernels_match_float64():
    # prefill's elementwise tails (model.py calls them when serving on a GPU) == model.py's PyTorch code in float64
    g = torch.Generator().manual_seed(5)
    base = torch.randn(2, 7, 3, 40, generator=g).bfloat16()
    x = base[..., 8:24]                                                    # (B, T, H, 16): strided, as q's rope part
    cos, sin = M.rope_cos_sin(1.0 / 1e4 ** (torch.arange(0, 16, 2) / 16), torch.arange(7)[None].expand(2, 7) + 30)
    want = M.apply_rope(x.double(), cos.double(), sin.double())
    assert _rel_err(mla_kernel.rope(x, cos, sin), want) < 1e-2               # bf16 output rounding
    before = base.clone()
    mla_kernel.rope(x, cos, sin, out=x)                                     # in place, neighbours untouched
    assert _rel_err(x, want) < 1e-2
    assert torch.equal(base[..., :8], before[..., :8]) and torch.equal(base[..., 24:], before[..., 24:])
    x6 = torch.randn(2, 37, 5, 12, generator=g)    # D/2 = 6: not a power of two; token blocks of 8 straddle the rows
    c6, s6 = M.rope_cos_sin(1.0 / 1e4 ** (torch.arange(0, 12, 2) / 12), torch.arange(37)[None].expand(2, 37))
    assert _rel_err(mla_kernel.rope(x6, c6, s6), M.apply_rope(x6.double(), c6.double(), s6.double())) < 1e-6
    gu = torch.randn(3, 5, 2 * 1100, generator=g)                          # N = 1100: two blocks, the second ragged
    gate, up = gu.double().chunk(2, -1)
    assert _rel_err(mla_kernel.swiglu(gu), gate * torch.sigmoid(gate) * up) < 1e-6
    # RMSNorm on views of [q_a | c | k_pe] rows (strided, as prefill's), widths 24 and 1100 (blocks of several rows
    # and one ragged row) and 5 rows (the last block of rows ragged): (x / rms(x)) * weight in float64
    qck = torch.randn(5, 3, 24 + 1100 + 7, generator=g)
    for x, w in ((qck[..., :24], torch.randn(24, generator=g)), (qck[..., 24:1124], torch.randn(1100, generator=g))):
        xd = x.double()
        got = mla_kernel.rms_norm(x, w, 1e-6)
        assert got.is_contiguous() and _rel_err(got, xd / (xd.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w.double()) < 1e-6


def test_write_rows_kernel_matches_index_put():
    # model.cache_write's CUDA kernel == its PyTorch index_put: rows land at their slots, every other slot keeps
    # its bytes; W = 40 is not a power of two. (bf16 rows, as serving's: the interpreter truncates fp32 -> bf16.)
    g = torch.Generator().manual_seed(6)
    kv = torch.randn(6, 4, 40, generator=g).bfloat16()
    slots = torch.randperm(24, generator=g)[:10].view(2, 5)
    rows = torch.randn(2, 5, 40, generator=g).bfloat16()
    want = kv.clone()
    want.view(-1, 40)[slots] = rows
    mla_kernel.write_rows(kv, slots, rows)
    assert torch.equal(kv, want)


def test_append_latent_kernel_matches_float64():
    # model.cache_append's CUDA kernel: [RMSNorm(c) * gamma | RoPE(k_pe)] of each token, computed in float64, lands
    # at its slot (bf16 rounding), every other slot keeps its bytes. ckv is a strided view, as [q_a | c | k_pe]'s.
    g = torch.Generator().manual_seed(7)
    B, T, R, P = 2, 3, 32, 16
    kv = torch.randn(5, 4, R + P, generator=g).bfloat16()
    slots = torch.randperm(20, generator=g)[:B * T].view(B, T)
    ckv = torch.randn(B, T, 8 + R + P, generator=g).bfloat16()[..., 8:]
    gamma = torch.randn(R, generator=g)
    cos, sin = M.rope_cos_sin(1.0 / 1e4 ** (torch.arange(0, P, 2) / P), torch.arange(T)[None].expand(B, T) + 40)
    c, k_pe = ckv.double().split([R, P], dim=-1)
    rows = torch.cat([c / (c.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * gamma.double(),
                      M.apply_rope(k_pe[:, :, None], cos.double(), sin.double())[:, :, 0]], dim=-1)
    before = kv.clone()
    mla_kernel.append_latent(kv, slots, ckv, gamma, 1e-6, cos, sin)
    assert _rel_err(kv.view(-1, R + P)[slots], rows) < 1e-2
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[slots.view(-1)] = False
    assert torch.equal(kv.view(-1, R + P)[untouched], before.view(-1, R + P)[untouched])


def test_merge_uv_matches_float64():
    # the attention's splits merged inside the W_UV product == W_UV . (float64 attention)
    for splits in (2, 3):
        _, ref, args = _kernel_case(2, 4, 64, 32, 16, [150, 37], torch.bfloat16, seed=splits)
        parts = mla_kernel.mla_decode(*args, num_splits=splits, partials=True)
        assert isinstance(parts, tuple) and parts[0].shape[2] == splits
        w = torch.randn(4, 32, 64).bfloat16()                                # W_UV (H, DV, R)
        got = mla_kernel.merge_uv(*parts, w, torch.bfloat16)                  # (B, H * DV)
        want = torch.einsum("bhr,hvr->bhv", ref, w.double()).reshape(2, -1)
        assert _rel_err(got, want) < 1e-2                                   # bf16 o_lat and output roundings
    assert not isinstance(mla_kernel.mla_decode(*args, num_splits=1, partials=True), tuple)   # one split: o_lat


@pytest.mark.parametrize("q_lora_rank", [None, 48])
def test_fused_decode_matches_model_forward(q_lora_rank):
    # serve.fused_decode (fused_linear + mla_absorb, ~8 kernels a layer) == model.forward's absorbed decode in float64:
    # logits and the cache row it appends, rows of different lengths
    import serve
    torch.manual_seed(0)
    cfg = M.ModelConfig(num_hidden_layers=2, q_lora_rank=q_lora_rank)
    model = M.fuse_projections(M.Transformer(cfg).eval())
    with torch.no_grad():
        for p in model.parameters():
            p += torch.randn_like(p) * 0.02
        cache = M.new_cache(cfg, 3, 128, page=16)
        model(torch.randint(0, cfg.vocab_size, (3, 40)), cache=cache)
        cache.seq_lens.copy_(torch.tensor([40, 17, 33], dtype=torch.int32))
        idx, lens, kv = torch.randint(0, cfg.vocab_size, (3,)), cache.seq_lens.clone(), cache.kv.clone()
        rope = [t[0] for t in M.rope_cos_sin(model.inv_freq, torch.arange(128)[None])]
        got = serve.fused_decode(model, idx, kv, cache.block_table, lens, rope)
        model.double()
        ref_cache = M.Cache(cache.kv.double(), cache.block_table, lens.clone())
        want = model(idx[:, None], cache=ref_cache)[:, -1]
    assert serve.fused_fits(cfg) and not serve.fused_fits(_dataclasses.replace(cfg, kv_lora_rank=96))
    assert _rel_err(got, want) < 1e-5
    assert (kv.double() - ref_cache.kv).abs().max().item() < 1e-5



# ============================================================================ needle (issue 5)
import dataclasses as _dataclasses  # noqa: E402
import json as _json  # noqa: E402
import re as _re  # noqa: E402
import subprocess as _subprocess  # noqa: E402

import numpy as np  # noqa: E402

import judge  # noqa: E402
import needle  # noqa: E402

_NEEDLE_RE = _re.compile(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.")


@pytest.fixture
def _one_thread():
    # tiny models on a shared 2-core box: a second OpenMP thread only spins against other processes
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _context(prompt):
    """The haystack with the needles: between the instruction line and the question line."""
    body = prompt.removeprefix("<|im_start|>user\n").removesuffix("<|im_end|>\n<|im_start|>assistant\n")
    first, rest = body.split("\n", 1)
    context, question = rest.rsplit("\n", 1)
    assert first.endswith("afterwards.") and question.startswith("What ")
    return context


def _check_sample(s, L, depth, variant):
    tok = M.get_tokenizer()
    ids = tok.encode(s["prompt"], allowed_special="all")
    assert len(ids) == L and s["length"] == L                       # exact, by the real tokenizer
    assert (needle.encode(s["prompt"]) == ids).all() and needle.n_tokens_of(s["prompt"]) == L
    assert s["prompt"].startswith("<|im_start|>user\n") and s["prompt"].endswith("<|im_start|>assistant\n")
    n_keys, n_vals, n_query = needle.SHAPES[variant]
    ctx = _context(s["prompt"])
    found = _NEEDLE_RE.findall(ctx)
    assert len(_re.findall(r"\d+", ctx)) == len(found)               # numbers occur only inside needles
    asked = [(k, v) for k, v in found if k in s["keys"]]
    others = [(k, v) for k, v in found if k not in s["keys"]]
    assert len(s["keys"]) == n_query and len(s["values"]) == n_query * n_vals == len(asked)
    assert sorted(v for _, v in asked) == sorted(s["values"])        # every value once, under its own key
    if variant == "multiquery":
        assert dict(asked) == dict(zip(s["keys"], s["values"]))
    assert all(k not in s["keys"] and v not in s["values"] for k, v in others)   # distractors differ
    if s["haystack"] != "needle":
        assert len(others) == n_keys - n_query                        # multikey's three distractor keys
    assert needle.score(s["answer"], s["values"]) == 1.0 and s["question"] in s["prompt"]
    # the asked needles form one block at depth% of the haystack (within one sentence)
    sents = [m.start() for m in _NEEDLE_RE.finditer(ctx) if m.group(1) in s["keys"]]
    block = " ".join(m.group(0) for m in _NEEDLE_RE.finditer(ctx) if m.group(1) in s["keys"])
    start = ctx.index(block)
    assert start == sents[0]
    hay = ctx[:start] + ctx[start + len(block):]
    longest = max(len(x) for x in _re.split(r"(?<=\.) ", hay)) + 1 if hay.strip() else 0
    assert abs(start - depth / 100 * len(hay)) <= longest + 1, (start, depth, len(hay))
    if depth == 0:
        assert start == 0
    if depth == 100:
        assert ctx.endswith(block)


@pytest.mark.parametrize("variant", needle.VARIANTS)
def test_needle_exact_length_depth_and_contents(variant):
    lengths = sorted({needle.min_tokens(variant), 1000, 4096} | ({300} if variant == "single" else set()))
    for haystack in needle.HAYSTACKS:
        for L in lengths:
            for i, depth in enumerate((0, 33, 50, 71.5, 100)):
                s = needle.make_sample(L, depth, variant, haystack, seed=i)
                assert (s["variant"], s["haystack"], s["depth"], s["seed"]) == (variant, haystack, depth, i)
                _check_sample(s, L, depth, variant)


def test_needle_long_prompts_and_seeds():
    for haystack in needle.HAYSTACKS:
        s = needle.make_sample(131072, 25, "multivalue", haystack, seed=7)
        _check_sample(s, 131072, 25, "multivalue")
    s = needle.make_sample(1 << 20, 90, "single", "essay", seed=1)     # 1M: 1 MB of prompt
    assert len(M.get_tokenizer().encode(s["prompt"], allowed_special="all")) == 1 << 20
    a, b = needle.make_sample(2000, 40, "multikey", "needle", 5), needle.make_sample(2000, 40, "multikey", "needle", 5)
    assert a == b                                                       # same seed -> same sample
    c = needle.make_sample(2000, 40, "multikey", "needle", 6)
    assert set(c["values"]).isdisjoint(a["values"]) and c["keys"] != a["keys"] and c["prompt"] != a["prompt"]
    d = needle.make_sample(3000, 80, "multikey", "needle", 5)           # same seed, other cell: same needle
    assert (d["keys"], d["values"], d["answer"]) == (a["keys"], a["values"], a["answer"])
    assert needle.min_tokens("single") <= 300
    for bad in [dict(n_tokens=450, depth=50, variant="multiquery"), dict(n_tokens=250, depth=50),
                dict(n_tokens=1000, depth=101), dict(n_tokens=1000, depth=-1), dict(n_tokens=1000, depth=0, variant="x"),
                dict(n_tokens=1000, depth=0, haystack="x")]:
        with pytest.raises(ValueError):
            needle.make_sample(**bad)


def test_needle_score_table():
    cases = [("The special magic number for x is 1234567.", ["1234567"], 1.0),
             ("", ["1234567"], 0.0),
             ("no numbers here at all", ["1234567"], 0.0),
             ("123456", ["1234567"], 0.0),                                   # a prefix is not the value
             ("the values are 1111111 and 3333333.", ["1111111", "2222222", "3333333", "4444444"], 0.5),
             ("4444444, 3333333, 2222222, 1111111", ["1111111", "2222222", "3333333", "4444444"], 1.0),
             ("APPLE-pie", ["apple-PIE"], 1.0),                              # case-insensitive
             ("1111111 1111111 1111111", ["1111111", "2222222", "3333333"], 1 / 3)]
    for pred, values, want in cases:
        assert needle.score(pred, values) == pytest.approx(want), (pred, values)


def test_needle_training_batch():
    tok = M.get_tokenizer()
    B, T = 12, 1024
    idx, tgt, pos = needle.training_batch(B, T, step=3, seed=1)
    assert idx.shape == tgt.shape == pos.shape == (B, T) and idx.dtype == tgt.dtype == pos.dtype == torch.long
    assert torch.equal(pos, torch.arange(T).expand(B, T))             # no max_pos: plain positions
    lens, shapes = [], set()
    for b in range(B):
        m = tgt[b] != -1
        first, last = int(m.nonzero()[0]), int(m.nonzero()[-1])
        assert m[first:last + 1].all()                                  # one contiguous span
        n = first + 1                                                   # prompt length
        prompt = tok.decode(idx[b, :n].tolist())
        assert prompt.endswith("<|im_start|>assistant\n") and len(tok.encode(prompt, allowed_special="all")) == n
        assert torch.equal(tgt[b, first:last + 1], idx[b, first + 1:last + 2])   # next tokens
        assert (idx[b, last + 2:] == M.PAD).all()
        target = tok.decode(tgt[b, m].tolist())
        assert target.endswith("<|im_end|>") and int(tgt[b, last]) == M.IM_END
        # the answer, rebuilt from the prompt alone: the asked keys' values in the question's order
        q = _re.search(r"special magic numbers? for (.+) mentioned in the provided text\?<\|im_end\|>", prompt).group(1)
        keys = _re.split(r", and |, ", q)
        pairs = _NEEDLE_RE.findall(_context(prompt))
        vals = [v for k in keys for kk, v in pairs if kk == k]
        if len(keys) == 1 and len(vals) > 1:
            shapes.add("multivalue")
        noun, verb = ("number", "is") if len(vals) == 1 else ("numbers", "are")
        assert target == f"The special magic {noun} for {q} {verb}: {', '.join(vals)}.<|im_end|>"
        lens.append(last + 2)
    assert len(set(lens)) > B // 2 and max(lens) <= T                   # mixed lengths
    # deterministic in (seed, step, rank, world); one global stream whatever the world size
    again = needle.training_batch(B, T, step=3, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(again, (idx, tgt, pos)))
    assert not torch.equal(needle.training_batch(B, T, step=4, seed=1)[0], idx)
    assert not torch.equal(needle.training_batch(B, T, step=3, seed=2)[0], idx)
    r1 = needle.training_batch(4, T, step=3, rank=1, world=2)
    assert all(torch.equal(x, y) for x, y in zip(r1, needle.training_batch(4, T, step=7)))   # (3*2+1)*4 = 7*4
    assert not torch.equal(r1[0], needle.training_batch(4, T, step=3, rank=0, world=2)[0])
    # PoSE: strictly increasing, within [0, max_pos), reaching past the window; answer positions contiguous
    max_pos = 1 << 16
    idx2, tgt2, pos2 = needle.training_batch(B, T, step=3, seed=1, max_pos=max_pos)
    assert torch.equal(idx2, idx) and torch.equal(tgt2, tgt)
    assert (pos2.diff(dim=1) > 0).all() and (pos2[:, 0] == 0).all() and int(pos2.max()) < max_pos
    assert (pos2[:, -1] >= T).sum() >= B - 1 and (pos2.diff(dim=1) > 1).any(dim=1).sum() >= B - 1
    for b in range(B):   # jumps only inside the haystack: instruction, question and answer stay contiguous
        nl = (idx2[b] == ord("\n")).nonzero()[:, 0].tolist()
        assert len(nl) == 5                         # user\n, after the instruction, before the question, 2 in the template
        end = int((tgt2[b] != -1).nonzero()[-1]) + 2
        assert (pos2[b, :nl[1] + 1].diff() == 1).all() and (pos2[b, nl[2]:end].diff() == 1).all()
    # configurable mix; windows too short for a variant leave it out, too short for all -> error
    _, t3, _ = needle.training_batch(6, 1024, 0, variants=("multivalue",), haystacks=("essay",))
    for b in range(6):
        assert len(_re.findall(r"\d{7}", tok.decode(t3[b][t3[b] != -1].tolist()))) == 4
    i4, t4, _ = needle.training_batch(8, 420, 0)                       # only single fits in 420 tokens
    assert all(len(_re.findall(r"\d{7}", tok.decode(t4[b][t4[b] != -1].tolist()))) == 1 for b in range(8))
    with pytest.raises(ValueError):
        needle.training_batch(2, 200, 0)


def _tiny_needle_model(attn="mla", dtype=torch.float32):
    cfg = M.ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, attn=attn)
    torch.manual_seed(0)
    return M.Transformer(cfg).to(dtype).eval()


def test_needle_evaluate_matches_uncached_greedy(_one_thread):
    tok = M.get_tokenizer()
    for attn in ("mla", "mha"):
        m = _tiny_needle_model(attn, torch.float64)
        rows = needle.evaluate(m, [300, 320], [0, 100], samples=2, variant="single", haystack="essay", seed=4,
                               max_new_tokens=6, log=False)
        assert [(r["length"], r["depth"], r["seed"]) for r in rows] == [(L, d, 4 + i) for L in (300, 320) for d in (0, 100)
                                                                        for i in range(2)]
        one = needle.evaluate(m, [300, 320], [0, 100], samples=2, variant="single", haystack="essay", seed=4,
                              max_new_tokens=6, batch_tokens=1, log=False)             # batch of one: same answers
        assert [r["prediction"] for r in one] == [r["prediction"] for r in rows]
        for r in rows[:2] + rows[-1:]:
            s = needle.make_sample(r["length"], r["depth"], "single", "essay", r["seed"])
            assert "prompt" not in r and r["values"] == s["values"] and r["question"] == s["question"]
            ids = torch.tensor([tok.encode(s["prompt"], allowed_special="all")])
            out = []
            for _ in range(6):   # reference: greedy by full forward passes, no cache
                t = int(m(ids)[0, -1].argmax())
                if t in M.STOP_IDS:
                    break
                out.append(t)
                ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
            assert r["prediction"] == tok.decode(out)
            assert r["score"] == needle.score(r["prediction"], r["values"])
        sm = needle.summarize(rows)
        assert sm["accuracy"] == pytest.approx(sum(r["score"] for r in rows) / len(rows)) and sm["n"] == 8


def _kamradt_rgb(x):
    stops = [(0xF0, 0x49, 0x6E), (0xEB, 0xB8, 0x39), (0x0C, 0xD7, 0x9F)]     # red, yellow, green at 0, 0.5, 1
    i = min(int(x * 2), 1)
    f = x * 2 - i
    return [(a + (b - a) * f) / 255 for a, b in zip(stops[i], stops[i + 1])]


def test_needle_cli_json_and_heatmap(tmp_path, _one_thread):
    import matplotlib.image as mpimg
    M.save_checkpoint(str(tmp_path / "tiny" / "ckpt.pt"), _tiny_needle_model())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "needle.py"), "--ckpt=tiny/ckpt.pt", "--lengths=300,320", "--depths=0,50,100",
           "--samples=2", "--haystack=essay", "--max_new_tokens=12", "--out=results/n.json"]
    p = _subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert len([line for line in p.stderr.splitlines() if line.startswith("needle: cell ")]) == 6   # a line per cell
    data = _json.load(open(tmp_path / "results" / "n.json"))
    prov = data["provenance"]
    assert prov["card"] == "CPU" and prov["torch"] == torch.__version__ and prov["date"] and prov["git_commit"]
    assert "triton" in prov and "--lengths=300,320" in prov["command"]
    assert data["config"]["lengths"] == [300, 320] and data["config"]["depths"] == [0, 50, 100]
    assert len(data["samples"]) == 12
    for r in data["samples"]:
        assert {"length", "depth", "variant", "haystack", "seed", "question", "prediction", "values", "score"} <= set(r)
        assert "prompt" not in r and r["haystack"] == "essay"
        assert r["score"] == judge.string_match_all(r["prediction"], r["values"])
    assert data["summary"]["accuracy"] == pytest.approx(sum(r["score"] for r in data["samples"]) / 12)
    img = mpimg.imread(tmp_path / "results" / "n.png")
    assert img.ndim == 3 and img.shape[0] >= 300 and img.shape[1] >= 400
    assert len(np.unique(img.reshape(-1, img.shape[2]), axis=0)) > 50          # not blank
    for x in {v for row in data["summary"]["grid"] for v in row}:              # each cell's colour is drawn
        assert (np.abs(img[..., :3] - _kamradt_rgb(x)).max(axis=-1) < 3 / 255).sum() > 100, x
    # the same checkpoint for DPO pairs, through main() in-process
    os.chdir(tmp_path)
    try:
        assert needle.main(["--pairs", "--ckpt=tiny", "--lengths=500", "--depths=50", "--samples=2",
                            "--variant=multikey", "--max_new_tokens=4", "--out=results/p.jsonl"]) == 0
    finally:
        os.chdir(ROOT)
    pairs = [_json.loads(line) for line in open(tmp_path / "results" / "p.jsonl")]
    meta = _json.load(open(tmp_path / "results" / "p.meta.json"))
    assert len(pairs) == 2 and meta["pairs"] == 2 and meta["provenance"]["command"]
    for q in pairs:
        s = needle.make_sample(q["length"], q["depth"], q["variant"], q["haystack"], q["seed"])
        assert q["seed"] >= 1_000_000 and q["prompt"] == s["prompt"] and q["chosen"] == s["answer"]
        assert q["rejected"] == q["prediction"] and q["rejected_source"] == "model"   # a random model is wrong


def test_needle_rejected_when_model_is_right():
    for variant, haystack in (("multikey", "noise"), ("single", "needle"), ("multivalue", "noise")):
        s = needle.make_sample(2000, 50, variant, haystack, seed=3)
        w = needle._wrong_answer(s)
        assert needle.score(w, s["values"]) == 0.0 and w != s["answer"]
        assert w.split(": ")[0] == s["answer"].split(": ")[0]                  # same wording, other numbers
        new = _re.findall(r"\d{7}", w)
        if s["distractor_values"]:                                              # a distractor's value from the prompt
            assert all(v in s["prompt"] for v in new)
            assert all(v in s["distractor_values"] for v in new[:len(s["distractor_values"])])
        else:                                                                   # else one digit away
            for a, b in zip(new, s["values"]):
                assert sum(x != y for x, y in zip(a, b)) == 1 and a[0] != "0"


def test_needle_cli_errors(tmp_path, capsys):
    M.save_checkpoint(str(tmp_path / "m.pt"), _tiny_needle_model())
    ck = f"--ckpt={tmp_path / 'm.pt'}"
    bad = {"--lengths=-300": "--lengths", "--lengths=4x": "--lengths", "--depths=0,150": "--depths",
           "--depths=a": "--depths", "--variant=triple": "--variant", "--haystack=sand": "--haystack",
           "--samples=0": "--samples", "--lengths=100": "too short", "--bogus=1": "--bogus", "samples=3": "--key=value"}
    for arg, word in bad.items():
        with pytest.raises(SystemExit) as e:
            needle.main([ck, arg])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and word in err, (arg, err)
    os.chdir(tmp_path)   # no --ckpt and no default checkpoint here
    try:
        with pytest.raises(SystemExit) as e:
            needle.main([])
    finally:
        os.chdir(ROOT)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "python train.py" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        needle.main([f"--ckpt={tmp_path / 'junk.pt'}", "--lengths=300"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "junk.pt" in err
    # a real process: one line, no traceback, exit 2
    p = _subprocess.run([sys.executable, os.path.join(ROOT, "needle.py"), "--ckpt=missing.pt", "--lengths=300"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == "needle.py: error: checkpoint missing.pt: no such file", p.stderr
    with pytest.raises(SystemExit) as e:
        needle.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert all(f"--{f.name}=" in out for f in _dataclasses.fields(needle.NeedleConfig))


def test_needle_shipped_model(tmp_path):
    """checkpoints/infinitecontext-small is needle.py's default and retrieves at 1k, by our code and by
    transformers' DeepseekV3 on the same files (an independent implementation of the same weights)."""
    import transformers
    out = tmp_path / "shipped.json"
    p = _subprocess.run([sys.executable, os.path.join(ROOT, "needle.py"), "--lengths=1k", "--depths=0,100", "--samples=1",
                         f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    res = _json.loads(out.read_text())
    assert res["config"]["ckpt"] == "checkpoints/infinitecontext-small" and res["summary"]["accuracy"] == 1.0, res["samples"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, "checkpoints/infinitecontext-small"),
                                                           dtype=torch.float32).eval()
    s = needle.make_sample(1024, 50, seed=7)
    ids = torch.tensor(needle.encode(s["prompt"]))[None]
    with torch.no_grad():
        gen = hf.generate(ids, max_new_tokens=len(s["answer"]) + 1, do_sample=False)[0, ids.shape[1]:]
    text = bytes(t for t in gen.tolist() if t < 256).decode("utf-8", "replace")
    assert needle.score(text, s["values"]) == 1.0, (text, s["values"])



# ============================================================================ train (issue 6)
import json as _tjson  # noqa: E402
import re as _tre  # noqa: E402
import signal as _tsignal  # noqa: E402
import subprocess as _tsub  # noqa: E402
import time as _ttime  # noqa: E402

import numpy as _tnp  # noqa: E402

import train as T  # noqa: E402

# a model small enough that a CPU step takes milliseconds (the tiny preset's shape, scaled down)
_TRAIN_SMALL = ["--model.hidden_size=32", "--model.intermediate_size=64", "--model.num_hidden_layers=2",
                "--model.num_attention_heads=2", "--model.kv_lora_rank=16", "--model.qk_rope_head_dim=8",
                "--model.qk_nope_head_dim=8", "--model.v_head_dim=16"]
_TRAIN_TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _train_text(path, n_words=6000, seed=0):
    """Pseudo-English (a fixed vocabulary, random order): learnable byte statistics, nothing downloaded."""
    import random
    words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex the jovial king "
             "and many birds sing in the old forest near our small village").split()
    rng = random.Random(seed)
    text = " ".join(rng.choice(words) for _ in range(n_words)) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def _train_args(tmp, out, data, steps, *extra):
    return ([f"--out_dir={tmp / out}", f"--data={data}", f"--max_iters={steps}", "--seq_len=32", "--log_interval=1",
             "--warmup_iters=2", "--lr=3e-3", "--min_lr=3e-4", "--eval_samples=0", "--compile=False"]
            + _TRAIN_SMALL + list(extra))


def _train_losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(_tjson.loads, f)]


def _train_cli(args, cwd, torchrun=False, env=None, **kw):
    cmd = (_TRAIN_TORCHRUN if torchrun else [sys.executable]) + [os.path.join(ROOT, "train.py")] + args
    return _tsub.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300, **kw)


def _train_interrupt(args, cwd, at_step, torchrun=False):
    """Start a run, send SIGTERM once it has logged step `at_step`; (returncode, stdout)."""
    cmd = (_TRAIN_TORCHRUN if torchrun else [sys.executable]) + [os.path.join(ROOT, "train.py")] + args
    p = _tsub.Popen(cmd, cwd=cwd, stdout=_tsub.PIPE, stderr=_tsub.STDOUT, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if _tre.match(rf"step\s+{at_step}/", line):
            p.send_signal(_tsignal.SIGTERM)
            break
    rest, _ = p.communicate(timeout=120)
    return p.returncode, "".join(lines) + rest


@pytest.fixture(scope="module")
def train_fsdp_run(tmp_path_factory):
    """Six steps under torchrun, 2 processes (gloo), FSDP2 with gradient accumulation and activation
    checkpointing: 1 row per micro-batch x 2 micro-batches x 2 ranks = the global batch of 4."""
    tmp = tmp_path_factory.mktemp("train_fsdp")
    _train_text(tmp / "text.txt")
    args = _train_args(tmp, "fsdp", tmp / "text.txt", 6, "--batch_size=1", "--grad_accum=2", "--act_ckpt=True")
    r = _train_cli(args, tmp, torchrun=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return tmp, args


def test_train_fsdp_two_ranks_match_one_process(train_fsdp_run):
    """FSDP2 over 2 gloo ranks, and DDP over 2, give one plain process's losses and weights (same global
    batch, float32)."""
    tmp, args = train_fsdp_run
    r = _train_cli(_train_args(tmp, "single", tmp / "text.txt", 6, "--batch_size=4"), tmp)
    assert r.returncode == 0, r.stderr
    a, b = _train_losses(tmp / "fsdp"), _train_losses(tmp / "single")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    for (_, x), (_, y) in zip(a, b):
        assert abs(x - y) <= 2e-5 * abs(y), (a, b)
    assert b[-1][1] < b[0][1]                                    # it trained
    wa, wb = M.read_checkpoint(tmp / "fsdp" / "ckpt.pt"), M.read_checkpoint(tmp / "single" / "ckpt.pt")
    assert wa["step"] == wb["step"] == 6
    for k, v in wb["model"].items():
        torch.testing.assert_close(wa["model"][k], v, rtol=1e-4, atol=1e-6)
    for k, st in wb["optimizer"]["state"].items():              # optimizer state gathered from the shards
        torch.testing.assert_close(wa["optimizer"]["state"][k]["exp_avg_sq"], st["exp_avg_sq"], rtol=1e-3, atol=1e-12)
    # --parallel=ddp (bench.py's comparison row) on the same 2 ranks: the same losses and checkpoint too
    ddp = [a.replace("--out_dir=" + str(tmp / "fsdp"), "--out_dir=" + str(tmp / "ddp")) for a in args]
    r = _train_cli(ddp + ["--parallel=ddp"], tmp, torchrun=True)
    assert r.returncode == 0 and "DDP" in r.stdout, r.stdout + r.stderr
    for (_, x), (_, y) in zip(_train_losses(tmp / "ddp"), b):
        assert abs(x - y) <= 2e-5 * abs(y)
    wd = M.read_checkpoint(tmp / "ddp" / "ckpt.pt")
    for k, v in wb["model"].items():
        torch.testing.assert_close(wd["model"][k], v, rtol=1e-4, atol=1e-6)


def test_train_sigterm_resume_is_exact(tmp_path):
    """SIGTERM mid-run: exit 0 with a checkpoint; --resume=True then repeats the uninterrupted run's losses
    and ends with the same weights, bit for bit (one process)."""
    _train_text(tmp_path / "text.txt")
    full = _train_cli(_train_args(tmp_path, "full", tmp_path / "text.txt", 10, "--batch_size=4"), tmp_path)
    assert full.returncode == 0, full.stderr
    args = _train_args(tmp_path, "cut", tmp_path / "text.txt", 10, "--batch_size=4", "--ckpt_interval=0")
    rc, out = _train_interrupt(args, tmp_path, at_step=3)
    assert rc == 0, out
    stopped = M.read_checkpoint(tmp_path / "cut" / "ckpt.pt")["step"]
    assert 3 <= stopped < 10, out
    r = _train_cli(args + ["--resume=True"], tmp_path)
    assert r.returncode == 0 and f"at step {stopped}" in r.stdout, r.stdout + r.stderr
    assert _train_losses(tmp_path / "cut") == _train_losses(tmp_path / "full")
    a, b = M.read_checkpoint(tmp_path / "cut" / "ckpt.pt"), M.read_checkpoint(tmp_path / "full" / "ckpt.pt")
    assert all(torch.equal(a["model"][k], v) for k, v in b["model"].items())


def test_train_sigterm_under_torchrun_resumes_exactly(train_fsdp_run):
    """SIGTERM to torchrun (as train.sbatch sends it): both ranks stop at the same step and save; the
    resumed torchrun run repeats the uninterrupted FSDP run's losses exactly."""
    tmp, args = train_fsdp_run
    args = [a.replace(f"--out_dir={tmp / 'fsdp'}", f"--out_dir={tmp / 'fsdp_cut'}") for a in args]
    rc, out = _train_interrupt(args + ["--ckpt_interval=0"], tmp, at_step=2, torchrun=True)
    assert "SIGTERM: stopped at step" in out, out          # torchrun itself exits 1 on a signal (torch's choice)
    stopped = M.read_checkpoint(tmp / "fsdp_cut" / "ckpt.pt")["step"]
    assert 2 <= stopped < 6
    r = _train_cli(args + ["--resume=True"], tmp, torchrun=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _train_losses(tmp / "fsdp_cut") == _train_losses(tmp / "fsdp")


def test_train_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    """SIGKILL while a save is half written (IC_SAVE_PAUSE): ckpt.pt is still the previous, loadable one,
    and --resume=True continues from it."""
    _train_text(tmp_path / "text.txt")
    args = _train_args(tmp_path, "o", tmp_path / "text.txt", 2, "--batch_size=2")
    assert _train_cli(args, tmp_path).returncode == 0
    before = (tmp_path / "o" / "ckpt.pt").read_bytes()
    args4 = [a.replace("--max_iters=2", "--max_iters=4") for a in args] + ["--resume=True", "--ckpt_interval=1"]
    p = _tsub.Popen([sys.executable, os.path.join(ROOT, "train.py")] + args4, cwd=tmp_path,
                    env={**os.environ, "IC_SAVE_PAUSE": "120"}, stdout=_tsub.DEVNULL, stderr=_tsub.DEVNULL)
    try:
        deadline = _ttime.time() + 120
        while not [f for f in os.listdir(tmp_path / "o") if f.startswith("ckpt.pt.tmp")]:
            assert p.poll() is None and _ttime.time() < deadline
            _ttime.sleep(0.05)
        tmp_file = [f for f in os.listdir(tmp_path / "o") if f.startswith("ckpt.pt.tmp")][0]
        deadline = _ttime.time() + 30
        while os.path.getsize(tmp_path / "o" / tmp_file) == 0 and _ttime.time() < deadline:
            _ttime.sleep(0.05)                                  # the first half is on disk
        assert os.path.getsize(tmp_path / "o" / tmp_file) > 0
    finally:
        p.kill()
        p.wait()
    assert (tmp_path / "o" / "ckpt.pt").read_bytes() == before
    ck = M.read_checkpoint(tmp_path / "o" / "ckpt.pt")
    assert ck["step"] == 2
    M.load_checkpoint(str(tmp_path / "o" / "ckpt.pt"))
    r = _train_cli(args4, tmp_path)
    assert r.returncode == 0 and "at step 2" in r.stdout, r.stdout + r.stderr
    assert M.read_checkpoint(tmp_path / "o" / "ckpt.pt")["step"] == 4
    assert not [f for f in os.listdir(tmp_path / "o") if f.startswith("ckpt.pt.tmp")]   # the killed save's litter


def _wandb_records(path):
    """Records of a W&B transaction log (run-*.wandb): a 7-byte ':W&B' header, then LevelDB's log format
    (32 KiB blocks of chunks: crc32c u32, length u16, type u8 = FULL 1 / FIRST 2 / MIDDLE 3 / LAST 4),
    each record a wandb_internal_pb2.Record. (wandb >= 0.19 writes it from Go and has no Python reader.)"""
    import struct
    from wandb.proto import wandb_internal_pb2 as pb
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    recs, buf, off = [], b"", 7
    while off + 7 <= len(data):
        if 32768 - off % 32768 < 7:                        # a block's tail too short for a header: padding
            off += 32768 - off % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[off:off + 7])
        if kind == 0:
            break
        buf, off = buf + data[off + 7:off + 7 + n], off + 7 + n
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            recs.append(r)
            buf = b""
    return recs


def test_train_wandb_offline_summary(tmp_path):
    """--wandb_log=True without an API key: an offline run directory whose run.summary (read back from its
    transaction log) holds the values of the last JSONL record, and whose history holds every step."""
    pytest.importorskip("wandb")
    _train_text(tmp_path / "text.txt")
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR")}
    r = _tsub.run([sys.executable, os.path.join(ROOT, "train.py")]
                  + _train_args(tmp_path, "o", tmp_path / "text.txt", 3, "--batch_size=2", "--wandb_log=True"),
                  cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    runs = [d for d in os.listdir(tmp_path / "o" / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1, os.listdir(tmp_path / "o" / "wandb")
    run_dir = tmp_path / "o" / "wandb" / runs[0]
    log = [_tjson.loads(ln) for ln in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    summary, history = {}, []
    for rec in _wandb_records(next(run_dir.glob("run-*.wandb"))):
        kind = rec.WhichOneof("record_type")
        if kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): _tjson.loads(i.value_json) for i in rec.summary.update})
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): _tjson.loads(i.value_json) for i in rec.history.item})
    assert summary["_step"] == 3
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        assert summary[key] == pytest.approx(log[-1][key], rel=1e-12), key
    assert [h["_step"] for h in history] == [1, 2, 3]
    assert [h["loss"] for h in history] == pytest.approx([x["loss"] for x in log], rel=1e-12)


def test_train_text_file_loss_falls(tmp_path):
    """--data=FILE.txt: encoded once into out_dir/FILE.txt.bin (the UTF-8 bytes: the tokenizer is
    byte-level), random windows, loss on every token, and the loss falls; the .bin given directly
    trains the same batches."""
    text = _train_text(tmp_path / "text.txt")
    cfg = T.parse_args(_train_args(tmp_path, "o", tmp_path / "text.txt", 40, "--batch_size=8"))
    out = T.train(cfg)
    assert out["step"] == 40 and not out["preempted"]
    cache = tmp_path / "o" / "text.txt.bin"
    assert _tnp.array_equal(_tnp.fromfile(cache, dtype=_tnp.uint16), _tnp.frombuffer(text.encode(), _tnp.uint8))
    losses = [loss for _, loss in _train_losses(tmp_path / "o")]
    assert abs(losses[0] - math.log(264)) < 0.1, losses             # uniform at init: ln(vocab)
    assert losses[-1] < 0.6 * losses[0], losses
    cfg2 = T.parse_args(_train_args(tmp_path, "b", cache, 3, "--batch_size=8"))
    assert T.train(cfg2)["loss"] == pytest.approx(losses[2], rel=1e-6)


def test_train_needle_batches_trim_is_exact():
    """needle batches drop the padded columns after the last target: the summed loss is unchanged."""
    needle = pytest.importorskip("needle")
    cfg = T.parse_args(["--seq_len=400", "--batch_size=3", "--grad_accum=2"] + _TRAIN_SMALL)
    torch.manual_seed(0)
    m = M.Transformer(T.model_config(cfg))
    get = T.needle_batches(cfg)
    idx, targets, pos = get(5, 1, 0, 2)
    full = needle.training_batch(3, 400, 5, seed=cfg.seed, rank=2, world=4, variants=["single"], haystacks=["noise"])
    assert idx.shape[1] < 400 and torch.equal(full[0][:, :idx.shape[1]], idx)
    assert (full[1][:, idx.shape[1]:] == -1).all()
    a, n, _ = T.lm_loss(m, (idx, targets, pos))
    b, n2, _ = T.lm_loss(m, full)
    assert n == n2 > 0 and a.item() == pytest.approx(b.item(), rel=1e-5)
    # compiled runs keep the full width (a new width would recompile): the very same batch, untrimmed
    fixed = T.needle_batches(T.parse_args(["--seq_len=400", "--batch_size=3", "--grad_accum=2", "--compile=True"]
                                          + _TRAIN_SMALL))(5, 1, 0, 2)
    assert all(torch.equal(x, y) for x, y in zip(fixed, full))


def test_train_row_exact_metric():
    """lm_loss's row_exact: a row counts only when every target is the argmax. Targets made from the model's own
    argmax (row 0), the same with one target changed (row 1), all ignored but one wrong (row 2): 1/3."""
    torch.manual_seed(0)
    m = M.Transformer(M.PRESETS["tiny"]).eval()
    idx = torch.randint(0, 256, (3, 12))
    with torch.no_grad():
        best = m(idx).argmax(-1)                                             # (3, 12)
    targets = best.clone()
    targets[1, 5] = (best[1, 5] + 1) % 256
    targets[2] = -1
    targets[2, 7] = (best[2, 7] + 1) % 256
    targets[0, :4] = -1
    with torch.no_grad():
        loss, n, metrics = T.lm_loss(m, (idx, targets, None))
    assert int(n) == 8 + 12 + 1 and metrics["row_exact"][1] == 3 and int(metrics["row_exact"][0]) == 1


def test_train_lr_schedule_closed_form():
    cfg = T.TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert T.get_lr(0, cfg) == pytest.approx(1 / 11) and T.get_lr(9, cfg) == pytest.approx(10 / 11)
    assert T.get_lr(10, cfg) == pytest.approx(1.0)
    assert T.get_lr(60, cfg) == pytest.approx(0.55)                    # halfway down the cosine
    assert T.get_lr(35, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert T.get_lr(110, cfg) == T.get_lr(500, cfg) == pytest.approx(0.1)


def test_train_bad_config_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """Unknown key, wrong type, unknown preset, unreadable checkpoint or data file, missing wandb: one
    line on stderr naming the problem, exit code 2, no traceback (two cases as real processes, the rest
    through main() in this process to save interpreter start-ups). --help lists every key."""
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint at all")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "ckpt.pt").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    cli = [(["--nope=1"], "unknown config key --nope"),
           ([f"--init_from={tmp_path / 'bad.pt'}"], "not a readable torch checkpoint")]
    procs = [_tsub.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args, "--max_iters=1"], cwd=tmp_path,
                         stdout=_tsub.PIPE, stderr=_tsub.PIPE, text=True) for args, _ in cli]
    cases = [(["--max_iters=ten"], "--max_iters='ten' is not a valid int"),
             (["--resume=maybe"], "not a valid bool"),
             (["--preset=huge"], "--preset='huge' is not a preset"),
             (["--model.hidden_size=big"], "not a valid int"),
             (["--model.flux=1"], "unknown model field --model.flux"),
             (["--model.attn=gqa"], "attn must be"),
             (["max_iters=3"], "expected --key=value"),
             ([f"--init_from={tmp_path / 'missing.pt'}"], "no such file"),
             ([f"--out_dir={tmp_path / 'o'}", "--resume=True"], "not a readable torch checkpoint"),
             ([f"--data={tmp_path / 'missing.txt'}"], "no such file"),
             ([f"--data={tmp_path / 'latin1.txt'}", f"--out_dir={tmp_path / 'o2'}"], "not UTF-8"),
             (["--wandb_log=True"], "wandb is not installed")]
    monkeypatch.chdir(tmp_path)
    for args, want in cases:
        with monkeypatch.context() as mp:
            if args == ["--wandb_log=True"]:
                mp.setitem(sys.modules, "wandb", None)         # import wandb -> ImportError
            assert T.main(args + ["--max_iters=1"]) == 2, args
        out, err = capsys.readouterr()
        assert len(err.strip().splitlines()) == 1 and err.startswith("train.py: error:") and want in err, (args, err)
    for (args, want), p in zip(cli, procs):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 2, (args, out, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)
        assert err.startswith("train.py: error:") and want in err, (args, err)
    with pytest.raises(SystemExit) as e:
        T.parse_args(["--help"])
    assert e.value.code == 0
    h = capsys.readouterr().out
    for f in T.fields(T.TrainConfig):
        if f.name != "model":
            assert f"--{f.name}=" in h, f.name
    for f in T.fields(M.ModelConfig):
        assert f"--model.{f.name}=" in h, f.name


# ============================================================================ dpo (issue 7)
import json as _dpo_json  # noqa: E402
import subprocess as _dpo_subprocess  # noqa: E402

import dpo  # noqa: E402


def _dpo_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    cfg = M.ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                        max_position_embeddings=256)
    return M.Transformer(cfg).to(dtype)


def _dpo_pairs():
    """Toy preference pairs in the needle format: a ChatML question, the right number, a wrong one."""
    pairs = []
    for i, (key, good, bad) in enumerate([("alpha", "1234", "8"), ("beta", "5678", "90210"), ("gamma", "42", "4444"),
                                          ("delta", "7", "31337")]):
        q = f"One of the special magic numbers for {key} is: {good}. What is the special magic number for {key}?"
        pairs.append({"prompt": M.chat_prompt([{"role": "user", "content": q * (1 + i % 2)}]),
                      "chosen": good, "rejected": bad})
    return pairs


def test_dpo_loss_closed_forms():
    ln2 = math.log(2.0)
    g = torch.Generator().manual_seed(0)
    pi_c, pi_r = -20 * torch.rand(5, generator=g, dtype=torch.float64), -20 * torch.rand(5, generator=g, dtype=torch.float64)
    # policy == reference: the margin is 0, every logistic variant sits at ln 2, IPO at (1/(2 beta))^2
    for lt, eps in (("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.2)):
        losses, rc, rr = dpo.dpo_loss(pi_c, pi_r, pi_c.clone(), pi_r.clone(), beta=0.3, loss_type=lt, label_smoothing=eps)
        assert torch.allclose(losses, torch.full_like(losses, ln2), atol=1e-12), (lt, eps)
        assert rc.abs().max() == 0 and rr.abs().max() == 0
    losses, _, _ = dpo.dpo_loss(pi_c, pi_r, pi_c.clone(), pi_r.clone(), beta=0.1, loss_type="ipo")
    assert torch.allclose(losses, torch.full_like(losses, 25.0), atol=1e-12)
    # DESIGN.md's check values: beta 0.1, pi_c -10, pi_r -12, ref -11 -> z = 2, beta z = 0.2
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    sig, rc, rr = dpo.dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1)
    cdpo, _, _ = dpo.dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1, label_smoothing=0.1)
    rob, _, _ = dpo.dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1, loss_type="robust", label_smoothing=0.1)
    assert abs(sig.item() - 0.598139) < 5e-7 and abs(cdpo.item() - 0.618139) < 5e-7
    assert abs(sig.item() - math.log1p(math.exp(-0.2))) < 1e-12
    assert abs(cdpo.item() - (0.9 * math.log1p(math.exp(-0.2)) + 0.1 * math.log1p(math.exp(0.2)))) < 1e-12
    assert abs(rob.item() - (0.9 * math.log1p(math.exp(-0.2)) - 0.1 * math.log1p(math.exp(0.2))) / 0.8) < 1e-12
    assert abs(rc.item() - 0.1) < 1e-12 and abs(rr.item() + 0.1) < 1e-12 and not rc.requires_grad
    # IPO, length-normalised: ((pi_c-ref_c)/n_c - (pi_r-ref_r)/n_r - 1/(2 beta))^2 = (1/4 + 1/2 - 5)^2
    ipo, _, _ = dpo.dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1, loss_type="ipo", len_c=t(4.0), len_r=t(2.0))
    assert abs(ipo.item() - 4.25 ** 2) < 1e-12
    # RPO: + alpha * the chosen answer's per-token NLL, here 0.5 * 10 / 4, on top of any loss type
    rpo, _, _ = dpo.dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1, len_c=t(4.0), len_r=t(2.0), rpo_alpha=0.5)
    assert abs(rpo.item() - (math.log1p(math.exp(-0.2)) + 1.25)) < 1e-12
    rpo, _, _ = dpo.dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1, loss_type="ipo", len_c=t(4.0), len_r=t(2.0),
                             rpo_alpha=2.0)
    assert abs(rpo.item() - (4.25 ** 2 + 5.0)) < 1e-12
    n_c, n_r = torch.tensor([3.0, 7.0], dtype=torch.float64), torch.tensor([5.0, 1.0], dtype=torch.float64)
    a, b, c, d = (torch.tensor(v, dtype=torch.float64) for v in ([-3., -9.], [-4., -2.], [-3.5, -8.], [-5., -2.5]))
    ipo, _, _ = dpo.dpo_loss(a, b, c, d, beta=0.5, loss_type="ipo", len_c=n_c, len_r=n_r)
    want = [((a[i] - c[i]).item() / n_c[i].item() - (b[i] - d[i]).item() / n_r[i].item() - 1.0) ** 2 for i in range(2)]
    assert torch.allclose(ipo, torch.tensor(want, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError):
        dpo.dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), loss_type="hinge")
    with pytest.raises(ValueError):
        dpo.dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), loss_type="ipo", label_smoothing=0.1)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1), ("ipo", 0.0)])
def test_dpo_loss_gradient_direction(loss_type, eps):
    """Descending the loss raises the chosen log-prob and lowers the rejected one (at and near the reference)."""
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        ref_c, ref_r = -30 * torch.rand(4, generator=g, dtype=torch.float64), -30 * torch.rand(4, generator=g, dtype=torch.float64)
        pi_c = (ref_c + 0.5 * torch.randn(4, generator=g, dtype=torch.float64)).requires_grad_()
        pi_r = (ref_r + 0.5 * torch.randn(4, generator=g, dtype=torch.float64)).requires_grad_()
        losses, _, _ = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1, loss_type=loss_type, label_smoothing=eps,
                                    len_c=torch.full((4,), 3.0, dtype=torch.float64), len_r=torch.full((4,), 5.0, dtype=torch.float64))
        losses.sum().backward()
        assert (pi_c.grad < 0).all() and (pi_r.grad > 0).all(), (pi_c.grad, pi_r.grad)


def test_dpo_sequence_logps_mask_and_float64_reference():
    m = _dpo_model().eval()
    tok = M.get_tokenizer()
    pairs = _dpo_pairs()
    batch = dpo.collate_pairs(pairs, tok)
    idx, targets = batch["idx"], batch["targets"]
    B = len(pairs)
    assert idx.shape[0] == 2 * B and "ref" not in batch
    rows = [(p["prompt"], p["chosen"]) for p in pairs] + [(p["prompt"], p["rejected"]) for p in pairs]
    for i, (prompt, comp) in enumerate(rows):
        P = tok.encode(prompt, allowed_special="all")
        C = tok.encode(comp) + [M.IM_END]
        L = len(P) + len(C)
        assert idx[i, :L].tolist() == P + C and (idx[i, L:] == M.PAD).all()
        # the mask covers exactly the completion's tokens: positions P-1 .. L-2 predict them
        assert torch.nonzero(targets[i] != -1)[:, 0].tolist() == list(range(len(P) - 1, L - 1))
        assert targets[i, len(P) - 1:L - 1].tolist() == C
    with torch.no_grad():
        logps, lengths = dpo.sequence_logps(m, idx, targets)
        assert lengths.tolist() == [len(tok.encode(c)) + 1 for _, c in rows]
        # independent float64: sum over completion tokens of log p(token | everything before it), one
        # unpadded forward per token; prompt tokens' own log-probs are not in the sum (rows of 2 pairs: time)
        for i, (prompt, comp) in enumerate(rows):
            if i % B >= 2:
                continue
            seq = tok.encode(prompt, allowed_special="all") + tok.encode(comp) + [M.IM_END]
            n_p = len(tok.encode(prompt, allowed_special="all"))
            want = 0.0
            for j in range(n_p, len(seq)):
                lp = torch.log_softmax(m(torch.tensor([seq[:j]]))[0, -1].double(), -1)
                want += lp[seq[j]].item()
            assert abs(logps[i].item() - want) < 1e-9 * max(1.0, abs(want)), (i, logps[i].item(), want)
        # padding after the completion changes nothing (garbage tokens there included)
        noisy = idx.clone()
        pad = targets.eq(-1) & idx.eq(M.PAD)
        noisy[pad] = torch.randint(0, 256, (int(pad.sum()),), generator=torch.Generator().manual_seed(0))
        assert pad.any()
        assert torch.allclose(dpo.sequence_logps(m, noisy, targets)[0], logps, rtol=0, atol=1e-12)
    # the stored reference log-probs are exactly these sums, and end up in the collated batch
    dpo.reference_logps(m, pairs, batch_size=3, tok=tok)
    assert [p["ref_chosen"] for p in pairs] == pytest.approx(logps[:B].tolist(), abs=1e-9)
    assert [p["ref_rejected"] for p in pairs] == pytest.approx(logps[B:].tolist(), abs=1e-9)
    assert torch.allclose(dpo.collate_pairs(pairs, tok)["ref"], logps, rtol=0, atol=1e-12)


def test_dpo_pair_batches_split_invariant():
    """The global batch of a step is the same pairs however it is split over ranks and micro-batches,
    and consecutive steps walk through seeded epoch permutations (every pair once per epoch)."""
    pairs = [{"prompt": M.chat_prompt([{"role": "user", "content": f"q{i}"}]), "chosen": str(i), "rejected": "x"}
             for i in range(6)]
    one = dpo.pair_batches(pairs, batch_size=4, grad_accum=1, seed=3)
    split = dpo.pair_batches(pairs, batch_size=1, grad_accum=2, seed=3)

    def chosen(b):   # the chosen rows' completions, read back from the targets
        return [M.get_tokenizer().decode(t[t != -1].tolist()) for t in b["targets"][:len(b["targets"]) // 2]]
    for step in range(3):
        whole = chosen(one(step, 0, 0, 1))
        parts = [x for micro in range(2) for rank in range(2) for x in chosen(split(step, micro, rank, 2))]
        assert whole == parts
    seen = [x for step in range(3) for x in chosen(one(step, 0, 0, 1))]    # 12 pairs = 2 epochs
    assert sorted(seen[:6]) == sorted(seen[6:]) == sorted(f"{i}<|im_end|>" for i in range(6))


def _dpo_cli(tmp_path, *extra):
    sft = tmp_path / "sft.pt"
    if not sft.exists():
        M.save_checkpoint(str(sft), _dpo_model(seed=0, dtype=torch.float32))
        with open(tmp_path / "pairs.jsonl", "w") as f:
            f.writelines(_dpo_json.dumps(p) + "\n" for p in _dpo_pairs())
    return dpo.main([f"--ckpt={sft}", f"--pairs={tmp_path / 'pairs.jsonl'}", "--batch_size=4", "--lr=1e-3",
                     "--warmup_iters=0", "--min_lr=1e-3", "--ref_batch_size=2", "--eval_samples=0", "--threads=1",
                     "--compile=False", "--beta=0.1", *extra])


def test_dpo_cli_steps_raise_margins_reference_once(tmp_path, monkeypatch):
    """dpo.main (the CLI's path: pairs -> reference log-probs -> train.train with dpo's loss, AdamW) on a tiny
    random model: the margins and the accuracy rise, and the reference model runs once, before training."""
    calls = []
    forward = M.Transformer.forward

    def counted(self, *a, **kw):
        calls.append((self, torch.is_grad_enabled()))   # the model itself: a freed model's id() can come back
        return forward(self, *a, **kw)
    monkeypatch.setattr(M.Transformer, "forward", counted)
    out = tmp_path / "run"
    assert _dpo_cli(tmp_path, f"--out_dir={out}", "--max_iters=8") == 0
    ref_calls, train_calls = [c for c in calls if not c[1]], [c for c in calls if c[1]]
    assert len(ref_calls) == 2                          # 4 pairs / --ref_batch_size=2, once
    assert len(train_calls) == 8                        # one concatenated forward per step: no reference in there
    assert len({id(c[0]) for c in train_calls}) == 1 and not {id(c[0]) for c in ref_calls} & {id(c[0]) for c in train_calls}
    log = [_dpo_json.loads(ln) for ln in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 9))
    for r in log:
        assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"} <= set(r)
        assert abs(r["rewards/margins"] - (r["rewards/chosen"] - r["rewards/rejected"])) < 1e-9
    assert abs(log[0]["rewards/margins"]) < 1e-3 and abs(log[0]["loss"] - math.log(2)) < 1e-3   # policy == reference
    margins, losses = [r["rewards/margins"] for r in log], [r["loss"] for r in log]
    assert all(b > a for a, b in zip(margins, margins[1:])) and all(b < a for a, b in zip(losses, losses[1:]))
    assert margins[-1] > 0.1 and log[-1]["rewards/accuracies"] == 1.0
    # independently, from the files: the stored reference is the SFT model's, and the saved DPO model prefers
    # every chosen completion more than the SFT model did (strict)
    stored = [_dpo_json.loads(ln) for ln in open(out / "pairs.jsonl")]
    monkeypatch.setattr(M.Transformer, "forward", forward)
    batch = dpo.collate_pairs(_dpo_pairs())
    with torch.no_grad():
        sft, _ = dpo.sequence_logps(M.load_checkpoint(str(tmp_path / "sft.pt")), batch["idx"], batch["targets"])
        pol, _ = dpo.sequence_logps(M.load_checkpoint(str(out / "ckpt.pt")), batch["idx"], batch["targets"])
    assert torch.allclose(sft.double(), torch.tensor([p["ref_chosen"] for p in stored] +
                                                     [p["ref_rejected"] for p in stored], dtype=torch.float64), atol=1e-4)
    _, rc, rr = dpo.dpo_loss(pol[:4], pol[4:], sft[:4], sft[4:], beta=0.1)
    assert (rc > rr).all()


def test_dpo_cli_resume_exact(tmp_path, monkeypatch):
    """4 steps, a resume to 6 (the stored pairs and reference log-probs, no reference forward), equals 6 in one go."""
    assert _dpo_cli(tmp_path, f"--out_dir={tmp_path / 'a'}", "--max_iters=6", "--loss_type=ipo") == 0
    assert _dpo_cli(tmp_path, f"--out_dir={tmp_path / 'b'}", "--max_iters=4", "--loss_type=ipo", "--lr_decay_iters=6") == 0
    calls = []
    forward = M.Transformer.forward
    monkeypatch.setattr(M.Transformer, "forward", lambda self, *a, **kw: calls.append(torch.is_grad_enabled())
                        or forward(self, *a, **kw))
    assert _dpo_cli(tmp_path, f"--out_dir={tmp_path / 'b'}", "--max_iters=6", "--loss_type=ipo", "--resume=True") == 0
    assert calls == [True, True]                        # two training steps, nothing recomputed for the reference
    # the same run from a float32 Hugging Face export of the SFT model (the shipped model's layout)
    M.export_hf(M.load_checkpoint(str(tmp_path / "sft.pt")), str(tmp_path / "hf"), dtype=torch.float32)
    assert dpo.main([f"--ckpt={tmp_path / 'hf'}", f"--pairs={tmp_path / 'pairs.jsonl'}", "--batch_size=4", "--lr=1e-3",
                     "--warmup_iters=0", "--min_lr=1e-3", "--ref_batch_size=2", "--eval_samples=0", "--threads=1",
                     "--compile=False", "--beta=0.1", f"--out_dir={tmp_path / 'c'}", "--max_iters=6", "--loss_type=ipo"]) == 0
    a = [_dpo_json.loads(ln) for ln in open(tmp_path / "a" / "log.jsonl")]
    b = [_dpo_json.loads(ln) for ln in open(tmp_path / "b" / "log.jsonl")]
    c = [_dpo_json.loads(ln) for ln in open(tmp_path / "c" / "log.jsonl")]
    assert [r["step"] for r in b] == [r["step"] for r in c] == list(range(1, 7))
    for x, y in list(zip(a, b)) + list(zip(a, c)):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-9)
        assert x["rewards/margins"] == pytest.approx(y["rewards/margins"], rel=1e-6, abs=1e-9)


def test_dpo_torchrun_fsdp_matches_one_process(tmp_path):
    """torchrun, 2 ranks (FSDP2, gloo): each rank scores half the pairs for the reference and the gather puts
    them back in order (step 1's margins are 0 only if it does); the steps equal one process with
    grad_accum=2 (the same global batch)."""
    assert _dpo_cli(tmp_path, f"--out_dir={tmp_path / 'one'}", "--max_iters=3", "--batch_size=1", "--grad_accum=2") == 0
    args = [f"--ckpt={tmp_path / 'sft.pt'}", f"--pairs={tmp_path / 'pairs.jsonl'}", f"--out_dir={tmp_path / 'two'}",
            "--max_iters=3", "--batch_size=1", "--lr=1e-3", "--warmup_iters=0", "--min_lr=1e-3", "--ref_batch_size=1",
            "--eval_samples=0", "--threads=1", "--compile=False"]
    p = _dpo_subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(ROOT, "dpo.py"), *args], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    # (once, in a full run, rank 1 aborted with "terminate called without an active exception": both streams' tails
    # show whether that was at start-up or at teardown)
    assert p.returncode == 0, f"stdout: {p.stdout[-1500:]}\nstderr: {p.stderr[-3000:]}"
    one = [_dpo_json.loads(ln) for ln in open(tmp_path / "one" / "log.jsonl")]
    two = [_dpo_json.loads(ln) for ln in open(tmp_path / "two" / "log.jsonl")]
    assert len(one) == len(two) == 3 and abs(two[0]["rewards/margins"]) < 1e-5
    for x, y in zip(one, two):
        for k in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), k
    ref = lambda d: [(q["ref_chosen"], q["ref_rejected"]) for q in map(_dpo_json.loads, open(tmp_path / d / "pairs.jsonl"))]  # noqa: E731
    r1, r2 = ref("one"), ref("two")
    assert len(r1) == len(r2) == 4 and all(abs(a - b) < 1e-6 for x, y in zip(r1, r2) for a, b in zip(x, y))


def test_dpo_cli_errors(tmp_path, monkeypatch, capsys):
    """One line on stderr, exit 2: no SFT checkpoint (the no-argument run says to train first), bad flags, bad pairs."""
    p = _dpo_subprocess.run([sys.executable, os.path.join(ROOT, "dpo.py")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "python train.py" in p.stderr, p.stderr
    monkeypatch.chdir(tmp_path)
    M.save_checkpoint("sft.pt", _dpo_model(dtype=torch.float32))
    with open("bad.jsonl", "w") as f:
        f.write(_dpo_json.dumps(_dpo_pairs()[0]) + "\n" + '{"prompt": "a", "chosen": "b"}\n')
    for args, words in ((["--loss_type=hinge"], "--loss_type='hinge'"), (["--ckpt=sft.pt", "--beta=0"], "--beta"),
                        (["--ckpt=sft.pt", "--loss_type=ipo", "--label_smoothing=0.1"], "--label_smoothing"),
                        (["--ckpt=sft.pt", "--rpo_alpha=-1"], "--rpo_alpha"),
                        (["--ckpt=sft.pt", "--data=t.txt"], "--data"), (["--ckpt=nope.pt"], "nope.pt"),
                        (["--ckpt=sft.pt", "--pair_lengths=100"], "--pair_lengths"), (["--beta"], "--key=value"),
                        (["--ckpt=sft.pt", "--pairs=bad.jsonl", "--out_dir=o"], "bad.jsonl:2")):
        assert dpo.main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("dpo.py: error:") and words in err, (args, err)


# ============================================================================ judge (issue 8)

import judge  # noqa: E402
import json as _json  # noqa: E402
import socket as _socket  # noqa: E402
import subprocess as _subprocess  # noqa: E402
import threading as _threading  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

_JUDGE_PY = os.path.join(ROOT, "judge.py")


def test_judge_absolute_prompt_format():
    rubric = judge.NEEDLE_RUBRIC
    p = judge.absolute_prompt("What is the special magic number for apple?", "It is 4242.", rubric, reference="4242")
    heads = ["###Task Description:", "###The instruction to evaluate:", "###Response to evaluate:",
             "###Reference Answer (Score 5):", "###Score Rubrics:", "###Feedback:"]
    at = [p.index(h) for h in heads]
    assert at == sorted(at) and at[0] == 0 and all(p.count(h) == 1 for h in heads)
    # each field sits under its own header, the rubric is whole, the verdict format is asked for
    assert p[at[1]:at[2]] == "###The instruction to evaluate:\nWhat is the special magic number for apple?\n\n"
    assert p[at[2]:at[3]] == "###Response to evaluate:\nIt is 4242.\n\n"
    assert p[at[3]:at[4]] == "###Reference Answer (Score 5):\n4242\n\n"
    assert p[at[4]:at[5]] == "###Score Rubrics:\n" + rubric + "\n\n"
    assert p.endswith("###Feedback: ")
    assert '"(write a feedback for criteria) [RESULT] (an integer number between 1 and 5)"' in p
    # the rubric has prometheus-eval's shape: [criteria] then Score 1..5
    lines = rubric.split("\n")
    assert lines[0].startswith("[") and lines[0].endswith("]")
    assert [ln[:8] for ln in lines[1:]] == [f"Score {k}:" for k in range(1, 6)]
    # Prometheus-Eval's ABSOLUTE_PROMPT filled by hand for a tiny example, character for character
    expected = (
        "###Task Description:\n"
        "An instruction (might include an Input inside it), a response to evaluate, a reference answer that gets a "
        "score of 5, and a score rubric representing a evaluation criteria are given.\n"
        "1. Write a detailed feedback that assess the quality of the response strictly based on the given score "
        "rubric, not evaluating in general.\n"
        "2. After writing a feedback, write a score that is an integer between 1 and 5. You should refer to the score rubric.\n"
        '3. The output format should look as follows: "(write a feedback for criteria) [RESULT] (an integer number between 1 and 5)"\n'
        "4. Please do not generate any other opening, closing, and explanations.\n\n"
        "###The instruction to evaluate:\nQ\n\n###Response to evaluate:\nR\n\n"
        "###Reference Answer (Score 5):\nA\n\n###Score Rubrics:\nS\n\n###Feedback: ")
    assert judge.absolute_prompt("Q", "R", "S", "A") == expected
    # without a reference: the header and its mention in the task description both go
    wo = judge.absolute_prompt("Q", "R", "S")
    assert wo == expected.replace("a reference answer that gets a score of 5, ", "").replace(
        "###Reference Answer (Score 5):\nA\n\n", "")
    assert "Reference Answer" not in wo and "reference answer" not in wo


def test_judge_relative_prompt_format():
    p = judge.relative_prompt("Q", "ra", "rb", "[crit]", reference="A")
    heads = ["###Task Description:", "###Instruction:\nQ\n\n", "###Response A:\nra\n\n", "###Response B:\nrb\n\n",
             "###Reference Answer:\nA\n\n", "###Score Rubric:\n[crit]\n\n", "###Feedback: "]
    at = [p.index(h) for h in heads]
    assert at == sorted(at) and p.endswith("###Feedback: ")
    assert '"(write a feedback for criteria) [RESULT] (A or B)"' in p
    assert "a response to evaluate, a reference answer, and a score rubric" in p
    wo = judge.relative_prompt("Q", "ra", "rb", "[crit]")
    assert "###Reference Answer" not in wo and "a response to evaluate, and a score rubric" in wo


@pytest.mark.parametrize("text,score", [
    ("The response states the number exactly as in the reference answer. [RESULT] 5", 5),
    ("The answer is close: a score of 2 would be too harsh, since the number is present.\n[RESULT] 4", 4),
    ("Feedback: the number is missing entirely. [RESULT] 1   \n", 1),
    ("Only one of the two numbers is given.\nScore: 3", 3),
    ("All numbers, nothing else. [RESULT] (5)", 5),
    ("[RESULT]2", 2),
    ("first draft [RESULT] 2 ... on reflection it is fully correct [RESULT] 5", 5),  # the last verdict wins
    ("Score: 2 ... final verdict [RESULT] 4", 4),  # [RESULT] beats Score:
    ("The response is perfect. [RESULT] 6", None),
    ("[RESULT] 0", None),
    ("[RESULT] 45", None),
    ("[RESULT] 4.5", None),
    ("The response is fine. Score 4: all numbers present.", None),  # an echoed rubric line is no verdict
    ('(write a feedback for criteria) [RESULT] (an integer number between 1 and 5)', None),
    ("The response gives the right number, so it deserves a high score.", None),
    ("", None),
    (None, None),
])
def test_judge_parse_absolute(text, score):
    assert judge.parse_absolute(text) == score


@pytest.mark.parametrize("text,choice", [
    ("Response A gives the number, B does not. [RESULT] A", "A"),
    ("B is exact. [RESULT] (B)", "B"),
    ("[RESULT] A ... no, [RESULT] B", "B"),
    ("[RESULT] Both", None),
    ("Response A is better.", None),
])
def test_judge_parse_relative(text, choice):
    assert judge.parse_relative(text) == choice


def test_judge_rule_and_kappa_closed_form():
    assert judge.string_match_all("The numbers are 12 and ABC.", ["12", "abc", "99"]) == pytest.approx(2 / 3)
    assert judge.string_match_all("nothing", ["1"]) == 0.0
    # kappa of a 2x2 table [[a, b], [c, d]]: 2(ad - bc) / ((a+b)(b+d) + (a+c)(c+d)); here a=3, b=1, c=2, d=4
    llm = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    rule = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    a, b, c, d = 3, 1, 2, 4
    assert judge.cohen_kappa(llm, rule) == pytest.approx(2 * (a * d - b * c) / ((a + b) * (b + d) + (a + c) * (c + d)))
    assert judge.cohen_kappa([1, 0, 1], [1, 0, 1]) == pytest.approx(1.0)
    assert judge.cohen_kappa([1, 1], [1, 1]) is None  # chance agreement 1: undefined
    ag = judge.agreement([1.0, 0.0, 1.0, 0.5], [5, 4, None, 3])  # the None is left out, 0.5 counts as wrong
    assert ag["n"] == 3 and ag["accuracy"] == pytest.approx(2 / 3)


def test_judge_rule_matches_needle():
    needle = pytest.importorskip("needle")
    cases = [("The special magic number is 123.", ["123"]), ("abc DEF", ["def", "xyz"]), ("", ["1"]),
             ("Numbers: 5, 6, 7", ["5", "6", "7", "8"]), ("APPLE-77", ["apple-77"])]
    for pred, values in cases:
        assert needle.score(pred, values) == pytest.approx(judge.string_match_all(pred, values))


class _ScriptedJudge(BaseHTTPRequestHandler):
    """OpenAI-compatible /v1/models and /v1/chat/completions; each question has a queue of scripted replies:
    a string is returned as the assistant message, an int as that HTTP error."""
    script, requests, lock = {}, [], _threading.Lock()

    def log_message(self, *args):
        pass

    def _send(self, code, obj):
        body = _json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/models":
            return self._send(200, {"object": "list", "data": [{"id": "prometheus-scripted", "object": "model"}]})
        self._send(404, {"error": {"message": "not found"}})

    def do_POST(self):
        req = _json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = req["messages"][-1]["content"]
        question = user.split("###The instruction to evaluate:\n")[1].split("\n\n###Response to evaluate:")[0]
        with self.lock:
            self.requests.append({"auth": self.headers.get("Authorization"), "path": self.path, **req})
            reply = self.script[question].pop(0)
        if isinstance(reply, int):
            return self._send(reply, {"error": {"message": "scripted failure", "type": "server_error"}})
        self._send(200, {"id": "x", "object": "chat.completion", "model": req["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": reply}}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


def _needle_results(path, samples):
    full = [{"length": 4096 * (1 + i % 2), "depth": 50.0, "variant": "single", "haystack": "noise", "seed": i,
             **s, "score": judge.string_match_all(s["prediction"], s["values"])} for i, s in enumerate(samples)]
    with open(path, "w") as f:
        _json.dump({"provenance": {"git_commit": "test"}, "config": {}, "samples": full, "summary": {}}, f)


def _q(i):
    return f"What is the special magic number for key-{i} mentioned in the provided text?"


def test_judge_end_to_end_loopback(tmp_path):
    # (values, prediction, hand rule score, scripted judge replies, expected LLM score, expected attempts)
    table = [
        (["1234567"], "The special magic number is 1234567.", 1.0,
         ["The response states the number exactly. [RESULT] 5"], 5, 1),
        (["7654321"], "It is 1111111.", 0.0,
         ["The number is wrong; a score of 4 would be far too generous. [RESULT] 1"], 1, 1),
        (["2222222", "3333333"], "2222222", 0.5, ["I cannot decide.", "Half of the numbers. [RESULT] (3)"], 3, 2),
        (["4444444"], "4444444", 1.0, [500, "Correct and clean. Score: 4"], 4, 2),
        (["5555555"], "no idea", 0.0, ["garbage", "still nothing [RESULT] 9", "[RESULT]"], None, 3),
        (["6666666"], "6666666", 1.0, ["The number is buried in noise. [RESULT] 2"], 2, 1),
        (["8888888"], "8,888,888", 0.0, ["Same number, other formatting. [RESULT] 4   "], 4, 1),
        (["1212121"], "1212121", 1.0, ["Exact. [RESULT] 5"], 5, 1),
    ]
    samples = [{"question": _q(i), "prediction": t[1], "values": t[0]} for i, t in enumerate(table)]
    _needle_results(tmp_path / "needle_run.json", samples)
    _ScriptedJudge.script = {_q(i): list(t[3]) for i, t in enumerate(table)}
    _ScriptedJudge.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ScriptedJudge)
    _threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "JUDGE_API_KEY": "test-key"}
        p = _subprocess.run([sys.executable, _JUDGE_PY, "--input=needle_run.json", "--retries=2", "--backoff=0.01",
                             "--concurrency=4", f"--judge_url=http://127.0.0.1:{server.server_port}/v1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert p.returncode == 0, p.stderr
    assert "8/8 graded, 1 without verdict" in p.stderr
    out = _json.load(open(tmp_path / "results" / "judge_needle_run.json"))  # default output path
    rows = out["samples"]
    for row, (values, pred, rule, _, llm, attempts) in zip(rows, table):
        assert (row["rule_score"], row["llm_score"], row["attempts"]) == (rule, llm, attempts), row
    assert rows[4]["judge_output"] == "[RESULT]" and rows[3]["replies"] == 1
    assert "HTTP 500" in rows[3]["errors"][0] and len(rows[3]["errors"]) == 1 and rows[0]["errors"] == []
    # every request: the model from /v1/models, the key from the environment, prometheus' system prompt and
    # defaults, and a user turn that is exactly absolute_prompt(question only, prediction, rubric, values)
    reqs = _ScriptedJudge.requests
    assert len(reqs) == sum(len(t[3]) for t in table) == 12
    for r in reqs:
        assert r["path"] == "/v1/chat/completions" and r["model"] == "prometheus-scripted"
        assert r["auth"] == "Bearer test-key"
        assert (r["temperature"], r["top_p"], r["max_tokens"], r["repetition_penalty"]) == (1.0, 0.9, 1024, 1.03)
        assert r["messages"][0] == {"role": "system", "content": judge.ABS_SYSTEM}
        i = int(r["messages"][1]["content"].split("key-")[1].split(" ")[0])
        s = samples[i]
        assert r["messages"][1]["content"] == judge.absolute_prompt(s["question"], s["prediction"], judge.NEEDLE_RUBRIC,
                                                                    ", ".join(s["values"]))
    # agreement by hand over the 7 scored samples: (rule == 1, llm >= 4) pairs
    # (T,T) (F,F) (F,F) (T,T) (T,F) (F,T) (T,T): accuracy 5/7; a=3 b=1 c=1 d=2, kappa = 2(6-1)/(4*3+4*3) = 5/12
    ag = out["summary"]["agreement"]
    assert ag["n"] == 7 and ag["accuracy"] == pytest.approx(5 / 7) and ag["kappa"] == pytest.approx(5 / 12)
    assert ag["confusion"] == {"rule1_llm_hi": 3, "rule1_llm_lo": 1, "rule0_llm_hi": 1, "rule0_llm_lo": 2}
    sm = out["summary"]
    assert (sm["llm_none"], sm["llm_scored"], sm["attempts"], sm["http_errors"], sm["rule_vs_stored_mismatch"]) == (1, 7, 12, 1, 0)
    assert sm["llm_histogram"] == {"1": 1, "2": 1, "3": 1, "4": 2, "5": 2}
    assert sm["llm_mean"] == pytest.approx(24 / 7) and sm["rule_mean"] == pytest.approx(4.5 / 8)
    prov = out["provenance"]
    assert prov["judge_model"] == "prometheus-scripted" and prov["judge_url"].endswith("/v1")
    assert "--input=needle_run.json" in prov["command"] and prov["date"] and prov["git_commit"]
    assert "test-key" not in _json.dumps(out)


def test_judge_cli_errors(tmp_path):
    def run(*args):
        return _subprocess.run([sys.executable, _JUDGE_PY, *args], cwd=tmp_path, capture_output=True, text=True,
                               timeout=60)
    h = run("--help")
    assert h.returncode == 0
    for f in judge.fields(judge.JudgeConfig):
        assert f"--{f.name}=" in h.stdout
    (tmp_path / "bad.json").write_text(_json.dumps({"samples": [{"question": "q", "prediction": "p"}]}))
    for args, words in [((), "--input"), (("--input=missing.json",), "missing.json"), (("--input=bad.json",), "values"),
                        (("--input=bad.json", "--bogus=1"), "--bogus"), (("--input=bad.json", "--concurrency=x"), "concurrency")]:
        p = run(*args)
        assert p.returncode == 2 and words in p.stderr and len(p.stderr.strip().splitlines()) == 1, (args, p.stderr)
        assert "Traceback" not in p.stderr
    # a judge that is down: the run completes, every score is None with the error, exit code 1
    _needle_results(tmp_path / "n.json", [{"question": _q(0), "prediction": "1", "values": ["1"]}])
    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = run("--input=n.json", "--out=o.json", "--judge_model=m", "--retries=1", "--backoff=0.01",
            f"--judge_url=http://127.0.0.1:{port}/v1")
    assert p.returncode == 1 and "no reply" in p.stderr
    row = _json.load(open(tmp_path / "o.json"))["samples"][0]
    assert row["llm_score"] is None and row["attempts"] == 2 and row["replies"] == 0 and len(row["errors"]) == 2


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "serve.py")), reason="serve.py not present yet")
def test_judge_against_serve_tiny(tmp_path):
    model = pytest.importorskip("model")
    ckpt = tmp_path / "ckpt.pt"
    torch.manual_seed(0)
    model.save_checkpoint(str(ckpt), model.Transformer(model.PRESETS["tiny"]))
    samples = [{"question": _q(i), "prediction": p, "values": ["4242"]} for i, p in enumerate(["4242", "no", "42"])]
    _needle_results(tmp_path / "needle_tiny.json", samples)
    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = _subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--ckpt={ckpt}", f"--port={port}"],
                               cwd=tmp_path, stdout=_subprocess.DEVNULL, stderr=_subprocess.PIPE, text=True)
    try:
        import time
        import urllib.request
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "serve.py did not come up in 120 s"
                time.sleep(0.5)
        # a random tiny model writes no verdict: every answer must end as None, the run must still complete
        p = _subprocess.run([sys.executable, _JUDGE_PY, "--input=needle_tiny.json", "--out=j.json", "--retries=1",
                             "--max_tokens=16", "--repetition_penalty=1", "--backoff=0.01", "--concurrency=3",
                             f"--judge_url=http://127.0.0.1:{port}/v1"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert p.returncode == 0, p.stderr
    out = _json.load(open(tmp_path / "j.json"))
    rows = out["samples"]
    assert len(rows) == 3 and out["provenance"]["judge_model"]
    for row in rows:
        assert row["replies"] >= 1 and isinstance(row["judge_output"], str)
        assert row["llm_score"] == judge.parse_absolute(row["judge_output"])
        if row["llm_score"] is None:
            assert row["attempts"] == 2 and row["replies"] == 2
    assert out["summary"]["llm_none"] == sum(r["llm_score"] is None for r in rows) >= 1
    assert [r["rule_score"] for r in rows] == [1.0, 0.0, 0.0]




# ============================================================================ serve (issue 9)
# The engine in-process against model.generate (float64); then real `python serve.py` processes on
# loopback, driven by the official openai client and raw HTTP.
import concurrent.futures as _cf  # noqa: E402
import http.client as _http  # noqa: E402
import json as _sjson  # noqa: E402
import re as _re  # noqa: E402
import signal as _signal  # noqa: E402
import socket as _ssocket  # noqa: E402
import subprocess as _sproc  # noqa: E402
import time as _stime  # noqa: E402
import urllib.request as _urlreq  # noqa: E402

try:
    import serve  # noqa: E402
    _SERVE_SKIP = ""
except ImportError as _e:   # the GPU image has no web stack (fastapi, uvicorn, prometheus_client)
    serve, _SERVE_SKIP = None, f"serve.py cannot be imported here: {_e}"
_needs_serve = pytest.mark.skipif(serve is None, reason=_SERVE_SKIP)

_SERVE_PY = os.path.join(ROOT, "serve.py")
_SERVE_KEY = "sk-serve-test"


def _serve_model_cfg():
    return M.ModelConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
                         max_position_embeddings=1024)


def _serve_ckpt(path):
    torch.manual_seed(1)
    m = M.Transformer(_serve_model_cfg())
    with torch.no_grad():  # larger weights than init: sharper logits, so greedy paths do not collapse to one token
        for n, p in m.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in n else p.mul_(4.0)
    M.save_checkpoint(str(path), m)
    return str(path)


def _serve_prompts(n, seed=0):
    """Token-id prompts of different lengths (5..~100: several pages, several prefill chunks)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (5 + (i * 37) % 97,), generator=g).tolist() for i in range(n)]


def _reference_greedy(model, prompt, max_new):
    out = model.generate(torch.tensor([prompt]), max_new, temperature=0.0, page=16)[0]
    return out


def _strip_stop(ids):
    return ids[:-1] if ids and ids[-1] in M.STOP_IDS else ids


@_needs_serve
@pytest.mark.parametrize("fixed", [False, True, "compiled"], ids=["dynamic", "fixed_shape", "compiled"])
def test_serve_engine_matches_generate_with_preemption(fixed):
    """16 ragged requests through the engine with a cache too small for all of them: the scheduler must wait,
    chunk prefills, batch ragged decodes and preempt; every greedy output must still be model.generate's
    (float64), and every block must come back. fixed_shape: the decode path that CUDA graphs replay (batch
    padded to a bucket, tables padded with the scratch block), run eagerly here: padding rows must not touch
    any sequence's blocks. compiled: the same through torch.compile'd blocks (dynamic batch; the cache write
    and attention left eager), as serve.py captures them on CUDA (~70 s of CPU compiling)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny ops: more threads only contend
    try:
        _serve_engine_check(fixed)
    finally:
        torch.set_num_threads(threads)


def _serve_engine_check(fixed=False):
    torch.manual_seed(1)
    model = M.Transformer(_serve_model_cfg()).double().eval()
    cfg = serve.ServeConfig(page=16, num_blocks=24, max_model_len=384, max_num_seqs=8, max_num_batched_tokens=40)
    outs = []
    eng = serve.Engine(model, cfg, deliver=outs.extend)
    eng.use_graphs = bool(fixed)               # on CUDA: decided by device, attention and cache dtype
    if fixed == "compiled":                    # serve.py's torch.compile'd decode blocks (on CUDA: --compile)
        eng.layers = [torch.compile(b, dynamic=True) for b in model.layers]
    prompts = _serve_prompts(16)
    reqs = [eng.submit(p, serve.SamplingParams(max_tokens=40 + i, temperature=0.0, ignore_eos=i % 2 == 0))
            for i, p in enumerate(prompts)]
    max_batch = 0
    for _ in range(10000):
        busy = eng.step()
        max_batch = max(max_batch, len(eng.running))
        if not busy:
            break
    assert all(r.finish_reason in ("stop", "length") for r in reqs)
    assert eng.num_preemptions > 0 and max_batch > 1
    assert (set(eng.graphs) <= set(eng.buckets) and len(eng.graphs) > 1) if fixed else not eng.graphs  # padding ran
    assert bool(eng.prefill_graphs) == bool(fixed)   # first chunks through the padded prefill, later chunks eager
    assert sorted(eng.free) == list(range(cfg.num_blocks)) and not eng.running and not eng.waiting
    for i, (p, r) in enumerate(zip(prompts, reqs)):
        got = r.ids[len(p):]
        ref = _reference_greedy(model, p, 40 + i)
        assert (got if i % 2 == 0 else _strip_stop(got))[:len(ref)] == ref, i
        # what the client was told adds up to the same tokens and the same text
        told = [o for rr, o in outs if rr is r]
        assert sum((o.token_ids for o in told), []) == got and told[-1].finish_reason == r.finish_reason
        text = bytes(t for t in _strip_stop(got) if t < 256).decode("utf-8", "replace")
        assert "".join(o.text for o in told) == text


@_needs_serve
def test_serve_padded_prefill_matches_generate():
    """Whole prompts of different lengths prefilled together on the path CUDA graphs replay (rows padded to a
    bucket, tokens to a power of two; padding tokens write past each prompt or into the scratch block, padding
    rows only there), run eagerly here: every greedy output must be model.generate's (float64)."""
    torch.manual_seed(1)
    model = M.Transformer(_serve_model_cfg()).double().eval()
    cfg = serve.ServeConfig(page=16, num_blocks=128, max_model_len=384, max_num_seqs=16, max_num_batched_tokens=1024)
    eng = serve.Engine(model, cfg)
    eng.use_graphs = True
    prompts = _serve_prompts(16)   # 5, 42, 79, 19, 56, 93, 33, 70, 10, 47, 84, 24, 61, 98, 38, 75 tokens
    reqs = [eng.submit(p, serve.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)) for p in prompts]
    while eng.step():
        pass
    # one forward of the 10 prompts of <= 64 tokens padded to 16 rows x 64, one of the other 6 at 6 x 128 (rows
    # have buckets of their own up to 8)
    assert sorted(eng.prefill_graphs) == [(6, 128), (16, 64)]
    assert sorted(eng.free) == list(range(cfg.num_blocks))
    for p, r in zip(prompts, reqs):
        assert r.ids[len(p):] == _reference_greedy(model, p, 12)


@_needs_serve
def test_serve_penalties_match_closed_form_beside_plain_rows():
    """Greedy rows with repetition/frequency/presence penalties batched with plain rows. The engine decodes a
    step ahead of the host except when a row is penalised (its next logits need the last token): each
    penalised output must equal a float64 reference that re-runs the whole sequence and applies vLLM's
    formulas by hand; the plain rows must still equal model.generate."""
    torch.manual_seed(1)
    model = M.Transformer(_serve_model_cfg()).double().eval()
    with torch.no_grad():   # a model that mostly repeats its last token: penalties (and stale counts) show
        model.lm_head.weight.copy_(model.embed_tokens.weight)
        for n, w in model.named_parameters():
            if n.endswith(("o_proj.weight", "down_proj.weight")):
                w.mul_(0.1)
    eng = serve.Engine(model, serve.ServeConfig(page=16, num_blocks=64, max_model_len=384, max_num_seqs=8))
    prompts = _serve_prompts(6, seed=3)
    pens = [dict(repetition_penalty=20.0), dict(frequency_penalty=0.5), dict(presence_penalty=2.0), {}, {}, {}]
    reqs = [eng.submit(p, serve.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, **k))
            for p, k in zip(prompts, pens)]
    while eng.step():
        pass
    for p, k, r in zip(prompts, pens, reqs):
        ids = list(p)
        for _ in range(12):
            with torch.no_grad():
                z = model(torch.tensor([ids]))[0, -1].tolist()
            out = ids[len(p):]
            for v in range(len(z)):
                if v in ids and k.get("repetition_penalty"):
                    z[v] = z[v] / k["repetition_penalty"] if z[v] > 0 else z[v] * k["repetition_penalty"]
                z[v] -= k.get("frequency_penalty", 0.0) * out.count(v) + k.get("presence_penalty", 0.0) * (v in out)
            ids.append(max(range(len(z)), key=z.__getitem__))
        assert r.ids == ids, k
        assert (len(set(ids[len(p):])) > 4) == bool(k), k   # penalised rows vary, plain rows repeat


@_needs_serve
def test_serve_sampling_matches_closed_form():
    """temperature, top-k, top-p: empirical frequencies of 20000 per-request-seeded draws against the filtered
    distribution computed by hand; excluded tokens never appear; a row's draw depends only on its seed."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.9, 0.2, -1.0, -3.0, 0.5], dtype=torch.float64)
    T, k, top_p = 0.7, 5, 0.8
    # by hand: scale, keep the 5 largest, renormalise, keep the smallest head whose mass reaches 0.8
    z = sorted(((float(v) / T, i) for i, v in enumerate(logits)), reverse=True)[:k]
    w = [math.exp(v - z[0][0]) for v, _ in z]
    probs = [x / sum(w) for x in w]
    keep, mass = [], 0.0
    for p_, (_, i) in zip(probs, z):
        if mass >= top_p:
            break
        keep.append(i)
        mass += p_
    expect = torch.zeros(8, dtype=torch.float64)
    for i in keep:
        expect[i] = math.exp(float(logits[i]) / T)
    expect /= expect.sum()
    N = 20000
    params = [serve.SamplingParams(max_tokens=1, temperature=T, top_k=k, top_p=top_p)] * N
    gens = [torch.Generator().manual_seed(s) for s in range(N)]
    toks = serve.sample_rows(logits.expand(N, 8).clone(), params, gens)
    freq = torch.bincount(toks, minlength=8).double() / N
    assert set(toks.tolist()) == set(keep)
    sigma = (expect * (1 - expect) / N).sqrt()
    assert ((freq - expect).abs() <= 5 * sigma + 1e-12).all(), (freq, expect)
    # same seeds, rows reversed and mixed with greedy rows: each seeded row draws the same token
    mixed = [serve.SamplingParams(max_tokens=1, temperature=0.0)] * 3 + params[:50][::-1]
    gens2 = [torch.Generator().manual_seed(0)] * 3 + [torch.Generator().manual_seed(s) for s in range(50)][::-1]
    again = serve.sample_rows(logits.expand(53, 8).clone(), mixed, gens2)
    assert again[:3].tolist() == [0, 0, 0] and again[3:].tolist() == toks[:50].tolist()[::-1]


@pytest.mark.skipif(serve is None or not torch.cuda.is_available(), reason="needs CUDA: host-device syncs")
def test_serve_sampling_does_not_sync():
    """Sampled rows (OpenAI's default, temperature 1) are drawn without waiting for the GPU: a blocking copy
    would make the host wait for the decode step it just launched (CUDA only)."""
    logits = torch.randn(8, 300, device="cuda")
    params = ([serve.SamplingParams(max_tokens=1, temperature=0.8, top_k=20, top_p=0.9)] * 4
              + [serve.SamplingParams(max_tokens=1, temperature=0.0)] * 4)
    gens = [torch.Generator("cuda").manual_seed(s) for s in range(8)]
    serve.sample_rows(logits, params, gens)                   # warm-up: the first call allocates
    torch.cuda.synchronize()
    torch.cuda._sleep(1 << 31)                                # ~1 s of GPU work queued ahead, as a decode step is
    out = serve.sample_rows(logits, params, gens)
    assert not torch.cuda.current_stream().query(), "sample_rows waited for the GPU"
    top20 = logits[:4].topk(20, dim=-1).indices
    assert (out[4:] == logits[4:].argmax(-1)).all() and (top20 == out[:4, None]).any(-1).all()


@_needs_serve
def test_serve_cli_errors(tmp_path, capsys, monkeypatch):
    """--help lists every flag; bad flags, a missing checkpoint, a broken one, --backend=vllm without vLLM:
    one line on stderr and exit code 2."""
    with pytest.raises(SystemExit) as e:
        serve.parse_args(["--help"])
    assert e.value.code == 0
    helptext = capsys.readouterr().out
    assert all(f"--{f.name}=" in helptext for f in serve.fields(serve.ServeConfig))
    bad = [["--nope=1"], ["--port=x"], ["port=1"], ["--dtype=int8"], ["--page=0"], ["--access_log=maybe"],
           ["--max_num_seqs=64", "--max_num_batched_tokens=8"], ["--backend=tgi"]]
    for argv in bad:
        with pytest.raises(SystemExit) as e:
            serve.parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("serve.py: ") and err.count("\n") == 1, (argv, err)
    assert serve.parse_args(["--api-key=k", "--max-model-len=64"]).api_key == "k"   # hyphens work too
    monkeypatch.chdir(tmp_path)   # no checkpoints/ nor out/ here
    for argv, needle in [([], "python train.py"), ([f"--ckpt={tmp_path}/none.pt"], "none.pt")]:
        with pytest.raises(SystemExit) as e:
            serve.load_model(serve.parse_args(argv))
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and err.count("\n") == 1, err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        serve.load_model(serve.parse_args([f"--ckpt={tmp_path}/junk.pt"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "junk.pt" in err and err.count("\n") == 1, err
    if serve.shutil.which("vllm") is None:
        with pytest.raises(SystemExit) as e:
            serve.run_vllm(serve.parse_args(["--backend=vllm"]))
        err = capsys.readouterr().err
        assert e.value.code == 2 and "vLLM" in err and "not installed" in err and err.count("\n") == 1


@_needs_serve
def test_serve_export_and_vllm_command(tmp_path):
    """--export writes the HF folder (model.export_hf) that loads back to the same weights; --backend=vllm exports
    and execs `vllm serve DIR` with our settings (vLLM cannot run here: a stand-in `vllm` on PATH records argv)."""
    ckpt = _serve_ckpt(tmp_path / "ckpt.pt")
    fake = tmp_path / "bin" / "vllm"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(tmp_path / 'argv.json')!r}, 'w'))\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    p = _sproc.run([sys.executable, _SERVE_PY, f"--ckpt={ckpt}", "--backend=vllm", f"--export={tmp_path / 'hf'}",
                    "--port=8011", "--host=0.0.0.0", "--api-key=sk-v", "--served_model_name=ic-v", "--max_model_len=300"],
                   env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    argv = _sjson.load(open(tmp_path / "argv.json"))
    assert argv[:2] == ["serve", str(tmp_path / "hf")]
    opts = dict(zip(argv[2::2], argv[3::2]))
    assert opts == {"--served-model-name": "ic-v", "--dtype": "bfloat16", "--max-model-len": "300", "--host": "0.0.0.0",
                    "--port": "8011", "--max-num-seqs": "64", "--api-key": "sk-v"}
    assert "sk-v" not in p.stderr   # the key is not echoed
    ref, back = M.load_checkpoint(ckpt), M.load_checkpoint(str(tmp_path / "hf"))
    for (n, a), (_, b) in zip(ref.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16).float(), b.float()), n


class _ServeProc:
    """python serve.py on a free loopback port, up once /health answers."""

    def __init__(self, tmp, *flags, model_name):
        self.model_name = model_name
        with _ssocket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = open(os.path.join(tmp, f"serve-{self.port}.log"), "w+")
        self.proc = _sproc.Popen([sys.executable, _SERVE_PY, f"--port={self.port}", *flags],
                                 stdout=_sproc.DEVNULL, stderr=self.log, cwd=tmp)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = _stime.time() + 120
        while True:
            assert self.proc.poll() is None, self.logtext()
            try:
                _urlreq.urlopen(self.url + "/health", timeout=2)
                return
            except OSError:
                assert _stime.time() < deadline, "serve.py did not come up in 120 s: " + self.logtext()
                _stime.sleep(0.3)

    def logtext(self):
        self.log.seek(0)
        return self.log.read()[-3000:]

    def metrics(self):
        """/metrics as {name|label=value,...: float}; every vllm: series must carry model_name."""
        text = _urlreq.urlopen(self.url + "/metrics", timeout=10).read().decode()
        out = {}
        for line in text.splitlines():
            m = _re.match(r'^([\w:]+)(?:\{([^}]*)\})? (\S+)$', line)
            if m:
                labels = dict(_re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
                if m.group(1).startswith("vllm:"):
                    assert labels.pop("model_name") == self.model_name, line
                key = m.group(1) + ("|" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) if labels else "")
                out[key] = float(m.group(3))
        return out

    def request(self, method, path, body=None, headers=None, key=_SERVE_KEY):
        """(status, headers, parsed JSON or text) over plain http.client; body may be bytes (sent as is)."""
        conn = _http.HTTPConnection("127.0.0.1", self.port, timeout=60)
        h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
        data = body if isinstance(body, (bytes, type(None))) else _sjson.dumps(body).encode()
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        raw = r.read().decode()
        conn.close()
        try:
            return r.status, dict(r.getheaders()), _sjson.loads(raw)
        except ValueError:
            return r.status, dict(r.getheaders()), raw

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module", params=["engine_process", "engine_thread"])
def serve_proc(tmp_path_factory, request):
    """The server with its engine in a process of its own (the default) and as a thread of the HTTP process."""
    tmp = str(tmp_path_factory.mktemp("serve"))
    ckpt = _serve_ckpt(os.path.join(tmp, "ckpt.pt"))
    # float64 makes batched == sequential exact; 60 blocks of 4 tokens is too few for 16 requests at once
    s = _ServeProc(tmp, f"--ckpt={ckpt}", "--dtype=float64", "--page=4", "--num_blocks=60", "--max_model_len=240",
                   "--max_num_seqs=16", "--max_num_batched_tokens=48", f"--api-key={_SERVE_KEY}",
                   "--served_model_name=ic-test", f"--engine_process={request.param == 'engine_process'}",
                   model_name="ic-test")
    s.ckpt = ckpt
    yield s
    s.stop()


def _openai(s):
    import openai
    return openai.OpenAI(base_url=s.url + "/v1", api_key=_SERVE_KEY, max_retries=0, timeout=120)


@_needs_serve
def test_serve_openai_client(serve_proc):
    """completions and chat, streamed and not, through the official client: streams add up to the whole
    answer, usage is there (also as the last chunk with include_usage), stop strings cut the text."""
    c = _openai(serve_proc)
    assert [m.id for m in c.models.list().data] == ["ic-test"]
    prompt = "The quick brown fox jumps over the lazy dog"
    n_prompt = len(M.get_tokenizer().encode(prompt))
    full = c.completions.create(model="ic-test", prompt=prompt, max_tokens=24, temperature=0,
                                extra_body={"ignore_eos": True, "return_token_ids": True})
    ch = full.choices[0]
    assert ch.finish_reason == "length" and len(ch.token_ids) == 24 and ch.prompt_token_ids == M.get_tokenizer().encode(prompt)
    assert (full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens) == (n_prompt, 24, n_prompt + 24)
    assert ch.text == bytes(t for t in ch.token_ids if t < 256).decode("utf-8", "replace")
    chunks = list(c.completions.create(model="ic-test", prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(k.choices[0].text for k in chunks if k.choices) == ch.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert [k.choices[0].finish_reason for k in chunks if k.choices][-1] == "length"
    # a stop string taken from the middle of the greedy answer: the text ends right before it
    text = ch.text
    cut = next(i for i in range(1, len(text) - 2) if "\ufffd" not in text[i:i + 2] and text.find(text[i:i + 2]) == i)
    stopped = c.completions.create(model="ic-test", prompt=prompt, max_tokens=24, temperature=0, stop=[text[cut:cut + 2]],
                                   extra_body={"ignore_eos": True})
    assert stopped.choices[0].text == text[:cut] and stopped.choices[0].finish_reason == "stop"
    streamed_stop = c.completions.create(model="ic-test", prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                         stop=text[cut:cut + 2], extra_body={"ignore_eos": True})
    assert "".join(k.choices[0].text for k in streamed_stop) == text[:cut]
    # chat: the ChatML prompt, non-streamed and streamed
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the magic number?"}]
    n_chat = len(M.get_tokenizer().encode(M.chat_prompt(msgs), allowed_special="all"))
    a = c.chat.completions.create(model="ic-test", messages=msgs, max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert a.choices[0].message.role == "assistant" and a.usage.prompt_tokens == n_chat
    assert a.usage.completion_tokens == 16
    parts = list(c.chat.completions.create(model="ic-test", messages=msgs, max_tokens=16, temperature=0, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == a.choices[0].message.content
    assert parts[-1].usage.prompt_tokens == n_chat and parts[-1].usage.completion_tokens == 16
    # seeded sampling is reproducible
    s1, s2 = (c.completions.create(model="ic-test", prompt=prompt, max_tokens=16, temperature=1.0, top_p=0.9,
                                   seed=1234, extra_body={"top_k": 50}).choices[0].text for _ in range(2))
    assert s1 == s2


@_needs_serve
def test_serve_concurrent_greedy_equals_sequential(serve_proc):
    """16 ragged greedy requests at once (the cache holds fewer: waiting, chunking, preemption) give exactly the
    tokens of the same requests one at a time, and model.generate's; seeded sampled requests match too."""
    c = _openai(serve_proc)
    prompts = _serve_prompts(16, seed=3)

    def run(i):
        extra = {"return_token_ids": True, "ignore_eos": i % 2 == 0}
        kw = dict(temperature=0.0) if i % 4 else dict(temperature=0.9, seed=100 + i)
        r = c.completions.create(model="ic-test", prompt=prompts[i], max_tokens=16 + i, extra_body=extra, **kw)
        return r.choices[0].token_ids

    before = serve_proc.metrics()
    one_by_one = [run(i) for i in range(16)]
    with _cf.ThreadPoolExecutor(16) as ex:
        together = list(ex.map(run, range(16)))
    after = serve_proc.metrics()
    assert together == one_by_one
    assert after["vllm:num_preemptions_total"] > before["vllm:num_preemptions_total"]   # the pool really ran out
    model = M.load_checkpoint(serve_proc.ckpt).double().eval()
    for i in [i for i in range(16) if i % 4]:   # the greedy ones; generate() stops at <|im_end|> / <|endoftext|>
        ref = _reference_greedy(model, prompts[i], 16 + i)
        got = together[i] if i % 2 == 0 else _strip_stop(together[i])   # even i: ignore_eos, may run past a stop
        assert got[:len(ref)] == ref and (i % 2 == 0 or len(got) == len(ref)), i
    assert after["vllm:kv_cache_usage_perc"] == 0 and after["vllm:num_requests_running"] == 0


@_needs_serve
def test_serve_bad_inputs_get_4xx(serve_proc):
    """Every bad input gets its 4xx with an OpenAI-style error body, and the server keeps serving."""
    s = serve_proc
    ok = {"model": "ic-test", "prompt": "hi", "max_tokens": 2}
    chat = {"model": "ic-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        ("POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": ', {}, _SERVE_KEY, 400),   # malformed JSON
        ("POST", "/v1/completions", b"\xff\xfe not json", {}, _SERVE_KEY, 400),
        ("POST", "/v1/completions", {**ok, "max_tokens": "many"}, {}, _SERVE_KEY, 400),
        ("POST", "/v1/completions", {**ok, "prompt": {"text": "hi"}}, {}, _SERVE_KEY, 400),
        ("POST", "/v1/completions", {"model": "ic-test"}, {}, _SERVE_KEY, 400),
        ("POST", "/v1/completions", [1, 2, 3], {}, _SERVE_KEY, 400),
        ("POST", "/v1/completions", {**ok, "model": "gpt-4"}, {}, _SERVE_KEY, 404),
        ("POST", "/v1/completions", {**ok, "max_tokens": -5}, {}, _SERVE_KEY, 400),
        ("POST", "/v1/completions", {**ok, "max_tokens": 0}, {}, _SERVE_KEY, 400),
        ("POST", "/v1/completions", {**ok, "max_tokens": 10 ** 30}, {}, _SERVE_KEY, 400),
        ("POST", "/v1/completions", {**ok, "prompt": "x" * 600}, {}, _SERVE_KEY, 400),        # > max_model_len
        ("POST", "/v1/completions", {**ok, "prompt": "x" * 100000}, {}, _SERVE_KEY, 400),
        ("POST", "/v1/completions", {**ok, "prompt": "x" * 200, "max_tokens": 100}, {}, _SERVE_KEY, 400),
        ("POST", "/v1/completions", {**ok, "prompt": ""}, {}, _SERVE_KEY, 400),
        ("POST", "/v1/completions", {**ok, "prompt": [1, 2, 999]}, {}, _SERVE_KEY, 400),
        ("POST", "/v1/completions", {**ok, "prompt": ["a", "b"]}, {}, _SERVE_KEY, 400),
        ("POST", "/v1/completions", {**ok, "temperature": -1}, {}, _SERVE_KEY, 400),
        ("POST", "/v1/completions", b'{"prompt": "hi", "temperature": NaN}', {}, _SERVE_KEY, 400),
        ("POST", "/v1/completions", {**ok, "top_p": 0}, {}, _SERVE_KEY, 400),
        ("POST", "/v1/completions", {**ok, "seed": 1.5}, {}, _SERVE_KEY, 400),
        ("POST", "/v1/completions", {**ok, "n": 3}, {}, _SERVE_KEY, 400),
        ("POST", "/v1/completions", {**ok, "logprobs": 2}, {}, _SERVE_KEY, 400),
        ("POST", "/v1/chat/completions", {**chat, "messages": []}, {}, _SERVE_KEY, 400),
        ("POST", "/v1/chat/completions", {**chat, "messages": "hi"}, {}, _SERVE_KEY, 400),
        ("POST", "/v1/chat/completions", {**chat, "messages": [{"role": "wizard", "content": "hi"}]}, {}, _SERVE_KEY, 400),
        ("POST", "/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "x" * 1000}]}, {}, _SERVE_KEY, 400),
        ("POST", "/v1/completions", ok, {}, "sk-wrong", 401),
        ("POST", "/v1/completions", ok, {}, None, 401),
        ("GET", "/v1/models", None, {}, "sk-wrong", 401),
        ("GET", "/v1/completions", None, {}, _SERVE_KEY, 405),
        ("POST", "/v1/nothing", ok, {}, _SERVE_KEY, 404),
    ]
    before = s.metrics()
    for method, path, body, headers, key, want in cases:
        status, _, reply = s.request(method, path, body, headers, key)
        assert status == want, (path, body if not isinstance(body, (str, bytes)) or len(body) < 80 else "...", status, reply)
        assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["message"], reply
        assert s.proc.poll() is None
    after = s.metrics()   # the server counted every answer by status, and none was a 5xx
    for code in {c[-1] for c in cases}:
        got = after[f"http_requests_total|status={code}"] - before.get(f"http_requests_total|status={code}", 0)
        assert got == sum(c[-1] == code for c in cases), code
    assert not [k for k in after if k.startswith("http_requests_total|status=5")]
    status, _, reply = s.request("POST", "/v1/chat/completions", {**chat, "max_tokens": 3, "ignore_eos": True})
    assert status == 200 and reply["usage"]["completion_tokens"] == 3
    assert s.request("GET", "/health", key=None)[0] == 200 and s.request("GET", "/metrics", key=None)[0] == 200
    schema = s.request("GET", "/openapi.json", key=None)[2]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(schema["paths"])
    assert "CompletionRequest" in schema["components"]["schemas"]


def _raw_stream(s, path, body, response=True):
    conn = _http.HTTPConnection("127.0.0.1", s.port, timeout=60)
    conn.request("POST", path, body=_sjson.dumps(body), headers={"Content-Type": "application/json",
                                                                  "Authorization": f"Bearer {_SERVE_KEY}"})
    return conn, conn.getresponse() if response else None


def _wait_for(s, cond, what, timeout=60):
    deadline = _stime.time() + timeout
    while True:
        m = s.metrics()
        if cond(m):
            return m
        assert _stime.time() < deadline, f"{what}: {m}"
        _stime.sleep(0.05)


@_needs_serve
def test_serve_disconnect_frees_blocks(serve_proc):
    """A client that hangs up mid-stream, or while waiting for a whole answer, gets its request aborted and its
    blocks freed: vllm:kv_cache_usage_perc back to 0, far fewer tokens generated than asked for."""
    s = serve_proc
    for stream in (True, False):
        before = s.metrics()
        body = {"model": "ic-test", "prompt": "tell me a long story", "max_tokens": 200, "temperature": 0,
                "ignore_eos": True, "stream": stream}
        conn, resp = _raw_stream(s, "/v1/completions", body, response=stream)   # a whole answer: do not wait for it
        if stream:
            assert resp.status == 200
            lines = [resp.readline() for _ in range(4)]
            assert lines[0].startswith(b"data: {")
        mid = _wait_for(s, lambda m: m["vllm:num_requests_running"] == 1, "request never ran")
        assert mid["vllm:kv_cache_usage_perc"] > 0
        conn.sock.shutdown(_ssocket.SHUT_RDWR)
        conn.close()
        key = "vllm:request_success_total|finished_reason=abort"
        after = _wait_for(s, lambda m: m["vllm:kv_cache_usage_perc"] == 0 and m.get(key, 0) == before.get(key, 0) + 1,
                          "blocks not freed after the client left")
        assert after["vllm:num_requests_running"] == 0
        assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] < 200


@_needs_serve
def test_bench_load_generator_processes(serve_proc):
    """bench.run_load with its clients spread over 2 processes (as `bench.py serve` runs them on a GPU host):
    every request is sent once, from those processes, every stream ends with [DONE], the wall time covers
    every request's latency (one clock across processes), and /metrics counts the tokens the records report."""
    import bench
    s = serve_proc
    before = s.metrics()

    def body(i):
        return "/v1/completions", {"model": "ic-test", "prompt": [65 + i, 66, 67], "max_tokens": 3 + i % 3,
                                   "temperature": 0, "ignore_eos": True, "stream": True,
                                   "stream_options": {"include_usage": True}}, None

    t0 = time.perf_counter()
    recs, wall = bench.run_load(s.url, body, 3, num_requests=7, api_key=_SERVE_KEY, procs=2)
    outer = time.perf_counter() - t0
    recs.sort(key=lambda r: r["i"])
    assert [r["i"] for r in recs] == list(range(7))
    assert all(r["done"] and r["status"] == 200 and r["error"] is None for r in recs)
    assert [r["completion_tokens"] for r in recs] == [3 + i % 3 for i in range(7)]
    assert [r["prompt_tokens"] for r in recs] == [3] * 7
    assert len({r["pid"] for r in recs}) == 2 and os.getpid() not in {r["pid"] for r in recs}
    assert max(r["latency"] for r in recs) <= wall <= outer
    # the next level reuses the processes (starting them took up to a minute a level on a GPU host), counting from 0
    again, _ = bench.run_load(s.url, body, 3, num_requests=4, api_key=_SERVE_KEY, procs=2)
    assert sorted(r["i"] for r in again) == list(range(4)) and all(r["done"] for r in again)
    assert {r["pid"] for r in again} <= {r["pid"] for r in recs}
    after = s.metrics()
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == sum(3 + i % 3 for n in (7, 4) for i in range(n))


@_needs_serve
def test_bench_serve_end_to_end(tmp_path):
    """`python bench.py serve` as the README runs it, small: serve.py and transformers' generate at each
    concurrency; every row's token counts are the closed form (requests x max_tokens), throughput is tokens over
    wall time, the target ratio is the two engines' throughputs, and the run records its phases' times."""
    import json
    out, (P, T, rounds) = tmp_path / "serve.json", (16, 5, 2)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "serve", "--preset=tiny", "--concurrency=1,3",
                        f"--rounds={rounds}", f"--max_tokens={T}", f"--prompt_len={P}", "--client_procs=1", f"--out={out}"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    d = json.loads(out.read_text())
    rows = {(r["engine"], r["concurrency"]): r for r in d["rows"]}
    assert set(rows) == {(e, c) for e in ("serve.py", "transformers.generate") for c in (1, 3)}
    for (engine, c), r in rows.items():
        n = c * rounds
        assert r["requests"] == n and r["generated_tokens"] == n * T
        w = r["wall_s"]   # rounded to the ms
        assert n * T / (w + 5e-4) - 0.01 <= r["throughput_tok_s"] <= n * T / max(w - 5e-4, 1e-9) + 0.01
        if engine == "serve.py":
            assert r["completed"] == n and r["statuses"] == {"200": n} and r["prompt_tokens"] == n * P
    assert d["targets"]["speedup_c3"] == round(rows["serve.py", 3]["throughput_tok_s"]
                                               / rows["transformers.generate", 3]["throughput_tok_s"], 2)
    assert list(d["phase_s"]) == ["setup_and_server_start", "warm_up", "serve_c1", "serve_c3", "baseline"]
    assert d["server_startup"][0].startswith("serve.py: bench (") and d["config"]["requests"] == {"1": 2, "3": 6}


@_needs_serve
def test_serve_metrics_count_tokens(serve_proc):
    """/metrics counts prompt and generated tokens exactly (against the tokenizer and usage)."""
    s = serve_proc
    tok = M.get_tokenizer()
    before = s.metrics()
    prompts = ["a", "hello there", "<|im_start|>user\nspecial tokens count as one<|im_end|>\n", "é" * 7]
    usages = []
    for i, p in enumerate(prompts):
        body = {"model": "ic-test", "prompt": p, "max_tokens": 3 + i, "temperature": 0, "ignore_eos": True,
                "stream": i % 2 == 1, "stream_options": {"include_usage": True}}
        status, _, reply = s.request("POST", "/v1/completions", body)
        assert status == 200
        if i % 2:
            events = [ln[6:] for ln in reply.split("\n\n") if ln.startswith("data: ")]
            assert events[-1] == "[DONE]"
            reply = _sjson.loads(events[-2])
        usages.append(reply["usage"])
        assert reply["usage"]["prompt_tokens"] == len(tok.encode(p, allowed_special="all"))
        assert reply["usage"]["completion_tokens"] == 3 + i
    after = s.metrics()
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == sum(u["prompt_tokens"] for u in usages)
    assert (after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
            == sum(u["completion_tokens"] for u in usages) == 3 + 4 + 5 + 6)
    assert after["vllm:e2e_request_latency_seconds_count"] - before["vllm:e2e_request_latency_seconds_count"] == 4
    assert after["vllm:time_to_first_token_seconds_count"] - before["vllm:time_to_first_token_seconds_count"] == 4
    assert after["vllm:inter_token_latency_seconds_count"] - before["vllm:inter_token_latency_seconds_count"] == 2 + 3 + 4 + 5


@_needs_serve
def test_serve_queue_full_and_sigterm_drain(tmp_path):
    """One running sequence and a queue of one: a burst gets 503 + Retry-After for the overflow (the rest is
    served); SIGTERM mid-stream refuses new connections, lets the stream finish every token, then exits 0."""
    ckpt = _serve_ckpt(tmp_path / "ckpt.pt")
    s = _ServeProc(str(tmp_path), f"--ckpt={ckpt}", "--max_num_seqs=1", "--max_queue=1", "--page=16",
                   f"--api_key={_SERVE_KEY}", "--served_model_name=ic-sig", model_name="ic-sig")
    try:
        body = {"prompt": "count", "max_tokens": 60, "temperature": 0, "ignore_eos": True}
        with _cf.ThreadPoolExecutor(6) as ex:
            replies = list(ex.map(lambda _: s.request("POST", "/v1/completions", body), range(6)))
        codes = sorted(r[0] for r in replies)
        assert 503 in codes and 200 in codes and set(codes) == {200, 503}, codes
        assert all(h.get("retry-after") or h.get("Retry-After") for code, h, _ in replies if code == 503)
        texts = {r[2]["choices"][0]["text"] for r in replies if r[0] == 200}
        assert len(texts) == 1
        conn, resp = _raw_stream(s, "/v1/completions", {**body, "max_tokens": 300, "stream": True,
                                                        "stream_options": {"include_usage": True}})
        first = resp.readline()
        assert first.startswith(b"data: {")
        s.proc.send_signal(_signal.SIGTERM)
        _stime.sleep(0.5)
        with pytest.raises(OSError):   # draining: the listener is closed
            _urlreq.urlopen(s.url + "/health", timeout=5)
        rest = resp.read().decode()
        events = [ln[6:] for ln in (first.decode() + rest).split("\n\n") if ln.startswith("data: ")]
        assert events[-1] == "[DONE]" and _sjson.loads(events[-2])["usage"]["completion_tokens"] == 300
        assert s.proc.wait(timeout=60) == 0
    finally:
        s.stop()



# ============================================================================ infra (issue 10)
# The playbook really runs against this machine (apt installs, munge + SLURM daemons), so these
# tests run where CI is set and skip elsewhere; the manifest and Prometheus checks run everywhere.
import json
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import yaml

INFRA_BIN = os.path.dirname(sys.executable)  # ansible-playbook, ansible-lint, kubernetes-validate, torchrun
INFRA_NEEDS_CI = pytest.mark.skipif(
    not os.environ.get("CI"), reason="CI not set: the playbook apt-installs packages and starts SLURM "
                                     "daemons on this machine (run with CI=true, as root)")
# DESIGN.md section 7: the vLLM metric names serve.py also exposes (histograms add _bucket/_sum/_count).
INFRA_VLLM_METRICS = {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                      "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                      "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                      "vllm:e2e_request_latency_seconds"}
# Fields from dcgm-exporter's default-counters.csv (the subset a serving dashboard can use).
INFRA_DCGM_FIELDS = {"DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_MEM_CLOCK", "DCGM_FI_DEV_MEMORY_TEMP",
                     "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
                     "DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_MEM_COPY_UTIL",
                     "DCGM_FI_DEV_ENC_UTIL", "DCGM_FI_DEV_DEC_UTIL", "DCGM_FI_DEV_XID_ERRORS",
                     "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL"}
INFRA_PROMQL_WORDS = {"sum", "avg", "max", "min", "count", "rate", "irate", "increase", "histogram_quantile",
                      "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                      "bool", "offset", "topk", "bottomk", "quantile", "abs", "clamp_max", "clamp_min"}


def _infra_run(cmd, timeout=600, check=True, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=kw.pop("cwd", ROOT), **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def _infra_playbook():
    """One real run of setup_node.yml against this machine; the project env is the one running pytest."""
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", ANSIBLE_STDOUT_CALLBACK="default")
    r = _infra_run([os.path.join(INFRA_BIN, "ansible-playbook"), "-i", "localhost,", "-c", "local",
                    "setup_node.yml", "-e", f"venv_dir={sys.prefix}"], env=env)
    recap = re.search(r"localhost\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", r.stdout)
    assert recap, r.stdout[-3000:]
    return r.stdout, int(recap.group(2)), int(recap.group(4))


def _infra_task_results(out, task):
    """The result lines ('ok', 'changed', 'skipping', ...) printed under one TASK banner."""
    block = out.split(f"TASK [{task}]", 1)[1].split("\nTASK [", 1)[0]
    return re.findall(r"^(ok|changed|skipping|fatal|failed): ", block, re.M)


@pytest.fixture(scope="module")
def infra_cluster():
    if not os.environ.get("CI"):
        pytest.skip("CI not set: the playbook apt-installs packages and starts SLURM daemons on this machine")
    out, changed, failed = _infra_playbook()
    return {"out": out, "changed": changed, "failed": failed}


@INFRA_NEEDS_CI
def test_infra_playbook_brings_up_slurm(infra_cluster):
    out = infra_cluster["out"]
    assert infra_cluster["failed"] == 0
    # No NVIDIA GPU here: the GPU tasks skip, and the playbook says why.
    assert "No NVIDIA GPU found: skipping the NVIDIA driver, Docker and the NVIDIA container toolkit" in out
    for task in ("Install the NVIDIA driver", "Install Docker and the NVIDIA container toolkit",
                 "Register the NVIDIA runtime with Docker"):
        assert _infra_task_results(out, task) == ["skipping"], task
    # SLURM is up and this machine is an idle node of it (sinfo asks slurmctld, through munge).
    node = socket.gethostname().split(".")[0]
    r = _infra_run(["sinfo", "--noheader", "--Node", "--format=%N %T %c"])
    rows = dict((l.split()[0], l.split()[1:]) for l in r.stdout.splitlines())
    assert node in rows, r.stdout
    assert rows[node][0] in ("idle", "mixed", "allocated"), r.stdout  # idle unless a job of ours runs
    assert int(rows[node][1]) == os.cpu_count()  # CPUs= templated from the facts
    conf = open("/etc/slurm/slurm.conf").read()
    assert f"SlurmctldHost={node}(" in conf and "Gres=" not in conf  # controller = first host, no GPUs


@INFRA_NEEDS_CI
def test_infra_playbook_second_run_changes_nothing(infra_cluster):
    out, changed, failed = _infra_playbook()
    assert failed == 0 and changed == 0, "\n".join(l for l in out.splitlines() if l.startswith("changed:")
                                                    or l.startswith("TASK ["))


def test_infra_playbook_ansible_lint_production():
    r = _infra_run([os.path.join(INFRA_BIN, "ansible-lint"), "--nocolor", "--profile=production", "setup_node.yml"],
                   check=False, env=dict(os.environ, NO_COLOR="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Profile 'production' was required, and it passed" in r.stderr + r.stdout


def _infra_sbatch(tmp, *train_args, name):
    env = dict(os.environ, OUT_DIR=str(tmp / "out"), VENV=sys.prefix)
    r = _infra_run(["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--time=15", f"--job-name={name}",
                    f"--output={tmp}/%x-%j.out", "train.sbatch", *train_args], env=env)
    return r.stdout.strip().split(";")[0]


def _infra_job(job):
    """scontrol's view of a job as a dict (JobState, Restarts, ExitCode, ...)."""
    r = _infra_run(["scontrol", "show", "job", "--oneliner", job])
    return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)


def _infra_wait(pred, timeout, what, every=0.5):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _infra_ckpt_step(path):
    """The training step stored in a train.py checkpoint (nanoGPT's iter_num or DESIGN's step)."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("step", "iter_num", "iter"):
        if key in ck:
            return int(ck[key])
    raise AssertionError(f"{path}: no step in the checkpoint keys {sorted(ck)}")


def _infra_try_step(path):
    try:
        return _infra_ckpt_step(path)
    except (OSError, RuntimeError, EOFError):
        return None


@INFRA_NEEDS_CI
def test_infra_sbatch_trains_tiny(infra_cluster, tmp_path):
    tmp_path.chmod(0o755)
    job = _infra_sbatch(tmp_path, "--max_iters=4", "--ckpt_interval=2", name=f"ic-test-{os.getpid()}")
    try:
        state = _infra_wait(lambda: (lambda j: j["JobState"] not in ("PENDING", "RUNNING", "CONFIGURING",
                                                                     "COMPLETING") and j)(_infra_job(job)),
                            300, f"job {job} to end")
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    log = open(next(tmp_path.glob(f"*-{job}.out"))).read()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", log[-3000:]
    assert f"job {job} run 1: 1 node(s) x 1 process(es)" in log and "--preset=tiny" in log
    # train.py checkpoints every 2 steps (and on exit): the last one is from step 2..4.
    assert 2 <= _infra_ckpt_step(tmp_path / "out" / "ckpt.pt") <= 4, log[-3000:]
    assert f"job {job} finished" in log


@INFRA_NEEDS_CI
def test_infra_sbatch_usr1_checkpoints_requeues_and_resumes(infra_cluster, tmp_path):
    tmp_path.chmod(0o755)
    ckpt = tmp_path / "out" / "ckpt.pt"
    job = _infra_sbatch(tmp_path, "--max_iters=1000000", "--ckpt_interval=1", name=f"ic-requeue-{os.getpid()}")
    try:
        # Training runs once checkpoints appear; let it pass step 3 so a fresh start would be visible.
        _infra_wait(lambda: (_infra_try_step(ckpt) or 0) >= 3, 300, "train.py's checkpoints")
        _infra_run(["scancel", "--batch", "--signal=USR1", job])
        # The batch shell: SIGTERM to torchrun, train.py saves and exits, then `scontrol requeue`.
        _infra_wait(lambda: (lambda j: j["Restarts"] == "1" and j["JobState"] == "PENDING")(_infra_job(job)),
                    180, f"job {job} to requeue")
        log_path = next(tmp_path.glob(f"*-{job}.out"))
        log = open(log_path).read()
        assert "USR1: time is nearly up" in log and "checkpoint saved" in log, log[-3000:]
        saved = _infra_ckpt_step(ckpt)
        assert saved >= 3
        # SLURM holds a requeued job ~2 minutes (BeginTime) while the node cleans up; once the
        # old job credential is a few seconds old, release it now instead of waiting.
        time.sleep(3)
        _infra_run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
        _infra_wait(lambda: f"job {job} run 2:" in open(log_path).read(), 180, "the requeued run to start")
        # The requeued run resumes: every checkpoint it writes is past the one saved at USR1
        # (a fresh start would write step 1, 2, ... first).
        seen = []
        def progressed():
            s = _infra_try_step(ckpt)
            if s is not None and (not seen or s != seen[-1]):
                seen.append(s)
            return s is not None and s > saved
        _infra_wait(progressed, 300, "a checkpoint of the requeued run", every=0.05)
        assert all(s >= saved for s in seen), (saved, seen)
        assert _infra_job(job)["Restarts"] == "1"
    finally:
        subprocess.run(["scancel", job], capture_output=True)


def _infra_manifest():
    with open(os.path.join(ROOT, "k8s.yaml")) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _infra_doc(docs, kind, name):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _infra_validate(path, version):
    r = _infra_run([os.path.join(INFRA_BIN, "kubernetes-validate"), "--strict", "-k", version, path], check=False)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize("version", ["1.30.0", "latest"])
def test_infra_k8s_manifest_validates_strict(version, tmp_path):
    from kubernetes_validate.utils import latest_version
    version = latest_version() if version == "latest" else version
    docs = _infra_manifest()
    rc, out = _infra_validate(os.path.join(ROOT, "k8s.yaml"), version)
    assert rc == 0, out
    # Every document was checked against a schema: no kind skipped as unknown (no CRDs).
    assert "Couldn't find schema" not in out and out.count(" passed for resource ") == len(docs), out
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "RuntimeClass", "DaemonSet", "Deployment", "Service", "HorizontalPodAutoscaler",
            "ConfigMap", "APIService"} <= kinds
    # The validator is live: one unknown field in the vLLM container fails the strict check.
    bad = [dict(d) for d in docs]
    dep = _infra_doc(bad, "Deployment", "vllm")
    dep["spec"]["template"]["spec"]["containers"][0]["gpuCount"] = 1
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump_all(bad))
    rc, out = _infra_validate(str(tmp_path / "bad.yaml"), version)
    assert rc != 0 and "gpuCount" in out, out


def test_infra_k8s_vllm_deployment_contract():
    docs = _infra_manifest()
    dep = _infra_doc(docs, "Deployment", "vllm")
    pod = dep["spec"]["template"]["spec"]
    c = next(c for c in pod["containers"] if c["name"] == "vllm")
    image = c["image"]
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", image), image  # a pinned release, never :latest
    assert "--dtype=bfloat16" in c["command"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health", probe
    assert pod["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["runtimeClassName"] == "nvidia" and _infra_doc(docs, "RuntimeClass", "nvidia")["handler"] == "nvidia"
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    env = {e["name"]: e["value"] for e in c["env"]}
    assert "emptyDir" in vols[mounts[env["HOME"]]] and env["HF_HOME"].startswith(env["HOME"] + "/")
    # Model storage every replica reads: an initContainer fills a per-pod emptyDir the server mounts read-only.
    init = pod["initContainers"][0]
    model_vol = next(m["name"] for m in init["volumeMounts"])
    assert "emptyDir" in vols[model_vol]
    assert any(m["name"] == model_vol and m.get("readOnly") for m in c["volumeMounts"])
    model_path = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == model_vol)
    assert c["command"][:3] == ["vllm", "serve", model_path]
    port = c["ports"][0]["containerPort"]
    svc = _infra_doc(docs, "Service", "vllm")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"] and svc["spec"]["ports"][0]["port"] == port


def _infra_promql_metrics(expr):
    """Metric names a PromQL expression reads: identifiers outside label matchers, ranges, strings and
    grouping clauses that are not functions or keywords."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        rest = e[m.end():].lstrip()
        if m.group() in INFRA_PROMQL_WORDS or rest.startswith("("):
            continue
        names.add(m.group())
    return names


def _infra_metric_family(name, families):
    """The exposed family a sample name belongs to (histogram series carry _bucket/_sum/_count)."""
    for suffix in ("", "_bucket", "_sum", "_count"):
        if suffix and name.endswith(suffix) and name[: -len(suffix)] in families:
            return name[: -len(suffix)]
        if not suffix and name in families:
            return name
    return None


def _infra_monitoring():
    """Every PromQL query the manifest makes (Grafana panels, Prometheus rules) and the adapter rules."""
    docs = _infra_manifest()
    dash = json.loads(_infra_doc(docs, "ConfigMap", "grafana-dashboard")["data"]["infinitecontext.json"])
    panels = [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]
    prom = _infra_doc(docs, "ConfigMap", "prometheus")["data"]
    rules = [(r.get("record") or r["alert"], r["expr"]) for g in yaml.safe_load(prom["rules.yml"])["groups"]
             for r in g["rules"]]
    adapter = yaml.safe_load(_infra_doc(docs, "ConfigMap", "adapter-config")["data"]["config.yaml"])["rules"]
    counters = [l.split(",")[0].strip() for l in
                _infra_doc(docs, "ConfigMap", "dcgm-counters")["data"]["counters.csv"].splitlines() if l.strip()]
    hpa = _infra_doc(docs, "HorizontalPodAutoscaler", "vllm")
    return docs, panels, rules, adapter, counters, hpa


def _infra_adapter_names(adapter):
    """prometheus-adapter's renaming: each rule's series name through name.matches -> name.as."""
    out = {}
    for rule in adapter:
        series = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", rule["seriesQuery"].strip("'")).group()
        renamed = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${", "\\g<").replace("}", ">"), series)
        out[renamed] = series
    return out


def test_infra_dashboard_and_hpa_name_existing_metrics():
    docs, panels, rules, adapter, counters, hpa = _infra_monitoring()
    assert set(counters) <= INFRA_DCGM_FIELDS, set(counters) - INFRA_DCGM_FIELDS
    families = INFRA_VLLM_METRICS | set(counters)
    assert len(panels) >= 6
    for where, expr in panels + rules:
        names = _infra_promql_metrics(expr)
        assert names, (where, expr)
        for n in names:
            assert _infra_metric_family(n, families), f"{where}: {expr} reads {n}, which nothing exposes"
    renamed = _infra_adapter_names(adapter)
    assert renamed["vllm_num_requests_waiting"] == "vllm:num_requests_waiting"
    for series in renamed.values():
        assert series in families, series
    hpa_metrics = {m[m["type"].lower()]["metric"]["name"]: m for m in hpa["spec"]["metrics"]}
    assert "vllm_num_requests_waiting" in hpa_metrics
    rule_of = {n: next(r for r in adapter if r["seriesQuery"].strip("'").startswith(s)) for n, s in renamed.items()}
    for name, m in hpa_metrics.items():
        assert name in renamed, f"HPA metric {name} is not served by any adapter rule"
        resources = {v["resource"] for v in rule_of[name]["resources"]["overrides"].values()}
        if m["type"] == "Object":  # the adapter must map the series onto the described object's kind
            assert m["object"]["describedObject"]["kind"].lower() in resources, (name, resources)
        else:
            assert "pod" in resources, (name, resources)
    assert hpa["spec"]["scaleTargetRef"]["name"] == "vllm" and hpa["apiVersion"] == "autoscaling/v2"
    # The labels the adapter maps vLLM series by come from the scrape config (vLLM does not set them);
    # DCGM's namespace/pod come from the exporter itself, kept by honor_labels.
    prom = yaml.safe_load(_infra_doc(docs, "ConfigMap", "prometheus")["data"]["prometheus.yml"])
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    added = {r.get("target_label") for r in jobs["vllm"].get("relabel_configs", [])}
    for name, series in renamed.items():
        labels = set(rule_of[name]["resources"]["overrides"])
        if series.startswith("vllm:"):
            assert labels <= added, (name, labels, added)
        else:
            assert jobs["dcgm-exporter"]["honor_labels"] is True
    dcgm = _infra_doc(docs, "DaemonSet", "dcgm-exporter")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "DCGM_EXPORTER_KUBERNETES", "value": "true"} in dcgm["env"]
    # The negative control: a panel on a metric nobody exposes is caught.
    assert not _infra_metric_family("vllm:gpu_cache_usage_perc", families)
    assert _infra_promql_metrics('sum by (pod) (rate(vllm:prompt_tokens_total{pod="a"}[1m])) / on(pod) x') == \
        {"vllm:prompt_tokens_total", "x"}


def _infra_promtool():
    exe = shutil.which("promtool")
    if exe is None:
        if os.environ.get("CI"):
            raise AssertionError("promtool missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus); CI installs it")
    return exe


def test_infra_prometheus_config_and_rules_pass_promtool(tmp_path):
    promtool = _infra_promtool()
    docs, panels, rules, adapter, counters, hpa = _infra_monitoring()
    data = _infra_doc(docs, "ConfigMap", "prometheus")["data"]
    for name, text in data.items():
        (tmp_path / name).write_text(text)
    mount = next(m["mountPath"] for m in _infra_doc(docs, "Deployment", "prometheus")["spec"]["template"]["spec"]
                 ["containers"][0]["volumeMounts"] if m["name"] == "config")
    # The ConfigMap is mounted at /etc/prometheus in the pod; here it lives in tmp_path.
    (tmp_path / "prometheus.yml").write_text(data["prometheus.yml"].replace(mount + "/", str(tmp_path) + "/"))
    r = _infra_run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], check=False)
    assert r.returncode == 0 and "SUCCESS" in r.stdout + r.stderr, r.stdout + r.stderr
    r = _infra_run([promtool, "check", "rules", str(tmp_path / "rules.yml")], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    # The adapter's metricsQuery templates, instantiated as prometheus-adapter does, and every Grafana
    # query: each must be valid PromQL (promtool parses them as recording rules).
    exprs = []
    for rule in adapter:
        series = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", rule["seriesQuery"].strip("'")).group()
        exprs.append(rule["metricsQuery"].replace("<<.Series>>", series)
                     .replace("<<.LabelMatchers>>", 'namespace="infinitecontext",pod=~"vllm-.*"')
                     .replace("<<.GroupBy>>", "pod"))
    exprs += [e for _, e in panels]
    check = {"groups": [{"name": "queries", "rules": [{"record": f"infinitecontext:q{i}", "expr": e}
                                                       for i, e in enumerate(exprs)]}]}
    (tmp_path / "queries.yml").write_text(yaml.safe_dump(check))
    r = _infra_run([promtool, "check", "rules", str(tmp_path / "queries.yml")], check=False)
    assert r.returncode == 0 and f"{len(exprs)} rules found" in r.stdout, r.stdout + r.stderr
    # promtool is live: a broken query fails.
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(
        {"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum(rate(vllm:prompt_tokens_total[1m])"}]}]}))
    assert _infra_run([promtool, "check", "rules", str(tmp_path / "broken.yml")], check=False).returncode != 0


def _infra_free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _infra_get(url, data=None, timeout=10):
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read().decode()


@pytest.fixture(scope="module")
def infra_serve_py(tmp_path_factory):
    """serve.py started with the manifest's serve-py command (model path and port made local)."""
    if not os.path.exists(os.path.join(ROOT, "serve.py")):
        pytest.skip("serve.py not present yet")
    import model as ic_model
    tmp = tmp_path_factory.mktemp("infra-serve")
    torch.manual_seed(0)
    ic_model.save_checkpoint(str(tmp / "ckpt.pt"), ic_model.Transformer(ic_model.PRESETS["tiny"]))
    dep = _infra_doc(_infra_manifest(), "Deployment", "vllm")
    ann = dep["metadata"]["annotations"]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    model_path = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "models")
    port = _infra_free_port()
    cmd = ann["infinitecontext/serve-py-command"].split()
    assert cmd[:2] == ["python", "serve.py"] and f"--ckpt={model_path}" in cmd and "--port=8000" in cmd
    cmd = [sys.executable if a == "python" else a.replace(f"--ckpt={model_path}", f"--ckpt={tmp / 'ckpt.pt'}")
           .replace("--port=8000", f"--port={port}").replace("--host=0.0.0.0", "--host=127.0.0.1") for a in cmd]
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        def up():
            assert proc.poll() is None, open(tmp / "serve.log").read()[-3000:]
            try:
                return _infra_get(base + "/health", timeout=2)[0] == 200
            except OSError:
                return False
        _infra_wait(up, 180, "serve.py /health")
        yield {"base": base, "deployment": dep}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_infra_metrics_exist_in_serve_py(infra_serve_py):
    base = infra_serve_py["base"]
    model_id = json.loads(_infra_get(base + "/v1/models")[1])["data"][0]["id"]
    # One request, so that every labelled family (histograms included) has a child to expose.
    status, _ = _infra_get(base + "/v1/completions", {"model": model_id, "prompt": "hello", "max_tokens": 2})
    assert status == 200
    status, text = _infra_get(base + "/metrics")
    exposed = {}
    for line in text.splitlines():
        m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s", line)
        if m and not line.startswith("#"):
            exposed.setdefault(m.group(1), []).append(m.group(2) or "")
    _, panels, rules, adapter, counters, hpa = _infra_monitoring()
    vllm_names = {n for _, e in panels + rules for n in _infra_promql_metrics(e) if n.startswith("vllm:")}
    vllm_names |= {s for s in _infra_adapter_names(adapter).values() if s.startswith("vllm:")}
    for n in vllm_names:
        assert n in exposed, f"{n} is queried but serve.py's /metrics lacks it"
        assert all("model_name=" in lbl for lbl in exposed[n]), (n, exposed[n])


def _infra_embedded_manifest():
    """k8s.yaml with the vllm container's image and command swapped for the serve-py annotations."""
    docs = _infra_manifest()
    dep = _infra_doc(docs, "Deployment", "vllm")
    ann = dep["metadata"]["annotations"]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    before = json.loads(json.dumps(c))
    c["image"] = ann["infinitecontext/serve-py-image"]
    c["command"] = ann["infinitecontext/serve-py-command"].split()
    return docs, c, before


def test_infra_same_manifest_embedded_engine_validates(tmp_path):
    docs, c, before = _infra_embedded_manifest()
    assert {k for k in c if c[k] != before[k]} == {"image", "command"} and "args" not in c
    (tmp_path / "embedded.yaml").write_text(yaml.safe_dump_all(docs))
    rc, out = _infra_validate(str(tmp_path / "embedded.yaml"), "1.30.0")
    assert rc == 0, out
    # serve.py's flags agree with what the rest of the manifest expects of the container.
    model_path = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "models")
    assert c["command"][:2] == ["python", "serve.py"]
    assert f"--ckpt={model_path}" in c["command"] and f"--port={c['ports'][0]['containerPort']}" in c["command"]
    assert "--host=0.0.0.0" in c["command"]  # the kubelet probes and the Service reach the pod IP


def test_infra_same_manifest_serves_embedded_engine(infra_serve_py):
    """serve.py, started with the manifest's command, answers the kubelet's probes and the API."""
    docs, c, before = _infra_embedded_manifest()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        status, _ = _infra_get(infra_serve_py["base"] + c[probe]["httpGet"]["path"])
        assert status == 200, probe
    status, body = _infra_get(infra_serve_py["base"] + "/v1/models")
    assert status == 200 and json.loads(body)["data"]
