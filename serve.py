"""
OpenAI-compatible server for InfiniteContext: continuous batching on the paged latent cache.

    python serve.py --ckpt=out/tiny/ckpt.pt --port=8000          # the embedded engine
    python serve.py --ckpt=... --export=hf/small                   # write the Hugging Face export, exit
    python serve.py --ckpt=... --backend=vllm --port=8000          # export, then `vllm serve` it

Read top to bottom: config, sampling, the engine (scheduler + block allocator + model runner),
metrics (vLLM's names), the engine's own process and its client, the HTTP API (FastAPI), the command line. The load
generator that drives it (bench.py serve, the robustness run) lives in bench.py.

The engine, in one paragraph (vLLM's scheduler, gpt-fast's static buffers): one kv pool of
(layers, num_blocks, page, width) is allocated at start. A request is admitted (FCFS) when the
free blocks hold its whole prompt; each step then runs ONE batched decode forward (T=1, ragged
seq_lens, absorbed MLA: mla_kernel on CUDA) for every running sequence, and spends what is left
of the token budget on prefill chunks (whole prompts of up to 4k tokens padded into a CUDA graph's
fixed shape, the rest grouped by equal cached length, as model.forward needs). A sequence that
needs a new block when none is free preempts the newest running one (vLLM's recompute: its blocks
are freed, it re-queues at the front with prompt + output so far). Blocks go back when a sequence
finishes or its client goes away. The engine steps in its own process (vLLM's split of API server
and engine core: no GIL shared with the event loop); the HTTP
handlers never touch the model: they submit requests over a queue and read outputs from an
asyncio.Queue that a reader thread fills (loop.call_soon_threadsafe), so a slow client never stalls decoding.
"""
import asyncio
import codecs
import gc
import json
import multiprocessing as mp
import os
import queue
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields, replace  # noqa: F401  (serve.fields: the tests list the flags)
from typing import Annotated, Literal

import torch
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               generate_latest)
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from starlette.exceptions import HTTPException as StarletteHTTPException

import model as M


@dataclass
class ServeConfig:
    ckpt: str = ""                      # default: checkpoints/infinitecontext-small, else out/tiny/ckpt.pt
    host: str = "127.0.0.1"             # 0.0.0.0 to serve other machines
    port: int = 8000                    # TCP port
    served_model_name: str = ""         # default: the checkpoint's folder (or file) name
    api_key: str = ""                   # require 'Authorization: Bearer KEY' on /v1 (default: $VLLM_API_KEY)
    device: str = ""                    # default: cuda if available, else cpu
    threads: int = 0                    # CPU only: torch threads; 0: all cores but one (that one runs HTTP)
    dtype: str = "auto"                 # auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16, float64
    max_model_len: int = 0              # prompt + completion limit; 0: max_position_embeddings, capped by the cache
    page: int = 64                      # tokens per cache block
    num_blocks: int = 0                 # cache blocks; 0: from --kv_cache_tokens
    kv_cache_tokens: int = 0            # cache size in tokens; 0: half the free GPU memory, or 256 MiB on CPU
    max_num_seqs: int = 64              # running sequences (the decode batch)
    max_num_batched_tokens: int = 8192  # tokens one engine step may feed (decode + prefill chunks); 2048: 3x slower at 64 clients
    max_queue: int = 1024               # waiting requests; beyond this a request gets 503 + Retry-After
    enforce_eager: bool = False         # no CUDA graphs (graphs: CUDA, MLA and a 16-bit cache only)
    prefill_graph_tokens: int = 4096    # with CUDA graphs: prefills of up to this many tokens (rows x padded length) replay one; 0: off
    compile: bool = True                # with CUDA graphs: torch.compile the decode blocks first (fewer, fused kernels)
    fused_decode: bool = True           # with CUDA graphs: batch-1 decode through fused_decode (Triton, 8 kernels a layer)
    engine_process: bool = True         # the engine in its own process (False: a thread beside the HTTP event loop)
    drain_timeout: int = 600            # seconds SIGTERM waits for running requests before it cancels them
    access_log: bool = False            # uvicorn's line per request (on stdout)
    export: str = ""                    # write the Hugging Face export to this folder and exit (or: for --backend=vllm)
    backend: str = "embedded"           # embedded, or vllm: export, then exec `vllm serve`


SAMPLING_EPS = 1e-5   # temperatures below this are greedy (vLLM's threshold): 1/T would overflow


