#!/bin/bash
# Multi-host training on a Cloud TPU pod slice: the same command on every TPU VM host
# (gcloud's --worker=all); jax.distributed reads the slice's topology from the TPU
# metadata (--config.distributed.auto=True). Each host needs the repository and its
# virtual environment at the same path (install once: pip install -e '.[tpu]'), and
# the workdir must be on a filesystem every host sees (an NFS / Filestore mount).
#
#   TPU=my-v5p-64 ZONE=us-east5-a WORKDIR=/shared/runs/b scripts/tpu_pod_train.sh \
#     --config.train.steps=20000
#
# Extra arguments are ssm-train overrides, e.g. --config.mesh.fsdp=8 --config.mesh.data=-1.
set -euo pipefail

: "${TPU:?set TPU to the name of the TPU VM (pod slice)}"
: "${ZONE:?set ZONE to its zone}"
CONFIG=${CONFIG:-configs/bytes.py:mamba}
: "${WORKDIR:?set WORKDIR to a directory every host sees (an NFS / Filestore mount)}"
REPO=${REPO:-~/ssm}

printf -v OVERRIDES '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd $REPO && . .venv/bin/activate && ssm-train --config $CONFIG --workdir $WORKDIR \
   --config.distributed.auto=True --config.model.dtype=bfloat16 $OVERRIDES"
