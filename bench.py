"""Benchmarks. Each subcommand measures one thing, prints a table and writes results/<name>.json
with its provenance (git commit, date, card, torch/triton versions, the exact command).

    python bench.py kernel    # MLA decode: torch naive vs torch absorbed vs mla_kernel (CUDA)
    python bench.py memory    # KV-cache bytes per token: MLA vs MHA vs GQA, formula and allocation
    python bench.py train     # training throughput / MFU of train.py on 1..N GPUs (FSDP2)
    python bench.py serve     # serving: serve.py vs transformers generate at concurrency 1/8/64; --robustness=1
    python bench.py longctx   # 1b chunked prefill to 1M tokens + decode, MLA vs MHA

Flags are nanoGPT-style --key=value after the subcommand; `python bench.py SUB --help` lists them.
Performance is reported against the roofline we measure on the same card (a device-to-device copy
for bandwidth, a large bf16 matmul for tensor-core rate), not against datasheet numbers.
"""
import gc
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass

import torch

import model as M

ROOT = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- each subcommand's flags
@dataclass
class KernelFlags:
    heads: str = "16,128"              # head counts H
    batches: str = "1,16,64"           # batch sizes B
    lengths: str = "4096,32768,131072"  # context lengths L (tokens)
    page: int = 64                     # cache page size (power of two >= 16)
    rep_ms: int = 200                  # do_bench time per measurement
    naive_mem_frac: float = 0.6        # skip naive if its estimated memory exceeds this share of free memory
    out: str = ""                      # JSON path (default results/bench_kernel_<card>.json)


@dataclass
class MemoryFlags:
    presets: str = "tiny,small,1b"     # model.PRESETS names
    lengths: str = "32768,131072" if torch.cuda.is_available() else "4096"  # tokens to allocate a cache for
    page: int = 64                     # cache page size
    out: str = ""                      # JSON path (default results/bench_memory_<card>.json)


@dataclass
class TrainFlags:
    preset: str = "1b"                 # model.PRESETS key
    gpus: str = "1,2"                  # process counts N (GPUs, or CPU processes)
    compile: str = "True,False"        # torch.compile settings to run
    parallel: str = "fsdp,ddp"         # fsdp (FSDP2) and/or ddp (DistributedDataParallel, N >= 2 only)
    seq_len: int = 4096                # tokens per row
    batch_size: int = 4                # rows per process per step
    iters: int = 40                    # optimizer steps per run
    log_interval: int = 5              # steps per logged interval
    matmul_tflops: float = 0.0         # measured matmul TFLOP/s for a second MFU (0: measure on the GPU)
    device: str = "auto"               # auto, cuda or cpu
    out: str = ""                      # JSON path (default results/bench_train_<card>.json)


@dataclass
class ServeFlags:
    ckpt: str = ""                     # checkpoint (default: random weights of --preset, seed 0)
    preset: str = "small"              # model.PRESETS key
    concurrency: str = "1,8,64"        # concurrent clients (closed loop)
    rounds: int = 4                    # requests per client at each level
    prompt_len: int = 512              # prompt tokens (random bytes)
    max_tokens: int = 128              # generated tokens per request
    dtype: str = "auto"                # serve.py --dtype
    page: int = 64                     # cache page size
    baseline: bool = True              # also time transformers' generate on the HF export
    robustness: bool = False           # run the robustness scenario instead
    clients: int = 200                 # robustness: clients
    duration: int = 60                 # robustness: seconds of load
    examples: int = 100                # robustness: schemathesis examples per operation
    server_args: str = ""              # more serve.py flags, space-separated (e.g. --engine_process=False)
    client_procs: int = 0              # load generator processes (0: one per 2 CPU cores, at most 8; 1: threads only)
    out: str = ""                      # JSON path (default results/bench_serve_<card>.json)


@dataclass
class LongctxFlags:
    preset: str = "1b"                 # model.PRESETS key
    lengths: str = "32768,131072,1048576"  # context lengths L (tokens)
    attn: str = "mla,mha"              # mla and/or mha
    chunk: int = 16384                 # prefill chunk (tokens)
    page: int = 64                     # cache page size
    decode_steps: int = 20             # timed decode steps
    out: str = ""                      # JSON path (default results/bench_longctx_<card>.json)


# ----------------------------------------------------------------------------- small shared helpers
def die(msg):
    M.die("bench.py", msg)


def parse_flags(cls, sub, argv):
    return M.parse_flags(cls, argv, f"usage: python bench.py {sub} [--key=value ...]", prog="bench.py")


def int_list(sub, name, s):
    try:
        vals = [int(x) for x in s.split(",") if x]
    except ValueError:
        die(f"{sub}: --{name}={s!r}: expected comma-separated integers")
    if not vals or min(vals) < 1:
        die(f"{sub}: --{name}={s!r}: expected positive integers")
    return vals


def card_name():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def card_slug(card):
    m = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", card)  # "NVIDIA H100 80GB HBM3" -> "h100"
    return (m.group(1) if m else re.sub(r"[^A-Za-z0-9]+", "_", card)).lower()


def provenance(card):
    return M.provenance(card=card, cuda=torch.version.cuda)


def write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    print(f"wrote {path}")


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


# ----------------------------------------------------------------------------- kernel

def capture(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on a side stream, as capture requires
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def median_ms(fn, n, before=None):
    """Median ms of n calls of fn timed with CUDA events; before() runs untimed ahead of each call."""
    times = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if before is not None:
            before()
        s.record()
        fn()
        e.record()
        times.append((s, e))
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in times)[n // 2]


def median_ms_clean_flush(fn, rep_ms, flush):
    """Like do_bench, but flushes L2 by READING a 256 MB buffer: do_bench's flush writes zeros, and
    the dirty lines it leaves are written back to DRAM while the timed kernel runs (tens of us)."""
    n = max(10, min(2000, int(rep_ms / max(median_ms(fn, 1), 1e-3))))
    return median_ms(fn, n, flush.sum)


def time_graph(fn, rep_ms, flush=None):
    """Median ms of one CUDA-graph replay of fn, L2 flushed before each replay (triton do_bench);
    with flush given, also the median under a read-only flush."""
    import triton.testing
    g = capture(fn)
    ms = triton.testing.do_bench(g.replay, warmup=max(10, rep_ms // 4), rep=rep_ms, return_mode="median")
    clean = median_ms_clean_flush(g.replay, rep_ms, flush) if flush is not None else None
    del g
    return ms, clean


def measure_ceilings(rep_ms):
    """Measured device-to-device copy bandwidth (bytes read + written) and bf16 matmul rate."""
    import triton.testing
    src = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)  # 1 GiB, far beyond L2
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=rep_ms, return_mode="median")
    copy_gbs = 2 * src.numel() * src.element_size() / ms / 1e6
    assert torch.equal(dst, src)
    del src, dst
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=rep_ms, return_mode="median")
    mm_tflops = 2 * n ** 3 / ms / 1e9
    del a, b
    torch.cuda.empty_cache()
    return copy_gbs, mm_tflops


