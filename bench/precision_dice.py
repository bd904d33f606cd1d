"""Network-alone Dice and SDlogJ of a shipped model in fp32 and in bf16 autocast, paired.

``python bench/precision_dice.py DATA [MODEL] [THREADS]`` (MODEL: ``mambamorph`` (default) or
``voxelmorph``): on the 10 test pairs ``test_pairs(test subjects, 10, 0)`` of the phantom DATA,
predicts each pair in both precisions (:func:`mambamorph.models.predict`), warps the moving
labels (nearest) and prints per pair and overall Dice (16 ROIs), SDlogJ (2-voxel crop) and
seconds, then the paired Dice change. Prints figures, never pass/fail.
"""
import sys, time, json
import numpy as np, torch
from mambamorph.checkpoint import load_model, shipped_weights
from mambamorph.models.registry import predict
from mambamorph.data.datasets import SRRegDataset, test_pairs
from mambamorph.metrics import dice_per_roi, sdlogj
from mambamorph.nn.spatial import warp
from mambamorph import labels
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
data = sys.argv[1]
model = sys.argv[2] if len(sys.argv) > 2 else "mambamorph"
ds = SRRegDataset(data, split="test")
pairs = test_pairs(ds.subjects, 10, 0)
m, _ = load_model(shipped_weights(model), "cpu"); m.eval()
rows = {"fp32": [], "bf16": []}
for b in ds.pairs(pairs):
    x, y = b["moving"][None], b["fixed"][None]
    for prec in ("fp32", "bf16"):
        t = time.perf_counter(); flow = predict(m, x, y, precision=prec).flow; dt = time.perf_counter() - t
        w = warp(b["moving_seg"][None].float(), flow, mode="nearest")
        d = 100 * np.nanmean(dice_per_roi(w, b["fixed_seg"], roi_ids=tuple(range(1, 17))))
        rows[prec].append((d, sdlogj(flow[0].numpy(), crop=2), dt))
    print(b["moving_id"], b["fixed_id"], [f"{p} {rows[p][-1][0]:.2f} {rows[p][-1][2]:.1f}s" for p in rows], flush=True)
for p, r in rows.items():
    r = np.array(r)
    print(f"{model} {p}: Dice {r[:,0].mean():.3f} +- {r[:,0].std():.3f}, SDlogJ {r[:,1].mean():.4f}, s/pair {r[:,2].mean():.2f}")
d = np.array([a[0] - b[0] for a, b in zip(rows["bf16"], rows["fp32"])])
print(f"paired Dice change bf16 - fp32: mean {d.mean():+.4f}, max |.| {np.abs(d).max():.4f}")
