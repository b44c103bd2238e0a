#!/usr/bin/env bash
# One machine, NPROC worker processes (default: one per GPU, else 4), gloo on CPU / NCCL on GPUs.
# Every argument is a Hydra override, exactly as for `dimat simulate`:
#   launch/torchrun_single_node.sh experiment=mnist1d_fast num_peers=8 topology=ring
#   NPROC=2 launch/torchrun_single_node.sh num_peers=64 rounds=10      # 32 peers per process
# Workers are restarted up to MAX_RESTARTS times after a failure and resume from their checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if [ -z "${NPROC:-}" ]; then
  NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  if [ "$NGPU" -gt 0 ]; then NPROC=$NGPU; else NPROC=4; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
  --max_restarts="${MAX_RESTARTS:-2}" -m dimat.launch "$@"
