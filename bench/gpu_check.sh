#!/usr/bin/env bash
# On a CUDA machine, in < 10 min (each step has a timeout; 555 s in all at most): fused (Triton) and foreach
# (torch ops, the CUDA fallback) versus reference parity on CUDA (VeLO, small_fc_lopt, muLO, Celo, Celo-Adam),
# every family's foreach path, the default path's self-check (it must pick Triton and pass without a
# warning), 2000-step drift, then the ViT-B/16 step-time benchmark (reference, foreach and default paths).
# Results go to bench/results/ (commit them). Needs torch with CUDA, triton, and this repo importable
# (pip install -e '.[triton]', or run from the repo root: the scripts put it on sys.path).
#   PYTHON=python3 bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
rc=0
"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" || exit 2
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv || true
echo "== parity on CUDA: fused and foreach vs reference, default path self-check, every family's foreach =="
timeout 300 "$PY" bench/gpu_parity.py --steps 3 --drift-steps 2000 || rc=1
echo "== ViT-B/16 step time (fp32) =="
timeout 180 "$PY" bench/step_time.py --tree vit --device cuda --steps 10 --warmup 3 \
  --optimizers adamw,velo,velo_foreach,velo_fused,small_fc_lopt,small_fc_lopt_foreach,small_fc_lopt_fused,celo_foreach,celo_fused,celo_adam_foreach,celo_adam_fused || rc=1
echo "== ViT-B/16 step time, fused only: bf16 params; tf32 tl.dot for small_fc_lopt's hidden layer =="
timeout 45 "$PY" bench/step_time.py --tree vit --device cuda --dtype bfloat16 --steps 10 --warmup 3 \
  --optimizers adamw,velo_fused,small_fc_lopt_fused,celo_fused,celo_adam_fused || rc=1
LOPT_TRITON_DOT_PRECISION=tf32 timeout 30 "$PY" bench/step_time.py --tree vit --device cuda --steps 10 --warmup 3 \
  --optimizers adamw,small_fc_lopt_fused || rc=1
ls -l bench/results/
exit $rc
