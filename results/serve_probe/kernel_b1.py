# Issue 9 follow-up probe (GPU only): mla_decode at batch 1, long caches (bench.py kernel's rows H=16, B=1), this
# tree's kernel with PDL on and off against earlier commits' mla_kernel.py carried in .old/mla_kernel_<commit>.py:
# bench.py kernel at 291360d measured B=1 32k 54.9 us and 128k 99.6 us where dc7003f's run had 39.1 and 83.3.
# Usage: python results/serve_probe/kernel_b1.py OUT_DIR [commit ...]
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

import bench  # noqa: E402
import mla_kernel  # noqa: E402
import model as M  # noqa: E402

OUT, OLD = sys.argv[1], sys.argv[2:]
R, P, page, dt = 512, 64, 64, torch.bfloat16
res = {"provenance": M.provenance("cuda", torch.cuda.get_device_name()), "rows": []}
flush = torch.ones(1 << 26, device="cuda", dtype=torch.int32)
PDL0 = mla_kernel.PDL
mods = [("head", mla_kernel, PDL0), ("head PDL off", mla_kernel, False)]
for c in OLD:
    spec = importlib.util.spec_from_file_location(f"mla_kernel_{c}", os.path.join(ROOT, ".old", f"mla_kernel_{c}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mods.append((c, mod, None))
torch.manual_seed(0)
for H, L in ((16, 4096), (16, 32768), (16, 131072), (128, 32768)):
    pages = L // page
    cache = torch.randn(pages, page, R + P, device="cuda", dtype=dt)
    table = torch.randperm(pages, device="cuda").view(1, pages).int()
    lens = torch.full((1,), L, device="cuda", dtype=torch.int32)
    q_lat, q_pe = torch.randn(1, H, R, device="cuda", dtype=dt), torch.randn(1, H, P, device="cuda", dtype=dt)
    ref = mla_kernel.mla_decode_ref(q_lat, q_pe, cache, table, lens, 0.1)
    row = {"H": H, "L": L}
    for name, mod, pdl in mods:
        if pdl is not None:
            mod.PDL = pdl
        err = bench.rel_err(mod.mla_decode(q_lat, q_pe, cache, table, lens, 0.1), ref.double())
        ms, clean = bench.time_graph(lambda: mod.mla_decode(q_lat, q_pe, cache, table, lens, 0.1), 200, flush)
        row[name] = {"us": round(ms * 1e3, 1), "us_clean_flush": round(clean * 1e3, 1), "err": err}
    mla_kernel.PDL = PDL0
    print(row, flush=True)
    res["rows"].append(row)
    json.dump(res, open(os.path.join(OUT, "kernel_b1.json"), "w"), indent=1)
