"""
Train an InfiniteContext model: nanoGPT's train.py, importable, on FSDP2.

    python train.py                                     # CPU main job: tiny preset on single-needle data ->
                                                        # out/tiny/ckpt.pt, then a needle evaluation at 512 tokens
    python train.py --data=input.txt --max_iters=500    # plain text (or a uint16 token .bin), loss on all tokens
    torchrun --nproc_per_node=8 train.py --preset=small --out_dir=out/small --batch_size=32
    python train.py --out_dir=out/tiny --resume=True    # continue exactly where out/tiny/ckpt.pt stopped
    python train.py --model.num_hidden_layers=2 ...     # override any ModelConfig field of the preset

One process without torchrun trains a plain module (bf16 autocast on CUDA). Under torchrun every block
is fully_shard-ed, then the root (FSDP2 over a 1-D mesh; gloo on CPU, nccl on GPU), even on a world
of 1. Batch rows are pure functions of (seed, step, row) and the learning rate of the step, so a resumed
run repeats the uninterrupted run's losses exactly. SIGTERM: finish the step, save, exit 0.

train(cfg, model, batches, loss_fn) is the loop; dpo.py calls it with its own loss and batches.
"""
import functools
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import model as M


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out/tiny"          # ckpt.pt, log.jsonl and eval.json go here
    resume: bool = False               # continue from out_dir/ckpt.pt (weights, optimizer, step, RNG); fresh if absent
    init_from: str = ""                # start from these weights: a ckpt.pt, its folder, or a Hugging Face export
                                       # (fresh optimizer and schedule)
    ckpt_interval: int = 100           # save every N steps (0: only at the end, or on SIGTERM; -1: never, benchmarks)
    log_interval: int = 10             # log every N steps (stdout, out_dir/log.jsonl, W&B)
    # model
    preset: str = "tiny"               # model.PRESETS key (with --init_from/--resume: the checkpoint's config)
    model: dict = field(default_factory=dict)  # --model.FIELD=VALUE: override one ModelConfig field (see below)
    # data
    data: str = "needle"               # "needle" (needle.training_batch), a UTF-8 text file, or a uint16 token .bin
    variants: str = "single"           # needle variants to mix, comma-separated (single,multikey,multivalue,multiquery)
    haystacks: str = "noise"           # needle haystacks to mix, comma-separated (noise,essay,needle)
    seq_len: int = 512                 # tokens per row (needle: samples of mixed lengths up to this)
    max_pos: int = 0                   # needle PoSE: positions spread over this range (0: no gaps)
    # optimisation
    batch_size: int = 16               # rows per micro-batch per process
    grad_accum: int = 1                # micro-batches per step; global batch = batch_size * grad_accum * world
    max_iters: int = 200               # optimizer steps (the CPU main job: ~2.5 s each on 2 cores)
    lr: float = 2e-3                   # peak learning rate
    min_lr: float = 2e-4               # the cosine's floor
    warmup_iters: int = 50             # linear warmup steps
    lr_decay_iters: int = 0            # the cosine reaches min_lr here (0: max_iters)
    weight_decay: float = 0.1          # AdamW, matrices only (not norms)
    beta1: float = 0.9                 # AdamW beta1
    beta2: float = 0.95                # AdamW beta2
    grad_clip: float = 1.0             # max global gradient norm (0: off)
    seed: int = 1337                   # model init and data
    # system
    device: str = "auto"               # auto (cuda if available), cpu or cuda
    dtype: str = "auto"                # auto (bfloat16 on CUDA, else float32), float32 or bfloat16
    compile: str = "auto"              # torch.compile each block: auto (on for CUDA), True or False
    parallel: str = "fsdp"             # under torchrun: fsdp (FSDP2, sharded) or ddp (a full replica per process)
    act_ckpt: bool = False             # activation checkpointing of every block
    threads: int = 0                   # torch threads per process on CPU (0: cores / processes on this node)
    # logging
    wandb_log: bool = False            # log to Weights & Biases (offline when WANDB_API_KEY is unset)
    wandb_project: str = "infinitecontext"  # W&B project
    wandb_run_name: str = ""           # W&B run name (empty: W&B's own)
    peak_flops: float = 0.0            # peak FLOP/s per device for MFU (0: the card's dense bf16 peak; none on CPU)
    matmul_tflops: float = 0.0         # measured matmul TFLOP/s per device (bench.py) for a second MFU (0: off)
    # final evaluation (needle data only; rank 0, after the last step)
    eval_lengths: str = ""             # prompt lengths, comma-separated (empty: seq_len)
    eval_depths: str = "0,25,50,75,100"  # needle depths in percent
    eval_samples: int = 4              # samples per (length, depth) cell (0: no evaluation)
    eval_seed: int = 0                 # needle.make_sample seeds eval_seed, eval_seed+1, ... (not training samples)


