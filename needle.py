"""Needle in a haystack, RULER-style (Hsieh et al. 2024, NVIDIA/RULER scripts/data/synthetic/niah.py):
the task every stage shares. Samples for SFT, the evaluation grid and its heatmap, DPO pairs.

    python needle.py --ckpt=out/tiny/ckpt.pt --lengths=512,1k,2k --depths=0,50,100 --samples=10
    python needle.py --ckpt=PATH --lengths=4k,128k,1M --variant=multikey --haystack=essay --out=results/x.json
    python needle.py --pairs --ckpt=PATH --lengths=1k,2k --out=results/pairs_tiny.jsonl

A sample is generated from its seed alone, at any length in tokens (byte-level tokenizer: one token
per UTF-8 byte, plus the ChatML special tokens), so results store the seed and never the prompt.
Variants (RULER's niah_*): single (one key, one value), multikey (three more keys as distractors),
multivalue (one key, four values), multiquery (four keys, all asked). Haystacks: noise (RULER's
"The grass is green. ..."), essay (prose from a seeded grammar; RULER uses Paul Graham's essays,
we download nothing) and needle (every filler sentence is a distractor needle).
"""
import bisect
import functools
import itertools
import json
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

import model as M


@dataclass
class NeedleConfig:
    ckpt: str = ""                  # checkpoint; default checkpoints/infinitecontext-small, else out/tiny/ckpt.pt
    lengths: str = "512,1k,2k,4k"   # prompt lengths in tokens (k = 1024, M = 1048576)
    depths: str = "0,25,50,75,100"  # needle depth in percent of the haystack (0 = start, 100 = end)
    samples: int = 10               # samples per (length, depth) cell (with --pairs: pairs per cell)
    variant: str = "single"         # single | multikey | multivalue | multiquery
    haystack: str = "noise"         # noise | essay | needle
    seed: int = 0                   # sample i of every cell uses seed + i
    out: str = ""                   # default results/needle_<ckpt>_<variant>_<haystack>.json (+ .png)
    device: str = ""                # default cuda if available, else cpu
    dtype: str = ""                 # bf16 | fp16 | fp32; default bf16 on cuda, fp32 on cpu
    prefill_chunk: int = 4096       # prompt tokens per prefill step into the latent cache
    batch_tokens: int = 1 << 21     # prompt tokens per generate() batch (batch = this // length, at least 1)
    max_new_tokens: int = 0         # 0: the reference answer's length + 16
    pairs: bool = False             # write DPO preference pairs (JSONL) instead of evaluating


VARIANTS = ("single", "multikey", "multivalue", "multiquery")
HAYSTACKS = ("noise", "essay", "needle")
# (keys in the text, values per key, keys asked): RULER's niah_single / multikey / multivalue / multiquery
SHAPES = {"single": (1, 1, 1), "multikey": (4, 1, 1), "multivalue": (1, 4, 1), "multiquery": (4, 1, 4)}

# ----------------------------------------------------------------------------- words
# Keys are adjective-noun pairs as RULER's (it draws them from the wonderwords lists) of words of at most
# 6 letters (a key is at most 13 characters: a single-needle prompt fits in 300 tokens); the essay
# grammar uses all the words.
ADJ = ("able ancient bitter blue bold brave brief bright broad calm careful cheap clean clever cold common crisp "
       "curious dark deep distant dry eager early empty faint famous fierce formal fresh gentle golden grand green "
       "happy heavy hidden hollow honest humble idle jolly kind large late lazy little lively loud lucky modern "
       "narrow noble odd old pale plain polite proud quick quiet rapid rare rich rough round royal rusty sacred "
       "silent silver simple sleepy slow small smooth soft solid steady strange strong subtle sudden sweet swift "
       "tall tender thin tiny vast warm wary wild wise young").split()
