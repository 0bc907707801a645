#!/usr/bin/env bash
# Every CPU benchmark in one run on a quiet machine (about 30 min on 2 cores), results into bench/results/:
# step times of every family and path on the small (3.1M), ResNet-18 (11.7M) and ViT-B/16 (86M) trees against
# torch AdamW foreach and fused, the jitted JAX reference and PyLO measured in the same run; Celo / Celo-Adam
# interleaved against AdamW with the copy / sgemm bounds; the optimizer's share of a whole training step with
# the step's peak memory; the non-finite guard's cost. The JAX and PyLO columns need their own checkouts:
#   JAX_PYTHON=/path/venv/bin/python LO_SRC=.../learned_optimization CELO_SRC=.../celo PYLO_SRC=.../pylo \
#     bash bench/cpu_suite.sh
# Without them those columns are left out.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${LO_SRC:+:$LO_SRC}${CELO_SRC:+:$CELO_SRC}${PYTHONPATH:+:$PYTHONPATH}"
ext=()
jax=""
pylo=""
if [ -n "${JAX_PYTHON:-}" ]; then ext+=(--jax-python "$JAX_PYTHON"); jax=",jax_velo,jax_small_fc_lopt,jax_celo,jax_celo_adam"; fi
if [ -n "${PYLO_SRC:-}" ]; then ext+=(--pylo-src "$PYLO_SRC"); pylo=",pylo_velo,pylo_small_fc_lopt"; fi
ours="velo,velo_foreach,velo_fused,small_fc_lopt,small_fc_lopt_foreach,small_fc_lopt_fused"
ours+=",celo,celo_foreach,celo_fused,celo_adam,celo_adam_foreach,celo_adam_fused"
fused="adamw,adamw_fused,velo_fused,small_fc_lopt_fused,celo_fused,celo_adam_fused"
rc=0
uptime
echo "== small tree (3 x (1024,1024) + 3 x (1024,)) =="
"$PY" bench/step_time.py --tree small --steps 10 --warmup 3 "${ext[@]}" \
  --optimizers "adamw,adamw_fused,$ours$jax$pylo" || rc=1
echo "== ResNet-18 tree =="
"$PY" bench/step_time.py --tree conv --steps 5 --warmup 2 "${ext[@]}" \
  --optimizers "adamw,adamw_fused,$ours${jax/,jax_celo_adam/}$pylo" || rc=1
echo "== ViT-B/16 tree, fused paths only =="
"$PY" bench/step_time.py --tree vit --steps 3 --warmup 1 --optimizers "$fused" || rc=1
echo "== Celo / Celo-Adam interleaved against AdamW, copy and sgemm rates =="
"$PY" bench/celo_speed.py steps --repeats 20 || rc=1
"$PY" bench/celo_speed.py rates || rc=1
echo "== the optimizer's share of a training step, peak step memory =="
"$PY" bench/e2e_share.py --steps 20 || rc=1
echo "== the non-finite guard =="
"$PY" bench/nonfinite_overhead.py --repeats 30 --json "bench/results/$(hostname)-$(date +%Y%m%d-%H%M%S)-nonfinite.json" || rc=1
uptime
exit $rc