ConfigError = M.UsageError   # bad configuration or input file: main() prints it as one line and exits 2


# ----------------------------------------------------------------------------- config from the command line
def parse_args(argv, cls=TrainConfig):
    """--key=value overrides of cls's defaults (model.parse_flags), --model.FIELD=VALUE for ModelConfig fields."""
    tiny = M.PRESETS["tiny"]
    more = "\nModel overrides (--model.FIELD=VALUE; shown: the tiny preset's values; None where optional):\n" + "".join(
        f"  --model.{f.name}={json.dumps(v) if f.name == 'rope_scaling' else v}\n"
        for f in fields(M.ModelConfig) for v in [getattr(tiny, f.name)])
    cfg = M.parse_flags(cls, [a for a in argv if not a.startswith("--model.")], __doc__,
                        [f.name for f in fields(cls) if f.name != "model"], more)
    mtypes = {f.name: f.type for f in fields(M.ModelConfig)}
    for arg in (a for a in argv if a.startswith("--model.")):
        key, eq, val = arg[2:].partition("=")
        if not eq:
            raise ConfigError(f"expected --key=value, got {arg!r} (see --help)")
        if key[len("model."):] not in mtypes:
            raise ConfigError(f"unknown model field --{key} (see --help)")
        cfg.model = {**cfg.model, key[len("model."):]: M.parse_value(key, val, mtypes[key[len("model."):]])}
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Cheap checks every rank can make before any work (files are opened later, on rank 0)."""
    if cfg.preset not in M.PRESETS:
        raise ConfigError(f"--preset={cfg.preset!r} is not a preset (one of {', '.join(M.PRESETS)})")
    for key in ("batch_size", "grad_accum", "seq_len", "log_interval"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key} must be >= 1")
    if cfg.ckpt_interval < -1:
        raise ConfigError("--ckpt_interval must be >= -1")
    for key in ("max_iters", "warmup_iters", "lr_decay_iters", "eval_samples", "threads", "max_pos"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"--{key} must be >= 0")
    choices = {"device": ("auto", "cpu", "cuda"), "dtype": ("auto", "float32", "bfloat16"),
               "compile": ("auto", "True", "False"), "parallel": ("fsdp", "ddp")}
    for key, ok in choices.items():
        if getattr(cfg, key) not in ok:
            raise ConfigError(f"--{key}={getattr(cfg, key)!r} is not one of {', '.join(ok)}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but no CUDA device is available")
    if cfg.data != "needle" and not os.path.isfile(cfg.data):
        raise ConfigError(f"--data={cfg.data}: no such file (or 'needle')")
    if cfg.init_from and not os.path.exists(cfg.init_from):
        raise ConfigError(f"--init_from={cfg.init_from}: no such file")
    model_config(cfg)
    if cfg.wandb_log:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("--wandb_log=True but wandb is not installed (pip install wandb, or drop the flag)") from None


def model_config(cfg, base=None):
    """The preset's (or a checkpoint's) ModelConfig with --model.* overrides applied."""
    base = M.config_from_dict(base) if base is not None else M.PRESETS[cfg.preset]
    try:
        return replace(base, **cfg.model)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--model.*: {e}") from None


# ----------------------------------------------------------------------------- distributed setup
def setup_distributed(device="auto"):
    """(rank, world, device). Under torchrun (RANK set) the default process group is made once:
    nccl on GPU, gloo on CPU. Without torchrun: rank 0 of 1 and no process group."""
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if "RANK" not in os.environ:
        return 0, 1, dev
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None)
    return dist.get_rank(), dist.get_world_size(), dev


def _rank0(fn, rank, share=False):
    """fn() on rank 0 only; its error is raised as ConfigError on every rank (no rank waits forever).
    share: every rank gets rank 0's result (else the others get None)."""
    out, err = None, None
    if rank == 0:
        try:
            out = fn()
        except (ConfigError, M.CheckpointError, OSError, UnicodeDecodeError) as e:
            err = str(e)
    if dist.is_initialized():
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err:
        raise ConfigError(err)
    return _broadcast(out) if share else out


