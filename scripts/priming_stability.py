"""How stable is FAR's learner mask after k priming steps? (issue 14, item 3: why federated FAR lags)

    python scripts/priming_stability.py                      # SST-2 partition 0 of 10, far10-emb, steps 1..100
    python scripts/priming_stability.py --steps 1,3,10,30 --seeds 0,1 --json out.json

Primes the pretrained MiniLM-L6 exactly as a client does (fedfar.federation.client.prime_scores: AdamW, every FFN
node training) for k steps from two data orders (seeds), and prints per k: the spread of the node scores
(sd / mean over nodes), how much the masks of the two seeds share, and how much each shares with the mask of the
longest priming. A random 10% mask shares 10% with any other in expectation.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from fedfar.data import make_loader
from fedfar.federation.client import WorkerCache, prime_scores
from fedfar.federation.config import RunConfig
from fedfar.methods.far import select_learners


def overlap(a, b) -> float:
    """Share of the learners of mask `a` that are learners of mask `b` too (both the same size per block)."""
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)) / sum(len(x) for x in a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="sst2")
    p.add_argument("--method", default="far10-emb")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", default="1,3,10,30,100")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--json", default="")
    args = p.parse_args()
    cfg = RunConfig.from_flower({"task": args.task, "model": "minilm", "method": args.method, "lr": args.lr,
                                 "batch-size": args.batch_size, "max-train-examples": 0})
    steps, seeds = [int(s) for s in args.steps.split(",")], [int(s) for s in args.seeds.split(",")]
    cache = WorkerCache()
    model = cache.model(cfg)
    data, _ = cache.partition(cfg, 0, 10)
    retention = cfg.spec.retention
    scores, masks = {}, {}
    for k in steps:
        for seed in seeds:
            t0 = time.perf_counter()
            loader = make_loader(data, cache.tokenizer(cfg), args.batch_size, shuffle=True, seed=seed)
            scores[k, seed] = prime_scores(model, loader, k, cfg, seed)
            masks[k, seed] = select_learners(scores[k, seed], retention)
            print(f"  primed {k} steps, seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    ref = max(steps)
    rows = []
    for k in steps:
        rows.append({
            "steps": k,
            "score_spread": float(np.mean([float(s.std() / s.mean()) for seed in seeds for s in scores[k, seed]])),
            "overlap_between_seeds": float(np.mean([overlap(masks[k, a], masks[k, b])
                                                    for i, a in enumerate(seeds) for b in seeds[i + 1:]])),
            "overlap_with_longest": float(np.mean([overlap(masks[k, s], masks[ref, s]) for s in seeds])),
        })
    print(f"\n{cfg.method} on {args.task} partition 0 of 10 (batch {args.batch_size}, lr {args.lr:g}); a random "
          f"{retention:.0%} mask overlaps another by {retention:.0%}")
    print(f"{'priming steps':>14}{'score sd/mean':>15}{'mask overlap, seeds':>21}{f'with {ref} steps':>16}")
    for r in rows:
        print(f"{r['steps']:>14}{r['score_spread']:>15.3f}{r['overlap_between_seeds']:>21.2f}"
              f"{r['overlap_with_longest']:>16.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