# ----------------------------------------------------------------------------- sampling
@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 or -1: off
    stop: list = field(default_factory=list)   # strings; the text ends before the first match
    seed: int | None = None
    repetition_penalty: float = 1.0     # vLLM's: logits of seen tokens (prompt + output) / p if > 0, else * p
    presence_penalty: float = 0.0       # OpenAI's: - p if the token is in the output
    frequency_penalty: float = 0.0      # OpenAI's: - p * count in the output
    ignore_eos: bool = False            # vLLM's: do not stop at <|im_end|> / <|endoftext|> (benchmarks)

    @property
    def penalized(self):
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def sample_rows(logits, params, generators):
    """logits (B, V), one SamplingParams and torch.Generator per row -> token ids (B,).
    Greedy rows take the argmax. Sampled rows: temperature, then top-k, then top-p (model.sample's
    order and rules), then the exponential race argmax(p / E), E ~ Exp(1) drawn from the row's own
    generator: a sample from p that depends only on that request's seed, not on its batch mates."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    out = logits.argmax(-1)
    rows = [i for i, p in enumerate(params) if p.temperature >= SAMPLING_EPS]
    if not rows:
        return out
    B, V = len(rows), logits.shape[-1]
    dev = logits.device
    # the rows' settings reach the device without waiting for it: torch.tensor(..., device=cuda) (and indexing
    # with a list) is a blocking copy that waits for the decode step just launched, so sampled rows would lose
    # the engine's step-ahead overlap
    tp = torch.tensor([[params[i].temperature, params[i].top_p] for i in rows], dtype=logits.dtype).to(dev, non_blocking=True)
    ik = torch.tensor([rows, [params[i].top_k if 0 < params[i].top_k < V else V for i in rows]]).to(dev, non_blocking=True)
    temp, top_p, idx, k = tp[:, 0], tp[:, 1], ik[0], ik[1]                           # (B,) each
    sorted_l, order = (logits[idx] / temp[:, None]).sort(-1, descending=True)        # (B, V)
    sorted_l = sorted_l.masked_fill(sorted_l < sorted_l.gather(1, k[:, None] - 1), float("-inf"))
    p_sorted = sorted_l.softmax(-1)
    sorted_l = sorted_l.masked_fill(p_sorted.cumsum(-1) - p_sorted >= top_p[:, None], float("-inf"))
    probs = torch.empty_like(sorted_l).scatter_(-1, order, sorted_l.softmax(-1))   # (B, V)
    q = torch.stack([torch.empty(V, dtype=probs.dtype, device=dev).exponential_(generator=generators[i])
                     for i in rows])
    out[idx] = (probs / q.clamp_min(1e-20)).argmax(-1)   # p = 0 never wins; E = 0 (rounding) cannot give NaN
    return out


def apply_penalties(logits, seen, counts, p):
    """One row: logits (V,), seen (V,) bool (prompt or output), counts (V,) output counts."""
    if p.repetition_penalty != 1.0:
        pen = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, pen, logits)
    return logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(logits.dtype)


# ----------------------------------------------------------------------------- the engine
@dataclass
class Output:
    """What the engine tells a client after a step: the new text and tokens, and at the end why it stopped."""
    text: str
    token_ids: list
    finish_reason: str | None = None    # stop, length, abort (client gone / shutdown), error
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(eq=False)   # a request is its identity: `r in self.running` must not compare token lists field by field
class Request:
    prompt: list                        # token ids
    params: SamplingParams
    sink: object = None                 # whatever the engine's deliver() callback needs (an asyncio.Queue)
    id: str = ""
    ids: list = None                    # prompt + generated tokens
    num_computed: int = 0               # tokens of ids in the cache; the rest still has to be fed
    blocks: list = field(default_factory=list)
    generator: torch.Generator = None
    text: str = ""                      # decoded output (stop strings cut)
    sent: int = 0                       # characters of text already delivered
    arrival: float = 0.0
    first_token: float | None = None
    last_token: float = 0.0
    decoder: object = None              # incremental UTF-8: a character may span several byte tokens
    aborted: bool = False
    finish_reason: str | None = None
    seen: torch.Tensor = None           # penalties only: (V,) bool, (V,) counts
    counts: torch.Tensor = None
    lag: tuple = None                   # (decode serial, row): its last decoded token is still on the GPU

    @property
    def num_generated(self):
        return len(self.ids) - len(self.prompt)


class QueueFull(Exception):
    pass


def fused_decode(model, idx, kv, table, lens, rope):
    """model.forward's decode step (T=1, absorbed MLA) in 8 Triton kernels a layer instead of ~22 (1b, batch 1 on
    an H100: 2.04 -> 1.31 ms a token, results/bench_serve_h100.json): the RMSNorms ride in the projections' prologues,
    SwiGLU and the residual adds in their epilogues, one kernel ropes q_pe and k_pe, appends the latent's
    cache row and multiplies q_nope by W_UK, and the attention's splits are merged inside the W_UV product
    (mla_kernel's fused_linear, mla_absorb, mla_decode, merge_uv). idx (B,) tokens, kv (L, blocks, page, R+P),
    table (B, pages), lens (B,) tokens cached before this one, rope: (cos, sin) tables (positions, P/2) from
    model.rope_cos_sin -> logits (B, V) fp32. Needs fuse_projections'd weights."""
    from mla_kernel import fused_linear, merge_uv, mla_absorb, mla_decode
    cfg, B = model.config, idx.shape[0]
    H, R, nope, P, dv = (cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                         cfg.v_head_dim)
    lens1 = lens + 1
    h = model.embed_tokens(idx)                                                # (B, D): the residual stream
    for i, block in enumerate(model.layers):
        att, mlp, ln1, ln2 = block.self_attn, block.mlp, block.input_layernorm, block.post_attention_layernorm
        a = fused_linear(h, att.qkv_a, norm=ln1.weight, eps=ln1.eps)           # (B, [q_a or q | c | k_pe])
        if cfg.q_lora_rank is None:
            q = a[:, :H * (nope + P)]
        else:
            q = fused_linear(a[:, :cfg.q_lora_rank], att.q_b_proj.weight, norm=att.q_a_layernorm.weight,
                             eps=att.q_a_layernorm.eps)                        # (B, H * (nope + P))
        w = att.kv_b_proj.weight.view(H, nope + dv, R)                         # per head [W_UK; W_UV]
        q_lat, q_pe = mla_absorb(a[:, -(R + P):], q.view(B, H, nope + P), w[:, :nope], kv[i], table, lens, *rope,
                                 att.kv_a_layernorm.weight, att.kv_a_layernorm.eps)   # W_UK^T q^C, rope(q^R); cache row
        if kv.is_cuda:
            o_lat = mla_decode(q_lat, q_pe, kv[i], table, lens1, model.softmax_scale, partials=True)
        else:   # the CPU tests: the PyTorch attention
            o_lat = M.latent_attention(q_lat, q_pe, kv[i], table, lens1, model.softmax_scale)
        if isinstance(o_lat, tuple):   # several KV splits: merged inside the W_UV product
            o = merge_uv(*o_lat, w[:, nope:], h.dtype)                         # (B, H * dv)
        else:
            o = fused_linear(o_lat.view(B, H * R), w[:, nope:], x_group_stride=R)   # W_UV o_lat: (B, H * dv)
        fused_linear(o, att.o_proj.weight, out=h, residual=h)                  # h += W_O o
        g = fused_linear(h, mlp.gate_up, norm=ln2.weight, eps=ln2.eps, swiglu=True)    # silu(x W_g) * x W_u
        fused_linear(g, mlp.down_proj.weight, out=h, residual=h)               # h += W_down g
    out = torch.empty(B, cfg.vocab_size, device=h.device, dtype=torch.float32)
    return fused_linear(h, model.lm_head.weight, out=out, norm=model.norm.weight, eps=model.norm.eps)


def pad_tokens(n):
    """A prefill graph's token length for a chunk of n: the next power of two, at least 64."""
    return max(64, 1 << (n - 1).bit_length())


def fused_fits(cfg):
    """fused_decode's kernels take MLA with power-of-two widths (tl.arange) and W_UV in 16-row blocks."""
    pow2 = lambda n: n >= 16 and n & (n - 1) == 0   # noqa: E731
    return (cfg.attn == "mla" and pow2(cfg.kv_lora_rank) and cfg.kv_lora_rank % 64 == 0 and pow2(cfg.qk_rope_head_dim)
            and pow2(cfg.qk_nope_head_dim) and cfg.v_head_dim % 16 == 0)


class Engine:
    """Scheduler, block allocator and model runner. submit()/abort() are thread-safe; step() runs in
    the engine thread (or directly, in tests). deliver(list of (request, Output)) is called once per step."""

    def __init__(self, model, cfg, metrics=None, deliver=None):
        self.model, self.cfg = M.fuse_projections(model), cfg
        self.vocab_size = model.config.vocab_size
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        mc = model.config
        # one block past the pool, never allocated: the padding rows of a fixed-shape decode write there
        self.kv = torch.zeros(mc.num_hidden_layers, cfg.num_blocks + 1, cfg.page, M.cache_width(mc),
                              dtype=self.dtype, device=self.device)              # (L, num_blocks + 1, page, width)
        self.scratch = cfg.num_blocks
        # Decode as CUDA-graph replays (vLLM's default): an eager step of a deep model is hundreds of kernel
        # launches, ~30 ms for the 1b preset at any batch. A graph needs fixed shapes, so the batch is padded
        # up to a bucket and the block table to max_model_len's pages. MLA on a 16-bit cache only: the PyTorch
        # decode paths read lengths on the host, which a capture cannot do.
        self.use_graphs = (not cfg.enforce_eager and self.device.type == "cuda" and mc.attn == "mla"
                           and self.dtype in (torch.bfloat16, torch.float16))
        self.buckets = sorted({min(2 ** i, cfg.max_num_seqs) for i in range(cfg.max_num_seqs.bit_length() + 1)})
        self.graphs, self.static, self.pool, self.rope = {}, None, None, None
        # Small prefills replay graphs too: an eager 1b forward is ~1,000 launches, ~22 ms of host time on an
        # H100 whatever its size, so up to ~4k tokens the GPU mostly waits (serve_probe/prefill_host_h100_fc46f2d.json).
        # A graph's shape is fixed: rows pad to a bucket, tokens to a power of two (the padding tokens sit after
        # each prompt, so causal attention keeps them out of its logits), for whole prompts (cached length 0).
        # Rows have a bucket of their own up to 8: 64 clients' next prompts arrive in bursts of 1-15, and padding
        # them to decode buckets (5 -> 8 rows of 512 tokens) added 18-27 rows for every 256 prompts prefilled
        # (`results/serve_probe/trace.py --summarize` on trace_h100_*_8d260fa.jsonl).
        self.prefill_buckets = sorted(set(self.buckets) | set(range(1, min(8, cfg.max_num_seqs) + 1)))
        self.prefill_graphs = {}                                                 # (rows, tokens) -> (buffers, replay)
        # A replay pays a few microseconds per kernel however small, and an eager block is dozens of them (each
        # RMSNorm and RoPE is several elementwise ops): compiling fuses those (bench.py serve: 4.2 -> 2.3 ms, 1b).
        # The cache write and the attention kernel stay eager inside (model.py disables compile there);
        # dynamic=True: one compile serves every bucket above 1.
        self.layers = [torch.compile(b, dynamic=True) for b in model.layers] if self.use_graphs and cfg.compile else None
        self.free = list(range(cfg.num_blocks - 1, -1, -1))                      # a stack: pop() -> lowest first
        self.inbox, self.waiting, self.running = deque(), deque(), []
        self.metrics, self.deliver = metrics, deliver or (lambda batch: None)
        self.outbox = []
        # Decode runs a step ahead of the host (vLLM's async scheduling): step N's sampled tokens stay on the
        # GPU and feed step N+1's inputs there, and the host reads them (stop checks, text, outputs) while
        # step N+1 runs. A sequence that step N ended costs one wasted row in step N+1.
        self.pending, self.serial = None, 0    # (serial, rows, tokens on the GPU, host copy, event) of the last decode
        self.host_tokens = [torch.empty(cfg.max_num_seqs, dtype=torch.long, pin_memory=self.device.type == "cuda")
                            for _ in range(2)]  # two pinned buffers: step N+1 copies into one while the host reads N
        self.stop_ids = set(M.STOP_IDS)
        self._wake, self._stopping, self.thread = threading.Event(), False, None
        self.num_preemptions = 0

    # ---- client side (any thread)
    def submit(self, prompt, params, sink=None, id=None, arrival=None):
        if self._stopping or len(self.inbox) + len(self.waiting) >= self.cfg.max_queue:
            raise QueueFull()
        r = Request(list(prompt), params, sink, id=id or uuid.uuid4().hex, ids=list(prompt),
                    arrival=arrival or time.perf_counter())
        r.generator = torch.Generator(self.device)
        r.generator.manual_seed(params.seed % 2**64 if params.seed is not None else secrets.randbits(63))
        self.inbox.append(r)
        self._wake.set()
        return r

    def abort(self, r):
        """Free the request's blocks at the next step (client disconnected). No-op once it has finished."""
        if r.finish_reason is None:
            r.aborted = True
            self._wake.set()

    def kv_usage(self):
        return 1.0 - len(self.free) / self.cfg.num_blocks

    # ---- the thread
    def start(self):
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()

    def stop(self):
        self._stopping = True
        self._wake.set()
        if self.thread is not None:
            self.thread.join()

    def alive(self):
        return self.thread is not None and self.thread.is_alive()

    def _loop(self):
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)   # the current device is per thread
        with torch.inference_mode():
            while not self._stopping:
                self._wake.clear()     # before step(): a submit() during the step sets it again
                if not self.step_or_fail():
                    self._wake.wait(0.1)
            self.abort_all()

    def step_or_fail(self):
        try:
            return self.step()
        except Exception:      # a failed forward must not kill the server: fail the batch, go on
            traceback.print_exc()
            self.pending = None    # its tokens are lost: a preempted row re-prefills from what the client was told
            for r in list(self.waiting):
                r.lag = None
            for r in list(self.running):
                self._finish(r, "error")
            self._flush()
            return False

    def abort_all(self):
        self.pending = None
        for r in list(self.running) + list(self.waiting) + list(self.inbox):
            self._finish(r, "abort")
        self._flush()

    # ---- one step (engine thread only)
    @torch.inference_mode()
    def step(self):
        """Admit, decode every running sequence one token, prefill chunks with the rest of the token
        budget. Returns False when there was nothing to do."""
        while self.inbox:
            self.waiting.append(self.inbox.popleft())
        for r in [r for r in list(self.waiting) + self.running if r.aborted]:
            self._finish(r, "abort")
        self._admit()
        decodes, prefills = self._schedule()
        sync = any(r.params.penalized for r in decodes)   # penalties need every earlier token: no lag
        if sync:
            self._take_pending()
        launched = self._decode(decodes) if decodes else None
        self._take_pending()       # the previous step's tokens, while this one runs on the GPU
        self.pending = launched
        if sync:
            self._take_pending()
        groups = {}
        for r, n in prefills:   # a graph per padded length; eager, rows of one cached length and one chunk length
            n_pad = self._padded(r, n)
            groups.setdefault(("graph", n_pad) if n_pad else (r.num_computed, n), []).append((r, n))
        forwards = []   # all on the GPU before the first is sampled (a sync): the host builds the next one's
        for (kind, n), items in groups.items():   # inputs while the GPU runs the one before
            if kind == "graph":
                per = max(1, self.cfg.prefill_graph_tokens // n)   # 0 once a failed capture turned graphs off
                for i in range(0, len(items), per):
                    forwards += self._prefill_fixed(items[i:i + per], n)
            else:
                forwards += self._prefill(items)
        for items, logits in forwards:
            self._prefilled(items, logits)
        self._flush()
        return bool(decodes or prefills or self.waiting or self.pending)

    def _blocks_for(self, n_tokens):
        return -(-n_tokens // self.cfg.page)

    def _admit(self):
        # FCFS; keep one free block per running sequence so that admitting does not force a preemption
        while self.waiting and len(self.running) < self.cfg.max_num_seqs:
            r = self.waiting[0]
            need = self._blocks_for(len(r.ids))
            if need + len(self.running) > len(self.free) and self.running:
                break
            if need > len(self.free):
                break
            self.waiting.popleft()
            r.blocks = [self.free.pop() for _ in range(need)]
            r.num_computed = 0
            self.running.append(r)

    def _schedule(self):
        budget, decodes, prefills = self.cfg.max_num_batched_tokens, [], []
        for r in list(self.running):                         # oldest first: the newest get preempted
            if r not in self.running or len(r.ids) - r.num_computed != (0 if r.lag else 1):
                continue
            if r.num_computed + 1 > len(r.blocks) * self.cfg.page and not self._grow(r):
                continue
            decodes.append(r)
            budget -= 1
        for r in self.running:
            left = len(r.ids) - r.num_computed
            if left > 1 and budget > 0:
                if left > budget and prefills:   # split only the step's first prompt: the rest go whole next
                    break                        # step (an eager forward per prompt length costs ~22 ms to launch)
                prefills.append((r, min(left, budget)))
                budget -= prefills[-1][1]
        return decodes, prefills

    def _grow(self, r):
        """One more block for r, preempting the newest running sequences if none is free."""
        while not self.free:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is r:
                return False
        r.blocks.append(self.free.pop())
        return True

    def _preempt(self, r):
        self.running.remove(r)
        self.free.extend(reversed(r.blocks))
        r.blocks, r.num_computed = [], 0
        self.waiting.appendleft(r)   # recompute prompt + output so far when blocks free up
        self.num_preemptions += 1
        if self.metrics:
            self.metrics.preemptions.inc()

    def _table(self, rows, pages, fill=0):
        """Rows' block tables (host lists), `pages` wide, padded with `fill` (unread: reads stop at each row's length)."""
        return [r.blocks[:pages] + [fill] * (pages - len(r.blocks[:pages])) for r in rows]

    def _decode(self, rows):
        """Launch one decode step; returns what _take_pending reads once it is done. A row whose last token
        is still on the GPU (r.lag) takes it from there. Tables, tokens, lengths and those moves go to the
        GPU as one int32 copy, not one each."""
        B = len(rows)
        if self.use_graphs:
            Bb = next(b for b in self.buckets if b >= B)
            if Bb not in self.graphs:
                self.capture_graphs([Bb])
            W, fill = self.static["table"].shape[1], self.scratch
        else:
            W, fill = self._blocks_for(max(r.num_computed for r in rows) + 1), 0
        moved = [(i, r.lag[1]) for i, r in enumerate(rows) if r.lag]
        flat = [b for row in self._table(rows, W, fill) for b in row]
        flat += [0 if r.lag else r.ids[-1] for r in rows] + [r.num_computed for r in rows]
        flat += [i for i, _ in moved] + [j for _, j in moved]
        buf = torch.tensor(flat, dtype=torch.int32).to(self.device, non_blocking=True)
        table, idx, lens = buf[:B * W].view(B, W), buf[B * W:B * W + B], buf[B * W + B:B * W + 2 * B]   # (B, W), (B,), (B,)
        idx = idx.long()
        if moved:
            dst, src = buf[B * W + 2 * B:].long().split(len(moved))
            _, _, prev_tokens, _, _ = self.pending   # every lagging row is in the last decode
            idx[dst] = prev_tokens[src]
        if self.use_graphs:
            logits = self._decode_fixed(idx, lens, table, B, Bb)
        else:
            logits = self.model(idx[:, None], cache=M.Cache(self.kv, table, lens))[:, -1]                # (B, V)
        tokens = self._sample(rows, logits)                                                              # (B,)
        self.serial += 1
        for i, r in enumerate(rows):
            r.num_computed += 1
            r.lag = (self.serial, i)
        host, event = self.host_tokens[self.serial % 2][:B], None
        host.copy_(tokens, non_blocking=True)
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return self.serial, rows, tokens, host, event

    def _take_pending(self):
        """Read the last decode's tokens (waiting for its copy) and append them to their rows."""
        if self.pending is None:
            return
        serial, rows, _, host, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        toks = host.tolist()
        for r in rows:
            if r.lag and r.lag[0] == serial:
                r.lag = None
        live = [(r, t) for r, t in zip(rows, toks) if r.finish_reason is None]   # ended meanwhile: a wasted row
        self._accept([r for r, _ in live], [t for _, t in live])

    def _decode_fixed(self, idx, lens, table, B, Bb):
        """The decode step on static buffers: the batch padded to a bucket of Bb rows, tables to W pages. Padding
        rows have length 0 and every page the scratch block. On CUDA each bucket's captured graph is replayed."""
        st = self.static
        st["table"][B:Bb].fill_(self.scratch)
        st["lens"][B:Bb].zero_()
        st["table"][:B], st["idx"][:B, 0], st["lens"][:B] = table, idx, lens
        return self.graphs[Bb]()[:B]                                                                    # (B, V)

    @torch.inference_mode()
    def capture_graphs(self, buckets=None):
        """Static buffers, then each bucket's decode (a CUDA graph on CUDA), then, when all buckets are asked
        for, every prefill shape. The server captures them before it opens (vLLM does too): a capture in the
        middle of serving stalls every running request."""
        if self.static is None:
            n = self.cfg.max_num_seqs
            W = self._blocks_for(self.cfg.max_model_len) if self.cfg.max_model_len else self.cfg.num_blocks
            self.static = {"idx": torch.zeros(n, 1, dtype=torch.long, device=self.device),                # (n, 1)
                           "table": torch.full((n, W), self.scratch, dtype=torch.int32, device=self.device),
                           "lens": torch.zeros(n, dtype=torch.int32, device=self.device)}                # (n,)
        for Bb in buckets or self.buckets:
            if Bb not in self.graphs:
                self.graphs[Bb] = self._capture(Bb)
        if buckets is None:   # every padded length a chunk can have, at every row bucket that fits
            top = min(self.cfg.max_model_len or self.cfg.max_num_batched_tokens, self.cfg.max_num_batched_tokens)
            for n in sorted({pad_tokens(k) for k in range(1, top + 1)}):
                for Bb in self.prefill_buckets:
                    if Bb * n <= self.cfg.prefill_graph_tokens:
                        self._capture_prefill(Bb, n)

    def _capture(self, Bb):
        """A function running the decode of the first Bb static rows and returning its logits (Bb, V)."""
        st = {k: v[:Bb] for k, v in self.static.items()}

        def blocks():
            return self.model(st["idx"], cache=M.Cache(self.kv, st["table"], st["lens"]), layers=self.layers)[:, -1]
        if self.device.type != "cuda":
            return blocks          # tests: the same buffers and padding, eager
        run = blocks
        if Bb == 1 and self.cfg.fused_decode and fused_fits(self.model.config):
            # batch 1 reads every weight for one token: hand-fused kernels (1b: 2.04 -> 1.31 ms a token). The rope
            # tables live on self: a graph keeps only what it allocated, so a freed table would be read as garbage
            pos = torch.arange(st["table"].shape[1] * self.cfg.page, device=self.device)
            self.rope = [t[0] for t in M.rope_cos_sin(self.model.inv_freq, pos[None])]   # (positions, P/2) fp32 each

            def run():
                return fused_decode(self.model, st["idx"][:, 0], self.kv, st["table"], st["lens"], self.rope)
        # the warm-up step writes the scratch block only
        st["table"].fill_(self.scratch)
        st["lens"].zero_()
        while True:   # a failed compile must not take the server down: fused -> compiled -> eager blocks
            try:
                self._warm_up(run)
                break
            except Exception as e:
                what = "the fused decode" if run is not blocks else "torch.compile of the decode"
                if run is blocks:
                    if self.layers is None:
                        raise
                    self.layers = None
                print(f"serve.py: {what} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); capturing "
                      f"the {'compiled' if self.layers else 'eager'} blocks", file=sys.stderr, flush=True)
                run = blocks
                st["lens"].zero_()
        return self._graph(run)

    def _warm_up(self, run):
        """One call on a side stream before a capture: Triton and torch.compile compile there, not in the graph."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def _graph(self, run):
        """run() captured as a CUDA graph; returns a function that replays it and returns run()'s output."""
        self.pool = self.pool or torch.cuda.graph_pool_handle()   # all graphs share one memory pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = run()

        def replay():
            graph.replay()
            return out
        return replay

    def _padded(self, r, n):
        """The padded length when r's chunk of n tokens runs as a prefill graph, else None (eager)."""
        if not (self.use_graphs and self.cfg.prefill_graph_tokens) or r.num_computed:
            return None
        n_pad = pad_tokens(n)
        return n_pad if n_pad <= self.cfg.prefill_graph_tokens else None

    def _capture_prefill(self, Bb, n):
        """Buffers and a function prefilling Bb rows of n tokens from cached length 0: logits (Bb, n, V). A capture
        that fails turns prefill graphs off (eager prefill still works), not the server."""
        if (Bb, n) in self.prefill_graphs or not self.cfg.prefill_graph_tokens:
            return
        st = {"idx": torch.zeros(Bb, n, dtype=torch.long, device=self.device),                           # (Bb, n)
              "table": torch.full((Bb, self._blocks_for(n)), self.scratch, dtype=torch.int32, device=self.device),
              "lens": torch.zeros(Bb, dtype=torch.int32, device=self.device)}                            # (Bb,)

        def run():
            st["lens"].zero_()   # forward advances it: a replay starts from 0 again
            return self.model(st["idx"], cache=M.Cache(self.kv, st["table"], st["lens"], start=0))
        if self.device.type == "cuda":
            try:
                self._warm_up(run)   # all rows on the scratch block
                run = self._graph(run)
            except Exception as e:
                print(f"serve.py: capturing a prefill of {Bb} x {n} failed ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200]}); prefill stays eager", file=sys.stderr, flush=True)
                self.cfg.prefill_graph_tokens = 0
                return
        self.prefill_graphs[Bb, n] = st, run

    def _prefill(self, items):
        """An eager forward over [(row, n)] of one cached length c and one chunk length n -> [(items, last logits)]."""
        rows, n, c = [r for r, _ in items], items[0][1], items[0][0].num_computed
        idx = torch.tensor([r.ids[c:c + n] for r in rows]).to(self.device, non_blocking=True)          # (B, n)
        table = torch.tensor(self._table(rows, self._blocks_for(c + n)), dtype=torch.int32)
        cache = M.Cache(self.kv, table.to(self.device, non_blocking=True),
                        torch.full((len(rows),), c, dtype=torch.int32).to(self.device, non_blocking=True), start=c)
        return [(items, self.model(idx, cache=cache)[:, -1])]                                             # (B, V)

    def _prefill_fixed(self, items, n_pad):
        """Whole prompts [(row, n)], n <= n_pad, as one replay of the (bucket rows, n_pad) prefill graph. Padding
        tokens write past each prompt (slots that its decode overwrites before reading them) or, past its blocks,
        into the scratch block; padding rows write only there."""
        B = len(items)
        Bb = next(b for b in self.prefill_buckets if b >= B)
        self._capture_prefill(Bb, n_pad)
        if (Bb, n_pad) not in self.prefill_graphs:   # the capture failed: eager from now on
            return [x for r, n in items for x in self._prefill([(r, n)])]
        st, run = self.prefill_graphs[Bb, n_pad]
        W = st["table"].shape[1]
        idx = [r.ids[:n] + [0] * (n_pad - n) for r, n in items] + [[0] * n_pad] * (Bb - B)
        table = self._table([r for r, _ in items], W, self.scratch) + [[self.scratch] * W] * (Bb - B)
        st["idx"].copy_(torch.tensor(idx), non_blocking=True)
        st["table"].copy_(torch.tensor(table, dtype=torch.int32), non_blocking=True)
        # not a blocking copy, which would wait for the GPU's queue (the decode step, the last prefill replay)
        # before this replay is launched
        last = torch.tensor([n - 1 for _, n in items]).to(self.device, non_blocking=True)
        # a copy of the rows' last logits: the next replay of this graph overwrites its output
        return [(items, run()[torch.arange(B, device=self.device), last])]                             # (B, V)

    def _prefilled(self, items, logits):
        """Advance the rows past their chunks; the rows whose prompt is now whole sample their first token."""
        for r, n in items:
            r.num_computed += n
        done = [i for i, (r, _) in enumerate(items) if r.num_computed == len(r.ids)]
        if done:
            rows = [items[i][0] for i in done]
            self._accept(rows, self._sample(rows, logits[done]).tolist())

    def _sample(self, rows, logits):
        """Each row's next token, on the logits' device: (B,)."""
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))       # (B, V)
        for i, r in enumerate(rows):
            if r.params.penalized:
                if r.seen is None:
                    V = logits.shape[-1]
                    r.seen = torch.zeros(V, dtype=torch.bool, device=self.device)
                    r.seen[torch.tensor(r.prompt, device=self.device)] = True
                    r.counts = torch.zeros(V, dtype=logits.dtype, device=self.device)
                logits[i] = apply_penalties(logits[i], r.seen, r.counts, r.params)
        return sample_rows(logits, [r.params for r in rows], [r.generator for r in rows])

    def _accept(self, rows, toks):
        if self.metrics and toks:
            self.metrics.generation_tokens.inc(len(toks))
        for r, t in zip(rows, toks):
            self._append(r, t)

    def _append(self, r, t):
        now, m, p = time.perf_counter(), self.metrics, r.params
        r.ids.append(t)
        if r.seen is not None:
            r.seen[t] = True
            r.counts[t] += 1
        if m:
            if r.first_token is None:
                m.prompt_tokens.inc(len(r.prompt))
                m.ttft.observe(now - r.arrival)
            else:
                m.itl.observe(now - r.last_token)
        if r.first_token is None:
            r.first_token = now
            r.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        r.last_token = now
        if t in self.stop_ids and not p.ignore_eos:
            r.text += r.decoder.decode(b"", final=True)
            return self._finish(r, "stop", [t])
        start = max(0, len(r.text) - max((len(s) for s in p.stop), default=0))
        r.text += r.decoder.decode(bytes([t])) if t < 256 else ""             # special tokens print nothing
        hits = [i for i in (r.text.find(s, start) for s in p.stop) if i >= 0]
        if hits:
            r.text = r.text[:min(hits)]
            return self._finish(r, "stop", [t])
        if r.num_generated >= p.max_tokens or len(r.ids) >= self.cfg.max_model_len:
            r.text += r.decoder.decode(b"", final=True)
            return self._finish(r, "length", [t])
        # hold back what could still become a stop string
        hold = max((len(s) for s in p.stop), default=1) - 1
        upto = max(r.sent, len(r.text) - hold)
        self.outbox.append((r, Output(r.text[r.sent:upto], [t])))
        r.sent = upto

    def _finish(self, r, reason, new=()):
        if r.finish_reason is not None:
            return
        r.finish_reason = reason
        if r in self.running:
            self.running.remove(r)
            self.free.extend(reversed(r.blocks))
            r.blocks = []
        elif r in self.waiting:
            self.waiting.remove(r)
        self.outbox.append((r, Output(r.text[r.sent:], list(new), reason, len(r.prompt), r.num_generated)))
        r.sent = len(r.text)
        if self.metrics:
            self.metrics.success.labels(self.metrics.name, reason).inc()
            self.metrics.e2e.observe(time.perf_counter() - r.arrival)

    def _flush(self):
        if self.metrics:
            m = self.metrics
            m.running.set(len(self.running))
            m.waiting.set(len(self.waiting) + len(self.inbox))
            m.kv_usage.set(self.kv_usage())
        if self.outbox:
            batch, self.outbox = self.outbox, []
            self.deliver(batch)