def bench_kernel(argv):
    """One decode step of one layer of the 1b geometry (latent 512 + rope 64, nope 128, v 128, bf16):
    torch naive (decompress the cache with kv_b_proj, then SDPA), torch absorbed (bmm/einsum against
    the latent cache) and ours (the same absorbed projections around mla_kernel.mla_decode)."""
    cfg = parse_flags(KernelFlags, "kernel", argv)
    heads, batches, lengths = (int_list("kernel", k, getattr(cfg, k)) for k in ("heads", "batches", "lengths"))
    page = cfg.page
    if page < 16 or page & (page - 1):
        die(f"kernel: --page={page}: must be a power of two >= 16")
    if any(L % page for L in lengths):
        die(f"kernel: every --lengths value must be a multiple of --page={page}")
    if not torch.cuda.is_available():
        die("kernel: needs a CUDA GPU (the CPU tests in test_all.py check correctness)")
    import mla_kernel

    torch.manual_seed(0)
    card = card_name()
    R, P, NOPE, V = 512, 64, 128, 128
    dt = torch.bfloat16
    scale = (NOPE + P) ** -0.5
    copy_gbs, mm_tflops = measure_ceilings(cfg.rep_ms)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    flush = torch.ones(1 << 26, device="cuda", dtype=torch.int32)  # 256 MB, 5x the L2
    tiny = torch.zeros(1, device="cuda")
    graph_floor_ms, graph_floor_clean_ms = time_graph(lambda: tiny.add_(1), cfg.rep_ms, flush)
    print(f"{card}: {sms} SMs, copy {copy_gbs:.0f} GB/s (read+write), bf16 matmul {mm_tflops:.0f} TFLOP/s, "
          f"one-kernel graph replay {graph_floor_ms * 1e3:.1f} us (do_bench) / {graph_floor_clean_ms * 1e3:.1f} us "
          f"(read flush)", flush=True)

    rows = []
    for B in batches:
        for L in lengths:
            pages = L // page
            cache = torch.randn(B * pages, page, R + P, device="cuda", dtype=dt)            # (blocks, page, R+P)
            block_table = torch.randperm(B * pages, device="cuda").view(B, pages).int()      # shuffled pages
            seq_lens = torch.full((B,), L, device="cuda", dtype=torch.int32)
            # the torch baselines get a contiguous copy (their best case: no paged gather timed)
            contig = cache[block_table.long()].view(B, L, R + P)                             # (B, L, R+P)
            for H in heads:
                w_kvb = torch.randn(H * (NOPE + V), R, device="cuda", dtype=dt) * R ** -0.5  # kv_b_proj.weight
                w_uk, w_uv = w_kvb.view(H, NOPE + V, R).split([NOPE, V], dim=1)              # (H,128,R) each
                q_nope = torch.randn(B, H, NOPE, device="cuda", dtype=dt)
                q_pe = torch.randn(B, H, P, device="cuda", dtype=dt)

                # float64 reference, row by row (a (B, H, L) float64 score tensor would not fit)
                uk64, uv64 = w_uk.double(), w_uv.double()
                olat_ref = torch.empty(B, H, R, device="cuda", dtype=torch.float64)
                for b in range(B):
                    kv64 = contig[b].double()                                                # (L, R+P)
                    q64 = torch.cat([torch.einsum("hd,hdc->hc", q_nope[b].double(), uk64), q_pe[b].double()], -1)
                    olat_ref[b] = torch.softmax(q64 @ kv64.T * scale, -1) @ kv64[:, :R]
                    del kv64
                out_ref = torch.einsum("bhc,hdc->bhd", olat_ref, uv64)                     # (B, H, V)

                def naive():
                    kv = torch.nn.functional.linear(contig[..., :R], w_kvb).view(B, L, H, NOPE + V)
                    k_nope, v = kv.split([NOPE, V], dim=-1)
                    k = torch.cat([k_nope, contig[:, :, None, R:].expand(B, L, H, P)], dim=-1)  # (B, L, H, 192)
                    q = torch.cat([q_nope, q_pe], dim=-1)[:, :, None]                             # (B, H, 1, 192)
                    o = torch.nn.functional.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2),
                                                                         scale=scale)
                    return o[:, :, 0]                                                             # (B, H, V)

                def absorbed():
                    q_lat = torch.einsum("bhd,hdc->bhc", q_nope, w_uk)                            # (B, H, R)
                    scores = torch.einsum("bhk,blk->bhl", torch.cat([q_lat, q_pe], -1), contig)   # (B, H, L)
                    p = (scores.float() * scale).softmax(-1).to(dt)
                    o_lat = torch.einsum("bhl,blc->bhc", p, contig[..., :R])
                    return torch.einsum("bhc,hdc->bhd", o_lat, w_uv)

                q_lat_static = torch.einsum("bhd,hdc->bhc", q_nope, w_uk)

                def kernel():
                    return mla_kernel.mla_decode(q_lat_static, q_pe, cache, block_table, seq_lens, scale)

                def ours():
                    o_lat = mla_kernel.mla_decode(torch.einsum("bhd,hdc->bhc", q_nope, w_uk), q_pe, cache,
                                                  block_table, seq_lens, scale)
                    return torch.einsum("bhc,hdc->bhd", o_lat, w_uv)

                row = dict(H=H, B=B, L=L, tokens=B * L, cache_bytes=B * L * (R + P) * 2,
                           splits=mla_kernel.num_kv_splits(B, -(-H // 64), L, sms,
                                                                 mla_kernel.PROGRAMS_PER_SM[mla_kernel.head_group(H)]))
                naive_est = B * L * H * 2 * ((NOPE + V) + 2 * (NOPE + P) + V)  # kv, k (cat + SDPA copy), v copy
                free = torch.cuda.mem_get_info()[0]
                todo = [("absorbed", absorbed, out_ref), ("ours", ours, out_ref), ("kernel", kernel, olat_ref)]
                if naive_est < cfg.naive_mem_frac * free:
                    todo.insert(0, ("naive", naive, out_ref))
                else:
                    row["naive_skipped"] = f"needs ~{naive_est / 1e9:.0f} GB, {free / 1e9:.0f} GB free"
                for name, fn, ref in todo:
                    try:
                        err = rel_err(fn(), ref)
                        row[f"{name}_err"] = err
                        if not err < 2e-2:
                            row[f"{name}_ms"] = None
                            row[f"{name}_failed"] = f"rel err {err:.2e} vs float64"
                            continue
                        torch.cuda.empty_cache()
                        ms, clean = time_graph(fn, cfg.rep_ms, flush if name == "kernel" else None)
                        row[f"{name}_ms"] = ms
                        if clean is not None:
                            row[f"{name}_ms_clean_flush"] = clean
                    except torch.cuda.OutOfMemoryError:
                        row[f"{name}_ms"] = None
                        row[f"{name}_skipped"] = "out of memory"
                    torch.cuda.empty_cache()
                k_ms = row.get("kernel_ms")
                row["floor_mma_ms"] = 2 * B * L * H * (R + P + R) / (mm_tflops * 1e9)
                row["floor_bw_ms"] = row["cache_bytes"] / (copy_gbs * 1e6)
                if k_ms:
                    row["kernel_gbs"] = row["cache_bytes"] / k_ms / 1e6
                    row["kernel_pct_copy"] = 100 * row["kernel_gbs"] / copy_gbs
                    row["kernel_x_mma_floor"] = k_ms / row["floor_mma_ms"]
                    row["kernel_pct_copy_clean_flush"] = 100 * row["cache_bytes"] / row["kernel_ms_clean_flush"] / 1e6 / copy_gbs
                if row.get("naive_ms") and row.get("ours_ms"):
                    row["speedup_vs_naive"] = row["naive_ms"] / row["ours_ms"]
                if row.get("absorbed_ms") and row.get("ours_ms"):
                    row["speedup_vs_absorbed"] = row["absorbed_ms"] / row["ours_ms"]
                row["targets"] = kernel_targets(row)
                rows.append(row)
                print(format_kernel_row(row), flush=True)
                del w_kvb, w_uk, w_uv, q_nope, q_pe, olat_ref, out_ref, q_lat_static
            del cache, contig, block_table
            torch.cuda.empty_cache()

    print("\n" + KERNEL_HEADER)
    for row in rows:
        print(format_kernel_row(row))
    met = [t for r in rows for t in r["targets"]]
    print(f"targets met: {sum(t['met'] for t in met)}/{len(met)}")
    result = {"provenance": provenance(card), "sms": sms, "copy_gbs": copy_gbs, "matmul_tflops": mm_tflops,
              "graph_floor_ms": graph_floor_ms, "graph_floor_clean_flush_ms": graph_floor_clean_ms,
              "geometry": dict(kv_lora_rank=R, qk_rope_head_dim=P, qk_nope_head_dim=NOPE, v_head_dim=V,
                               page=page, dtype="bfloat16"),
              "notes": "ms: median CUDA-graph replay (triton do_bench, L2 flushed). naive/absorbed/ours: the whole "
                       "attention step from q_nope/q_pe to the (B,H,v) output; kernel: mla_decode alone. "
                       "Torch baselines read a contiguous copy of the cache, ours the shuffled paged cache. "
                       "GB/s: latent cache bytes read once / kernel time; pct of measured copy bandwidth "
                       "(bytes read+written). MMA floor: 2*B*L*H*(576+512) FLOP / measured matmul rate. "
                       "kernel_ms_clean_flush: the same graph timed after a read-only L2 flush (do_bench zeroes a "
                       "256 MB buffer; writing back those dirty lines lands inside the next timed kernel). "
                       "graph_floor_ms: one tiny kernel's graph replay under the same timing. "
                       "Targets are judged on the do_bench numbers.",
              "rows": rows}
    write_json(cfg.out or os.path.join(ROOT, "results", f"bench_kernel_{card_slug(card)}.json"), result)


def kernel_targets(r):
    t = []
    if r["H"] == 16 and r["tokens"] >= 512 * 1024 and r.get("kernel_pct_copy"):
        t.append(dict(name="H=16, B*L>=512k: >=85% of copy bandwidth", value=r["kernel_pct_copy"],
                      met=r["kernel_pct_copy"] >= 85))
    if r["H"] == 16 and r["B"] == 1 and r["L"] == 128 * 1024 and r.get("kernel_pct_copy"):
        t.append(dict(name="H=16, B=1, L=128k: >=60% of copy bandwidth", value=r["kernel_pct_copy"],
                      met=r["kernel_pct_copy"] >= 60))
    if r["H"] == 128 and r.get("kernel_x_mma_floor"):
        t.append(dict(name="H=128: within 2x of the MMA floor", value=r["kernel_x_mma_floor"],
                      met=r["kernel_x_mma_floor"] <= 2))
    if r.get("speedup_vs_naive") and r["tokens"] >= 32 * 1024:
        t.append(dict(name=">=20x torch naive", value=r["speedup_vs_naive"], met=r["speedup_vs_naive"] >= 20))
    return t


KERNEL_HEADER = (f"{'H':>4} {'B':>3} {'L':>7} {'naive ms':>9} {'absorb ms':>9} {'ours ms':>8} {'kernel ms':>9} "
                 f"{'GB/s':>6} {'%copy':>6} {'%clean':>6} {'xMMAfl':>6} {'vs naive':>8} {'vs abs':>7} targets")


def format_kernel_row(r):
    def f(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else format("-", spec.split(".")[0].rstrip("f"))
    tg = " ".join(("ok" if t["met"] else "MISS") for t in r["targets"])
    return (f"{r['H']:>4} {r['B']:>3} {r['L'] // 1024:>6}k {f(r.get('naive_ms'), '>9.3f')} "
            f"{f(r.get('absorbed_ms'), '>9.3f')} {f(r.get('ours_ms'), '>8.3f')} {f(r.get('kernel_ms'), '>9.4f')} "
            f"{f(r.get('kernel_gbs'), '>6.0f')} {f(r.get('kernel_pct_copy'), '>6.1f')} "
            f"{f(r.get('kernel_pct_copy_clean_flush'), '>6.1f')} "
            f"{f(r.get('kernel_x_mma_floor'), '>6.2f')} {f(r.get('speedup_vs_naive'), '>8.1f')} "
            f"{f(r.get('speedup_vs_absorbed'), '>7.2f')} {tg}")


# ----------------------------------------------------------------------------- memory

def bench_memory(argv):
    on_gpu = torch.cuda.is_available()
    cfg = parse_flags(MemoryFlags, "memory", argv)
    lengths = int_list("memory", "lengths", cfg.lengths)
    import dataclasses
    names = [p for p in cfg.presets.split(",") if p]
    for p in names:
        if p not in M.PRESETS:
            die(f"memory: unknown preset {p!r} (choose from {', '.join(M.PRESETS)})")
    dtype, elt = torch.bfloat16, 2
    device = "cuda" if on_gpu else "cpu"
    card = card_name()
    rows = []
    for p in names:
        base = M.PRESETS[p]
        L, H, R, Pe, Dv = (base.num_hidden_layers, base.num_attention_heads, base.kv_lora_rank,
                           base.qk_rope_head_dim, base.v_head_dim)
        variants = {  # attn -> (config whose cache model.new_cache allocates, our own closed form)
            "mla": (dataclasses.replace(base, attn="mla"), L * elt * (R + Pe)),
            "mha": (dataclasses.replace(base, attn="mha", num_key_value_heads=None), L * elt * 2 * H * Dv),
            "gqa": (dataclasses.replace(base, attn="mha", num_key_value_heads=4), L * elt * 2 * 4 * Dv),
        }
        for attn, (c, closed) in variants.items():
            formula = M.kv_bytes_per_token(base, attn=attn, dtype=dtype)
            row = dict(preset=p, attn=attn, layers=L, heads=H, kv_heads={"mla": None, "mha": H, "gqa": 4}[attn],
                       bytes_per_token_formula=formula, bytes_per_token_closed_form=closed,
                       formula_agrees=formula == closed, gb_at_1m_tokens=formula * (1 << 20) / 1e9, measured={})
            for n in lengths:
                if on_gpu:
                    torch.cuda.synchronize()
                    a0, r0 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
                    cache = M.new_cache(c, 1, n, page=cfg.page, dtype=dtype, device=device)
                    torch.cuda.synchronize()
                    got = torch.cuda.memory_allocated() - a0
                    reserved = torch.cuda.memory_reserved() - r0
                else:
                    cache = M.new_cache(c, 1, n, page=cfg.page, dtype=dtype, device=device)
                    got = reserved = sum(t.numel() * t.element_size() for t in (cache.kv, cache.block_table, cache.seq_lens))
                kv_bytes = cache.kv.numel() * cache.kv.element_size()
                row["measured"][str(n)] = dict(allocated_bytes=got, reserved_bytes=reserved, kv_tensor_bytes=kv_bytes,
                                               bytes_per_token=got / n)
                del cache
                if on_gpu:
                    torch.cuda.empty_cache()
            rows.append(row)
    mla = {r["preset"]: r["bytes_per_token_formula"] for r in rows if r["attn"] == "mla"}
    print(f"KV cache per token, all layers, bf16 ({'CUDA allocator' if on_gpu else 'CPU tensor bytes'}; {card})")
    print(f"{'preset':<6} {'attn':<4} {'formula B/tok':>13} {'x MLA':>6} {'GB @1M':>7} "
          + " ".join(f"{'meas B/tok @' + str(n):>17}" for n in lengths))
    for r in rows:
        r["x_mla"] = r["bytes_per_token_formula"] / mla[r["preset"]]
        print(f"{r['preset']:<6} {r['attn']:<4} {r['bytes_per_token_formula']:>13,} {r['x_mla']:>6.2f} "
              f"{r['gb_at_1m_tokens']:>7.2f} " + " ".join(f"{r['measured'][str(n)]['bytes_per_token']:>17,.1f}"
                                                         for n in lengths)
              + ("" if r["formula_agrees"] else "  FORMULA MISMATCH"))
    result = {"provenance": provenance(card), "dtype": "bfloat16", "page": cfg.page,
              "notes": "formula: model.kv_bytes_per_token (checked against the closed forms MLA 2*(R+P)*layers, "
                       "MHA 2*2*H*v_head_dim*layers, GQA 2*2*4*v_head_dim*layers). measured: allocation of "
                       "model.new_cache for one row of n tokens (CUDA allocator delta on GPU, tensor bytes on CPU), "
                       "divided by n; includes page rounding and the block table.",
              "rows": rows}
    write_json(cfg.out or os.path.join(ROOT, "results", f"bench_memory_{card_slug(card)}.json"), result)


# ----------------------------------------------------------------------------- train

def bench_train(argv):
    """Training throughput and MFU of train.py itself: `torchrun --nproc_per_node=N train.py` for each N, FSDP2
    (also at N=1) and DDP (N >= 2), with and without torch.compile, on random tokens. tokens/s is the median of
    the logged intervals after the first (compile and warm-up); scaling efficiency = per-GPU tokens/s at N over
    per-GPU tokens/s at 1."""
    cfg = parse_flags(TrainFlags, "train", argv)
    import shutil
    import tempfile
    import numpy as np
    gpus = int_list("train", "gpus", cfg.gpus)
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda and max(gpus) > torch.cuda.device_count():
        die(f"train: --gpus={cfg.gpus} but only {torch.cuda.device_count()} GPUs are visible")
    card = card_name() if cuda else "CPU"
    mm = cfg.matmul_tflops or (measure_ceilings(100)[1] if cuda else 0.0)
    topo = ""   # how the GPUs connect (NVLink/NVSwitch or PCIe) decides multi-GPU scaling: keep it with the numbers
    if cuda and max(gpus) > 1 and shutil.which("nvidia-smi"):
        topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True).stdout
        print(topo, flush=True)
    tmp = tempfile.mkdtemp(prefix="bench-train-")
    data = os.path.join(tmp, "tokens.bin")   # random tokens: throughput does not depend on the text
    np.random.default_rng(0).integers(0, 264, 8 * 1024 * 1024, dtype=np.uint16).tofile(data)
    rows = []

    def dump():   # after every run: a call cut short keeps what it measured
        for r in rows:
            # against one GPU: the N=1 run (FSDP over a world of 1 shards nothing) with the same compile setting
            base = next((b for b in rows if b["compile"] == r["compile"] and b["gpus"] == 1 and b["status"] == "ok"),
                        None)
            if r["status"] == "ok" and base:
                r["scaling_efficiency"] = r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
        write_json(cfg.out or os.path.join(ROOT, "results", f"bench_train_{card_slug(card)}.json"),
                   {"provenance": provenance(card), "preset": cfg.preset, "seq_len": cfg.seq_len,
                    "batch_size_per_gpu": cfg.batch_size, "matmul_tflops": mm, "gpu_topology": topo,
                    "notes": "train.py under torchrun: FSDP2 (fully_shard per block, then root; bf16 params, fp32 "
                             "reduce) for every N, including N=1; DDP (--parallel=ddp: fp32 replica, bf16 autocast) for "
                             "N >= 2. MFU = model.flops_per_token (6N + 6*L*H*(qk+v)*T) x tokens/s over the card's dense "
                             "bf16 peak (989 TFLOP/s H100/H200 SXM), and over the measured matmul rate.",
                    "rows": rows})

    try:
        runs = [(comp, par, n) for comp in cfg.compile.split(",") for par in cfg.parallel.split(",")
                for n in gpus if par == "fsdp" or n > 1]
        for comp, par, n in runs:
            out_dir = os.path.join(tmp, f"run-{n}-{comp}-{par}")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   os.path.join(ROOT, "train.py"),
                   f"--preset={cfg.preset}", f"--data={data}", f"--seq_len={cfg.seq_len}",
                   f"--batch_size={cfg.batch_size}", f"--max_iters={cfg.iters}", "--warmup_iters=5",
                   f"--log_interval={cfg.log_interval}", f"--compile={comp}", "--eval_samples=0",
                   "--ckpt_interval=-1", f"--device={'cuda' if cuda else 'cpu'}", f"--out_dir={out_dir}",
                   f"--parallel={par}"]
            if mm:
                cmd.append(f"--matmul_tflops={mm}")
            print("torchrun " + " ".join(cmd[3:]), flush=True)
            r = subprocess.run(cmd, capture_output=True, text=True)
            log = os.path.join(out_dir, "log.jsonl")
            if r.returncode != 0 or not os.path.exists(log):
                rows.append(dict(gpus=n, compile=comp, parallel=par, status=f"failed (exit {r.returncode}): "
                                                               f"{(r.stderr or r.stdout).strip()[-300:]}"))
                print(f"  failed: {rows[-1]['status']}", flush=True)
            else:
                recs = [json.loads(line) for line in open(log)][1:]     # the first interval holds compilation
                med = lambda k: sorted(x[k] for x in recs)[len(recs) // 2] if recs and k in recs[0] else None
                rows.append(dict(gpus=n, compile=comp, parallel=par, status="ok", tokens_per_s=med("tokens_per_s"),
                                 tokens_per_s_per_gpu=med("tokens_per_s_per_device"), mfu=med("mfu"),
                                 mfu_measured_matmul=med("mfu_measured"), intervals=len(recs)))
            dump()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'N':>3} {'mode':>5} {'compile':>7} {'tokens/s':>10} {'per GPU':>10} {'MFU':>6} {'scaling':>8}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['gpus']:>3} {r['parallel']:>5} {r['compile']:>7}  {r['status'][:80]}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        eff = f"{100 * r['scaling_efficiency']:.0f}%" if r.get("scaling_efficiency") else "-"
        print(f"{r['gpus']:>3} {r['parallel']:>5} {r['compile']:>7} {r['tokens_per_s']:>10,.0f} {r['tokens_per_s_per_gpu']:>10,.0f} "
              f"{mfu:>6} {eff:>8}")


