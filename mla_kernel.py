"""Fused MLA decode on a paged latent cache, in Triton (flash-decoding), plus its PyTorch reference.

One decode step of DeepSeek-V3 multi-head latent attention in the absorbed form: each head's query
has already been multiplied into the latent space (q_lat = q_nope . W_UK), so every head attends
over the SAME cached rows [c | k_pe] and the output stays latent (o_lat, later multiplied by W_UV):

    scores[b,h,t] = (q_lat[b,h] . c[b,t] + q_pe[b,h] . k_pe[b,t]) * sm_scale     t < seq_lens[b]
    o_lat[b,h]    = softmax_t(scores[b,h]) . c[b,t]

The cache is paged (vLLM / FlashMLA layout): cache (num_blocks, page, R+P), and token t of row b
lives at cache[block_table[b, t // page], t % page]. A row with seq_lens[b] == 0 attends to
nothing; we define its output as zeros (the empty sum), never NaN.

Kernel plan (the same as FlashMLA and vLLM's triton MLA decode, written from scratch here):
  stage 1, grid (head groups, batch, KV splits): a program loads one group of up to 64 heads'
    queries once, then streams its split of latent rows through SRAM BLOCK_N rows at a time
    (block-table lookup per row), scores with tl.dot, online softmax in fp32 (base 2), and
    o += P . c with tl.dot. All heads of the group share each tile, so with H <= 64 the cache is
    read once per step; with 128 heads the two groups of a (row, split) are launched next to each
    other so the second read mostly hits L2. It writes a partial o and its log-sum-exp.
  stage 2, grid (heads, batch): merge the splits by log-sum-exp (skipped when there is one split).
The split count comes from batch x head groups against the SM count, so that B=1 at 128k still
fills the GPU, and from the cache capacity (the block table's width), not from seq_lens: no host
sync, so the call can be captured in a CUDA graph (call it once before capturing: JIT compile).

This file imports nothing from the rest of the repo.
"""
import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MIN_SPLIT_TOKENS = 128  # below this a split's fixed cost (queries, partial o, merge) outweighs its parallelism
SHORT_SPLIT_TOKENS = 64  # ...except in short caches (<= 64 such splits): one tile each beats fewer, longer splits
# PDL (programmatic dependent launch, Hopper): every kernel here may be scheduled while the one before it drains,
# and waits for it (gdc_wait) before reading its output; MLA_PDL=0 turns it off (results/gpu_log.md row 61)
PDL = (not INTERPRET and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
       and os.environ.get("MLA_PDL", "1") == "1")
# Large-batch splits take their page ids from registers (below): 20.1 instead of 26.9 us a layer at 64 rows on
# an H100, and bench.py serve at 64 clients 16,058 vs 15,805 tok/s (results/gpu_log.md rows 93-94). A first
# port that kept a separate tail tile spilled and took 29.9 (row 92). MLA_PRELOAD=0 turns it off.
PRELOAD = os.environ.get("MLA_PRELOAD", "1") == "1"


def _pdl(t):
    """Launch options for a kernel on t's device: PDL where the GPU has it."""
    return {"launch_pdl": True, "USE_PDL": True} if PDL and t.is_cuda else {}


# ----------------------------------------------------------------------------- stage 1: one KV split

