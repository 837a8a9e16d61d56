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
The reference model is the frozen SFT model: its log-probs never change, so we compute them once
before training and store them with the pairs (TRL's precompute_ref_log_probs); the training steps
run the policy alone, chosen and rejected rows in one concatenated forward (TRL's concatenated_forward).
"""
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

import model as M

LOSS_TYPES = ("sigmoid", "robust", "ipo")


# ----------------------------------------------------------------------------- the loss
def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, len_c=None, len_r=None):
    """Per-pair DPO losses and implicit rewards. All inputs (B,) summed completion log-probs;
    len_c / len_r (B,) completion token counts (IPO only: it compares per-token log-ratios).
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
    return losses, beta * lr_c.detach(), beta * lr_r.detach()


def dpo_metrics(losses, chosen_rewards, rejected_rewards, pi_c, pi_r):
    """TRL's names. Accuracy counts a pair only when the chosen reward is strictly higher (a tie is a miss)."""
    return {"loss": losses.detach().mean().item(),
            "rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "logps/chosen": pi_c.detach().mean().item(),
            "logps/rejected": pi_r.detach().mean().item()}


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


def dpo_step_loss(model, batch, beta=0.1, loss_type="sigmoid", label_smoothing=0.0):
    """One concatenated policy forward over a collated batch -> (mean loss, TRL metrics)."""
    logps, lengths = sequence_logps(model, batch["idx"], batch["targets"])
    B = logps.shape[0] // 2
    ref = batch["ref"].to(logps.device)
    losses, rc, rr = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta, loss_type, label_smoothing,
                              lengths[:B], lengths[B:])
    return losses.mean(), dpo_metrics(losses, rc, rr, logps[:B], logps[B:])


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


def pair_batches(pairs, batch_size, seed=0):
    """batches(step, rank=0, world=1) -> a collated batch: a pure function of the step, so a resumed run
    sees exactly the batches it would have. Each epoch is a fresh permutation of the pairs; the global
    batch of batch_size * world pairs is split across ranks."""
    n, tok = len(pairs), M.get_tokenizer()

    def batches(step, rank=0, world=1):
        g = batch_size * world
        out = []
        for k in range(step * g + rank * batch_size, step * g + (rank + 1) * batch_size):
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