# ----------------------------------------------------------------------------- metrics
class Metrics:
    """vLLM's metric names (so its Grafana dashboards and autoscalers work), each with a model_name label."""

    def __init__(self, name):
        disable_created_metrics()   # no *_created series: vLLM's exposition has none
        self.name, self.registry = name, CollectorRegistry()
        reg, L = self.registry, ["model_name"]

        def gauge(n, doc):
            return Gauge(n, doc, L, registry=reg).labels(name)

        def counter(n, doc):
            return Counter(n, doc, L, registry=reg).labels(name)

        def hist(n, doc, buckets):
            return Histogram(n, doc, L, buckets=buckets, registry=reg).labels(name)

        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemptions from the engine.")
        self.http = Counter("http_requests", "HTTP responses by status code (all routes).", ["status"], registry=reg)
        self.success = Counter("vllm:request_success", "Count of finished requests.", ["model_name", "finished_reason"],
                               registry=reg)
        self.ttft = hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                         [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                          10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0])
        self.itl = hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                        [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                         20.0, 40.0, 80.0])
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                        [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                         240.0, 480.0, 960.0, 1920.0, 7680.0])


# ----------------------------------------------------------------------------- the engine in its own process
class MetricLog:
    """The engine process's stand-in for Metrics: it logs every call (name, labels, method, value), and the
    API process replays them on the real registry, the one /metrics shows."""

    def __init__(self, name):
        self.name, self.events = name, []

    def __getattr__(self, metric):   # first use of a metric: its logging series, kept as an attribute
        series = Series(self.events, metric)
        setattr(self, metric, series)
        return series

    def take(self):
        events = list(self.events)
        self.events.clear()
        return events


