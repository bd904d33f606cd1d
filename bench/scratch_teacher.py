"""Issue 12, item 2 (docs/weights.md, row K): does regressing a teacher's fields lift a
from-scratch network off the identity plateau within 50-100 steps?

The teacher is the training-free instance optimisation (``instance_optimise`` from the identity,
its defaults) on N random training pairs of the demo phantom; ``voxelmorph`` from random
initialisation (seed 0) then minimises the mean squared displacement error to those fields +
0.2 x smoothness (Adam), and is validated every 10 steps on 5 validation pairs (Dice, SDlogJ).
The teacher fields are cached in /work/exp14/teacher_N.pt.

    PYTHONPATH=src python bench/scratch_teacher.py THREADS N_TEACHER STEPS LR
    PYTHONPATH=src python bench/scratch_teacher.py 1 40 100 1e-3   # row K
"""
import sys, time, json
import numpy as np, torch
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
from mambamorph.config import DataConfig
from mambamorph.data.datasets import open_dataset, test_pairs
from mambamorph.models import build_model
from mambamorph.optimize.instance import instance_optimise
from mambamorph.optimize.adam import Adam
from mambamorph.train import validate
from mambamorph.losses import grad_l2
root = "/work/data/phantom-cpu"  # mambamorph data phantom --preset cpu --seed 0
n_teacher = int(sys.argv[2]) if len(sys.argv) > 2 else 40
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 100
tr = open_dataset(DataConfig(root=root), "train", 0)
va = open_dataset(DataConfig(root=root), "val", 0)
rng = np.random.default_rng(0)
cache = f"/work/exp14/teacher_{n_teacher}.pt"
try:
    teach = torch.load(cache)
    print("loaded teachers", len(teach), flush=True)
except FileNotFoundError:
    teach = []
    t0 = time.time()
    for k in range(n_teacher):
        m, f = tr.random_pair_ids(rng)
        b = next(iter(tr.pairs([(m, f)])))
        mov, fix = b["moving"][None].float(), b["fixed"][None].float()
        r = instance_optimise(mov, fix)
        teach.append((m, f, r.flow.half()))
        print(k, m, f, round(time.time() - t0, 1), flush=True)
    torch.save(teach, cache)
vp = test_pairs(va.subjects, 5, 0)
torch.manual_seed(0)
net = build_model("voxelmorph")
opt = Adam(list(net.parameters()), lr=float(sys.argv[4]) if len(sys.argv) > 4 else 1e-3)
v = validate(net, va, vp, torch.device("cpu"), None)
print("step 0", json.dumps(v), flush=True)
t0 = time.time()
for step in range(1, steps + 1):
    m, f, tflow = teach[rng.integers(len(teach))]
    b = next(iter(tr.pairs([(m, f)])))
    out = net(b["moving"][None].float(), b["fixed"][None].float())
    loss = ((out.flow.float() - tflow.float()) ** 2).sum(1).mean() + 0.2 * grad_l2(out.smooth_target.float())
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 10 == 0:
        v = validate(net, va, vp, torch.device("cpu"), None)
        print(f"step {step} loss {float(loss):.3f} t {time.time()-t0:.0f}", json.dumps(v), flush=True)
