# Issue 9 probe 3 (GPU only): mla_decode's split count and tile config for serving shapes (16 heads, R 512, P 64,
# page 64): B = 1, 8, 64 at a 640-token capacity (bench.py serve), and B = 1 at 4k and 16k. Each config is
# checked against mla_decode_ref, then timed as 24 calls on 24 caches in one CUDA graph (as in the model).
# Usage: [SHAPES=BxCAP,...] [SPLITS=1,2,...] python results/serve_probe/attn.py OUT_DIR
import itertools
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

import mla_kernel  # noqa: E402
import model as M  # noqa: E402

OUT = sys.argv[1]
dev, dt, L, H, R, P, page = torch.device("cuda"), torch.bfloat16, 24, 16, 512, 64, 64
res = {"provenance": M.provenance("cuda", torch.cuda.get_device_name()), "shapes": {}}
sms = torch.cuda.get_device_properties(dev).multi_processor_count


def graph_us(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(L):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(L):
            fn(i)
    return 1e3 * triton.testing.do_bench(g.replay, warmup=10, rep=100, return_mode="median") / L


SHAPES = [tuple(int(v) for v in x.split("x")) for x in os.environ.get("SHAPES", "1x640,8x640,64x640,1x4096,1x16384").split(",")]
SPLITS = [int(v) for v in os.environ["SPLITS"].split(",")] if os.environ.get("SPLITS") else None   # else around the default
for B, cap in SHAPES:
    seq = cap - 40
    nb = B * cap // page + 1
    caches = [torch.randn(nb, page, R + P, device=dev, dtype=dt) for _ in range(L)]
    table = torch.randperm(nb - 1, device=dev)[:B * cap // page].view(B, -1).int()
    lens = torch.full((B,), seq, device=dev, dtype=torch.int32)
    ql, qp = torch.randn(B, H, R, device=dev, dtype=dt), torch.randn(B, H, P, device=dev, dtype=dt)
    ref = mla_kernel.mla_decode_ref(ql, qp, caches[0], table, lens, 0.1).float()
    default = mla_kernel.num_kv_splits(B, 1, cap, sms, 2)
    fine = max(1, min(2 * sms // B, triton.cdiv(cap, 64)))        # MIN_SPLIT_TOKENS = 64
    rows = {}
    for s, c in itertools.product(SPLITS or sorted({default, fine, 2 * default, max(1, default // 2)}),
                                  [None] + list(itertools.product((16, 32, 64), (4, 8), (2, 3)))):
        try:
            f = lambda i: mla_kernel.mla_decode(ql, qp, caches[i], table, lens, 0.1, num_splits=s, config=c)  # noqa: E731
            err = (f(0).float() - ref).abs().max().item()
            if err > 0.05:
                print("wrong", B, cap, s, c, err)
                continue
            rows[f"splits={s} config={c}"] = round(graph_us(f), 2)
        except Exception as e:   # out of shared memory / registers
            print("skip", B, cap, s, c, type(e).__name__)
    best = sorted(rows.items(), key=lambda kv: kv[1])
    res["shapes"][f"B={B} cap={cap}"] = {"default_splits": default, "fine_splits": fine,
                                         "default_us": rows.get(f"splits={default} config=None"), "best": best[:8],
                                         "all": rows}
    print(f"B={B} cap={cap} default splits {default}: {rows.get(f'splits={default} config=None')} us; "
          f"fine splits {fine} default tiles: {rows.get(f'splits={fine} config=None')} us; best {best[:4]}", flush=True)
    json.dump(res, open(os.path.join(OUT, "attn.json"), "w"), indent=1)
    del caches
