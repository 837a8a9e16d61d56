# Issue 9 probe (GPU only): where serving time goes for the 1b preset (random weights, bf16).
#  A. the batch-1 decode graph (compiled blocks): its kernels (torch.profiler over replays), and replay time per bucket;
#  B. serve.Engine stepped in this process, closed loop at 64 (128 requests of 512 + 128 tokens): tok/s and where
#     each step's time goes, for several --max_num_batched_tokens;
#  C. the same load over HTTP (serve.py subprocess): bench.py's 64-thread client vs 4 processes of 16 threads;
#  E. the kernels of the 64-row decode graph and of one eager prefill forward of 8192 tokens;
#  D. the same over HTTP with server variants: sys.setswitchinterval (the engine thread waits less for the GIL),
#     uvloop + httptools (uvicorn picks them up when installed; env SITE2 = where they are).
# Usage: python results/serve_probe/probe.py OUT_DIR [parts, default ABC]
import json
import multiprocessing as mp
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
import triton.testing  # noqa: E402

import bench  # noqa: E402
import model as M  # noqa: E402
import serve  # noqa: E402

OUT, PARTS = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ABC"
P, T, C, N = (int(x) for x in os.environ.get("PTCN", "512,128,64,128").split(","))
BUDGETS = [int(b) for b in os.environ.get("BUDGETS", "2048,8192,16384").split(",")]
PRESET = os.environ.get("PRESET", "1b")   # PRESET=tiny on CPU: a dry run of parts B and C
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
res = {"provenance": M.provenance(dev.type, torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"),
       "preset": PRESET, "P": P, "T": T, "C": C, "N": N}
dump = lambda: json.dump(res, open(os.path.join(OUT, "probe.json"), "w"), indent=1)  # noqa: E731
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(0, 256, (P,), generator=g).tolist() for _ in range(N)]
flags = ["--dtype=auto", "--page=64", f"--max_num_seqs={C}", f"--max_model_len={P + T}",
         f"--kv_cache_tokens={C * (P + T + 64)}", "--served_model_name=bench"]