# ----------------------------------------------------------------------------- serve: the load generator
# For `bench.py serve` and the robustness run: plain threads and http.client (stdlib only, so it also runs
# where the server's web stack is not installed), one connection per request as a real client fleet.
def client_request(url, path, body, api_key=None, timeout=600.0, hang_up_after=None):
    """POST one request and time it. With body["stream"], every server-sent event is timestamped: TTFT is
    the first chunk, ITLs the gaps between chunks. hang_up_after=k closes the socket after k chunks (or, for a
    whole answer, after k/10 seconds): a client that goes away. Returns a dict; never raises."""
    import http.client
    import urllib.parse
    u = urllib.parse.urlsplit(url)
    rec = {"status": None, "ttft": None, "itl": [], "prompt_tokens": 0, "completion_tokens": 0, "error": None,
           "done": False, "hung_up": False}
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        conn.request("POST", path, body=data, headers=headers)
        if hang_up_after is not None and not (isinstance(body, dict) and body.get("stream")):
            time.sleep(hang_up_after / 10)
            rec["hung_up"] = True
            return rec
        resp = conn.getresponse()
        rec["status"] = resp.status
        if resp.status != 200 or not (isinstance(body, dict) and body.get("stream")):
            raw = resp.read()
            reply = json.loads(raw) if raw[:1] == b"{" else {}
            rec["error"] = None if resp.status == 200 else raw[:300].decode(errors="replace")
            u_ = reply.get("usage") or {}
            rec["prompt_tokens"], rec["completion_tokens"] = u_.get("prompt_tokens", 0), u_.get("completion_tokens", 0)
            rec["done"] = resp.status == 200
            rec["latency"] = time.perf_counter() - t0
            rec["ttft"] = rec["latency"] if resp.status == 200 else None
            return rec
        last, chunks = None, 0
        while True:
            line = resp.readline()
            if not line:
                rec["error"] = "stream ended without [DONE]"
                break
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                rec["done"] = True
                break
            obj = json.loads(payload)
            if "error" in obj:
                rec["error"] = str(obj["error"])[:300]
            if obj.get("usage"):
                rec["prompt_tokens"] = obj["usage"]["prompt_tokens"]
                rec["completion_tokens"] = obj["usage"]["completion_tokens"]
            if obj.get("choices"):
                now = time.perf_counter()
                if last is None:
                    rec["ttft"] = now - t0
                else:
                    rec["itl"].append(now - last)
                last, chunks = now, chunks + 1
                if hang_up_after is not None and chunks >= hang_up_after:
                    rec["hung_up"] = True
                    break
        rec["latency"] = time.perf_counter() - t0
    except (OSError, http.client.HTTPException, ValueError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        if rec["hung_up"] and conn.sock is not None:
            conn.sock.shutdown(2)   # SHUT_RDWR: the server sees the disconnect now, not at garbage collection
        conn.close()
    return rec


def run_load(url, make_request, concurrency, duration=None, num_requests=None, api_key=None, procs=1):
    """`concurrency` client threads, each sending make_request(i) -> (path, body, hang_up_after) back to back,
    for `duration` seconds or until num_requests have been sent. Returns (records, wall seconds).
    procs > 1 (with num_requests): the threads are spread over that many processes. One process of 64
    threads used 0.86 of a core on an H100 host, sent a round's 64 requests over 35-47 ms and read chunks
    in bursts (ITL p50 0.03 ms): its own GIL paced the server it measures."""
    # this process imports torch: a full garbage collection walks all it left (serve.py's took 140-173 ms) and
    # stalls every client thread at once. Those objects live on anyway: frozen, no collection looks at them
    gc.freeze()
    try:
        return _run_load(url, make_request, concurrency, duration, num_requests, api_key, max(1, min(procs, concurrency)))
    finally:
        gc.unfreeze()   # collectable again (frozen objects outlive even interpreter exit)


def _run_load(url, make_request, concurrency, duration, num_requests, api_key, procs):
    if procs == 1 or num_requests is None:
        counter, lock = iter(range(10 ** 9)), threading.Lock()

        def take():
            with lock:
                return next(counter)

        t0 = time.perf_counter()
        records = _clients(url, make_request, concurrency, take, t0, duration, num_requests, api_key)
        return records, time.perf_counter() - t0
    import queue as queue_
    reqs = [make_request(i) for i in range(num_requests)]   # made here: make_request need not pickle
    t_ask, before = time.perf_counter(), _POOLS.get(procs)
    ps, jobs, counter, start, done = pool = _load_pool(procs)
    counter.value = 0
    for k, q in enumerate(jobs):
        q.put((url, reqs, concurrency // procs + (k < concurrency % procs), api_key))
    try:
        start.wait(timeout=300)   # every process has its job before the clock starts
        t0, results = time.perf_counter(), []
        while len(results) < procs:
            try:
                results.append(done.get(timeout=1.0))
            except queue_.Empty:
                if any(p.exitcode is not None for p in ps):
                    raise RuntimeError("a load generator process died") from None
    except BaseException:
        for p in ps:
            p.kill()
        _POOLS.pop(procs, None)
        raise
    # on an H100 host starting 8 processes took 9-60 s a level, around loads of 0.5-2 s: they are kept
    print(f"load generator: {procs} processes {'reused' if pool is before else 'started'}, ready in {t0 - t_ask:.1f} s, "
          f"load {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return [r for recs, _ in results for r in recs], max(end for _, end in results) - t0


_POOLS = {}   # procs -> the load generator's processes and queues, kept across run_load calls


def _load_pool(procs):
    pool = _POOLS.get(procs)
    if pool is None or not all(p.is_alive() for p in pool[0]):
        import multiprocessing as mp
        ctx = mp.get_context("spawn")   # not fork: this process may hold a CUDA context and threads of its own
        counter, start, done, jobs = ctx.Value("q", 0), ctx.Barrier(procs + 1), ctx.Queue(), [ctx.Queue() for _ in range(procs)]
        # daemons: multiprocessing ends them when this process exits
        ps = [ctx.Process(target=_load_process, daemon=True, args=(q, counter, start, done)) for q in jobs]
        for p in ps:
            p.start()
        _POOLS[procs] = pool = (ps, jobs, counter, start, done)
    return pool


def _load_process(jobs, counter, start, done):
    """One process of run_load: for each job, `threads` clients taking request numbers from the shared counter."""
    gc.freeze()

    def take():
        with counter.get_lock():
            counter.value += 1
            return counter.value - 1

    while True:
        url, reqs, threads, api_key = jobs.get()
        start.wait()
        records = _clients(url, reqs.__getitem__, threads, take, time.perf_counter(), None, len(reqs), api_key)
        done.put((records, time.perf_counter()))   # perf_counter is CLOCK_MONOTONIC: one clock for all processes


def _clients(url, make_request, threads, take, t0, duration, num_requests, api_key):
    records, lock = [], threading.Lock()

    def client():
        while True:
            i = take()
            if (num_requests is not None and i >= num_requests) or (duration is not None and time.perf_counter() - t0 > duration):
                return
            path, body, hang_up = make_request(i)
            rec = client_request(url, path, body, api_key, hang_up_after=hang_up)
            rec["i"], rec["pid"] = i, os.getpid()
            with lock:
                records.append(rec)

    pool = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return records


def pct(xs, q):
    """The q-th percentile of seconds xs, in ms (None when empty)."""
    xs = sorted(xs)
    return round(1e3 * xs[min(len(xs) - 1, int(q / 100 * len(xs)))], 3) if xs else None


def status(r):
    return "hung_up" if r["hung_up"] else str(r["status"]) if r["status"] else "no_response"


def summarize(records, wall):
    """Throughput (generated tokens / wall second), TTFT and ITL percentiles in ms, status counts."""
    ok = [r for r in records if r["done"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [x for r in ok for x in r["itl"]]
    # time per output token after the first, per request: under load serve.py sends what waits as one chunk
    # (an ITL is a gap between chunks, as vLLM's benchmark counts it), so this is the per-token view
    tpot = [(r["latency"] - r["ttft"]) / (r["completion_tokens"] - 1) for r in ok
            if r["itl"] and r["completion_tokens"] > 1]
    statuses = {}
    for r in records:
        statuses[status(r)] = statuses.get(status(r), 0) + 1
    gen = sum(r["completion_tokens"] for r in ok)
    return {"requests": len(records), "completed": len(ok), "statuses": statuses, "wall_s": round(wall, 3),
            "generated_tokens": gen, "prompt_tokens": sum(r["prompt_tokens"] for r in ok),
            "throughput_tok_s": round(gen / wall, 2) if wall else None,
            "ttft_ms": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)}, "itl_ms": {"p50": pct(itl, 50), "p99": pct(itl, 99)},
            "tpot_ms": {"p50": pct(tpot, 50), "p99": pct(tpot, 99)},
            "errors": sorted({r["error"] for r in records if r["error"]})[:10]}


def spawn_server(flags, log_path, timeout=180, command=None, env=None):
    """`python serve.py FLAGS --port=<free>` on loopback, returned once /health answers: (process, base URL).
    command: what to run instead of `python serve.py` (a probe's wrapper); env: its environment."""
    import socket
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_path, "w")
    proc = subprocess.Popen([*(command or [sys.executable, os.path.join(ROOT, "serve.py")]), f"--port={port}",
                             "--host=127.0.0.1", *flags], stdout=subprocess.DEVNULL, stderr=log, env=env)
    url, t0 = f"http://127.0.0.1:{port}", time.time()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"serve.py exited with {proc.returncode}; see {log_path}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return proc, url
        except OSError:
            if time.time() - t0 > timeout:
                proc.kill()
                raise RuntimeError(f"serve.py did not come up in {timeout} s; see {log_path}")
            time.sleep(0.3)


def wait_idle(url, timeout=300):
    """/metrics once nothing runs or waits (or after timeout seconds)."""
    t0 = time.time()
    while True:
        m = scrape(url)
        if m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0 or time.time() - t0 > timeout:
            return m
        time.sleep(0.5)


def scrape(url):
    """/metrics as {name or name|label=value: float} (model_name left out of the key)."""
    import re
    import urllib.request
    out = {}
    for line in urllib.request.urlopen(url + "/metrics", timeout=30).read().decode().splitlines():
        m = re.match(r"^([\w:]+)(?:\{([^}]*)\})? (\S+)$", line)
        if m:
            labels = [f"{k}={v}" for k, v in re.findall(r'(\w+)="([^"]*)"', m.group(2) or "") if k != "model_name"]
            out[m.group(1) + ("|" + ",".join(labels) if labels else "")] = float(m.group(3))
    return out


def bench_serve(argv):
    """Serving load: serve.py started as a subprocess on loopback, closed-loop clients at each concurrency
    (every client sends its next request when the last one is done): generated tokens/s, time to first token
    and inter-token latency (p50, p99, from the streamed chunks). Baseline: the same prompts through
    transformers' generate on the exported model, in static batches of `concurrency` rows (padded on the left
    when lengths differ; here they are equal). Random weights unless --ckpt: speed does not depend on them
    (ignore_eos makes every request generate exactly --max_tokens). --robustness=1 runs the robustness
    scenario instead (200 clients for 60 s + schemathesis, results/serve_robustness.json)."""
    import tempfile
    cfg = parse_flags(ServeFlags, "serve", argv)
    levels = int_list("serve", "concurrency", cfg.concurrency)
    if cfg.preset not in M.PRESETS:
        die(f"serve: --preset={cfg.preset!r}: choose one of {', '.join(M.PRESETS)}")
    if cfg.client_procs < 0:
        die(f"serve: --client_procs={cfg.client_procs}: must be >= 0 (0: one per 2 CPU cores)")
    tmp = tempfile.mkdtemp(prefix="bench-serve-")
    ckpt = cfg.ckpt
    if not ckpt:
        ckpt = os.path.join(tmp, "ckpt.pt")
        torch.manual_seed(0)
        M.save_checkpoint(ckpt, M.Transformer(M.PRESETS[cfg.preset]))
    elif not os.path.exists(ckpt):
        die(f"serve: --ckpt={ckpt}: no such file or folder")
    card = card_name()
    if cfg.robustness:
        res = serve_robustness(ckpt, cfg.out or os.path.join(ROOT, "results", "serve_robustness.json"),
                               cfg.clients, cfg.duration, cfg.examples)
        sys.exit(0 if res["pass"] else 1)
    P, T = cfg.prompt_len, cfg.max_tokens
    g = torch.Generator().manual_seed(0)
    n_req = {c: c * cfg.rounds for c in levels}
    prompts = [torch.randint(0, 256, (P,), generator=g).tolist() for _ in range(max(n_req.values()))]
    flags = [f"--ckpt={ckpt}", f"--dtype={cfg.dtype}", f"--page={cfg.page}", f"--max_num_seqs={max(levels)}",
             f"--max_model_len={P + T}", f"--kv_cache_tokens={max(levels) * (P + T + cfg.page)}",
             f"--max_num_batched_tokens={max(8192, max(levels))}", "--served_model_name=bench", *cfg.server_args.split()]
    rows, procs = [], cfg.client_procs or min(8, max(1, (os.cpu_count() or 2) // 2))
    phase_s, t0 = {}, time.perf_counter()   # where a run's minutes go (device time is scarce): seconds per phase

    def phase(name):
        nonlocal t0
        phase_s[name], t0 = round(time.perf_counter() - t0, 1), time.perf_counter()
    # Batch-1 decode reads every weight once per token: its roofline is weight bytes x tokens/s over the
    # measured copy bandwidth (16-bit weights: what serve.py's --dtype=auto picks on CUDA).
    n_params = sum(p.numel() for p in M.load_checkpoint(ckpt).parameters())
    copy_gbs = measure_ceilings(200)[0] if torch.cuda.is_available() else None

    def pct_roofline(ms_per_token):
        return round(100 * 2 * n_params / (ms_per_token / 1e3) / (copy_gbs * 1e9), 1)

    def targets():
        by = {(r["engine"], r.get("concurrency")): r for r in rows}
        t = {"weight_bytes": 2 * n_params, "copy_GBps": copy_gbs}
        if ("serve.py", 1) in by and copy_gbs and by["serve.py", 1]["itl_ms"]["p50"]:
            t["batch1_decode_pct_roofline"] = pct_roofline(by["serve.py", 1]["itl_ms"]["p50"])
        c = max(levels)
        if ("serve.py", c) in by and ("transformers.generate", c) in by:
            t[f"speedup_c{c}"] = round(by["serve.py", c]["throughput_tok_s"] / by["transformers.generate", c]["throughput_tok_s"], 2)
        return t

    def dump():   # after every level: a call cut short keeps what it measured
        result = {"provenance": provenance(card), "targets": targets(),
                  "config": {**asdict(cfg), "ckpt": cfg.ckpt or f"random {cfg.preset}",
                             "server_flags": flags[1:], "requests": n_req, "client_processes": procs},
                  "notes": "closed-loop clients (threads over client_processes processes) over loopback HTTP (server-sent events, one chunk per token); TTFT includes "
                           "queueing; ITL = gaps between chunks as the client sees them. transformers: static batches "
                           "of `concurrency` rows, timestamps from a logits processor (one call per generated token, "
                           "after a device sync); its TTFT is the batch's prefill.", "phase_s": phase_s,
                  "server_startup": server_startup, "rows": rows}
        write_json(cfg.out or os.path.join(ROOT, "results", f"bench_serve_{card_slug(card)}.json"), result)

    proc, url = spawn_server(flags, os.path.join(tmp, "server.log"), timeout=480)   # CUDA: compile + capture first
    phase("setup_and_server_start")
    with open(os.path.join(tmp, "server.log")) as f:   # its own lines: what it built and how long capture took
        server_startup = [line.strip() for line in f if line.startswith("serve.py:")]
    try:
        def body(i):
            return ("/v1/completions", {"prompt": prompts[i % len(prompts)], "max_tokens": T, "temperature": 0,
                                        "ignore_eos": True, "stream": True, "return_token_ids": True,
                                        "stream_options": {"include_usage": True}}, None)
        run_load(url, body, max(levels), num_requests=max(levels), procs=procs)   # warm-up: CUDA context, Triton JIT
        phase("warm_up")
        for c in levels:
            recs, wall = run_load(url, body, c, num_requests=n_req[c], procs=procs)
            rows.append({"engine": "serve.py", "concurrency": c, **summarize(recs, wall)})
            phase(f"serve_c{c}")
            print(serve_line(rows[-1]), flush=True)
            dump()
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    if cfg.baseline:
        hf_generate_baseline(ckpt, tmp, prompts, levels, n_req, T, cfg.dtype, rows, dump)
        phase("baseline")
        dump()
    if torch.cuda.is_available():   # last: a CUDA error here poisons the process
        engine = engine_decode(flags, prompts[0], T, torch.device("cuda"), torch.bfloat16)
        for row in engine.values() if copy_gbs else ():
            row.update({k.replace("ms", "pct_roofline"): pct_roofline(row[k])
                        for k in ("graph_replay_ms", "engine_step_ms") if row.get(k)})
        rows.append({"engine": "serve.Engine in-process, batch 1", **engine})
        phase("engine_in_process")
        print(f"engine in-process, batch 1: {engine}", flush=True)
        dump()


def engine_decode(flags, prompt, T, dev, dtype):
    """CUDA only. Batch-1 decode without HTTP, through serve.py's fused decode (its default), its torch.compile'd decode
    blocks and eager ones: serve.Engine
    stepped in this process for one greedy request (median step time while it decodes), the bucket-1 CUDA graph
    replayed alone (do_bench median), and that graph's logits against the plain eager forward on the same input
    (correctness). What the engine's Python and the server's streaming add on top of the GPU's step."""
    import serve
    import triton.testing
    scfg = serve.parse_args(flags)
    model = serve.load_model(scfg, dev, dtype)
    serve.size_cache(scfg, model.config, dev, dtype)
    out = {}
    for variant in ("fused", "compiled", "eager"):
        scfg.fused_decode, scfg.compile = variant == "fused", variant != "eager"
        eng = serve.Engine(model, scfg)
        t0 = time.perf_counter()
        eng.capture_graphs([1])
        capture_s = time.perf_counter() - t0
        r = eng.submit(prompt, serve.SamplingParams(max_tokens=T, temperature=0.0, ignore_eos=True))
        stamps = []
        while r.finish_reason is None:
            eng.step()
            stamps.append(time.perf_counter())
        steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]    # decode steps (the first stamp ends the prefill)
        row = {"compiled_blocks": eng.layers is not None, "capture_s": round(capture_s, 1),
               "engine_step_ms": pct(steps, 50), "decode_steps": len(steps)}
        if eng.use_graphs:   # a replay of the blocks advances the static lengths (seq_lens += 1): reset them each time
            st, n = eng.static, torch.tensor([len(prompt)], dtype=torch.int32, device=dev)
            with torch.inference_mode():   # the engine's buffers are inference tensors
                row["graph_replay_ms"] = round(triton.testing.do_bench(
                    lambda: (st["lens"][:1].copy_(n), eng.graphs[1]()), warmup=20, rep=500, return_mode="median"), 4)
                st["lens"][:1].copy_(n)
                got = eng.graphs[1]().float()
                want = model(st["idx"][:1], cache=M.Cache(eng.kv, st["table"][:1], n.clone()))[:, -1].float()
            row["vs_eager_forward"] = {"max_abs_logit_diff": round((got - want).abs().max().item(), 4),
                                       "logit_scale": round(want.abs().max().item(), 3),
                                       "same_argmax": bool((got.argmax(-1) == want.argmax(-1)).all())}
        out[variant] = row
        del eng
        torch.cuda.empty_cache()
    return out


def serve_line(row):
    return (f"{row['engine'][:12]:<12} c={row['concurrency']:<4} {row['throughput_tok_s']:>10.1f} tok/s  TTFT p50/p99 "
            f"{row['ttft_ms']['p50']}/{row['ttft_ms']['p99']} ms  ITL p50/p99 {row['itl_ms']['p50']}/"
            f"{row['itl_ms']['p99']} ms  {row.get('statuses', '')}").rstrip()


def hf_generate_baseline(ckpt, tmp, prompts, levels, n_req, T, dtype, rows, dump):
    """transformers' generate on `serve.py --export`: greedy, exactly T new tokens, batches of c prompts.
    Appends a row per level to `rows` and calls dump() after each."""
    import transformers
    out = os.path.join(tmp, "hf")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), f"--ckpt={ckpt}", f"--export={out}"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        print(f"baseline skipped: export failed: {p.stderr.strip()}", file=sys.stderr)
        rows.append({"engine": "transformers.generate", "skipped": p.stderr.strip()})
        return dump()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = {"auto": torch.bfloat16 if dev == "cuda" else torch.float32, "float32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}[dtype]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dt).to(dev).eval()

    class Clock(transformers.LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            if dev == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            return scores

    def run(batch):
        clock = Clock()
        ids = torch.tensor(batch, device=dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=T, min_new_tokens=T, do_sample=False,
                        pad_token_id=M.PAD, logits_processor=transformers.LogitsProcessorList([clock]))
        return t0, clock.times

    run(prompts[:2])   # warm-up
    gc.freeze()   # as serve.py's processes do: no full collection walks torch's and transformers' objects mid-run
    for c in levels:
        ttft, itl, gen, t_start = [], [], 0, time.perf_counter()
        for s in range(0, n_req[c], c):
            t0, times = run(prompts[s:s + c])
            ttft += [times[0] - t0] * c
            itl += [b - a for a, b in zip(times, times[1:])] * c
            gen += c * len(times)
        wall = time.perf_counter() - t_start
        rows.append({"engine": "transformers.generate", "concurrency": c, "requests": n_req[c],
                     "wall_s": round(wall, 3), "generated_tokens": gen, "throughput_tok_s": round(gen / wall, 2),
                     "ttft_ms": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)},
                     "itl_ms": {"p50": pct(itl, 50), "p99": pct(itl, 99)}})
        print(serve_line(rows[-1]), flush=True)
        dump()


def robustness_request(i, name, max_model_len):
    """Request i of the robustness mix (a pure function of i): valid completions and chats of every shape,
    clients that hang up mid-stream or mid-wait, and bad input. -> (kind, path, body, hang_up_after)."""
    import random
    rng = random.Random(i)
    kind = rng.choices(["completion", "chat", "hangup_stream", "hangup_wait", "bad"], [40, 25, 12, 8, 15])[0]
    alphabet = "abcdefghij klmnop\n.,?!0123456789éß中文🙂" + "\x00\t"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200)))
    if rng.random() < 0.1:
        text += "<|im_end|><|endoftext|>"
    opt = {"max_tokens": rng.randint(1, 48), "temperature": rng.choice([0.0, 0.7, 1.0, 1.5]),
           "top_p": rng.choice([None, 0.9, 0.3]), "top_k": rng.choice([None, 0, 1, 20]),
           "seed": rng.choice([None, rng.randrange(2 ** 32)]), "stop": rng.choice([None, "a", ["\n", "xy"], []]),
           "stream": rng.random() < 0.5, "ignore_eos": rng.random() < 0.5,
           "repetition_penalty": rng.choice([None, 1.1]), "presence_penalty": rng.choice([None, 0.5])}
    opt = {k: v for k, v in opt.items() if v is not None}
    if opt["stream"] and rng.random() < 0.5:
        opt["stream_options"] = {"include_usage": True}
    chat = {"model": name, "messages": [{"role": r, "content": text[:rng.randint(1, 60)]}
                                        for r in rng.sample(["system", "user", "assistant"], rng.randint(1, 3))]}
    if kind in ("completion", "hangup_stream", "hangup_wait"):
        body, path = {"model": name, "prompt": text, **opt}, "/v1/completions"
        if rng.random() < 0.5:
            body, path = {**chat, **opt}, "/v1/chat/completions"
        if kind == "completion":
            return kind, path, body, None
        body.update(max_tokens=rng.randint(100, 250), ignore_eos=True, stream=kind == "hangup_stream")
        return kind, path, body, rng.randint(1, 5)
    if kind == "chat":
        return kind, "/v1/chat/completions", {**chat, **opt}, None
    bad = [b'{"prompt": "unterminated', b"\xff\xfe\x00", b"[]", b"null", b'{"prompt": "x", "max_tokens": 1e999}',
           {"prompt": text, "max_tokens": -1}, {"prompt": text, "max_tokens": 10 ** 12}, {"prompt": 12},
           {"prompt": text, "model": "no-such-model"}, {"prompt": "y" * (2 * max_model_len)},
           {"prompt": text, "temperature": "hot"}, {"prompt": [1, 2, -3]}, {"prompt": [10 ** 9]},
           {"prompt": text, "n": 4}, {"prompt": text, "top_p": 0}, {"prompt": text, "stop": [1, 2]},
           {"messages": []}, {"messages": [{"role": "robot", "content": "hi"}]}, {"messages": "hi"},
           {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}]
    body = rng.choice(bad)
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    return kind, path, body, None


