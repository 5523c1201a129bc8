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
#SBATCH --job-name=ssm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${CONFIG:-configs/bytes.py:mamba}
WORKDIR=${WORKDIR:-runs/slurm-${SLURM_JOB_ID:-local}}

srun ssm-train --config "$CONFIG" --workdir "$WORKDIR" \
  --config.distributed.auto=True --config.mesh.data=-1 "$@"
