"""
InfiniteContext model: DeepSeek-V3's Multi-head Latent Attention (MLA) in one file.

Read top to bottom: config and presets, tokenizer, RMSNorm, RoPE (+YaRN), the paged latent
cache, MLA (naive path for training/prefill, absorbed path for decode), the MHA/GQA baseline,
the transformer, generation, checkpoints, Hugging Face export; last, the few command-line helpers
the scripts share. Field and weight names follow transformers' DeepseekV3 (and DeepSeek's
convert.py), so export to Hugging Face is a name table, no permutation.

MLA in one paragraph (DeepSeek-V2/V3 paper, section 2.1.1), for x_t (hidden) at position t:
    c_t      = RMSNorm(W_DKV x_t)                 the latent, kv_lora_rank wide: all the cache holds
    k_t^R    = RoPE(W_KR x_t)                     ONE rope key shared by all heads, also cached
    k_t^C    = W_UK c_t,  v_t^C = W_UV c_t        per head; decompressed only for training/prefill
    q_t      = [W_UQ c_t^Q | RoPE(W_QR c_t^Q)]    (c_t^Q = RMSNorm(W_DQ x_t), or q = W_Q x_t)
    score    = (q^C . k^C + q^R . k^R) / sqrt(d_nope + d_rope)
Decode absorbs W_UK into the query (q^C . W_UK c = (W_UK^T q^C) . c) and W_UV into the output,
so attention runs straight against the latent cache and K/V are never materialised.
"""
import inspect
import io
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    """Field names are transformers' DeepseekV3Config's (dense: every layer has a SwiGLU MLP)."""
    vocab_size: int = 264                  # 256 bytes + 8 special tokens (see get_tokenizer)
    hidden_size: int = 128
    intermediate_size: int = 384           # SwiGLU width
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    q_lora_rank: int | None = None         # None: q = W_Q x; else q = W_UQ RMSNorm(W_DQ x)
    kv_lora_rank: int = 64                 # latent width R: what the cache stores per token...
    qk_rope_head_dim: int = 32             # ...plus the shared rope key, P wide
    qk_nope_head_dim: int = 32
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None       # None or YaRN: {"type": "yarn", "factor", "original_max_position_embeddings",
                                           #                "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    attn: str = "mla"                      # "mla", or "mha": the Llama-style baseline of the same width
    num_key_value_heads: int | None = None  # baseline only: None = MHA, fewer than heads = GQA
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.attn not in ("mla", "mha"):
            raise ValueError(f"attn must be 'mla' or 'mha', got {self.attn!r}")
        if self.rope_scaling is not None and self.rope_scaling.get("factor", 1.0) < 1.0:
            raise ValueError("rope_scaling factor must be >= 1")


def yarn(factor, original, beta_fast=32.0, beta_slow=1.0, mscale=1.0):
    """A YaRN rope_scaling dict with mscale == mscale_all_dim (cos/sin unscaled, softmax scale x m^2)."""
    return {"type": "yarn", "rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": original,
            "beta_fast": float(beta_fast), "beta_slow": float(beta_slow), "mscale": float(mscale),
            "mscale_all_dim": float(mscale)}


PRESETS = {
    # CPU default: trains to a useful needle model in minutes on 2 cores
    "tiny": ModelConfig(),
    # the shipped GPU needle model: ~6M parameters; kv_lora 256 + rope 64 = vLLM's 320-wide MLA head
    "small": ModelConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
                         kv_lora_rank=256, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64,
                         max_position_embeddings=1 << 20),
    # InfiniteContext-1B: ~1.05B non-embedding parameters, 27 KiB of latent cache per token in bf16
    "1b": ModelConfig(hidden_size=2048, intermediate_size=4608, num_hidden_layers=24, num_attention_heads=16,
                      q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                      v_head_dim=128, max_position_embeddings=1 << 20),
}


def config_from_dict(d):
    """ModelConfig from a checkpoint's dict, refusing keys we do not know (a foreign file)."""
    names = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}")
    return ModelConfig(**d)


def kv_bytes_per_token(cfg, attn="mla", dtype=torch.bfloat16, kv_heads=None):
    """Cache bytes per token, all layers. MLA stores c (R) + k_pe (P); MHA/GQA store K and V per KV head."""
    b = torch.tensor([], dtype=dtype).element_size()
    if attn == "mla":
        return cfg.num_hidden_layers * b * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    kv_heads = kv_heads or (4 if attn == "gqa" else cfg.num_attention_heads)
    return cfg.num_hidden_layers * b * 2 * kv_heads * cfg.v_head_dim


# ----------------------------------------------------------------------------- tokenizer
# Byte-level: ranks are the 256 single bytes (id = byte value), so nothing is downloaded and any
# string round-trips. The GPT-2 split pattern only matters to tokenizers that merge; we keep it so
# that the exported Hugging Face tokenizer is the same function.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>",
                  "<|reserved_0|>", "<|reserved_1|>", "<|reserved_2|>", "<|reserved_3|>"]
EOT, IM_START, IM_END, PAD = 256, 257, 258, 259
STOP_IDS = (IM_END, EOT)   # generation ends at either


def get_tokenizer():
    import tiktoken
    return tiktoken.Encoding(name="infinitecontext-bytes", pat_str=GPT2_PATTERN,
                             mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)})


