# Issue 9 probe (GPU only): why a small eager prefill forward takes ~50 ms of wall for ~4 ms of kernels (row 68).
# 1b preset, random weights, bf16, prompts of 512 tokens into a paged cache, as serve.Engine._prefill runs them.
#  For B = 1, 2, 4, 8, 16 prompts: wall per forward (events over 10 calls), host time to enqueue one forward
#  (perf_counter, no sync), kernel time (profiler). At B = 1: the host's top ops by self CPU time.
#  Variant "flash": SDPA with V padded to D (the path off Hopper), which picks the flash backend, not cuDNN.
# Usage: python results/serve_probe/prefill_host.py OUT_DIR
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import model as M  # noqa: E402

OUT = sys.argv[1]
dev, dt, T, page = torch.device("cuda"), torch.bfloat16, 512, 64
res = {"provenance": M.provenance("cuda", torch.cuda.get_device_name()), "T": T, "rows": []}
torch.manual_seed(0)
cfg = M.PRESETS["1b"]
with torch.device(dev):
    model = M.Transformer(cfg)
model = M.fuse_projections(model.to(dt).eval().requires_grad_(False))
L, W = cfg.num_hidden_layers, M.cache_width(cfg)
real_cap = torch.cuda.get_device_capability


def forward_fn(B):
    pages = T // page + 1
    kv = torch.zeros(L, B * pages + 1, page, W, device=dev, dtype=dt)
    cache = M.Cache(kv, torch.arange(B * pages, device=dev, dtype=torch.int32).view(B, pages),
                    torch.zeros(B, device=dev, dtype=torch.int32))
    idx = torch.randint(0, cfg.vocab_size, (B, T), device=dev)

    def fwd():
        cache.seq_lens.zero_()
        cache.start = 0          # as the engine passes it: no device sync for the cached length
        return model(idx, cache=cache)[:, -1]
    return fwd


def measure(B, variant):
    fwd = forward_fn(B)
    with torch.inference_mode():
        for _ in range(3):
            fwd()
        torch.cuda.synchronize()
        hosts = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fwd()
            hosts.append(1e3 * (time.perf_counter() - t0))
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(10):
            fwd()
        b.record()
        b.synchronize()
        wall = a.elapsed_time(b) / 10
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fwd()
            torch.cuda.synchronize()
    ev = prof.key_averages()
    kernel_ms = sum(e.self_device_time_total for e in ev if e.self_device_time_total > 0) / 1e3
    row = {"B": B, "variant": variant, "wall_ms": round(wall, 3), "host_enqueue_ms": round(sorted(hosts)[2], 3),
           "kernel_ms": round(kernel_ms, 3)}
    if B == 1:
        cpu = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:25]
        row["top_self_cpu_us"] = [[e.key[:80], e.count, round(e.self_cpu_time_total, 1)] for e in cpu]
    print(json.dumps({k: v for k, v in row.items() if k != "top_self_cpu_us"}), flush=True)
    res["rows"].append(row)
    json.dump(res, open(os.path.join(OUT, "prefill_host.json"), "w"), indent=1)


for B in (1, 2, 4, 8, 16):
    measure(B, "default")
torch.cuda.get_device_capability = lambda d=None: (8, 0)   # V padded: SDPA picks flash
for B in (1, 4, 16):
    measure(B, "flash")
torch.cuda.get_device_capability = real_cap
for r in res["rows"]:
    if "top_self_cpu_us" in r:
        print(r["variant"], *r["top_self_cpu_us"][:15], sep="\n  ")
