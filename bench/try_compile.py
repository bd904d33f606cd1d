"""Does ``torch.compile`` speed up CPU inference? Eager bf16 ``predict`` against the compiled
model at the CPU preset (96x112x96), 2 threads: prints the eager time, the compile + first pass
time and the compiled time (best of 3). ``python bench/try_compile.py``. Figures only.
"""
import torch, time
torch.set_num_threads(2)
from mambamorph.models import build_model, predict
m = build_model("mambamorph").eval()
x = torch.rand(1,1,96,112,96); y = torch.rand(1,1,96,112,96)
def t(f, n=3):
    b=1e9
    for _ in range(n):
        s=time.perf_counter(); f(); b=min(b,time.perf_counter()-s)
    return b
predict(m, x, y, precision="bf16")
print("eager bf16", round(t(lambda: predict(m, x, y, precision="bf16")),2), flush=True)
mc = torch.compile(m)
s=time.perf_counter()
try:
    predict(mc, x, y, precision="bf16")
    print("compile+first pass", round(time.perf_counter()-s,1), flush=True)
    print("compiled bf16", round(t(lambda: predict(mc, x, y, precision="bf16")),2), flush=True)
except Exception as e:
    print("compile failed after", round(time.perf_counter()-s,1), "s:", type(e).__name__, str(e)[:300])