def _broadcast(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- data
# A batch source is batches(step, micro, rank, world) -> batch, a pure function of its arguments: the data
# position is the step. Row r of micro-batch m of rank k is global row (m * world + k) * batch_size + r, so
# the global batch of a step does not depend on how it is split over processes and micro-batches.
def needle_batches(cfg):
    import needle
    variants, haystacks = _csv(cfg.variants), _csv(cfg.haystacks)

    def get(step, micro, rank, world):
        # needle's global sample index is (step * world + rank) * batch_size + row: passing the micro-batch
        # as part of the rank makes it ours
        idx, targets, pos = needle.training_batch(cfg.batch_size, cfg.seq_len, step, seed=cfg.seed,
                                                  rank=micro * world + rank, world=world * cfg.grad_accum,
                                                  max_pos=cfg.max_pos or None, variants=variants,
                                                  haystacks=haystacks)
        if fixed:
            return idx, targets, pos
        # rows are right-padded: drop the columns after the last target (causal, so the loss is unchanged)
        keep = int((targets != -1).any(0).nonzero().max()) + 1
        return idx[:, :keep], targets[:, :keep], pos[:, :keep]
    # torch.compile would recompile for every new width: compiled runs keep the full seq_len
    fixed = cfg.compile == "True" or (cfg.compile == "auto" and cfg.device != "cpu" and torch.cuda.is_available())
    return get


def prepare_tokens(cfg):
    """Path of a uint16 token file for --data: a .bin is used as is; text is encoded once with
    model.get_tokenizer (specials allowed, so ChatML dumps work) into out_dir/<name>.bin."""
    path = cfg.data
    if path.endswith(".bin"):
        n = os.path.getsize(path)
        if n % 2:
            raise ConfigError(f"--data={path}: odd size, not a uint16 token file")
    else:
        out = os.path.join(cfg.out_dir, os.path.basename(path) + ".bin")
        if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(path):
            with open(path, encoding="utf-8") as f:
                try:
                    text = f.read()
                except UnicodeDecodeError:
                    raise ConfigError(f"--data={path}: not UTF-8 text (give a uint16 .bin for token ids)") from None
            ids = np.array(M.get_tokenizer().encode(text, allowed_special="all"), dtype=np.uint16)
            os.makedirs(cfg.out_dir, exist_ok=True)
            with open(out + ".tmp", "wb") as f:
                f.write(ids.tobytes())
            os.replace(out + ".tmp", out)
        path = out
    n = os.path.getsize(path) // 2
    if n < cfg.seq_len + 2:
        raise ConfigError(f"--data={cfg.data}: {n} tokens, fewer than seq_len + 2 = {cfg.seq_len + 2}")
    return path


def token_batches(cfg, path):
    """nanoGPT's random windows of a uint16 token file, each drawn from (seed, step, global row)."""
    T, B = cfg.seq_len, cfg.batch_size

    def get(step, micro, rank, world):
        data = np.memmap(path, dtype=np.uint16, mode="r")   # reopened per batch: memmap keeps pages otherwise
        rows = []
        for r in range(B):
            g = (micro * world + rank) * B + r
            i = int(np.random.default_rng([cfg.seed, step, g]).integers(0, len(data) - T))
            rows.append(torch.from_numpy(data[i:i + T + 1].astype(np.int64)))
        x = torch.stack(rows)                                # (B, T+1)
        return x[:, :-1], x[:, 1:], None                      # loss on all tokens, positions 0..T-1
    return get


def _csv(s):
    return [x.strip() for x in s.split(",") if x.strip()]


# ----------------------------------------------------------------------------- loss, schedule, model
def lm_loss(model, batch):
    """Summed next-token cross-entropy over targets != -1, and their count. train() divides by the
    global count, so every target token weighs the same however rows are split over ranks. Also logged:
    row_exact, the fraction of rows whose every target is the argmax (teacher-forced). On needle data that is
    retrieval accuracy, the number the loss hides: a loss that falls from copying six digits of seven
    still scores 0 (results/gpu_log.md, attempt 5)."""
    idx, targets, pos = batch
    logits = model(idx, pos=pos)                                              # (B, T, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="sum")
    wrong = (logits.argmax(-1) != targets) & (targets != -1)                  # (B, T)
    return loss, (targets != -1).sum(), {"row_exact": ((~wrong).all(1).sum(), targets.shape[0])}


def get_lr(step, cfg):
    """Linear warmup to cfg.lr, cosine down to cfg.min_lr at lr_decay_iters (or max_iters), then flat."""
    end = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if step >= end:
        return cfg.min_lr
    r = (step - cfg.warmup_iters) / max(1, end - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * r)) * (cfg.lr - cfg.min_lr)


