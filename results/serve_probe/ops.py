# Issue 9 probe 2 (GPU only): the pieces of the 1b decode and prefill, timed alone, with the alternatives.
#  1. each projection at M = 1 and 64 rows, 24 distinct weights in one CUDA graph (as in the model: no L2 reuse),
#     and the fused pairs (q_a + kv_a, gate + up);
#  2. the two absorbed einsums (bmm on the strided kv_b view, bmm on contiguous copies, compiled multiply-sum);
#  3. mla_decode at B = 1 and 64, capacity 640, over split counts and tile configs;
#  4. one eager prefill forward (16 x 512 tokens, empty cache): wall time and its top kernels; the same compiled.
# Usage: python results/serve_probe/ops.py OUT_DIR
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.testing  # noqa: E402

import mla_kernel  # noqa: E402
import model as M  # noqa: E402

OUT = sys.argv[1]
dev, dt = torch.device("cuda"), torch.bfloat16
res = {"provenance": M.provenance("cuda", torch.cuda.get_device_name())}
dump = lambda: json.dump(res, open(os.path.join(OUT, "ops.json"), "w"), indent=1)  # noqa: E731
L = 24


def graph_us(fn, n=L):
    """Median microseconds per call of fn(i) for i < n, all n calls captured in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(n):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n):
            fn(i)
    return 1e3 * triton.testing.do_bench(g.replay, warmup=20, rep=300, return_mode="median") / n


# ---- 1. projections
shapes = {"q_a": (1536, 2048), "q_b": (3072, 1536), "kv_a": (576, 2048), "o": (2048, 2048), "gate": (4608, 2048),
          "down": (2048, 4608), "qkv_a (fused)": (2112, 2048), "gate_up (fused)": (9216, 2048), "lm_head": (260, 2048)}
res["linear"] = {}
for M_ in (1, 64):
    for name, (N, K) in shapes.items():
        ws = [torch.randn(N, K, device=dev, dtype=dt) * 0.02 for _ in range(L)]
        x = torch.randn(M_, K, device=dev, dtype=dt)
        us = graph_us(lambda i: F.linear(x, ws[i]))
        res["linear"][f"{name} M={M_}"] = {"us": round(us, 2), "GBps": round(2 * N * K / us / 1e3, 0)}
        print(f"linear {name:16s} M={M_:<3d} {us:7.2f} us  {2 * N * K / us / 1e3:7.0f} GB/s", flush=True)
        del ws
dump()

# ---- 2. absorbed einsums (H = 16, nope = v = 128, R = 512)
H, nope, dv, R = 16, 128, 128, 512
ws = [torch.randn(H, nope + dv, R, device=dev, dtype=dt) * 0.02 for _ in range(L)]
uk = [w[:, :nope].contiguous() for w in ws]
uv = [w[:, nope:].contiguous() for w in ws]
res["absorb"] = {}


def mulsum_uk(q, w):    # q (B, H, nope), w (H, nope, R)
    return (q[:, :, :, None].float() * w[None].float()).sum(2).to(q.dtype)


def mulsum_uv(o, w):    # o (B, H, R), w (H, dv, R)
    return (o[:, :, None, :].float() * w[None].float()).sum(-1).to(o.dtype)


cm_uk, cm_uv = torch.compile(mulsum_uk, dynamic=False), torch.compile(mulsum_uv, dynamic=False)
for B in (1, 64):
    q = torch.randn(B, H, nope, device=dev, dtype=dt)
    o = torch.randn(B, H, R, device=dev, dtype=dt)
    ref_uk = torch.einsum("bhd,hdr->bhr", q.double(), ws[0][:, :nope].double())
    for name, f in {"einsum strided": lambda i: torch.einsum("bhd,hdr->bhr", q, ws[i][:, :nope]),
                    "einsum contiguous": lambda i: torch.einsum("bhd,hdr->bhr", q, uk[i]),
                    "compiled mul-sum": lambda i: cm_uk(q, uk[i])}.items():
        err = (f(0).double() - ref_uk).abs().max().item()
        res["absorb"][f"W_UK {name} B={B}"] = {"us": round(graph_us(f), 2), "max_err": err}
    for name, f in {"einsum strided": lambda i: torch.einsum("bhr,hvr->bhv", o, ws[i][:, nope:]),
                    "einsum contiguous": lambda i: torch.einsum("bhr,hvr->bhv", o, uv[i]),
                    "compiled mul-sum": lambda i: cm_uv(o, uv[i])}.items():
        res["absorb"][f"W_UV {name} B={B}"] = {"us": round(graph_us(f), 2)}
for k, v in res["absorb"].items():
    print("absorb", k, v, flush=True)
dump()

# ---- 3. attention kernel
res["attn"] = {}
page, cap = 64, 640
for B, seq in ((1, 600), (64, 600)):
    nb = B * cap // page + 1
    caches = [torch.randn(nb, page, R + 64, device=dev, dtype=dt) for _ in range(L)]
    table = torch.randperm(nb - 1, device=dev)[:B * cap // page].view(B, -1).int()
    lens = torch.full((B,), seq, device=dev, dtype=torch.int32)
    ql = torch.randn(B, H, R, device=dev, dtype=dt)
    qp = torch.randn(B, H, 64, device=dev, dtype=dt)
    ref = mla_kernel.mla_decode_ref(ql, qp, caches[0], table, lens, 0.1).float()
    configs = [(None, None)] + [(s, c) for s in (1, 2, 3, 5, 10) for c in ((16, 4, 2), (32, 4, 2), (32, 4, 3), (64, 4, 2), (32, 2, 2), (16, 2, 3))]
    for s, c in configs:
        try:
            f = lambda i: mla_kernel.mla_decode(ql, qp, caches[i], table, lens, 0.1, num_splits=s, config=c)  # noqa: E731
            err = (f(0).float() - ref).abs().max().item()
            us = graph_us(f)
        except Exception as e:   # a config that does not compile
            print("attn", B, s, c, type(e).__name__, str(e)[:100])
            continue
        res["attn"][f"B={B} splits={s} config={c}"] = {"us": round(us, 2), "max_err": round(err, 4)}
    best = sorted(res["attn"].items(), key=lambda kv: kv[1]["us"])
    print("attn", B, "default", res["attn"][f"B={B} splits=None config=None"], "best", [b for b in best if b[0].startswith(f"B={B} ")][:5], flush=True)
    del caches
dump()

# ---- 4. prefill forward
torch.manual_seed(0)
model = M.Transformer(M.PRESETS["1b"]).to(dev, dt).eval().requires_grad_(False)
B, T = 16, 512
idx = torch.randint(0, 256, (B, T), device=dev)
nb = B * T // page
kv = torch.zeros(L, nb, page, R + 64, device=dev, dtype=dt)
table = torch.arange(nb, device=dev, dtype=torch.int32).view(B, -1)


def prefill(layers=None):
    return model(idx, cache=M.Cache(kv, table, torch.zeros(B, dtype=torch.int32, device=dev), start=0), layers=layers)


res["prefill"] = {}
with torch.inference_mode():
    for name, layers in (("eager", None), ("compiled", [torch.compile(b, dynamic=True) for b in model.layers])):
        t0 = time.perf_counter()
        prefill(layers)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        ms = triton.testing.do_bench(lambda: prefill(layers), warmup=3, rep=200, return_mode="median")
        t0 = time.perf_counter()
        prefill(layers)
        cpu_ms = 1e3 * (time.perf_counter() - t0)   # host time to enqueue (no sync)
        torch.cuda.synchronize()
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            prefill(layers)
            torch.cuda.synchronize()
        ks = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                k = ks.setdefault(e.name[:100], [0, 0.0])
                k[0] += 1
                k[1] += e.device_time_total
        top = sorted(ks.items(), key=lambda kv: -kv[1][1])[:15]
        tflops = 2 * model.num_params() * B * T / (ms / 1e3) / 1e12
        res["prefill"][name] = {"ms": round(ms, 2), "first_call_s": round(first, 1), "enqueue_ms": round(cpu_ms, 1),
                                "tflops_2N": round(tflops, 1), "kernels": sum(c for c, _ in ks.values()),
                                "kernel_ms": round(sum(u for _, u in ks.values()) / 1e3, 2),
                                "top": [[n, c, round(u, 1)] for n, (c, u) in top]}
        print("prefill", name, {k: v for k, v in res["prefill"][name].items() if k != "top"}, flush=True)
        for n, (c, u) in top:
            print(f"   {u:9.1f} us x{c:4d} {n}")
        dump()
