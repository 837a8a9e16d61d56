# Issue 9 probe (GPU only): what 64 clients spend, part by part, 1b preset (random weights, bf16).
#  G. each decode projection at 64 rows over the 24 layers' weights (one CUDA graph, no L2 reuse): cuBLAS (the GEMM
#     alone) vs mla_kernel.fused_linear with its RMSNorm prologue / SwiGLU / residual epilogue, tile configs swept;
#  A. the attention at 64 rows, 512-640 cached tokens (the bench's), capacity 640: KV splits x tile configs;
#  P. one prefill forward of 16 x 512 (the engine's 8192-token chunk; env PREFILL_B=1,8,16 for others): this tree's model.py vs the one carried in
#     .old/model_old.py (same weights), and SDPA with V padded to 192 vs V at 128 (which backend, how fast);
#  U. the attention + W_UV at 64 rows: merge kernel + einsum vs mla_kernel.merge_uv;
#  M. a layer's shared GEMMs (cuBLAS) at M tokens (GEMM_M): the price of prefill tokens riding in a decode step;
#  T. the shared GEMMs at ROWS rows as x W^T vs (W x^T)^T (cuBLAS's choice of kernel);
#  X. a mixed step (ROWS decode tokens + an XT-token prompt chunk at cached length XS, one forward) vs the two apart;
#  S. the 64-row decode step as a CUDA graph: compiled blocks (the engine's) vs serve.fused_decode.
#  Q. one prefill forward of PREFILL_B x 512 (default 16) profiled with input shapes: which op each kernel's time is.
# Usage: python results/serve_probe/c64.py OUT_DIR [parts, default GAPS]
import importlib.util
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mla_kernel as K  # noqa: E402
import model as M  # noqa: E402
import serve  # noqa: E402

OUT, PARTS = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "GAPS"
ROWS = int(os.environ.get("ROWS", "64"))
dev, dt = torch.device("cuda"), torch.bfloat16
if os.environ.get("BLAS"):   # env BLAS=cublaslt / cublas: torch.backends.cuda.preferred_blas_library for every GEMM here
    torch.backends.cuda.preferred_blas_library(os.environ["BLAS"])
res = {"provenance": M.provenance("cuda", torch.cuda.get_device_name()), "rows": ROWS, "blas": os.environ.get("BLAS", "default")}
dump = lambda: json.dump(res, open(os.path.join(OUT, "c64.json"), "w"), indent=1)  # noqa: E731
torch.manual_seed(0)
cfg = M.PRESETS["1b"]
with torch.device(dev):
    model = M.Transformer(cfg)
model = M.fuse_projections(model.to(dt).eval().requires_grad_(False))
L, page, H, R, nope, P, dv = cfg.num_hidden_layers, 64, 16, 512, 128, 64, 128
lay = model.layers


def graph_ms(fn, reps=50):
    """Median ms of one replay of fn captured in a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(5):
        g.replay()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def try_ms(fn):
    try:
        return round(graph_ms(fn) * 1000 / L, 2)
    except Exception as e:  # a config that does not compile (shared memory, registers)
        return f"{type(e).__name__}: {str(e)[:80]}"


def old_model():
    """.old/model_old.py (with .old/mla_kernel_old.py, when there) holding this model's weights."""
    sys.path.insert(0, os.path.join(ROOT, ".old"))
    spec = importlib.util.spec_from_file_location("model_old", os.path.join(ROOT, ".old", "model_old.py"))
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    with torch.device(dev):
        om = old.Transformer(old.PRESETS["1b"])
    om.load_state_dict(model.state_dict(), strict=False)
    return old, old.fuse_projections(om.to(dt).eval().requires_grad_(False))


def state(B, lo=512, hi=640, cap=640):
    pages = cap // page
    kv = torch.randn(L, B * pages + 1, page, M.cache_width(cfg), device=dev, dtype=dt)
    table = torch.arange(B * pages, device=dev, dtype=torch.int32).view(B, pages)
    lens = torch.randint(lo, hi, (B,), device=dev, dtype=torch.int32)
    return kv, table, lens


