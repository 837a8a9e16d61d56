"""Issue 11, attempt 6: a retrieval warm-up corpus for train.py --data (all-token loss).

Attempts 1-5 trained on needle.py's SFT samples alone: one 7-digit value to retrieve per sample, and the model
learned only a one-token induction head (each digit copied from its predecessor; the first digit, after a
space, guessed). Here every document (~450 tokens) holds 2-6 needles among essay sentences, then 1-6 answers answered in
the needle's own words, so a 512-token window carries several key lookups and the loss on their values can
only fall by finding the right needle by its key: the circuit the SFT task needs, learned with dense
supervision. Byte tokens, as model.get_tokenizer (one token per byte).

    python results/small/attempt6_copydata.py OUT.bin [N_TOKENS]
"""
import multiprocessing
import os
import random
import sys

import numpy as np

sys.path.insert(0, __file__.rsplit("/results/", 1)[0])
import needle  # noqa: E402


def document(rng):
    n = rng.randint(2, 6)
    keys = []
    while len(keys) < n:
        k = needle._key(rng)
        if k not in keys:
            keys.append(k)
    facts = {k: needle._value(rng) for k in keys}
    units = [needle._essay_sentence(rng) for _ in range(rng.randint(0, n))]
    for k in keys:
        units.insert(rng.randint(0, len(units)), needle.NEEDLE.format(key=k, value=facts[k]))
    asked = rng.sample(keys, rng.randint(1, n))
    answers = [f"The special magic number for {k} is: {facts[k]}." for k in asked]
    return " ".join(units) + "\n" + " ".join(answers) + "\n\n"


def shard(args):
    seed, n_tokens = args
    rng, parts, n = random.Random(seed), [], 0
    while n < n_tokens:
        parts.append(document(rng))
        n += len(parts[-1])
    return "".join(parts).encode("ascii")


def main(path, n_tokens=50_000_000, workers=os.cpu_count()):
    with multiprocessing.Pool(workers) as pool:
        data = b"".join(pool.map(shard, [(s, n_tokens // workers) for s in range(workers)]))
    np.frombuffer(data, dtype=np.uint8).astype(np.uint16).tofile(path)
    print(f"wrote {path}: {len(data):,} tokens")


if __name__ == "__main__":
    main(sys.argv[1], int(float(sys.argv[2])) if len(sys.argv) > 2 else 50_000_000)