class Series:
    def __init__(self, events, name, labels=()):
        self.events, self.name, self.labels_ = events, name, labels

    def labels(self, *labels):
        return Series(self.events, self.name, labels)

    def inc(self, value=1):
        self.events.append((self.name, self.labels_, "inc", value))

    def observe(self, value):
        self.events.append((self.name, self.labels_, "observe", value))

    def set(self, value):
        self.events.append((self.name, self.labels_, "set", value))


def engine_process(cfg, device, dtype, requests, replies):
    """The engine process: load the model, capture, say "ready", then take submit/abort/stop messages and step.
    Each step's outputs, metric calls and state go back in one message."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the API server drains first, then says stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    done = []
    engine, info = build_engine(cfg, device, dtype, deliver=done.extend)
    engine.metrics = log = MetricLog(cfg.served_model_name)   # the name is known once the model is loaded
    replies.put(("ready", cfg, engine.vocab_size, info))
    gc.freeze()   # what was built lives as long as the process: no full collection walks it (see main)
    parent, live = os.getppid(), {}

    def send():   # this step's outputs, metric calls and state, in one message
        for r, out in done:
            if out.finish_reason is not None:
                live.pop(r.id, None)
        replies.put(("step", [(r.id, out) for r, out in done], log.take(), engine.kv_usage(), len(engine.running)))
        done.clear()
    with torch.inference_mode():
        while os.getppid() == parent:   # the API server died without a word: so do we
            idle = not (engine.running or engine.waiting or engine.inbox)
            while True:
                try:
                    msg = requests.get(timeout=0.5) if idle else requests.get_nowait()
                except queue.Empty:
                    break
                idle = False
                if msg[0] == "submit":
                    _, rid, prompt, params, arrival = msg
                    live[rid] = engine.submit(prompt, params, id=rid, arrival=arrival)
                elif msg[0] == "abort" and msg[1] in live:
                    engine.abort(live[msg[1]])
                elif msg[0] == "stop":
                    engine.abort_all()
                    send()
                    replies.put(("stopped",))
                    return
            if idle:
                continue
            engine.step_or_fail()
            if done or log.events:
                send()


@dataclass(eq=False)
class Handle:
    """The API process's side of a request that the engine process runs."""
    id: str
    sink: object
    finish_reason: str | None = None


