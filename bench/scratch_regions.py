"""Issue 12, item 2 (docs/weights.md, "Session 9"): where does a from-scratch network lower the
image term, and does that gain move the labels?

For each of N validation pairs of a phantom, the MIND-SSD of the warped moving image against the
fixed one (MIND-SSC radius 1, dilation 2, as the training image term at scale 1), averaged over
three regions of the fixed image: the brain (fixed label > 0), the rest of the head (fixed
image >= 0.05 outside the brain) and the outside (fixed image < 0.05: air, and some CSF of a
windowed CT), plus the 16-ROI Dice; for three fields: the identity, the checkpoint's and the
training-free instance optimisation's (its defaults, from the identity, no labels used). A
network whose gain lies outside the brain and leaves Dice where it was has learned to match the
images' noise and outline, not the anatomy.

    PYTHONPATH=src python bench/scratch_regions.py RUN/checkpoints/last.json \
        --data /work/data/phantom-coarse --pairs 5
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a `mambamorph train` checkpoint (.json)")
    ap.add_argument("--data", default="/work/data/phantom-coarse",
                    help="the phantom it was trained on (mambamorph data phantom ...)")
    ap.add_argument("--pairs", type=int, default=5, help="validation pairs (seed 0)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from mambamorph import labels
    from mambamorph import similarity as sim
    from mambamorph.checkpoint import load_model
    from mambamorph.config import DataConfig
    from mambamorph.data.datasets import open_dataset, test_pairs
    from mambamorph.metrics import dice_per_roi
    from mambamorph.nn.spatial import warp
    from mambamorph.optimize.instance import instance_optimise

    val = open_dataset(DataConfig(root=a.data), "val", 0)
    net, _ = load_model(a.checkpoint, "cpu")
    net.eval()
    rois = tuple(range(1, labels.NUM_ROIS + 1))
    names = ("identity", "network", "IO")
    rows = {n: [] for n in names}
    for m, f in test_pairs(val.subjects, a.pairs, 0):
        b = val.pair(m, f)
        mov, fix = b["moving"][None].float(), b["fixed"][None].float()
        brain = (b["fixed_seg"][None] > 0).float()
        head = (fix >= 0.05).float() * (1 - brain)
        outside = (fix < 0.05).float() * (1 - brain)
        flows = {"IO": instance_optimise(mov, fix).flow.detach()}  # optimises: needs autograd
        with torch.no_grad():
            flows.update(identity=torch.zeros(1, 3, *mov.shape[2:]),
                         network=net(mov, fix).flow.float())
            fixed_mind = sim.mind_ssc(fix)
            for n in names:
                u = flows[n]
                cost = (sim.mind_ssc(warp(mov, u)) - fixed_mind).square().sum(1, keepdim=True)
                seg = warp(b["moving_seg"][None].float(), u, mode="nearest")
                dice = 100 * float(np.nanmean(dice_per_roi(seg, b["fixed_seg"], roi_ids=rois)))
                rows[n].append([float(cost.mean())]
                               + [float((cost * r).sum() / r.sum()) for r in (brain, head, outside)]
                               + [dice])
        print(m, "->", f, "  ".join(f"{n}: all {rows[n][-1][0]:.3f} dice {rows[n][-1][4]:.1f}"
                                    for n in names), flush=True)
    print(f"\nmean over {a.pairs} pairs: MIND-SSD (all / brain / rest of head / outside), Dice")
    for n in names:
        r = np.mean(rows[n], axis=0)
        print(f"| {n} | {r[0]:.3f} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.2f} |")


if __name__ == "__main__":
    main()