def parallelize(model, cfg, device, dtype, mesh):
    """Activation checkpointing, then torch.compile, then FSDP2 per block and root (torchtitan's order),
    or DDP for --parallel=ddp (the seed's comparison: every process holds all weights, gradients, moments)."""
    if cfg.act_ckpt:
        from torch.utils.checkpoint import checkpoint
        for block in model.layers:  # wrap forward in place: parameter names stay those of model.py
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    if cfg.compile == "True" or (cfg.compile == "auto" and device.type == "cuda"):
        for block in model.layers:
            block.compile()
    if mesh is None:
        return model.to(device)
    if cfg.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model.to(device), device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for i, block in enumerate(model.layers):
        # the last block's parameters are needed again at once by backward: keep them gathered
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(model.layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def make_optimizer(model, cfg, device):
    decay = [p for p in model.parameters() if p.dim() >= 2]      # matrices and embeddings
    rest = [p for p in model.parameters() if p.dim() < 2]        # norm weights
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def peak_flops(cfg, device):
    """Dense bf16 FLOP/s of one device: --peak_flops, else known cards (H100/H200 SXM 989e12), else 0."""
    if cfg.peak_flops:
        return cfg.peak_flops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if "H100" in name or "H200" in name:
            return 756e12 if "PCIe" in name else 989e12
        if "A100" in name:
            return 312e12
    return 0.0


# ----------------------------------------------------------------------------- checkpoints
def _state_dict_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(**kw)


def save(path, model, optimizer, step, cfg, rank, **extra):
    """Full state gathered to rank 0 (CPU), written atomically by model.save_checkpoint."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    opts = _state_dict_options(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)               # every rank takes part; rank 0 receives
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    if rank == 0:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state()
        M.save_checkpoint(path, getattr(model, "module", model), state_dict=msd, optimizer=osd, step=step,  # DDP: .module
                          data={"source": cfg.data, "position": step}, train_config=asdict(cfg), rng=rng, **extra)
    if dist.is_initialized():
        dist.barrier()


def read_weights(src, resume=False):
    """The checkpoint dict to start from: out_dir/ckpt.pt whole when resuming; for --init_from a ckpt.pt,
    its folder, or a Hugging Face folder from model.export_hf (weights and config only)."""
    if resume or os.path.isfile(src):
        return M.read_checkpoint(src)
    model = M.load_checkpoint(src)
    return {"config": asdict(model.config), "model": model.state_dict()}


def load_state(model, optimizer, obj):
    """Weights (and optimizer state) from rank 0's checkpoint dict into every rank's shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    if dist.is_initialized():   # only rank 0 holds the file's tensors; they are broadcast shard by shard
        opts = _state_dict_options(full_state_dict=True, broadcast_from_rank0=True)
        msd = obj["model"] if obj else {}
        osd = obj["optimizer"] if obj and optimizer is not None else {}
    else:
        opts, msd, osd = None, obj["model"], obj.get("optimizer")
    try:
        set_model_state_dict(model, msd, options=opts)
    except (RuntimeError, KeyError, ValueError) as e:
        raise ConfigError(f"checkpoint weights do not fit the model ({str(e).splitlines()[0][:200]})") from None
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, osd, options=opts)