def serve_robustness(ckpt, out, clients=200, duration=60.0, examples=100):
    """The robustness run (minutes, so not a test): `clients` concurrent clients for `duration` seconds of the
    mix above, then schemathesis against the OpenAPI schema (all its checks). Pass: zero 5xx (seen by clients
    and counted by the server), no client left without an answer, zero blocks held once the engine is idle."""
    import shutil
    import tempfile
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")   # a venv's python, not activated
    st = shutil.which("st", path=path) or shutil.which("schemathesis", path=path)
    if st is None:
        die("serve: --robustness=1 needs schemathesis (pip install schemathesis)")
    key, name = "sk-robustness", "ic-robust"
    flags = [f"--ckpt={ckpt}", f"--api_key={key}", f"--served_model_name={name}", "--max_model_len=512",
             "--kv_cache_tokens=2048", "--page=16", "--max_num_seqs=64"]   # a contended pool: preemptions
    log = os.path.join(tempfile.mkdtemp(prefix="ic-robust-"), "server.log")
    proc, url = spawn_server(flags, log)
    num_blocks = 2048 // 16
    try:
        kinds = {}

        def make(i):
            kind, path, body, hang = robustness_request(i, name, 512)
            kinds[kind] = kinds.get(kind, 0) + 1
            return path, body, hang

        print(f"robustness: {clients} clients for {duration:.0f} s against {url}", file=sys.stderr, flush=True)
        records, wall = run_load(url, make, clients, duration=duration, api_key=key)
        for r in records:
            r["kind"] = robustness_request(r["i"], name, 512)[0]
        m = wait_idle(url)   # let the engine finish what is still running, then count the blocks still held
        load = summarize([r for r in records if r["kind"] in ("completion", "chat")], wall)
        by_kind = {}
        for r in records:
            by_kind.setdefault(r["kind"], {}).setdefault(status(r), 0)
            by_kind[r["kind"]][status(r)] += 1
        bad_valid = [r for r in records if r["kind"] in ("completion", "chat") and not r["done"]]
        load.update(statuses_by_kind=by_kind, client_5xx=sum(1 for r in records if (r["status"] or 0) >= 500),
                    no_response=sum(1 for r in records if r["status"] is None and not r["hung_up"]),
                    valid_requests_not_completed=len(bad_valid),
                    leaked_blocks_after=round(m["vllm:kv_cache_usage_perc"] * num_blocks),
                    aborted_by_engine=m.get("vllm:request_success_total|finished_reason=abort", 0),
                    preemptions=m["vllm:num_preemptions_total"],
                    server_statuses={k.split("=")[1]: v for k, v in m.items() if k.startswith("http_requests_total|")})
        print(f"robustness: load done: {json.dumps({k: load[k] for k in ('requests', 'client_5xx', 'leaked_blocks_after')})}",
              file=sys.stderr, flush=True)
        # schemathesis: every operation of the OpenAPI schema, generated valid and invalid input, all checks
        before = scrape(url)
        cmd = [st, "run", url + "/openapi.json", "--checks=all", f"--max-examples={examples}", "--workers=4",
               "--seed=0", "-H", f"Authorization: Bearer {key}", "--no-color", "--suppress-health-check=all",
               "--request-timeout=300", "--max-response-time=300"]   # 2 CPU cores: up to 512 tokens take a while
        shown = " ".join(c if "Bearer" not in c else "'Authorization: Bearer ***'" for c in cmd)
        print("robustness: " + shown, file=sys.stderr, flush=True)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600,
                           cwd=tempfile.mkdtemp(prefix="ic-st-"))   # it keeps a .schemathesis/ cache in its cwd
        after = wait_idle(url)
        summary = p.stdout[p.stdout.rfind("SUMMARY"):] if "SUMMARY" in p.stdout else p.stdout[-3000:]
        # the first lines of each failure / error schemathesis found (the full text is long)
        found = [ln.strip() for ln in p.stdout.splitlines()
                 if ln.strip().startswith(("- ST", "[4", "[5", "`{", "Network Error", "Runtime Error", "Inconsistent",
                                           "ReadTimeout", "Timeout", "Connection", "_" * 10))][:80]
        server_delta = {k.split("=")[1]: after[k] - before.get(k, 0) for k in after if k.startswith("http_requests_total|")}
        schem = {"command": shown,
                 "exit_code": p.returncode, "summary": summary.strip().splitlines(), "findings": found,
                 "server_statuses": {k: v for k, v in server_delta.items() if v},
                 "server_5xx": sum(v for k, v in server_delta.items() if k.startswith("5")),
                 "not_a_server_error_failures": summary.count("Server error"),
                 "leaked_blocks_after": round(after["vllm:kv_cache_usage_perc"] * num_blocks)}
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    res = {"provenance": provenance(card_name()), "config": {"clients": clients, "duration_s": duration,
                                                         "server_flags": [f for f in flags if key not in f],
                                                         "num_blocks": num_blocks, "schemathesis_examples": examples},
           "load": load, "schemathesis": schem,
           "pass": load["client_5xx"] == 0 and load["leaked_blocks_after"] == 0 and schem["server_5xx"] == 0
           and schem["leaked_blocks_after"] == 0 and load["no_response"] == 0}
    write_json(out, res)
    print(f"robustness: pass={res['pass']}", file=sys.stderr)
    return res


