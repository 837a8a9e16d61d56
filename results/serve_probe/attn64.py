# Issue 9 probe (GPU): why does the 64-row decode attention take ~29 us a layer for ~14 us of cache reads, and
# does a split kernel without a dependent load in its loop, or with the next tile loaded by hand, do better?
#  - the production kernel (mla_kernel.mla_decode: split + merge), and whether Triton pipelined its tile loads
#    (cp.async in the PTX); then mla_decode(preload=True), the opt-in port of variant V (MLA_PRELOAD=1);
#  - variant V: the split's block-table entries loaded once before the loop (a tile's address is then a
#    reduction over registers, not a load), PREFETCH=1: tile i+1 loaded into registers while tile i computes.
# Each timing is a CUDA graph of 24 layer calls on 24 separate caches (42 MB each: no L2 reuse), per layer.
# Usage: python results/serve_probe/attn64.py OUT_DIR
import itertools
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import mla_kernel as K  # noqa: E402
import model as M  # noqa: E402


@triton.jit
def _load_tile(Cache, pages, pidx, s_cb, n0, start, end, offs_t,
               R: tl.constexpr, P: tl.constexpr, PAGE: tl.constexpr):
    """Rows n0 .. n0 + BLOCK_N - 1 of the split (masked past end: no traffic) -> c (BN, R), k_pe (BN, P)."""
    W: tl.constexpr = R + P
    page = tl.sum(tl.where(pidx == n0 // PAGE - start // PAGE, pages, 0))          # from registers
    row = Cache + page * s_cb + (n0 % PAGE + offs_t) * W                            # (BN,)
    valid = (n0 + offs_t < end)[:, None]
    c = tl.load(row[:, None] + tl.arange(0, R)[None, :], mask=valid, other=0.0)
    k_pe = tl.load(row[:, None] + R + tl.arange(0, P)[None, :], mask=valid, other=0.0)
    return c, k_pe


@triton.jit
def _split_v(QL, QP, Cache, BlockTable, SeqLens, OPart, LsePart, qk_scale, split_tokens,
             s_qlb, s_qlh, s_qpb, s_qph, s_cb, s_bt, s_ob, s_oh, s_os, s_lb, s_lh,
             R: tl.constexpr, P: tl.constexpr, PAGE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
             NP: tl.constexpr, PREFETCH: tl.constexpr, USE_PDL: tl.constexpr = False):
    b = tl.program_id(1)
    s = tl.program_id(2)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    heads = tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, R)
    offs_p = tl.arange(0, P)
    offs_t = tl.arange(0, BLOCK_N)
    seq_len = tl.load(SeqLens + b)
    start = s * split_tokens
    end = tl.minimum(seq_len, start + split_tokens)
    n_tiles = tl.cdiv(tl.maximum(end - start, 0), BLOCK_N)
    q_lat = tl.load(QL + b * s_qlb + heads[:, None] * s_qlh + offs_r[None, :])
    q_pe = tl.load(QP + b * s_qpb + heads[:, None] * s_qph + offs_p[None, :])
    pidx = tl.arange(0, NP)
    pages = tl.load(BlockTable + b * s_bt + start // PAGE + pidx, mask=start + pidx * PAGE < end, other=0).to(tl.int64)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, R], tl.float32)
    c_nx, pe_nx = _load_tile(Cache, pages, pidx, s_cb, start, start, end, offs_t, R, P, PAGE)
    for i in range(0, n_tiles):
        n0 = start + i * BLOCK_N
        if PREFETCH:
            c, k_pe = c_nx, pe_nx
            c_nx, pe_nx = _load_tile(Cache, pages, pidx, s_cb, n0 + BLOCK_N, start, end, offs_t, R, P, PAGE)
        else:
            c, k_pe = _load_tile(Cache, pages, pidx, s_cb, n0, start, end, offs_t, R, P, PAGE)
        qk = tl.dot(q_pe, tl.trans(k_pe), tl.dot(q_lat, tl.trans(c))) * qk_scale
        qk = tl.where((n0 + offs_t < end)[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(c.dtype), c, acc * alpha[:, None])
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
    tl.store(OPart + b * s_ob + heads[:, None] * s_oh + s * s_os + offs_r[None, :], acc / l_safe[:, None])
    tl.store(LsePart + b * s_lb + heads * s_lh + s, lse)


def main():
    out_dir = sys.argv[1]
    dev, dt = torch.device("cuda"), torch.bfloat16
    B, H, R, P, page, L = 64, 16, 512, 64, 64, 24
    cap_pages = 10                                   # the bench's table width: 640 tokens
    g = torch.Generator(device="cpu").manual_seed(0)
    nb = B * cap_pages + 1
    kv = torch.randn(L, nb, page, R + P, generator=g).to(dev, dt)                       # 24 x 48 MB
    table = torch.stack([torch.randperm(nb - 1, generator=g)[:cap_pages] for _ in range(B)]).int().to(dev)
    lens = torch.randint(512, 641, (B,), generator=g).int().to(dev)
    q_lat = torch.randn(B, H, R, generator=g).to(dev, dt)
    q_pe = torch.randn(B, H, P, generator=g).to(dev, dt)
    scale = (128 + 64) ** -0.5
    ref = K.mla_decode_ref(q_lat, q_pe, kv[0], table, lens, scale).float()
    bytes_layer = int(lens.sum()) * (R + P) * 2
    res = {"provenance": M.provenance("cuda", torch.cuda.get_device_name()), "B": B, "H": H,
           "bytes_per_layer": bytes_layer, "rows": {}}

    def graph_us(fn):
        fn()
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            fn()
        gr.replay()
        torch.cuda.synchronize()
        ms = triton.testing.do_bench(gr.replay, warmup=20, rep=200)
        return round(1e3 * ms / L, 2)

    out = torch.empty(B, H, R, device=dev, dtype=dt)

    def prod():
        for i in range(L):
            K.mla_decode(q_lat, q_pe, kv[i], table, lens, scale, out=out)
    prod()
    err = (out.float() - K.mla_decode_ref(q_lat, q_pe, kv[L - 1], table, lens, scale).float()).abs().max().item()
    res["rows"]["production"] = {"us": graph_us(prod), "max_err": round(err, 4)}
    # did Triton pipeline the production kernel's tile loads? (cp.async in its PTX)
    try:
        for dc in K._mla_split_kernel.device_caches.values():
            for kern in list(dc[0].values())[:4]:
                ptx = kern.asm["ptx"]
                res.setdefault("production_ptx", []).append(
                    {"cp.async": ptx.count("cp.async.cg") + ptx.count("cp.async.ca"), "ld.global": ptx.count("ld.global"),
                     "regs": getattr(kern, "n_regs", None), "spills": getattr(kern, "n_spills", None),
                     "shared": kern.metadata.shared})
    except Exception as e:
        res["production_ptx"] = f"{type(e).__name__}: {e}"
    print("production", res["rows"]["production"], res.get("production_ptx"), flush=True)

    def prod_preload():   # mla_decode's opt-in path (MLA_PRELOAD=1 turns it on in serving)
        for i in range(L):
            K.mla_decode(q_lat, q_pe, kv[i], table, lens, scale, out=out, preload=True)
    prod_preload()
    err = (out.float() - K.mla_decode_ref(q_lat, q_pe, kv[L - 1], table, lens, scale).float()).abs().max().item()
    res["rows"]["production preload"] = {"us": graph_us(prod_preload), "max_err": round(err, 4)}
    print("production preload", res["rows"]["production preload"], flush=True)
    json.dump(res, open(os.path.join(out_dir, "attn64.json"), "w"), indent=1)

    if os.environ.get("ONLY_PRODUCTION"):
        return
    for pre, bn, warps, stages, splits in itertools.product((0, 1), (32, 64), (4, 8), (1, 2, 3), (2, 3, 4)):
        if pre and stages != 1:
            continue
        split_tokens = triton.cdiv(triton.cdiv(cap_pages * page, splits), 64) * 64
        S = triton.cdiv(cap_pages * page, split_tokens)
        o_part = torch.empty(B, H, S, R, device=dev, dtype=torch.float32)
        lse = torch.empty(B, H, S, device=dev, dtype=torch.float32)
        NP = triton.next_power_of_2(split_tokens // page)
        name = f"V pre={pre} bn={bn} w={warps} st={stages} splits={S}"

        def run(i=0, kern=[None]):
            k = _split_v[(1, B, S)](q_lat, q_pe, kv[i], table, lens, o_part, lse, scale * 1.4426950408889634, split_tokens,
                                    q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), kv[i].stride(0),
                                    table.stride(0), *o_part.stride()[:3], *lse.stride()[:2],
                                    R=R, P=P, PAGE=page, BLOCK_H=H, BLOCK_N=bn, NP=NP, PREFETCH=pre,
                                    num_warps=warps, num_stages=stages, launch_pdl=True, USE_PDL=True)
            K._mla_merge_kernel[(H, B, 1)](o_part, lse, out, S, *o_part.stride()[:3], *lse.stride()[:2],
                                           out.stride(0), out.stride(1), BLOCK_R=R, BLOCK_S=triton.next_power_of_2(S),
                                           num_warps=4, launch_pdl=True, USE_PDL=True)
            kern[0] = k
            return k
        try:
            k = run()
            torch.cuda.synchronize()
            err = (out.float() - ref).abs().max().item()
            ptx = k.asm["ptx"]
            row = {"us": graph_us(lambda: [run(i) for i in range(L)]), "max_err": round(err, 4),
                   "cp.async": ptx.count("cp.async.cg") + ptx.count("cp.async.ca"), "ld.global": ptx.count("ld.global"),
                   "regs": getattr(k, "n_regs", None), "spills": getattr(k, "n_spills", None)}
        except Exception as e:   # a config that does not compile or fit
            row = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        res["rows"][name] = row
        print(name, row, flush=True)
        json.dump(res, open(os.path.join(out_dir, "attn64.json"), "w"), indent=1)
    best = sorted((r["us"], n) for n, r in res["rows"].items() if "us" in r and r.get("max_err", 1) < 0.05)[:5]
    res["best"] = best
    print("best", best, flush=True)
    json.dump(res, open(os.path.join(out_dir, "attn64.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
