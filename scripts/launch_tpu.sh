#!/usr/bin/env bash
# Launch train.py on every worker of a Cloud TPU VM slice (one process per host), or set the
# workers up first.
#
#   scripts/launch_tpu.sh setup TPU_NAME ZONE [REPO_URL]
#       clone (or update) the repository into ~/clip_jax on every worker and install it with jax[tpu]
#   scripts/launch_tpu.sh train TPU_NAME ZONE CONFIG WORKDIR [--config.FIELD=VALUE ...]
#       e.g. scripts/launch_tpu.sh train my-v4-256 us-central2-b configs/vit_b32.py gs://my-bucket/clip/vit_b32
#   scripts/launch_tpu.sh stop TPU_NAME ZONE
#       send SIGTERM to train.py on every worker: each saves a checkpoint and exits cleanly
#
# WORKDIR must be reachable from every worker (a gs:// bucket). jax.distributed is started by
# train.py from the TPU environment; nothing else is needed. The same command resumes from the
# newest checkpoint, so after a preemption simply run it again.
set -euo pipefail

usage() { sed -n '2,16p' "$0"; exit 2; }
[[ $# -ge 3 ]] || usage
action=$1 tpu=$2 zone=$3
shift 3

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="$1"
}

case "$action" in
  setup)
    repo=${1:-https://github.com/YOUR_ORG/clip_jax.git}
    on_all_workers "set -e; if [ -d ~/clip_jax/.git ]; then git -C ~/clip_jax pull --ff-only; else git clone $repo ~/clip_jax; fi; \
      cd ~/clip_jax && python3 -m pip install -q -e '.[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
    ;;
  train)
    [[ $# -ge 2 ]] || usage
    config=$1 workdir=$2
    shift 2
    extra=$(printf ' %q' "$@")
    # nohup + a log per worker: the run survives a dropped ssh connection.
    on_all_workers "cd ~/clip_jax && nohup python3 train.py --config=$config --workdir=$workdir$extra \
      > ~/clip_jax_train.log 2>&1 & echo started on \$(hostname); sleep 1"
    echo "Logs: gcloud compute tpus tpu-vm ssh $tpu --zone=$zone --worker=0 --command='tail -f ~/clip_jax_train.log'"
    echo "TensorBoard: tensorboard --logdir $workdir/tensorboard"
    ;;
  stop)
    on_all_workers "pkill -TERM -f 'python3 train.py' || true"
    ;;
  *)
    usage
    ;;
esac
