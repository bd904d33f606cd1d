"""Issue 12, item 2 (docs/weights.md, row K): does regressing a teacher's fields lift a
from-scratch network off the identity plateau within 50-100 steps?

The teacher is the training-free instance optimisation (``instance_optimise`` from the identity,
its defaults) on N random training pairs of the demo phantom; ``voxelmorph`` from random
initialisation (seed 0) then minimises the mean squared displacement error to those fields +
0.2 x smoothness (our Adam), and is validated every 10 steps on 5 validation pairs (Dice,
SDlogJ). The teacher fields are cached in ``--cache`` (float16).

``--one-pair``: the control. Train on the first teacher pair only (no smoothness term) and
score that same pair: a network that can fit one pair's field quickly but not many pairs' has
to learn to compare the images, which is what the plateau is.

    PYTHONPATH=src python bench/scratch_teacher.py --threads 1 --teachers 40 --steps 100
    PYTHONPATH=src python bench/scratch_teacher.py --threads 1 --one-pair --steps 30   # the control
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/data/phantom-cpu",
                    help="the demo phantom (mambamorph data phantom --preset cpu --seed 0)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--teachers", type=int, default=40)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--cache", default="/work/exp14/teacher_{n}.pt")
    ap.add_argument("--one-pair", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from mambamorph.config import DataConfig
    from mambamorph.data.datasets import open_dataset, test_pairs
    from mambamorph.losses import grad_l2
    from mambamorph.models import build_model
    from mambamorph.optimize.adam import Adam
    from mambamorph.optimize.instance import instance_optimise
    from mambamorph.train import validate

    cpu = torch.device("cpu")
    tr = open_dataset(DataConfig(root=a.data), "train", 0)
    va = open_dataset(DataConfig(root=a.data), "val", 0)
    rng = np.random.default_rng(0)
    cache = a.cache.format(n=a.teachers)
    try:
        teach = torch.load(cache)
        print("loaded teachers", len(teach), flush=True)
    except FileNotFoundError:
        teach, t0 = [], time.time()
        for k in range(a.teachers):
            m, f = tr.random_pair_ids(rng)
            b = next(iter(tr.pairs([(m, f)])))
            r = instance_optimise(b["moving"][None].float(), b["fixed"][None].float())
            teach.append((m, f, r.flow.half()))
            print(k, m, f, round(time.time() - t0, 1), flush=True)
        torch.save(teach, cache)
    if a.one_pair:
        teach = teach[:1]
        score_ds, score_pairs = tr, [teach[0][:2]]
    else:
        score_ds, score_pairs = va, test_pairs(va.subjects, 5, 0)

    torch.manual_seed(0)
    net = build_model("voxelmorph")
    opt = Adam(list(net.parameters()), lr=a.lr)
    print("step 0", json.dumps(validate(net, score_ds, score_pairs, cpu, None)), flush=True)
    t0 = time.time()
    for step in range(1, a.steps + 1):
        m, f, target = teach[rng.integers(len(teach))]
        b = next(iter(tr.pairs([(m, f)])))
        out = net(b["moving"][None].float(), b["fixed"][None].float())
        loss = ((out.flow.float() - target.float()) ** 2).sum(1).mean()
        if not a.one_pair:
            loss = loss + 0.2 * grad_l2(out.smooth_target.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            v = validate(net, score_ds, score_pairs, cpu, None)
            print(f"step {step} loss {loss.item():.3f} t {time.time() - t0:.0f}", json.dumps(v),
                  flush=True)


if __name__ == "__main__":
    main()
