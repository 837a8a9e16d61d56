# Issue 9 probe 4 (GPU only): the 1b batch-1 decode graph with the blocks compiled three ways: serve.py's
# (dynamic=True, default inductor), static shapes with coordinate-descent tuning, and static max-autotune
# (inductor benchmarks Triton GEMM templates against cuBLAS per shape). Replay median, logits vs eager.
# (first run, static shapes: results/serve_probe/autotune_static_h100.json)
# Usage: python results/serve_probe/autotune.py OUT_DIR
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
import triton.testing  # noqa: E402

import model as M  # noqa: E402
import serve  # noqa: E402

OUT, P = sys.argv[1], 512
dev, dt = torch.device("cuda"), torch.bfloat16
res = {"provenance": M.provenance("cuda", torch.cuda.get_device_name()), "variants": {}}
torch.manual_seed(0)
model = M.Transformer(M.PRESETS["1b"]).to(dev, dt).eval().requires_grad_(False)
flags = ["--ckpt=unused", "--dtype=auto", "--page=64", "--max_num_seqs=64", "--max_model_len=640", "--kv_cache_tokens=45056"]
# dynamic=True throughout: with static shapes the layer index specialises too, one compile per layer (the
# recompile limit of 8 then leaves the rest eager)
variants = {"serve.py (dynamic)": lambda b: torch.compile(b, dynamic=True),
            "+ coordinate descent": lambda b: torch.compile(b, dynamic=True, options={"coordinate_descent_tuning": True}),
            "max-autotune": lambda b: torch.compile(b, dynamic=True, mode="max-autotune-no-cudagraphs")}
want = None
for name, comp in variants.items():
    torch._dynamo.reset()   # each variant starts with no compiled code (one code object: Block.forward)
    scfg = serve.parse_args(flags)
    serve.size_cache(scfg, model.config, dev, dt)
    eng = serve.Engine(model, scfg)
    eng.layers = [comp(b) for b in model.layers]
    t0 = time.perf_counter()
    try:
        eng.capture_graphs([1])
    except Exception as e:
        res["variants"][name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        print(name, res["variants"][name], flush=True)
        continue
    st, n = eng.static, torch.tensor([P], dtype=torch.int32, device=dev)
    with torch.inference_mode():
        st["idx"][:1].fill_(65)
        ms = triton.testing.do_bench(lambda: (st["lens"][:1].copy_(n), eng.graphs[1]()), warmup=20, rep=500,
                                     return_mode="median")
        st["lens"][:1].copy_(n)
        got = eng.graphs[1]().float().clone()
        if want is None:
            want = model(st["idx"][:1], cache=M.Cache(eng.kv, st["table"][:1], n.clone()))[:, -1].float()
    res["variants"][name] = {"compile_capture_s": round(time.perf_counter() - t0, 1), "replay_ms": round(ms, 4),
                             "max_abs_logit_diff_vs_eager": round((got - want).abs().max().item(), 4),
                             "same_argmax": bool((got.argmax(-1) == want.argmax(-1)).all())}
    print(name, res["variants"][name], flush=True)
    json.dump(res, open(os.path.join(OUT, "autotune.json"), "w"), indent=1)
    del eng
    torch.cuda.empty_cache()
