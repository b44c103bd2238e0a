#!/usr/bin/env bash
# Example: two hosts, NPROC processes each, c10d rendezvous on host A. Run the SAME command on both
# hosts (same JOB_ID, same overrides); rank order is decided at rendezvous.
#   hostA$ HEAD=10.0.0.1 launch/torchrun_two_hosts.sh experiment=mnist1d_fast num_peers=16
#   hostB$ HEAD=10.0.0.1 launch/torchrun_two_hosts.sh experiment=mnist1d_fast num_peers=16
# run_dir is fixed from JOB_ID (not a timestamp) so both hosts use the same folder name; put it on a
# shared file system to see every rank's checkpoints in one place (rank 0 gathers the metrics over
# the process group and writes metrics.jsonl/summary.json either way). Open PORT on host A, and the
# gloo/NCCL ports between the hosts (set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to the right NIC).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
: "${HEAD:?set HEAD to the address of host A}"
PORT=${PORT:-29400}
JOB_ID=${JOB_ID:-dimat-two-hosts}
NPROC=${NPROC:-4}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" -m torch.distributed.run --nnodes=2 --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="$HEAD:$PORT" --rdzv_id="$JOB_ID" \
  --max_restarts="${MAX_RESTARTS:-2}" \
  -m dimat.launch run_dir="${RUN_DIR:-outputs/$JOB_ID}" "$@"