def chat_prompt(messages, add_generation_prompt=True):
    """ChatML, the same text as the exported chat_template: <|im_start|>role\\ncontent<|im_end|>\\n ..."""
    s = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return s + ("<|im_start|>assistant\n" if add_generation_prompt else "")


# ----------------------------------------------------------------------------- RMSNorm and RoPE
class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # weight * x * rsqrt(mean(x^2) + eps), computed in fp32 and rounded once to x's dtype: one kernel
        # on CUDA, as vLLM's. Written out (transformers rounds before the weight) it was 9 kernels and a
        # quarter of a 1b prefill forward (results/serve_probe); in fp32 and fp64 the two are the same.
        if fast_inference(x):   # serving: a Triton kernel that reads a split's strided rows without a copy
            from mla_kernel import rms_norm
            return rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)


def rope_frequencies(cfg, dim, dtype=torch.float32):
    """Inverse frequencies (dim/2,) and the softmax-scale multiplier m^2.

    YaRN as transformers computes it for deepseek_v3 (and vLLM matches): frequency i blends
    interpolation (inv/factor) and extrapolation (inv) by a linear ramp between the correction
    dims of beta_fast and beta_slow; attention logits are scaled by m^2, m = 0.1*mscale_all_dim*ln(factor)+1.
    """
    base = cfg.rope_theta
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=dtype) / dim)
    ys = cfg.rope_scaling
    if not ys:
        return inv, 1.0
    factor, L0 = ys["factor"], ys["original_max_position_embeddings"]

    def correction_dim(rotations):  # the dim whose wavelength makes `rotations` turns over L0 tokens
        return dim * math.log(L0 / (2 * math.pi * rotations)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(ys.get("beta_fast", 32.0))), 0)
    high = min(math.ceil(correction_dim(ys.get("beta_slow", 1.0))), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=dtype) - low) / max(high - low, 0.001)).clamp(0, 1)
    inv = inv / factor * ramp + inv * (1 - ramp)
    m = 0.1 * ys.get("mscale_all_dim", 1.0) * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv, m * m


def rope_cos_sin(inv_freq, pos):
    """pos (B, T) -> cos, sin (B, T, dim/2). Angles in the frequencies' precision (fp32, as HF and vLLM)."""
    angles = pos.to(inv_freq.dtype)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def fast_inference(x):
    """Serving on a GPU: no gradient, a 16-bit CUDA tensor, outside torch.compile (which fuses by itself).
    The elementwise tails then run as mla_kernel's Triton kernels (one each instead of up to 9)."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


def apply_rope(x, cos, sin, out=None):
    """DeepSeek's interleaved RoPE: pairs (x[2i], x[2i+1]) are complex numbers rotated by angle i.
    x (B, T, H, D), cos/sin (B, T, D/2). Not Llama's rotate_half. out: where to write (x itself: in place)."""
    if fast_inference(x):
        from mla_kernel import rope
        return rope(x, cos, sin, out=out)
    xf = x.float() if x.dtype != torch.float64 else x
    re, im = xf[..., 0::2], xf[..., 1::2]
    c, s = cos[:, :, None].to(xf.dtype), sin[:, :, None].to(xf.dtype)
    y = torch.stack((re * c - im * s, re * s + im * c), dim=-1).flatten(-2).to(x.dtype)
    return y if out is None else out.copy_(y)


# ----------------------------------------------------------------------------- paged cache
@dataclass
class Cache:
    """Paged cache for all layers (vLLM's paging, gpt-fast's static buffers).
    kv (layers, num_blocks, page, width): MLA rows are [c (R) | roped k_pe (P)], MHA rows [K | V].
    Row b's token i lives in block block_table[b, i // page], slot i % page. forward() appends
    the new tokens at seq_lens and advances seq_lens before its layers run."""
    kv: torch.Tensor           # (L, num_blocks, page, width)
    block_table: torch.Tensor  # (B, max_pages) int32
    seq_lens: torch.Tensor     # (B,) int32
    slots: torch.Tensor = None  # (B, T) where forward's T new tokens go (cache_slots): set once per forward
    start: int = None           # a prefill chunk's cached length (all rows) on the host; forward clears it


def cache_width(cfg):
    if cfg.attn == "mla":
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return 2 * (cfg.num_key_value_heads or cfg.num_attention_heads) * cfg.v_head_dim


