#!/bin/bash
# device call 3 (2026-11-26): GPU suite (issue 5) then toy-world sweep (issue 6)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/d*.whl .whl/i*.whl .whl/b*.whl .whl/w*.whl .whl/x*.whl > $OUT/pip.log 2>&1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > $OUT/env.txt
python3 -c "import torch,diffusers;print(torch.__version__,diffusers.__version__)" >> $OUT/env.txt 2>&1
python3 -c "import xformers,xformers.ops as x,torch;q=torch.randn(1,64,8,64,device='cuda',dtype=torch.bfloat16);x.memory_efficient_attention(q,q,q);print('xformers ok',xformers.__version__)" >> $OUT/env.txt 2>&1 || echo "xformers probe failed" >> $OUT/env.txt
timeout 245 python3 benchmarks/gpu_suite.py --out $OUT/suite --budget-s 200 > $OUT/suite.log 2>&1
echo "suite rc $?" >> $OUT/env.txt
BASE='{"feature_layer": "up_blocks.2.attentions.0.transformer_blocks.0.attn2", "modulated_layer": "up_blocks.2.attentions.2.transformer_blocks.0.attn2", "num_masks": 16}'
timeout 300 python3 benchmarks/toyworld/sweep.py --device cuda --models A2=.carry/A2 A=.carry/A --seeds 0 1 --num-images 128 --ablate A2 --ablation-images 48 --batch-size 16 --base "$BASE" --examples $OUT/examples_A2.png --out $OUT/sweep.jsonl > $OUT/sweep.log 2>&1
echo "sweep rc $?" >> $OUT/env.txt
grep -v "it/s" $OUT/suite.log | tail -25
tail -22 $OUT/sweep.log