NOUN = ("anchor apple arrow badge basket beacon bell bridge candle canyon castle cedar chamber circle cloud comet "
        "compass copper cottage crane crystal desert dragon engine falcon feather field forest fountain garden "
        "glacier harbor hammer island jacket kettle ladder lantern letter meadow mirror monkey mountain ocean "
        "orchard palace pebble pepper pillow planet pocket puzzle rabbit river rocket saddle signal spider statue "
        "summit teapot thunder timber tower tunnel valley velvet violin wagon window winter wizard zebra").split()
VERB_T = ("found built watched carried painted opened followed noticed visited crossed measured repaired "
          "described remembered borrowed collected admired studied guarded counted").split()
VERB_I = "waited vanished rested wandered trembled appeared returned glowed shifted lingered slept drifted".split()
ADV = "slowly quietly often rarely gladly softly twice nearly always seldom gently briefly".split()
PREP = "near beside under behind across beyond around inside above toward".split()
PRON = "we they she he I".split()
DET = "the the a this that every one".split()
# words by length 2..8 for the padding sentence that makes a prompt exactly n_tokens long
PAD_WORDS = {n: [w for w in ADJ + NOUN + ADV + "an of to in so we it".split() if len(w) == n] for n in range(2, 9)}

NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
ESSAY_POOL = 2048  # essay sentences generated per sample, then cycled (a 1M-token haystack in well under a second)


def _det(rng, nxt):
    d = rng.choice(DET)
    return "an" if d == "a" and nxt[0] in "aeiou" else d


def _essay_sentence(rng):
    """One sentence of English-like prose from a small grammar (no digits, no hyphens: never a key or value)."""
    a, n, n2, vt, vi = rng.choice(ADJ), rng.choice(NOUN), rng.choice(NOUN), rng.choice(VERB_T), rng.choice(VERB_I)
    p, adv, prep = rng.choice(PRON), rng.choice(ADV), rng.choice(PREP)
    k = rng.randrange(7)
    if k == 0:
        s = f"{_det(rng, a)} {a} {n} {vt} {_det(rng, n2)} {n2}."
    elif k == 1:
        s = f"{p} {vt} {_det(rng, a)} {a} {n} {prep} {_det(rng, n2)} {n2}."
    elif k == 2:
        s = f"{_det(rng, n)} {n} {vi} {adv}."
    elif k == 3:
        s = f"When {_det(rng, n)} {n} {vi}, {p} {vt} {_det(rng, a)} {a} {n2}."
    elif k == 4:
        s = f"{_det(rng, n)} {n} {prep} {_det(rng, n2)} {n2} {vi} {adv}, and {p} {vt} it."
    elif k == 5:
        s = f"It seems {a} that {_det(rng, n)} {n} {vt} {_det(rng, n2)} {n2}."
    else:
        s = f"{p} {adv} {vt} {_det(rng, n)} {n}, but {_det(rng, n2)} {n2} {vi}."
    return s[0].upper() + s[1:]


def _pad_sentence(m, rng):
    """A sentence of exactly m >= 3 characters ("Xy." at the least) from PAD_WORDS."""
    words, left = [], m - 1                    # characters for the words and the spaces between them
    while left > 8:                            # keep room for a last word of 2..8 letters
        w = rng.choice(PAD_WORDS[rng.randint(2, min(6, left - 3))])
        words.append(w)
        left -= len(w) + 1
    words.append(rng.choice(PAD_WORDS[left]))
    s = " ".join(words) + "."
    return s[0].upper() + s[1:]


KEY_ADJ, KEY_NOUN = [w for w in ADJ if len(w) <= 6], [w for w in NOUN if len(w) <= 6]


def _key(rng):
    return f"{rng.choice(KEY_ADJ)}-{rng.choice(KEY_NOUN)}"


def _value(rng):
    return str(rng.randint(1_000_000, 9_999_999))  # 7 digits, as RULER's numbers


