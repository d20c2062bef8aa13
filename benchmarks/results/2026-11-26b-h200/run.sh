#!/bin/bash
# Prepared for the next lent GPU (not yet run): measures this tree's changes since the 2026-11-26 H200 run —
# the NHWC layout (emerdiff_pl.layout) against the stock layout, the shared t_m prefix (emerdiff_pl.prefix)
# against none, the batched reference pass against one call per step, and compile (U-Net + decoder since
# then) — side by side in one process, plus the profile.
# From the repo root, with the wheels of diffusers/braceexpand/webdataset/... in .whl (device: carry [".whl"]):
#   device run: bash benchmarks/results/next-gpu-run.sh      (≈ 7 min on an H200)
#   plumbing check on a CPU: OUT=/tmp/x bash benchmarks/results/next-gpu-run.sh --smoke --skip compile
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then  # not xformers: its wheel is built for another torch
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/d*.whl .whl/i*.whl .whl/b*.whl .whl/w*.whl > "$OUT/pip.log" 2>&1
    export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/env.txt"
python3 -c "import torch, diffusers; print(torch.__version__, diffusers.__version__)" >> "$OUT/env.txt"
timeout 420 python3 benchmarks/gpu_suite.py --out "$OUT/suite" --budget-s 380 \
    --only default,stock_layout,no_prefix_sharing,reference_step_by_step,compile "$@" > "$OUT/suite.log" 2>&1
echo "suite rc $?" >> "$OUT/env.txt"
grep -v "it/s" "$OUT/suite.log" | grep -v "^{" | tail -30