with torch.inference_mode():
    if "G" in PARTS:
        RES = torch.randn(ROWS, 2048, device=dev, dtype=dt)
        ops = {  # name: (x width, fused call for layer l with config c, the cuBLAS GEMM alone)
            "qkv_a+norm": (2048, lambda x, l, c: K.fused_linear(x, lay[l].self_attn.qkv_a, norm=lay[l].input_layernorm.weight, config=c),
                           lambda x, l: F.linear(x, lay[l].self_attn.qkv_a)),
            "q_b+norm": (1536, lambda x, l, c: K.fused_linear(x, lay[l].self_attn.q_b_proj.weight, norm=lay[l].self_attn.q_a_layernorm.weight, config=c),
                         lambda x, l: F.linear(x, lay[l].self_attn.q_b_proj.weight)),
            "W_UV": (H * R, lambda x, l, c: K.fused_linear(x, lay[l].self_attn.kv_b_proj.weight.view(H, nope + dv, R)[:, nope:], x_group_stride=R, config=c),
                     lambda x, l: torch.einsum("bhr,hvr->bhv", x.view(-1, H, R), lay[l].self_attn.kv_b_proj.weight.view(H, nope + dv, R)[:, nope:])),
            "o+res": (2048, lambda x, l, c: K.fused_linear(x, lay[l].self_attn.o_proj.weight, out=RES, residual=RES, config=c),
                      lambda x, l: F.linear(x, lay[l].self_attn.o_proj.weight)),
            "gate_up+norm+swiglu": (2048, lambda x, l, c: K.fused_linear(x, lay[l].mlp.gate_up, norm=lay[l].post_attention_layernorm.weight, swiglu=True, config=c),
                                    lambda x, l: F.linear(x, lay[l].mlp.gate_up)),
            "down+res": (4608, lambda x, l, c: K.fused_linear(x, lay[l].mlp.down_proj.weight, out=RES, residual=RES, config=c),
                         lambda x, l: F.linear(x, lay[l].mlp.down_proj.weight)),
        }
        bm = min(64, max(16, ROWS))
        configs = [(bm, bn, bk, w, s) for bn, bk, w, s in
                   [(16, 128, 4, 3), (32, 128, 4, 3), (32, 128, 4, 4), (32, 64, 4, 5), (32, 256, 4, 3), (64, 64, 4, 4),
                    (64, 128, 4, 3), (64, 128, 4, 4), (64, 64, 4, 6), (128, 64, 4, 4), (128, 64, 8, 4), (64, 256, 8, 3),
                    (32, 128, 4, 1), (64, 128, 4, 1), (32, 256, 4, 1)]]
        res["ops"] = {}
        for name, (width, fused, cublas) in ops.items():
            x = torch.randn(ROWS, width, device=dev, dtype=dt)
            row = {"cublas_us": try_ms(lambda: [cublas(x, l) for l in range(L)])}
            for c in configs:
                row[str(c)] = try_ms(lambda: [fused(x, l, c) for l in range(L)])
            best = min((v, k) for k, v in row.items() if isinstance(v, float) and k != "cublas_us")
            print(f"M={ROWS} {name:22s} cublas {row['cublas_us']:6.2f} us  best fused {best[0]:6.2f} {best[1]}", flush=True)
            res["ops"][name] = row
            dump()
        # what each fused op replaces besides its GEMM: the compiled blocks' norm / SwiGLU / residual kernels
        x = torch.randn(ROWS, 2048, device=dev, dtype=dt)
        g = torch.randn(ROWS, 9216, device=dev, dtype=dt)
        res["ops"]["rms_norm_us"] = try_ms(lambda: [F.rms_norm(x, (2048,), lay[l].input_layernorm.weight, 1e-6) for l in range(L)])
        res["ops"]["silu_mul_us"] = try_ms(lambda: [F.silu(g[:, :4608]) * g[:, 4608:] for l in range(L)])
        res["ops"]["add_us"] = try_ms(lambda: [x + RES for l in range(L)])
        print({k: res["ops"][k] for k in ("rms_norm_us", "silu_mul_us", "add_us")}, flush=True)
        dump()

    if "A" in PARTS:
        res["attention"] = {}
        for B in [int(b) for b in os.environ.get("ATT_ROWS", "1,8,64").split(",")]:
            kv, table, lens = state(B)
            ql = torch.randn(B, H, R, device=dev, dtype=dt)
            qp = torch.randn(B, H, P, device=dev, dtype=dt)
            ref = K.mla_decode(ql, qp, kv[0], table, lens, 0.1)
            att = {"rows": {}}
            for splits, c in [(sp, c) for sp in ((1, 2, 3, 4) if B >= 32 else (1, 2, 4, 8, 16))
                                  for c in [None, (32, 4, 2), (64, 4, 2), (64, 8, 2), (16, 4, 1), (32, 4, 1), (64, 4, 1),
                                            (32, 8, 1), (64, 8, 1), (128, 4, 2), (128, 8, 2)]]:
                key = f"{splits} {c}"
                try:
                    err = (K.mla_decode(ql, qp, kv[0], table, lens, 0.1, num_splits=splits, config=c) - ref).abs().max().item()
                except Exception as e:
                    att["rows"][key] = f"{type(e).__name__}: {str(e)[:80]}"
                    continue
                att["rows"][key] = [try_ms(lambda: [K.mla_decode(ql, qp, kv[l], table, lens, 0.1, num_splits=splits, config=c)
                                                    for l in range(L)]), round(err, 4)]
            att["default"] = try_ms(lambda: [K.mla_decode(ql, qp, kv[l], table, lens, 0.1) for l in range(L)])
            att["bytes_per_layer"] = int(lens.sum()) * M.cache_width(cfg) * 2
            best = sorted((v[0], k) for k, v in att["rows"].items() if isinstance(v, list) and isinstance(v[0], float))[:4]
            print(f"attention B={B}: default {att['default']} us, best {best}, "
                  f"{att['bytes_per_layer'] / 2**20:.1f} MiB a layer", flush=True)
            res["attention"][B] = att
            dump()

    if "U" in PARTS:   # the attention + W_UV at ROWS rows: merge kernel + einsum (the engine's) vs merge_uv (fused_decode's)
        kv, table, lens = state(ROWS)
        ql = torch.randn(ROWS, H, R, device=dev, dtype=dt)
        qp = torch.randn(ROWS, H, P, device=dev, dtype=dt)
        wuv = [lay[l].self_attn.kv_b_proj.weight.view(H, nope + dv, R)[:, nope:] for l in range(L)]
        sep = lambda l: torch.einsum("bhr,hvr->bhv", K.mla_decode(ql, qp, kv[l], table, lens, 0.1), wuv[l]).reshape(ROWS, -1)  # noqa: E731

        def fused(l):
            o = K.mla_decode(ql, qp, kv[l], table, lens, 0.1, partials=True)
            return K.merge_uv(*o, wuv[l], dt) if isinstance(o, tuple) else None
        uv = {"separate_us": try_ms(lambda: [sep(l) for l in range(L)]),
              "merge_uv_us": try_ms(lambda: [fused(l) for l in range(L)]) if fused(0) is not None else "one split: no partials",
              "max_diff": (sep(0).float() - fused(0).float()).abs().max().item() if fused(0) is not None else None}
        print("attention + W_UV", ROWS, uv, flush=True)
        res["uv"] = uv
        dump()

    if "P" in PARTS:
        pre = {}
        B, T = 16, 512
        q = torch.randn(B, H, T, nope + P, device=dev, dtype=dt)
        k = torch.randn(B, H, T, nope + P, device=dev, dtype=dt)
        v = torch.randn(B, H, T, dv, device=dev, dtype=dt)

        def ev_ms(fn, n=20):
            fn()
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(n):
                fn()
            b.record()
            b.synchronize()
            return round(a.elapsed_time(b) / n, 4)
        padded = lambda: F.scaled_dot_product_attention(q, k, F.pad(v, (0, nope + P - dv)), is_causal=True)[..., :dv]  # noqa: E731
        plain = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        pre["sdpa_padded_ms"], pre["sdpa_dv128_ms"] = ev_ms(padded), ev_ms(plain)
        pre["sdpa_dv128_max_diff"] = (padded() - plain()).abs().max().item()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            plain()
            torch.cuda.synchronize()
        pre["sdpa_dv128_kernels"] = sorted({e.key[:90] for e in prof.key_averages()})
        old, om = old_model()
        for B in [int(b) for b in os.environ.get("PREFILL_B", "16").split(",")]:   # B x 512-token prompts
            sfx = "" if B == 16 else f"_B{B}"   # (the first runs had B=16 only, unsuffixed)
            idx = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
            for name, mod, m in (("old", old, om), ("new", M, model), ("old", old, om), ("new", M, model)):
                cache = mod.Cache(torch.zeros(L, B * 9 + 1, page, 576, device=dev, dtype=dt),
                                  torch.arange(B * 9, device=dev, dtype=torch.int32).view(B, 9),
                                  torch.zeros(B, device=dev, dtype=torch.int32))

                def fwd():
                    cache.seq_lens.zero_()
                    return m(idx, cache=cache)[:, -1]
                pre[f"forward_{name}_ms{sfx}"] = ev_ms(fwd, 10)
                pre[f"logits_{name}"] = fwd().float()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    fwd()
                    torch.cuda.synchronize()
                ks = [(e.key[:100], e.count, round(e.device_time_total / 1000, 3)) for e in prof.key_averages()
                      if e.device_time_total > 0]
                pre[f"kernels_{name}{sfx}"] = sorted(ks, key=lambda k: -k[2])[:25]
                pre[f"kernel_ms_{name}{sfx}"] = round(sum(k[2] for k in ks), 2)
            d = (pre.pop("logits_old") - pre.pop("logits_new")).abs().max().item()
            pre[f"old_vs_new_max_logit_diff{sfx}"] = d
        print("prefill", {k: v for k, v in pre.items() if not k.startswith("kernels")}, flush=True)
        res["prefill"] = pre
        dump()

    if "M" in PARTS:   # a layer's shared GEMMs at M tokens: what 64 decode rows' weight reads leave free for prefill tokens
        gm = {}
        for Mt in [int(m) for m in os.environ.get("GEMM_M", "64,128,256,320,512,576,1024,1088,2048,2112").split(",")]:
            xs = {k: torch.randn(Mt, k, device=dev, dtype=dt) for k in (1536, 2048, 4608)}

            def layer_gemms(l):   # [q_a; kv_a], q_b, o, [gate; up], down (W_UK / W_UV and kv_b are not shared)
                a, mlp = lay[l].self_attn, lay[l].mlp
                return (F.linear(xs[2048], a.qkv_a), F.linear(xs[1536], a.q_b_proj.weight), F.linear(xs[2048], a.o_proj.weight),
                        F.linear(xs[2048], mlp.gate_up), F.linear(xs[4608], mlp.down_proj.weight))
            gm[Mt] = try_ms(lambda: [layer_gemms(l) for l in range(L)])
        print("GEMMs us a layer by M", gm, flush=True)
        res["gemm_by_m"] = gm
        dump()

    if "T" in PARTS:   # the layer's shared GEMMs at ROWS rows as x W^T (the engine's) vs (W x^T)^T: does cuBLAS pick better?
        xs = {k: torch.randn(ROWS, k, device=dev, dtype=dt) for k in (1536, 2048, 4608)}

        def ws(l):
            a, mlp = lay[l].self_attn, lay[l].mlp
            return ((2048, a.qkv_a), (1536, a.q_b_proj.weight), (2048, a.o_proj.weight), (2048, mlp.gate_up),
                    (4608, mlp.down_proj.weight))
        tg = {}
        for i, name in enumerate(("qkv_a", "q_b", "o", "gate_up", "down")):
            tg[name] = {"xWt_us": try_ms(lambda: [F.linear(xs[ws(l)[i][0]], ws(l)[i][1]) for l in range(L)]),
                        "Wxt_us": try_ms(lambda: [torch.mm(ws(l)[i][1], xs[ws(l)[i][0]].t()) for l in range(L)]),
                        "Wxt_copy_us": try_ms(lambda: [torch.mm(ws(l)[i][1], xs[ws(l)[i][0]].t()).t().contiguous() for l in range(L)])}
        print("GEMM forms at", ROWS, "rows", tg, flush=True)
        res["gemm_forms"] = tg
        dump()

    if "X" in PARTS:   # a mixed step: ROWS decode tokens + one prompt chunk of XT tokens at cached length XS, one forward
        # (a probe-only forward written out from model.MLA; the chunk attends to its prefix at its exact length)
        torch._dynamo.config.cache_size_limit = 256
        XT = int(os.environ.get("XT", "192"))
        kv, table, lens = state(ROWS)
        S_max = 640
        kv = torch.cat([kv, torch.zeros(L, S_max // page, page, kv.shape[-1], device=dev, dtype=dt)], 1)
        ptab = (torch.arange(S_max // page, device=dev, dtype=torch.int32) + ROWS * (640 // page) + 1)[None]   # (1, 10)
        didx = torch.randint(0, cfg.vocab_size, (ROWS, 1), device=dev)
        pidx = torch.randint(0, cfg.vocab_size, (1, XT), device=dev)
        scale = model.softmax_scale

        def mixed_block(blk, x, cos, sin, kvl, slots, lens_d, start):
            att, mlp, N = blk.self_attn, blk.mlp, x.shape[0]
            h = blk.input_layernorm(x)
            q, ckv = F.linear(h, att.qkv_a).split([att.qkv_a.shape[0] - R - P, R + P], dim=-1)
            q = att.q_b_proj(att.q_a_layernorm(q)).view(N, H, nope + P)
            c, k_pe = ckv.split([R, P], dim=-1)
            c = att.kv_a_layernorm(c)
            q_pe = M.apply_rope(q[None, :, :, nope:], cos[None], sin[None])[0]               # (N, H, P)
            k_pe = M.apply_rope(k_pe[None, :, None], cos[None], sin[None])[0, :, 0]          # (N, P)
            M.cache_write(kvl, slots[None], torch.cat([c, k_pe], dim=-1)[None])
            w = att.kv_b_proj.weight.view(H, nope + dv, R)
            q_lat = torch.einsum("bhd,hdr->bhr", q[:ROWS, :, :nope], w[:, :nope])
            o_lat = M.latent_attention(q_lat, q_pe[:ROWS], kvl, table, lens_d, scale)
            o_d = torch.einsum("bhr,hvr->bhv", o_lat, w[:, nope:]).reshape(ROWS, H * dv)
            lat = M.cache_read(kvl, ptab, start + N - ROWS)                                  # (1, S, R + P)
            k, v = F.linear(lat, att.kv_b_rows).view(1, -1, H, nope + P + dv).split([nope + P, dv], dim=-1)
            qc = torch.cat([q[ROWS:, :, :nope], q_pe[ROWS:]], dim=-1)[None]                 # (1, T, H, nope + P)
            y = M.causal_attention(qc, k, v, scale).reshape(N - ROWS, H * dv)
            x = x + att.o_proj(torch.cat([o_d, y]))
            return x + mlp(blk.post_attention_layernorm(x))

        def mixed(start, blocks):
            lens_d = lens + 1
            pos = torch.cat([lens.long(), start + torch.arange(XT, device=dev)])                 # (N,)
            slots = torch.cat([M.cache_slots(table, lens, 1, page).view(-1), M.cache_slots(ptab, lens[:1] * 0 + start, XT, page).view(-1)])
            cos, sin = M.rope_cos_sin(model.inv_freq, pos)
            x = model.embed_tokens(torch.cat([didx[:, 0], pidx[0]]))
            for i, b in enumerate(model.layers):
                x = blocks(b, x, cos, sin, kv[i], slots, lens_d, start)
            return model.lm_head(model.norm(x))                                                  # (N, V)
        layers = [torch.compile(b, dynamic=True) for b in model.layers]
        cmixed = torch.compile(mixed_block, dynamic=True)

        def dec(lay_):
            cache = M.Cache(kv, table, lens.clone())
            return model(didx, cache=cache, layers=lay_)[:, -1]

        def pre(start):
            cache = M.Cache(kv, ptab, torch.full((1,), start, device=dev, dtype=torch.int32), start=start)
            return model(pidx, cache=cache)[0]
        mx = {"decode_rows": ROWS, "chunk": XT, "decode_compiled_ms": round(graph_ms(lambda: dec(layers)), 4),
              "decode_eager_ms": round(graph_ms(lambda: dec(None)), 4)}
        for start in [int(x) for x in os.environ.get("XS", "0,192,384").split(",")]:
            row = {"prefill_alone_ms": round(graph_ms(lambda: pre(start)), 4),
                   "mixed_eager_ms": round(graph_ms(lambda: mixed(start, mixed_block)), 4)}
            try:
                row["mixed_compiled_ms"] = round(graph_ms(lambda: mixed(start, cmixed)), 4)
            except Exception as e:
                row["mixed_compiled_ms"] = f"{type(e).__name__}: {str(e)[:120]}"
            got = mixed(start, mixed_block).float()
            want_d, want_p = dec(None).float(), pre(start).float()
            row["max_logit_diff_decode"] = round((got[:ROWS] - want_d).abs().max().item(), 4)
            row["max_logit_diff_chunk"] = round((got[ROWS:] - want_p).abs().max().item(), 4)
            row["saved_ms_eager"] = round(mx["decode_eager_ms"] + row["prefill_alone_ms"] - row["mixed_eager_ms"], 4)
            if isinstance(row["mixed_compiled_ms"], float):
                row["saved_ms_compiled"] = round(mx["decode_compiled_ms"] + row["prefill_alone_ms"] - row["mixed_compiled_ms"], 4)
            mx[start] = row
            print("mixed", ROWS, XT, start, row, flush=True)
            res["mixed"] = mx
            dump()

    if "S" in PARTS:
        kv, table, lens = state(ROWS)
        idx = torch.randint(0, cfg.vocab_size, (ROWS,), device=dev)
        rope = [t[0] for t in M.rope_cos_sin(model.inv_freq, torch.arange(704, device=dev)[None])]
        step = {}
        if ROWS <= 8:   # at 64 rows 6.05 vs 3.39 ms compiled (c64_h100_7a7dc8c.json)
            step["fused_ms"] = round(graph_ms(lambda: serve.fused_decode(model, idx, kv, table, lens, rope)), 4)
        # env S_MODES: dynamic (the engine's: one compile for every bucket), static (this shape only), autotune
        # (static + Inductor's max-autotune: Triton GEMM templates benchmarked against cuBLAS per shape)
        # env S_OLD=1: also .old/model_old.py's step (mode "old": dynamic, as the engine), and the two steps' logits
        logits = {}
        for mode in os.environ.get("S_MODES", "dynamic").split(",") + (["old"] if os.environ.get("S_OLD") else []):
            torch._dynamo.reset()
            t0 = time.perf_counter()
            # combo: dynamic + Inductor's combo kernels (independent small kernels of a graph launched as one)
            opts = {"dynamic": mode in ("dynamic", "old", "combo")} | ({"mode": "max-autotune-no-cudagraphs"} if mode == "autotune" else {})
            if mode == "combo":
                opts["options"] = {"combo_kernels": True}
            mod, m = (M, model) if mode != "old" else old_model()
            layers = [torch.compile(b, **opts) for b in m.layers]
            cache = mod.Cache(kv, table, lens.clone())

            def run():
                cache.seq_lens.copy_(lens)
                return m(idx[:, None], cache=cache, layers=layers)[:, -1]
            key = "compiled_ms" if mode == "dynamic" else f"compiled_{mode}_ms"
            step[key] = round(graph_ms(run), 4)
            step[key.replace("_ms", "_s")] = round(time.perf_counter() - t0, 1)
            kv0 = kv.clone()
            logits[mode] = run().float()
            kv.copy_(kv0)   # the step wrote its rows: the next mode starts from the same cache
            if mode != "dynamic" and "dynamic" in logits:
                step[f"{mode}_vs_dynamic_max_logit_diff"] = round((logits[mode] - logits["dynamic"]).abs().max().item(), 4)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                run()
                torch.cuda.synchronize()
            ks = [(e.key[:100], e.count, round(e.device_time_total, 1)) for e in prof.key_averages() if e.device_time_total > 0]
            step[f"{mode}_kernels"] = sorted(ks, key=lambda k: -k[2])[:30]
            step[f"{mode}_kernel_count"] = sum(k[1] for k in ks)
            kv.copy_(kv0)
            print("step", ROWS, {k: v for k, v in step.items() if not k.endswith("_kernels")}, flush=True)
            res["step"] = step
            dump()

    if "Q" in PARTS:
        B = int(os.environ.get("PREFILL_B", "16"))
        idx = torch.randint(0, cfg.vocab_size, (B, 512), device=dev)
        cache = M.Cache(torch.zeros(L, B * 9 + 1, page, 576, device=dev, dtype=dt),
                        torch.arange(B * 9, device=dev, dtype=torch.int32).view(B, 9), torch.zeros(B, device=dev, dtype=torch.int32))

        def fwd():
            cache.seq_lens.zero_()
            return model(idx, cache=cache)[:, -1]
        for _ in range(3):
            fwd()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
                                    record_shapes=True) as prof:
            fwd()
            torch.cuda.synchronize()
        ops = [(e.key, str(e.input_shapes)[:160], e.count, round(e.device_time_total / 1000, 3))
               for e in prof.key_averages(group_by_input_shape=True) if e.device_time_total > 0 and e.key.startswith("aten::")]
        res["prefill_ops"] = {"B": B, "ops_ms": sorted(ops, key=lambda o: -o[3])[:40]}
        for o in res["prefill_ops"]["ops_ms"][:20]:
            print("prefill op", o, flush=True)
        dump()
dump()
print("done", flush=True)
