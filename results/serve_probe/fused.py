# Issue 9 probe (GPU only): serve.fused_decode (mla_kernel.fused_linear, mla_absorb, merge_uv: 8 kernels a layer)
# against the compiled decode graph, 1b preset (random weights, bf16). Earlier versions of this file (git log)
# also swept 2-64 rows, PDL and L2-prefetch variants (results/gpu_log.md rows 52-59).
#  A. correctness: fused_decode vs eager model.forward on the same cache (logits, argmax, the written cache row);
#  B. each batch-1 op over the 24 layers' weights in one CUDA graph (no L2 reuse), tile configs swept, vs cuBLAS;
#  C. the whole batch-1 step as a CUDA graph: fused with and without PDL, and the compiled blocks.
# Usage: python results/serve_probe/fused.py OUT_DIR [parts, default ABC]
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

OUT, PARTS = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ABC"
CTX = int(os.environ.get("CTX", "512"))
dev, dt = torch.device("cuda"), torch.bfloat16
res = {"provenance": M.provenance("cuda", torch.cuda.get_device_name()), "ctx": CTX, "pdl_available": K.PDL}
dump = lambda: json.dump(res, open(os.path.join(OUT, "fused.json"), "w"), indent=1)  # noqa: E731
torch.manual_seed(0)
cfg = M.PRESETS["1b"]
with torch.device(dev):
    model = M.Transformer(cfg)
model = M.fuse_projections(model.to(dt).eval().requires_grad_(False))
L, page = cfg.num_hidden_layers, 64
pages = (CTX + 64) // page + 1
NB = 64 * pages + 1


ROPE = [t[0] for t in M.rope_cos_sin(model.inv_freq, torch.arange(CTX + 64, device=dev)[None])]  # (positions, P/2)


