#!/bin/bash
# The GPU check of issue 5 as last run (2026-11-26, H200: benchmarks/results/2026-11-26c-h200/): the default path
# against its undos (torch-op GroupNorm, stock classes), compile, the GroupNorm micro-benchmark and the profile,
# side by side in one process. About 5 minutes on an H200, 3 of them compiling.
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
    --only default,torch_group_norm,stock_layout,compile "$@" > "$OUT/suite.log" 2>&1
echo "suite rc $?" >> "$OUT/env.txt"
grep -v "it/s" "$OUT/suite.log" | grep -v "^{" | tail -30
