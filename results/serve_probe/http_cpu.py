# Issue 9 probe: CPU seconds per streamed token in each process of an HTTP run (the API server, its engine
# process, the load generator), from /proc and getrusage: which one a faster GPU step would wait on.
# Usage: python results/serve_probe/http_cpu.py OUT_DIR [PRESET, default 1b] [server flags...]
import json
import os
import resource
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

import bench  # noqa: E402
import model as M  # noqa: E402

OUT, PRESET, EXTRA = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "1b"), sys.argv[3:]
P, T, C, N = (int(x) for x in os.environ.get("PTCN", "512,128,64,128").split(","))
TICK = os.sysconf("SC_CLK_TCK")


def cpu(pid):   # user + system seconds of a process, all its threads
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def children(pid):
    out = []
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            out += [int(c) for c in open(f"/proc/{pid}/task/{t}/children").read().split()]
        except OSError:
            pass
    return out


dev = "cuda" if torch.cuda.is_available() else "cpu"
tmp = tempfile.mkdtemp()
ckpt = os.path.join(tmp, "ckpt.pt")
torch.manual_seed(0)
M.save_checkpoint(ckpt, M.Transformer(M.PRESETS[PRESET]))
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(0, 256, (P,), generator=g).tolist() for _ in range(N)]
flags = [f"--ckpt={ckpt}", "--dtype=auto", "--page=64", f"--max_num_seqs={C}", f"--max_model_len={P + T}",
         f"--kv_cache_tokens={C * (P + T + 64)}", "--served_model_name=bench", "--max_num_batched_tokens=8192", *EXTRA]


def body(i):
    return ("/v1/completions", {"prompt": prompts[i % N], "max_tokens": T, "temperature": 0, "ignore_eos": True,
                                "stream": True, "return_token_ids": True, "stream_options": {"include_usage": True}}, None)


res = {"provenance": M.provenance(dev, torch.cuda.get_device_name() if dev == "cuda" else "cpu"), "preset": PRESET,
       "P": P, "T": T, "C": C, "N": N, "flags": EXTRA, "runs": []}
proc, url = bench.spawn_server(flags, os.path.join(OUT, "server.log"), timeout=480)
try:
    bench.run_load(url, body, C, num_requests=C)   # warm-up
    for switch in (None, 0.0005):   # the client's GIL switch interval: 5 ms (Python's) or 0.5 ms
        sys.setswitchinterval(switch or 0.005)
        pids = {"api": proc.pid, **{f"engine{i}": c for i, c in enumerate(children(proc.pid))}}
        c0, r0 = {k: cpu(p) for k, p in pids.items()}, resource.getrusage(resource.RUSAGE_SELF)
        recs, wall = bench.run_load(url, body, C, num_requests=N)
        c1, r1 = {k: cpu(p) for k, p in pids.items()}, resource.getrusage(resource.RUSAGE_SELF)
        s = bench.summarize(recs, wall)
        tokens = s["generated_tokens"]
        use = {k: round(c1[k] - c0[k], 2) for k in pids}
        use["client"] = round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 2)
        row = {"client_switch_interval": switch, "throughput_tok_s": s["throughput_tok_s"], "wall_s": round(wall, 3), "tokens": tokens,
               "cpu_s": use, "cpu_util": {k: round(v / wall, 2) for k, v in use.items()},
               "cpu_us_per_token": {k: round(1e6 * v / tokens, 1) for k, v in use.items()},
               "ttft_ms": s["ttft_ms"], "tpot_ms": s.get("tpot_ms")}
        print(row, flush=True)
        res["runs"].append(row)
finally:
    proc.terminate()
    proc.wait(timeout=120)
json.dump(res, open(os.path.join(OUT, "http_cpu.json"), "w"), indent=1)
