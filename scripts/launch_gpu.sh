#!/usr/bin/env bash
# Launch train.py on GPUs with jax[cuda]: one process per host, each driving all of its GPUs.
#
# One host (all local GPUs):
#   scripts/launch_gpu.sh CONFIG WORKDIR [--config.FIELD=VALUE ...]
# Several hosts, started by hand (run on every host with its own NODE_RANK):
#   NUM_NODES=4 NODE_RANK=0 COORDINATOR=host0:12355 scripts/launch_gpu.sh CONFIG WORKDIR ...
# SLURM (one task per node; jax.distributed reads the SLURM environment by itself):
#   srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 scripts/launch_gpu.sh CONFIG WORKDIR ...
#
# WORKDIR must be shared by all hosts (NFS, or gs:// with gcsfs/TensorFlow installed).
set -euo pipefail

if [[ $# -lt 2 ]]; then sed -n '2,13p' "$0"; exit 2; fi
config=$1 workdir=$2
shift 2
cd "$(dirname "$0")/.."

# Let XLA take most of each GPU's memory up front and keep the rest for cuDNN/NCCL workspaces.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
# Overlap the gradient all-reduce / reduce-scatter with the backward pass.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

distributed=()
if [[ -n "${NUM_NODES:-}" && "${NUM_NODES}" -gt 1 ]]; then
  : "${NODE_RANK:?set NODE_RANK (0 .. NUM_NODES-1)}" "${COORDINATOR:?set COORDINATOR=host:port of node 0}"
  distributed=(--coordinator_address="$COORDINATOR" --num_processes="$NUM_NODES" --process_id="$NODE_RANK")
fi

exec python3 train.py --config="$config" --workdir="$workdir" "${distributed[@]}" "$@"