# ----------------------------------------------------------------------------- prompt format
# RULER's niah template adapted to chat: the instruction and the context in the user turn, the question
# after the context. Singular wording when exactly one value is asked, as RULER. The answer quotes the
# needle ("... for {key} is: {value}") rather than RULER's answer prefix ("... for {key} mentioned in the
# provided text is"): then the tokens before each value are the needle's own, and an induction head can
# copy it. With RULER's prefix a small model learned to copy the later digits from their predecessors but
# never found the first one ("is " occurs nowhere near the value): 0% exact after 7,600 steps at 512
# tokens (results/gpu_log.md, attempt 5).
def _texts(query_keys, values):
    one = len(values) == 1
    noun, verb = ("number", "is") if one else ("numbers", "are")
    query = query_keys[0] if len(query_keys) == 1 else ", ".join(query_keys[:-1]) + ", and " + query_keys[-1]
    intro = (f"{'A' if one else 'Some'} special magic {noun} {verb} hidden within the following text. "
             f"Make sure to memorize it. I will quiz you about the {noun} afterwards.")
    question = f"What {'is the' if one else 'are all the'} special magic {noun} for {query} mentioned in the provided text?"
    answer = f"The special magic {noun} for {query} {verb}: {', '.join(values)}."
    return intro, question, answer


def _chat(intro, context, question):
    return M.chat_prompt([{"role": "user", "content": f"{intro}\n{context}\n{question}"}])


def n_tokens_of(text):
    """Token count under the byte-level tokenizer without tokenizing: UTF-8 bytes, specials count one."""
    return len(text.encode("utf-8")) - sum(text.count(s) * (len(s) - 1) for s in M.SPECIAL_TOKENS)


CHAT_OVERHEAD = n_tokens_of(_chat("", "", "")) - 2   # ChatML around the user content (its two newlines apart)


@functools.cache
def tokenizer():
    return M.get_tokenizer()


def encode(text):
    """Token ids (int64 array) with the special tokens of the chat format."""
    return np.array(tokenizer().encode(text, allowed_special="all"), dtype=np.int64)


# ----------------------------------------------------------------------------- samples
def _spec(rng, variant):
    """Keys, values, needles and texts of one sample; independent of its length and depth."""
    n_keys, n_vals, n_query = SHAPES[variant]
    keys = []
    while len(keys) < n_keys:
        k = _key(rng)
        if k not in keys:
            keys.append(k)
    vals = set()
    per_key = {}
    for k in keys:
        per_key[k] = []
        while len(per_key[k]) < n_vals:
            v = _value(rng)
            if v not in vals:
                vals.add(v)
                per_key[k].append(v)
    asked = keys[:n_query]                     # keys are random, so the first ones are a random choice
    needles = [(k, v) for k in asked for v in per_key[k]]
    rng.shuffle(needles)                       # RULER shuffles the needles of the asked keys
    values = [v for _, v in needles] if variant == "multivalue" else [per_key[k][0] for k in asked]
    distract = [(k, per_key[k][0]) for k in keys[n_query:]]   # multikey: the keys not asked
    intro, question, answer = _texts(asked, values)
    return {"keys": asked, "values": values, "needles": needles, "distractors": distract, "intro": intro,
            "question": question, "answer": answer, "all_values": vals, "all_keys": set(keys)}


def _fixed_tokens(spec):
    return CHAT_OVERHEAD + len(spec["intro"]) + len(spec["question"]) + 2


def _min_context(spec):
    return sum(len(NEEDLE.format(key=k, value=v)) + 1 for k, v in spec["needles"] + spec["distractors"]) - 1


def min_tokens(variant="single"):
    """The shortest prompt make_sample accepts for any seed (the longest keys; +4: room for a pad sentence)."""
    lk = max(KEY_ADJ, key=len) + "-" + max(KEY_NOUN, key=len)
    n_keys, n_vals, n_query = SHAPES[variant]
    fake = {"needles": [(lk, "1234567")] * (n_query * n_vals), "distractors": [(lk, "1234567")] * (n_keys - n_query)}
    fake.update(zip(("intro", "question"), _texts([lk] * n_query, ["1234567"] * (n_query * n_vals))[:2]))
    return _fixed_tokens(fake) + _min_context(fake) + 4


