"""Teacher-forced accuracy on the answer values of attempt 6's warm-up documents: the first digit (found only
by the key) and the later ones. python results/small/attempt6_probe.py CKPT [DOCS]"""
import random
import sys

import torch

sys.path.insert(0, __file__.rsplit("/results/", 1)[0])
sys.path.insert(0, __file__.rsplit("/", 1)[0])
import attempt6_copydata as C  # noqa: E402
import model as M  # noqa: E402

dev = "cuda" if torch.cuda.is_available() else "cpu"
m = M.load_checkpoint(sys.argv[1]).to(dev).eval()
rng, hits, n = random.Random(999), [0, 0], [0, 0]
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 200):
    d = C.document(rng)
    toks = torch.tensor(list(d.encode()), device=dev)[None]
    with torch.no_grad():
        pred = m(toks).argmax(-1)[0].tolist()
    i = d.index("\n")
    while (j := d.find("is: ", i)) >= 0:
        for t in range(j + 4, j + 11):              # the 7 digits; pred[t - 1] predicts token t
            k = int(t > j + 4)
            hits[k] += pred[t - 1] == d.encode()[t]
            n[k] += 1
        i = j + 11
print(f"probe {sys.argv[1]}: first digit {hits[0] / n[0]:.3f}, later digits {hits[1] / n[1]:.3f} ({n[0]} answers)")