def state(B):
    kv = torch.randn(L, NB, page, M.cache_width(cfg), device=dev, dtype=dt)
    table = torch.arange(B * pages, device=dev, dtype=torch.int32).view(B, pages)
    lens = torch.randint(CTX // 2, CTX, (B,), device=dev, dtype=torch.int32)
    idx = torch.randint(0, cfg.vocab_size, (B,), device=dev)
    return kv, table, lens, idx


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


with torch.inference_mode():
    if "A" in PARTS:
        res["check"] = {}
        for B in (1, 3, 64):
            kv, table, lens, idx = state(B)
            kv2 = kv.clone()
            ref = model(idx[:, None], cache=M.Cache(kv, table, lens.clone()))[:, -1].float()
            out = serve.fused_decode(model, idx, kv2, table, lens, ROPE)
            torch.cuda.synchronize()
            top2 = ref.topk(2, -1).values
            sure = (top2[:, 0] - top2[:, 1]) > 0.05
            r = {"max_abs_logit_diff": (out - ref).abs().max().item(), "logit_scale": ref.abs().max().item(),
                 "argmax_agree": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                 "argmax_agree_margin_0.05": (out.argmax(-1) == ref.argmax(-1))[sure].float().mean().item(),
                 "cache_max_diff": (kv2 - kv).abs().max().item()}
            res["check"][B] = r
            print("check", B, r, flush=True)
        dump()

    if "B" in PARTS:
        H, R, nope, P, dv = 16, 512, 128, 64, 128
        lay = model.layers
        ops = {  # name: (x width, per-layer call given x, config) ; cuBLAS: the plain GEMM on the same weight
            "qkv_a+norm": (2048, lambda x, l, c: K.fused_linear(x, lay[l].self_attn.qkv_a, norm=lay[l].input_layernorm.weight, config=c),
                           lambda x, l: F.linear(x, lay[l].self_attn.qkv_a)),
            "q_b+norm": (1536, lambda x, l, c: K.fused_linear(x, lay[l].self_attn.q_b_proj.weight, norm=lay[l].self_attn.q_a_layernorm.weight, config=c),
                         lambda x, l: F.linear(x, lay[l].self_attn.q_b_proj.weight)),
            "W_UK": (H * (nope + P), lambda x, l, c: K.fused_linear(x, lay[l].self_attn.kv_b_proj.weight.view(H, nope + dv, R)[:, :nope].transpose(1, 2), x_group_stride=nope + P, config=c),
                     lambda x, l: torch.einsum("bhd,hdr->bhr", x.view(-1, H, nope + P)[..., :nope], lay[l].self_attn.kv_b_proj.weight.view(H, nope + dv, R)[:, :nope])),
            "W_UV": (H * R, lambda x, l, c: K.fused_linear(x, lay[l].self_attn.kv_b_proj.weight.view(H, nope + dv, R)[:, nope:], x_group_stride=R, config=c),
                     lambda x, l: torch.einsum("bhr,hvr->bhv", x.view(-1, H, R), lay[l].self_attn.kv_b_proj.weight.view(H, nope + dv, R)[:, nope:])),
            "o+res": (2048, lambda x, l, c: K.fused_linear(x, lay[l].self_attn.o_proj.weight, out=RES, residual=RES, config=c),
                      lambda x, l: F.linear(x, lay[l].self_attn.o_proj.weight)),
            "gate_up+norm+swiglu": (2048, lambda x, l, c: K.fused_linear(x, lay[l].mlp.gate_up, norm=lay[l].post_attention_layernorm.weight, swiglu=True, config=c),
                                    lambda x, l: F.linear(x, lay[l].mlp.gate_up)),
            "down+res": (4608, lambda x, l, c: K.fused_linear(x, lay[l].mlp.down_proj.weight, out=RES, residual=RES, config=c),
                         lambda x, l: F.linear(x, lay[l].mlp.down_proj.weight)),
        }
        configs = [(1, 4, 2048, 4, 1), (1, 8, 1024, 4, 1), (1, 4, 1024, 4, 1), (1, 2, 2048, 4, 1), (1, 8, 2048, 8, 1),
                   (1, 4, 2048, 8, 1), (1, 2, 2048, 2, 1)]
        del ops["W_UK"], ops["W_UV"]
        res["ops"] = {}
        RES = torch.randn(1, 2048, device=dev, dtype=dt)
        for name, (width, fused, cublas) in ops.items():
            x = torch.randn(1, width, device=dev, dtype=dt)
            row = {"cublas_us": round(graph_ms(lambda: [cublas(x, l) for l in range(L)]) * 1000 / L, 2)}
            for c in [None] + configs:
                try:
                    row[str(c)] = round(graph_ms(lambda: [fused(x, l, c) for l in range(L)]) * 1000 / L, 2)
                except Exception as e:  # a config that does not compile (shared memory, registers)
                    row[str(c)] = f"{type(e).__name__}: {str(e)[:80]}"
            best = min((v, k) for k, v in row.items() if isinstance(v, float) and k != "cublas_us")
            print(f"M=1 {name:22s} cublas {row['cublas_us']:6.2f} us  default {row['None']}  best {best[0]:6.2f} {best[1]}", flush=True)
            res["ops"][name] = row
            dump()
        # the rest of a layer: absorb (rope + cache row + W_UK), the attention's splits, their merge into W_UV
        kv, table, lens, idx = state(1)
        a = torch.randn(1, 2112, device=dev, dtype=dt)
        q = torch.randn(1, H, nope + P, device=dev, dtype=dt)
        ql = torch.randn(1, H, R, device=dev, dtype=dt)
        qp = torch.randn(1, H, P, device=dev, dtype=dt)
        lens1 = lens + 1
        w = [b.self_attn.kv_b_proj.weight.view(H, nope + dv, R) for b in lay]
        g_kv = [b.self_attn.kv_a_layernorm.weight for b in lay]
        parts = K.mla_decode(ql, qp, kv[0], table, lens1, 0.1, partials=True)
        res["ops"]["absorb"] = round(graph_ms(lambda: [K.mla_absorb(a[:, -(R + P):], q, w[l][:, :nope], kv[l], table, lens, *ROPE, g_kv[l]) for l in range(L)]) * 1000 / L, 2)
        res["ops"]["attention splits"] = round(graph_ms(lambda: [K.mla_decode(ql, qp, kv[l], table, lens1, 0.1, partials=True) for l in range(L)]) * 1000 / L, 2)
        res["ops"]["attention + merge"] = round(graph_ms(lambda: [K.mla_decode(ql, qp, kv[l], table, lens1, 0.1) for l in range(L)]) * 1000 / L, 2)
        res["ops"]["merge_uv"] = round(graph_ms(lambda: [K.merge_uv(*parts, w[l][:, nope:], dt) for l in range(L)]) * 1000 / L, 2)
        res["ops"]["num_splits"] = parts[0].shape[2]
        print({k: res["ops"][k] for k in ("absorb", "attention splits", "attention + merge", "merge_uv", "num_splits")}, flush=True)
        dump()

    if "C" in PARTS:
        res["step_ms"] = {}
        for B in (1,):
            kv, table, lens, idx = state(B)
            r = {}
            for mode, pdl in {"fused": True, "fused no pdl": False}.items():
                K.PDL = pdl and res["pdl_available"]
                r[mode] = round(graph_ms(lambda: serve.fused_decode(model, idx, kv, table, lens, ROPE)), 4)
            K.PDL = res["pdl_available"]
            res["step_ms"][B] = r
            print("step", B, r, flush=True)
            dump()
        t0 = time.perf_counter()
        layers = [torch.compile(b, dynamic=True) for b in model.layers]
        for B in (1,):
            kv, table, lens, idx = state(B)
            cache = M.Cache(kv, table, lens)

            def run():
                cache.seq_lens.copy_(lens)
                return model(idx[:, None], cache=cache, layers=layers)[:, -1]
            res["step_ms"][B]["compiled"] = round(graph_ms(run), 4)
            print("step", B, res["step_ms"][B], f"(compiles {time.perf_counter() - t0:.0f} s)", flush=True)
            dump()
dump()
print("done", flush=True)