def _filler(haystack, rng, spec):
    """An endless stream of haystack sentences."""
    if haystack == "noise":
        yield from itertools.cycle(NOISE)
    elif haystack == "essay":
        pool = []
        for i in itertools.count():
            if i < ESSAY_POOL:
                pool.append(_essay_sentence(rng))
            yield pool[i % ESSAY_POOL]
    else:  # distractor needles: other keys, other values
        while True:
            k, v = _key(rng), _value(rng)
            if k not in spec["all_keys"] and v not in spec["all_values"]:
                yield NEEDLE.format(key=k, value=v)


def _build(spec, n_tokens, depth, haystack, rng):
    """The prompt, exactly n_tokens long, and the distractor values near the needle (for DPO's rejected)."""
    budget = n_tokens - _fixed_tokens(spec) + 1         # context length + 1 = the sum of (len + 1) of its sentences
    needles = [NEEDLE.format(key=k, value=v) for k, v in spec["needles"]]
    others = [NEEDLE.format(key=k, value=v) for k, v in spec["distractors"]]
    free = budget - sum(len(s) + 1 for s in needles + others)   # left for filler sentences
    if free < 0 or 0 < free < 4:
        raise ValueError(f"n_tokens={n_tokens} is too short: this sample's question and needles alone take "
                         f"{n_tokens - free} tokens (min_tokens(variant) fits every seed)")
    units, used = [], 0
    for s in _filler(haystack, rng, spec):
        if used + len(s) + 1 > free:
            break
        units.append(s)
        used += len(s) + 1
    if 0 < free - used < 4:                  # too little room for a sentence: give back the last one
        used -= len(units.pop()) + 1
    if free > used:                          # pad to exactly n_tokens with one sentence of the right length
        units.append(_pad_sentence(free - used - 1, rng))
    for s in others:                         # multikey's distractor keys at random places (RULER: random depths)
        units.insert(rng.randint(0, len(units)), s)
    # the needle block goes to the sentence boundary nearest depth% of the haystack's characters
    ends = list(itertools.accumulate(len(s) + 1 for s in units))
    target = depth / 100 * (ends[-1] if ends else 0)
    i = bisect.bisect_left(ends, target)
    i = i + 1 if i < len(ends) and (ends[i] - target) < (target - (ends[i - 1] if i else 0)) else i
    near = [u[-9:-1].strip() for u in units[max(0, i - 2):i + 2] + others if u.startswith("One of the special")]
    context = " ".join(units[:i] + needles + units[i:])
    return _chat(spec["intro"], context, spec["question"]), list(dict.fromkeys(near))


def make_sample(n_tokens, depth, variant="single", haystack="noise", seed=0):
    """A sample whose prompt is exactly n_tokens tokens (ChatML included, ending with the assistant header),
    with the asked needle(s) at depth percent of the haystack. Same seed -> same keys and values at every
    length and depth (a grid compares like with like). Also returns "keys" (the asked keys) and
    "distractor_values" (values of other keys' needles near the asked ones or elsewhere: DPO's wrong answers)."""
    if variant not in SHAPES:
        raise ValueError(f"unknown variant {variant!r} (one of {', '.join(VARIANTS)})")
    if haystack not in HAYSTACKS:
        raise ValueError(f"unknown haystack {haystack!r} (one of {', '.join(HAYSTACKS)})")
    if not 0 <= depth <= 100:
        raise ValueError(f"depth={depth} is outside 0..100")
    rng = random.Random(f"needle:{seed}")
    spec = _spec(rng, variant)
    prompt, near = _build(spec, int(n_tokens), depth, haystack, rng)
    return {"prompt": prompt, "answer": spec["answer"], "values": spec["values"], "question": spec["question"],
            "keys": spec["keys"], "distractor_values": near, "length": int(n_tokens), "depth": depth,
            "variant": variant, "haystack": haystack, "seed": seed}