def new_cache(cfg, batch, max_len, page=64, dtype=torch.float32, device="cpu"):
    """A cache for `batch` rows of up to max_len tokens, each row owning its own blocks."""
    pages = -(-max_len // page)
    kv = torch.zeros(cfg.num_hidden_layers, batch * pages, page, cache_width(cfg), dtype=dtype, device=device)
    table = torch.arange(batch * pages, dtype=torch.int32, device=device).view(batch, pages)
    return Cache(kv, table, torch.zeros(batch, dtype=torch.int32, device=device))


def cache_slots(block_table, seq_lens, T, page):
    """Rows of a layer's kv.view(-1, width) for positions seq_lens[b] .. seq_lens[b]+T-1 of each row: (B, T).
    The same for every layer, so forward computes them once (a decode step's CUDA graph has fewer kernels)."""
    p = seq_lens[:, None].long() + torch.arange(T, device=seq_lens.device)           # (B, T) positions
    return block_table.long().gather(1, p // page) * page + p % page


@torch.compiler.disable   # in place into the (huge) pool: torch.compile (serve.py's decode) must not functionalise it
def cache_write(kv, slots, rows):
    """Write rows (B, T, W) into one layer's kv (N, page, W) at slots (B, T) from cache_slots."""
    if kv.is_cuda:   # one Triton kernel: PyTorch's index_put is ~2x slower at a decode step's 64 rows
        from mla_kernel import write_rows
        return write_rows(kv, slots, rows)
    kv.view(-1, kv.shape[-1])[slots] = rows.to(kv.dtype)


def cache_read(kv, block_table, n):
    """The first n tokens of every row: (B, n, W)."""
    pages = -(-n // kv.shape[1])
    return kv[block_table[:, :pages].long()].flatten(1, 2)[:, :n]


@torch.compiler.disable   # writes into the pool in place, as cache_write
def cache_append(kv, slots, ckv, norm, cos, sin):
    """MLA's new cache rows: ckv (B, T, R+P) = [c | k_pe] from W_DKV and W_KR -> [RMSNorm(c) | RoPE(k_pe)] written
    into one layer's kv at slots (B, T). One Triton kernel on CUDA, where torch.compile made three."""
    if kv.is_cuda and kv.dtype in (torch.bfloat16, torch.float16):
        from mla_kernel import append_latent
        return append_latent(kv, slots, ckv, norm.weight, norm.eps, cos, sin)
    c, k_pe = ckv.split([norm.weight.shape[0], ckv.shape[-1] - norm.weight.shape[0]], dim=-1)
    cache_write(kv, slots, torch.cat([norm(c), apply_rope(k_pe[:, :, None], cos, sin)[:, :, 0]], dim=-1))


@torch.compiler.disable   # the kernel's launch grid is host arithmetic on shapes: left out of torch.compile
def latent_attention(q_lat, q_pe, kv, block_table, seq_lens, scale):
    """Absorbed MLA decode against one layer's latent cache -> o_lat (B, H, R).
    scores = (q_lat . c + q_pe . k_pe) * scale over each row's first seq_lens tokens; o = softmax . c.
    On CUDA: the fused Triton kernel. Elsewhere: this PyTorch path (same math as mla_kernel.mla_decode_ref)."""
    if kv.is_cuda and kv.dtype in (torch.bfloat16, torch.float16):  # the kernel reads 16-bit caches
        from mla_kernel import mla_decode
        return mla_decode(q_lat, q_pe, kv, block_table, seq_lens, scale)
    R = q_lat.shape[-1]
    lat = cache_read(kv, block_table, int(seq_lens.max()))                      # (B, S, R+P)
    valid = torch.arange(lat.shape[1], device=lat.device) < seq_lens[:, None]   # (B, S)
    lat = lat.masked_fill(~valid[..., None], 0)          # slots past a row's end hold garbage (even NaN)
    c, k_pe = lat[..., :R], lat[..., R:]
    scores = (torch.einsum("bhr,bsr->bhs", q_lat, c) + torch.einsum("bhp,bsp->bhs", q_pe, k_pe)) * scale
    p = scores.masked_fill(~valid[:, None], float("-inf")).softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    return torch.einsum("bhs,bsr->bhr", p.to(c.dtype), c)


def causal_attention(q, k, v, scale, chunk=8192):
    """Naive-path attention. q (B, T, H, D), k (B, S, Hk, D), v (B, S, Hk, Dv), S >= T: query t sits at
    position S-T+t (the last T keys are its own chunk). Queries go in chunks so that a long prompt never
    holds a T x S score matrix. On CUDA, v is padded to D when narrower: the flash backend needs equal
    widths (transformers does the same for FA2). Not when serving on Hopper (fast_inference): its cuDNN
    backend takes Dv < D (1b, 16 x 512: 0.085 vs 0.165 ms a layer padded, results/serve_probe/c64_h100_7a7dc8c.json)."""
    B, T, H, D = q.shape
    S, Dv = k.shape[1], v.shape[-1]
    if q.is_cuda and Dv < D and not (fast_inference(q) and torch.cuda.get_device_capability(q.device)[0] >= 9):
        v = F.pad(v, (0, D - Dv))
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)      # (B, H, T, D)
    out = []
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        n = S - T + e                                                        # keys visible to this chunk
        mask = None
        if e - s != n:  # a chunk after cached/earlier keys: causal aligned to the bottom right, never materialised
            from torch.nn.attention.bias import causal_lower_right  # lazy: it imports torch._dynamo (seconds)
            mask = causal_lower_right(e - s, n)
        out.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, :n], v[:, :, :n], attn_mask=mask,
                                                  is_causal=mask is None, scale=scale,
                                                  enable_gqa=k.shape[1] != H))
    out = out[0] if len(out) == 1 else torch.cat(out, dim=2)   # (a cat of one tensor still copies it)
    return out.transpose(1, 2)[..., :Dv]                                     # (B, T, H, Dv)