def kernel_table(fn, reps=20, top=30):
    """CUDA kernels of fn() over `reps` calls (torch.profiler), per call: count and microseconds, largest first."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(e.name, [0, 0.0])
            k[0] += 1
            k[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    rows = sorted(([n, c / reps, us / reps] for n, (c, us) in kernels.items()), key=lambda r: -r[2])
    out = {"kernels_per_replay": sum(r[1] for r in rows), "kernel_us_per_replay": sum(r[2] for r in rows),
           "kernels": [[n[:140], round(c, 2), round(us, 2)] for n, c, us in rows]}
    print(f"kernels per call {out['kernels_per_replay']:.0f}, kernel time {out['kernel_us_per_replay']:.0f} us", flush=True)
    for n, c, us in rows[:top]:
        print(f"  {us:8.1f} us  x{c:5.1f}  {n[:110]}")
    return out


torch.manual_seed(0)
model = M.Transformer(M.PRESETS[PRESET]).to(dev, dt).eval().requires_grad_(False)
scfg = serve.parse_args(flags + ["--ckpt=unused"])
serve.size_cache(scfg, model.config, dev, dt)
eng = serve.Engine(model, scfg)
t0 = time.perf_counter()
eng.capture_graphs()
res["capture_s"] = round(time.perf_counter() - t0, 1)
res["compiled"] = eng.layers is not None
print("captured", res["capture_s"], "s, compiled", res["compiled"], flush=True)

if "A" in PARTS:
    st = eng.static
    res["replay_ms"] = {}
    with torch.inference_mode():
        for Bb in eng.buckets:
            st["lens"][:Bb].fill_(P)
            lens0 = st["lens"][:Bb].clone()
            res["replay_ms"][Bb] = round(triton.testing.do_bench(
                lambda: (st["lens"][:Bb].copy_(lens0), eng.graphs[Bb]()), warmup=20, rep=300, return_mode="median"), 4)
        print("replay ms by bucket", res["replay_ms"], flush=True)

    def prep1():
        st["lens"][:1].fill_(P)
    res.update(kernel_table(lambda: (prep1(), eng.graphs[1]())))
    dump()

if "E" in PARTS:   # E. kernels of the 64-row decode graph and of one eager prefill forward (16 prompts of P)
    st = eng.static
    with torch.inference_mode():
        def prep64():
            st["lens"][:C].fill_(P)
        res["graph64"] = kernel_table(lambda: (prep64(), eng.graphs[C]()))
        dump()
        Bp = 8192 // P
        idx = torch.randint(0, 256, (Bp, P), device=dev)
        blocks = torch.arange(Bp * (P // 64), dtype=torch.int32, device=dev).view(Bp, P // 64)

        def prefill():
            eng.model(idx, cache=M.Cache(eng.kv, blocks, torch.zeros(Bp, dtype=torch.int32, device=dev), start=0))
        res["prefill"] = kernel_table(prefill, reps=5)
        res["prefill"]["ms"] = round(triton.testing.do_bench(prefill, warmup=3, rep=200, return_mode="median"), 3)
        print("prefill ms", res["prefill"]["ms"], flush=True)
    dump()

if "B" in PARTS:
    def run_engine(budget, timers=True):
        """timers=False: no per-phase timing (its syncs stop decode from running ahead of the host): wall only."""
        eng.cfg.max_num_batched_tokens = budget
        times = {"decode": [], "prefill": [], "step": []}
        dec, pre, pre_fixed = eng._decode, eng._prefill, eng._prefill_fixed

        def timed(f, key):   # (seconds, rows, tokens) a call; prefill gets [(request, chunk length)]
            def g(*a):
                t = time.perf_counter()
                out = f(*a)
                sync()
                times[key].append((time.perf_counter() - t, len(a[0]), sum(n for _, n in a[0]) if key == "prefill" else 1))
                return out
            return g
        if timers:
            eng._decode, eng._prefill, eng._prefill_fixed = timed(dec, "decode"), timed(pre, "prefill"), timed(pre_fixed, "prefill")
        sp = serve.SamplingParams(max_tokens=T, temperature=0.0, ignore_eos=True)
        done, sent, reqs = [], 0, []
        t0 = time.perf_counter()
        for _ in range(C):
            reqs.append(eng.submit(prompts[sent % N], sp))
            sent += 1
        while len(done) < N:
            t = time.perf_counter()
            eng.step()
            times["step"].append(time.perf_counter() - t)
            for r in [r for r in reqs if r.finish_reason is not None]:
                reqs.remove(r)
                done.append(r)
                if sent < N:
                    reqs.append(eng.submit(prompts[sent % N], sp))
                    sent += 1
        wall = time.perf_counter() - t0
        eng._decode, eng._prefill, eng._prefill_fixed = dec, pre, pre_fixed
        gen = sum(r.num_generated for r in done)
        d64 = sorted(t for t, b, _ in times["decode"] if b == C)
        out = {"budget": budget, "wall_s": round(wall, 3), "tok_s": round(gen / wall, 1), "steps": len(times["step"]),
               "decode_calls": len(times["decode"]), "decode_s": round(sum(t for t, _, _ in times["decode"]), 3),
               "decode64_ms_p50": round(1e3 * d64[len(d64) // 2], 3) if d64 else None,
               "prefill_calls": len(times["prefill"]), "prefill_s": round(sum(t for t, _, _ in times["prefill"]), 3),
               "prefill_tokens_per_call": round(sum(n for _, _, n in times["prefill"]) / max(1, len(times["prefill"])), 1),
               "step_s": round(sum(times["step"]), 3), "ttft_ms_p50": bench.pct([r.first_token - r.arrival for r in done], 50),
               "ttft_ms_p99": bench.pct([r.first_token - r.arrival for r in done], 99)}
        out["other_s"] = round(out["step_s"] - out["decode_s"] - out["prefill_s"], 3)
        print("engine", out, flush=True)
        return out

    with torch.inference_mode():
        run_engine(8192)   # warm-up: prefill shapes
        res["engine"] = [run_engine(b) for b in BUDGETS]
        res["engine_untimed"] = [run_engine(b, timers=False) for b in BUDGETS]
        if os.environ.get("PREFILL_COMPILED") and eng.layers is not None:
            # the same load with prefill through the compiled blocks too (decode replays are unchanged): what a
            # compiled prefill would buy, and how often dynamo compiles for the shapes the scheduler makes
            import torch._dynamo.utils as dyn
            eng.model = lambda idx, cache: model(idx, cache=cache, layers=eng.layers)
            g0, t0 = dict(dyn.counters["stats"]), time.perf_counter()
            first = run_engine(8192)
            first["wall_incl_compiles_s"] = round(time.perf_counter() - t0, 1)
            g1 = dict(dyn.counters["stats"])
            again = run_engine(8192)
            g2 = dict(dyn.counters["stats"])
            res["engine_prefill_compiled"] = {"first": first, "again": again,
                                              "graphs_compiled_first": g1.get("unique_graphs", 0) - g0.get("unique_graphs", 0),
                                              "graphs_compiled_again": g2.get("unique_graphs", 0) - g1.get("unique_graphs", 0)}
            print("prefill compiled", res["engine_prefill_compiled"], flush=True)
    dump()

del eng
if dev.type == "cuda":
    torch.cuda.empty_cache()


def proc_client(args):
    url, idx, T_, conc = args
    body = lambda i: ("/v1/completions", {"prompt": prompts[idx[i % len(idx)]], "max_tokens": T_, "temperature": 0,  # noqa: E731
                                          "ignore_eos": True, "stream": True, "return_token_ids": True,
                                          "stream_options": {"include_usage": True}}, None)
    recs, wall = bench.run_load(url, body, conc, num_requests=len(idx))   # (was len(idx) // 2: 128 clients at N=256)
    return recs


if "C" in PARTS or "D" in PARTS:
    import tempfile
    tmp = tempfile.mkdtemp()
    ckpt = os.path.join(tmp, "ckpt.pt")
    M.save_checkpoint(ckpt, model.float().cpu())
    del model

def body(i):   # one streamed greedy request of the load
    return ("/v1/completions", {"prompt": prompts[i % N], "max_tokens": T, "temperature": 0, "ignore_eos": True,
                                "stream": True, "return_token_ids": True, "stream_options": {"include_usage": True}}, None)


if "C" in PARTS:
    res["http"] = []
    for budget in [int(b) for b in os.environ.get("HTTP_BUDGETS", "2048,8192").split(",")]:
        proc, url = bench.spawn_server([f"--ckpt={ckpt}", *flags, f"--max_num_batched_tokens={budget}"],
                                       os.path.join(OUT, f"server_{budget}.log"), timeout=480)
        try:
            bench.run_load(url, body, C, num_requests=C)   # warm-up
            for mode in ("threads", "procs"):
                m0 = bench.scrape(url)
                t0 = time.perf_counter()
                if mode == "threads":
                    recs, wall = bench.run_load(url, body, C, num_requests=N)
                else:
                    with mp.get_context("fork").Pool(4) as pool:
                        parts = pool.map(proc_client, [(url, list(range(k, N, 4)), T, C // 4) for k in range(4)])
                    recs, wall = [r for p in parts for r in p], time.perf_counter() - t0
                m1 = bench.scrape(url)
                row = {"budget": budget, "client": mode, **bench.summarize(recs, wall),
                       "server_generation_tokens": m1["vllm:generation_tokens_total"] - m0["vllm:generation_tokens_total"]}
                print(bench.serve_line({"engine": f"http {mode} {budget}", "concurrency": C, **row}), flush=True)
                res["http"].append(row)
                dump()
        finally:
            proc.terminate()
            proc.wait(timeout=120)
dump()

if "D" in PARTS:
    import socket
    import subprocess
    import urllib.request
    res["http_variants"] = []

    def spawn(prefix, flags_, log_path, pythonpath):
        with socket.socket() as s_:
            s_.bind(("127.0.0.1", 0))
            port = s_.getsockname()[1]
        argv = ["serve.py", f"--port={port}", *flags_]
        code = (f"import sys, runpy; {prefix}; sys.argv = {argv!r}; "
                f"runpy.run_path({os.path.join(ROOT, 'serve.py')!r}, run_name='__main__')")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=open(log_path, "w"),
                                env=dict(os.environ, PYTHONPATH=pythonpath))
        url, t0 = f"http://127.0.0.1:{port}", time.time()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}; see {log_path}")
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                return proc, url
            except OSError:
                if time.time() - t0 > 480:
                    proc.kill()
                    raise
                time.sleep(0.3)

    base, site2 = os.environ.get("PYTHONPATH", ""), os.environ.get("SITE2", "")
    variants = [("8192", "pass", base), ("8192 switch 0.5ms", "sys.setswitchinterval(0.0005)", base),
                ("8192 switch 0.5ms uvloop httptools", "sys.setswitchinterval(0.0005)", f"{site2}:{base}")]
    for name, prefix, pp in variants:
        proc, url = spawn(prefix, [f"--ckpt={ckpt}", *flags, "--max_num_batched_tokens=8192"],
                          os.path.join(OUT, "server_" + name.replace(" ", "_").replace(".", "") + ".log"), pp)
        try:
            bench.run_load(url, body, C, num_requests=C)   # warm-up
            recs, wall = bench.run_load(url, body, C, num_requests=N)
            row = {"variant": name, **bench.summarize(recs, wall)}
            print(bench.serve_line({"engine": name, "concurrency": C, **row}), flush=True)
            res["http_variants"].append(row)
            dump()
        finally:
            proc.terminate()
            proc.wait(timeout=120)
