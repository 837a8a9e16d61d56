# Issue 9 probe: where does HTTP lose ~13% of the engine's 64-client throughput? A timeline of every engine
# step (start, end, rows decoded, prompt tokens prefilled, running, waiting) and of every request (arrival at
# the engine, finish there; send, first chunk and end at the client), for bench.py's load (64 threads x 4
# rounds of 512 + 128 tokens, streamed) over HTTP, and for the same load stepped in this process.
# Usage: python results/serve_probe/trace.py OUT_DIR        (GPU, 1b; PRESET=tiny PTCN=64,16,8,16 on CPU)
# The server runs as this file with TRACE_FILE set: serve.py whose Engine writes its steps there (a spawned
# engine process imports this file again as __mp_main__, so the patch reaches it).
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import serve  # noqa: E402

TRACE = os.environ.get("TRACE_FILE")


def log_gc(log):
    """Every collection of generation 2, or any over 2 ms: (start, end, generation, pid)."""
    import gc
    t = [0.0]

    def cb(phase, info):
        if phase == "start":
            t[0] = time.perf_counter()
        elif info["generation"] == 2 or time.perf_counter() - t[0] > 0.002:
            log({"gc": [t[0], time.perf_counter(), info["generation"], os.getpid()]})
    gc.callbacks.append(cb)


def install_trace(path):
    """Engine.step / _schedule / submit / _finish append JSON lines to path (flushed every 64 lines)."""
    f, n = open(path, "a"), [0]

    def log(obj):
        f.write(json.dumps(obj) + "\n")
        n[0] += 1
        if n[0] % 64 == 0:
            f.flush()
    step, schedule, submit, finish = serve.Engine.step, serve.Engine._schedule, serve.Engine.submit, serve.Engine._finish

    def traced_schedule(self):
        d, p = schedule(self)
        self._trace = (len(d), sum(k for _, k in p), len(p))
        return d, p

    def traced_step(self):
        self._trace = (0, 0, 0)
        t0 = time.perf_counter()
        busy = step(self)
        t1 = time.perf_counter()
        if busy:
            log({"s": [t0, t1, *self._trace, len(self.running), len(self.waiting)]})
        return busy

    def traced_submit(self, prompt, params, sink=None, id=None, arrival=None):
        r = submit(self, prompt, params, sink=sink, id=id, arrival=arrival)
        log({"a": [time.perf_counter(), arrival, str(r.id)]})
        return r

    def traced_finish(self, r, reason, new=()):
        log({"f": [time.perf_counter(), str(r.id), reason]})
        return finish(self, r, reason, new)
    log_gc(log)
    serve.Engine.step, serve.Engine._schedule = traced_step, traced_schedule
    serve.Engine.submit, serve.Engine._finish = traced_submit, traced_finish
    import atexit
    atexit.register(f.flush)


if TRACE:
    install_trace(TRACE)
    if os.environ.get("NOFREEZE"):   # variant: serve.py without its gc.freeze()
        import gc
        gc.freeze = lambda: None
    if os.environ.get("SWITCH"):   # variant: a shorter GIL switch interval in the server's processes
        sys.setswitchinterval(float(os.environ["SWITCH"]))
if __name__ == "__main__" and TRACE:
    pass
    serve.main(sys.argv[1:])
    sys.exit(0)