# ----------------------------------------------------------------------------- attention
class MLA(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        H, R, qk = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=1e-6)   # transformers hard-codes 1e-6 here
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, R + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(R, eps=1e-6)
        self.kv_b_proj = nn.Linear(R, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, cfg.hidden_size, bias=False)
        self.register_buffer("qkv_a", None, persistent=False)   # fuse_projections: [q_a (or q); kv_a] weights
        self.register_buffer("kv_b_rows", None, persistent=False)   # fuse_projections: cache row -> [k | v] per head

    def forward(self, x, cos, sin, scale, cache=None, layer=0):
        cfg, (B, T, _) = self.cfg, x.shape
        H, R, nope, P, dv = (cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim,
                             cfg.qk_rope_head_dim, cfg.v_head_dim)
        if self.qkv_a is not None:   # one GEMM for the two projections of x
            q, ckv = F.linear(x, self.qkv_a).split([self.qkv_a.shape[0] - R - P, R + P], dim=-1)
        else:
            q, ckv = (self.q_proj if cfg.q_lora_rank is None else self.q_a_proj)(x), self.kv_a_proj_with_mqa(x)
        if cfg.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))                         # (B, T, H * (nope + P))
        q = q.view(B, T, H, nope + P)
        q_nope, q_pe = q[..., :nope], q[..., nope:]      # slices, not split()'s views: q_pe may be roped in place
        decode = cache is not None and T == 1
        # roped in place, except in decode: the naive path attends with q whole; decode's roped copy is one
        # kernel with W_UK's input under torch.compile (the copy back into q was a kernel of its own)
        q_pe = apply_rope(q_pe, cos, sin, out=None if decode else q_pe)
        if cache is None:   # (with a cache, cache_append below does these two as it writes the rows)
            c, k_pe = ckv.split([R, P], dim=-1)                              # (B, T, R), (B, T, P)
            c = self.kv_a_layernorm(c)                                       # RMSNorm on the latent only
            k_pe = apply_rope(k_pe[:, :, None], cos, sin)[:, :, 0]            # one rope key for all heads
        w = self.kv_b_proj.weight.view(H, nope + dv, R)                       # per head [W_UK; W_UV]
        if decode:  # absorbed decode: never decompress the cache
            q_lat = torch.einsum("bhd,hdr->bhr", q_nope[:, 0], w[:, :nope])                # W_UK^T q^C
            # the new cache row [RMSNorm(c) | RoPE(k_pe)]; after W_UK, so that torch.compile's region before the
            # break holds the rope of q and W_UK together
            cache_append(cache.kv[layer], cache.slots, ckv, self.kv_a_layernorm, cos, sin)
            o_lat = latent_attention(q_lat, q_pe[:, 0], cache.kv[layer], cache.block_table, cache.seq_lens, scale)
            # W_UV from the module and config again, not `w` and H: torch.compile resumes after the attention in a
            # new graph, where tensors and ints carried over get symbolic shapes, and (B, H * dv) then took two
            # layout copies, not one
            w = self.kv_b_proj.weight.view(self.cfg.num_attention_heads, -1, self.cfg.kv_lora_rank)
            o = torch.einsum("bhr,hvr->bhv", o_lat, w[:, self.cfg.qk_nope_head_dim:])     # W_UV o_lat
            return self.o_proj(o.flatten(1)[:, None])
        if cache is not None:  # prefill chunk: attend to everything cached so far (rows share one length here)
            cache_append(cache.kv[layer], cache.slots, ckv, self.kv_a_layernorm, cos, sin)
            lat = cache_read(cache.kv[layer], cache.block_table, cache.start + T)             # (B, S, R + P)
            if self.kv_b_rows is not None:   # fuse_projections: k = [k_nope | k_pe] and v from one GEMM, no cat
                k, v = F.linear(lat, self.kv_b_rows).view(B, -1, H, nope + P + dv).split([nope + P, dv], dim=-1)
                return self.o_proj(causal_attention(q, k, v, scale).reshape(B, T, H * dv))
            c, k_pe = lat.split([R, P], dim=-1)
        # naive path: decompress the latent into per-head keys and values
        k_nope, v = torch.einsum("bsr,hdr->bshd", c, w).split([nope, dv], dim=-1)    # (B, S, H, nope|dv)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, H, -1)], dim=-1)      # (B, S, H, nope+P)
        y = causal_attention(q, k, v, scale)
        return self.o_proj(y.reshape(B, T, H * dv))