def _save_longctx(cfg, card, copy_gbs, mm_tflops, rows):
    """Written after every row: a 1M-token prefill takes minutes, and a killed run keeps what it measured."""
    result = {"provenance": provenance(card), "preset": cfg.preset, "dtype": "bfloat16", "chunk": cfg.chunk,
              "page": cfg.page, "copy_gbs": copy_gbs, "matmul_tflops": mm_tflops,
              "notes": "attention FLOPs = layers*H*(qk+v)*L*(L+1) (causal, QK and PV); attention TFLOP/s divides "
                       "them by the WHOLE prefill time (projections, MLP and cache gathers included), so it is a "
                       "lower bound on the attention kernels' rate. cache_bytes_measured: CUDA allocator delta of "
                       "model.new_cache; formula: model.kv_bytes_per_token * allocated slots.",
              "rows": rows}
    write_json(cfg.out or os.path.join(ROOT, "results", f"bench_longctx_{card_slug(card)}.json"), result)


def decode_times(model, tok, cache, steps, graph):
    """Median ms of one decode step (appending to the cache): eager, and replayed as a CUDA graph. Eager decode
    of a deep model is bound by Python launch overhead; the graph shows the GPU time. MLA decode is capturable
    (no host syncs on its path); the MHA baseline's decode reads the longest row length on the host, so eager only."""
    with torch.no_grad():
        eager = median_ms(lambda: model(tok, cache=cache), steps)
        if not graph:
            return eager, None
        g = capture(lambda: model(tok, cache=cache))          # one eager step on a side stream, then capture
        return eager, median_ms(g.replay, steps)