# ----------------------------------------------------------------------------- logging
class Logger:
    """Rank 0: a line on stdout, a record in out_dir/log.jsonl, and W&B when asked."""

    def __init__(self, cfg, rank, resume_step, wandb_id=None):
        self.rank, self.path, self.run = rank, os.path.join(cfg.out_dir, "log.jsonl"), None
        if rank != 0:
            return
        os.makedirs(cfg.out_dir, exist_ok=True)
        # a resumed run drops the records after its checkpoint (a killed run logged steps it will repeat)
        kept = []
        if resume_step and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
        with open(self.path, "w") as f:
            f.writelines(kept)
        if cfg.wandb_log:
            if not os.environ.get("WANDB_API_KEY"):
                os.environ.setdefault("WANDB_MODE", "offline")
            import wandb
            self.run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, config=asdict(cfg),
                                  dir=cfg.out_dir, id=wandb_id, resume="allow" if wandb_id else None)

    def __call__(self, rec, line=None):
        if self.rank != 0:
            return
        if line:
            print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])

    def finish(self):
        if self.run is not None:
            self.run.finish()


def say(rank, msg):
    if rank == 0:
        print(msg, flush=True)


# ----------------------------------------------------------------------------- the loop
def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _tokens(batch):
    """(rows, columns) of the token ids: batch[0] or batch['idx']."""
    x = batch["idx"] if isinstance(batch, dict) else batch[0]
    return x.shape[0], x.shape[1]