@triton.jit
def _attend_tile(q_lat, q_pe, acc, m_i, l_i, Cache, bt_row, s_cb, n0, end, qk_scale, pages, pidx, first,
                 R: tl.constexpr, P: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, UPCAST: tl.constexpr, NP: tl.constexpr):
    """Fold cached tokens n0 .. n0+BLOCK_N-1 (only those < end when MASKED) into the online softmax.
    NP > 0: the split's block-table entries from page `first` on are in registers (pages, pidx)."""
    W: tl.constexpr = R + P
    offs_t = tl.arange(0, BLOCK_N)
    if BLOCK_N <= PAGE:
        # the tile lies inside one page: one block-table entry, and every row at a compile-time
        # offset from it (rows of a page are contiguous), so no per-row pointer registers
        if NP > 0:   # picked from registers: no load the tile's address waits on, so Triton pipelines 3 deep
            page = tl.sum(tl.where(pidx == n0 // PAGE - first, pages, 0))
        else:
            page = tl.load(bt_row + n0 // PAGE)
        row_ptr = Cache + page.to(tl.int64) * s_cb + (n0 % PAGE) * W + offs_t * W      # (BN,)
    else:
        # small pages: look up each row's page (int64: caches exceed 2^31 elements)
        offs_n = n0 + offs_t
        if MASKED:
            page = tl.load(bt_row + offs_n // PAGE, mask=offs_n < end, other=0)
        else:
            page = tl.load(bt_row + offs_n // PAGE)
        row_ptr = Cache + page.to(tl.int64) * s_cb + (offs_n % PAGE) * W               # (BN,)
    c_ptr = row_ptr[:, None] + tl.arange(0, R)[None, :]                                 # (BN, R)
    pe_ptr = row_ptr[:, None] + R + tl.arange(0, P)[None, :]                            # (BN, P)
    if MASKED:
        valid = n0 + offs_t < end
        c = tl.load(c_ptr, mask=valid[:, None], other=0.0)
        k_pe = tl.load(pe_ptr, mask=valid[:, None], other=0.0)
    else:
        c = tl.load(c_ptr)
        k_pe = tl.load(pe_ptr)
    if UPCAST:
        c = c.to(tl.float32)
        k_pe = k_pe.to(tl.float32)
    # on the GPU both dots take bf16/fp16 operands and accumulate in fp32 on the tensor cores
    qk = tl.dot(q_pe, tl.trans(k_pe), tl.dot(q_lat, tl.trans(c))) * qk_scale      # (BH, BN)
    if MASKED:
        qk = tl.where(valid[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))      # finite: every tile holds >= 1 valid token
    alpha = tl.exp2(m_i - m_new)                 # rescales what came before (0 on the first tile)
    p = tl.exp2(qk - m_new[:, None])             # (BH, BN)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(c.dtype), c, acc * alpha[:, None])                           # (BH, R)
    return acc, m_new, l_i


@triton.jit
def _mla_split_kernel(
    QL, QP, Cache, BlockTable, SeqLens, OPart, LsePart, Out,
    qk_scale,            # sm_scale * log2(e): softmax in base 2 (exp2 is one MUFU op)
    H, split_tokens,
    s_qlb, s_qlh, s_qpb, s_qph, s_cb, s_bt,
    s_ob, s_oh, s_os, s_lb, s_lh, s_outb, s_outh,
    R: tl.constexpr, P: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    DIRECT: tl.constexpr,   # one split: normalise and write o_lat directly, no merge pass
    UPCAST: tl.constexpr,   # CPU interpreter: compute in fp32 (its bf16 arithmetic is wrong)
    NP: tl.constexpr,       # > 0: load the split's (<= NP) block-table entries once, before the tile loop
    USE_PDL: tl.constexpr = False,   # launched early (PDL): wait for the kernel before first
    LATE: tl.constexpr = False,      # PDL: the next kernel launches only once every program is past its tiles
):
    g = tl.program_id(0)  # head group: fastest-varying, so groups sharing a tile run together (L2)
    b = tl.program_id(1)
    s = tl.program_id(2)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        if not LATE:
            tl.extra.cuda.gdc_launch_dependents()
    heads = g * BLOCK_H + tl.arange(0, BLOCK_H)                                 # (BH,)
    hmask = heads < H
    offs_r = tl.arange(0, R)
    offs_p = tl.arange(0, P)

    seq_len = tl.load(SeqLens + b)
    start = s * split_tokens                     # a multiple of 64, so tiles never straddle a page
    end = tl.minimum(seq_len, start + split_tokens)
    n_full = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N  # whole tiles need no masks

    q_lat = tl.load(QL + b * s_qlb + heads[:, None] * s_qlh + offs_r[None, :],
                    mask=hmask[:, None], other=0.0)                               # (BH, R)
    q_pe = tl.load(QP + b * s_qpb + heads[:, None] * s_qph + offs_p[None, :],
                   mask=hmask[:, None], other=0.0)                                # (BH, P)
    if UPCAST:
        q_lat = q_lat.to(tl.float32)
        q_pe = q_pe.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max of scores (base-2 units)
    l_i = tl.zeros([BLOCK_H], tl.float32)                # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_H, R], tl.float32)             # running sum of p . c
    bt_row = BlockTable + b * s_bt
    first = start // PAGE
    pages, pidx = 0, 0
    if NP > 0:
        pidx = tl.arange(0, NP)
        pages = tl.load(bt_row + first + pidx, mask=first + pidx <= (end - 1) // PAGE, other=0)
        # one loop, every tile masked: a second (tail) copy of the tile code spilled 4 warps' registers
        for n0 in range(start, end, BLOCK_N):
            acc, m_i, l_i = _attend_tile(q_lat, q_pe, acc, m_i, l_i, Cache, bt_row, s_cb, n0, end, qk_scale, pages,
                                         pidx, first, R, P, PAGE, BLOCK_N, True, UPCAST, NP)
    else:
        for n0 in range(start, n_full, BLOCK_N):
            acc, m_i, l_i = _attend_tile(q_lat, q_pe, acc, m_i, l_i, Cache, bt_row, s_cb, n0, end, qk_scale, pages,
                                         pidx, first, R, P, PAGE, BLOCK_N, False, UPCAST, NP)
        if n_full < end:
            acc, m_i, l_i = _attend_tile(q_lat, q_pe, acc, m_i, l_i, Cache, bt_row, s_cb, n_full, end, qk_scale, pages,
                                         pidx, first, R, P, PAGE, BLOCK_N, True, UPCAST, NP)

    if USE_PDL and LATE:
        tl.extra.cuda.gdc_launch_dependents()
    # an empty split (or empty row) has l_i == 0: write o = 0 and lse = -inf, so it weighs nothing
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if DIRECT:
        tl.store(Out + b * s_outb + heads[:, None] * s_outh + offs_r[None, :],
                 o.to(Out.dtype.element_ty), mask=hmask[:, None])
    else:
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(OPart + b * s_ob + heads[:, None] * s_oh + s * s_os + offs_r[None, :], o,
                 mask=hmask[:, None])
        tl.store(LsePart + b * s_lb + heads * s_lh + s, lse, mask=hmask)


# ----------------------------------------------------------------------------- stage 2: merge splits

@triton.jit
def _mla_merge_kernel(
    OPart, LsePart, Out, num_splits,
    s_ob, s_oh, s_os, s_lb, s_lh, s_outb, s_outh,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    # grid (heads, batch, R / BLOCK_R): B=1 with hundreds of splits still spreads over many SMs
    h = tl.program_id(0)
    b = tl.program_id(1)
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_s = tl.arange(0, BLOCK_S)
    lse_ptr = LsePart + b * s_lb + h * s_lh
    o_ptr = OPart + b * s_ob + h * s_oh

    m_vec = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        m_vec = tl.maximum(m_vec, tl.load(lse_ptr + s0 + offs_s, mask=s0 + offs_s < num_splits,
                                          other=float("-inf")))
    m = tl.max(m_vec, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty (seq_len 0): all weights 0, o = 0

    acc = tl.zeros([BLOCK_R], tl.float32)
    den = tl.zeros([BLOCK_S], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        smask = s0 + offs_s < num_splits
        w = tl.exp2(tl.load(lse_ptr + s0 + offs_s, mask=smask, other=float("-inf")) - m)  # (BS,)
        o = tl.load(o_ptr + (s0 + offs_s)[:, None] * s_os + offs_r[None, :], mask=smask[:, None],
                    other=0.0)                                                             # (BS, BR)
        acc += tl.sum(w[:, None] * o, 0)
        den += w
    d = tl.sum(den, 0)
    out = acc / tl.where(d > 0, d, 1.0)
    tl.store(Out + b * s_outb + h * s_outh + offs_r, out.to(Out.dtype.element_ty))


# ----------------------------------------------------------------------------- launch configuration

# Tile configs, from sweeps on an H100 (results/kernel_notes.md), instead of triton.autotune: tuning
# on the first call's shape picked configs up to 25% slower on long contexts, the autotuner of the
# GPU image's Triton benchmarks even a single config (not allowed inside CUDA-graph capture), and a
# fixed table gives the same kernel on every run. mla_decode(config=...) overrides it for sweeps.
PROGRAMS_PER_SM = {16: 2, 32: 2, 64: 1}  # split target per head-group size: ~2 waves / 1 wave


def launch_config(block_h, split_tokens, interpret=INTERPRET):
    """(BLOCK_N, num_warps, num_stages) for stage 1.
    Groups of <= 32 heads stream memory on mma.sync tiles in 4 warps: 64-row tiles when a program
    owns >= 1024 tokens, 32-row tiles (shorter pipeline fill) below (B=1 at long contexts); splits of
    one 64-token tile (short caches) are pure latency: 8 warps finish them soonest.
    64-head groups are tensor-core bound (wgmma): 8 warps, so the (64, 512) fp32 accumulator costs
    128 registers a thread (4 warps spill), 64-row tiles, 2 stages (~220 KB of shared memory)."""
    if interpret:  # warps and stages mean nothing to the interpreter
        return 32, 4, 1
    if block_h <= 32:
        if split_tokens <= 64:   # one tile a split (short caches): 15-30% faster than (32, 4, 2) there, but
            return 64, 8, 2      # 13% slower at 128 (B=1, 32k): results/serve_probe/attn_h100.json, gpu_log.md
        return (64 if split_tokens >= 1024 else 32), 4, 2
    return 64, 8, 2


def head_group(H):
    """Heads per program: all of them up to 64 (tl.dot needs M >= 16); 128 heads make 2 groups."""
    return min(64, max(16, triton.next_power_of_2(H)))


@functools.lru_cache(maxsize=None)
def _capability(device):
    return torch.cuda.get_device_capability(device)[0]


@functools.lru_cache(maxsize=None)
def _num_sms(device):
    if device.type != "cuda":
        return 8  # CPU interpreter: a pretend GPU, so tests exercise several splits
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_kv_splits(batch, head_groups, capacity, num_sms, ctas_per_sm=1):
    """KV splits per (row, head group): enough programs to fill one wave of the GPU (num_sms x
    ctas_per_sm) when batch x groups alone cannot (B=1 at 128k needs one or two splits per SM),
    no split under MIN_SPLIT_TOKENS tokens (SHORT_SPLIT_TOKENS in caches of <= 64 such splits: B=1 at 640
    tokens 16 -> 9 us, at 4k 17 -> 12 us; at 16k, 256 splits lose to 128), and one split once the batch
    fills the GPU by itself."""
    programs = batch * head_groups
    slots = num_sms * ctas_per_sm
    if programs >= slots:
        return 1
    per_split = SHORT_SPLIT_TOKENS if triton.cdiv(capacity, SHORT_SPLIT_TOKENS) <= 64 else MIN_SPLIT_TOKENS
    return max(1, min(slots // programs, triton.cdiv(capacity, per_split)))


def _check(q_lat, q_pe, cache, block_table, seq_lens):
    if q_lat.dim() != 3 or q_pe.dim() != 3 or cache.dim() != 3:
        raise ValueError("expected q_lat (B,H,R), q_pe (B,H,P), cache (num_blocks, page, R+P)")
    B, H, R = q_lat.shape
    P = q_pe.shape[-1]
    page = cache.shape[1]
    if q_pe.shape[:2] != (B, H):
        raise ValueError(f"q_pe batch/heads {tuple(q_pe.shape[:2])} != q_lat's {(B, H)}")
    if cache.shape[2] != R + P:
        raise ValueError(f"cache width {cache.shape[2]} != R + P = {R} + {P}")
    for name, n in (("R (kv_lora_rank)", R), ("P (rope dim)", P), ("page size", page)):
        if n < 16 or n & (n - 1):
            raise ValueError(f"{name} = {n}: must be a power of two >= 16")
    if not 1 <= H <= 128:
        raise ValueError(f"heads = {H}: must be 1..128")
    if q_lat.dtype not in (torch.bfloat16, torch.float16) or q_pe.dtype != q_lat.dtype or cache.dtype != q_lat.dtype:
        raise ValueError(f"q_lat, q_pe and cache must all be bf16 or fp16, got {q_lat.dtype}, {q_pe.dtype}, {cache.dtype}")
    if block_table.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError("block_table and seq_lens must be int32")
    if block_table.dim() != 2 or block_table.shape[0] != B or tuple(seq_lens.shape) != (B,):
        raise ValueError(f"block_table must be (B, max_pages) and seq_lens (B,), with B = {B}")
    if q_lat.stride(-1) != 1 or q_pe.stride(-1) != 1 or block_table.stride(-1) != 1:
        raise ValueError("the last dimension of q_lat, q_pe and block_table must be contiguous")
    if cache.stride(2) != 1 or cache.stride(1) != R + P:
        raise ValueError("each cache page must be contiguous (page, R+P) rows; blocks may be strided")


def mla_decode(q_lat, q_pe, cache, block_table, seq_lens, sm_scale, out=None, num_splits=None, config=None,
               partials=False, preload=None):
    """One MLA decode step over a paged latent cache. Returns o_lat (B, H, R) in q_lat's dtype.

    q_lat (B,H,R), q_pe (B,H,P): queries, already absorbed / roped. cache (num_blocks, page, R+P):
    [latent c | roped k_pe] rows. block_table (B, max_pages) int32; seq_lens (B,) int32, each
    <= max_pages * page (not checked: that would need a host sync). Rows with seq_lens 0 give 0.
    out: optional (B,H,R) buffer to write into. num_splits / config=(BLOCK_N, num_warps,
    num_stages): overrides for tuning; by default they come from num_kv_splits and launch_config.
    No host sync and no benchmarking inside: the call can be captured in a CUDA graph (compile it
    once outside the capture: Triton JIT-compiles on the first call of each shape class).
    partials: with several splits, skip the merge and return (o_part (B,H,S,R) fp32, lse (B,H,S)) for
    merge_uv, which merges them inside the W_UV product (one kernel fewer).
    preload: load each split's block-table entries once, before its tile loop (needs tiles <= a page);
    default: for large batches on Hopper (MLA_PRELOAD=0: never).
    """
    _check(q_lat, q_pe, cache, block_table, seq_lens)
    B, H, R = q_lat.shape
    P = q_pe.shape[-1]
    page = cache.shape[1]
    if out is None:
        out = torch.empty_like(q_lat)
    BLOCK_H = head_group(H)
    groups = triton.cdiv(H, BLOCK_H)
    capacity = block_table.shape[1] * page
    num_sms = _num_sms(q_lat.device)
    # a large batch (64 rows x 16 heads, 640 tokens): one program an SM in 8 warps, 31.1-31.3 us a layer vs 34.1-34.7
    # for two an SM in 4 (results/serve_probe/c64_h100_7a7dc8c.json, c64_h100_1722c6d.json)
    wide = BLOCK_H <= 32 and 4 * B * groups >= num_sms and not INTERPRET
    if num_splits is None:
        num_splits = num_kv_splits(B, groups, capacity, num_sms, 1 if wide else PROGRAMS_PER_SM[BLOCK_H])
    # whole tiles per split (64 = the largest BLOCK_N), then drop splits that would start past the end
    split_tokens = triton.cdiv(triton.cdiv(max(capacity, 1), num_splits), 64) * 64
    num_splits = max(1, triton.cdiv(capacity, split_tokens))
    direct = num_splits == 1
    if direct:
        o_part = lse = out  # unused by the kernel
        s_ob = s_oh = s_os = s_lb = s_lh = 0
    else:
        o_part = torch.empty(B, H, num_splits, R, device=q_lat.device, dtype=torch.float32)
        lse = torch.empty(B, H, num_splits, device=q_lat.device, dtype=torch.float32)
        s_ob, s_oh, s_os, s_lb, s_lh = *o_part.stride()[:3], *lse.stride()[:2]
    args = (q_lat, q_pe, cache, block_table, seq_lens, o_part, lse, out,
            sm_scale * 1.4426950408889634, H, split_tokens,
            q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1),
            cache.stride(0), block_table.stride(0),
            s_ob, s_oh, s_os, s_lb, s_lh, out.stride(0), out.stride(1))
    grid = (groups, B, num_splits)
    upcast = q_lat.device.type != "cuda"
    # At 64 rows (one program an SM, ~5 tiles each) a tile's page id is a load its tile load waits on, and the
    # loop pipelines 2 deep: 26.9 us a layer. With the split's page ids loaded up front, 3 stages (3 x 74 KB
    # of shared memory: Hopper's 227 KB) in 4 warps take 20.1 (results/serve_probe/attn64.py).
    hopper = not upcast and _capability(q_lat.device) >= 9
    if preload is None:
        preload = PRELOAD and wide and hopper and split_tokens >= 128 and page >= 64
    bn, warps, stages = config or ((64, 4, 3) if preload and hopper else (64, 8, 2) if wide and split_tokens >= 128
                                   else launch_config(BLOCK_H, split_tokens, INTERPRET or upcast))
    np_ = triton.next_power_of_2(triton.cdiv(split_tokens, page) + 1) if preload and bn <= page else 0
    pdl = _pdl(q_lat)
    # Launched early, the next kernel's programs take SM slots while they wait: when the splits do not all fit
    # beside them that cost B=1 at 32k 54.9 vs 39.3 us, at 128k 99.2 vs 84.0 (serve_probe/kernel_b1_h100_8091c7a.json)
    late = bool(pdl) and groups * B * num_splits >= num_sms
    _mla_split_kernel[grid](*args, R=R, P=P, PAGE=page, BLOCK_H=BLOCK_H, BLOCK_N=bn, DIRECT=direct,
                            UPCAST=upcast, NP=np_, LATE=late, num_warps=warps, num_stages=stages, **pdl)
    if partials and not direct:
        return o_part, lse
    if not direct:
        # a (head, row) program per 64 latent columns spreads B=1 over many SMs; once B x H fills the GPU,
        # whole rows: at B=64 the 64-column grid was 8192 programs and 17 us a layer (probe_h100_graph64)
        block_r = min(R, 64) if B * H < _num_sms(q_lat.device) else R
        _mla_merge_kernel[(H, B, R // block_r)](o_part, lse, out, num_splits, s_ob, s_oh, s_os, s_lb, s_lh,
                                                out.stride(0), out.stride(1), BLOCK_R=block_r,
                                                BLOCK_S=min(32, triton.next_power_of_2(num_splits)), num_warps=4,
                                                **pdl)
    return out


def mla_decode_ref(q_lat, q_pe, cache, block_table, seq_lens, sm_scale):
    """Plain PyTorch, same signature and semantics: row by row, gather the first seq_lens[b]
    cached rows through the block table, softmax in at least fp32, o = P . c. Slow (host loop)."""
    B, H, R = q_lat.shape
    page = cache.shape[1]
    dt = torch.promote_types(q_lat.dtype, torch.float32)
    flat = cache.reshape(-1, cache.shape[-1])                                  # (num_blocks*page, R+P)
    out = torch.zeros(B, H, R, dtype=dt, device=q_lat.device)
    for b, n in enumerate(seq_lens.tolist()):
        if n == 0:
            continue
        t = torch.arange(n, device=cache.device)
        rows = flat[block_table[b, t // page].long() * page + t % page].to(dt)  # (n, R+P)
        c, k_pe = rows[:, :R], rows[:, R:]
        scores = (torch.einsum("hr,tr->ht", q_lat[b].to(dt), c)
                  + torch.einsum("hp,tp->ht", q_pe[b].to(dt), k_pe)) * sm_scale  # (H, n)
        out[b] = torch.einsum("ht,tr->hr", torch.softmax(scores, dim=-1), c)
    return out.to(q_lat.dtype)


# ----------------------------------------------------------------------------- the rest of a decode layer
# At batch 1 a decode step reads every weight once (1b: 2.1 GB, 0.70 ms on an H100) but cuBLAS + inductor
# spent 532 kernels on it (22 a layer): each GEMV ~6 us, and between them RMSNorms, RoPE, the residual adds,
# SwiGLU and the cache write, each a kernel of its own (results/serve_probe/probe_h100_d889e11.json).
# fused_linear folds those into the GEMVs (norm in the prologue, SwiGLU / residual in the epilogue),
# mla_absorb does everything between the projections and the attention, and merge_uv merges the attention's
# splits inside the W_UV product: 8 kernels a layer (serve.fused_decode; 1b replay 2.04 -> 1.31 ms). Under PDL
# each loads its weights before it waits for the kernel before it (0.23 ms a token at batch 1).

@triton.jit
def _load_w(w_ptr, k0, K, nmask, offs_k, s_wk, up, SWIGLU: tl.constexpr):
    """A (BN, BK) weight tile at column k0 (and its up-projection twin); nothing is read past K."""
    m = nmask[:, None] & (k0 + offs_k < K)[None, :]
    w = tl.load(w_ptr + k0 * s_wk, mask=m, other=0.0)
    u = w
    if SWIGLU:
        u = tl.load(w_ptr + up + k0 * s_wk, mask=m, other=0.0)
    return w, u


@triton.jit
def _mac(acc, x, w, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr):
    """acc (BM, BN) += x (BM, BK) . w (BN, BK)^T: on the CUDA cores under 16 rows (tl.dot needs 16)."""
    if UPCAST:   # the CPU interpreter computes bf16 wrongly
        w = w.to(tl.float32)
    if BLOCK_M < 16:
        return acc + tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], 2)
    return tl.dot(x.to(w.dtype), tl.trans(w), acc)


@triton.jit
def _linear_kernel(X, W, Y, Gamma, Res, M, N, K, eps,
                   s_xm, s_xg, s_wg, s_wn, s_wk, s_ym, s_yg, s_rm,
                   NORM: tl.constexpr, SWIGLU: tl.constexpr, RESID: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   ONE_TILE: tl.constexpr,   # K fits one tile: no next-tile load (its registers cost ~0.5 us)
                   PREFETCH: tl.constexpr,   # the next weight tile loaded by hand (num_stages 1); else Triton pipelines
                   UPCAST: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Y[m, g, n] = epilogue(sum_k prologue(X[m, g, k]) W[g, n, k]) for a program's (BLOCK_M, BLOCK_N) tile.
    NORM: X rows are RMSNorm'd (weight Gamma): x * Gamma is multiplied in and the 1/rms(x) scale applied
    at the end (the sum of squares rides along the K loop, so each program needs all of K: no split-K).
    SWIGLU: W holds [gate; up] (2N rows): Y = silu(x W_gate) * (x W_up). RESID: Y = Res + x W (in place).
    Under 16 rows the products run on the CUDA cores (a GEMV: tl.dot needs 16); from 16, tl.dot."""
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mmask, nmask = offs_m < M, offs_n < N
    x_ptr = X + g * s_xg + offs_m[:, None] * s_xm + offs_k[None, :]                   # (BM, BK)
    w_ptr = W + g * s_wg + offs_n[:, None] * s_wn + offs_k[None, :] * s_wk            # (BN, BK)
    up = N * s_wn                                                                     # [gate; up]: up rows
    if PREFETCH:
        w, u = _load_w(w_ptr, 0, K, nmask, offs_k, s_wk, up, SWIGLU)   # weights never change: fetched before the wait
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    ss = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if PREFETCH:
            w_next, u_next = w, u
            if not ONE_TILE:
                w_next, u_next = _load_w(w_ptr, k0 + BLOCK_K, K, nmask, offs_k, s_wk, up, SWIGLU)   # in flight meanwhile
        else:
            w, u = _load_w(w_ptr, k0, K, nmask, offs_k, s_wk, up, SWIGLU)
        kmask = k0 + offs_k < K
        x = tl.load(x_ptr + k0, mask=mmask[:, None] & kmask[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        if NORM:
            xf = x.to(tl.float32)
            ss += tl.sum(xf * xf, 1)
            x = (xf * tl.load(Gamma + k0 + offs_k, mask=kmask, other=0.0).to(tl.float32)[None, :]).to(x.dtype)
        acc = _mac(acc, x, w, BLOCK_M, UPCAST)
        if SWIGLU:
            acc_u = _mac(acc_u, x, u, BLOCK_M, UPCAST)
        if PREFETCH:
            w, u = w_next, u_next
    if NORM:
        acc = acc * tl.rsqrt(ss / K + eps)[:, None]
        acc_u = acc_u * tl.rsqrt(ss / K + eps)[:, None]
    if SWIGLU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_u
    ymask = mmask[:, None] & nmask[None, :]
    if RESID:
        acc += tl.load(Res + offs_m[:, None] * s_rm + offs_n[None, :], mask=ymask, other=0.0).to(tl.float32)
    tl.store(Y + g * s_yg + offs_m[:, None] * s_ym + offs_n[None, :], acc.to(Y.dtype.element_ty), mask=ymask)


def linear_config(M, N, K, swiglu=False):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). One row (batch-1 decode): 4 weight rows x up to 2048
    columns a program, 64 weights a thread in one load (with SwiGLU 2 rows of gate and of up), the next tile
    loaded by hand while the current one multiplies (num_stages is for tl.dot loops). From H100 sweeps over
    the 1b layers' weights (results/serve_probe/fused_h100_*.json); 2-4 rows and tl.dot at 16+ rows are
    correct but slower than cuBLAS there (serve.py uses this for batch 1 only)."""
    bm = triton.next_power_of_2(M) if M < 16 else min(64, triton.next_power_of_2(M))
    if INTERPRET:
        return bm, 16, 32, 4, 1
    if M == 1:   # 64 weights a thread a load (2 x 32 with SwiGLU's two tiles), K in at most 2048-wide tiles
        bk = min(2048, 1 << (K.bit_length() - 1))          # the largest power of two <= K (1536: 1024)
        return 1, (2 if swiglu else 8 if bk <= 512 else 4), bk, 4, 1
    if M < 16:
        return bm, 4, 1024 // bm, 4, 3
    return bm, 16, 128, 4, 3


def fused_linear(x, w, out=None, norm=None, eps=1e-6, swiglu=False, residual=None, x_group_stride=None,
                 config=None):
    """x (M, K), or G groups of K columns x_group_stride apart -> (M, G*N) in x's dtype (or out's), one kernel.
    w: (N, K) (or (2N, K) = [gate; up] with swiglu), or G groups (G, N, K) as any strided view (the
    per-head absorptions of W_UK, W_UV). norm: an RMSNorm weight (K,) applied to x first.
    residual: add it (may be `out`: the residual stream, updated in place)."""
    M = x.shape[0]
    if w.dim() == 2:
        w = w[None]
    G, N, K = w.shape
    if swiglu:
        N //= 2
    if out is None:
        out = torch.empty(M, G * N, device=x.device, dtype=x.dtype)
    s_xg = K if x_group_stride is None else x_group_stride
    bm, bn, bk, warps, stages = config or linear_config(M, N, K, swiglu)
    upcast = x.device.type != "cuda"
    res = residual if residual is not None else out
    grid = (triton.cdiv(N, bn), G, triton.cdiv(M, bm))
    _linear_kernel[grid](x, w, out, norm if norm is not None else x, res, M, N, K, eps,
                         x.stride(0), s_xg, w.stride(0), w.stride(1), w.stride(2), out.stride(0), N, res.stride(0),
                         NORM=norm is not None, SWIGLU=swiglu, RESID=residual is not None,
                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, ONE_TILE=K <= bk, PREFETCH=stages == 1, UPCAST=upcast,
                         num_warps=warps, num_stages=stages, **_pdl(x))
    return out


@triton.jit
def _latent_row(a, row, cos, sin, Gamma, eps, R: tl.constexpr, P: tl.constexpr):
    """Store [RMSNorm(c) * Gamma | rope(k_pe)] at `row` from [c | k_pe] at `a`; cos/sin (P/2,) fp32. DeepSeek's
    interleaved RoPE: pairs (2i, 2i+1) rotate by angle i."""
    offs_r = tl.arange(0, R)
    i = tl.arange(0, P // 2)
    c = tl.load(a + offs_r).to(tl.float32)
    c = c * tl.rsqrt(tl.sum(c * c, 0) / R + eps) * tl.load(Gamma + offs_r).to(tl.float32)
    re = tl.load(a + R + 2 * i).to(tl.float32)
    im = tl.load(a + R + 2 * i + 1).to(tl.float32)
    ty = row.dtype.element_ty
    tl.store(row + offs_r, c.to(ty))
    tl.store(row + R + 2 * i, (re * cos - im * sin).to(ty))
    tl.store(row + R + 2 * i + 1, (re * sin + im * cos).to(ty))


@triton.jit
def _absorb_kernel(A, Q, WUK, QLAT, QPE, Cache, BlockTable, Lens, Cos, Sin, Gamma, eps,
                   s_am, s_qm, s_qh, s_wh, s_wd, s_lm, s_lh, s_pm, s_ph, s_cb, s_bt, s_cs,
                   R: tl.constexpr, P: tl.constexpr, NOPE: tl.constexpr, PAGE: tl.constexpr,
                   BLOCK_R: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Everything between the projections and the attention, for row m and head h (grid (H, R/BLOCK_R, B)):
    q_lat[h, r-block] = q_nope[h] . W_UK[h][:, r-block]; the first r-block's program ropes q_pe[h]; head 0's
    also appends the cache row [RMSNorm(c) * Gamma | rope(k_pe)] at position Lens[m]. DeepSeek's interleaved
    RoPE: pairs (2i, 2i+1) rotate by angle i; Cos, Sin: (positions, P/2) fp32 tables."""
    h = tl.program_id(0)
    rb = tl.program_id(1)
    m = tl.program_id(2)
    offs_d = tl.arange(0, NOPE)
    offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    w = tl.load(WUK + h * s_wh + offs_d[:, None] * s_wd + offs_r[None, :])             # (NOPE, BR)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    q = tl.load(Q + m * s_qm + h * s_qh + offs_d).to(tl.float32)                       # (NOPE,)
    q_lat = tl.sum(q[:, None] * w.to(tl.float32), 0)                                  # (BR,)
    tl.store(QLAT + m * s_lm + h * s_lh + offs_r, q_lat.to(QLAT.dtype.element_ty))
    if rb == 0:
        pos = tl.load(Lens + m)
        i = tl.arange(0, P // 2)
        cos = tl.load(Cos + pos * s_cs + i)
        sin = tl.load(Sin + pos * s_cs + i)
        qp = Q + m * s_qm + h * s_qh + NOPE + 2 * i
        re = tl.load(qp).to(tl.float32)
        im = tl.load(qp + 1).to(tl.float32)
        o = QPE + m * s_pm + h * s_ph + 2 * i
        tl.store(o, (re * cos - im * sin).to(QPE.dtype.element_ty))
        tl.store(o + 1, (re * sin + im * cos).to(QPE.dtype.element_ty))
        if h == 0:
            page = tl.load(BlockTable + m * s_bt + pos // PAGE).to(tl.int64)
            _latent_row(A + m * s_am, Cache + page * s_cb + (pos % PAGE) * (R + P), cos, sin, Gamma, eps, R, P)


def mla_absorb(ckv, q, w_uk, cache, block_table, seq_lens, cos, sin, gamma, eps=1e-6):
    """The decode step between MLA's projections and mla_decode, in one kernel.
    ckv (B, R+P): kv_a's [latent | rope key]; q (B, H, NOPE+P): the queries; w_uk (H, NOPE, R): W_UK (a view of
    kv_b_proj's weight, last dim contiguous); cache (num_blocks, page, R+P) with block_table (B, pages) and
    seq_lens (B,) int32, the tokens cached before this one (its position); cos/sin (positions, P/2) fp32.
    Appends [RMSNorm(c) * gamma | rope(k_pe)] to the cache; returns q_lat (B, H, R) = W_UK^T q_nope and
    q_pe (B, H, P) = rope(q's rope part)."""
    B, H, qk = q.shape
    NOPE, R = w_uk.shape[1:]
    P = qk - NOPE
    q_lat = torch.empty(B, H, R, device=q.device, dtype=q.dtype)
    q_pe = torch.empty(B, H, P, device=q.device, dtype=q.dtype)
    block_r = 64 if q.is_cuda else 32
    _absorb_kernel[(H, R // block_r, B)](ckv, q, w_uk, q_lat, q_pe, cache, block_table, seq_lens, cos, sin, gamma, eps,
                                         ckv.stride(0), q.stride(0), q.stride(1), w_uk.stride(0), w_uk.stride(1),
                                         q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1),
                                         cache.stride(0), block_table.stride(0), cos.stride(0), R=R, P=P, NOPE=NOPE,
                                         PAGE=cache.shape[1], BLOCK_R=block_r, num_warps=4, **_pdl(q))
    return q_lat, q_pe


@triton.jit
def _merge_uv_kernel(OPart, Lse, W, Y, num_splits, s_ob, s_oh, s_os, s_lb, s_lh, s_wh, s_wv, s_ym,
                     R: tl.constexpr, DV: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr,
                     USE_PDL: tl.constexpr = False):
    """o[b, h, v-block] = W_UV[h][v-block] . merge_s(o_part[b, h, s]): the splits are merged by their
    log-sum-exp (as _mla_merge_kernel) and rounded to o_lat's dtype, then multiplied straight into W_UV."""
    vb = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_r = tl.arange(0, R)
    offs_s = tl.arange(0, BLOCK_S)
    w = tl.load(W + h * s_wh + offs_v[:, None] * s_wv + offs_r[None, :])                # (BV, R)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    smask = offs_s < num_splits
    lse = tl.load(Lse + b * s_lb + h * s_lh + offs_s, mask=smask, other=float("-inf"))    # (BS,)
    mx = tl.max(lse, 0)
    wgt = tl.exp2(lse - tl.where(mx == float("-inf"), 0.0, mx))
    den = tl.sum(wgt, 0)
    o = tl.load(OPart + b * s_ob + h * s_oh + offs_s[:, None] * s_os + offs_r[None, :], mask=smask[:, None],
                other=0.0)                                                               # (BS, R)
    x = tl.sum(wgt[:, None] * o, 0) / tl.where(den > 0, den, 1.0)                        # (R,) o_lat[b, h]
    x = x.to(Y.dtype.element_ty).to(tl.float32)
    y = tl.sum(x[None, :] * w.to(tl.float32), 1)                                         # (BV,)
    tl.store(Y + b * s_ym + h * DV + offs_v, y.to(Y.dtype.element_ty))


def merge_uv(o_part, lse, w_uv, dtype):
    """mla_decode(partials=True)'s (o_part (B,H,S,R), lse (B,H,S)) and W_UV (H, DV, R) -> (B, H*DV) in dtype."""
    B, H, S, R = o_part.shape
    DV = w_uv.shape[1]
    y = torch.empty(B, H * DV, device=o_part.device, dtype=dtype)
    bv = 16 if o_part.is_cuda else 8
    _merge_uv_kernel[(DV // bv, H, B)](o_part, lse, w_uv, y, S, *o_part.stride()[:3], *lse.stride()[:2],
                                       w_uv.stride(0), w_uv.stride(1), y.stride(0), R=R, DV=DV, BLOCK_V=bv,
                                       BLOCK_S=triton.next_power_of_2(S), num_warps=4, **_pdl(o_part))
    return y


# ----------------------------------------------------------------------------- prefill's elementwise tails
# A 1b prefill forward of 16 x 512 tokens spent ~9 of its 53 ms on RoPE in fp32 (9 elementwise kernels a call)
# and SwiGLU (two passes over the strided gate/up halves) (results/serve_probe/probe_h100_graph64_prefill_*.json).
# model.py calls these on CUDA when no gradient is taken; they compute in fp32 and round once, as its PyTorch code.

@triton.jit
def _rope_kernel(X, Y, Cos, Sin, N, T, H, s_xb, s_xt, s_xh, s_yb, s_yt, s_yh, s_cb, s_ct,
                 HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """DeepSeek's interleaved RoPE for BLOCK_T tokens (b, t) (program 0) x a block of heads (program 1). Each head's
    values load as one contiguous run and split into (re, im) in registers: loading x[2i] and x[2i+1] apart read
    every sector twice (45 us a layer for a 16 x 512 prefill's q on an H100, 0.7 TB/s)."""
    n = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)                                    # flat b * T + t
    b, t = n // T, n % T
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_D)
    d = tl.arange(0, 2 * BLOCK_D)
    cm = (n < N)[:, None] & (i < HALF)[None, :]
    cs = (b * s_cb + t * s_ct)[:, None] + i[None, :]                                           # (BT, BD)
    cos = tl.load(Cos + cs, mask=cm, other=0.0).to(tl.float32)[:, None, :]
    sin = tl.load(Sin + cs, mask=cm, other=0.0).to(tl.float32)[:, None, :]
    m = (n < N)[:, None, None] & (heads < H)[None, :, None] & (d < 2 * HALF)[None, None, :]
    x = tl.load(X + (b * s_xb + t * s_xt)[:, None, None] + heads[None, :, None] * s_xh + d[None, None, :],
                mask=m, other=0.0).to(tl.float32)                                              # (BT, BH, 2 BD)
    re, im = tl.split(tl.reshape(x, (BLOCK_T, BLOCK_H, BLOCK_D, 2)))
    y = tl.reshape(tl.join(re * cos - im * sin, re * sin + im * cos), (BLOCK_T, BLOCK_H, 2 * BLOCK_D))
    tl.store(Y + (b * s_yb + t * s_yt)[:, None, None] + heads[None, :, None] * s_yh + d[None, None, :],
             y.to(Y.dtype.element_ty), mask=m)


def rope(x, cos, sin, out=None):
    """model.apply_rope in one kernel: x (B, T, H, D) any strides (last one 1), cos/sin (B, T, D/2) -> out (x's shape
    and dtype; may be x itself)."""
    B, T, H, D = x.shape
    out = torch.empty_like(x) if out is None else out
    if cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    cos, sin = cos.expand(B, T, D // 2), sin.expand(B, T, D // 2)
    bh = min(16, triton.next_power_of_2(H))
    bt = max(1, 1024 // (bh * triton.next_power_of_2(D)))     # ~1k values a program
    _rope_kernel[(triton.cdiv(B * T, bt), triton.cdiv(H, bh))](
        x, out, cos, sin, B * T, T, H, *x.stride()[:3], *out.stride()[:3], *cos.stride()[:2], HALF=D // 2,
        BLOCK_D=triton.next_power_of_2(D // 2), BLOCK_T=bt, BLOCK_H=bh, num_warps=4)
    return out


@triton.jit
def _write_rows_kernel(Rows, Out, Slots, W, s_r, BLOCK: tl.constexpr):
    """Out[Slots[n], :W] = Rows[n, :W] for row n (program 0)."""
    n = tl.program_id(0)
    slot = tl.load(Slots + n).to(tl.int64)
    for w0 in range(0, W, BLOCK):
        offs = w0 + tl.arange(0, BLOCK)
        row = tl.load(Rows + n * s_r + offs, mask=offs < W)
        tl.store(Out + slot * W + offs, row.to(Out.dtype.element_ty), mask=offs < W)


def write_rows(kv, slots, rows):
    """model.cache_write in one kernel: kv (..., W) contiguous, slots (B, T) rows of kv.view(-1, W), rows (B, T, W).
    PyTorch's index_put took 3.8 us a layer for a 64-row decode step and 22 us for a 16 x 512 prefill on an H100
    (results/serve_probe/probe_h100_graph64_prefill_89af7e2.json)."""
    W = kv.shape[-1]
    rows = rows.reshape(-1, W)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    _write_rows_kernel[(rows.shape[0],)](rows, kv, slots.reshape(-1), W, rows.stride(0),
                                         BLOCK=min(1024, triton.next_power_of_2(W)), num_warps=4)


@triton.jit
def _append_latent_kernel(CKV, Gamma, Cos, Sin, Out, Slots, T, eps, s_ab, s_at, s_cb, s_ct,
                          R: tl.constexpr, P: tl.constexpr):
    """Out[Slots[n]] = [RMSNorm(c) * Gamma | rope(k_pe)] for token n = b * T + t (program 0), from CKV[b, t] =
    [c | k_pe]: the latent's normalisation, the rope key's rotation and the cache write in one pass."""
    n = tl.program_id(0)
    b, t = n // T, n % T
    i = tl.arange(0, P // 2)
    cos = tl.load(Cos + b * s_cb + t * s_ct + i).to(tl.float32)
    sin = tl.load(Sin + b * s_cb + t * s_ct + i).to(tl.float32)
    _latent_row(CKV + b * s_ab + t * s_at, Out + tl.load(Slots + n).to(tl.int64) * (R + P), cos, sin, Gamma, eps, R, P)


def append_latent(kv, slots, ckv, gamma, eps, cos, sin):
    """model.cache_append in one kernel: kv (..., R+P) contiguous, slots (B, T) rows of kv.view(-1, R+P), ckv (B, T,
    R+P) = [c | k_pe] (last dim contiguous), gamma (R,) the latent's RMSNorm weight, cos/sin (B, T, P/2). In a 64-row
    decode step torch.compile made it 3 kernels, 4.8 us a layer on an H100, with the cache write
    (results/serve_probe/c64_step_prefill_ops_h100_f7efcd5.json)."""
    B, T, W = ckv.shape
    R = gamma.shape[0]
    cos, sin = cos.expand(B, T, -1), sin.expand(B, T, -1)
    if cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    slots = slots.reshape(-1)
    if not slots.is_contiguous():
        slots = slots.contiguous()
    _append_latent_kernel[(B * T,)](ckv, gamma, cos, sin, kv, slots, T, eps, ckv.stride(0), ckv.stride(1),
                                    cos.stride(0), cos.stride(1), R=R, P=W - R, num_warps=4)


@triton.jit
def _swiglu_kernel(GU, Y, N, s_gm, s_ym, BLOCK: tl.constexpr):
    """Y[m, n] = silu(GU[m, n]) * GU[m, N + n]: one pass over [gate | up]."""
    m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(GU + m * s_gm + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + m * s_gm + N + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + m * s_ym + offs, (g / (1.0 + tl.exp(-g)) * u).to(Y.dtype.element_ty), mask=mask)


def swiglu(gu):
    """gu (..., 2N) = [x W_gate | x W_up], rows contiguous -> silu(gate) * up (..., N) in gu's dtype."""
    rows = gu.reshape(-1, gu.shape[-1])
    N = rows.shape[1] // 2
    y = torch.empty(rows.shape[0], N, device=gu.device, dtype=gu.dtype)
    block = min(1024, triton.next_power_of_2(N))
    _swiglu_kernel[(rows.shape[0], triton.cdiv(N, block))](rows, y, N, rows.stride(0), y.stride(0), BLOCK=block,
                                                            num_warps=4)
    return y.view(*gu.shape[:-1], N)


@triton.jit
def _rms_norm_kernel(X, Gamma, Y, M, N, s_xm, s_ym, eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Y[m] = Gamma * X[m] * rsqrt(mean(X[m]^2) + eps) for BLOCK_M rows, in fp32, rounded once."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (offs < N)[None, :]
    x = tl.load(X + rows[:, None] * s_xm + offs[None, :], mask=mask, other=0.0).to(tl.float32)   # (BM, BN)
    g = tl.load(Gamma + offs, mask=offs < N, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, 1) / N + eps)[:, None] * g[None, :]
    tl.store(Y + rows[:, None] * s_ym + offs[None, :], y.to(Y.dtype.element_ty), mask=mask)


def rms_norm(x, weight, eps):
    """F.rms_norm over the last dim, reading rows of any stride. A 1b prefill normalises q_a as a view of
    [q_a | c | k_pe] (c too, before append_latent): F.rms_norm copied them first, and its kernel ran at ~1 TB/s at
    widths 1536 and 512 (16 x 512 tokens on an H100: 96 us a layer for the two,
    results/serve_probe/c64_step_prefill_ops_h100_f8be02d.json). x (..., N) -> (..., N) contiguous."""
    N = x.shape[-1]
    rows = x.reshape(-1, N)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = torch.empty(rows.shape, device=x.device, dtype=x.dtype)
    bn = triton.next_power_of_2(N)
    bm = max(1, 2048 // bn)   # ~2k values a program
    _rms_norm_kernel[(triton.cdiv(rows.shape[0], bm),)](rows, weight, y, rows.shape[0], N, rows.stride(0), y.stride(0),
                                                         eps, BLOCK_M=bm, BLOCK_N=bn, num_warps=4 if bn <= 2048 else 8)
    return y.view(x.shape)