class EngineClient:
    """Engine's interface for build_app, with the engine in its own process (vLLM's split of API server and
    engine core): the event loop (HTTP, SSE) and the step loop no longer take turns on one GIL. At 64 clients
    on an H100: 8.1k tok/s over HTTP, 6.1k with the engine as a thread of the server (results/serve_probe)."""

    def __init__(self, cfg, device, dtype):
        ctx = mp.get_context("spawn")   # CUDA does not survive a fork
        self.requests, self.replies = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=engine_process, args=(cfg, device, dtype, self.requests, self.replies),
                                name="engine", daemon=True)
        self.cfg, self.metrics, self.deliver = cfg, None, lambda batch: None
        self.live, self.running, self.usage, self.reader, self._stopping = {}, 0, 0.0, None, False

    def wait_ready(self):
        """Start the process; returns build_engine's info, or exits as the process did (its line on stderr)."""
        self.proc.start()
        while True:
            try:
                msg = self.replies.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.proc.is_alive():
                    sys.exit(self.proc.exitcode or 1)
        _, cfg, self.vocab_size, info = msg
        for k in ("ckpt", "served_model_name", "num_blocks", "max_model_len", "prefill_graph_tokens"):   # resolved there
            setattr(self.cfg, k, getattr(cfg, k))
        return info

    def submit(self, prompt, params, sink=None):
        if self._stopping or len(self.live) - self.running >= self.cfg.max_queue:
            raise QueueFull()
        h = Handle(uuid.uuid4().hex, sink)
        self.live[h.id] = h
        self.requests.put(("submit", h.id, list(prompt), params, time.perf_counter()))
        return h

    def abort(self, h):
        if h.finish_reason is None:
            self.requests.put(("abort", h.id))

    def kv_usage(self):
        return self.usage

    def alive(self):
        return self.proc.is_alive() and self.reader is not None and self.reader.is_alive()

    def start(self):
        self.reader = threading.Thread(target=self._read, name="engine-replies", daemon=True)
        self.reader.start()

    def _read(self):
        while True:
            try:
                msg = self.replies.get(timeout=1.0)
            except queue.Empty:
                if self.proc.is_alive():
                    continue
                msg = ("step", [(rid, Output("", [], "error")) for rid in list(self.live)], [], self.usage, 0)
            if msg[0] == "stopped":
                return
            _, outs, events, self.usage, self.running = msg
            for name, labels, method, value in events:   # counters first: a client's last chunk finds them updated
                series = getattr(self.metrics, name)
                getattr(series.labels(*labels) if labels else series, method)(value)
            batch = []
            for rid, out in outs:
                h = self.live.get(rid)
                if h is not None:
                    if out.finish_reason is not None:
                        h.finish_reason = out.finish_reason
                        del self.live[rid]
                    batch.append((h, out))
            self.deliver(batch)
            if not self.proc.is_alive() and not self.live:
                return

    def stop(self):
        self._stopping = True
        if self.proc.is_alive():
            self.requests.put(("stop",))
        if self.reader is not None:
            self.reader.join(timeout=60)
        self.proc.join(timeout=60)


