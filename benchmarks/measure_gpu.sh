#!/bin/bash
# The GPU measurements of docs/scaling.md in one call, for a session lent a device (about 8 minutes of commands).
# From the project root, with tyro's, typeguard's, docstring-parser's and transformers 5.24's wheels in .whl/
# (DEVELOPERS.md says how), run through the device tool: carry [".whl"], command: bash benchmarks/measure_gpu.sh,
# timeout_s 600. Every step runs under timeout; the logs and a summary go to $OUT, most important first.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/r
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/00_gpu.txt"
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" | tee -a "$OUT/00_gpu.txt"
step() { local name=$1 limit=$2; shift 2; local t0=$SECONDS; echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; echo "rc=$? wall=$((SECONDS - t0))s" | tee -a "$OUT/$name.log"; }
scale() { python3 benchmarks/scale.py --device cuda "$@"; }
# 1. Real shapes: Qwen2.5-0.5B x 128 new tokens at the defaults, and 1.5B (random weights, nothing downloaded).
step 01_0.5b 60 scale --size 0.5b --num-prompts 256 --max-new-tokens 128 --iterations 2
step 02_1.5b 75 scale --size 1.5b --num-prompts 64 --max-new-tokens 128 --iterations 1
# 2. The embedded task: the time to 0.95, the first-minibatch ratio, iteration 0's KL of the bf16 pi_ref.
step 03_ppo 120 python3 ppo.py --device cuda --output-dir /tmp/r/ppo
python3 - /tmp/r/ppo <<'PY' | tee -a "$OUT/03_ppo.log"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
print("iteration-0 kl", rows[0].get("kl"), "| first-minibatch ratio error, max",
      max([r.get("first_minibatch_ratio_error", 0) for r in rows[1:]] or [0]))
print("evals (episodes, seconds, greedy):", [(r["episodes"], round(r["seconds"], 1), r["eval_accuracy"]) for r in rows
                                             if "eval_accuracy" in r])
PY
# 3. Past one GPU's memory: a Qwen2.5-7B shape with LoRA rank 1 on one card, 64 prompts x 128 new tokens.
step 04_7b_lora 210 scale --size 7b --num-prompts 64 --max-new-tokens 128 --iterations 1 -- --lora-rank 1
# 4. A 24 GB card at 0.5B x 128 tokens, and torchrun's NCCL path.
step 05_0.5b_24gib 60 scale --size 0.5b --num-prompts 256 --max-new-tokens 128 --iterations 2 --micro-batch-size 32
step 06_torchrun 45 torchrun --standalone --nproc-per-node 1 ppo.py --device cuda --total-episodes 6400 \
  --eval-every 3200 --output-dir /tmp/r/tr
grep -h -e "^## " -e "CUDA peak" -e "response tokens per second" -e "MFU of" -e "ratio error" -e "^| generation" \
  -e "^| update" "$OUT"/0[1245]*.log | tee "$OUT/summary.txt"; tail -3 "$OUT/03_ppo.log" "$OUT/06_torchrun.log"