def score(prediction, values):
    """RULER's string_match_all: the fraction of the reference values found in the prediction, case-insensitive."""
    p = prediction.lower()
    return sum(v.lower() in p for v in values) / len(values)


# ----------------------------------------------------------------------------- training batches
def training_batch(batch_size, seq_len, step, seed=0, rank=0, world=1, max_pos=None, variants=VARIANTS,
                   haystacks=HAYSTACKS, pose_chunks=2):
    """SFT batch -> idx, targets, pos, each (batch_size, seq_len) int64.

    Row = one sample of random length (prompt + answer + <|im_end|>, at most seq_len), right-padded with
    PAD; targets are the next tokens on the answer and <|im_end|> only (-1 elsewhere). A pure function of
    (seed, step, rank, world): the global sample index is (step * world + rank) * batch_size + row.
    Variants that cannot fit in seq_len are left out of the mix (see min_tokens).
    PoSE (Zhu et al. 2023): with max_pos > seq_len the window is cut into pose_chunks chunks and chunk j
    is shifted by a random skip s_j (0 = s_0 <= s_1 <= ... <= max_pos - seq_len), so a short window
    trains the positions of a long one. The cuts fall inside the haystack (at its ends included): the
    instruction, the question and the answer keep contiguous positions as at inference; only the
    distances across the haystack stretch, as they do in a long prompt.
    """
    variants = variants.split(",") if isinstance(variants, str) else list(variants)
    haystacks = haystacks.split(",") if isinstance(haystacks, str) else list(haystacks)
    idx = np.full((batch_size, seq_len), M.PAD, dtype=np.int64)
    targets = np.full((batch_size, seq_len), -1, dtype=np.int64)
    pos = np.broadcast_to(np.arange(seq_len, dtype=np.int64), (batch_size, seq_len)).copy()
    for b in range(batch_size):
        rng = random.Random(f"train:{seed}:{(step * world + rank) * batch_size + b}")
        for _ in range(100):  # draw until the sample fits (short windows rule out the four-needle variants)
            variant, haystack = rng.choice(variants), rng.choice(haystacks)
            spec = _spec(rng, variant)
            n_ans = len(spec["answer"]) + 1                     # + <|im_end|>
            lo, hi = _fixed_tokens(spec) + _min_context(spec) + 4, seq_len - n_ans
            if lo <= hi:
                break
        else:
            raise ValueError(f"seq_len={seq_len} is too short for variants {list(variants)} "
                             f"(min_tokens: {dict((v, min_tokens(v)) for v in variants)} + the answer)")
        n = rng.randint(lo, hi)
        prompt, _ = _build(spec, n, rng.uniform(0, 100), haystack, rng)
        row = np.concatenate([encode(prompt), np.frombuffer(spec["answer"].encode(), np.uint8), [M.IM_END]])
        idx[b, :len(row)] = row
        targets[b, n - 1:len(row) - 1] = row[n:]               # predict the answer and <|im_end|>
        if max_pos and max_pos > seq_len:
            lo_cut = n_tokens_of(f"<|im_start|>user\n{spec['intro']}\n")          # the context's first token
            hi_cut = n - n_tokens_of(f"\n{spec['question']}<|im_end|>\n<|im_start|>assistant\n")   # after its last
            cuts = sorted(rng.sample(range(lo_cut, hi_cut + 1), min(pose_chunks - 1, hi_cut - lo_cut + 1)))
            skips = sorted(rng.randint(0, max_pos - seq_len) for _ in cuts)
            for c, s in zip(cuts, skips):
                pos[b, c:] += s - (pos[b, c] - c)               # chunk from c on is shifted by s in all
    return torch.from_numpy(idx), torch.from_numpy(targets), torch.from_numpy(pos)


