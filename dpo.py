"""
Direct Preference Optimization on needle preference pairs, hand-written, on train.py's loop.

    python dpo.py                                    # CPU: align out/tiny/ckpt.pt briefly, compare SFT vs DPO
    python dpo.py --ckpt=out/small/ckpt.pt --pairs=pairs.jsonl --beta=0.1 --loss_type=ipo
    torchrun --nproc_per_node=8 dpo.py --ckpt=... --out_dir=out/small-dpo

DPO (Rafailov et al. 2023) in one paragraph. For a prompt x with a chosen completion y_c and a
rejected one y_r, let pi = log p_policy(y | x) and ref = log p_reference(y | x), each SUMMED over the
completion's tokens (prompt and padding masked). The implicit reward of a completion is
beta * (pi - ref); the loss is a logistic regression on the reward margin,
    z = (pi_c - ref_c) - (pi_r - ref_r),      sigmoid: -log sigmoid(beta z)
cDPO (Mitchell 2023) assumes labels flipped with probability eps: -(1-eps) log s(beta z) - eps log s(-beta z);
TRL's "robust" variant divides the eps-weighted difference by (1 - 2 eps) so it stays unbiased;
IPO (Azar et al. 2023) regresses the length-normalised margin onto 1/(2 beta) with a squared loss.
RPO (Pang et al. 2024; TRL's rpo_alpha) adds alpha * the chosen answer's per-token NLL, -pi_c / n_c: plain
DPO can raise the margin by lowering both answers, and on the needle task that unlearns copying (the
rejected value is a distractor the model copied from the context too).
The reference model is the frozen SFT model: its log-probs never change, so we compute them once
before training and store them with the pairs (TRL's precompute_ref_log_probs); the training steps
run the policy alone, chosen and rejected rows in one concatenated forward (TRL's concatenated_forward).
"""
import functools
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F

import model as M

LOSS_TYPES = ("sigmoid", "robust", "ipo")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