# ----------------------------------------------------------------------------- HTTP API
class APIModel(BaseModel):
    # strict: JSON types as the schema says them (no "0.5" for a number, no false for a token id);
    # NaN / Infinity are bad input, not a sampling crash
    model_config = ConfigDict(strict=True, allow_inf_nan=False)


def _integral(v):
    return int(v) if isinstance(v, float) and v.is_integer() else v


def Int(**bounds):
    """An integer as JSON Schema means it: 1.0 and 1e3 are integers too (strict pydantic alone refuses them)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


VOCAB = M.ModelConfig().vocab_size    # every model here shares the one tokenizer: 256 bytes + 8 specials
TokenIds = Annotated[list[Int(ge=0, lt=VOCAB)], Field(min_length=1)]


def only_false(name):
    """A boolean flag we do not support: false (or absent) only. (Literal[False] would let 0 through.)"""
    def check(v):
        if v:
            raise ValueError(f"{name}=true is not supported")
        return v
    return Annotated[bool, AfterValidator(check), WithJsonSchema({"type": "boolean", "const": False})]


class StreamOptions(APIModel):
    include_usage: bool | None = False


class SamplingRequest(APIModel):
    """What both endpoints share. top_k, repetition_penalty, ignore_eos and return_token_ids are vLLM's extensions."""
    model: str | None = None
    max_tokens: Int(ge=1) | None = None
    temperature: float | None = Field(None, ge=0.0, description="default 1; 0 is greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: Int(ge=-1) | None = Field(None, description="0 or -1: off")
    stop: str | list[str] | None = None
    seed: Int() | None = Field(None, description="any integer (taken mod 2**64)")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Int(ge=1, le=1) | None = Field(1, description="one choice per request")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    ignore_eos: bool | None = False
    return_token_ids: bool | None = False
    user: str | None = None


class CompletionRequest(SamplingRequest):
    prompt: (Annotated[str, Field(min_length=1)] | TokenIds | Annotated[list[Annotated[str, Field(min_length=1)]],
             Field(min_length=1, max_length=1)] | Annotated[list[TokenIds], Field(min_length=1, max_length=1)])
    echo: only_false("echo") | None = False
    logprobs: None = None
    suffix: None = None


class ContentPart(APIModel):
    type: Literal["text"]
    text: str


class ChatMessage(APIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int(ge=1) | None = None
    logprobs: only_false("logprobs") | None = False


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 503)}
GENERATE = {200: {"content": {"application/json": {}, "text/event-stream": {}},
                  "description": "the completion, or with stream: server-sent events ending `data: [DONE]`"}, **ERRORS}