# ----------------------------------------------------------------------------- evaluation
def _generate(model, samples, prefill_chunk=4096, batch_tokens=1 << 21, max_new_tokens=0):
    """Greedy answers for samples of one length (batched: equal prompt lengths need no padding)."""
    dev = next(model.parameters()).device
    preds = []
    bs = max(1, batch_tokens // samples[0]["length"])
    for i in range(0, len(samples), bs):
        part = samples[i:i + bs]
        idx = torch.from_numpy(np.stack([encode(s["prompt"]) for s in part])).to(dev)
        new = max_new_tokens or max(len(s["answer"]) for s in part) + 16
        out = model.generate(idx, new, temperature=0.0, prefill_chunk=prefill_chunk)
        preds += [tokenizer().decode(o) for o in out]
    return preds


def _cells(lengths, depths):
    return [(L, d) for L in lengths for d in depths]


def evaluate(model, lengths, depths, samples=10, variant="single", haystack="noise", seed=0, prefill_chunk=4096,
             batch_tokens=1 << 21, max_new_tokens=0, log=True):
    """Greedy needle retrieval over a lengths x depths grid -> list of per-sample dicts (length, depth,
    variant, haystack, seed, question, answer, prediction, values, score); accuracy = summarize(rows)["accuracy"].
    log: print a progress line per cell to stderr."""
    lengths = [parse_length(L) if isinstance(L, str) else L for L in lengths]
    was_training = model.training
    model.eval()
    rows, t0, cells = [], time.time(), _cells(lengths, depths)
    for c, (L, d) in enumerate(cells, 1):
        batch = [make_sample(L, d, variant, haystack, seed + i) for i in range(samples)]
        for s, p in zip(batch, _generate(model, batch, prefill_chunk, batch_tokens, max_new_tokens)):
            rows.append({**{k: s[k] for k in ("length", "depth", "variant", "haystack", "seed", "question",
                                               "answer")}, "prediction": p, "values": s["values"],
                         "score": score(p, s["values"])})
        if log:
            cell = [r["score"] for r in rows[-samples:]]
            print(f"needle: cell {c}/{len(cells)} length={fmt_len(L)} depth={d:g}: {sum(cell) / len(cell):.2f} | "
                  f"{len(rows)}/{len(cells) * samples} samples, accuracy {sum(r['score'] for r in rows) / len(rows):.3f}, "
                  f"{time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    model.train(was_training)
    return rows


def summarize(rows):
    """Overall accuracy and the depth x length grid of mean scores."""
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    grid = [[None] * len(lengths) for _ in depths]
    for i, d in enumerate(depths):
        for j, L in enumerate(lengths):
            s = [r["score"] for r in rows if r["depth"] == d and r["length"] == L]
            grid[i][j] = sum(s) / len(s) if s else None
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"accuracy": mean([r["score"] for r in rows]), "n": len(rows), "lengths": lengths, "depths": depths,
            "grid": grid, "by_length": {str(L): mean([r["score"] for r in rows if r["length"] == L]) for L in lengths}}


def make_pairs(model, lengths, depths, n, variant="single", haystack="noise", seed=1_000_000, prefill_chunk=4096,
               batch_tokens=1 << 21, max_new_tokens=0, log=True):
    """DPO preference pairs, n per (length, depth) cell: prompt, chosen = the reference answer, rejected = the
    model's own answer when it is wrong, else the answer with every value swapped for a wrong one (a
    distractor's value from the sample when there is one, else a plausible 7-digit number one digit away).
    The CLI passes seed + 1e6 so that pairs never repeat the evaluation's samples."""
    lengths = [parse_length(L) if isinstance(L, str) else L for L in lengths]
    was_training = model.training
    model.eval()
    pairs, t0, cells = [], time.time(), _cells(lengths, depths)
    for c, (L, d) in enumerate(cells, 1):
        batch = [make_sample(L, d, variant, haystack, seed + (c - 1) * n + i) for i in range(n)]
        for s, p in zip(batch, _generate(model, batch, prefill_chunk, batch_tokens, max_new_tokens)):
            right = score(p, s["values"]) == 1.0
            rejected, source = (_wrong_answer(s), "distractor" if s["distractor_values"] else "perturbed") \
                if right else (p, "model")
            pairs.append({"prompt": s["prompt"], "chosen": s["answer"], "rejected": rejected,
                          "rejected_source": source, "prediction": p, "prediction_score": score(p, s["values"]),
                          **{k: s[k] for k in ("length", "depth", "variant", "haystack", "seed", "question", "values")}})
        if log:
            print(f"needle: pairs cell {c}/{len(cells)} length={fmt_len(L)} depth={d:g} | {len(pairs)} pairs, "
                  f"{sum(q['rejected_source'] == 'model' for q in pairs)} from the model's mistakes, "
                  f"{time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    model.train(was_training)
    return pairs


def _wrong_answer(s):
    rng = random.Random(f"wrong:{s['seed']}")
    pool = [v for v in s["distractor_values"] if v not in s["values"]]
    answer = s["answer"]
    for v in s["values"]:
        if pool:
            w = pool.pop(0)
        else:
            while True:  # change one digit (never the leading one to 0): close to right, still wrong
                i = rng.randrange(7)
                w = v[:i] + rng.choice([c for c in "0123456789" if c != v[i] and (i or c != "0")]) + v[i + 1:]
                if w not in s["values"]:
                    break
        answer = answer.replace(v, w)
    return answer


# ----------------------------------------------------------------------------- heatmap
def heatmap(rows, path, title=""):
    """Depth x length accuracy heatmap in the style of Greg Kamradt's needle plots (red -> yellow -> green)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap
    sm = summarize(rows)
    grid = np.array([[np.nan if x is None else x for x in row] for row in sm["grid"]], dtype=float)
    cmap = LinearSegmentedColormap.from_list("kamradt", ["#F0496E", "#EBB839", "#0CD79F"])
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 * grid.shape[1] + 2.5), max(3.5, 0.55 * grid.shape[0] + 1.8)))
    im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(grid.shape[1]), [fmt_len(L) for L in sm["lengths"]])
    ax.set_yticks(range(grid.shape[0]), [f"{d:g}%" for d in sm["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title or f"needle in a haystack: accuracy {sm['accuracy']:.1%}", fontsize=10)
    fig.colorbar(im, ax=ax, label="accuracy (string_match_all)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI
def fmt_len(n):
    return f"{n >> 20}M" if n % (1 << 20) == 0 else f"{n >> 10}k" if n % 1024 == 0 else str(n)


def parse_length(s):
    """'4096', '4k' (4096), '1M' (1048576) -> int."""
    m = re.fullmatch(r"\s*(-?\d+)\s*([kKmM]?)\s*", s)
    if not m:
        raise ValueError(f"{s!r} is not a length (an integer, optionally with k or M)")
    n = int(m.group(1)) * {"": 1, "k": 1024, "m": 1 << 20}[m.group(2).lower()]
    if n <= 0:
        raise ValueError(f"length {s!r} must be positive")
    return n


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def die(msg):
    M.die("needle.py", msg)


def parse_args(argv):
    cfg = M.parse_flags(NeedleConfig, argv, __doc__, prog="needle.py")
    try:
        lengths = [parse_length(s) for s in cfg.lengths.split(",")]
    except ValueError as e:
        die(f"--lengths: {e}")
    try:
        depths = [float(s) for s in cfg.depths.split(",")]
    except ValueError:
        die(f"--depths={cfg.depths!r} is not a comma-separated list of numbers")
    depths = [int(d) if d == int(d) else d for d in depths]
    if any(not 0 <= d <= 100 for d in depths):
        die(f"--depths={cfg.depths!r}: every depth must be within 0..100 (percent)")
    if cfg.variant not in VARIANTS:
        die(f"--variant={cfg.variant!r} is not one of {', '.join(VARIANTS)}")
    if cfg.haystack not in HAYSTACKS:
        die(f"--haystack={cfg.haystack!r} is not one of {', '.join(HAYSTACKS)}")
    if min(lengths) < min_tokens(cfg.variant):
        die(f"--lengths: {min(lengths)} is too short for --variant={cfg.variant} (at least {min_tokens(cfg.variant)} tokens)")
    for key in ("samples", "prefill_chunk", "batch_tokens"):
        if getattr(cfg, key) < 1:
            die(f"--{key} must be >= 1")
    if cfg.max_new_tokens < 0:
        die("--max_new_tokens must be >= 0")
    if cfg.dtype and cfg.dtype not in DTYPES:
        die(f"--dtype={cfg.dtype!r} is not one of {', '.join(DTYPES)}")
    if not cfg.ckpt:
        cfg.ckpt = next((p for p in ("checkpoints/infinitecontext-small", "out/tiny/ckpt.pt") if os.path.exists(p)), "")
        if not cfg.ckpt:
            die("no checkpoint: neither checkpoints/infinitecontext-small nor out/tiny/ckpt.pt exists; "
                "run `python train.py` first or pass --ckpt=PATH")
    return cfg, lengths, depths


def main(argv):
    cfg, lengths, depths = parse_args(argv)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        die(f"--device={device} but this torch ({torch.__version__}) sees no CUDA GPU")
    dtype = DTYPES[cfg.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    try:
        model = M.load_checkpoint(cfg.ckpt, device).to(dtype).eval()
    except (M.CheckpointError, NotImplementedError) as e:
        die(str(e))
    except RuntimeError as e:  # e.g. --device=cuda without a GPU
        die(f"cannot load {cfg.ckpt} on {device}: {str(e).splitlines()[0]}")
    name = os.path.normpath(cfg.ckpt)
    name = os.path.splitext(os.path.basename(os.path.dirname(name) if name.endswith("ckpt.pt") else name))[0] or "model"
    kw = dict(prefill_chunk=cfg.prefill_chunk, batch_tokens=cfg.batch_tokens, max_new_tokens=cfg.max_new_tokens)
    info = {"provenance": M.provenance(device), "config": {**asdict(cfg), "lengths": lengths, "depths": depths,
                                                          "device": device, "dtype": str(dtype).removeprefix("torch."),
                                                          "model": asdict(model.config)}}
    print(f"needle: {cfg.ckpt} ({model.config.attn}, {model.num_params() / 1e6:.2f}M non-embedding params) on "
          f"{info['provenance']['card']} {info['config']['dtype']}: lengths {[fmt_len(L) for L in lengths]}, "
          f"depths {depths}, {cfg.samples} per cell, {cfg.variant}/{cfg.haystack}", file=sys.stderr, flush=True)
    if cfg.pairs:
        out = cfg.out or os.path.join("results", f"pairs_{name}_{cfg.variant}_{cfg.haystack}.jsonl")
        pairs = make_pairs(model, lengths, depths, cfg.samples, cfg.variant, cfg.haystack, cfg.seed + 1_000_000, **kw)
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in pairs)
        meta = os.path.splitext(out)[0] + ".meta.json"
        with open(meta, "w") as f:
            json.dump({**info, "pairs": len(pairs), "from_model_mistakes": sum(p["rejected_source"] == "model" for p in pairs),
                       "model_accuracy": sum(p["prediction_score"] for p in pairs) / len(pairs)}, f, indent=1)
        print(f"needle: {len(pairs)} pairs -> {out} (provenance in {meta})", file=sys.stderr)
        return 0
    out = cfg.out or os.path.join("results", f"needle_{name}_{cfg.variant}_{cfg.haystack}.json")
    t0 = time.time()
    rows = evaluate(model, lengths, depths, cfg.samples, cfg.variant, cfg.haystack, cfg.seed, **kw)
    summary = {**summarize(rows), "seconds": round(time.time() - t0, 2)}
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({**info, "samples": rows, "summary": summary}, f, indent=1)
    png = os.path.splitext(out)[0] + ".png"
    heatmap(rows, png, f"{name}: {cfg.variant} needle, {cfg.haystack} haystack, accuracy {summary['accuracy']:.1%}")
    print(f"needle: accuracy {summary['accuracy']:.3f} over {len(rows)} samples -> {out}, {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