def train(cfg, model=None, batches=None, loss_fn=None):
    """The training loop. Returns {"step", "loss", "preempted", "ckpt"}.

    model:   an unsharded model.Transformer to train (default: the preset, or --init_from's weights).
    batches: batches(step, micro, rank, world) -> batch of CPU tensors (default: --data); a pure function
             of its arguments, so that resume repeats the data exactly.
    loss_fn: loss_fn(model, batch) -> (loss_sum, count) or (loss_sum, count, metrics): summed over count
             units (tokens, pairs); the step's loss is the global sum / the global count. metrics
             {name: sum} are logged as global sum / global count, {name: (sum, n)} as global sum / global n.
             Default: lm_loss.
    --resume loads weights, optimizer, step and RNG from out_dir/ckpt.pt into whatever model is trained.
    """
    rank, world, device = setup_distributed(cfg.device)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // local_world))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        cfg.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    path = os.path.join(cfg.out_dir, "ckpt.pt")

    if rank == 0 and os.path.isdir(cfg.out_dir):   # temp files of saves that were killed midway
        for f in os.listdir(cfg.out_dir):
            if f.startswith("ckpt.pt.tmp"):
                os.remove(os.path.join(cfg.out_dir, f))
    # what to start from: rank 0 reads the checkpoint; the others get its small fields by broadcast
    src = path if cfg.resume and _rank0(lambda: os.path.exists(path), rank, share=True) else None
    src = src or cfg.init_from or None
    obj = _rank0(lambda: read_weights(src, resume=src == path), rank) if src else None
    meta = _broadcast({k: v for k, v in obj.items() if k not in ("model", "optimizer")} if obj else None)
    resuming = src == path
    if cfg.resume and not resuming:
        say(rank, f"resume: no {path}, starting fresh")
    if model is None:
        torch.manual_seed(cfg.seed)
        model = M.Transformer(model_config(cfg, meta["config"] if meta else None))
    mesh = None
    if dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(device.type, (world,))
    n_params = model.num_params()
    flops_per_token = functools.lru_cache(model.flops_per_token)   # FLOP per token at a sequence length
    model = parallelize(model, cfg, device, dtype, mesh)
    optimizer = make_optimizer(model, cfg, device)
    start = 0
    if meta:
        load_state(model, optimizer if resuming else None, obj)
        del obj
        if resuming:
            start = int(meta["step"])
            torch.set_rng_state(meta["rng"]["torch"])
            if "cuda" in meta["rng"] and device.type == "cuda":
                torch.cuda.set_rng_state(meta["rng"]["cuda"])
            changed = {k: v for k, v in asdict(cfg).items() if k != "resume" and meta["train_config"].get(k, v) != v}
            say(rank, f"resume: {path} at step {start}" + (f" (changed flags: {changed})" if changed else ""))
        else:
            say(rank, f"init_from: weights of {src}")
    if batches is None:
        if cfg.data == "needle":
            batches = needle_batches(cfg)
        else:
            batches = token_batches(cfg, _rank0(lambda: prepare_tokens(cfg), rank, share=True))
    loss_fn = loss_fn or lm_loss
    fsdp = mesh is not None and cfg.parallel == "fsdp"     # else DDP, or one process: a plain module
    autocast = torch.autocast(device.type, dtype) if not fsdp and dtype != torch.float32 else nullcontext()
    log = Logger(cfg, rank, start if resuming else 0, (meta or {}).get("wandb_id") if resuming else None)
    peak = peak_flops(cfg, device)
    say(rank, f"train: {n_params / 1e6:.2f}M non-embedding parameters, world {world} on {device.type} "
              f"({'one process' if mesh is None else cfg.parallel.upper() + ('2' if fsdp else '')}, {str(dtype).removeprefix('torch.')}), global batch "
              f"{cfg.batch_size * cfg.grad_accum * world} x {cfg.seq_len}, steps {start}..{cfg.max_iters}, "
              f"data {cfg.data}, out {cfg.out_dir}")

    # SIGTERM (SLURM preemption via torchrun, k8s, kill): finish the step, save, exit 0
    stop = {"flag": False}
    old_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    extra = {"wandb_id": log.run.id} if log.run is not None else {}
    step, loss, preempted = start, float("nan"), False
    t_log, steps_log, tok_log, flop_log = time.perf_counter(), 0, 0, 0.0   # since the last log line
    model.train()
    try:
        while step < cfg.max_iters:
            lr = get_lr(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            count = torch.zeros((), dtype=torch.float64, device=device)
            metrics = {}
            for micro in range(cfg.grad_accum):
                batch = _to(batches(step, micro, rank, world), device)
                last = micro == cfg.grad_accum - 1     # reduce gradients only after the last micro-batch
                if fsdp:
                    model.set_requires_gradient_sync(last)
                sync = model.no_sync() if mesh is not None and not fsdp and not last else nullcontext()
                with sync:
                    with autocast:
                        out = loss_fn(model, batch)
                    out[0].backward()
                loss_sum += out[0].detach().double()
                count += torch.as_tensor(out[1], dtype=torch.float64, device=device)
                for k, v in (out[2] if len(out) > 2 else {}).items():   # [sum, n]; n defaults to the count
                    v = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=device).detach()
                                     for x in (v if isinstance(v, tuple) else (v, out[1]))])
                    metrics[k] = metrics[k] + v if k in metrics else v
                rows, cols = _tokens(batch)
                tok_log += rows * cols * world
                flop_log += flops_per_token(cols) * rows * cols * world
            names = sorted(metrics)
            flag = torch.tensor(float(stop["flag"]), dtype=torch.float64, device=device)
            stats = torch.cat([torch.stack([loss_sum, count, flag]), *[metrics[k] for k in names]])
            if dist.is_initialized():
                dist.all_reduce(stats)       # global sums; the stop flag too, so all ranks stop at the same step
            stats = stats.tolist()
            # gradients hold d(local sum)/dw, averaged over ranks by FSDP or DDP: rescale to d(global mean)/dw
            scale = (world if mesh is not None else 1) / max(stats[1], 1.0)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_log += 1
            loss = stats[0] / max(stats[1], 1.0)
            preempted = stats[2] > 0
            if step % cfg.log_interval == 0 or step == cfg.max_iters or preempted:
                dt = time.perf_counter() - t_log
                rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": float(norm), "tokens_per_s": tok_log / dt,
                       "tokens_per_s_per_device": tok_log / dt / world, "time": time.time()}
                rec.update({k: stats[3 + 2 * i] / max(stats[4 + 2 * i], 1e-12) for i, k in enumerate(names)})
                line = (f"step {step:>{len(str(cfg.max_iters))}}/{cfg.max_iters} | loss {loss:.4f} | lr {lr:.2e} | "
                        f"norm {float(norm):.2f} | {tok_log / dt:,.0f} tok/s")
                if cfg.data == "needle" and "row_exact" in rec:
                    line += f" | exact {rec['row_exact']:.3f}"
                if peak:
                    rec["mfu"] = flop_log / dt / world / peak
                    line += f" | mfu {100 * rec['mfu']:.1f}%"
                if cfg.matmul_tflops:
                    rec["mfu_measured"] = flop_log / dt / world / (cfg.matmul_tflops * 1e12)
                    line += f" | {100 * rec['mfu_measured']:.1f}% of matmul"
                log(rec, line + f" | {1000 * dt / steps_log:.0f} ms/step")
                t_log, steps_log, tok_log, flop_log = time.perf_counter(), 0, 0, 0.0
            if cfg.ckpt_interval >= 0 and (preempted or step == cfg.max_iters
                                           or (cfg.ckpt_interval and step % cfg.ckpt_interval == 0)):
                t0 = time.perf_counter()
                save(path, model, optimizer, step, cfg, rank, **extra)
                say(rank, f"saved {path} at step {step} ({time.perf_counter() - t0:.1f} s)")
                t_log += time.perf_counter() - t0      # saving time is not training throughput
            if preempted:
                say(rank, f"SIGTERM: stopped at step {step}, checkpoint saved; resume with --resume=True")
                break
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        log.finish()
    return {"step": step, "loss": loss, "preempted": preempted, "ckpt": path, "device": device}