class APIError(Exception):
    def __init__(self, status, message, type_="invalid_request_error", param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = \
            status, message, type_, param, code, headers


def error_json(status, message, type_="invalid_request_error", param=None, code=None, headers=None):
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class BearerAuth:
    """Plain ASGI middleware (not BaseHTTPMiddleware, which would break streaming's disconnect detection):
    /v1 needs 'Authorization: Bearer KEY'; /health and /metrics stay open, as in vLLM."""

    def __init__(self, app, api_key):
        self.app, self.expected = app, b"Bearer " + api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(got, self.expected):
                resp = error_json(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                                  code="invalid_api_key")
                return await resp(scope, receive, send)
        await self.app(scope, receive, send)


class CountResponses:
    """Wraps the whole app (outside Starlette's error middleware, so a 500 it makes is counted too):
    http_requests_total{status} in /metrics."""

    def __init__(self, app, counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counter.labels(str(message["status"])).inc()
            await send(message)
        await self.app(scope, receive, counting_send)


def sse(obj):
    return f"data: {json.dumps(obj)}\n\n"


ENGINE_FAILED = sse({"error": {"message": "the engine failed on this request", "type": "server_error", "param": None,
                               "code": None}})   # a stream's last event when its request failed in the engine


def build_app(engine, cfg, metrics):
    """The FastAPI app around a (not yet started) engine; the lifespan starts and stops its thread."""
    tok, name, L = M.get_tokenizer(), cfg.served_model_name, cfg.max_model_len
    vocab = engine.vocab_size

    @asynccontextmanager
    async def lifespan(app):
        loop = asyncio.get_running_loop()

        def put_all(batch):
            for r, out in batch:
                r.sink.put_nowait(out)

        def deliver(batch):   # engine (reader) thread -> event loop; unbounded queues: the engine never waits on a client
            try:
                loop.call_soon_threadsafe(put_all, batch)
            except RuntimeError:   # loop closed: nobody is listening any more
                pass

        engine.deliver = deliver
        engine.start()
        yield
        engine.stop()   # uvicorn has drained the requests by now (SIGTERM)

    app = FastAPI(title="InfiniteContext", summary="OpenAI-compatible server on a paged MLA latent cache",
                  version="1", lifespan=lifespan)
    if cfg.api_key:
        app.add_middleware(BearerAuth, api_key=cfg.api_key)

    @app.exception_handler(APIError)
    async def _api_error(request, e):
        return error_json(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):   # OpenAI and vLLM answer 400 (FastAPI's default is 422)
        errs = e.errors()
        where = [".".join(str(x) for x in err.get("loc", ())[1:]) or "body" for err in errs]
        msg = "; ".join(f"{w}: {err.get('msg', 'invalid')}" for w, err in list(zip(where, errs))[:4]) or "invalid request"
        return error_json(400, msg, param=where[0] if where else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return error_json(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error",
                          headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request, e):
        traceback.print_exception(e)
        return error_json(500, f"internal error: {type(e).__name__}", "server_error")

    # ---- request -> engine
    def check_model(body):
        if body.model is not None and body.model != name:
            raise APIError(404, f"The model `{body.model}` does not exist (this server serves `{name}`).",
                           param="model", code="model_not_found")

    def encode(text, param):
        if len(text) > 14 * L:   # no token is longer than 14 characters: surely too long, skip tokenizing it
            raise APIError(400, f"This model's maximum context length is {L} tokens; the {param} is far longer.",
                           param=param, code="context_length_exceeded")
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")   # lone surrogates -> U+FFFD
        return tok.encode(text, allowed_special="all")

    def sampling(body, n_prompt, max_tokens, param):
        room = L - n_prompt
        if n_prompt == 0:
            raise APIError(400, "the prompt is empty", param=param)
        if room <= 0:
            raise APIError(400, f"This model's maximum context length is {L} tokens. However, your prompt has "
                           f"{n_prompt} tokens.", param=param, code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {L} tokens. However, you requested "
                           f"{n_prompt + max_tokens} tokens ({n_prompt} in the {param}, {max_tokens} in the completion).",
                           param="max_tokens", code="context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])

        def val(x, default):
            return default if x is None else x

        return SamplingParams(max_tokens=val(max_tokens, room), temperature=val(body.temperature, 1.0),
                              top_p=val(body.top_p, 1.0), top_k=max(val(body.top_k, 0), 0), stop=[s for s in stop if s],
                              seed=body.seed, repetition_penalty=val(body.repetition_penalty, 1.0),
                              presence_penalty=val(body.presence_penalty, 0.0),
                              frequency_penalty=val(body.frequency_penalty, 0.0), ignore_eos=bool(body.ignore_eos))

    def submit(ids, params):
        try:
            return engine.submit(ids, params, asyncio.Queue())
        except QueueFull:
            raise APIError(503, "the server is busy (request queue full) or shutting down; retry later",
                           "server_error", headers={"Retry-After": "1"}) from None

    async def outputs(r):
        while True:
            out = await r.sink.get()
            while out.finish_reason is None and not r.sink.empty():   # the client fell behind: one chunk for
                nxt = r.sink.get_nowait()                              # what waits (vLLM does too), less work
                out = replace(nxt, text=out.text + nxt.text, token_ids=out.token_ids + nxt.token_ids)
            yield out
            if out.finish_reason is not None:
                return

    async def collect(r, raw):
        """Whole completion; a client that hangs up while waiting frees the request's blocks."""
        async def watch():
            while (await raw.receive())["type"] != "http.disconnect":
                pass
            engine.abort(r)

        watcher = asyncio.ensure_future(watch())
        try:
            text, ids = [], []
            async for out in outputs(r):
                text.append(out.text)
                ids += out.token_ids
            if out.finish_reason == "error":
                raise APIError(500, "the engine failed on this request", "server_error")
            return "".join(text), ids, out
        finally:
            watcher.cancel()
            engine.abort(r)

    def usage(out):
        return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                "total_tokens": out.prompt_tokens + out.completion_tokens}

    def streaming(gen, r):
        async def body():
            try:
                async for chunk in gen:
                    yield chunk
                yield "data: [DONE]\n\n"
            finally:   # also when the client went away (Starlette cancels this generator)
                engine.abort(r)
        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ---- routes
    @app.get("/health", summary="200 while the engine runs")
    async def health():
        if not engine.alive():
            raise APIError(503, "engine not running", "server_error")
        return {"status": "ok"}

    @app.get("/metrics", summary="Prometheus metrics with vLLM's names",
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    async def prometheus_metrics():
        metrics.kv_usage.set(engine.kv_usage())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=ERRORS)
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time()),
                                            "owned_by": "infinitecontext", "root": name, "max_model_len": L}]}

    @app.post("/v1/completions", responses=GENERATE)
    async def completions(body: CompletionRequest, raw: HTTPRequest):
        check_model(body)
        p = body.prompt
        if isinstance(p, list) and isinstance(p[0], (str, list)):   # the one-element batch form
            p = p[0]
        if isinstance(p, str):
            ids = encode(p, "prompt")
        else:
            ids = list(p)
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        r = submit(ids, sampling(body, len(ids), body.max_tokens, "prompt"))
        rid, created = f"cmpl-{r.id}", int(time.time())

        def choice(text, finish, token_ids):
            c = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            if body.return_token_ids:
                c["token_ids"] = token_ids
            return c

        head = {"id": rid, "object": "text_completion", "created": created, "model": name}
        if not body.stream:
            text, toks, out = await collect(r, raw)
            c = choice(text, out.finish_reason, toks)
            if body.return_token_ids:
                c["prompt_token_ids"] = ids
            return {**head, "choices": [c], "usage": usage(out)}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def gen():
            async for out in outputs(r):
                if out.finish_reason == "error":
                    yield ENGINE_FAILED
                    return
                if out.text or out.finish_reason or body.return_token_ids:
                    yield sse({**head, "choices": [choice(out.text, out.finish_reason, out.token_ids)],
                               **({"usage": None} if include_usage else {})})
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(out)})
        return streaming(gen(), r)

    @app.post("/v1/chat/completions", responses=GENERATE)
    async def chat_completions(body: ChatCompletionRequest, raw: HTTPRequest):
        check_model(body)
        msgs = [{"role": m.role, "content": m.content if isinstance(m.content, str) else
                 "".join(part.text for part in m.content or [])} for m in body.messages]
        ids = encode(M.chat_prompt(msgs), "messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        r = submit(ids, sampling(body, len(ids), max_tokens, "messages"))
        head = {"id": f"chatcmpl-{r.id}", "object": "chat.completion", "created": int(time.time()), "model": name}
        if not body.stream:
            text, toks, out = await collect(r, raw)
            c = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                 "finish_reason": out.finish_reason}
            if body.return_token_ids:
                c["token_ids"], c["prompt_token_ids"] = toks, ids
            return {**head, "choices": [c], "usage": usage(out)}
        head["object"] = "chat.completion.chunk"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}

        def chunk(delta, finish=None, token_ids=None):
            c = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            if body.return_token_ids and token_ids is not None:
                c["token_ids"] = token_ids
            return sse({**head, "choices": [c], **extra})

        async def gen():
            yield chunk({"role": "assistant", "content": ""})
            async for out in outputs(r):
                if out.finish_reason == "error":
                    yield ENGINE_FAILED
                    return
                if out.text or out.finish_reason or body.return_token_ids:
                    yield chunk({"content": out.text} if out.text else {}, out.finish_reason, out.token_ids)
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(out)})
        return streaming(gen(), r)

    return app


# ----------------------------------------------------------------------------- command line
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def die(msg):
    M.die("serve.py", msg)


