#!/bin/bash
# device call 4 (2026-11-26): fast options and torch.compile on sd14-arch 512² K 20
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/d*.whl .whl/i*.whl .whl/b*.whl .whl/w*.whl > $OUT/pip.log 2>&1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/env.txt
timeout 330 python3 benchmarks/gpu_suite.py --out $OUT/suite --budget-s 320 --only default,one_sided,steps_after_modulation_5,taesd_decoder,compile --skip profile > $OUT/suite.log 2>&1
echo "suite rc $?" >> $OUT/env.txt
grep -v "it/s" $OUT/suite.log | grep -v "^{" | tail -30