def bench_longctx(argv):
    """The 1b preset (random weights, bf16) on one GPU: chunked prefill of L tokens into the paged cache, then
    decode steps at that length (MLA: the fused kernel). The MHA baseline of the same width on the same grid,
    where it runs out of memory recorded with the KV bytes it would have needed."""
    cfg = parse_flags(LongctxFlags, "longctx", argv)
    if not torch.cuda.is_available():
        die("longctx: needs a CUDA GPU")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if cfg.preset not in M.PRESETS:
        die(f"longctx: unknown --preset={cfg.preset!r}: choose one of {', '.join(M.PRESETS)}")
    lengths, attns = int_list("longctx", "lengths", cfg.lengths), cfg.attn.split(",")
    if set(attns) - {"mla", "mha"}:
        die(f"longctx: --attn={cfg.attn!r}: expected mla and/or mha")
    card = card_name()
    copy_gbs, mm_tflops = measure_ceilings(100)
    rows = []
    for attn in attns:
        mcfg = M.ModelConfig(**{**asdict(M.PRESETS[cfg.preset]), "attn": attn})
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = M.Transformer(mcfg).to(torch.bfloat16).eval()
        qk = mcfg.qk_nope_head_dim + mcfg.qk_rope_head_dim if attn == "mla" else mcfg.v_head_dim
        with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # warm-up: kernels, cuBLAS, Triton compile
            warm = M.new_cache(mcfg, 1, 2 * cfg.chunk + 1, cfg.page, torch.bfloat16, "cuda")
            for s in range(2):
                model(torch.zeros(1, cfg.chunk, dtype=torch.long, device="cuda"), cache=warm)
        with torch.no_grad():
            model(torch.zeros(1, 1, dtype=torch.long, device="cuda"), cache=warm)
        del warm
        for L in lengths:
            row = dict(attn=attn, length=L, kv_bytes_formula=M.kv_bytes_per_token(mcfg, attn) * L)
            rows.append(row)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            row["free_bytes_before"], before = torch.cuda.mem_get_info()[0], torch.cuda.memory_allocated()
            try:
                cache = M.new_cache(mcfg, 1, L + 2 * cfg.decode_steps + 8, cfg.page, torch.bfloat16, "cuda")
            except torch.OutOfMemoryError:
                row["status"] = f"OOM allocating the cache: needs {row['kv_bytes_formula'] / 1e9:.1f} GB"
                print(f"{attn} L={L}: {row['status']}", flush=True)
                _save_longctx(cfg, card, copy_gbs, mm_tflops, rows)
                continue
            slots = cache.kv.shape[1] * cache.kv.shape[2]
            row["cache_bytes_measured"] = torch.cuda.memory_allocated() - before
            row["cache_bytes_formula"] = M.kv_bytes_per_token(mcfg, attn) * slots
            row["cache_vs_formula"] = row["cache_bytes_measured"] / row["cache_bytes_formula"]
            idx = torch.randint(0, mcfg.vocab_size, (1, L), device="cuda")
            row["attention_backend"] = "flash (forced with sdpa_kernel(FLASH_ATTENTION))"
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            try:
                with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    t0 = time.time()
                    start.record()
                    for i, s in enumerate(range(0, L, cfg.chunk)):
                        logits = model(idx[:, s:s + cfg.chunk], cache=cache)
                        if (i + 1) % 16 == 0:
                            torch.cuda.synchronize()
                            print(f"  {attn} prefill {s + cfg.chunk:,}/{L:,} tokens, {time.time() - t0:.0f}s", flush=True)
                    end.record()
                    torch.cuda.synchronize()
                    prefill_s = start.elapsed_time(end) / 1e3
                row["decode_ms_eager"], row["decode_ms_graph"] = decode_times(model, logits[:, -1:].argmax(-1), cache,
                                                                              cfg.decode_steps, graph=attn == "mla")
            except torch.OutOfMemoryError:
                row["status"] = "OOM during prefill"
                print(f"{attn} L={L}: {row['status']}", flush=True)
                _save_longctx(cfg, card, copy_gbs, mm_tflops, rows)
                del cache
                continue
            decode_ms = row["decode_ms_graph"] or row["decode_ms_eager"]
            attn_flops = mcfg.num_hidden_layers * mcfg.num_attention_heads * (qk + mcfg.v_head_dim) * L * (L + 1)
            row.update(status="ok", prefill_s=prefill_s, prefill_tokens_per_s=L / prefill_s,
                       attention_flops=attn_flops, attention_tflops=attn_flops / prefill_s / 1e12,
                       model_tflops=(2 * model.num_params() * L + attn_flops) / prefill_s / 1e12,
                       attention_vs_matmul=attn_flops / prefill_s / 1e12 / mm_tflops, decode_ms=decode_ms,
                       decode_tokens_per_s=1e3 / decode_ms, peak_bytes=torch.cuda.max_memory_allocated(),
                       decode_path="absorbed, mla_kernel.mla_decode" if attn == "mla" else "SDPA over the cached K/V")
            print(f"{attn} L={L:>8,}: prefill {prefill_s:7.1f} s ({L / prefill_s:9,.0f} tok/s, attention "
                  f"{row['attention_tflops']:.0f} TFLOP/s = {row['attention_vs_matmul']:.0%} of matmul), decode "
                  f"{decode_ms:.2f} ms (eager {row['decode_ms_eager']:.1f} ms), cache {row['cache_bytes_measured'] / 1e9:.2f} GB "
                  f"({row['cache_vs_formula']:.3f} x formula), peak {row['peak_bytes'] / 1e9:.1f} GB", flush=True)
            _save_longctx(cfg, card, copy_gbs, mm_tflops, rows)
            del cache, idx
        del model


SUBCOMMANDS = {"kernel": bench_kernel, "memory": bench_memory, "train": bench_train, "serve": bench_serve,
               "longctx": bench_longctx}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    if sys.argv[1] not in SUBCOMMANDS:
        die(f"unknown subcommand {sys.argv[1]!r}: choose one of {', '.join(SUBCOMMANDS)}")
    SUBCOMMANDS[sys.argv[1]](sys.argv[2:])