def parse_args(argv):
    cfg = M.parse_flags(ServeConfig, argv, __doc__, prog="serve.py")
    if cfg.dtype != "auto" and cfg.dtype not in DTYPES:
        die(f"--dtype={cfg.dtype!r}: expected auto, {', '.join(DTYPES)}")
    if cfg.backend not in ("embedded", "vllm"):
        die(f"--backend={cfg.backend!r}: expected embedded or vllm")
    for k in ("page", "max_num_seqs", "max_num_batched_tokens", "max_queue"):
        if getattr(cfg, k) < 1:
            die(f"--{k}={getattr(cfg, k)}: must be >= 1")
    for k in ("num_blocks", "kv_cache_tokens", "max_model_len", "drain_timeout", "threads", "prefill_graph_tokens"):
        if getattr(cfg, k) < 0:
            die(f"--{k}={getattr(cfg, k)}: must be >= 0")
    if cfg.max_num_batched_tokens < cfg.max_num_seqs:
        die(f"--max_num_batched_tokens={cfg.max_num_batched_tokens} must be >= --max_num_seqs={cfg.max_num_seqs} "
            "(every running sequence decodes one token per step)")
    if not 0 <= cfg.port < 65536:
        die(f"--port={cfg.port}: not a TCP port")
    cfg.api_key = cfg.api_key or os.environ.get("VLLM_API_KEY", "")
    return cfg


def load_model(cfg, device="cpu", dtype=torch.float32):
    if not cfg.ckpt:
        for p in ("checkpoints/infinitecontext-small", "out/tiny/ckpt.pt"):
            if os.path.exists(p):
                cfg.ckpt = p
                break
        else:
            die("no checkpoint: pass --ckpt=PATH, or train one first with `python train.py` (writes out/tiny/ckpt.pt)")
    try:
        model = M.load_checkpoint(cfg.ckpt, device)
    except M.CheckpointError as e:
        die(str(e))
    except NotImplementedError as e:
        die(f"{cfg.ckpt}: {e}")
    if not cfg.served_model_name:
        path = os.path.normpath(cfg.ckpt)
        base = os.path.basename(path)
        cfg.served_model_name = os.path.basename(os.path.dirname(path)) or base if base == "ckpt.pt" else base
    return model.to(dtype).eval().requires_grad_(False)


def export(model, out_dir):
    M.export_hf(model, out_dir)
    print(f"serve.py: wrote the Hugging Face export to {out_dir}", file=sys.stderr)


def run_vllm(cfg):
    exe = shutil.which("vllm")
    if exe is None:
        die("--backend=vllm needs vLLM, which is not installed here (pip install vllm; it brings its own torch)")
    model = load_model(cfg)
    out = cfg.export or tempfile.mkdtemp(prefix="infinitecontext-hf-")
    export(model, out)
    max_len = cfg.max_model_len or model.config.max_position_embeddings
    cmd = [exe, "serve", out, "--served-model-name", cfg.served_model_name, "--dtype", "bfloat16",
           "--max-model-len", str(max_len), "--host", cfg.host, "--port", str(cfg.port),
           "--max-num-seqs", str(cfg.max_num_seqs)]
    print("serve.py: " + " ".join(cmd), file=sys.stderr)
    if cfg.api_key:
        cmd += ["--api-key", cfg.api_key]
    os.execv(exe, cmd)


def size_cache(cfg, mc, device, dtype):
    """Blocks of the kv pool and max_model_len; one clear line when they cannot fit together."""
    per_token = mc.num_hidden_layers * M.cache_width(mc) * torch.tensor([], dtype=dtype).element_size()
    if cfg.num_blocks == 0:
        tokens = cfg.kv_cache_tokens
        if tokens == 0:
            budget = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else 256 << 20
            tokens = budget // per_token
        cfg.num_blocks = max(1, -(-tokens // cfg.page))
    capacity = cfg.num_blocks * cfg.page
    if cfg.max_model_len == 0:
        cfg.max_model_len = min(mc.max_position_embeddings, capacity)
    elif cfg.max_model_len > capacity:
        die(f"--max_model_len={cfg.max_model_len} does not fit the cache of {capacity} tokens "
            "(raise --kv_cache_tokens or --num_blocks)")
    elif cfg.max_model_len > mc.max_position_embeddings:
        die(f"--max_model_len={cfg.max_model_len} exceeds the model's max_position_embeddings={mc.max_position_embeddings}")
    return per_token


def build_engine(cfg, device, dtype, deliver=None):
    """Model, cache size, Engine and its decode graphs, in the process that will step it.
    Returns (engine, (non-embedding params, cache bytes per token, CUDA graphs?, compiled blocks?))."""
    if device.type == "cpu":   # decode is many small ops: oversubscribed OpenMP threads cost 10-50x
        torch.set_num_threads(cfg.threads or max(1, len(os.sched_getaffinity(0)) - 1))
    model = load_model(cfg, device, dtype)
    per_token = size_cache(cfg, model.config, device, dtype)
    engine = Engine(model, cfg, deliver=deliver)
    if engine.use_graphs:
        engine.capture_graphs()
    return engine, (model.num_params(), per_token, engine.use_graphs, engine.layers is not None)


def main(argv):
    cfg = parse_args(argv)
    if cfg.backend == "vllm":
        return run_vllm(cfg)
    if cfg.export:
        return export(load_model(cfg), cfg.export)
    import uvicorn
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        die("--device=cuda but no CUDA device is available")
    dtype = DTYPES.get(cfg.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and (cfg.page < 16 or cfg.page & (cfg.page - 1)):
        die(f"--page={cfg.page}: the CUDA decode kernel (mla_kernel) needs a power of two >= 16")
    t0 = time.perf_counter()
    if cfg.engine_process:   # the model stays in that process
        engine = EngineClient(cfg, device, dtype)
        n_params, per_token, graphs, compiled = engine.wait_ready()
    else:   # a thread of this process, sharing the GIL with the event loop
        engine, (n_params, per_token, graphs, compiled) = build_engine(cfg, device, dtype)
        # at Python's default 5 ms switch interval a busy event loop holds the engine up to that long
        # per handover (0.5 ms: +25% tok/s at 64 clients on an H100, results/serve_probe/probe_http_h100.json)
        sys.setswitchinterval(0.0005)
    engine.metrics = metrics = Metrics(cfg.served_model_name)
    if graphs:
        print(f"serve.py: decode graphs for every batch bucket up to {cfg.max_num_seqs} "
              f"({'compiled' if compiled else 'eager'} blocks)"
              f"{f', prefill graphs up to {cfg.prefill_graph_tokens} tokens' if cfg.prefill_graph_tokens else ''} "
              f"in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    app = build_app(engine, cfg, metrics)
    print(f"serve.py: {cfg.served_model_name} ({n_params / 1e6:.2f}M non-embedding params) on {device} "
          f"{str(dtype).removeprefix('torch.')}; kv cache {cfg.num_blocks} blocks x {cfg.page} tokens "
          f"({cfg.num_blocks * cfg.page * per_token / 2**20:.0f} MiB), max_model_len {cfg.max_model_len}, decode "
          f"{'CUDA graphs' if graphs else 'eager'}, engine in {'its own process' if cfg.engine_process else 'a thread'}; "
          f"http://{cfg.host}:{cfg.port}/v1", file=sys.stderr, flush=True)
    # What exists now (torch, FastAPI, the model's modules) lives as long as the server. A full collection walked
    # it in 140-173 ms on an H100 host, stalling every stream and every admission at once: under 64 streaming
    # clients half of a round reached the engine ~150 ms late (results/serve_probe/trace_h100_gcfreeze_8d260fa.json).
    gc.freeze()
    # uvicorn drains on SIGTERM (no new connections, running requests finish), then re-raises the signal:
    # exit 0 at that point instead of dying of it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(CountResponses(app, metrics.http), host=cfg.host, port=cfg.port, log_level="info", access_log=cfg.access_log,
                timeout_graceful_shutdown=cfg.drain_timeout or None)


if __name__ == "__main__":
    main(sys.argv[1:])