class MHA(nn.Module):
    """The baseline: Llama-style attention of the same width (head_dim = v_head_dim), RoPE on the whole
    head, K and V cached per KV head. num_key_value_heads < heads makes it GQA."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        H, Hk, D = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads, cfg.v_head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, H * D, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, Hk * D, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, Hk * D, bias=False)
        self.o_proj = nn.Linear(H * D, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, scale, cache=None, layer=0):
        cfg, (B, T, _) = self.cfg, x.shape
        H, Hk, D = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads, cfg.v_head_dim
        q = apply_rope(self.q_proj(x).view(B, T, H, D), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, Hk, D), cos, sin)
        v = self.v_proj(x).view(B, T, Hk, D)
        if cache is not None:
            kv = cache.kv[layer]
            cache_write(kv, cache.slots, torch.cat([k, v], dim=2).flatten(2))
            if T == 1:  # rows may have different lengths: mask per row
                kvs = cache_read(kv, cache.block_table, int(cache.seq_lens.max()))
                valid = torch.arange(kvs.shape[1], device=x.device) < cache.seq_lens[:, None]
                k, v = kvs.masked_fill(~valid[..., None], 0).view(B, -1, 2 * Hk, D).split([Hk, Hk], dim=2)
                y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   attn_mask=valid[:, None, None], scale=scale,
                                                   enable_gqa=Hk != H).transpose(1, 2)
                return self.o_proj(y.reshape(B, T, H * D))
            kvs = cache_read(kv, cache.block_table, cache.start + T)
            k, v = kvs.view(B, -1, 2 * Hk, D).split([Hk, Hk], dim=2)
        return self.o_proj(causal_attention(q, k, v, scale).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.register_buffer("gate_up", None, persistent=False)   # fuse_projections: [gate; up] weights

    def forward(self, x):
        if self.gate_up is not None:
            gu = F.linear(x, self.gate_up)
            if fast_inference(gu):
                from mla_kernel import swiglu
                return self.down_proj(swiglu(gu))
            g, u = gu.chunk(2, dim=-1)
        else:
            g, u = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(g) * u)                                  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg) if cfg.attn == "mla" else MHA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, scale, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, scale, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def fuse_projections(model):
    """Inference: one weight for each pair of projections that read the same input ([q_a or q; kv_a] and
    [gate; up]); the originals become views of it (no extra memory). Decode reads one row per sequence,
    so each GEMM is latency-bound: ~6 us on an H100 however small, and two in one save ~10 us a layer
    (results/serve_probe/ops_h100.json). And for prefill, per head [[W_UK, 0], [0, I], [W_UV, 0]]: a cache
    row [c | k_pe] times it is [k_nope | k_pe | v], where concatenating k_pe to every head's k_nope cost 7% of a
    1b prefill forward (results/serve_probe/c64_step_prefill_h100_09b37ff.json)."""
    def fuse(a, b):
        w = torch.cat([a.weight.data, b.weight.data])
        a.weight.data, b.weight.data = w[:a.out_features], w[a.out_features:]
        return w
    for block in model.layers:
        att = block.self_attn
        if isinstance(att, MLA):
            att.qkv_a = fuse(att.q_proj if att.cfg.q_lora_rank is None else att.q_a_proj, att.kv_a_proj_with_mqa)
            c = att.cfg
            H, R, nope, P = c.num_attention_heads, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim
            w = att.kv_b_proj.weight.data.view(H, nope + c.v_head_dim, R)
            rows = w.new_zeros(H, nope + P + c.v_head_dim, R + P)
            rows[:, :nope, :R], rows[:, nope + P:, :R] = w[:, :nope], w[:, nope:]
            rows[:, nope:nope + P, R:] = torch.eye(P)
            att.kv_b_rows = rows.view(-1, R + P)
        block.mlp.gate_up = fuse(block.mlp.gate_proj, block.mlp.up_proj)
    return model


# ----------------------------------------------------------------------------- the transformer
class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)   # untied, as DeepSeek-V3
        rope_dim = cfg.qk_rope_head_dim if cfg.attn == "mla" else cfg.v_head_dim
        inv_freq, mscale2 = rope_frequencies(cfg, rope_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim if cfg.attn == "mla" else cfg.v_head_dim
        self.softmax_scale = head_dim ** -0.5 * mscale2                       # x m^2 under YaRN, every position
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=cfg.initializer_range / math.sqrt(2 * cfg.num_hidden_layers))

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.initializer_range)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - (self.embed_tokens.weight.numel() + self.lm_head.weight.numel() if non_embedding else 0)

    def flops_per_token(self, seq_len):
        """torchtitan's count: 6N + 6*L*H*(qk_dim + v_dim)*T (N without embeddings, attention non-causal)."""
        c = self.config
        qk = c.qk_nope_head_dim + c.qk_rope_head_dim if c.attn == "mla" else c.v_head_dim
        return 6 * self.num_params() + 6 * c.num_hidden_layers * c.num_attention_heads * (qk + c.v_head_dim) * seq_len

    def _apply(self, fn, recurse=True):
        # .to(torch.bfloat16) would round the RoPE frequencies with the weights; angles at 1M positions
        # need fp32 (as HF and vLLM keep them), so the buffer follows the device but never the dtype
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def forward(self, idx, targets=None, pos=None, cache=None, layers=None):
        """idx (B, T) token ids; pos (B, T) explicit positions (PoSE may skip ahead; default 0..T-1, or
        continuing from cache.seq_lens); targets (B, T) with -1 where no loss is taken. With a cache the
        tokens are appended to it (decode when T == 1, a prefill chunk otherwise). layers: the blocks to
        run instead of self.layers (serve.py's torch.compile'd copies for decode)."""
        B, T = idx.shape
        if cache is not None and T > 1 and cache.start is None:   # one device sync here, not one per layer
            if bool((cache.seq_lens != cache.seq_lens[0]).any()):
                raise ValueError("a prefill chunk needs rows of one cached length; decode (T == 1) may be ragged")
            cache.start = int(cache.seq_lens[0])
        if pos is None:
            start = cache.seq_lens[:, None].long() if cache is not None else 0
            pos = start + torch.arange(T, device=idx.device)[None].expand(B, T)
        if cache is not None:   # the layers see the lengths with this forward's tokens in (one add, not one a layer)
            cache.slots = cache_slots(cache.block_table, cache.seq_lens, T, cache.kv.shape[2])
            cache.seq_lens += T
        inv_freq = self.inv_freq.double() if self.lm_head.weight.dtype == torch.float64 else self.inv_freq
        cos, sin = rope_cos_sin(inv_freq, pos)
        x = self.embed_tokens(idx)
        for i, block in enumerate(layers or self.layers):
            x = block(x, cos, sin, self.softmax_scale, cache, i)
        logits = self.lm_head(self.norm(x))                                   # (B, T, V)
        if cache is not None:
            cache.start = None
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=None, top_p=None, stop_ids=STOP_IDS,
                 prefill_chunk=4096, page=64, generator=None):
        """idx (B, T) prompts of one length. Prefill in chunks into a paged latent cache of its own, then
        decode one token at a time (absorbed MLA). Returns each row's new tokens (list of lists), stopping
        at any of stop_ids (not included). temperature 0 = greedy."""
        B, T = idx.shape
        p = next(self.parameters())
        cache = new_cache(self.config, B, T + max_new_tokens, page, p.dtype, p.device)
        for s in range(0, T, prefill_chunk):
            logits = self(idx[:, s:s + prefill_chunk], cache=cache)
        out, done = [[] for _ in range(B)], [False] * B
        for _ in range(max_new_tokens):
            tok = sample(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
            for b, t in enumerate(tok.tolist()):
                if not done[b]:
                    done[b] = t in stop_ids
                    out[b] += [] if done[b] else [t]
            if all(done):
                break
            logits = self(tok[:, None], cache=cache)
        return out


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> token ids (B,). Greedy at temperature 0; else temperature, then top-k, then
    top-p (nucleus: the smallest set of tokens whose probability reaches top_p)."""
    if not temperature:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p                        # mass before this token already >= p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


# ----------------------------------------------------------------------------- checkpoints
CKPT_FORMAT = "infinitecontext-ckpt-v1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file and what is wrong (one line)."""


def save_checkpoint(path, model, state_dict=None, **extra):
    """Atomic: serialise to memory, write a temp file beside `path`, fsync, rename. Holds only tensors,
    dicts, lists and numbers, so torch.load(weights_only=True) reads it. `state_dict` overrides
    model.state_dict() (train.py passes the full state gathered from FSDP shards)."""
    obj = {"format": CKPT_FORMAT, "config": asdict(model.config),
           "model": state_dict if state_dict is not None else model.state_dict(), **extra}
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        if os.environ.get("IC_SAVE_PAUSE"):   # test hook: a kill here must leave the old checkpoint intact
            time.sleep(float(os.environ["IC_SAVE_PAUSE"]))
        f.write(data[len(data) // 2:])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checkpoint(path, map_location="cpu"):
    """The checkpoint dict (config, model, and whatever train.py stored), or CheckpointError."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path}: is a directory without ckpt.pt or config.json")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle of foreign classes, not a torch file at all
        kind = type(e).__name__
        raise CheckpointError(f"checkpoint {path}: not a readable torch checkpoint "
                              f"(truncated or foreign file: {kind}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(obj, dict) or obj.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"checkpoint {path}: not an InfiniteContext checkpoint (no '{CKPT_FORMAT}' marker)")
    return obj


def load_checkpoint(path, device="cpu"):
    """A Transformer from a ckpt.pt, a folder holding one, or a Hugging Face folder written by export_hf."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        return load_hf(path).to(device)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "ckpt.pt")):
        path = os.path.join(path, "ckpt.pt")
    obj = read_checkpoint(path)
    try:
        model = Transformer(config_from_dict(obj["config"]))
        model.load_state_dict(obj["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path}: weights do not match its config "
                              f"({str(e).splitlines()[0][:160]})") from None
    return model.to(device)


# ----------------------------------------------------------------------------- Hugging Face export/import
# Our parameter names are transformers' DeepseekV3 names below `model.` (lm_head at top level), as in
# DeepSeek's convert.py: the name table is a prefix, and no weight is permuted (rope_interleave: true
# tells transformers and vLLM that q_pe/k_pe rotate interleaved pairs, as ours do).
HF_WEIGHTS, HF_INDEX = "model.safetensors", "model.safetensors.index.json"


def hf_name(name):
    return name if name.startswith("lm_head.") else "model." + name


def hf_config(cfg, dtype=torch.bfloat16):
    """config.json for transformers (4.x and 5.x) and vLLM's DeepseekV3ForCausalLM."""
    rs, max_pos = None, cfg.max_position_embeddings
    if cfg.rope_scaling:
        ys, m = cfg.rope_scaling, float(cfg.rope_scaling.get("mscale_all_dim", 1.0))
        # legacy key (transformers 4.x ignores `rope_parameters`); mscale == mscale_all_dim keeps cos/sin
        # unscaled and puts m^2 on the softmax scale, as our model does
        rs = {"type": "yarn", "rope_type": "yarn", "factor": float(ys["factor"]),
              "original_max_position_embeddings": int(ys["original_max_position_embeddings"]),
              "beta_fast": float(ys.get("beta_fast", 32.0)), "beta_slow": float(ys.get("beta_slow", 1.0)),
              "mscale": m, "mscale_all_dim": m}
        max_pos = int(rs["factor"] * rs["original_max_position_embeddings"])  # what both loaders expect
    H, L = cfg.num_attention_heads, cfg.num_hidden_layers
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": L, "num_attention_heads": H,
        "num_key_value_heads": H,                      # the default (128) breaks models with fewer heads
        "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
        # vLLM also applies rms_norm_eps to q_a/kv_a_layernorm, where transformers and we use 1e-6: keep it 1e-6
        "rms_norm_eps": float(cfg.rms_norm_eps), "initializer_range": cfg.initializer_range,
        "max_position_embeddings": max_pos, "rope_theta": float(cfg.rope_theta), "rope_scaling": rs,
        "rope_interleave": True,
        # dense: no layer reaches first_k_dense_replace, so the MoE fields (DeepSeek-V3's values) are inert,
        # but they stay integers because vLLM does arithmetic on n_routed_experts even without MoE layers
        "first_k_dense_replace": L, "moe_layer_freq": 1, "n_routed_experts": 256, "n_shared_experts": 1,
        "moe_intermediate_size": 2048, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "num_nextn_predict_layers": 0,
        "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True,
        "bos_token_id": EOT, "eos_token_id": IM_END, "pad_token_id": PAD,   # defaults 0/1 are raw bytes here
    }


def byte_to_unicode():
    """GPT-2's printable alias for every byte: printable Latin-1 bytes stand for themselves, the other 68
    are moved, in byte order, to code points 256, 257, ... (what the ByteLevel pre-tokenizer emits)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def hf_tokenizer_files(model_max_length):
    """(tokenizer.json, tokenizer_config.json) as dicts: the same function as get_tokenizer(). A BPE
    without merges over the 256 byte aliases gives id = byte value; the Split pre-tokenizer reproduces
    tiktoken's GPT-2 chunks (irrelevant without merges, kept so the two stay the same function)."""
    added = [{"id": 256 + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in enumerate(SPECIAL_TOKENS)]
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
           "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
               {"type": "Split", "pattern": {"Regex": GPT2_PATTERN}, "behavior": "Isolated", "invert": False},
               {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
           "post_processor": None,
           "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                     "vocab": {c: b for b, c in byte_to_unicode().items()}, "merges": []}}
    # ChatML, exactly chat_prompt(messages, add_generation_prompt)
    template = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
                " + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                "{% endif %}")
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
               "bos_token": SPECIAL_TOKENS[EOT - 256], "eos_token": SPECIAL_TOKENS[IM_END - 256],
               "pad_token": SPECIAL_TOKENS[PAD - 256], "model_max_length": model_max_length,
               "chat_template": template}
    return tok, tok_cfg


def export_hf(model, out_dir, max_shard_bytes=15 * 2**20, dtype=torch.bfloat16):
    """Write a Hugging Face DeepseekV3 folder: config.json, generation_config.json, safetensors weights
    (one model.safetensors, or shards of <= max_shard_bytes plus model.safetensors.index.json; a tensor
    larger than the limit gets a shard of its own), tokenizer.json and tokenizer_config.json."""
    from safetensors.torch import save_file
    cfg = model.config
    if cfg.attn != "mla":
        raise ValueError(f"export_hf: attn={cfg.attn!r} cannot be exported: DeepseekV3 has no MHA/GQA layout")
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):   # stale weights from an earlier export would shadow or mix with ours
        if f.startswith("model") and f.endswith((".safetensors", ".safetensors.index.json")):
            os.remove(os.path.join(out_dir, f))
    shards, size = [{}], 0
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu", dtype).contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][hf_name(name)], size = t, size + nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, HF_WEIGHTS), metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
            total += sum(t.numel() * t.element_size() for t in shard.values())
        _write_json(os.path.join(out_dir, HF_INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
    config = hf_config(cfg, dtype)
    _write_json(os.path.join(out_dir, "config.json"), config)
    _write_json(os.path.join(out_dir, "generation_config.json"),
                {"bos_token_id": EOT, "eos_token_id": list(STOP_IDS), "pad_token_id": PAD})
    tok, tok_cfg = hf_tokenizer_files(config["max_position_embeddings"])
    _write_json(os.path.join(out_dir, "tokenizer.json"), tok)
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), tok_cfg)


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def load_hf(in_dir, dtype=torch.float32):
    """The inverse of export_hf: a Transformer from a Hugging Face DeepseekV3 folder (dense MLA layers only).
    Weights load into `dtype` (float32 by default: bf16 -> fp32 is exact). Errors are CheckpointError."""
    from safetensors.torch import load_file

    def fail(why):
        raise CheckpointError(" ".join(f"checkpoint {in_dir}: {why}".split())[:400])   # one line

    try:
        with open(os.path.join(in_dir, "config.json"), encoding="utf-8") as f:
            d = json.load(f)
    except OSError:
        fail("no config.json (not a Hugging Face folder)")
    except ValueError as e:
        fail(f"config.json is not valid JSON ({e})")
    kind = d.get("model_type") if isinstance(d, dict) else type(d).__name__
    if kind != "deepseek_v3":
        fail(f"config.json model_type is {kind!r}, not 'deepseek_v3'")
    if (d.get("first_k_dense_replace") or 0) < (d.get("num_hidden_layers") or 0) or d.get("num_nextn_predict_layers"):
        fail("MoE or multi-token-prediction layers are not supported (first_k_dense_replace must equal "
             "num_hidden_layers, num_nextn_predict_layers 0)")
    if not d.get("rope_interleave", True):
        fail("rope_interleave false is not supported (our RoPE rotates interleaved pairs)")
    rp = d.get("rope_parameters") or {}   # a config re-saved by transformers 5.x keeps rope settings here
    rs = d.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
    if rs is not None:
        rs = {k: v for k, v in rs.items() if k != "rope_theta"}
        if rs.get("rope_type", rs.get("type")) != "yarn" or rs.get("mscale", 1.0) != rs.get("mscale_all_dim", 1.0):
            fail(f"rope_scaling {rs} is not YaRN with mscale == mscale_all_dim")
    try:
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                "max_position_embeddings")
        cfg = ModelConfig(**{k: d[k] for k in keys}, rope_scaling=rs,
                          rope_theta=d.get("rope_theta", rp.get("rope_theta", 10000.0)),
                          rms_norm_eps=d.get("rms_norm_eps", 1e-6), initializer_range=d.get("initializer_range", 0.02))
    except (KeyError, TypeError, ValueError) as e:
        fail(f"config.json is not a DeepseekV3 MLA config ({type(e).__name__}: {e})")
    if os.path.exists(os.path.join(in_dir, HF_INDEX)):
        try:
            with open(os.path.join(in_dir, HF_INDEX), encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            fail(f"{HF_INDEX} is unreadable ({type(e).__name__}: {e})")
    elif os.path.exists(os.path.join(in_dir, HF_WEIGHTS)):
        files = [HF_WEIGHTS]
    else:
        fail(f"no {HF_WEIGHTS} or {HF_INDEX}")
    sd = {}
    for fname in files:
        try:
            sd.update(load_file(os.path.join(in_dir, fname)))
        except Exception as e:   # missing shard, truncated file, not safetensors
            fail(f"{fname}: unreadable ({type(e).__name__}: {str(e)[:160]})")
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    model = Transformer(cfg)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        fail(f"weights do not match config.json ({str(e)[:300]})")
    return model.to(dtype)


# ----------------------------------------------------------------------------- command-line helpers the scripts share
# nanoGPT-style flags: each script's config is a dataclass at its top, and the comment beside a field is its --help.
class UsageError(ValueError):
    """A bad flag or value: the scripts print it as one line on stderr and exit 2."""


def die(prog, msg):
    print(f"{prog}: error: {msg}", file=sys.stderr)
    sys.exit(2)


def flag_docs(cls):
    """{field: the comment beside it in the source} of a config dataclass and its bases."""
    doc = {}
    for c in reversed(cls.__mro__[:-1]):
        for line in inspect.getsource(c).splitlines():
            name, _, rest = line.strip().partition(":")
            if name.isidentifier() and "#" in rest:
                doc[name] = rest.split("#", 1)[1].strip()
    return doc


def parse_value(key, val, typ):
    """val (str) as typ: bool (True/False, 1/0, yes/no), int, float, str, dict (JSON), or X | None ("None")."""
    args = getattr(typ, "__args__", None)
    if args and type(None) in args:                       # int | None, dict | None
        if val in ("None", "none", "null"):
            return None
        typ = next(a for a in args if a is not type(None))
    try:
        if typ is bool and val.lower() in ("true", "false", "1", "0", "yes", "no"):
            return val.lower() in ("true", "1", "yes")
        if typ is dict and isinstance(v := json.loads(val), dict):
            return v
        if typ not in (bool, dict):
            return typ(val)
    except ValueError:      # json.JSONDecodeError is one
        pass
    raise UsageError(f"--{key}={val!r} is not a valid {typ.__name__}")


def parse_flags(cls, argv, doc="", names=None, more="", prog=None):
    """cls() with --key=value overrides from argv, typed by the field annotations (a bool may be --key alone;
    --some-key is --some_key). names: the fields that are flags, in --help order (default: all). --help prints
    doc's first paragraph, every flag with its default and comment, then `more`, and exits 0. Bad input raises
    UsageError, or with prog given dies with one line."""
    cfg, types = cls(), {f.name: f.type for f in fields(cls)}
    names = names or list(types)
    try:
        for arg in argv:
            if arg in ("-h", "--help"):
                help_ = flag_docs(cls)
                print(doc.strip().split("\n\n")[0] + "\n\nFlags (--key=value; bools are True/False):")
                for n in names:
                    print(f"  {'--' + n + '=' + str(getattr(cfg, n)):<40} {help_.get(n, '')}".rstrip())
                print(more, end="")
                sys.exit(0)
            key, eq, val = arg.removeprefix("--").partition("=")
            key = key.replace("-", "_")
            if not arg.startswith("--") or not (eq or types.get(key) is bool):
                raise UsageError(f"expected --key=value, got {arg!r} (see --help)")
            if key not in names:
                raise UsageError(f"unknown config key --{key} (see --help)")
            setattr(cfg, key, parse_value(key, val, types[key]) if eq else True)
    except UsageError as e:
        if prog is None:
            raise
        die(prog, str(e))
    return cfg


def provenance(device="cpu", card=None, **extra):
    """What every results JSON carries: git commit (env GIT_COMMIT first: a copy of the tree on a GPU machine
    has no .git; "-dirty" when tracked files differ from it), UTC date, card ("CPU" off GPU), torch and triton
    versions, the exact command; then `extra`."""
    commit = os.environ.get("GIT_COMMIT")
    if not commit:
        def git(*args):
            return subprocess.run(["git", *args], cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                                  text=True, timeout=10).stdout.strip()
        try:
            commit = git("rev-parse", "HEAD")
            commit += "-dirty" if commit and git("status", "--porcelain", "--untracked-files=no") else ""
        except (OSError, subprocess.SubprocessError):
            commit = None
    from importlib.metadata import PackageNotFoundError, version
    device = torch.device(device)
    try:
        triton = version("triton")      # from the metadata: importing triton takes a while
    except PackageNotFoundError:
        triton = None
    return {"git_commit": commit or "unknown", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "card": card or (torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"),
            "torch": torch.__version__, "triton": triton, "command": "python " + shlex.join(sys.argv), **extra}
