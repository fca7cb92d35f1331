#!/bin/sh
# Train with torchrun on Slurm nodes (one torchrun per node, one worker per GPU), and requeue the job when
# its time limit comes near. Submit it from the repository, with OUTPUT_DIR on a filesystem every node sees:
#
#   sbatch --nodes 2 --gpus-per-node 4 --time 4:00:00 tools/slurm_train.sh \
#       --config-file config/resnet18.yaml OUTPUT_DIR /shared/output/r18
#
# 90 s before the time limit Slurm sends SIGUSR1 to this script (--signal=B:USR1@90), which passes it on to
# the training. Every worker finishes its step, the checkpoint is written, the MLflow run is marked KILLED,
# and the workers exit with 130 (torchrun itself then exits non-zero). The script then requeues the job; the
# requeued job (SLURM_RESTART_COUNT > 0) continues the same run with --resume. A worker that dies is handled
# by torchrun (--max-restarts), which restarts the group from the newest checkpoint.
#
# torchrun gives the workers SHUTDOWN_TIMEOUT seconds after passing a signal on, then sends SIGKILL; keep it
# below the 90 s of warning, and LOG.PERIOD steps plus one checkpoint well within it.
#
# Each job has a rendezvous of its own, so that jobs sharing a node never join each other's: on one node torchrun
# runs --standalone (a free port of its own); on several, the head node listens on RDZV_PORT, by default
# 15000 + the job id modulo 10000 (below Linux's ephemeral ports; set RDZV_PORT to choose another). The job asks
# for 8 CPUs per GPU (--cpus-per-gpu; change it on the sbatch line); each process sizes its DataLoader workers
# (DATA.NUM_WORKERS at most) from its share of the CPUs Slurm gave it.
#SBATCH --job-name=train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-gpu=8
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -u

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}  # Slurm runs a copy of this script: $0 is not in the repository
if [ ! -f "$REPO/tools/train_net.py" ]; then
    echo "error: $REPO is not the repository; submit from its root folder (or set REPO=<repository>)" >&2
    exit 2
fi
# shellcheck disable=SC1091  # tools/output_dir.sh, checked on its own
. "$REPO/tools/output_dir.sh"
output_dir=$(output_dir_of "$@")
if [ -z "$output_dir" ]; then
    echo "error: add OUTPUT_DIR <folder every node sees>: a requeued job continues the run found there" >&2
    exit 2
fi
[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] && set -- "$@" --resume

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(nvidia-smi --list-gpus | wc -l)}}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-75}
if [ "$SLURM_JOB_NUM_NODES" -eq 1 ]; then
    rendezvous="--standalone"
else
    HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    RDZV_PORT=${RDZV_PORT:-$((15000 + SLURM_JOB_ID % 10000))}
    rendezvous="--rdzv-backend c10d --rdzv-endpoint $HEAD_NODE:$RDZV_PORT --rdzv-id $SLURM_JOB_ID"
fi

stop_requested=0
# shellcheck disable=SC2329  # invoked by the trap below
pass_on_the_warning() {
    [ "$stop_requested" = 1 ] && return
    stop_requested=1
    echo "slurm_train.sh: SIGUSR1 (time limit near): the training checkpoints and stops; the job is requeued"
    scancel --signal=USR1 "$SLURM_JOB_ID"  # every process of the job's steps: torchrun and its workers
}
trap pass_on_the_warning USR1

cd "$REPO" || exit 2
# shellcheck disable=SC2086  # $rendezvous is several arguments
srun --kill-on-bad-exit=1 "$REPO/.venv/bin/torchrun" \
    --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$GPUS_PER_NODE" \
    $rendezvous --max-restarts 3 \
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "$SHUTDOWN_TIMEOUT" \
    tools/train_net.py "$@" TRAIN.DISTRIBUTED_BACKEND ddp &
training=$!
while :; do
    wait "$training"
    status=$?
    # The trap interrupts `wait` (status 128 + the signal's number) while the training goes on.
    if [ "$status" -le 128 ] || ! kill -0 "$training" 2>/dev/null; then
        break
    fi
done

if [ "$stop_requested" = 1 ] && [ ! -f "$output_dir/model_final.pth" ]; then
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
