#!/bin/bash
# The next GPU check (prepared 2026-12-02, not yet run): the default path, the fast preset (configs/sd14-fast.yaml's
# model settings), the latent decoder alone, compile, the GroupNorm micro-benchmark and the profile, side by side
# in one process. The last run (2026-11-26, H200: benchmarks/results/2026-11-26c-h200/) took about 5 minutes,
# 3 of them compiling; the two new rows add about 10 s.
# From the repo root, with the wheels of diffusers/braceexpand/webdataset/... in .whl (device: carry [".whl"]):
#   device run: bash benchmarks/results/next-gpu-run.sh      (≈ 9 min on an H200: the suite, then end_to_end.py)
#   plumbing check on a CPU: OUT=/tmp/x bash benchmarks/results/next-gpu-run.sh --smoke --skip compile
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then  # not xformers: its wheel is built for another torch
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/d*.whl .whl/i*.whl .whl/b*.whl .whl/w*.whl > "$OUT/pip.log" 2>&1
    export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/env.txt"
python3 -c "import torch, diffusers; print(torch.__version__, diffusers.__version__)" >> "$OUT/env.txt"
timeout 400 python3 benchmarks/gpu_suite.py --out "$OUT/suite" --budget-s 360 \
    --only default,fast_preset,latent_decoder,compile "$@" > "$OUT/suite.log" 2>&1
echo "suite rc $?" >> "$OUT/env.txt"
grep -v "it/s" "$OUT/suite.log" | grep -v "^{" | tail -30
# end to end: the real CLI (DataModule, 8 workers, writer) on 48 synthetic JPEGs against segment()'s own time
# in the same run (target: the model ≥ 90 % of the loop); skipped by --smoke (use end_to_end.py on configs/tiny.yaml)
if [[ " $* " != *" --smoke "* ]]; then
    timeout 180 python3 benchmarks/end_to_end.py --config configs/sd14.yaml --num-images 48 \
        --model.pretrained sd14-arch --data.num_workers 8 --json "$OUT/end_to_end.json" > "$OUT/end_to_end.log" 2>&1
    echo "end_to_end rc $?" >> "$OUT/env.txt"
    tail -n 2 "$OUT/end_to_end.log"
fi
