#!/bin/bash
# Multi-host training on a SLURM cluster: one process per node, each driving all of
# its node's GPUs; jax.distributed finds the coordinator, the number of processes and
# each one's id in SLURM's environment (--config.distributed.auto=True). The workdir
# must be on a filesystem every node sees (checkpoints are written by all of them).
#
#   sbatch scripts/slurm_train.sh                                   # the defaults below
#   CONFIG=configs/bytes.py:mamba sbatch --nodes=4 scripts/slurm_train.sh --config.train.steps=20000
#
# Extra arguments are ssm-train overrides. The mesh: data parallel over every GPU of
# every node by default; e.g. --config.mesh.fsdp=8 shards parameters within a node.
#
# Preemption and the time limit: SLURM sends SIGTERM (here 5 minutes before the
# limit, --signal); ssm-train saves a checkpoint and exits 75, and this script then
# requeues the job, which resumes from that checkpoint (the same WORKDIR: the job id
# stays the same across requeues). Any other status ends the job with that status.
#SBATCH --job-name=ssm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${CONFIG:-configs/bytes.py:mamba}
WORKDIR=${WORKDIR:-runs/slurm-${SLURM_JOB_ID:-local}}
STOPPED=75  # ssm-train's status when a signal stopped it with a checkpoint saved

status=0
srun ssm-train --config "$CONFIG" --workdir "$WORKDIR" \
  --config.distributed.auto=True --config.mesh.data=-1 "$@" || status=$?
if [ "$status" -eq "$STOPPED" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "ssm-train stopped with a checkpoint in $WORKDIR: requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