# ----------------------------------------------------------------------------- the loss
def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, len_c=None, len_r=None,
             rpo_alpha=0.0):
    """Per-pair DPO losses and implicit rewards. All inputs (B,) summed completion log-probs;
    len_c / len_r (B,) completion token counts (IPO and RPO: they use per-token log-probs).
    rpo_alpha > 0 adds rpo_alpha * (-pi_c / len_c), the chosen answer's mean token NLL, to every loss.
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)), rewards = beta * (pi - ref), detached."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("label_smoothing has no meaning for IPO (its loss is a squared error, not a likelihood)")
    lr_c, lr_r = pi_c - ref_c, pi_r - ref_r           # policy/reference log-ratios of each completion
    eps = label_smoothing
    if loss_type == "ipo":
        n_c = 1.0 if len_c is None else len_c
        n_r = 1.0 if len_r is None else len_r
        losses = (lr_c / n_c - lr_r / n_r - 1.0 / (2.0 * beta)) ** 2
    else:
        z = beta * (lr_c - lr_r)
        if loss_type == "sigmoid":   # cDPO; plain DPO at eps = 0
            losses = -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        else:                        # robust (Chowdhury et al. 2024): unbiased under label-flip rate eps
            losses = (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    if rpo_alpha:
        losses = losses - rpo_alpha * pi_c / (1.0 if len_c is None else len_c)
    return losses, beta * lr_c.detach(), beta * lr_r.detach()


def dpo_metrics(losses, chosen_rewards, rejected_rewards, pi_c, pi_r):
    """TRL's metrics as SUMS over the pairs (train.py divides every sum by the global pair count, so the log
    shows means however pairs are split over ranks). Accuracy counts a pair only when the chosen reward
    is strictly higher: a tie (policy == reference) is a miss."""
    values = (chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).double(),
              chosen_rewards - rejected_rewards, pi_c.detach(), pi_r.detach())
    return {k: v.sum() for k, v in zip(METRICS, values)}


# ----------------------------------------------------------------------------- pairs -> token rows
def encode_pair(pair, tok=None):
    """Token ids (prompt, chosen, rejected). Completions end with <|im_end|>, as SFT trained them to:
    the preference covers where the answer stops, too."""
    tok = tok or M.get_tokenizer()
    enc = lambda s: tok.encode(s, allowed_special="all")  # noqa: E731  the prompt is ChatML
    return enc(pair["prompt"]), enc(pair["chosen"]) + [M.IM_END], enc(pair["rejected"]) + [M.IM_END]


def collate_pairs(pairs, tok=None, pad_to=None):
    """B pairs -> one concatenated batch of 2B rows, chosen rows first, then rejected (TRL's layout):
    idx (2B, T) = prompt + completion, right-padded with PAD; targets (2B, T) = the next token where that
    token is a completion token, -1 elsewhere (prompt, padding), so targets != -1 marks exactly the
    completion. ref (2B,) the stored reference log-probs when the pairs carry them."""
    enc = [encode_pair(p, tok) for p in pairs]
    rows = [(prompt, c) for prompt, c, _ in enc] + [(prompt, r) for prompt, _, r in enc]   # chosen..., rejected...
    T = max(len(a) + len(b) for a, b in rows)
    T = max(T, pad_to or 0)
    idx = torch.full((len(rows), T), M.PAD, dtype=torch.long)
    targets = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (prompt, comp) in enumerate(rows):
        seq = prompt + comp
        idx[i, :len(seq)] = torch.tensor(seq)
        # position t predicts token t+1: the completion's tokens are predicted from len(prompt)-1 on
        targets[i, len(prompt) - 1:len(seq) - 1] = torch.tensor(comp)
    batch = {"idx": idx, "targets": targets}
    if all("ref_chosen" in p for p in pairs):
        batch["ref"] = torch.tensor([p["ref_chosen"] for p in pairs] + [p["ref_rejected"] for p in pairs],
                                    dtype=torch.float64)   # fp64: a -300 sum keeps its 1e-5s
    return batch


def sequence_logps(model, idx, targets):
    """Summed log p(completion | prompt) per row and the completion lengths: (B,), (B,).
    Log-softmax in fp32 at least (bf16 logits would round the sum); fp64 models stay fp64."""
    logits = model(idx)                                                  # (B, T, V)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    tok_logp = -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1,
                                reduction="none").view(targets.shape)  # (B, T), 0 where targets == -1
    return tok_logp.sum(-1), (targets != -1).sum(-1)


def dpo_step_loss(model, batch, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, rpo_alpha=0.0):
    """train.py's loss_fn: one concatenated policy forward over a collated batch of B pairs ->
    (summed loss, B, summed TRL metrics). The reference log-probs come from the batch, never from a model."""
    logps, lengths = sequence_logps(model, batch["idx"], batch["targets"])   # (2B,), (2B,)
    B = logps.shape[0] // 2
    ref = batch["ref"].to(logps.device)
    losses, rc, rr = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta, loss_type, label_smoothing,
                              lengths[:B], lengths[B:], rpo_alpha)
    return losses.sum(), B, dpo_metrics(losses, rc, rr, logps[:B], logps[B:])


@torch.no_grad()
def reference_logps(model, pairs, batch_size=8, device="cpu", tok=None):
    """The frozen reference's summed completion log-probs, computed ONCE before training and stored in
    each pair as ref_chosen / ref_rejected (so training never runs, nor even holds, a reference model)."""
    was_training = model.training
    model.eval()
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        b = collate_pairs(chunk, tok)
        logps, _ = sequence_logps(model, b["idx"].to(device), b["targets"].to(device))
        logps = logps.double().cpu().tolist()
        for i, p in enumerate(chunk):
            p["ref_chosen"], p["ref_rejected"] = logps[i], logps[len(chunk) + i]
    model.train(was_training)
    return pairs


def pair_batches(pairs, batch_size, grad_accum=1, seed=0):
    """train.py's batches(step, micro, rank, world): a pure function of its arguments, so a resumed run
    sees exactly the batches it would have. Pair k of the run (k = step * global batch + global row, the
    row numbered as train.py numbers them) is pair perm_e[k mod n] of epoch e = k // n, each epoch a
    fresh seeded permutation."""
    n, tok = len(pairs), M.get_tokenizer()

    def batches(step, micro, rank, world):
        first = step * batch_size * grad_accum * world + (micro * world + rank) * batch_size
        out = []
        for k in range(first, first + batch_size):
            epoch, i = divmod(k, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
            out.append(pairs[int(perm[i])])
        return collate_pairs(out, tok)
    return batches


def load_pairs(path):
    """prompt/chosen/rejected JSONL (needle.py --pairs); ValueError naming the line on bad input."""
    pairs = []
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                p = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{ln}: not JSON ({e.msg})") from None
            if not isinstance(p, dict) or not all(isinstance(p.get(k), str) for k in ("prompt", "chosen", "rejected")):
                raise ValueError(f"{path}:{ln}: needs string fields prompt, chosen, rejected")
            pairs.append(p)
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def save_pairs(path, pairs):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the run, on train.py's loop
import train as T  # noqa: E402  (after the functions above: they need neither train.py nor needle.py)


@dataclass
class DPOConfig(T.TrainConfig):
    # DPO (every train.py flag below applies too: FSDP under torchrun, checkpoints, --resume, W&B)
    ckpt: str = "out/tiny/ckpt.pt"     # SFT model (ckpt.pt or HF export): the policy's start and the frozen reference
    pairs: str = ""                    # prompt/chosen/rejected JSONL (needle.py --pairs); empty: generate from --ckpt
    pair_lengths: str = "512"          # generated pairs: prompt lengths, comma-separated (k = 1024)
    pair_depths: str = "0,25,50,75,100"  # generated pairs: needle depths in percent
    pair_samples: int = 8              # generated pairs per (length, depth) cell
    pair_seed: int = 1_000_000         # generated pairs use needle seeds from here (evaluation uses eval_seed: disjoint)
    beta: float = 0.1                  # KL strength: reward = beta * (log pi - log ref)
    loss_type: str = "sigmoid"         # sigmoid (DPO; cDPO with --label_smoothing), robust, or ipo
    label_smoothing: float = 0.0       # cDPO / robust: assumed rate of flipped preference labels, in [0, 0.5)
    rpo_alpha: float = 0.0             # RPO: + alpha * the chosen answer's per-token NLL (TRL's rpo_alpha; 0: off)
    ref_batch_size: int = 8            # pairs per forward when precomputing the reference log-probs
    results: str = ""                  # results JSON (default results/dpo_<out_dir name>.json)
    # train.py defaults changed for DPO: a short, gentle run from the SFT weights
    out_dir: str = "out/tiny-dpo"      # ckpt.pt, pairs.jsonl (with reference log-probs), log.jsonl
    batch_size: int = 4                # pairs per micro-batch per process (2x rows: chosen and rejected)
    max_iters: int = 20                # optimizer steps
    lr: float = 1e-4                   # peak learning rate
    min_lr: float = 1e-5               # the cosine's floor
    warmup_iters: int = 2              # linear warmup steps
    weight_decay: float = 0.0          # AdamW, matrices only (DPO recipes use none)
    ckpt_interval: int = 0             # save every N steps (0: only at the end, or on SIGTERM)
    log_interval: int = 1              # log every N steps (stdout, out_dir/log.jsonl, W&B)
    eval_samples: int = 4              # SFT vs DPO needle evaluation: samples per (length, depth) cell (0: none)
    eval_lengths: str = ""             # evaluation prompt lengths (empty: the pair lengths)
    variants: str = "single"           # needle variant of generated pairs and of the evaluation (the first, if several)
    haystacks: str = "noise"           # needle haystack of generated pairs and of the evaluation (the first, if several)


# train.py flags that choose its model and data: dpo.py's come from --ckpt and the pairs
NOT_FOR_DPO = ("init_from", "preset", "data", "seq_len", "max_pos", "model")


def parse_args(argv):
    """model.parse_flags on DPOConfig (DPO's flags first, then train.py's), train.py's checks, then DPO's own."""
    for a in argv:
        key = a.removeprefix("--").partition("=")[0].partition(".")[0]
        if a.startswith("--") and key in NOT_FOR_DPO:
            raise T.ConfigError(f"--{key} is train.py's; dpo.py's model is --ckpt and its data the pairs (see --help)")
    own = [f.name for f in fields(DPOConfig) if f.name not in {g.name for g in fields(T.TrainConfig)}]
    rest = [f.name for f in fields(T.TrainConfig) if f.name not in NOT_FOR_DPO]
    cfg = M.parse_flags(DPOConfig, argv, __doc__, own + rest)
    T.check_config(cfg)
    if cfg.loss_type not in LOSS_TYPES:
        raise T.ConfigError(f"--loss_type={cfg.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if not cfg.beta > 0:
        raise T.ConfigError("--beta must be > 0")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise T.ConfigError("--label_smoothing must be in [0, 0.5)")
    if cfg.rpo_alpha < 0:
        raise T.ConfigError("--rpo_alpha must be >= 0")
    if cfg.loss_type == "ipo" and cfg.label_smoothing:
        raise T.ConfigError("--label_smoothing applies to sigmoid/robust, not ipo")
    for key in ("pair_samples", "ref_batch_size"):
        if getattr(cfg, key) < 1:
            raise T.ConfigError(f"--{key} must be >= 1")
    if not os.path.exists(cfg.ckpt):
        if cfg.ckpt == DPOConfig.ckpt:
            raise T.ConfigError(f"no SFT checkpoint {cfg.ckpt}: run `python train.py` first (or pass --ckpt=PATH)")
        raise T.ConfigError(f"--ckpt={cfg.ckpt}: no such file")
    if os.path.isdir(cfg.ckpt) and not os.path.isfile(os.path.join(cfg.ckpt, "config.json")):   # not a HF export
        if not os.path.isfile(os.path.join(cfg.ckpt, "ckpt.pt")):
            raise T.ConfigError(f"--ckpt={cfg.ckpt}: a folder without ckpt.pt or a Hugging Face export (config.json)")
        cfg.ckpt = os.path.join(cfg.ckpt, "ckpt.pt")
    if cfg.pairs and not os.path.isfile(cfg.pairs):
        raise T.ConfigError(f"--pairs={cfg.pairs}: no such file")
    import needle
    variant = T._csv(cfg.variants)[0] if T._csv(cfg.variants) else ""
    if variant not in needle.VARIANTS:
        raise T.ConfigError(f"--variants={cfg.variants!r}: the first must be one of {', '.join(needle.VARIANTS)}")
    for key in ("pair_lengths", "eval_lengths"):
        try:
            lengths = _lengths(getattr(cfg, key), [])
        except ValueError:
            raise T.ConfigError(f"--{key}={getattr(cfg, key)!r} is not a list of lengths like 512,1k") from None
        if lengths and min(lengths) < needle.min_tokens(variant):
            raise T.ConfigError(f"--{key}: {min(lengths)} tokens cannot hold a {variant} needle sample "
                                f"(at least {needle.min_tokens(variant)})")
    cfg.init_from = cfg.ckpt           # train.py starts the policy from the SFT weights
    return cfg


def _lengths(s, default):
    import needle
    return [needle.parse_length(x) for x in T._csv(s)] or default


def _dtype(cfg, device):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        cfg.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)


def prepare_pairs(cfg, rank, world, device):
    """The run's pairs with their reference log-probs, in out_dir/pairs.jsonl. A resumed run reads that
    file back (the same pairs, the same reference numbers); otherwise rank 0 loads --pairs or generates
    them with needle.make_pairs from the SFT model, and every rank scores its share with the frozen SFT
    model in the numerics train.py will use (bf16 autocast for one process on CUDA, bf16 weights under
    FSDP), so that the policy's log-ratios start at ~0."""
    import needle
    path = os.path.join(cfg.out_dir, "pairs.jsonl")
    resuming = cfg.resume and os.path.exists(os.path.join(cfg.out_dir, "ckpt.pt")) and os.path.exists(path)
    if resuming:
        T.say(rank, f"dpo: resuming with the pairs and reference log-probs of {path}")
        return T._rank0(lambda: _load_pairs_or_config_error(path), rank, share=True)
    sft = T._rank0(lambda: M.load_checkpoint(cfg.ckpt, "cpu"), rank)   # None on the other ranks (for now)
    if cfg.pairs:
        pairs = T._rank0(lambda: _load_pairs_or_config_error(cfg.pairs), rank, share=True)
    else:
        def make():
            lengths, depths = _lengths(cfg.pair_lengths, [512]), [float(x) for x in T._csv(cfg.pair_depths)]
            print(f"dpo: generating {cfg.pair_samples * len(lengths) * len(depths)} pairs with {cfg.ckpt} "
                  f"(lengths {lengths}, depths {depths})", flush=True)
            return needle.make_pairs(sft.to(device), lengths, depths, cfg.pair_samples, T._csv(cfg.variants)[0],
                                     T._csv(cfg.haystacks)[0], seed=cfg.pair_seed)
        pairs = T._rank0(make, rank, share=True)
    dtype = _dtype(cfg, device)
    if rank != 0:
        sft = M.load_checkpoint(cfg.ckpt, "cpu")
    sft = sft.to(device)
    if world > 1:
        sft = sft.to(dtype)            # FSDP computes in bf16 weights (param_dtype)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype) if world == 1 and dtype != torch.float32 else nullcontext():
        mine = reference_logps(sft, pairs[rank::world], cfg.ref_batch_size, device)
    del sft
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, mine)
        pairs = [shares[i % world][i // world] for i in range(len(pairs))]
    T.say(rank, f"dpo: reference log-probs of {len(pairs)} pairs in {time.perf_counter() - t0:.1f} s "
                f"(computed once; training runs the policy alone) -> {path}")
    if rank == 0:
        save_pairs(path, pairs)
    return pairs


def _load_pairs_or_config_error(path):
    try:
        return load_pairs(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise T.ConfigError(str(e)) from None


def run(cfg):
    """The whole DPO run (every rank): pairs + reference log-probs, then train.py's loop with the DPO loss.
    Returns (train.train's result, pairs)."""
    rank, world, device = T.setup_distributed(cfg.device)
    if device.type == "cpu":           # train.py's thread rule, already for generating and scoring the pairs
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    pairs = prepare_pairs(cfg, rank, world, device)
    cfg.seq_len = max(sum(map(len, encode_pair(p)[:2])) for p in pairs)   # the longest row: for the log line
    batches = pair_batches(pairs, cfg.batch_size, cfg.grad_accum, cfg.seed)
    loss_fn = functools.partial(dpo_step_loss, beta=cfg.beta, loss_type=cfg.loss_type,
                                label_smoothing=cfg.label_smoothing, rpo_alpha=cfg.rpo_alpha)
    return T.train(cfg, batches=batches, loss_fn=loss_fn), pairs


def compare(cfg, device, pairs, result, wall):
    """Rank 0, after training: the SFT and the DPO model on the same needle samples; the results JSON."""
    import needle
    lengths = _lengths(cfg.eval_lengths, sorted({p["length"] for p in pairs if "length" in p}) or [512])
    depths = [float(x) for x in T._csv(cfg.eval_depths)]
    variant, haystack = T._csv(cfg.variants)[0], T._csv(cfg.haystacks)[0]
    rows = {}
    for name, path in (("sft", cfg.ckpt), ("dpo", result["ckpt"])):
        model = M.load_checkpoint(path, device)
        rows[name] = needle.evaluate(model, lengths, depths, cfg.eval_samples, variant, haystack, seed=cfg.eval_seed,
                                     log=False)
        del model
    summ = {k: needle.summarize(v) for k, v in rows.items()}
    logs = []
    with open(os.path.join(cfg.out_dir, "log.jsonl")) as f:
        logs = [json.loads(ln) for ln in f if ln.strip()]
    keys = ("loss",) + METRICS
    out = cfg.results or os.path.join("results", f"dpo_{os.path.basename(os.path.normpath(cfg.out_dir))}.json")
    src = {}
    for p in pairs:
        src[p.get("rejected_source", "file")] = src.get(p.get("rejected_source", "file"), 0) + 1
    res = {"provenance": M.provenance(device), "config": asdict(cfg),
           "pairs": {"n": len(pairs), "file": os.path.join(cfg.out_dir, "pairs.jsonl"), "rejected_source": src},
           "train": {"steps": result["step"], "final_loss": result["loss"], "wall_s": round(wall, 1),
                     "first": {k: logs[0].get(k) for k in keys} if logs else None,
                     "last": {k: logs[-1].get(k) for k in keys} if logs else None},
           "eval": {"lengths": lengths, "depths": depths, "samples_per_cell": cfg.eval_samples, "variant": variant,
                    "haystack": haystack, "seed": cfg.eval_seed},
           "sft": summ["sft"], "dpo": summ["dpo"],
           "samples": [{**{k: a[k] for k in ("length", "depth", "seed", "values")}, "sft_prediction": a["prediction"],
                        "sft_score": a["score"], "dpo_prediction": b["prediction"], "dpo_score": b["score"]}
                       for a, b in zip(rows["sft"], rows["dpo"])]}
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    n = summ["sft"]["n"]
    print(f"eval: needle {variant}/{haystack}, lengths {lengths}, depths {depths}, {n} samples (the same for both):\n"
          f"  SFT {cfg.ckpt}: accuracy {summ['sft']['accuracy']:.3f}\n"
          f"  DPO {result['ckpt']}: accuracy {summ['dpo']['accuracy']:.3f}\n-> {out}", flush=True)
    return res


def main(argv):
    t0 = time.perf_counter()
    try:
        cfg = parse_args(argv)
        result, pairs = run(cfg)
    except T.ConfigError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"dpo.py: error: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    rank = dist.get_rank() if dist.is_initialized() else 0
    if dist.is_initialized():
        dist.destroy_process_group()
    if rank == 0 and not result["preempted"]:
        with open(os.path.join(cfg.out_dir, "log.jsonl")) as f:
            last = [json.loads(ln) for ln in f if ln.strip()][-1:]
        if last:
            m = last[0]
            print(f"dpo: {result['step']} steps, last step: loss {m['loss']:.4f}, rewards/margins "
                  f"{m['rewards/margins']:.4f}, rewards/accuracies {m['rewards/accuracies']:.3f}, "
                  f"logps chosen {m['logps/chosen']:.2f} rejected {m['logps/rejected']:.2f} ({wall:.0f} s)", flush=True)
        if cfg.eval_samples:
            compare(cfg, result["device"], pairs, result, wall)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