# ----------------------------------------------------------------------------- evaluation and main
def evaluate(cfg, ckpt, device, wall_s=None):
    """needle.evaluate on the saved checkpoint at the training length(s); writes out_dir/eval.json."""
    import needle
    model = M.load_checkpoint(ckpt, device)
    lengths = [int(x) for x in _csv(cfg.eval_lengths)] or [cfg.seq_len]
    depths = [float(x) for x in _csv(cfg.eval_depths)]
    variant, haystack = _csv(cfg.variants)[0], _csv(cfg.haystacks)[0]
    t0 = time.perf_counter()
    rows = needle.evaluate(model, lengths, depths, cfg.eval_samples, variant, haystack, seed=cfg.eval_seed)
    summary = needle.summarize(rows)
    out = os.path.join(cfg.out_dir, "eval.json")
    with open(out, "w") as f:
        json.dump({"provenance": M.provenance(device), "config": asdict(cfg), "train_wall_s": wall_s,
                   "eval_wall_s": time.perf_counter() - t0, "summary": summary, "samples": rows}, f, indent=1)
    print(f"eval: needle {variant}/{haystack} at lengths {lengths}, depths {depths}, {cfg.eval_samples} samples "
          f"each: accuracy {summary['accuracy']:.3f} ({summary['n']} samples) -> {out}", flush=True)
    return summary


def main(argv):
    t0 = time.perf_counter()
    try:
        cfg = parse_args(argv)
        result = train(cfg)
    except ConfigError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    rank = dist.get_rank() if dist.is_initialized() else 0
    if dist.is_initialized():
        dist.destroy_process_group()
    say(rank, f"train: {result['step']} steps, final loss {result['loss']:.4f}, {wall:.0f} s")
    if rank == 0 and cfg.data == "needle" and cfg.eval_samples and not result["preempted"]:
        evaluate(cfg, result["ckpt"], result["device"], wall)
        say(rank, f"total wall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
