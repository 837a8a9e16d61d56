# Issue 9 probe (GPU only): serve.Engine's prefill CUDA graphs (rows padded to a bucket, tokens to a power of two)
# against the eager prefill forward, 1b preset, random weights, bf16.
#  Correctness: each row's last-token logits from a graph replay vs an eager forward of that prompt alone.
#  Speed: a replay vs the eager forward of the same batch (events; 20 calls each), for B x 512 and a ragged batch.
# Usage: python results/serve_probe/prefill_graph.py OUT_DIR   (on a CPU: a dry run, tiny preset, fp32, no timing meaning)
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

import model as M  # noqa: E402
import serve  # noqa: E402

OUT = sys.argv[1]
cuda = torch.cuda.is_available()
dev, dt = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
res = {"provenance": M.provenance(dev.type, torch.cuda.get_device_name() if cuda else None), "cases": []}
torch.manual_seed(0)
with torch.device(dev):
    model = M.Transformer(M.PRESETS["1b" if cuda else "tiny"])
model = model.to(dt).eval().requires_grad_(False)
cfg = serve.ServeConfig(page=64, max_num_seqs=64, max_model_len=640, num_blocks=704, max_num_batched_tokens=8192,
                        compile=False, fused_decode=False)   # decode graphs: eager blocks (no compile wait)
eng = serve.Engine(model, cfg)
eng.use_graphs = True
V = model.config.vocab_size


def ms(fn, n=20):
    if not cuda:
        return None
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    b.synchronize()
    return round(a.elapsed_time(b) / n, 3)


with torch.inference_mode():
    t0 = time.perf_counter()
    eng.capture_graphs()
    res["capture_all_s"] = round(time.perf_counter() - t0, 1)
    res["prefill_graphs"] = sorted(eng.prefill_graphs)
    print("captured", res["capture_all_s"], "s:", res["prefill_graphs"], flush=True)
    for lens in ([512], [512] * 2, [512] * 4, [512] * 8, [300, 512, 100]):
        B, n_pad = len(lens), 512
        Bb = next(b for b in eng.buckets if b >= B)
        st, run = eng.prefill_graphs[Bb, n_pad]
        W = st["table"].shape[1]
        prompts = [torch.randint(0, V, (n,)).tolist() for n in lens]
        table = [list(range(i * 10, i * 10 + W)) for i in range(B)] + [[eng.scratch] * W] * (Bb - B)
        st["idx"].copy_(torch.tensor([p + [0] * (n_pad - len(p)) for p in prompts] + [[0] * n_pad] * (Bb - B)))
        st["table"].copy_(torch.tensor(table, dtype=torch.int32))
        got = run()[torch.arange(B), torch.tensor(lens) - 1].float()                                   # (B, V)
        want = []
        for p in prompts:   # each prompt alone, eager, in a cache of its own
            cache = M.new_cache(model.config, 1, 640, 64, dt, dev)
            want.append(model(torch.tensor([p], device=dev), cache=cache)[0, -1].float())
        want = torch.stack(want)
        case = {"lens": lens, "graph": [Bb, n_pad], "max_abs_logit_diff": round((got - want).abs().max().item(), 4),
                "logit_scale": round(want.abs().max().item(), 3), "same_argmax": bool((got.argmax(-1) == want.argmax(-1)).all()),
                "replay_ms": ms(run)}
        if len(set(lens)) == 1:   # the eager forward the engine ran before: B rows of one length
            idx = torch.tensor(prompts, device=dev)
            cache = M.Cache(eng.kv, torch.tensor(table[:B], dtype=torch.int32, device=dev)[:, :-(-lens[0] // 64)],
                            torch.zeros(B, dtype=torch.int32, device=dev))

            def eager():
                cache.seq_lens.zero_()
                cache.start = 0
                return model(idx, cache=cache)[:, -1]
            case["eager_ms"] = ms(eager)
        print(case, flush=True)
        res["cases"].append(case)
json.dump(res, open(os.path.join(OUT, "prefill_graph.json"), "w"), indent=1)
ok = all(c["max_abs_logit_diff"] < 0.1 * c["logit_scale"] for c in res["cases"])   # a wrong row or position: ~scale
print("prefill graphs match eager:", ok)
sys.exit(0 if ok else 1)