def cpu_ticks(pid):
    """{tid: user + system clock ticks} of a process's threads."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            f = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            out[int(tid)] = int(f[11]) + int(f[12])
        except OSError:
            pass
    return out


def children(pid):
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d))
            except OSError:
                pass
    return kids


def cpu_use(before, after, wall):
    """Per process: its total and its busiest threads, in cores (CPU seconds per wall second)."""
    hz = os.sysconf("SC_CLK_TCK")
    res = {}
    for name, b in before.items():
        a = after.get(name, {})
        d = sorted(((a.get(t, 0) - v) / hz / wall for t, v in b.items()), reverse=True)
        res[name] = {"total": round(sum(d), 2), "threads": [round(x, 2) for x in d[:4]]}
    return res


def pyspy_summary(path, top=40):
    """py-spy's raw stacks ("process P:cmd;thread (T): name;frame;... count") -> per process and thread: samples,
    the frames most often on the stack (inclusive) and on top (self). The engine process keeps only stacks in
    Engine.step (its start-up compiles would swamp them)."""
    import re
    from collections import Counter
    per = {}
    for line in open(path, errors="replace"):
        stack, _, n = line.rstrip("\n").rpartition(" ")
        procs = re.findall(r'process (\d+):"[^"]*";', stack)   # a child's stacks are prefixed by its parents'
        frames = re.sub(r'process \d+:"[^"]*";', "", stack).split(";")
        if not procs or len(frames) < 2 or not n.isdigit():
            continue
        thread = frames[0].split(":")[-1].strip() or frames[0]
        frames = frames[1:]
        key = f"{procs[-1]} {'engine' if 'engine_process' in stack else 'api'} {thread}"
        if "engine_process" in stack and "step" not in stack or "_find_and_load" in stack:   # start-up, imports
            continue
        d = per.setdefault(key, {"samples": 0, "incl": Counter(), "self": Counter()})
        d["samples"] += int(n)
        for f in set(frames):
            d["incl"][f] += int(n)
        d["self"][frames[-1]] += int(n)
    return {k: {"samples": d["samples"], "inclusive": d["incl"].most_common(top), "self": d["self"].most_common(top // 2)}
            for k, d in sorted(per.items(), key=lambda kv: -kv[1]["samples"])[:8]}


def steps_summary(lines, C):
    """Totals over the traced steps: busy time, gaps between steps, decode steps by rows, prefill work."""
    s = sorted(x["s"] for x in lines if "s" in x)
    if not s:
        return {}
    busy = sum(t1 - t0 for t0, t1, *_ in s)
    span = s[-1][1] - s[0][0]
    full = [x for x in s if x[2] == C]
    part = [x for x in s if 0 < x[2] < C]
    pre = [x for x in s if x[3] > 0]
    hist = {}
    for x in s:
        if x[2]:
            b = min(C, 8 * ((x[2] + 7) // 8))
            hist[b] = hist.get(b, 0) + 1
    # rows that prefill graphs padded, when a step's prompts (whole, one length) go in graphs of <= 8 rows each
    # (the 1b bench's 512-token prompts) padded to the decode buckets (powers of two)
    padded = 0
    for x in pre:
        k = x[4]
        for rows in [8] * (k // 8) + ([k % 8] if k % 8 else []):
            padded += (1 << (rows - 1).bit_length()) - rows
    return {"steps": len(s), "span_s": round(span, 3), "prefill_rows_padded_to_pow2": padded, "busy_s": round(busy, 3), "gap_s": round(span - busy, 3),
            "decode_steps": sum(1 for x in s if x[2]), "full_decode_steps": len(full),
            "partial_decode_steps": len(part), "partial_decode_rows_mean": round(sum(x[2] for x in part) / max(1, len(part)), 1),
            "decode_steps_by_rows_upto": dict(sorted(hist.items())),
            "prefill_steps": len(pre), "prefill_tokens": sum(x[3] for x in pre),
            "prefill_step_s": round(sum(x[1] - x[0] for x in pre), 3),
            "pure_decode_step_ms_p50": round(1e3 * sorted(x[1] - x[0] for x in full if not x[3])[len([x for x in full if not x[3]]) // 2], 3)
            if any(not x[3] for x in full) else None}


def http_run(variant, env, flags, body, out, C, N):
    import bench
    trace_path = env["TRACE_FILE"]
    spy = os.environ.get("PYSPY")   # py-spy's path: sample the server's processes (raw stacks, per thread)
    cmd = [sys.executable, os.path.abspath(__file__)]
    if spy:
        cmd = [spy, "record", "--rate", "250", "--format", "raw", "--threads", "--subprocesses", "--nonblocking",
               "-o", os.path.join(out, f"pyspy_{variant}.txt"), "--", *cmd]
    proc, url = bench.spawn_server(flags, os.path.join(out, f"server_{variant}.log"), timeout=480, command=cmd, env=env)
    import gc
    client_gc = []
    log_gc(client_gc.append)
    freeze = gc.freeze
    if "nofreeze" in variant:   # the client (bench.run_load) without its freeze too
        gc.freeze = lambda: None
    try:
        bench.run_load(url, body, C, num_requests=C)   # warm-up
        time.sleep(1.0)
        api = children(proc.pid)[0] if spy else proc.pid
        pids = {"api": api, "client": os.getpid(), **{f"child{c}": c for c in children(api)}}
        before = {k: cpu_ticks(p) for k, p in pids.items()}
        c0 = os.times()
        t_start = time.perf_counter()
        recs, wall = bench.run_load(url, body, C, num_requests=N)
        t_stop = time.perf_counter()
        after = {k: cpu_ticks(p) for k, p in pids.items()}
        c1 = os.times()
        time.sleep(1.0)
    finally:
        if spy:   # the server drains and exits, then py-spy writes its file
            for c in children(proc.pid):
                os.kill(c, 15)
        else:
            proc.terminate()
        proc.wait(timeout=120)
        gc.freeze = freeze
        gc.callbacks.pop()
    if spy:   # the raw file can pass 16 MiB: a summary comes back instead
        raw = os.path.join(out, f"pyspy_{variant}.txt")
        json.dump(pyspy_summary(raw), open(os.path.join(out, f"pyspy_{variant}.json"), "w"), indent=1)
        os.remove(raw)
    lines = [json.loads(x) for x in open(trace_path)]
    lines = [x for x in lines if t_start - 0.01 <= next(iter(x.values()))[0] <= t_stop + 0.01]
    row = bench.summarize(recs, wall)
    gcs = [x["gc"] for x in lines if "gc" in x] + [[*x["gc"][:3], "client"] for x in client_gc
                                                    if t_start <= x["gc"][0] <= t_stop]
    r = {"gc_pauses_ms": sorted([round(1e3 * (b - a), 1), g, str(p)] for a, b, g, p in gcs)[-12:],
"tok_s": row["throughput_tok_s"], "wall_s": row["wall_s"], "ttft_ms": row["ttft_ms"],
         "cpu_cores": {**cpu_use(before, after, t_stop - t_start),
                       "client_process": round((c1.user + c1.system - c0.user - c0.system) / (t_stop - t_start), 2)}, "steps": steps_summary(lines, C)}
    arr = {x["a"][2]: x["a"] for x in lines if "a" in x}
    fin = {x["f"][1]: x["f"][0] for x in lines if "f" in x}
    lag_in = sorted(a[0] - a[1] for a in arr.values())               # arrival stamp (API process) -> engine submit
    r["api_to_engine_ms_p50_p99"] = [bench.pct(lag_in, 50), bench.pct(lag_in, 99)]
    fins, arrs = sorted(fin.values()), sorted(a[0] for a in arr.values())
    spread = lambda xs: [round(1e3 * (xs[min(len(xs) - 1, k + C - 1)] - xs[k]), 2) for k in range(0, len(xs), C)]  # noqa: E731
    r["engine_arrival_spread_ms_by_round"] = spread(arrs)
    r["engine_finish_spread_ms_by_round"] = spread(fins)
    r["last_finish_to_next_first_arrival_ms"] = [round(1e3 * (arrs[k] - fins[k - 1]), 2) for k in range(C, len(arrs), C)]
    r["first_finish_to_next_first_arrival_ms"] = [round(1e3 * (arrs[k] - fins[k - C]), 2) for k in range(C, len(arrs), C)]
    r["client_send_spread_ms_by_round"] = spread(sorted(x["t_send"] for x in recs))
    r["client_end_spread_ms_by_round"] = spread(sorted(x["t_end"] for x in recs))
    return r


def main():
    import torch
    import bench
    import model as M
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    P, T, C, N = (int(x) for x in os.environ.get("PTCN", "512,128,64,256").split(","))
    preset = os.environ.get("PRESET", "1b")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = {"provenance": M.provenance(dev.type, torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"),
           "preset": preset, "P": P, "T": T, "C": C, "N": N}
    dump = lambda: json.dump(res, open(os.path.join(out, "trace.json"), "w"), indent=1)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (P,), generator=g).tolist() for _ in range(N)]
    torch.manual_seed(0)
    ckpt = os.path.join(out, "ckpt.pt")
    M.save_checkpoint(ckpt, M.Transformer(M.PRESETS[preset]))
    flags = [f"--ckpt={ckpt}", "--dtype=auto", "--page=64", f"--max_num_seqs={C}", f"--max_model_len={P + T}",
             f"--kv_cache_tokens={C * (P + T + 64)}", "--max_num_batched_tokens=8192", "--served_model_name=bench",
             *os.environ.get("SERVER_ARGS", "").split()]

    def body(i):
        return ("/v1/completions", {"prompt": prompts[i % N], "max_tokens": T, "temperature": 0, "ignore_eos": True,
                                    "stream": True, "return_token_ids": True, "stream_options": {"include_usage": True}}, None)
    client = bench.client_request

    def timed_client(*a, **k):
        t = time.perf_counter()
        rec = client(*a, **k)
        rec["t_send"], rec["t_end"] = t, time.perf_counter()
        return rec
    bench.client_request = timed_client
    res["http"] = {}
    for variant in os.environ.get("VARIANTS", "default").split(","):
        env = dict(os.environ, TRACE_FILE=os.path.join(out, f"http_trace_{variant}.jsonl"))
        if "switch" in variant:
            env["SWITCH"] = "0.0005"
        if "nofreeze" in variant:
            env["NOFREEZE"] = "1"
        res["http"][variant] = http_run(variant, env, flags, body, out, C, N)
        print("http", variant, json.dumps(res["http"][variant]), flush=True)
        dump()

    if os.environ.get("ENGINE", "1") == "0":
        return
    # ---- the same load stepped in this process
    trace_path2 = os.path.join(out, "engine_trace.jsonl")
    install_trace(trace_path2)
    cfg = serve.ServeConfig(ckpt=ckpt, dtype="auto", page=64, max_num_seqs=C, max_model_len=P + T,
                            kv_cache_tokens=C * (P + T + 64), max_num_batched_tokens=8192, engine_process=False)
    eng, _ = serve.build_engine(cfg, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    sp = serve.SamplingParams(max_tokens=T, temperature=0.0, ignore_eos=True)

    def closed_loop(n):
        done, sent, reqs = [], 0, []
        for _ in range(C):
            reqs.append(eng.submit(prompts[sent % N], sp))
            sent += 1
        t = time.perf_counter()
        while len(done) < n:
            eng.step()
            for r in [r for r in reqs if r.finish_reason is not None]:
                reqs.remove(r)
                done.append(r)
                if sent < n:
                    reqs.append(eng.submit(prompts[sent % N], sp))
                    sent += 1
        return sum(r.num_generated for r in done), time.perf_counter() - t
    with torch.inference_mode():
        closed_loop(C)
        t_start = time.perf_counter()
        gen, wall = closed_loop(N)
        t_stop = time.perf_counter()
    lines = [json.loads(x) for x in open(trace_path2)]
    lines = [x for x in lines if t_start - 0.01 <= next(iter(x.values()))[0] <= t_stop + 0.01]
    res["engine"] = {"tok_s": round(gen / wall, 1), "wall_s": round(wall, 3), "steps": steps_summary(lines, C)}
    print("engine", json.dumps(res["engine"]), flush=True)
    dump()


if __name__ == "__main__":
    if sys.argv[1] == "--summarize":   # an existing step trace: python trace.py --summarize FILE.jsonl C
        L = [json.loads(x) for x in open(sys.argv[2])]
        a = sorted(x["a"][0] for x in L if "a" in x)
        C = int(sys.argv[3])
        print(json.dumps(steps_summary([x for x in L if "s" not in x or x["s"][0] >= a[C] - 0.002], C)))
    else:
        main()
